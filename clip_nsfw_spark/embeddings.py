"""Arrow embedding columns → numpy matrices, with a reason for every row that cannot be scored.

Pure pyarrow/numpy. Accepts list, large_list and fixed_size_list of float16/float32/float64. Rows that
cannot be scored are never dropped silently: each gets a reason (null embedding, wrong length, NaN/Inf).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

FLOAT_TYPES = (pa.float16(), pa.float32(), pa.float64())
REASON_NULL = "null embedding"
REASON_NON_FINITE = "NaN or Inf in embedding"


def finite_rows(values: np.ndarray) -> np.ndarray:
    """bool (n,): rows of a 2-D float array with no NaN or Inf.

    float16 is tested on its bits (exponent all ones ⇔ Inf/NaN): numpy's float16 ufuncs convert
    element by element and were the slowest step of the whole job on float16 input.
    """
    if values.dtype == np.float16:
        bits = values.view(np.uint16)
        return ((bits & np.uint16(0x7C00)) != np.uint16(0x7C00)).all(axis=1)
    return np.isfinite(values).all(axis=1)


def is_embedding_type(dtype: pa.DataType) -> bool:
    """True for list/large_list/fixed_size_list of float16/32/64."""
    return (pa.types.is_list(dtype) or pa.types.is_large_list(dtype) or pa.types.is_fixed_size_list(dtype)) \
        and dtype.value_type in FLOAT_TYPES


def decode(column: pa.Array | pa.ChunkedArray, dim: int) -> tuple[np.ndarray, np.ndarray, list]:
    """Decode one embedding column.

    Returns ``(matrix, ok, reasons)``: ``matrix`` float16/32/64 (n_ok, dim) holding the scorable rows in
    order, ``ok`` bool (n,) marking them, ``reasons`` a list (n,) of None or a short reason string.
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
            reasons[i] = REASON_NULL
    if pa.types.is_fixed_size_list(column.type):
        lengths = np.full(n, column.type.list_size)
    else:
        lengths = column.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
    wrong = ok & (lengths != dim)
    if wrong.any():
        ok &= ~wrong
        for i in np.flatnonzero(wrong):
            reasons[i] = f"wrong length: expected {dim}, found {int(lengths[i])}"
    scorable = column if ok.all() else column.filter(pa.array(ok))
    if pa.types.is_fixed_size_list(scorable.type) and scorable.type.list_size != dim:
        values = np.empty((0, dim), dtype=scorable.type.value_type.to_pandas_dtype())
    else:
        # flatten() honours slicing and offsets (.values would not); zero-copy when there are no nulls.
        flat = scorable.flatten()
        values = flat.to_numpy(zero_copy_only=False).reshape(len(scorable), dim)
    finite = finite_rows(values)
    if not finite.all():
        positions = np.flatnonzero(ok)
        for i in positions[~finite]:
            reasons[i] = REASON_NON_FINITE
        ok[positions[~finite]] = False
        values = values[finite]
    return values, ok, reasons
