"""Pack the library and its executor dependencies for ``spark-submit --archives`` (YARN, standalone).

The archive is a relocatable virtualenv (venv-pack) holding this package and what executors need
(numpy, pyarrow, numba, fsspec, s3fs, and pandas, which PySpark requires); not pyspark (the cluster provides it: spark-submit puts its own
pyspark.zip on the path) and not TensorFlow (executors never need it). Use it as::

    spark-submit --archives clip-nsfw-spark-env.tar.gz#environment \\
        --conf spark.pyspark.python=./environment/bin/python jobs/score_embeddings.py …

Like every venv-pack archive it links to the base Python it was built with: build it with the same
Python version and path as the cluster's nodes (or use the Docker image).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
from pathlib import Path

from .errors import ClipNsfwError, MissingDependencyError

log = logging.getLogger(__name__)
PROJECT = Path(__file__).resolve().parent.parent
PYSPARK_NEEDS = "pandas>=2.2,<3"


def build_environment_archive(output: str | Path, extras: str = "s3", python: str = sys.executable) -> Path:
    """Build ``output`` (.tar.gz) from this checkout; return its path."""
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
        _run([str(env / "bin" / "python"), "-m", "pip", "install", "-q", requirement, PYSPARK_NEEDS])
        venv_pack.pack(prefix=str(env), output=str(output), force=True)
    log.info("wrote %s (%.0f MB)", output, output.stat().st_size / 2**20)
    return output


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise ClipNsfwError(f"{' '.join(command[:4])} … failed:\n{result.stderr[-2000:]}")
