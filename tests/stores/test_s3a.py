"""What a Spark user does next with an output on S3: read it with Spark's own s3a:// client (hadoop-aws).

The job writes to the tests' real S3 server (SeaweedFS on 127.0.0.1); a fresh Spark (its own JVM, started
with hadoop-aws 3.5.0 and the AWS SDK modules s3a needs on spark.jars: tests/s3a/pom.xml) reads the output
through ``s3a://`` against the same server. Counts, unsafe counts and the embeddings equal the job's report
and files. Skipped with the reason where the jars are missing; required in CI (CLIP_NSFW_REQUIRE_HDFS=1,
which .ci/run sets for every test that needs Maven's jars).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from clip_nsfw_spark.driver.config import JobConfig
from clip_nsfw_spark.driver.job import run_job
from clip_nsfw_spark.tools.sample import write_parquet_sample
from conftest import ROOT, needs_models
from s3server import ACCESS_KEY, SECRET_KEY

pytestmark = pytest.mark.slow  # a fresh Spark with hadoop-aws (~1.5 min)

JARS = os.environ.get("CLIP_NSFW_S3A_JARS", str(ROOT / ".cache" / "s3a-jars"))

READER = r"""
import glob, json, sys
from pyspark.sql import SparkSession, functions as F
jars, endpoint, key, secret, url = sys.argv[1:6]
spark = (SparkSession.builder.master("local[1]").config("spark.jars", ",".join(sorted(glob.glob(jars + "/*.jar"))))
         .config("spark.ui.enabled", "false")
         .config("spark.hadoop.fs.s3a.endpoint", endpoint).config("spark.hadoop.fs.s3a.path.style.access", "true")
         .config("spark.hadoop.fs.s3a.endpoint.region", "us-east-1")
         .config("spark.hadoop.fs.s3a.connection.ssl.enabled", "false")
         .config("spark.hadoop.fs.s3a.access.key", key).config("spark.hadoop.fs.s3a.secret.key", secret).getOrCreate())
frame = spark.read.parquet(url)
first = frame.orderBy("key").first()
print("RESULT " + json.dumps({"rows": frame.count(), "unsafe": frame.filter(F.col("punsafe") >= 0.5).count(),
                              "first_key": first["key"], "first_embedding": [float(v) for v in first["embedding"]]}))
spark.stop()
"""


def _jars_or_skip() -> str:
    if any(name.startswith("hadoop-aws-") for name in (os.listdir(JARS) if os.path.isdir(JARS) else ())):
        return JARS
    why = (f"no hadoop-aws jars in {JARS}: run mvn -q -B -f tests/s3a/pom.xml dependency:copy-dependencies "
           f"-DoutputDirectory={JARS}")
    if os.environ.get("CLIP_NSFW_REQUIRE_HDFS") == "1":
        pytest.fail(f"s3a is required here (CLIP_NSFW_REQUIRE_HDFS=1): {why}")
    pytest.skip(why)


@needs_models
def test_spark_reads_the_jobs_s3_output_through_s3a(s3_server, tmp_path):
    jars = _jars_or_skip()
    import pyspark

    bundled = {n.split("-")[-1][:-4] for n in os.listdir(os.path.join(os.path.dirname(pyspark.__file__), "jars"))
               if n.startswith("hadoop-client-api-")}
    aws = {n.split("-")[-1][:-4] for n in os.listdir(jars) if n.startswith("hadoop-aws-")}
    assert bundled == aws, f"pyspark bundles Hadoop {bundled}, tests/s3a/pom.xml pins hadoop-aws {aws}: make them match"
    fs = s3_server.filesystem()
    fs.mkdir("s3a-data")
    options = s3_server.storage_options()
    write_parquet_sample("s3://s3a-data/in", rows=1200, files=3, storage_options=options)
    report = run_job(JobConfig(input="s3://s3a-data/in", output="s3://s3a-data/out", storage_options=options,
                               embedding_type="float32"))
    done = subprocess.run([sys.executable, "-c", READER, jars, s3_server.endpoint, ACCESS_KEY, SECRET_KEY,
                           "s3a://s3a-data/out"], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYSPARK_PYTHON=sys.executable))
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    result = json.loads(lines[0][len("RESULT "):])
    assert result["rows"] == report["rows"]["read"] == 1200
    assert result["unsafe"] == report["rows"]["unsafe"]
    tables = [pq.read_table(fs.open(p, "rb")) for p in sorted(fs.glob("s3a-data/out/*.parquet"))]
    keys = [k for t in tables for k in t.column("key").to_pylist()]
    row = min(range(len(keys)), key=keys.__getitem__)
    embeddings = [e for t in tables for e in t.column("embedding").to_pylist()]
    assert result["first_key"] == keys[row]
    np.testing.assert_array_equal(np.array(result["first_embedding"], np.float32), np.array(embeddings[row], np.float32))
