"""How the job's tasks reach Spark's Python workers, by way: seconds and JVM CPU of a trivial job.

    python bench/plumbing.py [--parts 4] [--cores 2] [--json bench/results/plumbing.json]

Each way runs in a fresh interpreter with a fresh ``local[cores]`` session (as a command-line run has),
warmed by one trivial SQL job, then runs ``--parts`` parts of no-op tasks twice: the first run starts
PySpark's daemon and Python workers, the second reuses them. Ways: ``rdd`` (spark/runner.map_parts on
classic Spark: ``parallelize(parts, len(parts)).mapPartitions``) and ``dataframe`` (what map_parts does on
Spark Connect, and what the job did on every Spark before issue #27: ``task_frame``'s broadcast join to
``spark.range`` through ``mapInArrow``). Printed: wall seconds and the JVM's CPU seconds (/proc) per run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _jvm_cpu_seconds() -> float:
    """CPU seconds of this process's JVM child (local mode: the driver and executor JVM)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(stat[1]) == os.getpid() and "java" in (entry / "comm").read_text():
                    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
            except (OSError, ValueError, IndexError):
                continue
    return float("nan")


def one_way(way: str, parts_count: int, cores: int) -> list[dict]:
    from clip_nsfw_spark.spark.runner import PARTITION_RESULT, map_parts, parts_in, spark_session, task_frame

    parts = [[("task", i)] for i in range(parts_count)]

    def no_op(parts_here):
        for _ in parts_here:
            yield b"done"

    def arrow(batches):
        import pyarrow as pa

        for data in no_op(parts_in(batches)):
            yield pa.RecordBatch.from_pydict({"result": [data]}, schema=pa.schema([("result", pa.binary())]))

    runs = []
    with spark_session(f"local[{cores}]", conf={"spark.ui.enabled": "false"}) as spark:
        spark.range(1).collect()
        for label in ("first (starts the Python workers)", "second (workers reused)"):
            jvm, started = _jvm_cpu_seconds(), time.perf_counter()
            if way == "rdd":
                got = map_parts(spark, parts, no_op)
            else:
                got = [row.result for row in task_frame(spark, parts).mapInArrow(arrow, PARTITION_RESULT).collect()]
            assert got == [b"done"] * parts_count
            runs.append({"run": label, "seconds": round(time.perf_counter() - started, 3),
                         "jvm_cpu_seconds": round(_jvm_cpu_seconds() - jvm, 2)})
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", type=int, default=4)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--way", choices=("rdd", "dataframe"), help="(internal) run one way in this process")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    if args.way:
        print(json.dumps(one_way(args.way, args.parts, args.cores)))
        return 0
    from bench import _cpu_model  # noqa: E402  (bench/ on sys.path: this script's folder)

    results = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "cpu": _cpu_model(), "parts": args.parts,
               "cores": args.cores, "ways": {}}
    for way in ("dataframe", "rdd"):
        done = subprocess.run([sys.executable, __file__, "--way", way, "--parts", str(args.parts), "--cores",
                               str(args.cores)], capture_output=True, text=True, check=True)
        results["ways"][way] = json.loads(done.stdout.strip().splitlines()[-1])
        for run in results["ways"][way]:
            print(f"{way:10s} {run['run']:36s} {run['seconds']:7.2f} s   JVM CPU {run['jvm_cpu_seconds']:6.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
