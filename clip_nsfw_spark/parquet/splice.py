"""Parquet files whose embedding columns are encoded here and every other column by pyarrow.

Why: an embedding column is most of an output's bytes, and pyarrow's writer spends ~8 ns per float on it
(repetition and definition levels built and run-length encoded level by level; a float16 also goes
through a per-value fixed-length-byte-array path): ~0.6 s per 100k rows of 768 float32, ~0.7 s of
float16, as much as reading them and more than twice the rest of writing (docs/performance.md). Yet a uniform embedding column (every
row a non-null list of ``d`` non-null floats: what the job writes) is trivial to encode: per page, the
repetition levels are the same few bytes for every row, the definition levels one run, and the values
their bytes as they are in memory (PLAIN, uncompressed: the writer policy's choice for embeddings).

``SplicedParquetWriter`` writes each ``write_table`` call as one row group: pyarrow encodes the other
columns into an in-memory parquet file (with the caller's codecs, dictionary and statistics settings),
whose column chunks are copied into the output with the embedding chunks written here in between, in
schema order, as any writer lays them out. The footer is pyarrow's own for the full schema (written once
for an empty table: parquet schema, stored Arrow schema, column orders), with the row groups put together
here (thrift.py). A batch whose embedding column is not uniform (null rows, empty or ragged lists, null
items, or a row too long for one page) has that column encoded by pyarrow too: the file is exact
whatever the data, and every reader sees an ordinary file (pyarrow, Spark 3.5–4.x, DuckDB:
tests/parquet/test_splice.py, bench/writer_compat.py).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clip_nsfw_spark.parquet.checksum import crc32
from clip_nsfw_spark.parquet.spec import (FLOAT_LEAVES, ColumnChunk, ColumnMetaData, CompressionCodec, DataPageHeader,
                                          Encoding, FileMetaData, PageEncodingStats, PageHeader, PageType, RowGroup,
                                          SchemaElement)
from clip_nsfw_spark.parquet.thrift import (I32, I64, LIST, STRUCT, Field, ThriftList, decode_struct, encode_struct, get,
                                            uleb128, with_fields)

MAGIC = b"PAR1"
PAGE_BYTES = 1 << 20  # values per data page, as pyarrow's default data page size: readers hold a page at once
MAX_ROW_GROUP_ROWS = 1 << 20  # a longer batch is cut into row groups of this many rows, as pyarrow's writer cuts it


def _footer(data: bytes) -> list[Field]:
    if data[-4:] != MAGIC or len(data) < 12:
        raise ValueError("not a parquet file")
    size = int.from_bytes(data[-8:-4], "little")
    fields, _ = decode_struct(data, len(data) - 8 - size)
    return fields


def _write_parquet(table: pa.Table, options: dict) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=max(table.num_rows, 1), **options)
    return sink.getvalue().to_pybytes()


def leaf_paths(schema: pa.Schema) -> list[list[str]]:
    """The parquet leaf paths (``"emb.list.element"``) of each top-level field, as pyarrow's writer names
    them: taken from the footer it writes for an empty table, by position (never by splitting names)."""
    template = _footer(_write_parquet(schema.empty_table(), {}))
    chunks = get(get(template, FileMetaData.ROW_GROUPS).items[0], RowGroup.COLUMNS).items
    counts = _leaf_counts(get(template, FileMetaData.SCHEMA).items)
    return [[".".join(_path(chunk)) for chunk in chunks[end - n:end]] for n, end in zip(counts, np.cumsum(counts))]


def _leaf_counts(schema_elements: list) -> list[int]:
    """Leaves per top-level field, from the parquet schema (a depth-first list of SchemaElements whose
    group nodes say how many children follow): by position, so any column name, dots included, works."""
    counts, pos = [], 1

    def walk(pos: int) -> tuple[int, int]:  # (leaves in the subtree at pos, position after it)
        children = get(schema_elements[pos], SchemaElement.NUM_CHILDREN)
        if not children:
            return 1, pos + 1
        leaves, pos = 0, pos + 1
        for _ in range(children):
            n, pos = walk(pos)
            leaves += n
        return leaves, pos

    for _ in range(get(schema_elements[0], SchemaElement.NUM_CHILDREN) or 0):
        n, pos = walk(pos)
        counts.append(n)
    return counts


def _uniform_values(column: pa.ChunkedArray | pa.Array, dtype: np.dtype) -> tuple[np.ndarray, int] | None:
    """(values' bits (n * d,), d) when every row is a non-null list of the same d ≥ 1 non-null values
    fitting one page; None otherwise (then pyarrow encodes the batch's column)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(array) == 0 or array.null_count:
        return None
    if pa.types.is_fixed_size_list(array.type):
        d = array.type.list_size
    else:
        offsets = np.asarray(array.offsets)
        d = int(offsets[1] - offsets[0])
        if d < 1 or not (np.diff(offsets) == d).all():
            return None
    if d < 1 or d * dtype.itemsize > PAGE_BYTES:
        return None
    items = array.flatten()  # the rows' values only, whatever the array's offset
    if items.null_count or len(items) != len(array) * d:
        return None
    values = np.frombuffer(items.buffers()[1], dtype, count=len(items), offset=items.offset * dtype.itemsize)
    return values, d


def _repetition_levels(rows: int, d: int) -> bytes:
    """Hybrid-encoded repetition levels (bit width 1) of ``rows`` rows of ``d`` values: per row a 0 (a new
    row) then d − 1 ones. The smallest of: one RLE run of zeros (d = 1); one bit-packed run, d / 8 bytes a
    row (narrow rows); two RLE runs a row (header ``count << 1``, then the value's byte), ~5 bytes a row
    whatever d (embeddings)."""
    if d == 1:
        return uleb128(rows << 1) + b"\x00"
    row = b"\x02\x00" + uleb128((d - 1) << 1) + b"\x01"
    if len(row) * 8 <= d:
        return row * rows
    levels = np.ones(rows * d, np.uint8)
    levels[::d] = 0
    packed = np.packbits(levels, bitorder="little")  # 8 levels a byte, first level in the lowest bit
    return uleb128((packed.shape[0] << 1) | 1) + packed.tobytes()  # a run of len(packed) groups of 8


def _levels(rows: int, d: int, max_def: int) -> bytes:
    """The level streams of a v1 data page of ``rows`` full rows of ``d`` values, each a 4-byte
    little-endian length then the hybrid encoding: repetition levels, then definition levels (one RLE run
    of ``max_def``: every value present). Bit-packed groups are padded past the page's levels with zeros,
    which readers ignore (they read as many levels as the page header says)."""
    rep = _repetition_levels(rows, d)
    definition = uleb128((rows * d) << 1) + bytes([max_def])
    return (len(rep).to_bytes(4, "little") + rep + len(definition).to_bytes(4, "little") + definition)


class _EmbeddingLeaf(NamedTuple):
    """What the template footer says of a float-list column's one leaf: how to encode and describe it."""

    meta: list[Field]  # its ColumnMetaData in the empty file (physical type, path in schema)
    max_def: int
    dtype: np.dtype  # the values' bits


class SplicedParquetWriter:
    """A ``pq.ParquetWriter`` look-alike (``write_table``, ``close``) for ``schema`` into ``sink``.

    sink: a binary file object (only ``write`` is used; it is not closed here). compression: one codec (None:
    none), or a codec per parquet leaf path (writer.column_compression); use_dictionary / write_statistics:
    a bool or column names / leaf paths, as for pyarrow; write_page_checksum: every page (pyarrow's and
    this module's) records the CRC-32 of its bytes, as pyarrow's option of that name. ``columns``: the float-list columns to encode here
    (list / large_list / fixed_size_list of halffloat / float / double, one leaf). A column is encoded here
    only where pyarrow would write it the same way: uncompressed, without dictionary, without statistics;
    ``encoded`` names those, the others are pyarrow's. ``pages_written`` counts this module's pages.
    """

    def __init__(self, sink, schema: pa.Schema, *, compression: str | dict[str, str] | None,
                 use_dictionary: bool | list[str], write_statistics: bool | list[str], columns: list[str],
                 write_page_checksum: bool = False):
        self.sink, self.schema = sink, schema
        self._options = {"compression": compression, "use_dictionary": use_dictionary,
                         "write_statistics": write_statistics, "write_page_checksum": write_page_checksum}
        self._checksums = write_page_checksum
        template_file = _write_parquet(schema.empty_table(), self._options)
        template = self._template = _footer(template_file)
        self._leaf_counts = _leaf_counts(get(template, FileMetaData.SCHEMA).items)
        starts = np.concatenate([[0], np.cumsum(self._leaf_counts)]).astype(int)
        # the empty table's one row group: a chunk per leaf
        chunks = get(get(template, FileMetaData.ROW_GROUPS).items[0], RowGroup.COLUMNS).items
        parquet_schema = pq.read_metadata(pa.BufferReader(template_file)).schema  # max levels per leaf
        self._leaves: dict[int, _EmbeddingLeaf] = {}
        for name in columns:
            index = schema.get_field_index(name)
            if index < 0 or self._leaf_counts[index] != 1:
                continue
            field, leaf = schema.field(index), int(starts[index])
            value_type = getattr(field.type, "value_type", None)
            path = ".".join(_path(chunks[leaf]))
            codec = compression.get(path) if isinstance(compression, dict) else compression
            if value_type not in FLOAT_LEAVES or str(codec).lower() not in ("none", "uncompressed"):
                continue  # a leaf missing from a codec mapping is one pyarrow leaves uncompressed
            if any(option is True or (not isinstance(option, bool) and {name, path} & set(option or ()))
                   for option in (use_dictionary, write_statistics)):
                continue  # pyarrow would give it a dictionary or statistics
            physical, dtype = FLOAT_LEAVES[value_type]
            column = parquet_schema.column(leaf)
            meta = get(chunks[leaf], ColumnChunk.META_DATA)
            if column.max_repetition_level != 1 or get(meta, ColumnMetaData.TYPE) != physical:
                continue
            self._leaves[index] = _EmbeddingLeaf(meta, column.max_definition_level, dtype)
        self.encoded = [schema.field(i).name for i in sorted(self._leaves)]
        self._subset_options: dict[frozenset, dict] = {}
        self._row_groups: list[list[Field]] = []
        self._rows = 0
        self.pages_written = 0
        self._pos = 0  # bytes written; the magic goes first, at the first write_table or close
        self._closed = False

    def _start(self) -> None:
        if self._pos == 0:
            self._write(MAGIC)

    def _write(self, data) -> None:
        self.sink.write(data)
        self._pos += len(data) if isinstance(data, bytes) else data.nbytes

    def _options_without(self, skipped: frozenset) -> dict:
        """pyarrow's options for the schema without the columns at ``skipped``: codecs keyed by the leaf
        paths pyarrow itself gives the remaining columns (a dotted column name is never guessed at)."""
        if skipped not in self._subset_options:
            kept = pa.schema([f for i, f in enumerate(self.schema) if i not in skipped], metadata=self.schema.metadata)
            options = dict(self._options)
            if isinstance(options["compression"], dict) and len(kept):
                paths = {path for paths in leaf_paths(kept) for path in paths}
                options["compression"] = {k: v for k, v in options["compression"].items() if k in paths}
            self._subset_options[skipped] = options
        return self._subset_options[skipped]

    def write_table(self, table: pa.Table) -> None:
        """Write ``table`` (the writer's schema) as one row group, or as several of ``MAX_ROW_GROUP_ROWS``
        rows when longer; an empty table makes an empty row group (as pyarrow's writer does)."""
        if self._closed:
            raise ValueError("write_table after close")
        if not table.schema.equals(self.schema, check_metadata=False):
            raise ValueError(f"table schema {table.schema} is not the writer's {self.schema}")
        self._start()
        for first in range(0, max(table.num_rows, 1), MAX_ROW_GROUP_ROWS):
            self._write_row_group(table.slice(first, MAX_ROW_GROUP_ROWS))

    def _write_row_group(self, table: pa.Table) -> None:
        uniform = {}
        for index, leaf in self._leaves.items():
            found = _uniform_values(table.column(index), leaf.dtype)
            if found is not None:
                uniform[index] = found
        skipped = frozenset(uniform)
        others = [i for i in range(len(self.schema)) if i not in skipped]
        mini_chunks, mini = [], b""
        if others:
            kept = pa.Table.from_arrays([table.column(i) for i in others], schema=pa.schema(
                [self.schema.field(i) for i in others], metadata=self.schema.metadata))
            mini = _write_parquet(kept, self._options_without(skipped))
            row_groups = get(_footer(mini), FileMetaData.ROW_GROUPS).items
            if len(row_groups) != 1:
                raise ValueError(f"pyarrow wrote {len(row_groups)} row groups for one batch")
            mini_chunks = list(get(row_groups[0], RowGroup.COLUMNS).items)
        chunks: list[list[Field]] = []
        start = self._pos
        for index in range(len(self.schema)):
            if index in uniform:
                chunks.append(self._write_embedding_chunk(self._leaves[index], *uniform[index]))
                continue
            for _ in range(self._leaf_counts[index]):
                chunks.append(self._copy_chunk(mini, mini_chunks.pop(0)))
        metas = [get(c, ColumnChunk.META_DATA) for c in chunks]
        uncompressed = sum(get(m, ColumnMetaData.TOTAL_UNCOMPRESSED_SIZE) for m in metas)
        compressed = sum(get(m, ColumnMetaData.TOTAL_COMPRESSED_SIZE) for m in metas)
        self._row_groups.append([Field(RowGroup.COLUMNS, LIST, ThriftList(STRUCT, chunks)),
                                 Field(RowGroup.TOTAL_BYTE_SIZE, I64, uncompressed),
                                 Field(RowGroup.NUM_ROWS, I64, table.num_rows), Field(RowGroup.FILE_OFFSET, I64, start),
                                 Field(RowGroup.TOTAL_COMPRESSED_SIZE, I64, compressed)])
        self._rows += table.num_rows

    def _copy_chunk(self, mini: bytes, chunk: list[Field]) -> list[Field]:
        """Copy one of pyarrow's column chunks from the in-memory file; its metadata with offsets moved."""
        meta = get(chunk, ColumnChunk.META_DATA)
        page_offsets = (ColumnMetaData.DATA_PAGE_OFFSET, ColumnMetaData.INDEX_PAGE_OFFSET,
                        ColumnMetaData.DICTIONARY_PAGE_OFFSET)
        offsets = [o for o in (get(meta, k) for k in page_offsets) if o]  # 0: no such page
        begin = min(offsets) if offsets else self._pos  # no page at all: an empty chunk of an empty row group
        size = get(meta, ColumnMetaData.TOTAL_COMPRESSED_SIZE)
        shift = self._pos - begin
        self._write(mini[begin:begin + size])
        moved = {k: (I64, get(meta, k) + shift) for k in page_offsets if get(meta, k)}
        # bloom filters are not copied (pyarrow writes none by default)
        moved |= {ColumnMetaData.BLOOM_FILTER_OFFSET: None, ColumnMetaData.BLOOM_FILTER_LENGTH: None}
        file_offset = get(chunk, ColumnChunk.FILE_OFFSET)  # deprecated; pyarrow writes 0
        return with_fields(chunk, {ColumnChunk.FILE_OFFSET: (I64, file_offset + shift if file_offset else 0),
                                   ColumnChunk.META_DATA: (STRUCT, with_fields(meta, moved)),
                                   # page indexes are not copied
                                   ColumnChunk.OFFSET_INDEX_OFFSET: None, ColumnChunk.OFFSET_INDEX_LENGTH: None,
                                   ColumnChunk.COLUMN_INDEX_OFFSET: None, ColumnChunk.COLUMN_INDEX_LENGTH: None})

    def _write_embedding_chunk(self, leaf: _EmbeddingLeaf, values: np.ndarray, d: int) -> list[Field]:
        """Write one uniform float-list column chunk as PLAIN v1 data pages of whole rows; its ColumnChunk."""
        rows = values.shape[0] // d
        per_page = max(1, PAGE_BYTES // (d * values.itemsize))
        start, pages = self._pos, 0
        for first in range(0, rows, per_page):
            n = min(per_page, rows - first)
            body = values[first * d:(first + n) * d]
            levels = _levels(n, d, leaf.max_def)
            size = len(levels) + body.nbytes
            crc = [Field(PageHeader.CRC, I32, _signed32(crc32(body, crc32(levels))))] \
                if self._checksums else []
            header = encode_struct([
                Field(PageHeader.TYPE, I32, PageType.DATA_PAGE), Field(PageHeader.UNCOMPRESSED_PAGE_SIZE, I32, size),
                Field(PageHeader.COMPRESSED_PAGE_SIZE, I32, size), *crc,
                Field(PageHeader.DATA_PAGE_HEADER, STRUCT, [
                    Field(DataPageHeader.NUM_VALUES, I32, n * d), Field(DataPageHeader.ENCODING, I32, Encoding.PLAIN),
                    Field(DataPageHeader.DEFINITION_LEVEL_ENCODING, I32, Encoding.RLE),
                    Field(DataPageHeader.REPETITION_LEVEL_ENCODING, I32, Encoding.RLE)])])
            self._write(header + levels)
            self._write(memoryview(body).cast("B"))
            pages += 1
        total = self._pos - start
        self.pages_written += pages
        stats = [Field(PageEncodingStats.PAGE_TYPE, I32, PageType.DATA_PAGE),
                 Field(PageEncodingStats.ENCODING, I32, Encoding.PLAIN), Field(PageEncodingStats.COUNT, I32, pages)]
        meta = [Field(ColumnMetaData.TYPE, I32, get(leaf.meta, ColumnMetaData.TYPE)),
                Field(ColumnMetaData.ENCODINGS, LIST, ThriftList(I32, [Encoding.RLE, Encoding.PLAIN])),
                Field(ColumnMetaData.PATH_IN_SCHEMA, LIST, get(leaf.meta, ColumnMetaData.PATH_IN_SCHEMA)),
                Field(ColumnMetaData.CODEC, I32, CompressionCodec.UNCOMPRESSED),
                Field(ColumnMetaData.NUM_VALUES, I64, rows * d),
                Field(ColumnMetaData.TOTAL_UNCOMPRESSED_SIZE, I64, total),
                Field(ColumnMetaData.TOTAL_COMPRESSED_SIZE, I64, total),
                Field(ColumnMetaData.DATA_PAGE_OFFSET, I64, start),
                Field(ColumnMetaData.ENCODING_STATS, LIST, ThriftList(STRUCT, [stats]))]
        return [Field(ColumnChunk.FILE_OFFSET, I64, 0), Field(ColumnChunk.META_DATA, STRUCT, meta)]

    def close(self) -> None:
        """Write the footer (the sink stays open); a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        self._start()
        footer = encode_struct(with_fields(self._template, {
            FileMetaData.NUM_ROWS: (I64, self._rows),
            FileMetaData.ROW_GROUPS: (LIST, ThriftList(STRUCT, self._row_groups))}))
        self._write(footer + len(footer).to_bytes(4, "little") + MAGIC)


def _signed32(crc: int) -> int:
    """A CRC-32 as the Thrift i32 a page header stores it in."""
    return crc - (1 << 32) if crc >= 1 << 31 else crc


def _path(chunk: list[Field]) -> list[str]:
    return [part.decode() for part in get(get(chunk, ColumnChunk.META_DATA), ColumnMetaData.PATH_IN_SCHEMA).items]
