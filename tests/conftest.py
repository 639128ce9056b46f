"""Shared fixtures: the real LAION models from ../shared/models, a private writable cache, real Spark.

The model cache is set up at import time (before any test module imports the package) so that every
subprocess a test starts inherits it too.
"""

import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_MODELS = ROOT.parent / "shared" / "models"

if not os.environ.get("CLIP_NSFW_CACHE") and SHARED_MODELS.is_dir():
    os.environ["CLIP_NSFW_CACHE"] = str(SHARED_MODELS)
# Derived files (extracted SavedModels, portable weights) go to a per-run directory unless the caller
# chose one: tests must not depend on, or pollute, the user's cache.
os.environ.setdefault("CLIP_NSFW_HOME", tempfile.mkdtemp(prefix="clip-nsfw-test-home-"))
# Spark's Python workers must run this interpreter (the venv's), not whatever python3 is on PATH.
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)

ZIPS = {"vit-l-14": "clip_autokeras_binary_nsfw.zip", "vit-b-32": "clip_autokeras_nsfw_b32.zip"}


def models_available() -> bool:
    cache = Path(os.environ.get("CLIP_NSFW_CACHE", ""))
    return all((cache / name).is_file() for name in ZIPS.values())


needs_models = pytest.mark.skipif(
    not models_available(),
    reason="!!! THE REAL LAION MODELS ARE MISSING: put the zips in ../shared/models or point "
           "CLIP_NSFW_CACHE at them; CI must run these tests !!!",
)


@pytest.fixture(scope="session")
def prepared_models():
    """Both registry models fetched, verified and converted once per test run."""
    if not models_available():
        pytest.skip("real models unavailable (see needs_models)")
    from clip_nsfw_spark.models.cache import prepare_model

    return {name: prepare_model(name) for name in ZIPS}


@pytest.fixture(scope="session")
def scorers(prepared_models):
    from clip_nsfw_spark import load_scorer

    return {name: load_scorer(name) for name in prepared_models}


@pytest.fixture(scope="session")
def tf_scorers(prepared_models):
    from clip_nsfw_spark import load_scorer

    return {name: load_scorer(name, backend="tensorflow") for name in prepared_models}


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS S3 server on 127.0.0.1, for the whole test run."""
    from s3server import SeaweedS3

    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def hdfs_server(tmp_path_factory):
    """A real HDFS (NameNode + DataNode, WebHDFS on) on 127.0.0.1, for the whole test run. Skipped with the
    reason where Java or Hadoop's jars are missing (a laptop); with CLIP_NSFW_REQUIRE_HDFS=1 (.ci/run) that
    is an error instead: CI must run every HDFS test."""
    from hdfsserver import MiniHDFS, missing

    why = missing()
    if why:
        if os.environ.get("CLIP_NSFW_REQUIRE_HDFS") == "1":
            pytest.fail(f"HDFS is required here (CLIP_NSFW_REQUIRE_HDFS=1) but cannot start: {why}")
        pytest.skip(f"no real HDFS: {why}")
    server = MiniHDFS(tmp_path_factory.mktemp("hdfs"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def spark():
    """One local[2] Spark session for the whole run (stopped at the end)."""
    from clip_nsfw_spark.spark.runner import spark_session

    with spark_session("local[2]") as session:
        yield session
