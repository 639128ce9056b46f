"""How fast pyarrow writes (and reads back) an embedding column under each encoding and codec.

    python bench/writer_policy.py [--rows 100000] [--dim 768] [--out bench/results/writer_policy.json]

One parquet file per case: LAION-like unit-norm embeddings as a ``list<halffloat>`` or ``list<float>``
column, one thread, no statistics on the embedding column (the job's policy), PLAIN or BYTE_STREAM_SPLIT,
no compression / snappy / lz4 / zstd. Best of 3 writes and reads per case; file size in MB. Only this
column is written, so the figures are the embedding column's own cost. The case ``SPLICED`` + none is
the job's writer since 2026-11-26 (``clip_nsfw_spark.parquet.splice``: the same PLAIN pages, encoded without pyarrow;
the file it writes must read back equal, or the script stops).
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from clip_nsfw_spark.tools.sample import embedding_array, embeddings  # noqa: E402
from clip_nsfw_spark.parquet.splice import SplicedParquetWriter  # noqa: E402


def write_spliced(table: pa.Table, sink) -> None:
    """The job's writer: one row group per 16,384 rows, as ``write_table(row_group_size=16384)`` makes."""
    writer = SplicedParquetWriter(sink, table.schema, compression="none", use_dictionary=False,
                                  write_statistics=False, columns=["embedding"])
    for batch in table.to_batches(max_chunksize=16384):
        writer.write_table(pa.Table.from_batches([batch]))
    writer.close()
    assert writer.pages_written, "splice.py wrote no page"


def measure(table: pa.Table, encoding: str, compression: str, rounds: int = 3) -> dict:
    options = dict(compression=compression, use_dictionary=False, write_statistics=False,
                   column_encoding={"embedding.list.element": encoding})  # the leaf: "embedding" is ignored
    best_write, best_read, data = float("inf"), float("inf"), b""
    for _ in range(rounds):
        sink = io.BytesIO()
        t0 = time.perf_counter()
        if encoding == "SPLICED":
            write_spliced(table, sink)
        else:
            pq.write_table(table, sink, row_group_size=16384, **options)
        best_write = min(best_write, time.perf_counter() - t0)
        data = sink.getvalue()
        used = pq.read_metadata(io.BytesIO(data)).row_group(0).column(0).encodings
        assert (encoding if encoding != "SPLICED" else "PLAIN") in used, f"{encoding} was not applied: {used}"
        t0 = time.perf_counter()
        back = pq.read_table(io.BytesIO(data), use_threads=False)
        best_read = min(best_read, time.perf_counter() - t0)
    assert back.equals(table), f"{encoding} + {compression} did not read back equal"
    return {"write_rows_per_s": table.num_rows / best_write, "read_rows_per_s": table.num_rows / best_read,
            "mb": len(data) / 1e6}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "writer_policy.json"))
    args = parser.parse_args()
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "rows": args.rows, "dim": args.dim,
               "cpu": _cpu_model(), "pyarrow": pa.__version__, "cases": []}
    print(f"{'dtype':8s} {'encoding':18s} {'codec':7s} {'write rows/s':>13s} {'read rows/s':>12s} {'MB':>8s}")
    for dtype in (np.float16, np.float32):
        table = pa.table({"embedding": embedding_array(embeddings(args.rows, args.dim, 0, dtype), False)})
        for encoding in ("PLAIN", "BYTE_STREAM_SPLIT", "SPLICED"):  # the first case also warms up
            for codec in (("none",) if encoding == "SPLICED" else ("none", "snappy", "lz4", "zstd")):
                case = {"dtype": np.dtype(dtype).name, "encoding": encoding, "codec": codec}
                case |= measure(table, encoding, codec)
                results["cases"].append(case)
                print(f"{case['dtype']:8s} {encoding:18s} {codec:7s} {case['write_rows_per_s']:13,.0f} "
                      f"{case['read_rows_per_s']:12,.0f} {case['mb']:8.1f}")
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
