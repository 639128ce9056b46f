#!/usr/bin/env bash
# Build the project's image from docker/Dockerfile on the offline Debian base (docker/debian-base/) with
# podman, then run the job inside it as a Kubernetes user's pod would: as its non-root user, without
# network, on local[2], in every mode, through `clip-nsfw-spark run` and through spark-submit.
#
#   docker/test_image.sh [WORK_DIR]
#
# Needs (as root): podman, buildah, mmdebstrap, runc (Debian packages), a Debian mirror, a package index or
# pip cache for the wheelhouse, and the model files in $CLIP_NSFW_CACHE (default ../shared/models).
# Leaves in WORK_DIR: data/ (the sample and every output), results.json (what was checked), build.log.
# The images stay in podman's store (localhost/clip-nsfw-rootfs:bookworm, localhost/clip-nsfw-spark-base:V,
# localhost/clip-nsfw-spark:test); the rootfs image is reused when present unless REBUILD_BASE=1.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mkdir -p "${1:-$(mktemp -d)}" && cd "${1:-.}" && pwd)"
MODELS_DIR="${CLIP_NSFW_CACHE:-${ROOT}/../shared/models}"
PYTHON="${PYTHON:-python3}"
SPARK_VERSION="$(sed -n 's/^ARG SPARK_IMAGE=apache\/spark:\([0-9.]*\)-.*/\1/p' "${ROOT}/docker/Dockerfile")"
ROOTFS_IMAGE=localhost/clip-nsfw-rootfs:bookworm
BASE_IMAGE="localhost/clip-nsfw-spark-base:${SPARK_VERSION}"
IMAGE=localhost/clip-nsfw-spark:test
# The models whose files are at hand offline (vit-h-14's .pth is not in ../shared/models).
MODELS="vit-l-14 vit-b-32 violence-l-14 violence-b-32"
# crun cannot set rlimits or use hybrid cgroups in this sandbox; runc with cgroupfs can (see docker/README.md).
PODMAN=(podman --runtime runc --cgroup-manager cgroupfs)
LIMITS=(--ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" --ulimit "nproc=4096:4096")
LOG="${WORK}/build.log"
step() { printf '%s  %s\n' "$(date -u +%H:%M:%S)" "$*"; }
seconds() { echo $(( $(date +%s) - $1 )); }

for tool in podman buildah mmdebstrap runc; do
  command -v "$tool" > /dev/null || { echo "test_image.sh: $tool is missing (apt-get install podman buildah mmdebstrap runc)" >&2; exit 3; }
done
[ -f "${MODELS_DIR}/clip_autokeras_binary_nsfw.zip" ] || { echo "test_image.sh: no model files in ${MODELS_DIR} (set CLIP_NSFW_CACHE)" >&2; exit 3; }
: > "$LOG"

# ---- the build context: the tracked files as they are now, the model files, a wheelhouse ----------------
started=$(date +%s)
step "context and wheelhouse in ${WORK}/context"
rm -rf "${WORK}/context" && mkdir -p "${WORK}/context"
git -C "$ROOT" ls-files -z | tar -C "$ROOT" --null -T - -cf - | tar -C "${WORK}/context" -xf -
cp "${MODELS_DIR}"/*.zip "${MODELS_DIR}"/*.npy "${WORK}/context/docker/models/"
"$PYTHON" -m pip wheel --quiet -w "${WORK}/context/docker/wheelhouse" "${ROOT}[image,tensorflow]" \
    "pyspark==${SPARK_VERSION}" build==1.3.0 "setuptools>=77" wheel >> "$LOG" 2>&1
rm -f "${WORK}/context/docker/wheelhouse"/clip_nsfw_spark-*.whl
wheelhouse_seconds=$(seconds "$started")

# ---- the offline base: Debian packages (mmdebstrap) + Spark from the pyspark wheel ----------------------
started=$(date +%s)
if [ "${REBUILD_BASE:-0}" = 1 ] || ! "${PODMAN[@]}" image exists "$ROOTFS_IMAGE"; then
  mirror="$(sed -n 's/^URIs: *\([^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)"
  step "rootfs from ${mirror:-http://deb.debian.org/debian}"
  packages="$(grep -v '^#' "${ROOT}/docker/debian-base/packages.txt" | xargs | tr ' ' ,)"
  mmdebstrap --variant=minbase --include="$packages" bookworm "${WORK}/rootfs.tar" \
      "${mirror:-http://deb.debian.org/debian}" >> "$LOG" 2>&1
  "${PODMAN[@]}" import "${WORK}/rootfs.tar" "$ROOTFS_IMAGE" >> "$LOG" 2>&1
  rm -f "${WORK}/rootfs.tar"
fi
step "base image ${BASE_IMAGE}"
"${PODMAN[@]}" build --network=host "${LIMITS[@]}" -f "${WORK}/context/docker/debian-base/Dockerfile" \
    --build-arg "PYSPARK_VERSION=${SPARK_VERSION}" -t "$BASE_IMAGE" "${WORK}/context/docker" >> "$LOG" 2>&1
base_seconds=$(seconds "$started")

# ---- the project's Dockerfile, as users build it, on that base ------------------------------------------
started=$(date +%s)
step "image ${IMAGE} from docker/Dockerfile"
"${PODMAN[@]}" build --network=host "${LIMITS[@]}" -f "${WORK}/context/docker/Dockerfile" \
    --build-arg "SPARK_IMAGE=${BASE_IMAGE}" --build-arg PIP_NO_INDEX=true --build-arg "MODELS=${MODELS}" \
    -t "$IMAGE" "${WORK}/context" >> "$LOG" 2>&1
image_seconds=$(seconds "$started")

# ---- inside the container: no network, the image's own user, a folder of the host for data -------------
rm -rf "${WORK}/data" && mkdir -p "${WORK}/data" && chmod 777 "${WORK}/data"
inside() { "${PODMAN[@]}" run --rm --network=none "${LIMITS[@]}" -v "${WORK}/data:/data" "$IMAGE" "$@"; }
started=$(date +%s)
step "checks inside the container"
inside bash -c 'python3 --version; java -version 2>&1 | head -1; id -u; id -un; echo "$SPARK_HOME"' > "${WORK}/data/versions.txt"
# The entrypoint's Kubernetes driver branch (spark-submit under tini), and a random uid as OpenShift gives one.
inside driver --version > "${WORK}/data/driver.txt" 2>&1
"${PODMAN[@]}" run --rm --network=none "${LIMITS[@]}" --user 123456:0 "$IMAGE" \
    driver --version > "${WORK}/data/random-uid.txt" 2>&1
inside python3 -c 'import importlib.util, json; print(json.dumps({m: importlib.util.find_spec(m) is not None for m in ("tensorflow", "keras", "torch", "pyspark", "pandas", "s3fs", "numba")}))' > "${WORK}/data/modules.json"
# shellcheck disable=SC2086  # MODELS is a list of names
inside clip-nsfw-spark model info ${MODELS} --json > "${WORK}/data/models.json"
inside clip-nsfw-spark sample /data/in --rows 3000 --files 3 > /dev/null
for mode in annotate filter split scores; do
  step "  clip-nsfw-spark run --mode ${mode}"
  inside clip-nsfw-spark run --input /data/in --output "/data/out-${mode}" --mode "$mode" --master 'local[2]' \
      --model vit-l-14 --model violence-l-14 --rows-per-task 700 > "${WORK}/data/run-${mode}.log" 2>&1
done
step "  spark-submit jobs/score_embeddings.py"
inside spark-submit --master 'local[2]' jobs/score_embeddings.py --config conf/split.yaml \
    --input /data/in --output /data/out-submit > "${WORK}/data/submit.log" 2>&1
run_seconds=$(seconds "$started")

size_bytes="$("${PODMAN[@]}" image inspect "$IMAGE" --format '{{.Size}}')"
base_bytes="$("${PODMAN[@]}" image inspect "$BASE_IMAGE" --format '{{.Size}}')"
"$PYTHON" - "$WORK" "$size_bytes" "$base_bytes" "$wheelhouse_seconds" "$base_seconds" "$image_seconds" "$run_seconds" <<'PY'
import json, sys
from pathlib import Path
work, size, base, *durations = sys.argv[1:]
data = Path(work) / "data"
python, java, uid, user, spark_home = data.joinpath("versions.txt").read_text().splitlines()
results = {
    "image_bytes": int(size), "base_bytes": int(base),
    "python": python, "java": java, "uid": int(uid), "user": user, "spark_home": spark_home,
    "modules": json.loads(data.joinpath("modules.json").read_text()),
    "models": json.loads(data.joinpath("models.json").read_text()),
    "driver_entrypoint": data.joinpath("driver.txt").read_text(),
    "driver_entrypoint_random_uid": data.joinpath("random-uid.txt").read_text(),
    "seconds": dict(zip(["wheelhouse", "base", "image", "runs"], map(int, durations))),
}
Path(work, "results.json").write_text(json.dumps(results, indent=2))
print(f"image {int(size) / 2**30:.2f} GiB (base {int(base) / 2**30:.2f} GiB); {python}; {java}; user {user} ({uid}); "
      f"seconds {results['seconds']}")
PY
step "done: ${WORK}/results.json"
