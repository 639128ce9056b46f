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

Each read (the file already in the page cache, the footer already parsed, one thread) is timed best of
``--rounds`` (the two readers interleaved; wall time and this process's CPU time):
``ParquetFile(path, metadata=…).read_row_group(0, columns=[col], use_threads=False)`` +
``combine_chunks()`` against ``read_float_list_column(open(path, "rb"), metadata, 0, col)``; the two
results are checked equal before any time is reported.
"""

from __future__ import annotations

import argparse
import json
import os
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
    dim = x.shape[1]
    offsets = pa.array(np.arange(0, x.size + 1, dim, dtype=np.int32))
    return pa.table({COLUMN: pa.ListArray.from_arrays(offsets, pa.array(x.reshape(-1)))})


def cases(rows: int, dim: int) -> list[tuple[str, pa.Table, dict]]:
    x32 = unit_rows(rows, dim)
    x16 = x32.astype(np.float16)
    rg = {"row_group_size": rows}
    return [
        ("f16 default", list_table(x16), rg),
        ("f32 from f16, default", list_table(x16.astype(np.float32)), rg),
        ("f32 default", list_table(x32), rg),
        ("f32 plain", list_table(x32), dict(rg, use_dictionary=False)),
        ("f16 plain", list_table(x16), dict(rg, use_dictionary=False)),
        ("f16 byte_stream_split", list_table(x16),
         dict(rg, use_dictionary=False, column_encoding={f"{COLUMN}.list.element": "BYTE_STREAM_SPLIT"})),
    ]


def timed(fn) -> tuple[float, float, object]:
    """(wall seconds, this process's CPU seconds, result): CPU time is the steadier figure on a shared
    machine (both readers run on this one thread)."""
    w0, c0 = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - w0, time.process_time() - c0, result


def measure(path: str, rounds: int) -> dict:
    meta = pq.read_metadata(path)
    rows = meta.row_group(0).num_rows

    def with_pyarrow():
        return pq.ParquetFile(path, metadata=meta).read_row_group(0, columns=[COLUMN], use_threads=False) \
            .column(COLUMN).combine_chunks()

    def with_pages():
        with open(path, "rb") as f:
            return read_float_list_column(f, meta, 0, COLUMN)

    with_pages()  # numba compile / cache load outside the timing
    best = {"pyarrow": [float("inf")] * 2, "pages": [float("inf")] * 2}
    for _ in range(rounds):  # interleaved, so both readers see the same machine load
        for name, fn in (("pyarrow", with_pyarrow), ("pages", with_pages)):
            wall, cpu, result = timed(fn)
            best[name] = [min(best[name][0], wall), min(best[name][1], cpu)]
            if name == "pyarrow":
                expected = result
            elif result is None or not result.equals(expected) or result.type != expected.type:
                raise SystemExit(f"{path}: decoder returned {None if result is None else result.type}, "
                                 f"pyarrow {expected.type}; not equal, no figures reported")
            del result
    chunk = meta.row_group(0).column(0)
    return {"encodings": list(chunk.encodings), "codec": chunk.compression,
            "mb": chunk.total_compressed_size / 1e6,
            "pyarrow_rows_per_s": rows / best["pyarrow"][0], "pages_rows_per_s": rows / best["pages"][0],
            "pyarrow_cpu_rows_per_s": rows / best["pyarrow"][1], "pages_cpu_rows_per_s": rows / best["pages"][1],
            "speedup": best["pyarrow"][0] / best["pages"][0], "speedup_cpu": best["pyarrow"][1] / best["pages"][1]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--rounds", type=int, default=3, help="best of this many (interleaved) reads")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "pages_bench.json"))
    args = parser.parse_args()
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "rows": args.rows, "dim": args.dim, "rounds": args.rounds,
               "load_average_before": list(os.getloadavg()),
               "cpu": _cpu_model(), "pyarrow": pa.__version__, "cases": []}
    print(f"{'case':24s} {'encodings':30s} {'MB':>5s} {'pyarrow rows/s':>15s} {'pages rows/s':>13s} {'x':>5s}"
          f" {'x (CPU time)':>12s}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, table, options in cases(args.rows, args.dim):
            path = str(Path(tmp) / "case.parquet")
            pq.write_table(table, path, **options)
            case = {"case": name, **measure(path, args.rounds)}
            results["cases"].append(case)
            print(f"{name:24s} {','.join(case['encodings']):30s} {case['mb']:5.0f} "
                  f"{case['pyarrow_rows_per_s']:15,.0f} {case['pages_rows_per_s']:13,.0f} {case['speedup']:5.1f}"
                  f" {case['speedup_cpu']:12.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    results["load_average_after"] = list(os.getloadavg())
    print(f"{results['cpu']}, {results['date']}, pyarrow {pa.__version__}, load average "
          f"{results['load_average_before'][0]:.1f} → {results['load_average_after'][0]:.1f}; written {args.out}")
    return 0


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
