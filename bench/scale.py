"""The scale model's measurements on S3: plan, run and resume N small files with S3's latency added.

Starts the tests' SeaweedFS server on 127.0.0.1 and a proxy that holds every request ``--latency`` seconds
(tests/s3server.py, in a process of its own so that it takes no CPU time from the planner's interpreter;
every process goes through it: driver, JVM, Python workers). Writes ``--files`` small
parquet files (``--rows`` rows of 768-d float16 each), then measures, each as its own phase:

- plan: the planner alone: reading every footer with one thread (the old serial planner) and with
  ``planner.PLAN_THREADS``, from the listing (small files above ``planner.LISTING_PLAN_FILES``: the default),
  and (``--executor-plan``) with the footers read in Spark tasks on ``--master``;
- plan-laion: the same on ``--files / 10`` LAION npy/metadata pairs of ``--npy-rows`` rows, the serial case
  also with s3fs's default 50 MiB read-ahead on npy headers (the old planner's);
- run: ``clip-nsfw-spark run`` S3 → S3 on ``--master`` (annotate), with its progress lines;
- resume: ``--resume`` of the completed output (nothing left to do: the cost of checking);
and prints per phase: seconds, S3 requests and MB through the proxy, tasks/s and requests per task, and for
the run and resume the driver's peak RSS (its Python process).

    python bench/scale.py --files 2000 --latency 0.02 --json bench/results/scale.json
    python bench/scale.py --files 20000 --skip-run --skip-serial --executor-plan   # planning alone, larger N
    python bench/scale.py --files 100000 --skip-run --skip-serial --npy-rows 10 --json bench/results/plan-100k.json
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import re
import subprocess
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

sys.path.insert(0, str(ROOT / "bench"))
from bench import _cpu_model as cpu_name  # noqa: E402

S3FS_DEFAULT_BLOCK = 50 * 2**20  # what s3fs reads ahead when told nothing: the old planner's npy header read
LISTING_PLAN_FILES = planner.LISTING_PLAN_FILES


def parquet_bytes(rows: int, seed: int, dim: int = 768) -> bytes:
    values = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float16)
    values /= np.linalg.norm(values.astype(np.float32), axis=1, keepdims=True).astype(np.float16)
    table = pa.table({"key": [f"{seed:06d}{i:05d}" for i in range(rows)],
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), dim).cast(
                          pa.list_(pa.float16()))})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def npy_bytes(rows: int, dim: int = 768) -> bytes:
    sink = io.BytesIO()
    np.save(sink, np.zeros((rows, dim), np.float16))
    return sink.getvalue()


def plan_once(proxy, options, url, layout, threads, npy_block, count, read_remotely=None,
              from_listing: bool = False) -> dict:
    """One planning case; ``from_listing``: small files planned from the listing above
    planner.LISTING_PLAN_FILES (the planner's default), else every footer read (the planner before it)."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # nothing cached from an earlier case
    planner.PLAN_THREADS, reader.NPY_HEADER_BLOCK = threads, npy_block
    planner.LISTING_PLAN_FILES = LISTING_PLAN_FILES if from_listing else sys.maxsize
    name = f"plan-{layout} threads={threads}" + (f" npy_block={npy_block >> 10} KiB" if layout == "laion-npy" else "")
    if layout == "parquet":
        name += " from the listing" if from_listing else " every footer"
    executor_files = planner.EXECUTOR_PLANNING_FILES
    if read_remotely:
        name += f" in Spark tasks of {planner.FOOTERS_PER_SPARK_TASK}"
        planner.EXECUTOR_PLANNING_FILES = 0
    try:
        with Phase(proxy, name, count) as phase:
            plan = planner.plan(JobConfig(input=url, output="/tmp/unused", layout=layout, storage_options=options),
                                read_remotely=read_remotely)
    finally:  # the planner's own thresholds for the next case
        planner.LISTING_PLAN_FILES, planner.EXECUTOR_PLANNING_FILES = LISTING_PLAN_FILES, executor_files
    return phase.result | {"tasks": len(plan.tasks), "planned_from_listing": plan.listed,
                           "files_per_s": round(count / phase.result["seconds"], 1),
                           "minutes_for_100k_files": round(100_000 * phase.result["seconds"] / count / 60, 1)}


class ProxyProcess:
    """``LatencyProxy`` run in a child process (its asyncio loop would otherwise share the planner's GIL):
    the same ``endpoint``, ``delay``, ``requests``, ``kinds`` and ``bytes_down``, asked for over a pipe."""

    def __init__(self, target_port: int, delay: float):
        self._conn, child = multiprocessing.get_context("spawn").Pipe()
        self._process = multiprocessing.get_context("spawn").Process(target=_serve_proxy, args=(child, target_port, delay),
                                                                      daemon=True)
        self._process.start()
        self.port, self._delay = self._conn.recv(), delay

    endpoint = LatencyProxy.endpoint

    def _ask(self, *message):
        self._conn.send(message)
        return self._conn.recv()

    @property
    def delay(self) -> float:
        return self._delay

    @delay.setter
    def delay(self, seconds: float) -> None:
        self._delay = self._ask("delay", seconds)

    @property
    def requests(self) -> int:
        return self._ask("stats")[0]

    @property
    def kinds(self) -> dict:
        return self._ask("stats")[1]

    @property
    def bytes_down(self) -> int:
        return self._ask("stats")[2]

    def close(self) -> None:
        self._ask("close")
        self._process.join(10)


def _serve_proxy(conn, target_port: int, delay: float) -> None:
    proxy = LatencyProxy(target_port, delay)
    conn.send(proxy.port)
    while True:
        command, *args = conn.recv()
        if command == "stats":
            conn.send((proxy.requests, dict(proxy.kinds), proxy.bytes_down))
        elif command == "delay":
            proxy.delay = args[0]
            conn.send(proxy.delay)
        else:
            proxy.close()
            conn.send(None)
            return


class Phase:
    def __init__(self, proxy, name: str, tasks: int):
        self.proxy, self.name, self.tasks = proxy, name, tasks

    def __enter__(self):
        self.requests, self.down, self.started = self.proxy.requests, self.proxy.bytes_down, time.perf_counter()
        self.kinds = dict(self.proxy.kinds)
        return self

    def __exit__(self, *exc):
        kinds = {kind: n - self.kinds.get(kind, 0) for kind, n in sorted(self.proxy.kinds.items())}
        self.result = {"phase": self.name, "seconds": round(time.perf_counter() - self.started, 1),
                       "requests": self.proxy.requests - self.requests,
                       "by_kind": {kind: n for kind, n in kinds.items() if n},
                       "mb_down": round((self.proxy.bytes_down - self.down) / 1e6, 1)}
        self.result["requests_per_task"] = round(self.result["requests"] / self.tasks, 1)
        self.result["tasks_per_s"] = round(self.tasks / max(self.result["seconds"], 1e-9), 1)
        print(json.dumps(self.result), flush=True)


# Runs the command line in a fresh interpreter and, on the way out, prints that process's peak RSS: the
# driver's Python side (Linux's VmHWM, which starts again at exec; getrusage's ru_maxrss would also count
# this benchmark's own memory at the fork). The JVM PySpark starts is a process of its own, not counted.
_RSS_LAUNCHER = """
import runpy, sys
sys.argv = ["clip-nsfw-spark", *sys.argv[1:]]
try:
    runpy.run_module("clip_nsfw_spark.cli", run_name="__main__")
finally:
    try:
        peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
        print(f"driver peak RSS: python {peak // 1024} MB", file=sys.stderr)
    except (OSError, StopIteration):
        pass
"""
PEAK_RSS = re.compile(r"driver peak RSS: python (\d+) MB")


def run_cli(args: list[str], env: dict) -> tuple[int, str, dict]:
    """``clip-nsfw-spark run *args`` → (exit status, standard error, {driver_python_peak_rss_mb} where the
    system tells it)."""
    process = subprocess.run([sys.executable, "-c", _RSS_LAUNCHER, "run", *args], env=env, cwd=ROOT,
                             capture_output=True, text=True)
    rss = PEAK_RSS.search(process.stderr)
    peaks = {"driver_python_peak_rss_mb": int(rss.group(1))} if rss else {}
    return process.returncode, process.stderr, peaks


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--rows", type=int, default=10, help="rows per file")
    parser.add_argument("--latency", type=float, default=0.02)
    parser.add_argument("--npy-rows", type=int, default=1000, help="rows per npy file (× 768 × 2 bytes)")
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--skip-run", action="store_true", help="measure planning only")
    parser.add_argument("--skip-serial", action="store_true", help="no one-thread planning cases (large N)")
    parser.add_argument("--run-latency", type=float, help="the run phase's latency, if not --latency (a large N's "
                                                          "run made quickly, to measure its resume)")
    parser.add_argument("--executor-plan", action="store_true", help="also plan with the footers read in Spark tasks")
    parser.add_argument("--plan-from", choices=("both", "listing", "footers"), default="both",
                        help="parquet planning cases: from the listing (the default above %d files), reading every "
                             "footer (the planner before it), or both" % LISTING_PLAN_FILES)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    results = {"cpu": cpu_name(), "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "files": args.files, "rows_per_file": args.rows, "latency_s": args.latency,
               "run_latency_s": args.run_latency, "master": args.master,
               "phases": []}
    with tempfile.TemporaryDirectory(prefix="scale-") as work:
        server = SeaweedS3(Path(work))
        server.start()
        proxy = ProxyProcess(server.port, args.latency)
        try:
            fs = server.filesystem()
            fs.mkdir("scale")
            fs.pipe({f"scale/in/part-{i:06d}.parquet": parquet_bytes(args.rows, i) for i in range(args.files)})
            options = dict(server.storage_options(), endpoint_url=proxy.endpoint)
            threads, block = planner.PLAN_THREADS, reader.NPY_HEADER_BLOCK
            serial = [] if args.skip_serial or args.plan_from == "listing" else [(1, block, False)]
            ways = {"both": (False, True), "listing": (True,), "footers": (False,)}[args.plan_from]
            for case in (*serial, *((threads, block, way) for way in ways)):
                results["phases"].append(plan_once(proxy, options, "s3://scale/in", "parquet", *case[:2], args.files,
                                                   from_listing=case[2]))
            if args.executor_plan:  # the footers read by Spark's Python workers (local: this machine's cores)
                from clip_nsfw_spark.spark.runner import spark_runner, spark_session

                with spark_session(args.master, conf={"spark.ui.enabled": "false"}) as spark:
                    read = spark_runner(spark).read_footers  # the phase includes starting 2 Python workers
                    results["phases"].append(plan_once(proxy, options, "s3://scale/in", "parquet", threads, block,
                                                       args.files, read))
            pairs = max(1, args.files // 10)
            fs.pipe({f"scale/laion/img_emb/img_emb_{i}.npy": npy_bytes(args.npy_rows) for i in range(pairs)})
            meta = parquet_bytes(args.npy_rows, 0, dim=1)
            fs.pipe({f"scale/laion/metadata/metadata_{i}.parquet": meta for i in range(pairs)})
            serial = [] if args.skip_serial else [(1, S3FS_DEFAULT_BLOCK), (1, block)]
            for case in (*serial, (threads, block)):
                results["phases"].append(plan_once(proxy, options, "s3://scale/laion", "laion-npy", *case, pairs))
            planner.PLAN_THREADS, reader.NPY_HEADER_BLOCK = threads, block
            if args.skip_run:
                return _finish(results, args)
            env = dict(os.environ, **dict(server.env(), AWS_ENDPOINT_URL=proxy.endpoint))
            common = ["--input", "s3://scale/in", "--output", "s3://scale/out", "--master", args.master]
            for name, extra in (("run", []), ("resume", ["--resume"])):
                proxy.delay = args.latency if args.run_latency is None or name != "run" else args.run_latency
                with Phase(proxy, name, args.files) as phase:
                    status, err, peaks = run_cli(common + extra, env)
                progress = re.findall(r"progress \[[#.]+\] (\d+)/(\d+) tasks", err)
                phase.result |= peaks | {"exit": status, "progress_lines": len(progress),
                                 "progress_seen": [int(done) for done, _ in progress][:50]}
                results["phases"].append(phase.result)
                if status != 0:
                    print(err[-3000:], file=sys.stderr)
                    break
            report = json.loads(fs.cat_file("scale/out/_clip_nsfw_report.json")) if fs.exists(
                "scale/out/_clip_nsfw_report.json") else {}
            results["report_rows"] = report.get("rows")
        finally:
            proxy.close()
            server.stop()
    return _finish(results, args)


def _finish(results: dict, args) -> int:
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(p.get("exit", 0) == 0 for p in results["phases"]) else 1

if __name__ == "__main__":
    sys.exit(main())
