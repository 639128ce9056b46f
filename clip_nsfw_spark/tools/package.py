"""Pack the library and its executor dependencies for ``spark-submit --archives`` (YARN, standalone).

The archive is a relocatable virtualenv (venv-pack) holding this package and what executors need
(numpy, pyarrow, numba, fsspec, s3fs, and pandas, which PySpark requires); not pyspark (the cluster provides it: spark-submit puts its own
pyspark.zip on the path) and not TensorFlow (executors never need it). Use it as::

    spark-submit --archives clip-nsfw-spark-env.tar.gz#environment \\
        --conf spark.pyspark.python=./environment/bin/python jobs/score_embeddings.py …

Like every venv-pack archive it links to the base Python it was built with: build it with the same
Python version and path as the cluster's nodes (``--python``), for the cluster's Spark line (``--spark``),
or use the Docker image.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from clip_nsfw_spark.errors import ClipNsfwError, MissingDependencyError

log = logging.getLogger(__name__)
PROJECT = Path(__file__).resolve().parents[2]
# What executors need beside this package, per Spark line (the cluster provides pyspark itself). PySpark
# 3.5 requires numpy < 2, and pyarrow ≥ 21 requires numpy ≥ 2; PySpark checks pandas for mapInArrow.
SPARK_LINES = {
    "3.5": ("numpy>=1.24,<2", "pyarrow>=14,<21", "pandas>=2.0,<2.3"),
    "4.0": ("pandas>=2.0,<3",),
    "4.1+": ("pandas>=2.2,<3",),
}


def default_archive_name(line: str, python: str = sys.executable) -> str:
    version = subprocess.run([python, "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"],
                             capture_output=True, text=True, check=True).stdout.strip()
    return f"dist/clip-nsfw-spark-env-spark{line}-py{version}.tar.gz"


def build_environment_archive(output: str | Path, extras: str = "s3", python: str = sys.executable,
                              line: str = "4.1+") -> Path:
    """Build ``output`` (.tar.gz) from this checkout for Spark ``line`` (a ``SPARK_LINES`` key) and the
    interpreter ``python`` (its version must be the cluster's); return its path."""
    if line not in SPARK_LINES:
        raise ClipNsfwError(f"unknown Spark line {line!r}; choose one of {', '.join(SPARK_LINES)}")
    try:
        import venv_pack
    except ImportError as err:
        raise MissingDependencyError("packing needs venv-pack: pip install 'clip-nsfw-spark[package]'") from err
    if not (PROJECT / "pyproject.toml").is_file():
        raise ClipNsfwError(f"package builds from a source checkout; {PROJECT} has no pyproject.toml")
    output = Path(output).resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="clip-nsfw-package-") as tmp:
        wheels, env = Path(tmp) / "wheels", Path(tmp) / "env"
        _run([python, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(PROJECT)])
        (wheel,) = wheels.glob("*.whl")
        _run([python, "-m", "venv", str(env)])
        requirement = f"{wheel}[{extras}]" if extras else str(wheel)
        # PySpark's mapInArrow checks that pandas is importable, though no pandas code runs.
        _run([str(env / "bin" / "python"), "-m", "pip", "install", "-q", requirement, *SPARK_LINES[line]])
        _run([str(env / "bin" / "python"), "-c", "import clip_nsfw_spark.executor.worker, pyarrow, numba"])
        venv_pack.pack(prefix=str(env), output=str(output), force=True)
    log.info("wrote %s (%.0f MB)", output, output.stat().st_size / 2**20)
    return output


def _run(command: list[str]) -> None:
    # Without PYTHONPATH: pointing at a checkout, it made pip in the new venv find the package "already
    # satisfied" there, and the archive shipped without it.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise ClipNsfwError(f"{' '.join(command[:4])} … failed:\n{result.stderr[-2000:]}")
