"""Arrow embedding columns → numpy matrices, with a reason for every row that cannot be scored; and the
check every scorer applies to the matrices it is given (``check_embeddings``).

Pure pyarrow/numpy. Accepts list, large_list and fixed_size_list of float16/float32/float64. Rows that
cannot be scored are never dropped silently: each gets a reason (null embedding, wrong length, a null
value inside the list, NaN/Inf, a float64 value that overflows float32).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from clip_nsfw_spark.errors import DimensionError
from clip_nsfw_spark.scoring.kernels import finite_rows_of_bits, read_only_view
from clip_nsfw_spark.scoring.outcomes import Problem, Reason
from clip_nsfw_spark.models.registry import fitting_model_hint

FLOAT_TYPES = (pa.float16(), pa.float32(), pa.float64())
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# dtype → (the unsigned type of its bits, its exponent bits): a value is NaN or Inf when they are all set
_EXPONENT_BITS = {np.dtype(np.float16): (np.uint16, np.uint16(0x7C00)),
                  np.dtype(np.float32): (np.uint32, np.uint32(0x7F800000)),
                  np.dtype(np.float64): (np.uint64, np.uint64(0x7FF0000000000000))}


def finite_rows(values: np.ndarray) -> np.ndarray:
    """bool (n,): rows of a 2-D float16/32/64 array with no NaN or Inf.

    Tested on the bits (a value is NaN or Inf exactly when its exponent bits are all set), in one numba pass
    (kernels.finite_rows_of_bits): numpy's float16 ufuncs convert element by element, and even on the bits
    numpy makes two batch-sized temporaries; this check was ~10% of a task's time on float16 input.
    """
    bits_type, exponent = _EXPONENT_BITS.get(values.dtype, (None, None))
    if values.ndim != 2 or bits_type is None or finite_rows_of_bits is None:  # numba missing: numpy's way
        return np.isfinite(values).all(axis=-1)
    bits = read_only_view(np.ascontiguousarray(values).view(bits_type))
    out = np.empty(len(bits), dtype=np.bool_)
    finite_rows_of_bits(bits, exponent, out)
    return out


def is_embedding_type(dtype: pa.DataType) -> bool:
    """True for list/large_list/fixed_size_list of float16/32/64."""
    return (pa.types.is_list(dtype) or pa.types.is_large_list(dtype) or pa.types.is_fixed_size_list(dtype)) \
        and dtype.value_type in FLOAT_TYPES


def decode(column: pa.Array | pa.ChunkedArray, dim: int) -> tuple[np.ndarray, np.ndarray, list]:
    """Decode one embedding column.

    Returns ``(matrix, ok, reasons)``: ``matrix`` float16/32/64 (n_ok, dim) holding the scorable rows in
    order, ``ok`` bool (n,) marking them, ``reasons`` a list (n,) of None or a ``Problem`` (the reason text, with its ``Reason``).
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    n = len(column)
    ok = np.ones(n, dtype=bool)
    reasons: list = [None] * n
    if column.null_count:
        nulls = column.is_null().to_numpy(zero_copy_only=False)
        ok &= ~nulls
        for i in np.flatnonzero(nulls):
            reasons[i] = Problem(Reason.NULL_EMBEDDING)
    if pa.types.is_fixed_size_list(column.type):
        lengths = np.full(n, column.type.list_size)
    elif n and not column.null_count:  # the offsets (slice-aware; an empty array may have none): value_lengths()
        # .fill_null() cost ~1 us a row
        lengths = np.diff(column.offsets.to_numpy())
    else:
        lengths = column.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
    wrong = ok & (lengths != dim)
    if wrong.any():
        ok &= ~wrong
        for i in np.flatnonzero(wrong):
            reasons[i] = Problem(Reason.WRONG_LENGTH, f"expected {dim}, found {int(lengths[i])}")
    scorable = column if ok.all() else column.filter(pa.array(ok))
    if pa.types.is_fixed_size_list(scorable.type) and scorable.type.list_size != dim:
        values = np.empty((0, dim), dtype=scorable.type.value_type.to_pandas_dtype())
    else:
        # flatten() honours slicing and offsets (.values would not); zero-copy when there are no nulls.
        flat = scorable.flatten()
        values = flat.to_numpy(zero_copy_only=False).reshape(len(scorable), dim)
    problems = row_problems(values, _null_values(scorable, dim))
    if problems:
        positions = np.flatnonzero(ok)
        for row, reason in problems.items():
            reasons[positions[row]] = reason
        keep = np.ones(len(values), dtype=bool)
        keep[list(problems)] = False
        ok[positions[~keep]] = False
        values = values[keep]
    return values, ok, reasons


def _null_values(column, dim: int) -> np.ndarray | None:
    """bool (n,): rows of a list column (every row of length ``dim``) holding a null value, or None."""
    flat = column.flatten()
    if not flat.null_count:
        return None
    return flat.is_null().to_numpy(zero_copy_only=False).reshape(len(column), dim).any(axis=1)


def row_problems(values: np.ndarray, null_values: np.ndarray | None = None) -> dict[int, Problem]:
    """``{row: reason}`` for the rows of a 2-D float array that the model cannot score.

    Null values inside a list (read as NaN) are named as nulls; NaN/Inf as such; float64 values beyond
    float32's range, which the model's float32 cast would turn into Inf, as out of range.
    """
    problems: dict[int, Problem] = {}
    finite = finite_rows(values)
    for row in np.flatnonzero(~finite):
        problems[int(row)] = Problem(Reason.NON_FINITE)
    if values.dtype == np.float64:
        with np.errstate(invalid="ignore"):
            overflow = (np.abs(values) > _FLOAT32_MAX).any(axis=1) & finite
        for row in np.flatnonzero(overflow):
            problems[int(row)] = Problem(Reason.OVERFLOW)
    if null_values is not None:
        for row in np.flatnonzero(null_values):
            problems[int(row)] = Problem(Reason.NULL_VALUE)
    return problems


def check_embeddings(embeddings, dim: int, name: str) -> np.ndarray:
    """Validate a 2-D float array of width ``dim``; raise DimensionError/TypeError that say how to fix it."""
    array = np.asarray(embeddings)
    if array.ndim != 2:
        raise DimensionError(f"{name} expects a 2-D array of shape (n, {dim}); found shape {array.shape}")
    if array.dtype not in (np.float16, np.float32, np.float64):
        raise TypeError(f"{name} expects float16, float32 or float64 embeddings; found {array.dtype}")
    if array.shape[1] != dim:
        raise DimensionError(f"model {name} expects {dim}-d embeddings ({dim} columns), found "
                             f"{array.shape[1]}-d{fitting_model_hint(array.shape[1])}")
    return array
