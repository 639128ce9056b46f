"""Readers this project did not write read every writer policy's output: DuckDB, polars, fastparquet's Thrift
parser (page headers and footer), pyarrow with checksum verification, and Spark for every output it can.

Outputs are made by the job's own writer (``AtomicParquet``: splice.py for uncompressed embeddings, pyarrow
for everything else) under each writer policy a user can choose: embeddings uncompressed (spliced, or
pyarrow's with ``parquet_codec: pyarrow``) or compressed, scalar columns zstd / snappy / gzip; float16,
float32 and float64 embeddings as ``list``, ``large_list`` and ``fixed_size_list``; a row group with a null
row (pyarrow-encoded) next to uniform ones (spliced). Each reader must give back every value bit for bit;
every page must record a CRC-32 that matches its bytes; the footer's statistics must match the data.
"""

from __future__ import annotations

import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem

from clip_nsfw_spark.executor.writer import AtomicParquet, column_compression

# test dependencies (the test extra): CI must run these tests, never skip them
import duckdb
import fastparquet.cencoding as fastparquet_thrift
import polars

pytestmark = pytest.mark.slow  # every writer policy through four readers (~1 min)

ROWS, DIM = 700, 24
# (name, scalar codec, embedding codec, own encoder)
POLICIES = [("default", "zstd", "none", True), ("pyarrow-codec", "zstd", "none", False),
            ("zstd-embeddings", "zstd", "zstd", True), ("snappy", "snappy", "snappy", True),
            ("gzip", "gzip", "none", True)]
KINDS = ["list", "large", "fixed"]
DTYPES = [np.float16, np.float32, np.float64]


def embedding_type(kind: str, dtype) -> pa.DataType:
    value = pa.from_numpy_dtype(dtype)
    return {"list": pa.list_(value), "large": pa.large_list(value), "fixed": pa.list_(value, DIM)}[kind]


def batches(kind: str, dtype) -> tuple[pa.Schema, list[pa.Table]]:
    """The output schema and three batches: the first with a null embedding row and a null score (not
    for fixed-size lists, which the job never writes with nulls), the others uniform."""
    schema = pa.schema([("key", pa.string()), ("id", pa.int64()), ("embedding", embedding_type(kind, dtype)),
                        ("punsafe", pa.float32()), ("reason", pa.string())])
    rng = np.random.default_rng(3)
    tables = []
    for index, rows in enumerate((100, 300, ROWS - 400)):
        start = sum(t.num_rows for t in tables)
        values = rng.standard_normal((rows, DIM)).astype(dtype)
        embeddings = [list(v) for v in values]
        scores = rng.random(rows).astype(np.float32).tolist()
        if index == 0 and kind != "fixed":
            embeddings[7], scores[9] = None, None
        tables.append(pa.table({
            "key": [f"k{start + i:06d}" for i in range(rows)], "id": np.arange(start, start + rows),
            "embedding": pa.array(embeddings, type=schema.field("embedding").type),
            "punsafe": pa.array(scores, pa.float32()),
            "reason": [("nsfw" if s is not None and s > 0.5 else None) for s in scores]}, schema=schema))
    return schema, tables


def write_output(folder, name: str, schema: pa.Schema, tables: list[pa.Table], codec: str, embedding_codec: str,
                 own: bool) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    file = AtomicParquet(LocalFileSystem(), str(folder), f"{name}.parquet", schema,
                         column_compression(schema, codec, embedding_codec), own_encoder=own)
    for table in tables:
        file.write(table)
    file.commit()
    return str(folder / f"{name}.parquet")


def duckdb_table(relation) -> pa.Table:
    """A DuckDB relation as an Arrow table (``to_arrow_table`` since DuckDB 1.4, ``fetch_arrow_table`` before)."""
    return relation.to_arrow_table() if hasattr(relation, "to_arrow_table") else relation.fetch_arrow_table()


