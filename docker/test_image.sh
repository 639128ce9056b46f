#!/usr/bin/env bash
# Build the project's image from docker/Dockerfile on the offline Debian base (docker/debian-base/) with
# podman, then run the job inside it as a Kubernetes user's pod would: as its non-root user, without
# network, on local[2], in every mode, through `clip-nsfw-spark run`, spark-submit and the Kubernetes
# entrypoint (as a random uid, as OpenShift runs pods).
#
#   docker/test_image.sh [WORK_DIR]          (default: a new temporary folder)
#
# Needs (as root): podman, buildah, mmdebstrap, runc (Debian packages), a Debian mirror, a package index or
# pip cache for the wheelhouse (made by $PYTHON, which must be the image's Python: 3.11), and the model files
# in $CLIP_NSFW_CACHE (default ../shared/models). Both builds run with --network=none: nothing is fetched.
# Leaves in WORK_DIR: data/ (the sample, every output and log), results.json (what was found), build.log.
# Images: localhost/clip-nsfw-rootfs:bookworm (reused when present unless REBUILD_BASE=1), and
# localhost/clip-nsfw-spark-base:<spark>-$IMAGE_TAG, localhost/clip-nsfw-spark:$IMAGE_TAG (IMAGE_TAG default
# "test"; concurrent runs need different tags), left for the caller to remove. The builds keep no layer cache
# (--layers=false): each run builds from scratch, and removing the two tags removes everything they made.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${1:-$(mktemp -d)}"
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"
MODELS_DIR="${CLIP_NSFW_CACHE:-${ROOT}/../shared/models}"
PYTHON="${PYTHON:-python3}"
TAG="${IMAGE_TAG:-test}"
SPARK_VERSION="$(sed -n 's/^ARG SPARK_IMAGE=apache\/spark:\([0-9.]*\)-.*/\1/p' "${ROOT}/docker/Dockerfile")"
ROOTFS_IMAGE=localhost/clip-nsfw-rootfs:bookworm
BASE_IMAGE="localhost/clip-nsfw-spark-base:${SPARK_VERSION}-${TAG}"
IMAGE="localhost/clip-nsfw-spark:${TAG}"
# The models whose files are at hand offline (vit-h-14's .pth is not in ../shared/models).
MODELS="vit-l-14 vit-b-32 violence-l-14 violence-b-32"
# crun cannot set rlimits or use hybrid cgroups in this sandbox; runc with cgroupfs can (see docker/README.md).
PODMAN=(podman --runtime runc --cgroup-manager cgroupfs)
LIMITS=(--ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" --ulimit "nproc=4096:4096")
LOG="${WORK}/build.log"
DATA="${WORK}/data"
step() { printf '%s  %s\n' "$(date -u +%H:%M:%S)" "$*"; }
seconds() { echo $(( $(date +%s) - $1 )); }
# logged NAME COMMAND...: run it, output to $DATA/NAME.log; on failure show its end and stop.
logged() {
  local name="$1"; shift
  if ! "$@" > "${DATA}/${name}.log" 2>&1; then
    echo "test_image.sh: ${name} failed; the end of ${DATA}/${name}.log:" >&2
    tail -40 "${DATA}/${name}.log" >&2
    exit 1
  fi
}

for tool in podman buildah mmdebstrap runc git; do
  command -v "$tool" > /dev/null || { echo "test_image.sh: $tool is missing (apt-get install podman buildah mmdebstrap runc)" >&2; exit 3; }
done
[ -f "${MODELS_DIR}/clip_autokeras_binary_nsfw.zip" ] || { echo "test_image.sh: no model files in ${MODELS_DIR} (set CLIP_NSFW_CACHE)" >&2; exit 3; }
python_version="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
[ "$python_version" = 3.11 ] || { echo "test_image.sh: the wheelhouse must be made by a Python 3.11 (the image's), not ${PYTHON} (${python_version})" >&2; exit 3; }
: > "$LOG"
rm -rf "$DATA" && mkdir -p "$DATA"

# ---- the build context: the checkout's files as they are now (committed or not), the models, a wheelhouse ----
started=$(date +%s)
step "context and wheelhouse in ${WORK}/context"
rm -rf "${WORK}/context" && mkdir -p "${WORK}/context"
git -C "$ROOT" ls-files -z --cached --others --exclude-standard \
  | (cd "$ROOT" && while IFS= read -r -d '' name; do [ -e "$name" ] && printf '%s\0' "$name"; done) \
  | tar -C "$ROOT" --null -T - -cf - | tar -C "${WORK}/context" -xf -
cp "${MODELS_DIR}"/*.zip "${MODELS_DIR}"/*.npy "${WORK}/context/docker/models/"
# Every wheel the two builds install (the project's own is built inside; pip builds it here to resolve its
# dependencies, in the context copy, and the copy's build leftovers are removed).
"$PYTHON" -m pip wheel --quiet -w "${WORK}/context/docker/wheelhouse" "${WORK}/context[image,tensorflow]" \
    "pyspark==${SPARK_VERSION}" "setuptools>=77" wheel >> "$LOG" 2>&1
rm -rf "${WORK}/context/docker/wheelhouse"/clip_nsfw_spark-*.whl "${WORK}/context/build" "${WORK}/context"/*.egg-info
wheelhouse_seconds=$(seconds "$started")

# ---- the offline base: Debian packages (mmdebstrap) + Spark from the pyspark wheel ----------------------
started=$(date +%s)
if [ "${REBUILD_BASE:-0}" = 1 ] || ! "${PODMAN[@]}" image exists "$ROOTFS_IMAGE"; then
  mirror="$(sed -n 's/^URIs: *\([^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)"
  step "root file system from ${mirror:-http://deb.debian.org/debian}"
  packages="$(grep -v '^#' "${ROOT}/docker/debian-base/packages.txt" | xargs | tr ' ' ,)"
  mmdebstrap --variant=minbase --include="$packages" bookworm "${WORK}/rootfs.tar" \
      "${mirror:-http://deb.debian.org/debian}" >> "$LOG" 2>&1
  "${PODMAN[@]}" import "${WORK}/rootfs.tar" "$ROOTFS_IMAGE" >> "$LOG" 2>&1
  rm -f "${WORK}/rootfs.tar"
fi
step "base image ${BASE_IMAGE}"
"${PODMAN[@]}" build --layers=false --network=none "${LIMITS[@]}" -f "${WORK}/context/docker/debian-base/Dockerfile" \
    --build-arg "PYSPARK_VERSION=${SPARK_VERSION}" -t "$BASE_IMAGE" "${WORK}/context/docker" >> "$LOG" 2>&1
base_seconds=$(seconds "$started")

# ---- the project's Dockerfile, as users build it, on that base ------------------------------------------
started=$(date +%s)
step "image ${IMAGE} from docker/Dockerfile"
"${PODMAN[@]}" build --layers=false --network=none "${LIMITS[@]}" -f "${WORK}/context/docker/Dockerfile" \
    --build-arg "SPARK_IMAGE=${BASE_IMAGE}" --build-arg PIP_NO_INDEX=true --build-arg "MODELS=${MODELS}" \
    -t "$IMAGE" "${WORK}/context" >> "$LOG" 2>&1
image_seconds=$(seconds "$started")

# ---- inside the container: no network, the image's own user, a folder of the host for data -------------
chmod 777 "$DATA"
inside() { "${PODMAN[@]}" run --rm --network=none "${LIMITS[@]}" -v "${DATA}:/data" "$IMAGE" "$@"; }
started=$(date +%s)
step "checks inside the container"
inside bash -c 'python3 --version; java -version 2>&1 | head -1; id -u; id -un; echo "$SPARK_HOME"; echo "$JAVA_HOME"' > "${DATA}/versions.txt"
inside python3 -c 'import importlib.util, json; print(json.dumps({m: importlib.util.find_spec(m) is not None for m in ("tensorflow", "keras", "torch", "pyspark", "pandas", "s3fs", "numba")}))' > "${DATA}/modules.json"
# shellcheck disable=SC2086  # MODELS is a list of names
inside clip-nsfw-spark model info ${MODELS} --json > "${DATA}/models.json"
logged sample inside clip-nsfw-spark sample /data/in --rows 3000 --files 3
for mode in annotate filter split scores; do
  step "  clip-nsfw-spark run --mode ${mode}"
  logged "run-${mode}" inside clip-nsfw-spark run --input /data/in --output "/data/out-${mode}" --mode "$mode" \
      --master 'local[2]' --model vit-l-14 --model violence-l-14 --rows-per-task 700
done
step "  spark-submit jobs/score_embeddings.py"
logged submit inside spark-submit --master 'local[2]' jobs/score_embeddings.py --config conf/split.yaml \
    --input /data/in --output /data/out-submit
# The Kubernetes entrypoint: `driver` (spark-submit under tini, as the driver pod runs it) as a random uid
# with no passwd entry (OpenShift; --passwd=false stops podman from adding one, so nss_wrapper must).
step "  the entrypoint's driver branch as uid 123456"
logged driver "${PODMAN[@]}" run --rm --network=none "${LIMITS[@]}" --passwd=false --user 123456:0 \
    -e SPARK_DRIVER_BIND_ADDRESS=127.0.0.1 -v "${DATA}:/data" "$IMAGE" \
    driver --master 'local[2]' local:///opt/clip-nsfw-spark/jobs/score_embeddings.py \
    --input /data/in --output /data/out-driver --mode scores --model vit-l-14
# `executor` with no driver to reach: it must start the backend and fail on the connection, nothing else.
step "  the entrypoint's executor branch (no driver)"
"${PODMAN[@]}" run --rm --network=none "${LIMITS[@]}" \
    -e SPARK_DRIVER_URL=spark://CoarseGrainedScheduler@127.0.0.1:1 -e SPARK_EXECUTOR_ID=1 \
    -e SPARK_EXECUTOR_CORES=1 -e SPARK_APPLICATION_ID=app-test -e SPARK_EXECUTOR_POD_IP=127.0.0.1 \
    -e SPARK_RESOURCE_PROFILE_ID=0 -e SPARK_EXECUTOR_POD_NAME=executor-test -e SPARK_EXECUTOR_MEMORY=512m \
    "$IMAGE" executor > "${DATA}/executor.log" 2>&1 && echo "exit 0" >> "${DATA}/executor.log" || true
run_seconds=$(seconds "$started")

size_bytes="$("${PODMAN[@]}" image inspect "$IMAGE" --format '{{.Size}}')"
base_bytes="$("${PODMAN[@]}" image inspect "$BASE_IMAGE" --format '{{.Size}}')"
"$PYTHON" - "$WORK" "$IMAGE" "$BASE_IMAGE" "$size_bytes" "$base_bytes" "$wheelhouse_seconds" "$base_seconds" \
    "$image_seconds" "$run_seconds" <<'PY'
import json, sys
from pathlib import Path
work, image, base_image, size, base, *durations = sys.argv[1:]
data = Path(work) / "data"
python, java, uid, user, spark_home, java_home = data.joinpath("versions.txt").read_text().splitlines()
results = {
    "image": image, "base_image": base_image, "image_bytes": int(size), "base_bytes": int(base),
    "python": python, "java": java, "uid": int(uid), "user": user, "spark_home": spark_home, "java_home": java_home,
    "modules": json.loads(data.joinpath("modules.json").read_text()),
    "models": json.loads(data.joinpath("models.json").read_text()),
    "seconds": dict(zip(["wheelhouse", "base", "image", "runs"], map(int, durations))),
}
Path(work, "results.json").write_text(json.dumps(results, indent=2))
print(f"image {int(size) / 2**30:.2f} GiB (its Debian base with Spark {int(base) / 2**30:.2f} GiB); {python}; {java}; "
      f"user {user} ({uid}); seconds {results['seconds']}")
PY
step "done: ${WORK}/results.json"
