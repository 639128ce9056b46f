"""Operations: the Dockerfile (linted; every COPY source exists; every ARG used), the packed environment
(the job runs from it with a clean local spark-submit), and the conf/ files."""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import typing
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from clip_nsfw_spark.driver.config import JobConfig
from clip_nsfw_spark.tools.sample import write_parquet_sample
from conftest import ROOT, needs_models

DOCKERFILE = ROOT / "docker" / "Dockerfile"
BASE_DOCKERFILE = ROOT / "docker" / "debian-base" / "Dockerfile"


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2)) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", joined, re.M)]


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, BASE_DOCKERFILE], ids=lambda p: p.parent.name)
def test_dockerfile_passes_hadolint(dockerfile):
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, "--failure-threshold", "warning", str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_copies_existing_files_and_uses_every_arg():
    steps = _instructions(DOCKERFILE.read_text())
    copies = [args.split() for kind, args in steps if kind == "COPY" and "--from=" not in args]
    assert copies
    for parts in copies:
        for source in parts[:-1]:
            assert (ROOT / source).exists(), f"COPY source {source} does not exist"
    for source in re.findall(r"--mount=type=bind,source=([^,\s]+)", DOCKERFILE.read_text()):
        assert (ROOT / source).is_dir(), f"bind-mounted {source} does not exist"
    text = DOCKERFILE.read_text()
    for kind, args in steps:
        if kind == "ARG":
            name = args.split("=")[0].strip()
            if name.startswith("PIP_"):  # pip reads PIP_<OPTION> from the environment RUN steps get
                continue
            uses = len(re.findall(r"\$\{?" + name + r"\b", text))
            assert uses >= 1, f"ARG {name} is never used"
    assert steps[-1] == ("USER", "185")  # the base image's non-root spark user at run time
    assert not any(kind in ("ENTRYPOINT", "CMD") for kind, _ in steps)  # the base image's entrypoint is kept


def _conf_files():
    return sorted((ROOT / "conf").glob("*.yaml"))


@pytest.mark.parametrize("path", _conf_files(), ids=lambda p: p.name)
def test_each_conf_file_loads_into_the_config_it_spells(path):
    values = yaml.safe_load(path.read_text())
    assert isinstance(values, dict) and values, f"{path.name} holds no keys"
    unknown = sorted(set(values) - set(JobConfig.keys()))
    assert not unknown, f"{path.name}: {unknown} are not JobConfig fields"
    config = JobConfig.load(str(path), overrides={"input": "in", "output": "out"})
    for key, value in values.items():  # what the file says is what the run gets (null = the default)
        expected = _field_default(key) if value is None and key not in ("input", "output") else value
        if key in ("input", "output"):
            continue
        assert _plain(getattr(config, key)) == _plain(expected), f"{path.name}: {key}"


def _field_default(name: str):
    field = next(f for f in dataclasses.fields(JobConfig) if f.name == name)
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


def _plain(value):
    """Tuples and lists compare equal (YAML has only lists); HeadSpec as the mapping it came from."""
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if dataclasses.is_dataclass(value):
        return {k: v for k, v in dataclasses.asdict(value).items() if v is not None}
    return value


def test_score_embeddings_yaml_lists_every_key_with_its_default():
    path = ROOT / "conf" / "score_embeddings.yaml"
    values = yaml.safe_load(path.read_text())
    assert list(values) == JobConfig.keys()  # every field, in the dataclass's order
    for key, value in values.items():
        if key in ("input", "output"):  # required: no default, null in the file
            assert value is None
            continue
        assert _plain(value) == _plain(_field_default(key)), f"{key}: {value!r} in the file, " \
                                                             f"{_field_default(key)!r} in JobConfig"
    # The choices the comments offer are the ones the config accepts.
    comments = {m.group(1): m.group(2) for m in re.finditer(r"^(\w+):[^#\n]*#(.*)$", path.read_text(), re.M)}
    hints = typing.get_type_hints(JobConfig)
    for key in ("layout", "mode", "keep"):
        offered = re.findall(r"([\w-]+)(?: \([^)]*\))?\s*(?:\||$)", comments[key].split(":")[-1])
        assert offered == list(typing.get_args(hints[key])), key
    from clip_nsfw_spark.driver.config import COMPRESSIONS
    from clip_nsfw_spark.models.registry import REGISTRY

    assert set(REGISTRY) <= set(re.findall(r"[\w-]+", comments["model"]))
    assert set(COMPRESSIONS) <= set(re.findall(r"\w+", comments["compression"]))


