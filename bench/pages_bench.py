"""pyarrow vs ``clip_nsfw_spark.parquet.decode`` reading one embedding column of one row group, per writer setting.

    python bench/pages_bench.py [--rows 100000] [--dim 768] [--out bench/results/pages_bench.json]
    python bench/pages_bench.py --stream [--rows 1000000] [--batch-rows 16384] [--file F.parquet]

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

``--stream``: one file of ``--rows`` (default 1M) rows × ``--dim`` float16, ``write_table`` defaults (one
row group of 1Mi rows, dictionary, snappy), read ``--batch-rows`` at a time, each reader in a fresh
subprocess (``--rounds`` times, best wall time; peak RSS = that subprocess's ``VmHWM``, its RSS after
imports and warm-up, before reading, and ``ru_maxrss``, which on Linux also counts the resident size of
the bench process that started it — so the file is written in a subprocess too): ``pyarrow`` (``ParquetFile(pre_buffer=False, buffer_size=1 MiB)
.iter_batches``: what reader.py did for chunks over its budget), ``stream``
(``stream.iter_float_list_column``), ``reader`` (``reader.task_batches``, the job's path: streams this
chunk) and ``whole`` (``read_float_list_column`` then sliced: the whole-chunk path, for reference). The
stream is first checked equal to pyarrow batch by batch (bits of every value, type, row counts).
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

from clip_nsfw_spark.parquet.decode import read_float_list_column  # noqa: E402

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


STREAM_READERS = ("pyarrow", "stream", "reader", "whole")


def stream_child(reader: str, path: str, batch_rows: int) -> dict:
    """Run in a fresh interpreter: read the file's column with ``reader``; times, rows and RSS as a dict."""
    import resource
    from collections import Counter

    import fsspec

    from clip_nsfw_spark.parquet.stream import iter_float_list_column
    from clip_nsfw_spark.contract import Task
    from clip_nsfw_spark.executor.reader import task_batches

    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    meta = pq.read_metadata(path)
    with open(path, "rb") as f:  # numba's compiled kernels loaded (cache) outside the timing
        next(iter_float_list_column(f, meta, 0, COLUMN, 1))
    before = _proc_status_mib("VmRSS")
    rows = batches = 0
    w0, c0 = time.perf_counter(), time.process_time()
    with open(path, "rb") as f:
        if reader == "pyarrow":
            it = (b.column(0) for b in pq.ParquetFile(f, pre_buffer=False, buffer_size=1 << 20).iter_batches(
                batch_size=batch_rows, columns=[COLUMN], use_threads=False))
        elif reader == "stream":
            it = iter_float_list_column(f, meta, 0, COLUMN, batch_rows)
        elif reader == "reader":
            task = Task("parquet", path, "case.parquet", (0,), rows=meta.num_rows)
            it = (b.column(0) for b, _, _ in task_batches(task, fsspec.filesystem("file"), batch_rows, Counter()))
        else:
            whole = read_float_list_column(f, meta, 0, COLUMN)
            it = (whole.slice(i, batch_rows) for i in range(0, len(whole), batch_rows))
        for array in it:
            rows += len(array)
            batches += 1
            del array
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return {"reader": reader, "rows": rows, "batches": batches, "wall_s": wall, "cpu_s": cpu,
            "rss_before_mib": before, "peak_rss_mib": _proc_status_mib("VmHWM"),
            "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _proc_status_mib(key: str) -> float:
    """VmRSS (now) / VmHWM (peak) of this process in MiB. VmHWM belongs to this process's own memory map;
    ru_maxrss also counts what the parent had resident when it started the child (kept across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def stream_write(path: str, rows: int, dim: int) -> None:
    """Run in a child (so the bench's own process stays small): the --stream case's file."""
    x = np.empty((rows, dim), np.float16)
    for i in range(0, rows, 65536):  # unit rows made in pieces: float32 of 1M rows is 3 GB
        x[i:i + 65536] = unit_rows(min(65536, rows - i), dim, seed=i)
    table = list_table(x)
    del x
    pq.write_table(table, path)  # pyarrow's defaults: one row group of up to 1Mi rows


def stream_check(path: str, batch_rows: int) -> int:
    """The stream's batches equal pyarrow's, batch by batch (memory: two batches). Returns the batch count."""
    from clip_nsfw_spark.parquet.stream import iter_float_list_column

    meta = pq.read_metadata(path)
    with open(path, "rb") as f, open(path, "rb") as g:
        ours = iter_float_list_column(f, meta, 0, COLUMN, batch_rows)
        if ours is None:
            raise SystemExit(f"{path}: the stream refused the chunk")
        theirs = pq.ParquetFile(g, pre_buffer=False).iter_batches(batch_size=batch_rows, columns=[COLUMN])
        n = 0
        for a, b in zip(ours, theirs, strict=True):
            b = b.column(0)
            bits_a = a.flatten().to_numpy(zero_copy_only=True).view(np.uint16)
            bits_b = b.flatten().to_numpy(zero_copy_only=False).view(np.uint16)
            if a.type != b.type or len(a) != len(b) or not np.array_equal(bits_a, bits_b):
                raise SystemExit(f"{path}: batch {n} differs from pyarrow's; no figures reported")
            n += 1
    return n


def stream_main(args) -> int:
    import subprocess

    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "rows": args.rows, "dim": args.dim,
               "batch_rows": args.batch_rows, "rounds": args.rounds, "load_average_before": list(os.getloadavg()),
               "cpu": _cpu_model(), "pyarrow": pa.__version__, "readers": {}}
    with tempfile.TemporaryDirectory() as tmp:
        path = args.file or str(Path(tmp) / "case.parquet")
        if not Path(path).exists():
            subprocess.run([sys.executable, __file__, "--stream-write", path, str(args.rows), str(args.dim)],
                           check=True)
        meta = pq.read_metadata(path)
        chunk = meta.row_group(0).column(0)
        results.update(row_groups=meta.num_row_groups, encodings=list(chunk.encodings), codec=chunk.compression,
                       chunk_mb=chunk.total_compressed_size / 1e6,
                       decoded_mb=chunk.num_values * 2 / 1e6)
        print(f"{path}: {meta.num_row_groups} row group(s) of {meta.row_group(0).num_rows:,} rows, "
              f"{','.join(chunk.encodings)} {chunk.compression}, {results['chunk_mb']:.0f} MB stored, "
              f"{results['decoded_mb']:.0f} MB decoded")
        check = subprocess.run([sys.executable, __file__, "--stream-check", path, str(args.batch_rows), "-"],
                               check=True, capture_output=True, text=True)  # in a child: this process stays small
        results["checked_batches"] = int(check.stdout.strip().splitlines()[-1])
        print(f"stream == pyarrow on all {results['checked_batches']} batches")
        for _ in range(args.rounds):
            for reader in STREAM_READERS:
                out = subprocess.run([sys.executable, __file__, "--stream-child", reader, path,
                                      str(args.batch_rows)], check=True, capture_output=True, text=True)
                run = json.loads(out.stdout.strip().splitlines()[-1])
                if run["rows"] != meta.num_rows:
                    raise SystemExit(f"{reader} read {run['rows']} rows, the file has {meta.num_rows}")
                best = results["readers"].get(reader)
                results["readers"][reader] = {
                    "rows_per_s": max(run["rows"] / run["wall_s"], best["rows_per_s"] if best else 0),
                    "cpu_rows_per_s": max(run["rows"] / run["cpu_s"], best["cpu_rows_per_s"] if best else 0),
                    "peak_rss_mib": max(run["peak_rss_mib"], best["peak_rss_mib"] if best else 0),
                    "ru_maxrss_mib": max(run["ru_maxrss_mib"], best["ru_maxrss_mib"] if best else 0),
                    "rss_before_mib": run["rss_before_mib"], "batches": run["batches"]}
                print(f"  {reader:8s} {run['rows'] / run['wall_s']:10,.0f} rows/s  "
                      f"{run['rows'] / run['cpu_s']:10,.0f} rows/CPU-s  peak RSS {run['peak_rss_mib']:6.0f} MiB "
                      f"(after imports {run['rss_before_mib']:.0f}; ru_maxrss {run['ru_maxrss_mib']:.0f})", flush=True)
    r = results["readers"]
    results["speedup_stream_vs_pyarrow"] = r["stream"]["rows_per_s"] / r["pyarrow"]["rows_per_s"]
    results["speedup_stream_vs_pyarrow_cpu"] = r["stream"]["cpu_rows_per_s"] / r["pyarrow"]["cpu_rows_per_s"]
    results["load_average_after"] = list(os.getloadavg())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"best of {args.rounds}: stream {results['speedup_stream_vs_pyarrow']:.1f}x pyarrow (wall), "
          f"{results['speedup_stream_vs_pyarrow_cpu']:.1f}x (CPU time); peak RSS (max over rounds) "
          + ", ".join(f"{k} {v['peak_rss_mib']:.0f} MiB" for k, v in r.items())
          + f"; load average {results['load_average_before'][0]:.1f} → {results['load_average_after'][0]:.1f}; "
          f"written {args.out}")
    return 0


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--stream-write":
        stream_write(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return 0
    if len(sys.argv) == 5 and sys.argv[1] == "--stream-check":
        print(stream_check(sys.argv[2], int(sys.argv[3])))
        return 0
    if len(sys.argv) == 5 and sys.argv[1] == "--stream-child":
        print(json.dumps(stream_child(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stream", action="store_true", help="the streaming case (see above)")
    parser.add_argument("--batch-rows", type=int, default=16384, help="--stream: rows a batch (the job's default)")
    parser.add_argument("--file", help="--stream: use (or write, if missing) this file rather than a temporary one")
    parser.add_argument("--rows", type=int, default=None, help="rows (default 100,000; --stream: 1,000,000)")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--rounds", type=int, default=3, help="best of this many (interleaved) reads")
    parser.add_argument("--out", default=None, help="default bench/results/pages_bench.json "
                        "(--stream: bench/results/pages_stream_bench.json)")
    args = parser.parse_args()
    name = "pages_stream_bench.json" if args.stream else "pages_bench.json"
    args.out = args.out or str(ROOT / "bench" / "results" / name)
    if args.stream:
        args.rows = args.rows or 1_000_000
        return stream_main(args)
    args.rows = args.rows or 100_000
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
    results["load_average_after"] = list(os.getloadavg())
    Path(args.out).write_text(json.dumps(results, indent=2))
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
