"""embeddings.py: arrow embedding columns → (matrix, ok, reasons), and the reason for every row left out.

Pure pyarrow/numpy, no Spark, no model. The reasons are asserted as the literal strings the job writes into
its reason column, row by row.
"""

import numpy as np
import pyarrow as pa
import pytest

from clip_nsfw_spark.scoring.embeddings import decode, finite_rows, is_embedding_type, row_problems
from clip_nsfw_spark.scoring.outcomes import Reason

DIM = 4
F32_MAX = float(np.finfo(np.float32).max)


def rows(n: int, dtype=np.float32, dim: int = DIM, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(dtype)


def as_list(x: np.ndarray, kind: str = "list", mask: pa.Array | None = None) -> pa.Array:
    """``x`` (n, d) as list / large_list / fixed_size_list of its own float type, built from flat values;
    ``mask`` (bool, True = null) makes rows null."""
    values = pa.array(x.reshape(-1))
    n, d = x.shape
    if kind == "fixed":
        return pa.FixedSizeListArray.from_arrays(values, d, mask=mask)
    offsets = np.arange(0, n * d + 1, d)
    if kind == "large":
        return pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), values, mask=mask)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values, mask=mask)


@pytest.mark.parametrize("kind", ["list", "large", "fixed"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_clean_columns_decode_to_the_same_values_in_their_own_dtype(kind, dtype):
    x = rows(5, dtype)
    matrix, ok, reasons = decode(as_list(x, kind), DIM)
    assert matrix.dtype == dtype and matrix.shape == (5, DIM)
    assert np.array_equal(matrix, x)
    assert ok.dtype == bool and ok.tolist() == [True] * 5
    assert reasons == [None] * 5


@pytest.mark.parametrize("kind", ["list", "large", "fixed"])
def test_null_rows_are_named_and_left_out_of_the_matrix(kind):
    x = rows(4)
    column = as_list(x, kind, mask=pa.array([False, True, False, True]))
    assert column.null_count == 2
    matrix, ok, reasons = decode(column, DIM)
    assert reasons == [None, "null embedding", None, "null embedding"]
    assert ok.tolist() == [True, False, True, False]
    assert np.array_equal(matrix, x[[0, 2]])


def test_wrong_lengths_say_expected_and_found_for_each_row():
    good = rows(3)
    column = pa.array([good[0].tolist(), good[1][:3].tolist(), [], None, good[2].tolist() + [1.0]],
                      pa.list_(pa.float32()))
    matrix, ok, reasons = decode(column, DIM)
    assert reasons == [None, "wrong length: expected 4, found 3", "wrong length: expected 4, found 0",
                       "null embedding",  # a null row is null, not "found 0"
                       "wrong length: expected 4, found 5"]
    assert ok.tolist() == [True, False, False, False, False]
    assert np.array_equal(matrix, good[:1])


def test_a_fixed_size_list_of_another_width_rejects_every_row_with_an_empty_matrix():
    matrix, ok, reasons = decode(as_list(rows(3, np.float16, dim=2), "fixed"), DIM)
    assert matrix.shape == (0, DIM) and matrix.dtype == np.float16
    assert not ok.any()
    assert reasons == ["wrong length: expected 4, found 2"] * 3


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_nan_and_inf_are_named_per_row(dtype):
    x = rows(5, dtype)
    x[1, 0], x[2, 3], x[3, 2] = np.nan, np.inf, -np.inf
    matrix, ok, reasons = decode(as_list(x), DIM)
    assert reasons == [None, "NaN or Inf in embedding", "NaN or Inf in embedding", "NaN or Inf in embedding", None]
    assert ok.tolist() == [True, False, False, False, True]
    assert np.array_equal(matrix, x[[0, 4]])


def test_float64_values_beyond_float32_are_out_of_range_not_nan():
    x = rows(5, np.float64)
    x[1, 0] = 1e39  # float32(1e39) is inf: the model would see Inf
    x[2, 1] = -1e39
    x[3, 2] = F32_MAX  # the largest float32 itself is fine
    x[4, 0], x[4, 1] = 1e39, np.nan  # both: NaN is named
    matrix, ok, reasons = decode(as_list(x, "large"), DIM)
    assert reasons == [None, "value out of float32 range", "value out of float32 range", None,
                       "NaN or Inf in embedding"]
    assert ok.tolist() == [True, False, False, True, False]
    assert np.array_equal(matrix, x[[0, 3]])


def test_huge_float16_and_float32_values_are_in_range():
    x16 = np.full((1, DIM), np.finfo(np.float16).max, np.float16)
    x32 = np.full((1, DIM), F32_MAX, np.float32)
    assert decode(as_list(x16, "fixed"), DIM)[2] == [None]
    assert decode(as_list(x32), DIM)[2] == [None]


@pytest.mark.parametrize("kind", ["list", "fixed"])
def test_a_null_value_inside_a_row_is_named_as_a_null_value(kind):
    values = pa.array([0.1, 0.2, 0.3, 0.4, 0.5, None, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2], pa.float32())
    if kind == "fixed":
        column = pa.FixedSizeListArray.from_arrays(values, DIM)
    else:
        column = pa.ListArray.from_arrays(pa.array([0, 4, 8, 12], pa.int32()), values)
    matrix, ok, reasons = decode(column, DIM)
    assert reasons == [None, "null value in embedding", None]  # not "NaN or Inf": the value is null
    assert ok.tolist() == [True, False, True]
    assert np.array_equal(matrix, np.array([[0.1, 0.2, 0.3, 0.4], [0.9, 1.0, 1.1, 1.2]], np.float32))


def test_every_problem_in_one_column_each_row_its_own_reason():
    good = rows(6)
    nan_row = good[3].copy()
    nan_row[0] = np.nan
    column = pa.array([good[0].tolist(), None, good[1][:2].tolist(), nan_row.tolist(),
                       [0.0, None, 0.0, 0.0], good[4].tolist(), good[5].tolist()], pa.list_(pa.float32()))
    matrix, ok, reasons = decode(column, DIM)
    assert reasons == [None, "null embedding", "wrong length: expected 4, found 2", "NaN or Inf in embedding",
                       "null value in embedding", None, None]
    assert ok.tolist() == [True, False, False, False, False, True, True]
    assert np.array_equal(matrix, good[[0, 4, 5]])  # the scorable rows, in order


def test_sliced_and_chunked_columns_decode_like_the_rows_they_hold():
    x = rows(10)
    x[7, 1] = np.nan
    column = as_list(x)
    matrix, ok, reasons = decode(column.slice(3, 5), DIM)  # rows 3..7: offsets must be honoured
    assert np.array_equal(matrix, x[3:7]) and reasons == [None] * 4 + ["NaN or Inf in embedding"]
    chunked = pa.chunked_array([column.slice(0, 4), column.slice(4, 6)])
    matrix, ok, reasons = decode(chunked, DIM)
    assert np.array_equal(matrix, x[[0, 1, 2, 3, 4, 5, 6, 8, 9]])
    assert reasons == [None] * 7 + ["NaN or Inf in embedding"] + [None] * 2


def test_an_empty_column_gives_an_empty_matrix():
    matrix, ok, reasons = decode(pa.array([], pa.list_(pa.float32())), DIM)
    assert matrix.shape == (0, DIM) and ok.shape == (0,) and reasons == []


def test_row_problems_on_plain_arrays():
    x = np.zeros((5, 3), np.float64)
    x[1, 2] = np.nan
    x[2, 0] = 4e38
    x[3, 1] = -np.inf
    assert row_problems(x) == {1: "NaN or Inf in embedding", 2: "value out of float32 range",
                               3: "NaN or Inf in embedding"}
    # A null value read as NaN is named as a null (the mask says which rows held one).
    assert row_problems(x, np.array([False, True, False, False, True])) == {
        1: "null value in embedding", 2: "value out of float32 range", 3: "NaN or Inf in embedding",
        4: "null value in embedding"}
    with np.errstate(over="ignore"):
        x32 = x.astype(np.float32)  # 4e38 becomes inf
    assert row_problems(x32) == {1: "NaN or Inf in embedding", 2: "NaN or Inf in embedding",
                                 3: "NaN or Inf in embedding"}
    assert row_problems(np.ones((2, 3), np.float16)) == {}


def test_finite_rows_reads_float16_bits():
    x = np.array([[0.0, -0.0], [65504.0, -65504.0], [np.inf, 1.0], [1.0, -np.inf], [np.nan, 0.0],
                  [6e-8, -6e-8]], np.float16)  # zeros, ±max, ±Inf, NaN, subnormals
    assert finite_rows(x).tolist() == [True, True, False, False, False, True]
    assert finite_rows(x.astype(np.float32)).tolist() == finite_rows(x).tolist()


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_finite_rows_agrees_with_numpy_on_every_kind_of_value_and_layout(dtype):
    # the one-pass bit test (kernels.finite_rows_of_bits) against numpy's isfinite: a NaN, ±Inf, ±max,
    # -0.0 and a subnormal, each alone in a row at the row's first, last or a middle position; strided,
    # Fortran-ordered, read-only, empty and zero-width inputs
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((64, 37)) * 0.05).astype(dtype)
    info = np.finfo(dtype)
    for row, (col, value) in enumerate([(0, np.nan), (36, np.inf), (18, -np.inf), (5, info.max), (0, -info.max),
                                        (3, -0.0), (7, info.tiny / 2)]):
        x[row * 3, col] = value
    expected = np.isfinite(x).all(axis=1)
    assert (~expected).sum() == 3
    assert finite_rows(x).tolist() == expected.tolist()
    assert finite_rows(x[::3]).tolist() == expected[::3].tolist()
    assert finite_rows(x[:, ::2]).tolist() == np.isfinite(x[:, ::2]).all(axis=1).tolist()  # strided columns
    assert finite_rows(np.asfortranarray(x)).tolist() == expected.tolist()
    frozen = x.copy()
    frozen.flags.writeable = False
    assert finite_rows(frozen).tolist() == expected.tolist()
    assert finite_rows(x[:0]).shape == (0,) and finite_rows(x[:, :0]).all()


def test_finite_rows_on_every_float16_bit_pattern():
    every = np.arange(1 << 16, dtype=np.uint16).view(np.float16).reshape(-1, 1)
    assert finite_rows(every).tolist() == np.isfinite(every[:, 0]).tolist()
    assert finite_rows(every.reshape(-1, 256)).tolist() == np.isfinite(every.reshape(-1, 256)).all(axis=1).tolist()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_finite_rows_sees_every_nan_payload_and_sign(dtype):
    bits_type, top = {np.float32: (np.uint32, 0x7F800000), np.float64: (np.uint64, 0x7FF0000000000000)}[dtype]
    rng = np.random.default_rng(3)
    mantissa = rng.integers(1, top >> 4, size=200, dtype=bits_type)  # non-zero: NaNs of every payload
    exponent = bits_type(top)  # (numpy scalars throughout: numpy 1.x refuses a Python int | uint64)
    sign = bits_type(1) << bits_type(np.dtype(bits_type).itemsize * 8 - 1)
    specials = np.concatenate([mantissa | exponent, mantissa | exponent | sign,
                               np.array([exponent, exponent | sign], bits_type)]).view(dtype)  # NaNs, ±Inf
    rows = np.ones((len(specials), 5), dtype)
    rows[np.arange(len(specials)), np.arange(len(specials)) % 5] = specials
    assert not finite_rows(rows).any() and finite_rows(np.ones((3, 5), dtype)).all()


def test_wrong_lengths_are_found_in_a_list_column_without_nulls():
    # no null row: the lengths come from the offsets (a slice's own), not from value_lengths()
    column = pa.array([[1.0, 2.0, 3.0], [1.0, 2.0], [4.0, 5.0, 6.0], [1.0, 2.0, 3.0, 4.0]], pa.list_(pa.float32()))
    for array, wrong in ((column, [1, 3]), (column.slice(1, 2), [0]), (column.slice(2), [1])):
        values, ok, reasons = decode(array, 3)
        assert np.flatnonzero(~ok).tolist() == wrong
        assert all(reasons[i].reason == Reason.WRONG_LENGTH for i in wrong) and len(values) == len(array) - len(wrong)
    values, ok, reasons = decode(pa.array([], pa.list_(pa.float32())), 3)
    assert values.shape == (0, 3) and ok.shape == (0,)


@pytest.mark.parametrize("dtype,expected", [
    (pa.list_(pa.float32()), True), (pa.large_list(pa.float64()), True), (pa.list_(pa.float16(), 768), True),
    (pa.list_(pa.int32()), False), (pa.list_(pa.string()), False), (pa.float32(), False),
    (pa.struct([("x", pa.float32())]), False),
])
def test_embedding_types(dtype, expected):
    assert is_embedding_type(dtype) is expected
