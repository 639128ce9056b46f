"""The job and the column function on a Spark Connect session (no SparkContext, no RDDs)."""

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from clip_nsfw_spark.tools.sample import write_parquet_sample
from conftest import ROOT, needs_models

import pyspark

# The pyspark 3.5 wheel has no Spark Connect server (spark-connect_2.12 comes from Maven, which this machine
# cannot reach); on 3.5 the client works against a server started with --packages. .ci/run runs this file
# on 4.0 and the newest 4.x.
pytestmark = [needs_models, pytest.mark.skipif(
    pyspark.__version__.startswith("3."),
    reason=f"!!! pyspark {pyspark.__version__} ships no Spark Connect server jar: Connect is tested on 4.x only !!!")]

SCRIPT = r"""
import json, sys
import numpy as np
from pyspark.sql import SparkSession
spark = (SparkSession.builder.remote("local[2]")
         .config("spark.connect.grpc.binding.address", "127.0.0.1")
         .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
         .getOrCreate())
assert type(spark).__module__.startswith("pyspark.sql.connect"), type(spark)
from clip_nsfw_spark.driver.config import JobConfig
from clip_nsfw_spark.driver.job import run_job
from clip_nsfw_spark.spark.dataframe import nsfw_score
from clip_nsfw_spark.spark.runner import spark_runner
report = run_job(JobConfig(input=sys.argv[1], output=sys.argv[2], rows_per_task=500), runner=spark_runner(spark))
frame = spark.createDataFrame([(i, [float(v) for v in row]) for i, row in enumerate(np.load(sys.argv[3]))],
                              "id long, embedding array<float>")
scores = [r.s for r in frame.select("id", nsfw_score("embedding").alias("s")).orderBy("id").collect()]
print(json.dumps({"rows": report["rows"], "scores": scores}))
spark.stop()
"""


def test_job_and_column_function_on_spark_connect(tmp_path, scorers):
    import numpy as np

    source = tmp_path / "in"
    write_parquet_sample(str(source), rows=1500, files=2, row_group_rows=250)
    x = (np.random.default_rng(9).normal(size=(20, 768)) / 27.7).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    env = dict(os.environ, SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable)
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(source), str(tmp_path / "out"), str(tmp_path / "x.npy")],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["rows"]["read"] == 1500 and answer["rows"]["written"] == {"annotated": 1500}
    assert pq.read_table(str(tmp_path / "out")).num_rows == 1500
    assert np.max(np.abs(np.array(answer["scores"]) - scorers["vit-l-14"](x))) <= 1e-6
