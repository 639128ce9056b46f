"""Spark's cost per job task as the task count grows, and the driver's memory for a million tasks.

Each ``--tasks`` count runs in its own process (its own driver and JVM, so peak memory is its own): N no-op
job tasks with realistic descriptions (~10,000 rows each, long S3 paths) go through the job's Spark runner
(spark/runner.py: packed into Spark tasks, results summed there), and, as the baseline, one job task per
Spark task (the runner before packing). A million tasks would take hours to run one by one on two cores,
so the first ``--run-partitions`` Spark tasks of the full plan run (``SparkContext.runJob`` over the
partitions of the job's RDD of every part: spark/runner.map_parts): what each costs does not depend on how
many run. (Figures before issue #27 were measured on the DataFrame the runner used then: a broadcast table
of every task joined to ``spark.range``.) Printed per count and way: the driver's seconds to pack
and ship the tasks, ms per Spark task and per job task, and the peak RSS of the driver's Python process and
of its JVM (VmHWM).

    python bench/task_overhead.py --tasks 1000 100000 1000000 --json bench/results/task_overhead.json
"""

from __future__ import annotations

import argparse
import json
import pickle
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


class NoOpWorker:
    """A task's stats with every report figure, as a real task returns them (20-bin histogram, one column)."""

    def __call__(self, task) -> dict:
        return {"task_id": task.task_id, "rows_read": task.rows, "rows_unsafe": 0,
                "rows_written": {"annotated": task.rows}, "rejected_by_reason": {},
                "stage_seconds": {"read": 0.0, "score": 0.0, "write": 0.0}, "histograms": {"punsafe": [0] * 20},
                "outside_0_1": {"punsafe": [0, 0]}, "unsafe_by_column": {"punsafe": 0}, "worker_max_rss_mb": 0.0}


def tasks(count: int):
    from clip_nsfw_spark.contract import Task

    return [Task("parquet", f"bucket/laion2B-en/embeddings/part-{i:07d}-{'f' * 36}.parquet",
                 f"part-{i:07d}.parquet", (0,), rows=10_000,
                 source=f"{i:020x}") for i in range(count)]


def peak_rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def jvm_pid() -> int | None:
    """The JVM this process started (PySpark's gateway): a child running java."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid() and "java" in (entry / "comm").read_text():
                    return int(entry.name)
            except (OSError, ValueError, IndexError):
                continue
    return None


def one_count(count: int, run_partitions: int, master: str, ways: list[str]) -> dict:
    from clip_nsfw_spark.spark.runner import _cores, map_parts, pack_tasks, partition_runner, spark_session

    row = {"tasks": count}
    with spark_session(master, conf={"spark.ui.enabled": "false"}) as spark:
        warm = pack_tasks(tasks(8), _cores(spark))  # start the Python workers before timing
        map_parts(spark, warm, partition_runner(NoOpWorker()))
        listed = tasks(count)
        for way in ways:
            started = time.perf_counter()
            parts = pack_tasks(listed, _cores(spark)) if way == "packed" else [[task] for task in listed]
            run = min(len(parts), run_partitions)
            # the job's way (runner.map_parts: an RDD of one part per partition), its first ``run`` partitions run
            rdd = spark.sparkContext.parallelize(parts, len(parts)).mapPartitions(partition_runner(NoOpWorker()))
            shipped = time.perf_counter()
            try:
                results = [pickle.loads(data) for data in
                           spark.sparkContext.runJob(rdd, lambda records: list(records), list(range(run)))]
            except Exception as err:  # noqa: BLE001 - e.g. the driver's JVM cannot hold every part
                row[way] = {"spark_tasks": len(parts), "failed": str(err).strip().splitlines()[-1][:300]
                            if "SparkException" not in str(err) else next(
                                line for line in str(err).splitlines() if "SparkException" in line)[:300]}
                continue
            ran = time.perf_counter() - shipped
            job_tasks = sum(len(result["tasks_summed"]) for result in results)
            assert job_tasks == sum(len(part) for part in parts[:run]) and not any(r["errors"] for r in results)
            row[way] = {"spark_tasks": len(parts), "spark_tasks_run": run, "job_tasks_run": job_tasks,
                        "driver_seconds": round(shipped - started, 2), "run_seconds": round(ran, 2),
                        "ms_per_spark_task": round(ran / run * 1000, 1),
                        "ms_per_job_task": round(ran / job_tasks * 1000, 2)}
            del parts, rdd, results
        row["driver_peak_rss_mb"] = peak_rss_mb()
        pid = jvm_pid()
        row["jvm_peak_rss_mb"] = peak_rss_mb(pid) if pid else None
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[1000, 100_000])
    parser.add_argument("--run-partitions", type=int, default=200, help="Spark tasks run per count and way")
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--ways", nargs="+", default=["packed", "one_per_spark_task"],
                        choices=["packed", "one_per_spark_task"])
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child: one count
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one_count(args.one, args.run_partitions, args.master, args.ways)), flush=True)
        return 0
    from bench import _cpu_model as cpu_name

    results = {"cpu": cpu_name(), "cores": os.cpu_count(), "master": args.master,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "counts": []}
    for count in args.tasks:
        child = subprocess.run([sys.executable, __file__, "--one", str(count), "--run-partitions",
                                str(args.run_partitions), "--master", args.master, "--ways", *args.ways],
                               capture_output=True, text=True, cwd=ROOT)
        if child.returncode:
            print(child.stderr[-3000:], file=sys.stderr)
            return 1
        row = json.loads(child.stdout.strip().splitlines()[-1])
        print(json.dumps(row), flush=True)
        results["counts"].append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
