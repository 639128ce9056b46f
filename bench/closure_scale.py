"""Spark task overhead vs the number of tasks: the task list as data (the job's runner) vs in the closure.

PySpark unpickles a task's closure for every task; a runner that put the whole task list in the closure
made every task pay for the whole list. This runs ``--tasks`` no-op tasks (each returns at once) through
``spark_runner`` and through a copy of the old closure runner, in one local session, and prints the time
per task of each. The job's tasks carry a realistic ~300-byte description each.

    python bench/closure_scale.py --tasks 2000 20000
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from clip_nsfw_spark.contract import Task
from clip_nsfw_spark.spark.runner import spark_runner, spark_session


class NoOpWorker:
    def __call__(self, task: Task) -> dict:
        return {"task_id": task.task_id}


def closure_runner(spark):
    """The old runner: the task list inside the mapInArrow function's closure."""
    def run(tasks, worker):
        import pyarrow as pa

        payload = [task.to_dict() for task in tasks]

        def process_partition(batches):
            for batch in batches:
                for index in batch.column(0).to_pylist():
                    result = worker(Task.from_dict(payload[index]))
                    yield pa.RecordBatch.from_pydict({"stats": [json.dumps(result)]})

        frame = spark.range(0, len(payload), 1, numPartitions=len(payload)).mapInArrow(process_partition,
                                                                                        "stats string")
        return [json.loads(row.stats) for row in frame.collect()]
    return run


def tasks(count: int) -> list[Task]:
    return [Task("parquet", f"bucket/laion2B-en/embeddings/part-{i:06d}-{'f' * 40}.parquet",
                 f"part-{i:06d}.parquet", (0, 1, 2, 3), rows=1_000_000,
                 source=f"size=123456789:etag=\"{'a' * 32}\":rows=1000000:footer={'b' * 40}") for i in range(count)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[1000, 4000])
    parser.add_argument("--master", default="local[2]")
    args = parser.parse_args(argv)
    with spark_session(args.master, conf={"spark.ui.enabled": "false"}) as spark:
        spark_runner(spark)(tasks(4), NoOpWorker())  # warm up the session and the Python workers
        for count in args.tasks:
            listed = tasks(count)
            row = {"tasks": count}
            for name, runner in (("as_data", spark_runner(spark)), ("in_closure", closure_runner(spark))):
                started = time.perf_counter()
                results = runner(listed, NoOpWorker())
                assert [r["task_id"] for r in results] == [t.task_id for t in listed]
                row[f"{name}_ms_per_task"] = round((time.perf_counter() - started) / count * 1000, 2)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
