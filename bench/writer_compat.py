"""Which readers read an embedding column written with BYTE_STREAM_SPLIT, or spliced by splice.py?

    python bench/writer_compat.py [--out bench/results/writer_compat.json] [--workdir /tmp/writer-compat]

Writes small parquet files with pyarrow (this interpreter): 300 rows, a ``key`` string column and a 768-d
``embedding`` list column, float16 (``list<halffloat>``) and float32 (``list<float>``), each PLAIN and
BYTE_STREAM_SPLIT (the column encoding keyed by the leaf path ``embedding.list.element``: pyarrow
silently ignores the top-level name for a list), zstd, no dictionary and no statistics on the embedding
column, one null row, two row groups. Each file's encodings are checked in its footer before any reader.
``SPLICED``: the same rows written by the job's writer (``clip_nsfw_spark.parquet.splice.SplicedParquetWriter``,
embeddings uncompressed): the first row group, which holds the null row, has its embedding chunk encoded
by pyarrow, the second by splice.py (checked: it wrote pages).

Then every reader reads every file in its own interpreter and reports a sha256 of the values as float32
(nulls marked), compared with the values written: "ok" only when every value is identical.
Readers: pyarrow of the main venv and of ``.venv-spark35`` (an older pyarrow), Spark 4.x (main venv),
3.5 and 4.0 (``.venv-spark35``, ``.venv-spark40``, local[1]; each with its default vectorized parquet
reader and again with ``spark.sql.parquet.enableVectorizedReader=false``), and DuckDB from PyPI installed into a
throwaway venv under ``--workdir`` (never into the shared venvs). Interpreters that do not exist are
reported as "not available". The PLAIN files are the control: a reader that fails on them fails for
another reason than the encoding.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from clip_nsfw_spark.parquet.splice import SplicedParquetWriter  # noqa: E402

ROWS, DIM, NULL_ROW = 300, 768, 5
LEAF = "embedding.list.element"

# Reader side, run by each interpreter with the file list as argv: JSON {file: result} on the last line.
_DIGEST = r"""
import hashlib, json, struct, sys

def digest(rows):
    h, nulls = hashlib.sha256(), 0
    for values in rows:
        if values is None:
            nulls += 1
            h.update(b"N")
        else:
            h.update(struct.pack(f"<{len(values)}f", *[float(v) for v in values]))
    return {"rows": len(rows), "nulls": nulls, "sha256": h.hexdigest()}

def first_line(err):
    # A Py4J error holds the whole Java trace: its last "Caused by:" is the reason.
    causes = [line.strip() for line in str(err).splitlines() if line.strip().startswith("Caused by:")]
    text = causes[-1] if causes else " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}"
"""

_READERS = {
    "pyarrow": _DIGEST + r"""
import pyarrow, pyarrow.parquet as pq
out = {"version": pyarrow.__version__, "files": {}}
for path in sys.argv[1:]:
    try:
        table = pq.read_table(path).sort_by("key")
        out["files"][path] = digest(table.column("embedding").to_pylist())
    except Exception as err:
        out["files"][path] = {"error": first_line(err)}
print(json.dumps(out))
""",
    "spark": _DIGEST + r"""
