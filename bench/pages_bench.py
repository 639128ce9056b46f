"""pyarrow vs ``clip_nsfw_spark.pages`` reading one embedding column of one row group, per writer setting.

    python bench/pages_bench.py [--rows 100000] [--dim 768] [--out bench/results/pages_bench.json]

One parquet file per case in a temporary directory, one row group, written by pyarrow (``write_table``
defaults unless the case says otherwise: dictionary on, snappy, 1 MiB dictionary page limit):

* ``f16 default``: ``list<halffloat>``, dictionary-encoded throughout (≤ 65,536 distinct values);
* ``f32 from f16, default``: the same values widened to float32 (what converted LAION files hold): the
  dictionary still fits, dictionary-encoded throughout;
* ``f32 default``: full-precision float32: dictionary first, PLAIN pages once the dictionary is full;
* ``f32 plain`` / ``f16 plain``: ``use_dictionary=False``;
* ``f16 byte_stream_split``: ``use_dictionary=False``, BYTE_STREAM_SPLIT, snappy.

Each read (the file already in the page cache, the footer already parsed, one thread) is timed best of 3:
``ParquetFile(path, metadata=…).read_row_group(0, columns=[col], use_threads=False)`` +
``combine_chunks()`` against ``read_float_list_column(open(path, "rb"), metadata, 0, col)``; the two
results are checked equal before any time is reported.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from clip_nsfw_spark.pages import read_float_list_column  # noqa: E402

COLUMN = "embedding"


def unit_rows(rows: int, dim: int, seed: int = 0) -> np.ndarray:
    """LAION-like unit vectors, float32 (rows, dim)."""
    x = np.random.default_rng(seed).normal(size=(rows, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def list_table(x: np.ndarray) -> pa.Table:
    rows, dim = x.shape
    offsets = pa.array(np.arange(0, x.size + 1, dim, dtype=np.int32))
    return pa.table({COLUMN: pa.ListArray.from_arrays(offsets, pa.array(x.reshape(-1)))})


def cases(rows: int, dim: int) -> list[tuple[str, pa.Table, dict]]:
    x32 = unit_rows(rows, dim)
    x16 = x32.astype(np.float16)
    rg = dict(row_group_size=rows)
    return [
        ("f16 default", list_table(x16), rg),
        ("f32 from f16, default", list_table(x16.astype(np.float32)), rg),
        ("f32 default", list_table(x32), rg),
        ("f32 plain", list_table(x32), dict(rg, use_dictionary=False)),
        ("f16 plain", list_table(x16), dict(rg, use_dictionary=False)),
        ("f16 byte_stream_split", list_table(x16),
         dict(rg, use_dictionary=False, column_encoding={f"{COLUMN}.list.element": "BYTE_STREAM_SPLIT"})),
    ]


def best_of(fn, rounds: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(rounds):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def measure(path: str, rounds: int = 3) -> dict:
    meta = pq.read_metadata(path)
    rows = meta.row_group(0).num_rows

    def with_pyarrow():
        return pq.ParquetFile(path, metadata=meta).read_row_group(0, columns=[COLUMN], use_threads=False) \
            .column(COLUMN).combine_chunks()

    def with_pages():
        with open(path, "rb") as f:
            return read_float_list_column(f, meta, 0, COLUMN)

    with_pages()  # numba compile / cache load outside the timing
    t_arrow, expected = best_of(with_pyarrow, rounds)
    t_pages, got = best_of(with_pages, rounds)
    if got is None or not got.equals(expected) or got.type != expected.type:
        raise SystemExit(f"{path}: decoder returned {None if got is None else got.type}, "
                         f"pyarrow {expected.type}; not equal, no figures reported")
    chunk = meta.row_group(0).column(0)
    return {"encodings": list(chunk.encodings), "codec": chunk.compression,
            "mb": chunk.total_compressed_size / 1e6,
            "pyarrow_rows_per_s": rows / t_arrow, "pages_rows_per_s": rows / t_pages,
            "speedup": t_arrow / t_pages}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "pages_bench.json"))
    args = parser.parse_args()
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "rows": args.rows, "dim": args.dim,
               "cpu": _cpu_model(), "pyarrow": pa.__version__, "cases": []}
    print(f"{'case':24s} {'encodings':34s} {'MB':>6s} {'pyarrow rows/s':>15s} {'pages rows/s':>13s} {'x':>5s}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, table, options in cases(args.rows, args.dim):
            path = str(Path(tmp) / "case.parquet")
            pq.write_table(table, path, **options)
            case = {"case": name, **measure(path)}
            results["cases"].append(case)
            print(f"{name:24s} {','.join(case['encodings']):34s} {case['mb']:6.0f} "
                  f"{case['pyarrow_rows_per_s']:15,.0f} {case['pages_rows_per_s']:13,.0f} {case['speedup']:5.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"{results['cpu']}, {results['date']}, pyarrow {pa.__version__}; written {args.out}")
    return 0


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
