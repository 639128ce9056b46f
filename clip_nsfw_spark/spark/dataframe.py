"""The DataFrame / SQL API: NSFW scores as a Spark column (pyspark imported inside the functions)."""

from __future__ import annotations


def _score_arrow(array, head):
    """Arrow list array (n,) → float32 Arrow array (n,), null where the row cannot be scored.
    ``head`` is the contract.Head made once on the driver (heads.resolve_head)."""
    import numpy as np
    import pyarrow as pa

    from clip_nsfw_spark.scoring.embeddings import decode
    from clip_nsfw_spark.scoring.scorer import scorer_for

    scorer = scorer_for(head)
    matrix, ok, _ = decode(array, scorer.dim)
    values = np.full(len(ok), np.nan, dtype=np.float32)
    values[ok] = scorer(matrix)
    return pa.array(values, mask=~np.isfinite(values))  # null: not scorable, as the job's rejected rows


def has_arrow_udf() -> bool:
    """The one Spark-version fact this package depends on: ``pyspark.sql.functions.arrow_udf`` (Arrow
    arrays in and out) exists from Spark 4.1; Spark 3.5 and 4.0 get a pandas UDF on the same Arrow path.
    Everything else the job uses (RDDs, ``spark.range`` + ``mapInArrow``, Spark Connect) exists from 3.5."""
    try:
        from pyspark.sql.functions import arrow_udf  # noqa: F401
    except ImportError:
        return False
    return True


def _scoring_udf(model: str):
    """A vectorised UDF ``array<float|double> → float`` with the same scores and nulls on every Spark."""
    from pyspark.sql.types import FloatType

    from clip_nsfw_spark.models.heads import resolve_head

    head = resolve_head(model)
    if has_arrow_udf():
        from pyspark.sql.functions import arrow_udf

        @arrow_udf(FloatType())
        def score(array):
            return _score_arrow(array, head)

        return score

    import pandas as pd
    from pyspark.sql.functions import pandas_udf

    def score_pandas(series):
        """pandas Series of arrays (n,) → pandas Series of float32 (n,), NaN (null to Spark) if unscorable."""
        import pyarrow as pa

        return _score_arrow(pa.array(series, from_pandas=True), head).to_pandas()

    # Real classes: PySpark reads the type hints, and this module's annotations are strings.
    score_pandas.__annotations__ = {"series": pd.Series, "return": pd.Series}
    return pandas_udf(score_pandas, FloatType())


def nsfw_score(column, model: str = "vit-l-14"):
    """A Column with the NSFW score (float, null for null/wrong-length/NaN embeddings) of ``column``.

    ``column`` is a Column or column name of ``array<float>``/``array<double>`` CLIP embeddings.
    Scores equal the job's and ``load_scorer(model)``'s. Example:
    ``df.withColumn("punsafe", nsfw_score("embedding"))``.
    """
    return _scoring_udf(model)(column)


def with_nsfw_scores(df, column: str = "embedding", model: str = "vit-l-14", score_column: str = "punsafe",
                     threshold: float | None = None, keep: str = "safe"):
    """``df`` plus a score column; with ``threshold``, only the rows on the ``keep`` side of it.

    Unsafe ⇔ score ≥ threshold. Rows whose score is null (unscorable) are dropped by the filter: use it
    without ``threshold`` to see them. Composes with ``df.transform(with_nsfw_scores, ...)``.
    """
    from pyspark.sql import functions as F

    scored = df.withColumn(score_column, nsfw_score(column, model))
    if threshold is None:
        return scored
    if keep not in ("safe", "unsafe"):
        raise ValueError(f"keep must be 'safe' or 'unsafe', found {keep!r}")
    condition = F.col(score_column) < threshold if keep == "safe" else F.col(score_column) >= threshold
    return scored.filter(condition)


def register_nsfw_udf(spark, name: str = "nsfw_score", model: str = "vit-l-14"):
    """Register the scorer as a SQL function: ``SELECT nsfw_score(embedding) FROM t``."""
    return spark.udf.register(name, _scoring_udf(model))
