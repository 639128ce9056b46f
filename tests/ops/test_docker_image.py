"""The image users build from docker/Dockerfile, built here with podman on the offline Debian base
(docker/test_image.sh) and run as a Kubernetes pod runs it: its own non-root user, no network, the job in
every mode on local[2] and through spark-submit. The outputs made inside are checked here against the
same job run on the host: the same rows, the same score bits.

Needs podman, buildah, mmdebstrap and runc (Debian packages; .ci/run installs them) and root; skipped with
the reason otherwise, and with CLIP_NSFW_REQUIRE_IMAGE=1 (.ci/run) that is a failure instead. ~7 minutes
cold (the Debian root file system, the wheelhouse, two builds, eight runs), then this run's images are
removed (the Debian root file system image is kept for the next run).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest

from clip_nsfw_spark.driver.config import JobConfig
from clip_nsfw_spark.driver.job import run_job
from conftest import ROOT, needs_models

pytestmark = pytest.mark.slow  # builds two images and runs eight jobs in them (~7 min)

SCRIPT = ROOT / "docker" / "test_image.sh"
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs"]
MODELS = ["vit-l-14", "violence-l-14"]  # the heads of the runs inside (test_image.sh)


def _cannot_build() -> str | None:
    missing = [tool for tool in ("podman", "buildah", "mmdebstrap", "runc", "git") if not shutil.which(tool)]
    if missing:
        return f"{', '.join(missing)} missing (apt-get install podman buildah mmdebstrap runc)"
    if os.geteuid() != 0:
        return "podman builds here need root"
    if sys.version_info[:2] != (3, 11):
        return f"the wheelhouse is built by this Python ({sys.version.split()[0]}), the image has Debian's 3.11"
    return None


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """docker/test_image.sh run once: (its work folder, results.json as a dict)."""
    why = _cannot_build()
    if why:
        if os.environ.get("CLIP_NSFW_REQUIRE_IMAGE") == "1":
            pytest.fail(f"the image is required here (CLIP_NSFW_REQUIRE_IMAGE=1) but cannot be built: {why}")
        pytest.skip(f"no image build: {why}")
    work = tmp_path_factory.mktemp("image")
    tag = f"test-{os.getpid()}"  # this run's images only: another run (a developer's, CI's) keeps its own
    result = subprocess.run(["bash", str(SCRIPT), str(work)], env=os.environ | {"PYTHON": sys.executable, "IMAGE_TAG": tag},
                            capture_output=True, text=True, timeout=3600)
    try:
        build_log = (work / "build.log").read_text()[-3000:] if (work / "build.log").exists() else ""
        assert result.returncode == 0, result.stdout + result.stderr + build_log
        yield work, json.loads((work / "results.json").read_text())
    finally:
        shutil.rmtree(work / "context", ignore_errors=True)  # the wheelhouse copy (~0.9 GB)
        if os.environ.get("CLIP_NSFW_KEEP_IMAGES") != "1":  # ~2.5 GB; built without a layer cache, so that is all
            subprocess.run([*PODMAN, "rmi", "-f", f"localhost/clip-nsfw-spark:{tag}",
                            f"localhost/clip-nsfw-spark-base:4.3.0-{tag}"], capture_output=True)


def _rows(folder: Path, columns: list[str]) -> dict:
    """key → tuple of the columns' values, over the data files of an output folder (``_`` names are not data)."""
    files = sorted(p for p in folder.rglob("*.parquet") if not any(part.startswith("_") for part in p.relative_to(folder).parts))
    assert files, f"no data files in {folder}"
    table = ds.dataset([str(p) for p in files], format="parquet").to_table(columns=["key", *columns])
    keys = table.column("key").to_pylist()
    assert len(set(keys)) == len(keys), f"a row twice in {folder}"
    values = [np.asarray(table.column(c).to_numpy(zero_copy_only=False)) for c in columns]
    return {key: tuple(v[i].tobytes() if hasattr(v[i], "tobytes") else v[i] for v in values) for i, key in enumerate(keys)}


def test_the_image_runs_as_a_non_root_user_without_tensorflow_and_reports_its_versions(image_run):
    _, results = image_run
    assert results["uid"] == 185 and results["user"] == "spark", results
    assert results["python"].startswith("Python 3.11"), results["python"]
    assert '"17.' in results["java"], results["java"]
    assert results["spark_home"] == "/opt/spark"
    modules = results["modules"]
    assert not modules["tensorflow"] and not modules["keras"] and not modules["torch"], modules
    assert modules["pyspark"] and modules["pandas"] and modules["s3fs"] and modules["numba"], modules
    assert results["java_home"] == "/opt/java/openjdk", results  # where the official (Temurin) base has it
    assert 0.5 * 2**30 < results["image_bytes"] < 4 * 2**30, results["image_bytes"]  # reported in docs/operations.md and docker/README.md


