"""A data page's value bytes → the values' bits, and decoded uniform rows → an Arrow list array.

``decode_values(values, encoding, n, dictionary, out)`` decodes ``n`` non-null values of one data page
into ``out[:n]`` (the unsigned storage dtype of the plan: the float bits, never converted): PLAIN (a
view), BYTE_STREAM_SPLIT (``_unsplit``), RLE_DICTIONARY / PLAIN_DICTIONARY indices (a bit-width byte,
then a hybrid stream gathered by ``levels.gather_dictionary``). Anything else, or bytes that do not add
up, raises ``Undecodable``.

``uniform_array(values, plan, rows)`` wraps ``rows * d`` decoded values zero-copy as the column's Arrow
list type, without validity bitmaps (every row a non-null list of ``d`` non-null values).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from clip_nsfw_spark.parquet.chunk_plan import ChunkPlan
from clip_nsfw_spark.parquet.errors import Undecodable
from clip_nsfw_spark.parquet.levels import HAVE_NUMBA, gather_dictionary, jit
from clip_nsfw_spark.parquet.spec import Encoding


def decode_values(values: np.ndarray, encoding, n: int, dictionary, out: np.ndarray) -> None:
    """Decode ``n`` non-null values of a data page into ``out[:n]`` (unsigned storage dtype)."""
    item = out.dtype.itemsize
    if encoding in (Encoding.RLE_DICTIONARY, Encoding.PLAIN_DICTIONARY):
        if dictionary is None or values.shape[0] < 1:
            raise Undecodable("dictionary indices without a dictionary")
        bw = int(values[0])
        if bw > 32 or (bw == 0 and dictionary.shape[0] == 0):
            raise Undecodable(f"index bit width {bw}")
        if bw == 0:  # a one-entry dictionary: every index is 0, no index bytes follow
            out[:n] = dictionary[0]
            return
        if gather_dictionary(values[1:], bw, n, dictionary, out) != n:
            raise Undecodable("dictionary indices out of range or truncated")
    elif encoding == Encoding.PLAIN:
        if values.shape[0] < n * item:
            raise Undecodable("truncated PLAIN page")
        out[:n] = values[:n * item].view(out.dtype)
    elif encoding == Encoding.BYTE_STREAM_SPLIT:
        # byte k of every value is in stream k: streams (item, n) → values (n, item)
        if values.shape[0] < n * item:
            raise Undecodable("truncated BYTE_STREAM_SPLIT page")
        _unsplit(values, n, out[:n])
    else:
        raise Undecodable(f"value encoding {encoding}")


if HAVE_NUMBA:

    @jit
    def _unsplit(streams, n, out):
        """BYTE_STREAM_SPLIT: byte k of value i is streams[k * n + i]; out (n,) uint16/32/64 gets the values.

        One pass per byte stream over the page's values (a page is ~1 MiB, so ``out`` stays in cache):
        contiguous loads and stores the compiler vectorizes, rather than byte-by-byte scattering."""
        item = out.itemsize
        for i in range(n):
            out[i] = streams[i]
        for k in range(1, item):
            base = k * n
            shift = out.dtype.type(8 * k)  # same unsigned type: no widening to int64 in the loop
            for i in range(n):
                out[i] |= out.dtype.type(streams[base + i]) << shift


def uniform_array(values: np.ndarray, plan: ChunkPlan, rows: int) -> pa.Array:
    """Wrap ``rows * plan.d`` decoded values zero-copy as the column's Arrow list type, no validity."""
    arrow_type, d = plan.arrow_type, plan.d
    items = pa.Array.from_buffers(plan.value_type, values.shape[0], [None, pa.py_buffer(values)])
    if pa.types.is_fixed_size_list(arrow_type):
        return pa.Array.from_buffers(arrow_type, rows, [None], children=[items])
    offsets = np.arange(rows + 1, dtype=np.int64 if pa.types.is_large_list(arrow_type) else np.int32) * d
    return pa.Array.from_buffers(arrow_type, rows, [None, pa.py_buffer(offsets)], children=[items])
