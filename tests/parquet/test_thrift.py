"""thrift.py (the compact protocol both ways) and spec.py's names for parquet.thrift's field ids and enums.

The names are checked against pyarrow: a footer and the page headers of files pyarrow wrote, decoded by
thrift.py and read through spec.py's names, must say what pyarrow's own metadata API says.
"""

from __future__ import annotations

import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_nsfw_spark.parquet.page_headers import page_header
from clip_nsfw_spark.parquet.spec import (ColumnChunk, ColumnMetaData, CompressionCodec, DataPageHeader,
                                          DataPageHeaderV2, DictionaryPageHeader, Encoding, FileMetaData, PageHeader,
                                          PageType, PhysicalType, RowGroup, SchemaElement)
from clip_nsfw_spark.parquet.thrift import Field, ThriftList, decode_struct, encode_struct, get, with_fields

ROWS, DIM = 500, 16


def test_thrift_round_trip_is_byte_exact_on_pyarrow_footers(tmp_path):
    """Decoding then encoding a footer gives back its bytes: statistics (binary min/max), key-value
    metadata, encoding stats, size statistics, nested schemas, column orders, page index offsets."""
    halves = np.array([1.0, 2.0], np.float16)
    table = pa.table({"s": ["b", None, "a"], "i": [3, 1, 2], "f": [0.5, -1.0, None],
                      "l": pa.ListArray.from_arrays(pa.array([0, 2, 2, 2], pa.int32()), pa.Array.from_buffers(
                          pa.float16(), 2, [None, pa.py_buffer(halves)]), mask=pa.array([False, False, True])),
                      "st": pa.array([{"x": 1, "y": ["q"]}, None, {"x": 2, "y": []}])})
    for i, options in enumerate([{}, {"write_page_index": True, "compression": "zstd"}, {"version": "1.0"}]):
        pq.write_table(table, tmp_path / f"{i}.parquet", **options)
        data = open(tmp_path / f"{i}.parquet", "rb").read()
        start = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
        fields, end = decode_struct(data, start)
        assert end == len(data) - 8 and encode_struct(fields) == data[start:end]


def test_with_fields_sets_adds_and_removes_in_id_order():
    fields = [Field(1, 5, 7), Field(3, 8, b"x"), Field(9, 6, 10**12)]
    out = with_fields(fields, {3: None, 9: (6, -5), 4: (9, ThriftList(5, [1, -2]))})
    assert out == [Field(1, 5, 7), Field(4, 9, ThriftList(5, [1, -2])), Field(9, 6, -5)]
    assert decode_struct(encode_struct(out)) == (out, len(encode_struct(out)))
    assert decode_struct(encode_struct([Field(40, 1, True), Field(2, 1, False)]))[0] == [
        Field(40, 1, True), Field(2, 1, False)]  # long and negative id deltas, bools in the field header


def embedding_file(tmp_path, version: str) -> tuple[bytes, pq.FileMetaData]:
    """An id column and a dictionary-encoded list<float> column (few distinct values) of several pages."""
    x = np.round(np.random.default_rng(3).standard_normal((ROWS, DIM)), 1).astype(np.float32)
    emb = pa.ListArray.from_arrays(pa.array(np.arange(ROWS + 1, dtype=np.int32) * DIM), pa.array(x.ravel()))
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"id": np.arange(ROWS), "emb": emb}), path, compression="zstd",
                   data_page_version=version, write_page_checksum=True, data_page_size=2048)
    return path.read_bytes(), pq.read_metadata(path)


def footer(data: bytes) -> list[Field]:
    return decode_struct(data, len(data) - 8 - int.from_bytes(data[-8:-4], "little"))[0]


