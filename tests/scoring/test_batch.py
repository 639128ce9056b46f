"""batch.py: ``score_batch`` routes each row to ok / unsafe / rejected with its reason, for every head and column.

The scorers here are tiny deterministic stand-ins (a row's score is one of its own values), so each row's
fate is chosen by the test data: this is a test of the batch logic, not of a model (the real models are
tested in models/test_cache.py, models/test_convert.py and the job tests).
"""

from collections import Counter

import numpy as np
import pyarrow as pa

from clip_nsfw_spark.scoring.batch import score_batch
from clip_nsfw_spark.contract import ScoreOutput, ScoreTarget
from clip_nsfw_spark.scoring.outcomes import Reason

NAN = float("nan")


class Pick:
    """score = value ``index`` of each row (float32), except that the values in ``broken`` score as given there
    (a head returning NaN or Inf). Records the shape of every matrix it is given."""

    def __init__(self, dim: int, index: int = 0, broken: dict[float, float] | None = None):
        self.dim, self.index, self.broken, self.calls = dim, index, broken or {}, []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.calls.append(x.shape)
        values = np.asarray(x[:, self.index], dtype=np.float32)
        for value, score in self.broken.items():
            values = np.where(values == np.float32(value), np.float32(score), values)
        return values


def column(rows):
    return pa.array(rows, pa.list_(pa.float32()))


def one_head(name="p", threshold=0.5, embedding="emb"):
    return (ScoreTarget(embedding, (ScoreOutput(name, 0, threshold),)),)


def test_each_kind_of_bad_row_is_rejected_with_its_reason_and_never_unsafe():
    rows = [[0.2, 0, 0, 0], [0.5, 0, 0, 0], None, [0.9, 0.1, 0.1], [NAN, 0, 0, 0], [0.9, 0, 0, 0],
            [0.7, None, 0, 0]]
    table = pa.table({"key": list("abcdefg"), "emb": column(rows)})
    scorer, timings = Pick(4), Counter()
    out = score_batch(table, None, one_head(), [scorer], timings)
    assert out.ok.tolist() == [True, True, False, False, False, True, False]
    assert out.unsafe.tolist() == [False, True, False, False, False, True, False]  # 0.5 == threshold: unsafe
    assert out.reasons == [None, None, "null embedding", "wrong length: expected 4, found 3",
                           "NaN or Inf in embedding", None, "null value in embedding"]
    assert out.problems == [Reason.NULL_EMBEDDING, Reason.WRONG_LENGTH, Reason.NON_FINITE, Reason.NULL_VALUE]
    assert out.table.column_names == ["key", "emb", "p"] and out.table.schema.field("p").type == pa.float32()
    f32 = [float(np.float32(v)) for v in (0.2, 0.5, 0.9)]
    assert out.table.column("p").to_pylist() == [f32[0], f32[1], None, None, None, f32[2], None]
    assert out.scores["p"].dtype == np.float32 and out.scores["p"].tolist() == np.float32([0.2, 0.5, 0.9]).tolist()
    assert out.flagged == {"p": 2}
    assert scorer.calls == [(3, 4)]  # only the scorable rows reach the head, once
    assert "score" in timings


def test_threshold_equality_is_unsafe_and_just_below_is_not():
    below = float(np.nextafter(np.float32(0.25), np.float32(0)))
    table = pa.table({"emb": column([[0.25, 0], [below, 0]])})
    out = score_batch(table, None, one_head(threshold=0.25), [Pick(2)], Counter())
    assert out.unsafe.tolist() == [True, False] and out.flagged == {"p": 1}


def test_a_head_that_returns_nan_or_inf_rejects_the_row():
    table = pa.table({"emb": column([[0.3, 0.0], [0.7, 0.0], [0.9, 0.0]])})
    for bad, score in ((0.7, NAN), (0.9, float("inf")), (0.3, -float("inf"))):
        out = score_batch(table, None, one_head(), [Pick(2, broken={bad: score})], Counter())
        row = [0.3, 0.7, 0.9].index(bad)
        assert out.ok.tolist() == [i != row for i in range(3)]
        assert out.reasons[row] == "score not finite" and out.problems == [Reason.SCORE_NOT_FINITE]
        assert out.table.column("p").to_pylist()[row] is None  # never a NaN/Inf in the output: a null + reason
        assert not out.unsafe[row] and out.flagged == {"p": 2 - (bad > 0.5)}  # Inf is not "over": it is rejected


def test_two_heads_with_their_own_thresholds():
    table = pa.table({"emb": column([[0.4, 0.7], [0.4, 0.8], [0.6, 0.1], [0.49, 0.79]])})
    targets = (ScoreTarget("emb", (ScoreOutput("p0", 0, 0.5), ScoreOutput("p1", 1, 0.8))),)
    heads = [Pick(2, 0), Pick(2, 1)]
    out = score_batch(table, None, targets, heads, Counter())
    assert out.unsafe.tolist() == [False, True, True, False]  # unsafe if any head is at or over its threshold
    assert out.ok.all() and out.reasons == [None] * 4 and out.problems == []
    assert out.flagged == {"p0": 1, "p1": 1}
    assert out.table.column_names == ["emb", "p0", "p1"]
    assert out.table.column("p1").to_pylist() == np.float32([0.7, 0.8, 0.1, 0.79]).tolist()
    assert [h.calls for h in heads] == [[(4, 2)], [(4, 2)]]


