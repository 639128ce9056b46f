"""Spark glue: the only sub-package that imports pyspark.

Public DataFrame API: ``from clip_nsfw_spark.spark import with_nsfw_scores, nsfw_score,
register_nsfw_udf, spark_session``."""

from clip_nsfw_spark.spark.dataframe import has_arrow_udf, nsfw_score, register_nsfw_udf, with_nsfw_scores
from clip_nsfw_spark.spark.runner import spark_session

__all__ = ["has_arrow_udf", "nsfw_score", "register_nsfw_udf", "spark_session", "with_nsfw_scores"]
