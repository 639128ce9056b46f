"""Benchmark: the job against a seed-style baseline, the kernel, the IO floor and this CPU's sgemm limit.

    python bench/bench.py [--rows 1000000] [--files 10] [--cores 2] [--out bench/results/bench.json]
    python bench/bench.py --kernel-only      # the kernel against the BLAS MLP and sgemm, about a minute

Everything runs in one process, on the same data and the same number of cores, and is reported as
rows/s and as ratios. The data (LAION-like float16 embeddings in parquet, plus a float32 copy of the same
rows for Spark, which cannot read float16 parquet) is generated once under --workdir and reused.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from clip_nsfw_spark import load_scorer  # noqa: E402
from clip_nsfw_spark.config import JobConfig  # noqa: E402
from clip_nsfw_spark.job import run_job  # noqa: E402
from clip_nsfw_spark.models import prepare_model  # noqa: E402
from clip_nsfw_spark.sample import write_parquet_sample  # noqa: E402
from clip_nsfw_spark.writer import scalar_columns  # noqa: E402

FLOP_PER_ROW = {"vit-l-14": 2 * 213_248}


def make_data(workdir: Path, rows: int, files: int) -> tuple[Path, Path]:
    f16, f32 = workdir / f"f16-{rows}", workdir / f"f32-{rows}"
    if not (f16 / "_DONE").exists():
        shutil.rmtree(f16, ignore_errors=True)
        write_parquet_sample(str(f16), rows=rows, files=files, row_group_rows=65536)
        (f16 / "_DONE").write_text("")
    if not (f32 / "_DONE").exists():
        shutil.rmtree(f32, ignore_errors=True)
        f32.mkdir(parents=True)
        for path in sorted(f16.glob("*.parquet")):
            table = pq.read_table(path)
            column = table.column("embedding").combine_chunks()
            as32 = pa.FixedSizeListArray.from_arrays(pc.cast(column.flatten(), pa.float32()), column.type.list_size)
            table = table.set_column(table.schema.get_field_index("embedding"), "embedding", as32)
            pq.write_table(table, f32 / path.name, row_group_size=65536, compression="zstd",
                           use_dictionary=scalar_columns(table.schema))
        (f32 / "_DONE").write_text("")
    return f16, f32


def make_laion_data(workdir: Path, rows: int, files: int) -> Path:
    """The same kind of rows in LAION's own layout: img_emb/*.npy (float16) + metadata/*.parquet."""
    from clip_nsfw_spark.sample import write_laion_sample

    target = workdir / f"laion-{rows}"
    if not (target / "_DONE").exists():
        shutil.rmtree(target, ignore_errors=True)
        write_laion_sample(str(target), rows=rows, files=files)
        (target / "_DONE").write_text("")
    return target


def worker_cold_start(model: str, workdir: Path) -> float:
    """A fresh interpreter doing what a new Spark Python worker does: import, build the scorer from the
    portable-weights bytes, score a first batch of 1,024 float16 rows. Wall clock, interpreter start included."""
    import subprocess

    resolved = prepare_model(model)
    code = ("import numpy as np; from clip_nsfw_spark.config import HeadPayload; "
            "from clip_nsfw_spark.worker import scorer_for; "
            f"data = open({str(resolved.portable)!r}, 'rb').read(); "
            f"s = scorer_for(HeadPayload({model!r}, {resolved.sha256!r}, data)); "
            "s(np.random.default_rng(0).normal(size=(1024, s.dim)).astype(np.float16))")
    subprocess.run([sys.executable, "-c", code], check=True)  # fills numba's on-disk cache once
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - t0


def sgemm_rows_per_second(cores: int, model: str) -> tuple[float, float]:
    """This CPU's fp32 sgemm rate on one thread (4096² matrices) → the model's rows/s on ``cores``."""
    from threadpoolctl import threadpool_limits

    a = np.random.default_rng(0).normal(size=(4096, 4096)).astype(np.float32)
    with threadpool_limits(1):
        a @ a
        best = min(_timed(lambda: a @ a) for _ in range(3))
    flops = 2 * 4096 ** 3 / best
    return flops, cores * flops / FLOP_PER_ROW[model]


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _kernel_worker(args):
    model, path, rows = args
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    scorer = load_scorer(model)
    x = np.load(path, mmap_mode="r")[:rows]
    x = np.ascontiguousarray(x)
    scorer(x[:2048])  # compile/warm outside the timing
    t0 = time.perf_counter()
    scorer(x)
    return time.perf_counter() - t0