def test_a_row_one_head_cannot_score_is_rejected_even_if_another_head_flags_it():
    table = pa.table({"emb": column([[0.9, 0.3], [0.9, 0.2]])})
    targets = (ScoreTarget("emb", (ScoreOutput("p0", 0, 0.5), ScoreOutput("p1", 1, 0.5))),)
    out = score_batch(table, None, targets, [Pick(2, 0), Pick(2, 1, broken={0.3: NAN})], Counter())
    assert out.ok.tolist() == [False, True] and out.unsafe.tolist() == [False, True]
    assert out.reasons == ["score not finite", None] and out.problems == [Reason.SCORE_NOT_FINITE]


def test_two_embedding_columns_name_the_column_in_each_reason():
    img = column([[0.1, 0], [0.9, 0], None, [0.2, 0], None])
    txt = column([[0.1, 0], None, [0.9, 0], [0.2], [0.1]])
    table = pa.table({"img": img, "txt": txt})
    targets = (ScoreTarget("img", (ScoreOutput("p_img", 0, 0.5),)), ScoreTarget("txt", (ScoreOutput("p_txt", 0, 0.5),)))
    out = score_batch(table, None, targets, [Pick(2)], Counter())
    assert out.reasons == [None, "txt: null embedding", "img: null embedding", "txt: wrong length: expected 2, found 1",
                           "img: null embedding; txt: wrong length: expected 2, found 1"]
    assert out.ok.tolist() == [True, False, False, False, False]
    # Row 1 is over the threshold on img and row 2 on txt, but each is rejected on the other column: not unsafe.
    assert out.unsafe.tolist() == [False] * 5
    # A row counts once, by its first problem (the last row: img's null embedding, not txt's wrong length).
    assert Counter(out.problems) == {Reason.NULL_EMBEDDING: 3, Reason.WRONG_LENGTH: 1}
    f32 = [float(np.float32(v)) for v in (0.1, 0.9, 0.2)]
    # A column's scores are kept where that column could be scored; the row's fate is in ok/unsafe/reasons.
    assert out.table.column("p_img").to_pylist() == [f32[0], f32[1], None, f32[2], None]
    assert out.table.column("p_txt").to_pylist() == [f32[0], None, f32[1], None, None]


def test_flagged_counts_only_rows_that_are_unsafe():
    img = column([[0.9, 0], [0.9, 0], [0.1, 0]])
    txt = column([None, [0.9, 0], [0.1, 0]])
    targets = (ScoreTarget("img", (ScoreOutput("p_img", 0, 0.5),)), ScoreTarget("txt", (ScoreOutput("p_txt", 0, 0.5),)))
    out = score_batch(pa.table({"img": img, "txt": txt}), None, targets, [Pick(2)], Counter())
    assert out.unsafe.tolist() == [False, True, False]
    assert out.flagged == {"p_img": 1, "p_txt": 1}  # row 0 is rejected: in no unsafe count

def test_npy_rows_are_checked_and_scored_in_the_laion_layout():
    npy = np.array([[0.1, 0], [NAN, 0], [0.8, 0], [1e39, 0]], dtype=np.float64)
    table = pa.table({"key": ["a", "b", "c", "d"]})
    scorer = Pick(2)
    out = score_batch(table, npy, one_head(embedding="embedding"), [scorer], Counter())
    assert out.reasons == [None, "NaN or Inf in embedding", None, "value out of float32 range"]
    assert out.problems == [Reason.NON_FINITE, Reason.OVERFLOW]
    assert out.unsafe.tolist() == [False, False, True, False] and out.flagged == {"p": 1}
    assert scorer.calls == [(2, 2)] and out.table.column_names == ["key", "p"]


def test_an_existing_score_column_is_replaced_in_place():
    table = pa.table({"p": pa.array([7.0, 7.0], pa.float64()), "emb": column([[0.1, 0], [0.6, 0]])})
    out = score_batch(table, None, one_head(), [Pick(2)], Counter())
    assert out.table.column_names == ["p", "emb"] and out.table.schema.field("p").type == pa.float32()
    assert out.table.column("p").to_pylist() == np.float32([0.1, 0.6]).tolist()


def test_an_empty_batch():
    table = pa.table({"emb": column([])})
    out = score_batch(table, None, one_head(), [Pick(2)], Counter())
    assert out.ok.shape == out.unsafe.shape == (0,) and out.reasons == [] and out.problems == []
    assert out.table.column_names == ["emb", "p"] and out.flagged == {"p": 0} and out.scores["p"].size == 0



def test_the_threshold_is_compared_exactly_not_rounded_to_float32():
    """A float32 score just below a float64 threshold that rounds to it is safe (Spark and DuckDB compare in
    double; numpy compared in float32 after rounding the threshold: a hostile user's finding)."""
    score = np.float32(0.22037065)
    just_above = float(np.nextafter(float(score), 1.0))  # > score, yet float32(just_above) == score
    assert np.float32(just_above) == score
    table = pa.table({"emb": column([[float(score), 0, 0, 0]])})
    for threshold, unsafe in ((just_above, False), (float(score), True), (float(np.nextafter(float(score), 0.0)), True)):
        out = score_batch(table, None, one_head(threshold=threshold), [Pick(4)], Counter())
        assert out.unsafe.tolist() == [unsafe] and out.flagged == {"p": int(unsafe)}, threshold