@pytest.mark.parametrize("version", ["1.0", "2.0"])
def test_the_footer_read_through_the_names_says_what_pyarrow_says(tmp_path, version):
    data, meta = embedding_file(tmp_path, version)
    fields = footer(data)
    assert get(fields, FileMetaData.NUM_ROWS) == meta.num_rows == ROWS
    schema = get(fields, FileMetaData.SCHEMA).items
    assert get(schema[0], SchemaElement.NUM_CHILDREN) == 2
    assert [get(e, SchemaElement.NAME) for e in schema[1:]] == [b"id", b"emb", b"list", b"element"]
    (group,) = get(fields, FileMetaData.ROW_GROUPS).items
    assert get(group, RowGroup.NUM_ROWS) == ROWS
    for leaf, chunk in enumerate(get(group, RowGroup.COLUMNS).items):
        ours, theirs = get(chunk, ColumnChunk.META_DATA), meta.row_group(0).column(leaf)
        assert PhysicalType(get(ours, ColumnMetaData.TYPE)).name == theirs.physical_type
        assert CompressionCodec(get(ours, ColumnMetaData.CODEC)).name == theirs.compression == "ZSTD"
        assert {Encoding(e).name for e in get(ours, ColumnMetaData.ENCODINGS).items} == set(theirs.encodings)
        assert ".".join(p.decode() for p in get(ours, ColumnMetaData.PATH_IN_SCHEMA).items) == theirs.path_in_schema
        assert get(ours, ColumnMetaData.NUM_VALUES) == theirs.num_values
        assert get(ours, ColumnMetaData.TOTAL_COMPRESSED_SIZE) == theirs.total_compressed_size
        assert get(ours, ColumnMetaData.TOTAL_UNCOMPRESSED_SIZE) == theirs.total_uncompressed_size
        assert get(ours, ColumnMetaData.DATA_PAGE_OFFSET) == theirs.data_page_offset
        assert get(ours, ColumnMetaData.DICTIONARY_PAGE_OFFSET) == theirs.dictionary_page_offset


@pytest.mark.parametrize("version", ["1.0", "2.0"])
def test_page_headers_read_through_the_names(tmp_path, version):
    # the embedding chunk's pages, parsed by page_headers.py: a dictionary page, then data pages of the
    # version asked for, whose sizes tile the chunk, whose CRCs match their bytes and whose counts add up
    data, meta = embedding_file(tmp_path, version)
    chunk = meta.row_group(0).column(1)
    pos, end = chunk.dictionary_page_offset, chunk.dictionary_page_offset + chunk.total_compressed_size
    kinds, levels, rows = [], 0, 0
    while pos < end:
        header, body = page_header(memoryview(data), pos)
        size = header[PageHeader.COMPRESSED_PAGE_SIZE]
        assert header[PageHeader.UNCOMPRESSED_PAGE_SIZE] > 0 and body + size <= end
        assert header[PageHeader.CRC] & 0xFFFFFFFF == zlib.crc32(data[body:body + size])
        kind = PageType(header[PageHeader.TYPE])
        kinds.append(kind)
        if kind == PageType.DICTIONARY_PAGE:
            sub = header[PageHeader.DICTIONARY_PAGE_HEADER]
            assert sub[DictionaryPageHeader.ENCODING] in (Encoding.PLAIN, Encoding.PLAIN_DICTIONARY)
            assert 0 < sub[DictionaryPageHeader.NUM_VALUES] <= ROWS * DIM
        elif kind == PageType.DATA_PAGE:
            sub = header[PageHeader.DATA_PAGE_HEADER]
            assert sub[DataPageHeader.ENCODING] in (Encoding.RLE_DICTIONARY, Encoding.PLAIN_DICTIONARY)
            assert sub[DataPageHeader.DEFINITION_LEVEL_ENCODING] == sub[DataPageHeader.REPETITION_LEVEL_ENCODING] \
                == Encoding.RLE
            levels += sub[DataPageHeader.NUM_VALUES]
        else:
            sub = header[PageHeader.DATA_PAGE_HEADER_V2]
            assert sub[DataPageHeaderV2.ENCODING] == Encoding.RLE_DICTIONARY and sub[DataPageHeaderV2.NUM_NULLS] == 0
            assert sub[DataPageHeaderV2.REPETITION_LEVELS_BYTE_LENGTH] \
                + sub[DataPageHeaderV2.DEFINITION_LEVELS_BYTE_LENGTH] < size
            levels += sub[DataPageHeaderV2.NUM_VALUES]
            rows += sub[DataPageHeaderV2.NUM_ROWS]
        pos = body + size
    assert pos == end
    data_page = PageType.DATA_PAGE_V2 if version == "2.0" else PageType.DATA_PAGE
    assert kinds[0] == PageType.DICTIONARY_PAGE and set(kinds[1:]) == {data_page} and len(kinds) > 3
    assert levels == chunk.num_values == ROWS * DIM
    assert rows == (ROWS if version == "2.0" else 0)
