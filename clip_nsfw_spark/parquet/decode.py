"""One float-list column of one row group decoded whole: pyarrow's answer, faster.

``read_float_list_column(source, metadata, row_group, column)`` plans the chunk from the footer
(chunk_plan.py), reads its bytes in one read, walks its pages (page_headers.py, data_pages.py) and decodes
the values with numba kernels (values.py, levels.py) straight into one preallocated ``(n_rows * d,)``
array, then wraps it zero-copy as the Arrow list type the file's Arrow schema names. It returns either an
array equal to

    pq.ParquetFile(source).read_row_group(row_group, columns=[column]).column(column).combine_chunks()

(same type: ``list`` / ``large_list`` / ``fixed_size_list`` of ``halffloat`` / ``float`` / ``double``, same
item field) or ``None`` when the chunk is outside what it decodes; the caller then uses pyarrow. It never
returns a different answer: everything it relies on is checked, not assumed.

Why: pyarrow's default writer dictionary-encodes float16 lists (≤ 65,536 distinct values, so the
dictionary never overflows) and pyarrow reads those ~3x slower than PLAIN float32; ``read_dictionary=``
does not apply to non-BYTE_ARRAY columns. Decoding the indices with one gather is memory-bound.

What is decoded (anything else → ``None``):

* physical types FLOAT, DOUBLE, FIXED_LEN_BYTE_ARRAY(2) with the Float16 logical type, under a top-level
  list field with one repetition level (3-level ``list.element``, Spark's legacy 2-level lists, or a bare
  repeated field);
* the fast path: every row a non-null list of the same length ``d``, no null items — verified from the
  repetition and definition levels of every page (RLE/bit-packed hybrid, checked run by run without
  materialising them), never assumed; the result is then one values buffer with computed offsets;
* otherwise (null rows, empty lists, rows of different lengths, null items) a general path for ``list`` /
  ``large_list``: levels materialised, offsets and validity bitmaps built from them (definition level
  thresholds from the Arrow schema's nullability, cross-checked with the column's maximum definition
  level); ``fixed_size_list`` columns with such rows are refused;
* data pages v1 and v2; a dictionary page (PLAIN) with RLE_DICTIONARY / PLAIN_DICTIONARY indices, PLAIN and
  BYTE_STREAM_SPLIT data pages, mixed in one chunk (pyarrow's and parquet-mr's fallback from dictionary to
  PLAIN once the dictionary is full);
* codecs UNCOMPRESSED, SNAPPY, GZIP and ZSTD, each page's decompressed length checked independently of
  the codec call (``pyarrow.decompress`` returns the size it is told whatever the data held): SNAPPY's
  length preamble, GZIP decompressed by zlib (its CRC-32 and length trailer checked), ZSTD by its own
  frame check. BROTLI and LZ4_RAW streams carry no length to check them by: those chunks are pyarrow's.

Validation (the rule: never a different answer from pyarrow reading with ``page_checksum_verification``;
on a damaged file at least as strict as it): a page's CRC-32, when its header has one, is checked against
its bytes before anything is decoded, and a mismatch raises ``Damaged`` (the file is damaged: no other
reader would accept it either); anything else that does not add up (sizes, counts, levels, dictionary
indices, truncation) makes this package step aside (``None``) and pyarrow, reading with checksum
verification, decides.

Memory: the chunk's compressed bytes plus the decoded values (4 bytes per float32 value) are held at once;
stream.py reads chunks too large for that a batch at a time.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clip_nsfw_spark.parquet.chunk_plan import ChunkPlan, plan_chunk
from clip_nsfw_spark.parquet.data_pages import check_uniform_page, data_pages, read_exact
from clip_nsfw_spark.parquet.errors import NotUniform, Undecodable
from clip_nsfw_spark.parquet.levels import HAVE_NUMBA, assemble, decode_levels
from clip_nsfw_spark.parquet.page_headers import body_size, page_header
from clip_nsfw_spark.parquet.values import decode_values, uniform_array


def read_float_list_column(source, metadata: pq.FileMetaData, row_group: int, column: str) -> pa.Array | None:
    """One float-list column of one row group, decoded here; ``None`` when not decodable here.

    source: a seekable binary file object (``open(path, "rb")``, an fsspec file, a pyarrow NativeFile);
    metadata: that file's footer (``pq.read_metadata`` / ``ParquetFile.metadata``); row_group: its index;
    column: a top-level column name whose Arrow type is ``list`` / ``large_list`` / ``fixed_size_list`` of
    ``halffloat`` / ``float`` / ``double``.

    Returns an Arrow array of ``num_rows`` lists, of exactly the type pyarrow reads
    (``metadata.schema.to_arrow_schema()``), equal to
    ``ParquetFile(source).read_row_group(row_group, columns=[column]).column(column).combine_chunks()``.
    When every row holds ``d`` non-null values (the usual embedding column) it is one (num_rows * d,)
    values buffer wrapped zero-copy, no validity bitmaps; null rows, empty or ragged lists and null items
    are decoded exactly too (slower, for ``list`` / ``large_list``). ``None`` for another encoding / codec /
    type, a fixed-size list with null rows, or anything else unexpected (see the module docstring): the
    caller then reads with pyarrow. ``Damaged`` on a page CRC mismatch. IO errors propagate. The source's
    position is moved.
    """
    if not HAVE_NUMBA:
        return None
    try:
        plan = plan_chunk(metadata, row_group, column)
        raw = read_exact(source, plan.start, plan.size)
        try:
            return uniform_array(_decode_uniform(raw, plan), plan, plan.n_rows)
        except NotUniform:
            return _decode_general(raw, plan)
    except Undecodable:
        return None


def chunk_pages(raw: np.ndarray):
    """Yield ``(header, body)`` for the pages of a column chunk held whole in ``raw``."""
    # every byte buffer the kernels see is then read-only like pyarrow.decompress's output: one numba
    # specialization per kernel and value width, not one per buffer origin
    raw.flags.writeable = False
    mv = memoryview(raw)  # page headers are parsed from a memoryview: int indexing, no numpy scalars
    pos = 0
    while True:
        header, pos = page_header(mv, pos)
        csize = body_size(header)
        if pos + csize > raw.shape[0]:
            raise Undecodable("page runs past the column chunk")
        yield header, raw[pos:pos + csize]
        pos += csize


def _decode_uniform(raw: np.ndarray, plan: ChunkPlan) -> np.ndarray:
    """All values of the chunk as the unsigned storage dtype, shape (n_rows * d,), when every row is a
    non-null list of d non-null values (checked on every page's levels; ``NotUniform`` otherwise)."""
    if plan.d is None:
        raise NotUniform("rows of different lengths")
    out = np.empty(plan.n_levels, plan.storage)
    filled = 0
    for page in data_pages(chunk_pages(raw), plan):
        check_uniform_page(plan, filled, page)
        decode_values(page.values, page.encoding, page.n, page.dictionary, out[filled:filled + page.n])
        filled += page.n
    return out


def _decode_general(raw: np.ndarray, plan: ChunkPlan) -> pa.Array:
    """The chunk as pyarrow reads it when rows may be null, empty, of any length, with null items:
    levels materialised (one byte per level), then offsets, validity and item slots built in one pass."""
    arrow_type, n_rows, n_total, max_def = plan.arrow_type, plan.n_rows, plan.n_levels, plan.max_def
    if pa.types.is_fixed_size_list(arrow_type):
        raise Undecodable("null or short rows in a fixed-size list")
    list_def = int(plan.list_nullable)  # def below this: a null row; equal: an empty list
    if max_def != list_def + 1 + int(plan.item_nullable):
        raise Undecodable("definition levels do not match the Arrow schema's nullability")
    reps = np.empty(n_total, np.uint8)
    defs = np.empty(n_total, np.uint8)
    values = np.empty(n_total, plan.storage)
    filled = n_values = 0
    for page in data_pages(chunk_pages(raw), plan):
        n = page.n
        if not (decode_levels(page.rep, 1, n, reps[filled:filled + n])
                and decode_levels(page.defs, plan.def_bit_width, n, defs[filled:filled + n])):
            raise Undecodable("bad level stream")
        present = int(np.count_nonzero(defs[filled:filled + n] == max_def))
        if page.nulls >= 0 and present != n - page.nulls:
            raise Undecodable("v2 page null count disagrees with its levels")
        decode_values(page.values, page.encoding, present, page.dictionary, values[n_values:n_values + present])
        filled += n
        n_values += present
    large = pa.types.is_large_list(arrow_type)
    offsets = np.empty(n_rows + 1, np.int64 if large else np.int32)
    row_valid = np.empty(n_rows, np.uint8)
    items = np.empty(n_total, plan.storage)
    item_valid = np.empty(n_total, np.uint8)
    n_items = assemble(reps, defs, list_def, max_def, values[:n_values], offsets, row_valid, items, item_valid)
    if n_items < 0:
        raise Undecodable("levels do not describe num_rows lists")
    item_bitmap = None if item_valid[:n_items].all() else _bitmap(item_valid[:n_items])
    row_bitmap = None if row_valid.all() else _bitmap(row_valid)
    child = pa.Array.from_buffers(plan.value_type, n_items, [item_bitmap, pa.py_buffer(items[:n_items])])
    return pa.Array.from_buffers(arrow_type, n_rows, [row_bitmap, pa.py_buffer(offsets)], children=[child])


def _bitmap(valid: np.ndarray) -> pa.Buffer:
    return pa.py_buffer(np.packbits(valid.view(bool), bitorder="little"))
