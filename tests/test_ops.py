"""Operations: the Dockerfile (linted; every COPY source exists; every ARG used), the packed environment
(the job runs from it with a clean local spark-submit), and the conf/ files."""

import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from clip_nsfw_spark.config import JobConfig
from clip_nsfw_spark.sample import write_parquet_sample
from conftest import ROOT, needs_models

DOCKERFILE = ROOT / "docker" / "Dockerfile"


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2)) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", joined, re.M)]


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, "--failure-threshold", "warning", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_copies_existing_files_and_uses_every_arg():
    steps = _instructions(DOCKERFILE.read_text())
    copies = [args.split() for kind, args in steps if kind == "COPY" and "--from=" not in args]
    assert copies
    for parts in copies:
        for source in parts[:-1]:
            assert (ROOT / source).exists(), f"COPY source {source} does not exist"
    text = DOCKERFILE.read_text()
    for kind, args in steps:
        if kind == "ARG":
            name = args.split("=")[0].strip()
            uses = len(re.findall(r"\$\{?" + name + r"\b", text))
            assert uses >= 1, f"ARG {name} is never used"
    assert steps[-1] == ("USER", "185")  # the base image's non-root spark user at run time
    assert not any(kind in ("ENTRYPOINT", "CMD") for kind, _ in steps)  # the base image's entrypoint is kept


def test_conf_files_are_valid():
    for path in sorted((ROOT / "conf").glob("*.yaml")):
        values = yaml.safe_load(path.read_text())
        values = {k: v for k, v in values.items() if v is not None}
        JobConfig.from_mapping({"input": "in", "output": "out"} | values, where=str(path))
    defaults = (ROOT / "conf" / "spark-defaults.conf").read_text()
    assert "spark.python.worker.reuse" in defaults
    assert (ROOT / "conf" / "log4j2.properties").read_text().count("rootLogger.level") == 1


@needs_models
def test_job_runs_from_the_packed_environment_with_a_clean_spark_submit(tmp_path):
    archive = tmp_path / "env.tar.gz"
    import pyspark

    from clip_nsfw_spark.package import spark_line

    line = spark_line(pyspark.__version__)  # the archive for the Spark this test runs (3.5, 4.0 or 4.1+)
    result = subprocess.run([sys.executable, "-m", "clip_nsfw_spark.cli", "package", "--out", str(archive),
                             "--spark", line],
                            capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    unpacked = tmp_path / "driver-env"
    with tarfile.open(archive) as tar:
        tar.extractall(unpacked, filter="tar")
    names = tarfile.open(archive).getnames()
    site = f"lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages/"
    assert any(n.startswith(site + "clip_nsfw_spark/") for n in names)  # the layout the checks below rely on
    assert not any(n.startswith(site + "pyspark/") for n in names)
    assert not any(n.startswith(site + "tensorflow/") for n in names)
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(ROOT / "jobs" / "score_embeddings.py", work)  # no checkout on the path: only the package
    source = tmp_path / "in"
    write_parquet_sample(str(source), rows=500, files=2)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYSPARK", "PYTHON"))}
    env["PYSPARK_DRIVER_PYTHON"] = str(unpacked / "bin" / "python")
    env["SPARK_HOME"] = str(Path(pyspark.__file__).parent)
    spark_submit = Path(sys.executable).parent / "spark-submit"
    result = subprocess.run([str(spark_submit), "--master", "local[2]", "--archives", f"{archive}#environment",
                             "--conf", f"spark.pyspark.python={unpacked / 'bin' / 'python'}",
                             "score_embeddings.py", "--input", str(source), "--output", str(tmp_path / "out")],
                            capture_output=True, text=True, env=env, cwd=work, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert sum(pq.read_metadata(p).num_rows for p in (tmp_path / "out").glob("*.parquet")) == 500
    assert str(unpacked) in result.stdout + result.stderr or (tmp_path / "out" / "_SUCCESS").exists()
