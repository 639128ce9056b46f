"""Score one batch with every head. Pure: Arrow/numpy in, Arrow/numpy out, no IO.

Each embedding column is decoded once (embeddings.decode), whatever the number of heads; a row that any
head cannot score on any column is rejected with its reason, never taken as safe; a row is unsafe when
any of its scores is at or over its head's threshold.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter

import numpy as np
import pyarrow as pa

from clip_nsfw_spark.contract import ScoreTarget
from clip_nsfw_spark.scoring.embeddings import decode, row_problems
from clip_nsfw_spark.scoring.outcomes import Problem, Reason


@dataclasses.dataclass
class ScoredBatch:
    """One batch after scoring: the input columns plus one score column per (embedding column, head).

    ``ok`` (n,) marks rows that every head scored on every embedding column; ``unsafe`` (n,) scored rows
    with any score at or over its head's threshold; ``reasons`` (n,) None or the reason-column text of a
    row that was not scored; ``problems`` the ``Reason`` of each unscored row (its first problem);
    ``scores`` the valid scores of each score column (for the histograms); ``flagged`` per score column,
    how many unsafe rows are at or over its threshold (a row rejected on another column or head is not).
    """

    table: pa.Table
    ok: np.ndarray
    unsafe: np.ndarray
    reasons: list
    problems: list[Reason]
    scores: dict[str, np.ndarray]
    flagged: dict[str, int]


def score_batch(table: pa.Table, npy: np.ndarray | None, targets: tuple[ScoreTarget, ...], scorers,
                timings: Counter) -> ScoredBatch:
    """Score a batch's embedding columns (or its npy rows, float (n, d), in the LAION layout) with every head.

    ``scorers[i]`` is head ``i``'s scorer (``ScoreOutput.head``); the heads of one target share a width.
    Seconds spent scoring are added to ``timings["score"]``.
    """
    n = table.num_rows
    reasons: list = [None] * n
    first_problem: dict[int, Reason] = {}
    unsafe = np.zeros(n, dtype=bool)
    ok_all = np.ones(n, dtype=bool)
    valid_scores, flagged = {}, {}
    several = len(targets) > 1
    for target in targets:
        column = target.embedding_column
        if npy is not None:
            problems = row_problems(npy)
            ok = np.ones(n, dtype=bool)
            ok[list(problems)] = False
            matrix = npy if ok.all() else npy[ok]
            col_reasons = [problems.get(i) for i in range(n)]
        else:
            matrix, ok, col_reasons = decode(table.column(column), scorers[target.outputs[0].head].dim)
        column_ok = ok.copy()
        for output in target.outputs:
            t0 = time.perf_counter()
            values = np.full(n, np.nan, dtype=np.float32)
            values[ok] = scorers[output.head](matrix)
            timings["score"] += time.perf_counter() - t0
            scored = ok & np.isfinite(values)
            for i in np.flatnonzero(ok & ~scored):
                col_reasons[i] = Problem(Reason.SCORE_NOT_FINITE)
            table = set_column(table, output.score_column, pa.array(values, mask=~scored))
            # compared as the numbers they are (a float32 score against the float64 threshold), as Spark, DuckDB
            # and the docs do: numpy would round the threshold to float32 first, making a score just below it unsafe
            over = scored & (values.astype(np.float64) >= float(output.threshold))
            unsafe |= over
            column_ok &= scored
            valid_scores[output.score_column] = values[scored]
            flagged[output.score_column] = over
        ok_all &= column_ok
        for i in np.flatnonzero(~column_ok):
            problem = col_reasons[i]
            label = f"{column}: {problem}" if several else str(problem)
            reasons[i] = label if reasons[i] is None else f"{reasons[i]}; {label}"
            first_problem.setdefault(int(i), problem.reason)
    # A row flagged by one head but rejected on another column or head is rejected, not unsafe: it is in no
    # unsafe count either.
    flagged = {name: int((over & ok_all).sum()) for name, over in flagged.items()}
    return ScoredBatch(table, ok_all, unsafe & ok_all, reasons, list(first_problem.values()), valid_scores, flagged)


def set_column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    """``table`` with column ``name`` set to ``values``: replaced in place if present, else appended."""
    index = table.schema.get_field_index(name)
    return table.append_column(name, values) if index < 0 else table.set_column(index, name, values)
