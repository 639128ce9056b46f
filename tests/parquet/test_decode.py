"""decode.read_float_list_column against pyarrow on files written by pyarrow, pandas and Spark.

Every equality test compares with pyarrow's own read of the same row group (values bit for bit and the
exact Arrow type); every refusal test checks the decoder returns None *and* that pyarrow reads the file
(the caller's fallback).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_nsfw_spark.parquet.decode import read_float_list_column
from float_list_files import (COL, HOLES, LEFT_TO_PYARROW, UINT, assert_all_row_groups, assert_same,
                              assert_same_with_nulls, data_encodings, decode, expected, holed_rows, list_array,
                              pages_of, stream_batches, unit_rows, write)


# ---------------------------------------------------------------------------------------------------------
# pyarrow's default writer
# ---------------------------------------------------------------------------------------------------------
def test_pyarrow_defaults_float16_is_dictionary_encoded_and_decoded(tmp_path):
    path = write(tmp_path / "f16.parquet", unit_rows(600, 768, np.float16))
    assert data_encodings(path) == {"RLE_DICTIONARY"}
    assert_all_row_groups(path)


def test_pyarrow_defaults_float32_falls_back_to_plain_mid_chunk(tmp_path):
    # 600 × 768 full-precision values: far more distinct values than a 1 MiB dictionary holds
    path = write(tmp_path / "f32.parquet", unit_rows(600, 768, np.float32))
    pages = pages_of(path)
    kinds = [enc for kind, enc, _ in pages if kind.startswith("DATA_PAGE")]
    assert pages[0][0] == "DICTIONARY_PAGE" and kinds[0] == "RLE_DICTIONARY" and kinds[-1] == "PLAIN", pages
    assert_all_row_groups(path)


@pytest.mark.parametrize("version", ["1.0", "2.0"])
@pytest.mark.parametrize("compression", ["none", "snappy", "gzip", "zstd", "brotli", "lz4"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_page_versions_and_codecs(tmp_path, version, compression, dtype):
    # a small dictionary limit: dictionary pages, then PLAIN pages, in every codec and page version
    path = write(tmp_path / "x.parquet", unit_rows(300, 64, dtype), compression=compression,
                 data_page_version=version, dictionary_pagesize_limit=2048, data_page_size=8192)
    kinds = {kind for kind, _, _ in pages_of(path)}
    assert ("DATA_PAGE_V2" if version == "2.0" else "DATA_PAGE") in kinds
    if dtype == np.float32:
        assert data_encodings(path) == {"RLE_DICTIONARY", "PLAIN"}
    if compression in LEFT_TO_PYARROW:  # no decompressed length in the stream to check a page by
        refused(path)
        return
    assert_all_row_groups(path)


def test_several_row_groups_and_many_small_pages(tmp_path):
    path = write(tmp_path / "x.parquet", unit_rows(1000, 96, np.float16), row_group_size=300,
                 data_page_size=1024)
    assert len(pages_of(path, 1)) > 20
    assert assert_all_row_groups(path) == 4


@pytest.mark.parametrize("kind", ["list", "large", "fixed"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_list_kinds_and_value_types(tmp_path, kind, dtype):
    path = write(tmp_path / "x.parquet", unit_rows(200, 24, dtype), kind)
    want = expected(path, 0)
    assert want.type.value_type == pa.from_numpy_dtype(dtype)
    assert_same(decode(path, 0), want)


@pytest.mark.parametrize("kind", ["list", "large", "fixed"])
def test_item_field_named_item(tmp_path, kind):
    # use_compliant_nested_type=False: parquet leaf "list.item", Arrow item field "item" (older writers)
    path = write(tmp_path / "x.parquet", unit_rows(100, 12, np.float32), kind, use_compliant_nested_type=False)
    want = expected(path, 0)
    assert want.type.value_field.name == "item", want.type
    assert_same(decode(path, 0), want)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("encoding", ["PLAIN", "BYTE_STREAM_SPLIT"])
def test_without_dictionary(tmp_path, dtype, encoding):
    path = write(tmp_path / "x.parquet", unit_rows(500, 32, dtype), use_dictionary=False,
                 column_encoding={f"{COL}.list.element": encoding, "key": "PLAIN"}, data_page_size=4096)
    assert data_encodings(path) == {encoding}
    assert_all_row_groups(path)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_special_values_bit_for_bit(tmp_path, dtype):
    info = np.finfo(dtype)
    special = np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, info.tiny, info.tiny / 4, info.max, -1],
                       dtype=dtype)
    x = np.tile(special, (40, 3))  # (40, 30): every special value in the dictionary and in the indices
    for options in ({}, {"use_dictionary": False}):
        path = write(tmp_path / "x.parquet", x, **options)
        got = decode(path, 0)
        assert_same(got, expected(path, 0))
        bits = got.flatten().to_numpy(zero_copy_only=True).view(UINT[x.itemsize])
        np.testing.assert_array_equal(bits, x.reshape(-1).view(UINT[x.itemsize]))


def test_non_nullable_items_and_a_one_value_dictionary(tmp_path):
    x = np.full((50, 8), 0.5, np.float32)
    field = pa.field("element", pa.float32(), nullable=False)
    table = pa.table({COL: list_array(x).cast(pa.list_(field))})
    path = str(tmp_path / "x.parquet")
    pq.write_table(table, path)
    assert pq.read_metadata(path).schema.column(0).max_definition_level == 2
    assert_same(decode(path, 0), expected(path, 0))


def test_one_value_per_row(tmp_path):
    path = write(tmp_path / "x.parquet", unit_rows(100, 1, np.float32), data_page_size=64)
    assert_all_row_groups(path)


# ---------------------------------------------------------------------------------------------------------
# Sources: fsspec, pyarrow NativeFile, BytesIO
# ---------------------------------------------------------------------------------------------------------
def test_sources(tmp_path):
    import fsspec

    path = write(tmp_path / "x.parquet", unit_rows(100, 16, np.float16))
    meta, want = pq.read_metadata(path), expected(path, 0)
    data = Path(path).read_bytes()
    with fsspec.open(f"file://{path}", "rb") as f:
        assert_same(read_float_list_column(f, meta, 0, COL), want)
    assert_same(read_float_list_column(io.BytesIO(data), meta, 0, COL), want)
    assert_same(read_float_list_column(pa.BufferReader(data), meta, 0, COL), want)
    with pa.OSFile(path, "rb") as f:
        assert_same(read_float_list_column(f, meta, 0, COL), want)


# ---------------------------------------------------------------------------------------------------------
# pandas and Spark writers
# ---------------------------------------------------------------------------------------------------------
def test_pandas_to_parquet_default(tmp_path):
    pd = pytest.importorskip("pandas")
    x = unit_rows(300, 48, np.float32)
    path = str(tmp_path / "x.parquet")
    pd.DataFrame({"key": np.arange(300), COL: list(x)}).to_parquet(path)
    want = expected(path, 0)
    assert want.type == pa.list_(pa.field("element", pa.float32()))
    assert_all_row_groups(path)


def test_spark_default_writer(tmp_path, spark):
    from pyspark.sql.types import ArrayType, FloatType, LongType, StructField, StructType

    # "embedding": float16-quantised values (few distinct: parquet-mr keeps its dictionary); "raw": full
    # precision (parquet-mr finds the dictionary no smaller than PLAIN and writes PLAIN pages)
    x16 = unit_rows(2000, 40, np.float16).astype(np.float32)
    x32 = unit_rows(2000, 40, np.float32, seed=1)
    schema = StructType([StructField("key", LongType()), StructField(COL, ArrayType(FloatType())),
                         StructField("raw", ArrayType(FloatType()))])
    rows = [(i, a.tolist(), b.tolist()) for i, (a, b) in enumerate(zip(x16, x32))]
    out = str(tmp_path / "spark")
    spark.createDataFrame(rows, schema).coalesce(1).write.parquet(out)
    files = [os.path.join(out, f) for f in os.listdir(out) if f.endswith(".parquet")]
    assert len(files) == 1
    path, meta = files[0], pq.read_metadata(files[0])
    assert meta.created_by.startswith("parquet-mr"), meta.created_by
    assert data_encodings(path, 0, COL) & {"PLAIN_DICTIONARY", "RLE_DICTIONARY"}
    assert "PLAIN" in data_encodings(path, 0, "raw")
    for column, x in ((COL, x16), ("raw", x32)):
        assert assert_all_row_groups(path, column) >= 1
        decoded = np.concatenate([decode(path, rg, column).flatten().to_numpy()
                                  for rg in range(meta.num_row_groups)])
        np.testing.assert_array_equal(decoded, x.reshape(-1))  # and it is what Spark was given
        for rg in range(meta.num_row_groups):  # parquet-mr's pages stream too
            batches = stream_batches(path, 333, rg, column)
            assert batches is not None, (column, meta.row_group(rg).column(1).encodings)
            assert_same(pa.concat_arrays(batches), expected(path, rg, column))


# ---------------------------------------------------------------------------------------------------------
# Refusals: None, and pyarrow still reads the file (the caller's fallback)
# ---------------------------------------------------------------------------------------------------------
def refused(path: str, column: str = COL) -> pa.Array:
    assert decode(path, 0, column) is None
    return expected(path, 0, column)  # pyarrow reads it


# ---------------------------------------------------------------------------------------------------------
# Null rows, null items, empty and ragged lists: the general path, still equal to pyarrow

@pytest.mark.parametrize("case", HOLES)
@pytest.mark.parametrize("kind", ["list", "large"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("version", ["1.0", "2.0"])
def test_nulls_empty_and_ragged_lists(tmp_path, case, kind, dtype, version):
    value = pa.from_numpy_dtype(dtype)
    arr = pa.array(holed_rows(case, dtype), pa.large_list(value) if kind == "large" else pa.list_(value))
    path = str(tmp_path / "x.parquet")
    pq.write_table(pa.table({COL: arr}), path, data_page_version=version, data_page_size=256)
    want = expected(path, 0)
    assert want.equals(arr)
    assert_same_with_nulls(decode(path, 0), want)


@pytest.mark.parametrize("case", HOLES)
def test_spark_style_non_nullable_lists_with_holes(tmp_path, case):
    # a required list field: definition level 0 is an empty list, not a null row
    rows = holed_rows(case if case != "null_row" else "empty_list", np.float32)
    field = pa.field(COL, pa.list_(pa.field("element", pa.float32(), nullable=case in ("null_item", "all"))),
                     nullable=False)
    if not field.type.value_field.nullable:
        rows = [[v for v in r if v is not None] for r in rows]
    table = pa.Table.from_pylist([{COL: r} for r in rows], pa.schema([field]))
    path = str(tmp_path / "x.parquet")
    pq.write_table(table, path)
    assert_same_with_nulls(decode(path, 0), expected(path, 0))


def test_null_rows_in_a_fixed_size_list_are_refused(tmp_path):
    arr = pa.array([[1.0, 2.0], None, [3.0, 4.0]], pa.list_(pa.float32(), 2))
    path = str(tmp_path / "x.parquet")
    try:
        pq.write_table(pa.table({COL: arr}), path)
    except pa.ArrowNotImplementedError as err:  # pyarrow < 21 cannot write this
        pytest.skip(f"pyarrow {pa.__version__} does not write null fixed-size lists: {err}")
    assert refused(path).equals(arr)


@pytest.mark.parametrize("arrow_type", [pa.float32(), pa.list_(pa.int32()), pa.list_(pa.list_(pa.float32())),
                                        pa.struct([("v", pa.list_(pa.float32()))])])
def test_other_types_are_refused(tmp_path, arrow_type):
    values = {pa.float32(): [1.0, 2.0], pa.list_(pa.int32()): [[1, 2], [3, 4]],
              pa.list_(pa.list_(pa.float32())): [[[1.0]], [[2.0]]],
              pa.struct([("v", pa.list_(pa.float32()))]): [{"v": [1.0]}, {"v": [2.0]}]}[arrow_type]
    path = str(tmp_path / "x.parquet")
    pq.write_table(pa.table({COL: pa.array(values, arrow_type)}), path)
    assert refused(path).to_pylist() == values
    assert decode(path, 0, "missing") is None


def test_hadoop_lz4_is_refused(tmp_path):
    # Write LZ4_RAW (thrift codec 7), then patch the chunk's codec to the deprecated Hadoop LZ4 (codec 5):
    # in the footer, path_in_schema's last name is followed by field 4 (codec, i32): 0x15, zigzag(7)=0x0e.
    path = write(tmp_path / "x.parquet", unit_rows(50, 8, np.float32), compression="lz4")
    data = bytearray(Path(path).read_bytes())
    footer_len = int.from_bytes(data[-8:-4], "little")
    start = len(data) - 8 - footer_len
    footer = bytes(data[start:-8])
    marker = b"element\x15\x0e"
    assert footer.count(marker) == 1, "footer layout not as expected"
    at = start + footer.index(marker) + len(b"element\x15")
    data[at] = 0x0A  # zigzag(5)
    patched = str(tmp_path / "hadoop.parquet")
    Path(patched).write_bytes(bytes(data))
    assert pq.read_metadata(patched).row_group(0).column(1).compression != "LZ4"
    refused(patched)
    refused(path)  # LZ4_RAW is pyarrow's too (no length in the stream to check a page by)


def test_external_column_chunks_are_refused(tmp_path):
    # a _metadata-style footer whose chunks name another file: the source given is not where they are
    path = write(tmp_path / "x.parquet", unit_rows(20, 4, np.float32))
    meta = pq.read_metadata(path)
    with open(path, "rb") as f:
        assert read_float_list_column(f, meta, 0, COL) is not None
    meta.set_file_path("x.parquet")
    assert meta.row_group(0).column(1).file_path == "x.parquet"
    with open(path, "rb") as f:
        assert read_float_list_column(f, meta, 0, COL) is None