@needs_models
def test_the_image_holds_the_verified_models_it_was_built_with(image_run):
    _, results = image_run
    pinned = {}
    for line in (Path(os.environ["CLIP_NSFW_CACHE"]) / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        pinned[name.lstrip("*")] = digest
    infos = {info["name"]: info for info in results["models"]}
    assert sorted(infos) == sorted(["vit-l-14", "vit-b-32", "violence-l-14", "violence-b-32"])
    for info in infos.values():
        assert info["source"].startswith("/opt/clip-nsfw-cache/"), info
        assert info["portable_weights"].startswith("/opt/clip-nsfw-cache/derived/"), info
        assert info["sha256"] == pinned[Path(info["source"]).name], info  # checked inside on use, too
        assert info["saved_model"] is None or "/opt/clip-nsfw-cache/" in info["saved_model"], info


@needs_models
def test_every_mode_inside_the_image_gives_the_hosts_rows_and_score_bits(image_run, tmp_path):
    work, _ = image_run
    data = work / "data"
    host = tmp_path / "host"
    run_job(JobConfig(input=str(data / "in"), output=str(host), mode="scores", models=tuple(MODELS), rows_per_task=700))
    scores = ["punsafe", "pviolence"]
    expected = _rows(host, scores)
    assert len(expected) == 3000

    assert _rows(data / "out-annotate", scores) == expected
    assert _rows(data / "out-scores", scores) == expected
    # filter (keep safe) and split: unsafe ⇔ any head's score ≥ its threshold (0.5 for both heads)
    unsafe = {key for key, (p, v) in expected.items() if max(np.frombuffer(p, np.float32)[0], np.frombuffer(v, np.float32)[0]) >= 0.5}
    assert 0 < len(unsafe) < len(expected)
    assert set(_rows(data / "out-filter", [])) == set(expected) - unsafe
    assert set(_rows(data / "out-split" / "unsafe", [])) == unsafe
    assert set(_rows(data / "out-split" / "safe", [])) == set(expected) - unsafe
    for mode in ("annotate", "filter", "split", "scores"):
        report = json.loads((data / f"out-{mode}" / "_clip_nsfw_report.json").read_text())
        assert report["rows"]["read"] == 3000 and (data / f"out-{mode}" / "_SUCCESS").exists(), mode


@needs_models
def test_spark_submit_of_the_jobs_entry_point_inside_the_image_splits_at_laions_cut(image_run, tmp_path):
    """conf/split.yaml: vit-l-14, unsafe ⇔ punsafe ≥ 0.5, run by the image's spark-submit."""
    work, _ = image_run
    data = work / "data"
    expected = _rows(data / "out-scores", ["punsafe"])
    unsafe = {key for key, (p,) in expected.items() if np.frombuffer(p, np.float32)[0] >= 0.5}
    assert set(_rows(data / "out-submit" / "unsafe", ["punsafe"])) == unsafe
    assert set(_rows(data / "out-submit" / "safe", [])) == set(expected) - unsafe
    submitted = {**_rows(data / "out-submit" / "unsafe", ["punsafe"]), **_rows(data / "out-submit" / "safe", ["punsafe"])}
    assert submitted == expected
    log = (data / "submit.log").read_text()
    assert "split done" in log, log[-2000:]


@needs_models
def test_the_kubernetes_entrypoint_runs_the_driver_as_a_random_uid_and_starts_the_executor_backend(image_run):
    """`driver ARGS` (spark-submit in client mode under tini, as a driver pod runs it) as uid 123456 with no
    passwd entry (as OpenShift runs pods; nss_wrapper gives it one): the job's scores. `executor` with no
    driver to reach: the Kubernetes backend starts and fails on the connection, not on a class or a path."""
    work, _ = image_run
    data = work / "data"
    expected = _rows(data / "out-scores", ["punsafe"])
    assert _rows(data / "out-driver", ["punsafe"]) == expected
    driver_log = (data / "driver.log").read_text()
    assert "scores done" in driver_log, driver_log[-3000:]
    assert "users with view permissions: spark " in driver_log  # the uid got its name from nss_wrapper
    executor_log = (data / "executor.log").read_text()
    assert "KubernetesExecutorBackend: Started daemon" in executor_log, executor_log[-3000:]
    assert "Connection refused" in executor_log and "127.0.0.1:1" in executor_log, executor_log[-3000:]
    for wrong in ("ClassNotFoundException", "Could not find or load main class", "No such file", "exit 0"):
        assert wrong not in executor_log, executor_log[-3000:]
