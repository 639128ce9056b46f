"""Planning on S3 at scale: footers and npy headers read concurrently vs one at a time, with S3's latency.

Starts the tests' SeaweedFS server on 127.0.0.1 and a proxy that adds ``--latency`` seconds to every request
(tests/s3server.py), writes ``--files`` small parquet files (and as many LAION npy/metadata pairs), then
plans each input with the planner's thread pool set to 1 (the old serial planner) and to ``--threads``,
in the same run. Prints seconds, files/s, requests, bytes fetched and the time 100,000 files would take.

    python bench/plan_scale.py --files 2000 --latency 0.02
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from s3server import LatencyProxy, SeaweedS3  # noqa: E402

from clip_nsfw_spark.driver import planner  # noqa: E402
from clip_nsfw_spark.driver.config import JobConfig  # noqa: E402
from clip_nsfw_spark.executor import reader  # noqa: E402

S3FS_DEFAULT_BLOCK = 50 * 2**20  # what s3fs reads ahead when told nothing: the old planner's npy header read


def parquet_bytes(rows: int, dim: int = 768) -> bytes:
    values = np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float16)
    table = pa.table({"key": [f"{i:09d}" for i in range(rows)],
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), dim).cast(
                          pa.list_(pa.float16()))})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def npy_bytes(rows: int, dim: int = 768) -> bytes:
    sink = io.BytesIO()
    np.save(sink, np.zeros((rows, dim), np.float16))
    return sink.getvalue()


def upload(fs, files: dict[str, bytes]) -> None:
    fs.pipe(files)  # fsspec's batched PUTs


def measure(proxy, options, url, threads, layout, npy_block=reader.NPY_HEADER_BLOCK) -> dict:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    planner.PLAN_THREADS, reader.NPY_HEADER_BLOCK = threads, npy_block
    requests, down = proxy.requests, proxy.bytes_down
    started = time.perf_counter()
    plan = planner.plan(JobConfig(input=url, output="/tmp/unused", layout=layout, storage_options=options))
    seconds = time.perf_counter() - started
    return {"threads": threads, "npy_block": npy_block if layout == "laion-npy" else None, "seconds": round(seconds, 2), "tasks": len(plan.tasks),
            "requests": proxy.requests - requests, "mb_fetched": round((proxy.bytes_down - down) / 1e6, 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--npy-rows", type=int, default=20000, help="rows per npy file (its size: × 768 × 2 bytes)")
    parser.add_argument("--latency", type=float, default=0.02)
    parser.add_argument("--threads", type=int, default=planner.PLAN_THREADS)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="plan-scale-") as work:
        server = SeaweedS3(Path(work))
        server.start()
        proxy = LatencyProxy(server.port, args.latency)
        try:
            fs = server.filesystem()
            fs.mkdir("bench")
            data = parquet_bytes(10)
            upload(fs, {f"bench/parquet/part-{i:06d}.parquet": data for i in range(args.files)})
            npy_files = max(1, args.files // 10)
            upload(fs, {f"bench/laion/img_emb/img_emb_{i}.npy": npy_bytes(args.npy_rows) for i in range(npy_files)})
            meta = parquet_bytes(args.npy_rows, dim=1)
            upload(fs, {f"bench/laion/metadata/metadata_{i}.parquet": meta for i in range(npy_files)})
            options = dict(server.storage_options(), endpoint_url=proxy.endpoint)
            results = []
            for url, layout, count in (("s3://bench/parquet", "parquet", args.files),
                                       ("s3://bench/laion", "laion-npy", npy_files)):
                cases = [(1, S3FS_DEFAULT_BLOCK)] if layout == "laion-npy" else []
                cases += [(1, reader.NPY_HEADER_BLOCK), (args.threads, reader.NPY_HEADER_BLOCK)]
                for threads, block in cases:
                    row = {"input": layout, "files": count, **measure(proxy, options, url, threads, layout, block)}
                    row["files_per_s"] = round(count / row["seconds"], 1)
                    row["minutes_for_100k"] = round(100_000 / row["files_per_s"] / 60, 1)
                    results.append(row)
                    print(json.dumps(row))
                serial, parallel = results[-len(cases)], results[-1]
                print(f"{layout}: {parallel['seconds'] / serial['seconds']:.2f} of the old planner's time "
                      f"({serial['seconds'] / parallel['seconds']:.1f}x faster), {parallel['mb_fetched']} vs "
                      f"{serial['mb_fetched']} MB fetched, at {args.latency * 1000:.0f} ms per request")
            if args.json:
                Path(args.json).write_text(json.dumps({"latency": args.latency, "results": results}, indent=2))
        finally:
            proxy.close()
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
