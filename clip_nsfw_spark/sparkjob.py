"""Spark glue, and the only module that imports pyspark.

The job's work is described as a DataFrame of task numbers (``spark.range`` with one partition per task)
processed with ``mapInArrow``: it runs the same on classic Spark and on Spark Connect (no SparkContext,
no RDDs, no broadcast). The closure carries the task list, the config and the portable weights (~2 MB);
Spark ships it once per executor, and each Python worker builds its scorer once (worker.scorer_for).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys

log = logging.getLogger(__name__)


@contextlib.contextmanager
def spark_session(master: str | None = None, app_name: str = "clip-nsfw-spark"):
    """Yield the active SparkSession, or create one and stop it afterwards (and only then).

    A created local session binds the driver (and its UI) to 127.0.0.1 and runs Python workers with this
    interpreter unless PYSPARK_PYTHON says otherwise.
    """
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        yield active
        return
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(app_name)
    if master:
        builder = builder.master(master)
    if (master or "local").startswith("local"):
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        builder = (builder.config("spark.driver.host", "127.0.0.1")
                   .config("spark.driver.bindAddress", "127.0.0.1")
                   .config("spark.ui.showConsoleProgress", "false"))
    builder = builder.config("spark.python.worker.reuse", "true")
    spark = builder.getOrCreate()
    try:
        yield spark
    finally:
        spark.stop()


def spark_runner(spark):
    """A runner for ``job.run_job``: one Spark task per job task, results collected on the driver."""

    def run(tasks, task_config, model):
        if not tasks:
            return []
        import pyarrow as pa

        payload = [task.to_dict() for task in tasks]

        def process_partition(batches):
            from clip_nsfw_spark.reader import Task
            from clip_nsfw_spark.worker import process_task

            for batch in batches:
                for index in batch.column(0).to_pylist():
                    stats = process_task(Task.from_dict(payload[index]), task_config, model)
                    yield pa.RecordBatch.from_pydict({"stats": [json.dumps(stats)]})

        frame = spark.range(0, len(payload), 1, numPartitions=len(payload)).mapInArrow(process_partition, "stats string")
        return [json.loads(row.stats) for row in frame.collect()]

    return run
