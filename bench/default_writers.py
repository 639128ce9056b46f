"""The benchmark's inputs as users have them: the same LAION-like rows written by each library's default writer.

    python bench/default_writers.py --workdir bench/data --rows 20000 [--files 4] [--cores 2]   # make them all

Every dataset holds the same rows (``clip_nsfw_spark.tools.sample``: key, url, caption + 768-d unit-norm
embeddings, file ``i`` from seed ``i``) in ``--files`` files, written by:

* ``pyarrow-f32`` / ``pyarrow-f16``: ``pq.write_table(table, path, row_group_size=16384)`` — pyarrow's
  defaults otherwise (snappy, dictionary encoding of every column, statistics), ``list<float>`` /
  ``list<halffloat>``;
* ``pandas-f32`` / ``pandas-f16``: ``df.to_parquet(path, row_group_size=16384)`` with the embeddings as a
  column of numpy arrays (pandas hands them to pyarrow, which writes the same list types);
* ``spark-f32``: ``df.write.parquet(folder)`` of Spark (local, its defaults: snappy, 128 MB row groups,
  ``array<float>``), the rows read from ``pyarrow-f32``; run in a child process so that no JVM outlives it;
* ``laion-npy``: LAION's own layout, ``img_emb/img_emb_N.npy`` (float16) + ``metadata/metadata_N.parquet``.

A dataset is written once under ``<workdir>/<name>-<rows>`` and reused (a ``_DONE`` marker says it is
complete; the job skips ``_`` names as Spark does).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from clip_nsfw_spark.tools.sample import embeddings, metadata, write_laion_sample

DIM = 768
ROW_GROUP_ROWS = 16384  # issue #13's user files
NAMES = ("pyarrow-f32", "pyarrow-f16", "pandas-f32", "pandas-f16", "spark-f32", "laion-npy")
DONE = "_DONE"


def _parts(rows: int, files: int):
    """(file index, first row, rows) of each file; the last one may be shorter."""
    per_file, start = -(-rows // files), 0
    for index in range(files):
        n = min(per_file, rows - start)
        if n <= 0:
            return
        yield index, start, n
        start += n


def _rows(index: int, start: int, n: int, dtype) -> tuple[dict, np.ndarray]:
    return metadata(n, start), embeddings(n, DIM, index, dtype)


def _write_pyarrow(target: Path, rows: int, files: int, dtype) -> None:
    for index, start, n in _parts(rows, files):
        columns, x = _rows(index, start, n, dtype)
        flat = pa.array(x.reshape(-1))
        lists = pa.ListArray.from_arrays(pa.array(np.arange(0, x.size + 1, DIM, dtype=np.int32)), flat)
        pq.write_table(pa.table(columns | {"embedding": lists}), target / f"part-{index:05d}.parquet",
                       row_group_size=ROW_GROUP_ROWS)


def _write_pandas(target: Path, rows: int, files: int, dtype) -> None:
    import pandas as pd

    for index, start, n in _parts(rows, files):
        columns, x = _rows(index, start, n, dtype)
        frame = pd.DataFrame({name: array.to_pylist() for name, array in columns.items()})
        frame["embedding"] = list(x)  # one numpy array per row, as users build such frames
        frame.to_parquet(target / f"part-{index:05d}.parquet", row_group_size=ROW_GROUP_ROWS)


_SPARK_WRITE = """
import sys
from pyspark.sql import SparkSession
source, target, files, cores = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
spark = (SparkSession.builder.master(f"local[{cores}]").config("spark.driver.memory", "4g")
         .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false").getOrCreate())
try:
    spark.read.parquet(source).coalesce(files).write.parquet(target)
finally:
    spark.stop()
"""


def _write_spark(target: Path, source: Path, files: int, cores: int) -> None:
    """Spark's default writer in a child process: its JVM ends with it."""
    shutil.rmtree(target)  # Spark's default save mode refuses an existing folder
    env = os.environ | {"PYSPARK_PYTHON": os.environ.get("PYSPARK_PYTHON", sys.executable)}
    done = subprocess.run([sys.executable, "-c", _SPARK_WRITE, str(source), str(target), str(files), str(cores)],
                          env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"Spark could not write {target} from {source} (exit {done.returncode}):\n{tail}")


def dataset(name: str, workdir: Path, rows: int, files: int, cores: int = 2) -> Path:
    """The folder of dataset ``name`` with ``rows`` rows, written now unless it is already complete."""
    if name not in NAMES:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(NAMES)}")
    target = workdir / f"{name}-{rows}-{files}"
    if (target / DONE).exists():
        return target
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    if name == "laion-npy":
        write_laion_sample(str(target), rows=rows, files=files, dim=DIM)
    elif name == "spark-f32":
        _write_spark(target, dataset("pyarrow-f32", workdir, rows, files, cores), files, cores)
    elif name.startswith("pyarrow"):
        _write_pyarrow(target, rows, files, np.float16 if name.endswith("f16") else np.float32)
    else:
        _write_pandas(target, rows, files, np.float16 if name.endswith("f16") else np.float32)
    (target / DONE).write_text("")
    return target


def data_bytes(folder: Path) -> int:
    """Bytes of the data files (parquet, npy) under ``folder``."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.suffix in (".parquet", ".npy"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=str(ROOT / "bench" / "data"), help="where the datasets are kept")
    parser.add_argument("--rows", type=int, default=20_000, help="rows per dataset")
    parser.add_argument("--files", type=int, default=4, help="files per dataset")
    parser.add_argument("--cores", type=int, default=2, help="local[N] for Spark's writer")
    parser.add_argument("--names", default=",".join(NAMES), help=f"comma-separated subset of {', '.join(NAMES)}")
    args = parser.parse_args()
    for name in args.names.split(","):
        path = dataset(name, Path(args.workdir), args.rows, args.files, args.cores)
        print(f"{name:12s} {data_bytes(path) / 1e6:9.1f} MB  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