import pyspark
from pyspark.sql import SparkSession
spark = (SparkSession.builder.master("local[1]").config("spark.ui.enabled", "false")
         .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1").getOrCreate())
spark.sparkContext.setLogLevel("OFF")
out = {"version": pyspark.__version__, "files": {}, "files_row_reader": {}}
try:
    # Spark's default (vectorized) parquet reader, then its row-by-row parquet-mr reader.
    for vectorized, key in (("true", "files"), ("false", "files_row_reader")):
        spark.conf.set("spark.sql.parquet.enableVectorizedReader", vectorized)
        for path in sys.argv[1:]:
            try:
                rows = spark.read.parquet(path).orderBy("key").select("embedding").collect()
                out[key][path] = digest([r[0] for r in rows])
            except Exception as err:
                out[key][path] = {"error": first_line(err)}
finally:
    spark.stop()
print(json.dumps(out))
""",
    "duckdb": _DIGEST + r"""
import duckdb
out = {"version": duckdb.__version__, "files": {}}
for path in sys.argv[1:]:
    try:
        rows = duckdb.sql(f"select embedding from read_parquet('{path}') order by key").fetchall()
        out["files"][path] = digest([r[0] for r in rows])
    except Exception as err:
        out["files"][path] = {"error": first_line(err)}
print(json.dumps(out))
""",
}


def write_files(folder: Path) -> dict[tuple[str, str], Path]:
    """One file per (dtype, encoding); returns their paths. Fails if pyarrow did not apply the encoding."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(ROWS, DIM))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    keys = pa.array([f"{i:09d}" for i in range(ROWS)])
    files = {}
    for dtype in ("float16", "float32"):
        values = pa.array(x.astype(dtype).reshape(-1))
        offsets = pa.array(np.arange(0, ROWS * DIM + 1, DIM, dtype=np.int32))
        mask = np.zeros(ROWS, dtype=bool)
        mask[NULL_ROW] = True
        embedding = pa.ListArray.from_arrays(offsets, values, mask=pa.array(mask))
        table = pa.table({"key": keys, "embedding": embedding})
        for encoding in ("PLAIN", "BYTE_STREAM_SPLIT"):
            path = folder / f"{dtype}-{encoding.lower()}.parquet"
            pq.write_table(table, path, row_group_size=ROWS // 2, compression="zstd", use_dictionary=["key"],
                           write_statistics=["key"], column_encoding={LEAF: encoding})
            used = pq.read_metadata(path).row_group(0).column(1).encodings
            if encoding not in used:
                raise RuntimeError(f"pyarrow did not write {encoding} for {LEAF} in {path}: encodings {used}")
            files[(dtype, encoding)] = path
        path = folder / f"{dtype}-spliced.parquet"
        with open(path, "wb") as sink:
            writer = SplicedParquetWriter(sink, table.schema, compression={"key": "zstd", LEAF: "none"},
                                          use_dictionary=["key"], write_statistics=["key"], columns=["embedding"])
            writer.write_table(table.slice(0, ROWS // 2))
            writer.write_table(table.slice(ROWS // 2))
            writer.close()
        if writer.pages_written == 0:
            raise RuntimeError(f"splice.py wrote no page of {path}")
        files[(dtype, "SPLICED")] = path
    return files


def expected_digest(path: Path) -> dict:
    """The digest of the values written, recomputed from the generator (not read back with pyarrow: the
    reference must not depend on any reader under test)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(ROWS, DIM))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    dtype = "float16" if path.name.startswith("float16") else "float32"
    h = hashlib.sha256()
    for i, row in enumerate(x.astype(dtype).astype(np.float32)):
        h.update(b"N" if i == NULL_ROW else struct.pack(f"<{DIM}f", *row.tolist()))
    return {"rows": ROWS, "nulls": 1, "sha256": h.hexdigest()}


def duckdb_python(workdir: Path) -> Path | None:
    """A throwaway venv with DuckDB from PyPI (made once under ``workdir``)."""
    venv = workdir / "duckdb-venv"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        done = subprocess.run([str(python), "-m", "pip", "install", "-q", "duckdb"], check=False)
        if done.returncode != 0:
            return None
    return python


def run_reader(kind: str, python: Path, files: list[Path]) -> dict:
    env = os.environ | {"PYSPARK_PYTHON": str(python), "SPARK_LOCAL_IP": "127.0.0.1"}
    env.pop("PYTHONPATH", None)
    env.pop("SPARK_HOME", None)  # each venv's own pyspark
    done = subprocess.run([str(python), "-c", _READERS[kind], *map(str, files)], capture_output=True, text=True,
                          env=env, timeout=900, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = " ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        return {"error": f"the reader did not run (exit {done.returncode}): {tail[:400]}"}
    return json.loads(lines[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "writer_compat.json"),
                        help="the table as JSON (default bench/results/writer_compat.json)")
    parser.add_argument("--workdir", default="/tmp/writer-compat",
                        help="where the files and the throwaway DuckDB venv go (default /tmp/writer-compat)")
    parser.add_argument("--venv-root", default=str(ROOT),
                        help="folder holding .venv, .venv-spark35 and .venv-spark40 (default: the checkout; "
                             "a worktree passes the main checkout)")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    files = write_files(workdir / "files")
    venv_root = Path(args.venv_root)
    readers = [("pyarrow", venv_root / ".venv"), ("pyarrow", venv_root / ".venv-spark35"),
               ("spark", venv_root / ".venv"), ("spark", venv_root / ".venv-spark35"),
               ("spark", venv_root / ".venv-spark40"), ("duckdb", None)]
    rows = []
    for kind, venv in readers:
        python = duckdb_python(workdir) if kind == "duckdb" else venv / "bin" / "python"
        where = "throwaway venv (pip install duckdb)" if kind == "duckdb" else str(venv.name)
        if python is None or not python.exists():
            rows.append({"reader": kind, "venv": where, "version": None, "error": "not available"})
            continue
        result = run_reader(kind, python, list(files.values()))
        row_reader = "spark (spark.sql.parquet.enableVectorizedReader=false)"
        variants = [("files", kind)] + ([("files_row_reader", row_reader)] if kind == "spark" else [])
        for variant, label in variants:
            row = {"reader": label, "venv": where, "version": result.get("version"), "error": result.get("error")}
            for (dtype, encoding), path in files.items():
                got = result.get(variant, {}).get(str(path), {})
                key = f"{dtype} {'BSS' if encoding == 'BYTE_STREAM_SPLIT' else encoding}"
                row[key] = "ok" if got == expected_digest(path) else got.get("error") or f"wrong values: {got}"
            rows.append(row)
    results = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "writer": f"pyarrow {pa.__version__}",
               "file": f"{ROWS} rows, key + {DIM}-d list embedding, 2 row groups, zstd, one null row, "
                       f"embedding without dictionary/statistics, column_encoding keyed by {LEAF!r}",
               "readers": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    columns = [f"{dtype} {encoding}" for dtype in ("float16", "float32") for encoding in ("PLAIN", "BSS", "SPLICED")]
    print(f"{'reader':8s} {'venv':38s} {'version':9s} " + " ".join(f"{c:>16s}" for c in columns))
    print("(spark+: spark.sql.parquet.enableVectorizedReader=false)")
    for row in rows:
        marks = [("ok" if row.get(c) == "ok" else "FAIL" if row.get(c) else "-") for c in columns]
        reader = "spark+" if row["reader"].startswith("spark (") else row["reader"]
        print(f"{reader:8s} {row['venv']:38s} {row['version']!s:9s} " + " ".join(f"{m:>16s}" for m in marks))
        for c in columns:
            if row.get(c) not in (None, "ok"):
                print(f"    {c}: {row[c][:200]}")
        if row.get("error"):
            print(f"    {row['error'][:200]}")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
