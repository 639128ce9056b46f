"""One float-list column of one row group decoded a bounded number of rows at a time.

For chunks too large to decode whole (a 1M-row group of 768-d float16 is 1.5 GB decoded):
``open_float_list_stream(source, metadata, row_group, column)`` returns a ``FloatListStream`` whose
``read(n)`` gives the next ``n`` rows (``iter_float_list_column(..., batch_rows)`` wraps it as an iterator
of ``batch_rows``-row arrays), or ``None`` up front when the chunk does not stream. Pages are read one at a
time through a read-ahead block of a few MiB (``_ChunkReader``), so memory is one batch + one page + the
dictionary whatever the chunk size; the pages are decoded as decode.py decodes them (data_pages.py,
values.py, levels.py), and the rows read one after another equal ``read_float_list_column``'s array.

Only the fast path streams (every row a non-null list of ``d`` values); ``None`` when the footer, the
encodings the chunk lists or its first data page say otherwise. A later page that breaks that (nulls or
other lengths after uniform pages, an encoding or page the first pages did not show) raises the public
``Unsupported``: the rows returned until then are right, and the caller reads the rest of that row
group's column with pyarrow (reader.py does). A page CRC mismatch raises ``Damaged``, up front or from
``read``. A row spanning two pages is handled (the levels are checked at global
positions; pyarrow's writer never splits rows across pages).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clip_nsfw_spark.parquet.chunk_plan import ChunkPlan, plan_chunk
from clip_nsfw_spark.parquet.data_pages import DataPage, check_uniform_page, data_pages, read_into
from clip_nsfw_spark.parquet.errors import Undecodable, Unsupported
from clip_nsfw_spark.parquet.levels import HAVE_NUMBA
from clip_nsfw_spark.parquet.page_headers import body_size, page_header
from clip_nsfw_spark.parquet.values import decode_values, uniform_array

# Encodings a decodable chunk may list in its metadata (values, and levels: BIT_PACKED is listed by some
# parquet-mr versions without its pages using it; a page that does use it stops the stream).
_STREAM_ENCODINGS = {"PLAIN", "RLE", "RLE_DICTIONARY", "PLAIN_DICTIONARY", "BYTE_STREAM_SPLIT", "BIT_PACKED"}
_READ_AHEAD = 4 << 20  # bytes read from the source at a time (more when a page is larger)
_HEADER_PEEK = 1 << 10  # bytes a page header is first looked for in (statistics can make it longer)
_HEADER_MAX = 16 << 20  # a page header longer than this is refused (float statistics are a few bytes)


def open_float_list_stream(source, metadata: pq.FileMetaData, row_group: int, column: str) -> FloatListStream | None:
    """A ``FloatListStream`` over one float-list column of one row group, or ``None`` when this package
    does not stream it (then use ``read_float_list_column`` or pyarrow).

    Same arguments as ``read_float_list_column``. Decided before any row is returned, from the footer
    (type, codec, the encodings the chunk lists, row count × ``d`` = value count) and from the chunk's
    first pages (the dictionary page, and the first data page: decoded, and its levels checked uniform).
    Later pages are checked as they are read (``Unsupported``). The rows read one after another, to the
    end, equal ``read_float_list_column``'s array and pyarrow's read of the row group's column. The
    source's position is moved at every read; it may be used by others in between.
    """
    if not HAVE_NUMBA:
        return None
    try:
        plan = plan_chunk(metadata, row_group, column)
        listed = set(metadata.row_group(row_group).column(plan.leaf).encodings)
        if plan.d is None or not listed <= _STREAM_ENCODINGS:
            return None
        pages = data_pages(_ChunkReader(source, plan.start, plan.size).pages(), plan)
        page = _next_data_page(pages)
        check_uniform_page(plan, 0, page)
        first = np.empty(page.n, plan.storage)
        decode_values(page.values, page.encoding, page.n, page.dictionary, first)
        return FloatListStream(plan, pages, first)
    except Undecodable:
        return None


def iter_float_list_column(source, metadata: pq.FileMetaData, row_group: int, column: str, batch_rows: int):
    """Consecutive arrays of ``batch_rows`` rows (the last one shorter) of one float-list column of one row
    group, or ``None`` when it does not stream (``open_float_list_stream``). Their concatenation equals
    ``read_float_list_column(...)``; ``Unsupported`` mid-stream as ``FloatListStream.read``."""
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be at least 1, got {batch_rows}")
    stream = open_float_list_stream(source, metadata, row_group, column)
    if stream is None:
        return None

    def batches():
        while stream.rows_read < stream.num_rows:
            yield stream.read(batch_rows)

    return batches()


class FloatListStream:
    """One float-list column of one row group, decoded ``read(n)`` rows at a time (``open_float_list_stream``).

    Only uniform chunks stream (every row a non-null list of ``d`` non-null values, as embeddings are);
    each ``read`` returns a fresh array that owns its values (zero-copy wrap, no validity bitmaps), of the
    column's Arrow type. Memory: the rows asked for + one decompressed page (+ its decoded values when
    the page straddles two reads) + the dictionary + a read-ahead block of a few MiB, whatever the chunk
    size. A page that turns out not decodable raises ``Unsupported``; the stream is then finished.
    """

    def __init__(self, plan: ChunkPlan, pages, first: np.ndarray):
        self._plan, self._pages = plan, pages
        self._carry = first  # decoded values (storage dtype) of a page, not yet returned
        self._filled = first.shape[0]  # levels (= values) decoded so far
        self._failed = False
        self.rows_read = 0
        self.num_rows = plan.n_rows

    def read(self, rows: int) -> pa.Array:
        """The next ``rows`` rows (fewer only at the end of the row group; 0 once it is all read)."""
        if self._failed:
            raise Unsupported("the stream stopped at an earlier error: read the rest with pyarrow")
        rows = max(0, min(rows, self.num_rows - self.rows_read))
        out = np.empty(rows * self._plan.d, self._plan.storage)
        got = min(self._carry.shape[0], out.shape[0])
        out[:got] = self._carry[:got]
        self._carry = self._carry[got:]
        try:
            while got < out.shape[0]:
                got += self._next_page(out[got:])
        except Undecodable as err:
            self._failed = True
            raise Unsupported(f"stream stopped before row {self.rows_read} of {self.num_rows}: {err}; "
                              "read the rest with pyarrow") from err
        self.rows_read += rows
        return uniform_array(out, self._plan, rows)

    def _next_page(self, out: np.ndarray) -> int:
        """Decode the next data page into ``out``: all of it, or its head when it is longer (the rest is
        carried over to the next read). Returns the number of values placed in ``out``."""
        page = _next_data_page(self._pages)
        check_uniform_page(self._plan, self._filled, page)
        n = page.n
        self._filled += n
        if n <= out.shape[0]:  # the usual case: the page lands where it belongs, no copy
            decode_values(page.values, page.encoding, n, page.dictionary, out[:n])
            return n
        aside = np.empty(n, out.dtype)  # it straddles this read and the next: decoded aside
        decode_values(page.values, page.encoding, n, page.dictionary, aside)
        out[:] = aside[:out.shape[0]]
        self._carry = aside[out.shape[0]:]
        return out.shape[0]


def _next_data_page(pages) -> DataPage:
    page = next(pages, None)
    if page is None:  # data_pages stops at the chunk's value count, which is rows × d: never reached
        raise Undecodable("the chunk ends before its last row")
    return page


class _ChunkReader:
    """The pages of a column chunk read from ``source`` incrementally: a page header, then that page's
    bytes, through a read-ahead block of ``_READ_AHEAD`` bytes. Seeks before every read: the caller may
    share the file object with pyarrow, which moves its position between our reads."""

    def __init__(self, source, start: int, size: int):
        self.source, self.next, self.left = source, start, size  # file offset and bytes not yet read
        self.block, self.pos = np.empty(0, np.uint8), 0

    def _have(self) -> int:
        return self.block.shape[0] - self.pos

    def _fill(self, need: int) -> None:
        """Make at least ``need`` unread bytes available (fewer only where the chunk ends)."""
        have = self._have()
        if have >= need or not self.left:
            return
        more = min(self.left, max(need - have, _READ_AHEAD))
        block = np.empty(have + more, np.uint8)
        block[:have] = self.block[self.pos:]
        if read_into(self.source, self.next, block[have:]) != more:
            raise Undecodable("the file ends inside the column chunk")
        block.flags.writeable = False  # like pyarrow.decompress's output: one numba specialization
        self.block, self.pos = block, 0
        self.next += more
        self.left -= more

    def pages(self):
        """Yield ``(header, body)`` per page, as ``decode.chunk_pages`` does for a chunk held whole."""
        while True:
            peek = _HEADER_PEEK
            while True:
                self._fill(peek)
                try:
                    header, end = page_header(memoryview(self.block), self.pos)
                    break
                except Undecodable:
                    # the whole rest of the chunk was there, or a header no writer makes: malformed
                    if self._have() < peek or peek >= _HEADER_MAX:
                        raise
                    peek *= 4  # a long header (e.g. large statistics): look further
            size = body_size(header)
            self.pos = end
            self._fill(size)
            if self._have() < size:
                raise Undecodable("page runs past the column chunk")
            yield header, self.block[self.pos:self.pos + size]
            self.pos += size