def kernel_rows_per_second(model: str, f16_dir: Path, cores: int, rows: int, workdir: Path) -> float:
    """The numpy scorer alone on in-memory float16 arrays, one process per core."""
    table = pq.read_table(sorted(f16_dir.glob("*.parquet"))[0], columns=["embedding"])
    x = table.column(0).combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1)[:rows]
    path = workdir / "kernel.npy"
    np.save(path, x)
    with multiprocessing.get_context("spawn").Pool(cores) as pool:
        pool.map(_kernel_worker, [(model, str(path), 1000)] * cores)  # warm numba's cache
        t0 = time.perf_counter()
        pool.map(_kernel_worker, [(model, str(path), len(x))] * cores)
        wall = time.perf_counter() - t0
    return cores * len(x) / wall


def _compare_worker(args) -> dict:
    """One process, one thread: the scorer (float32 and float16 rows, encoding included) against a plain
    numpy/BLAS MLP of the same layers on the same float32 rows, interleaved; best of ``rounds`` each."""
    model, rows, rounds = args
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    scorer = load_scorer(model)
    x = np.random.default_rng(0).normal(size=(rows, scorer.dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # CLIP embeddings are unit vectors
    x32, x16 = x.astype(np.float32), x.astype(np.float16)
    w = scorer.weights
    layers = list(zip(w.kernels, w.biases, w.activations))

    def mlp(rows32):  # the plain BLAS MLP: no encoding, BLAS order, numpy's sigmoid
        h = rows32
        for kernel, bias, activation in layers:
            h = h @ kernel
            h += bias
            if activation == "relu":
                np.maximum(h, np.float32(0), out=h)
        return np.float32(1) / (np.float32(1) + np.exp(-h[:, 0]))

    def mlp_chunked(rows32):
        return np.concatenate([mlp(rows32[i:i + 1024]) for i in range(0, len(rows32), 1024)])

    square = np.random.default_rng(1).normal(size=(2048, 2048)).astype(np.float32)
    flop_per_row = 2 * sum(kernel.size for kernel in w.kernels)
    sgemm_rows = 2 * 2048 ** 3 / flop_per_row  # one 2048² sgemm, counted in rows of this model
    variants = {"scorer float32": (scorer, x32), "scorer float16": (scorer, x16),
                "BLAS MLP float32, one batch": (mlp, x32), "BLAS MLP float32, 1024-row chunks": (mlp_chunked, x32),
                "sgemm limit (2048² sgemm FLOP/s / FLOP per row)": (lambda a: a @ a, square)}
    for fn, data in variants.values():
        fn(data[:4096])  # compile / warm up outside the timing
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(rounds):
        for name, (fn, data) in variants.items():
            best[name] = min(best[name], _timed(lambda: fn(data)))
    rates = {name: rows / seconds for name, seconds in best.items()}
    rates["sgemm limit (2048² sgemm FLOP/s / FLOP per row)"] = sgemm_rows / rows * rates.pop(
        "sgemm limit (2048² sgemm FLOP/s / FLOP per row)")
    return rates


def kernel_vs_blas(model: str, cores: int, rows: int = 60_000, rounds: int = 7) -> dict:
    """rows/s of the scorer and of the plain BLAS MLP, one single-threaded process per core, summed."""
    with multiprocessing.get_context("spawn").Pool(cores) as pool:
        per_process = pool.map(_compare_worker, [(model, rows, rounds)] * cores)
    rates = {name: sum(p[name] for p in per_process) for name in per_process[0]}
    blas = max(rates["BLAS MLP float32, one batch"], rates["BLAS MLP float32, 1024-row chunks"])
    rates["ratio float32 (scorer / best BLAS MLP)"] = rates["scorer float32"] / blas
    rates["ratio float16 (scorer / best BLAS MLP)"] = rates["scorer float16"] / blas
    return rates


def kernel_report(model: str, cores: int) -> dict:
    """The fixed-order kernel against the BLAS MLP and the sgemm limit, on one core and on ``cores``
    (all measured interleaved in the same processes, best of 7 rounds each)."""
    report = {}
    for n in sorted({1, cores}):
        rates = kernel_vs_blas(model, n)
        limit = rates["sgemm limit (2048² sgemm FLOP/s / FLOP per row)"]
        rates["scorer float32 / sgemm limit"] = rates["scorer float32"] / limit
        report[f"{n} core{'s' if n > 1 else ''}"] = rates
        print(f"\n{n} single-threaded process(es), {model}")
        for name, value in rates.items():
            print(f"  {name:50s} {value:12,.2f}" if value < 100 else f"  {name:50s} {value:12,.0f} rows/s")
    return report


def seed_baseline(spark, f32_dir: Path, saved_model: str) -> float:
    """What the original README leads to today: Spark reads, a pandas UDF calls TensorFlow per batch."""
    import pandas as pd
    from pyspark.sql.functions import pandas_udf
    from pyspark.sql.types import FloatType

    def tf_score(embeddings):
        import tensorflow as tf

        # One model per Python worker: kept on the tensorflow module, which outlives tasks in a reused
        # worker (a dict captured by the UDF would be unpickled afresh for every task).
        cache = tf.__dict__.setdefault("_nsfw_bench_cache", {})
        if "fn" not in cache:
            cache["fn"] = tf.saved_model.load(saved_model).signatures["serving_default"]
        x = np.stack(embeddings.to_numpy()).astype(np.float64)
        out = cache["fn"](input_1=tf.constant(x))["classification_head_1"].numpy().reshape(-1)
        return pd.Series(out)

    # Real classes, not the strings `from __future__ import annotations` would leave for PySpark.
    tf_score.__annotations__ = {"embeddings": pd.Series, "return": pd.Series}
    udf = pandas_udf(tf_score, FloatType())
    frame = spark.read.parquet(str(f32_dir)).withColumn("punsafe", udf("embedding"))
    return _write(frame, f32_dir.parent / "out-baseline")


def dataframe_path(spark, f32_dir: Path, model: str) -> float:
    from clip_nsfw_spark.spark import nsfw_score

    frame = spark.read.parquet(str(f32_dir)).withColumn("punsafe", nsfw_score("embedding", model))
    return _write(frame, f32_dir.parent / "out-dataframe")


def _write(frame, output: Path) -> float:
    """Write like the job does (zstd parquet, every column), so that the paths do the same work."""
    t0 = time.perf_counter()
    frame.write.mode("overwrite").option("compression", "zstd").parquet(str(output))
    return time.perf_counter() - t0


class ConstantScorer:
    """Scores every row 0: the IO floor (the job with the model taken out)."""

    def __init__(self, dim: int):
        self.dim = dim

    def __call__(self, embeddings) -> np.ndarray:
        return np.zeros(len(embeddings), dtype=np.float32)


def constant_scorer(head) -> ConstantScorer:
    from clip_nsfw_spark.scorer import scorer_from_portable

    return ConstantScorer(scorer_from_portable(head.data).dim)


def job_seconds(spark, source: Path, output: Path, model: str, io_only: bool = False) -> tuple[float, dict]:
    """The job end to end, from the first task to the success marker (planning and model excluded).
    ``io_only``: every task's worker scores with a constant instead of the model (the IO floor)."""
    import dataclasses

    from clip_nsfw_spark.spark import spark_runner

    shutil.rmtree(output, ignore_errors=True)
    runner = spark_runner(spark)
    if io_only:
        spark_run = runner
        runner = lambda tasks, worker: spark_run(tasks, dataclasses.replace(worker, make_scorer=constant_scorer))  # noqa: E731
    report = run_job(JobConfig(input=str(source), output=str(output), model=model), runner=runner)
    d = report["durations_seconds"]
    return d["total"] - d["plan"] - d["model"], report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--model", default="vit-l-14")
    parser.add_argument("--workdir", default=str(ROOT / "bench" / "data"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench.json"))
    parser.add_argument("--skip-baseline", action="store_true", help="skip the (slow) TensorFlow baseline")
    parser.add_argument("--kernel-only", action="store_true",
                        help="only the kernel against the BLAS MLP and the sgemm limit (about a minute, no Spark)")
    args = parser.parse_args()
    if args.kernel_only:
        results = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": _cpu_model(), "machine": platform.machine(),
                   "model": args.model, "cores": args.cores,
                   "kernel_vs_blas": kernel_report(args.model, args.cores)}
        out = Path(args.out).with_name("kernel.json") if args.out == parser.get_default("out") else Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        print(f"{results['cpu']}, {results['date']}; written {out}")
        return 0
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rows = args.rows
    results: dict = {"date": time.strftime("%Y-%m-%d"), "rows": rows, "files": args.files, "cores": args.cores,
                     "cpu": _cpu_model(), "machine": platform.machine(), "python": platform.python_version(),
                     "model": args.model}
    print(f"data: {rows:,} rows in {args.files} files under {workdir}")
    f16, f32 = make_data(workdir, rows, args.files)
    resolved = prepare_model(args.model)

    flops, limit = sgemm_rows_per_second(args.cores, args.model)
    results["sgemm_gflops_per_core"] = flops / 1e9
    figures = {"limit (sgemm)": (None, limit)}
    print(f"sgemm {flops / 1e9:.1f} GFLOP/s per core → limit {limit:,.0f} rows/s on {args.cores} cores")
    kernel = kernel_rows_per_second(args.model, f16, args.cores, min(rows // args.files, 200_000), workdir)
    figures["kernel (numpy scorer, float16 in memory)"] = (None, kernel)
    print(f"kernel {kernel:,.0f} rows/s")
    results["kernel_vs_blas"] = kernel_report(args.model, args.cores)
    results["worker_cold_start_seconds"] = worker_cold_start(args.model, workdir)
    laion = make_laion_data(workdir, rows, args.files)

    from clip_nsfw_spark.spark import spark_session

    t0 = time.perf_counter()
    # Spark's own reader/writer (baseline, DataFrame path) needs more than local mode's 1 GiB default heap.
    conf = {"spark.driver.memory": "6g"}
    with spark_session(f"local[{args.cores}]", conf=conf) as spark:
        spark.range(1).collect()
        results["startup_session_seconds"] = time.perf_counter() - t0
        tiny = workdir / f"tiny-{args.cores}"
        if not tiny.exists():  # one small file per core, so that every Python worker starts before timing
            write_parquet_sample(str(tiny), rows=10 * args.cores, files=2 * args.cores)
        t1 = time.perf_counter()
        job_seconds(spark, tiny, workdir / "out-tiny", args.model)
        results["startup_first_job_seconds"] = time.perf_counter() - t1

        seconds, report = job_seconds(spark, f16, workdir / "out-f16", args.model)
        figures["job, float16 parquet (annotate, zstd)"] = (seconds, rows / seconds)
        results["job_f16_report"] = {k: report[k] for k in ("task_stage_seconds", "worker_max_rss_mb")}
        print(f"job f16 {rows / seconds:,.0f} rows/s")
        seconds, _ = job_seconds(spark, f32, workdir / "out-f32", args.model)
        figures["job, float32 parquet (annotate, zstd)"] = (seconds, rows / seconds)
        seconds, _ = job_seconds(spark, laion, workdir / "out-laion", args.model)
        figures["job, LAION img_emb/*.npy + metadata (annotate)"] = (seconds, rows / seconds)
        seconds, _ = job_seconds(spark, f16, workdir / "out-io", args.model, io_only=True)
        figures["IO floor (job with a constant score), float16"] = (seconds, rows / seconds)
        seconds = dataframe_path(spark, f32, args.model)
        figures["DataFrame API (nsfw_score), float32, Spark read"] = (seconds, rows / seconds)
        print(f"dataframe {rows / seconds:,.0f} rows/s")
        if not args.skip_baseline:
            seconds = seed_baseline(spark, f32, str(resolved.saved_model))
            figures["seed-style baseline (pandas UDF + TensorFlow), float32"] = (seconds, rows / seconds)
            print(f"baseline {rows / seconds:,.0f} rows/s")
    with spark_session("local[1]", conf=conf) as spark:
        job_seconds(spark, tiny, workdir / "out-tiny", args.model)
        seconds, _ = job_seconds(spark, f16, workdir / "out-f16-1core", args.model)
        figures["job, float16, local[1]"] = (seconds, rows / seconds)

    base = figures.get("seed-style baseline (pandas UDF + TensorFlow), float32", (None, None))[1]
    kernel, io = figures["kernel (numpy scorer, float16 in memory)"][1], figures["IO floor (job with a constant score), float16"][1]
    job16 = figures["job, float16 parquet (annotate, zstd)"][1]
    serial = 1 / (1 / kernel + 1 / io)
    results["figures"] = {k: {"seconds": s, "rows_per_second": r} for k, (s, r) in figures.items()}
    results["ratios"] = {
        "job_f16_vs_baseline": job16 / base if base else None,
        "kernel_vs_sgemm_limit": kernel / limit,
        "job_f16_vs_serial_limit": job16 / serial,
        "job_f16_vs_job_f32": job16 / figures["job, float32 parquet (annotate, zstd)"][1],
        "local2_vs_local1": job16 / figures["job, float16, local[1]"][1],
    }
    print()
    print(f"{'measurement':58s} {'rows/s':>12s} {'seconds':>9s} {'vs baseline':>12s}")
    for name, (seconds, rate) in figures.items():
        ratio = f"{rate / base:.1f}x" if base else "-"
        print(f"{name:58s} {rate:12,.0f} {seconds if seconds else float('nan'):9.1f} {ratio:>12s}")
    for name, value in results["ratios"].items():
        print(f"{name:40s} {value:.2f}" if value is not None else f"{name:40s} -")
    print(f"worker cold start (fresh interpreter → first scored batch): {results['worker_cold_start_seconds']:.2f} s")
    print(f"startup: session {results['startup_session_seconds']:.1f} s, first tiny job "
          f"{results['startup_first_job_seconds']:.1f} s; worker peak RSS {results['job_f16_report']['worker_max_rss_mb']} MB")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"written {out}")
    return 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
