"""The DataFrame/SQL API gives the same scores as the job and the scorer."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from clip_nsfw_spark.driver.config import JobConfig
from clip_nsfw_spark.driver.job import run_job
from clip_nsfw_spark.tools.sample import embeddings, metadata
from clip_nsfw_spark.spark.dataframe import nsfw_score, register_nsfw_udf, with_nsfw_scores
from conftest import needs_models

pytestmark = needs_models


@pytest.fixture
def float32_dataset(tmp_path):
    """float32 list embeddings (Spark cannot read float16 parquet), with one null and one short row."""
    import pyarrow as pa

    x = embeddings(1000, 768, 5, np.float32)
    rows = [r.tolist() for r in x]
    rows[3], rows[7] = None, rows[7][:10]
    table = pa.table(metadata(1000, 0) | {"embedding": pa.array(rows, pa.list_(pa.float32()))})
    (tmp_path / "in").mkdir()
    pq.write_table(table, tmp_path / "in" / "a.parquet")
    return tmp_path / "in", x


def test_column_function_transform_and_sql_match_the_job(spark, float32_dataset, tmp_path, scorers):
    source, x = float32_dataset
    run_job(JobConfig(input=str(source), output=str(tmp_path / "job")))
    job_scores = pq.read_table(tmp_path / "job" / "a.parquet").column("punsafe").to_pylist()

    df = spark.read.parquet(str(source))
    column = [r.punsafe for r in df.withColumn("punsafe", nsfw_score("embedding")).orderBy("key").collect()]
    assert column[3] is None and column[7] is None
    assert job_scores[3] is None and job_scores[7] is None
    valid = [i for i in range(1000) if i not in (3, 7)]
    expected = scorers["vit-l-14"](x[valid])
    assert np.max(np.abs(np.array([column[i] for i in valid]) - expected)) <= 1e-6
    assert np.max(np.abs(np.array([job_scores[i] for i in valid]) - expected)) <= 1e-6

    register_nsfw_udf(spark, "nsfw_score")
    df.createOrReplaceTempView("emb")
    sql = [r.s for r in spark.sql("SELECT key, nsfw_score(embedding) AS s FROM emb ORDER BY key").collect()]
    assert sql == column

    threshold = float(np.quantile(expected, 0.8))
    safe = df.transform(with_nsfw_scores, threshold=threshold).count()
    unsafe = df.transform(with_nsfw_scores, threshold=threshold, keep="unsafe").count()
    assert safe == int((expected < threshold).sum()) and unsafe == int((expected >= threshold).sum())