def test_spark_defaults_and_logging_conf():
    settings = {}
    for line in (ROOT / "conf" / "spark-defaults.conf").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, value = line.split(None, 1)
            assert key not in settings, f"{key} is set twice"
            settings[key] = value.strip()
    assert settings["spark.python.worker.reuse"] == "true"  # the per-worker scorer cache relies on it
    assert settings["spark.task.cpus"] == "1"
    assert (ROOT / "conf" / "log4j2.properties").read_text().count("rootLogger.level") == 1


# The job's entry point, run inside a session it leaves open, then asked where the package came from on the
# driver and on two executor tasks.
PROBE_JOB = """
import json
import sys

import clip_nsfw_spark
from clip_nsfw_spark.spark.runner import spark_session
from score_embeddings import main


def where(_):
    import clip_nsfw_spark
    yield clip_nsfw_spark.__file__


with spark_session() as spark:
    code = main()
    executors = spark.sparkContext.parallelize(range(2), 2).mapPartitions(where).collect()
print("PACKAGE FILES " + json.dumps({"driver": clip_nsfw_spark.__file__, "executors": executors}))
sys.exit(code)
"""


@needs_models
def test_job_runs_from_the_packed_environment_with_a_clean_spark_submit(tmp_path, prepared_models):
    # prepared_models: the driver's one-time model conversion needs TensorFlow, which the archive leaves out;
    # it is done here, into the CLIP_NSFW_HOME the spark-submit below inherits (alone, this test used to fail).
    archive = tmp_path / "env.tar.gz"
    import pyspark

    major, minor = (int(part) for part in pyspark.__version__.split(".")[:2])
    line = {(3, 5): "3.5", (4, 0): "4.0"}.get((major, minor), "4.1+")  # the archive for the Spark this test runs
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
    (work / "probe_job.py").write_text(PROBE_JOB)
    source = tmp_path / "in"
    write_parquet_sample(str(source), rows=500, files=2)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYSPARK", "PYTHON"))}
    env["PYSPARK_DRIVER_PYTHON"] = str(unpacked / "bin" / "python")
    env["SPARK_HOME"] = str(Path(pyspark.__file__).parent)
    spark_submit = Path(sys.executable).parent / "spark-submit"
    result = subprocess.run([str(spark_submit), "--master", "local[2]", "--archives", f"{archive}#environment",
                             "--conf", f"spark.pyspark.python={unpacked / 'bin' / 'python'}",
                             "probe_job.py", "--input", str(source), "--output", str(tmp_path / "out")],
                            capture_output=True, text=True, env=env, cwd=work, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert sum(pq.read_metadata(p).num_rows for p in (tmp_path / "out").glob("*.parquet")) == 500
    assert (tmp_path / "out" / "_SUCCESS").exists()
    # The driver and every executor imported the package from the unpacked archive, not from a checkout.
    probe = next(line for line in result.stdout.splitlines() if line.startswith("PACKAGE FILES "))
    files = json.loads(probe.removeprefix("PACKAGE FILES "))
    assert len(files["executors"]) == 2
    inside = os.path.realpath(unpacked / site / "clip_nsfw_spark") + os.sep
    for where in [files["driver"], *files["executors"]]:
        assert os.path.realpath(where).startswith(inside), (where, inside)