def embedding_bits(column, dtype) -> tuple[list, np.ndarray]:
    """(null rows, every value's bits as unsigned ints) of an embedding column read by any reader (Arrow)."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    nulls = [i for i, valid in enumerate(column.is_valid().to_pylist()) if not valid]
    values = pa.concat_arrays([column.filter(column.is_valid()).flatten()]).to_numpy(zero_copy_only=False)
    width = np.dtype(dtype).itemsize
    return nulls, values.astype(dtype, copy=False).view({2: np.uint16, 4: np.uint32, 8: np.uint64}[width])


def check_pages_with_fastparquet(path: str, data: bytes) -> int:
    """Every page of every chunk, parsed by fastparquet's Thrift reader: a CRC-32 that matches its bytes,
    value counts adding up to the chunk's, pages filling the chunk exactly. Returns the pages seen."""
    footer_length = int.from_bytes(data[-8:-4], "little")
    footer = fastparquet_thrift.from_buffer(data[-8 - footer_length:-8], "FileMetaData")
    buffer = np.frombuffer(data, np.uint8)
    pages = 0
    for group in footer.row_groups:
        for chunk in group.columns:
            meta = chunk.meta_data
            start = meta.dictionary_page_offset or meta.data_page_offset
            end, values = start + meta.total_compressed_size, 0
            stream = fastparquet_thrift.NumpyIO(buffer)
            stream.seek(start)
            while stream.tell() < end:
                header = fastparquet_thrift.ThriftObject.from_buffer(stream, "PageHeader")
                body = stream.tell()
                assert header.crc is not None, (path, meta.path_in_schema, "page without CRC")
                assert header.crc & 0xFFFFFFFF == zlib.crc32(data[body:body + header.compressed_page_size])
                if header.data_page_header is not None:
                    values += header.data_page_header.num_values
                elif header.data_page_header_v2 is not None:
                    values += header.data_page_header_v2.num_values
                stream.seek(body + header.compressed_page_size)
                pages += 1
            assert stream.tell() == end and values == meta.num_values, (path, meta.path_in_schema)
    return pages


def check_statistics(path: str, tables: list[pa.Table]) -> None:
    """Footer statistics of the scalar columns (min, max, null count per row group) equal the data's.
    Row groups are the batches written (each ≤ 1M rows: one row group per write)."""
    meta = pq.read_metadata(path)
    assert meta.num_row_groups == len(tables)
    for group, table in enumerate(tables):
        for index in range(meta.num_columns):
            chunk = meta.row_group(group).column(index)
            name = chunk.path_in_schema.split(".")[0]
            column = table.column(name)
            if name == "embedding":
                assert chunk.statistics is None or not chunk.statistics.has_min_max  # none written: no one filters on them
                continue
            stats = chunk.statistics
            assert stats is not None and stats.null_count == column.null_count, (path, name)
            valid = column.drop_null().to_pylist()
            if valid:
                assert stats.has_min_max and stats.min == min(valid) and stats.max == max(valid), (path, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("kind", KINDS)
def test_every_writer_policy_reads_back_bit_exact_in_independent_readers(tmp_path, kind, dtype):
    schema, tables = batches(kind, dtype)
    expected = pa.concat_tables(tables)
    want_nulls, want_bits = embedding_bits(expected.column("embedding"), dtype)
    for name, codec, embedding_codec, own in POLICIES:
        path = write_output(tmp_path / name, name, schema, tables, codec, embedding_codec, own)
        data = open(path, "rb").read()
        # pyarrow, verifying every page checksum: the whole table, types and metadata included
        table = pq.ParquetFile(path, page_checksum_verification=True).read()
        assert table.equals(expected), name
        assert check_pages_with_fastparquet(path, data) >= 3 * len(schema)
        check_statistics(path, tables)
        # DuckDB and polars: their own parquet readers (float16 read as float: compared by value bits)
        readers = {
            "duckdb": lambda: duckdb_table(duckdb.sql(f"SELECT * FROM read_parquet('{path}')")),
            "polars": lambda: polars.read_parquet(path, use_pyarrow=False).to_arrow(),
        }
        for reader, read in readers.items():
            got = read()
            assert got.num_rows == ROWS, (name, reader)
            assert got.column("id").to_pylist() == expected.column("id").to_pylist(), (name, reader)
            assert got.column("key").to_pylist() == expected.column("key").to_pylist(), (name, reader)
            assert got.column("punsafe").to_pylist() == expected.column("punsafe").to_pylist(), (name, reader)
            assert got.column("reason").to_pylist() == expected.column("reason").to_pylist(), (name, reader)
            nulls, bits = embedding_bits(got.column("embedding"), dtype)
            assert nulls == want_nulls, (name, reader)
            np.testing.assert_array_equal(bits, want_bits, f"{name} read by {reader}")


def test_spark_reads_every_output_it_can(spark, tmp_path):
    # Spark (parquet-mr) reads float32/float64 outputs of every policy; float16 it cannot (see docs/usage.md)
    for dtype in (np.float32, np.float64):
        for kind in KINDS:
            schema, tables = batches(kind, dtype)
            expected = pa.concat_tables(tables)
            for name, codec, embedding_codec, own in POLICIES:
                folder = tmp_path / f"{np.dtype(dtype).name}-{kind}-{name}"
                write_output(folder, "part", schema, tables, codec, embedding_codec, own)
                rows = spark.read.parquet(str(folder)).orderBy("id").collect()
                assert [r["id"] for r in rows] == expected.column("id").to_pylist()
                got = [None if r["embedding"] is None else np.array(r["embedding"], dtype) for r in rows]
                for want, value in zip(expected.column("embedding").to_pylist(), got):
                    if want is None:
                        assert value is None
                    else:
                        np.testing.assert_array_equal(value, np.array(want, dtype))
                assert [r["punsafe"] for r in rows] == expected.column("punsafe").to_pylist()
