"""splice.SplicedParquetWriter: embedding pages written here, other columns by pyarrow (thrift.py: test_thrift.py).

Every file it writes is compared with what pyarrow's own ParquetWriter writes for the same batches:
pyarrow reads both back to equal tables (values bit for bit, NaN payloads and -0.0 included, same Arrow
schema and metadata), Spark reads the embedding values back, and the file's layout is checked as a
reader would rely on it (chunks in schema order, inside the file, sizes that add up).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_nsfw_spark.parquet import splice
from clip_nsfw_spark.parquet.decode import read_float_list_column
from clip_nsfw_spark.parquet.splice import SplicedParquetWriter
from clip_nsfw_spark.parquet.spec import ColumnChunk, ColumnMetaData, FileMetaData, RowGroup
from clip_nsfw_spark.parquet.thrift import decode_struct, encode_struct, get
from clip_nsfw_spark.executor.writer import column_compression, float_list_columns, scalar_columns
from float_list_files import page_summary

BITS = {pa.float16(): np.uint16, pa.float32(): np.uint32, pa.float64(): np.uint64}
NUMPY = {pa.float16(): np.float16, pa.float32(): np.float32, pa.float64(): np.float64}


def values(rows: int, d: int, value_type: pa.DataType, seed: int = 0) -> np.ndarray:
    """Random floats with the awkward ones in: NaN with a payload, -0.0, ±inf, the smallest subnormal."""
    x = np.random.default_rng(seed).normal(size=rows * d).astype(NUMPY[value_type])
    bits = x.view(BITS[value_type])
    special = np.array([0, 1, len(x) // 2, len(x) - 1])
    nan = {np.uint16: 0x7E01, np.uint32: 0x7FC00123, np.uint64: 0x7FF8000000000123}[BITS[value_type]]
    bits[special] = np.array([nan, 0, 1, 0], BITS[value_type])
    bits[special[1]] = BITS[value_type](1) << BITS[value_type](8 * bits.itemsize - 1)  # -0.0
    return x


def floats(x: np.ndarray, value_type: pa.DataType) -> pa.Array:
    """The numpy floats as an Arrow array, zero-copy (older pyarrow builds no float16 array from numpy)."""
    return pa.Array.from_buffers(value_type, len(x), [None, pa.py_buffer(np.ascontiguousarray(x))])


def list_array(x: np.ndarray, d: int, list_type: str, value_type: pa.DataType, item_nullable=True) -> pa.Array:
    rows = len(x) // d
    item = pa.field("element", value_type, nullable=item_nullable)  # the name pyarrow reads back
    flat = floats(x, value_type)
    if list_type == "fixed_size_list":
        return pa.FixedSizeListArray.from_arrays(flat, type=pa.list_(item, d))
    offsets = pa.array(np.arange(rows + 1) * d, pa.int64() if list_type == "large_list" else pa.int32())
    typ = pa.large_list(item) if list_type == "large_list" else pa.list_(item)
    return (pa.LargeListArray if list_type == "large_list" else pa.ListArray).from_arrays(offsets, flat, type=typ)


def write_both(tmp_path, schema: pa.Schema, batches: list[pa.Table], compression="zstd", embedding="none"):
    """The same batches written by pyarrow and by SplicedParquetWriter; (pyarrow's path, ours, writer)."""
    codecs = column_compression(schema, compression, embedding)
    options = dict(compression=codecs, use_dictionary=scalar_columns(schema), write_statistics=scalar_columns(schema))
    paths = tmp_path / "pyarrow.parquet", tmp_path / "spliced.parquet"
    with pq.ParquetWriter(paths[0], schema, **options) as writer:
        for batch in batches:
            writer.write_table(batch)
    with open(paths[1], "wb") as sink:
        ours = SplicedParquetWriter(sink, schema, columns=float_list_columns(schema), **options)
        for batch in batches:
            ours.write_table(batch)
        ours.close()
    return paths[0], paths[1], ours


def value_bits(flat: pa.Array) -> np.ndarray:
    """The value slots of a flat float array as unsigned integers (null slots hold whatever they hold)."""
    bits = BITS[flat.type]
    return np.frombuffer(flat.buffers()[1], bits, count=len(flat), offset=flat.offset * np.dtype(bits).itemsize)


def assert_same_bits(a: pa.Table, b: pa.Table) -> None:
    assert a.schema.equals(b.schema, check_metadata=True)
    assert a.num_rows == b.num_rows
    for name in a.schema.names:
        x, y = a.column(name).combine_chunks(), b.column(name).combine_chunks()
        if pa.types.is_list(x.type) or pa.types.is_large_list(x.type) or pa.types.is_fixed_size_list(x.type):
            assert x.is_null().equals(y.is_null())
            if pa.types.is_floating(x.type.value_type):
                fx, fy = x.flatten(), y.flatten()
                assert fx.is_null().equals(fy.is_null())
                valid = ~np.asarray(fx.is_null().to_numpy(zero_copy_only=False), bool)
                assert np.array_equal(value_bits(fx)[valid], value_bits(fy)[valid])
                if not pa.types.is_fixed_size_list(x.type):
                    assert np.array_equal(np.diff(np.asarray(x.offsets)), np.diff(np.asarray(y.offsets)))
                continue
        assert x.equals(y), name


def assert_layout(path) -> None:
    """Chunks in schema order, each inside the file before the footer, row-group sizes that add up."""
    data = open(path, "rb").read()
    assert data[:4] == data[-4:] == b"PAR1"
    footer_start = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    footer, end = decode_struct(data, footer_start)
    assert end == len(data) - 8
    assert encode_struct(footer) == data[footer_start:end]
    position = 4
    for group in get(footer, FileMetaData.ROW_GROUPS).items:
        metas = [get(c, ColumnChunk.META_DATA) for c in get(group, RowGroup.COLUMNS).items]
        pages = [(get(m, ColumnMetaData.DICTIONARY_PAGE_OFFSET), get(m, ColumnMetaData.DATA_PAGE_OFFSET))
                 for m in metas]
        assert get(group, RowGroup.FILE_OFFSET) == (pages[0][0] or pages[0][1])
        for meta, offsets in zip(metas, pages):
            begin = min(o for o in offsets if o)
            assert begin == position, "chunks are contiguous, in schema order"
            position = begin + get(meta, ColumnMetaData.TOTAL_COMPRESSED_SIZE)
        assert get(group, RowGroup.TOTAL_COMPRESSED_SIZE) == sum(
            get(m, ColumnMetaData.TOTAL_COMPRESSED_SIZE) for m in metas)
        assert get(group, RowGroup.TOTAL_BYTE_SIZE) == sum(get(m, ColumnMetaData.TOTAL_UNCOMPRESSED_SIZE) for m in metas)
    assert position == footer_start


@pytest.mark.parametrize("list_type", ["list", "large_list", "fixed_size_list"])
@pytest.mark.parametrize("value_type", [pa.float16(), pa.float32(), pa.float64()])
@pytest.mark.parametrize("nullable", [True, False])
def test_uniform_embeddings_are_written_here_and_read_back_bit_for_bit(tmp_path, list_type, value_type, nullable,
                                                                       monkeypatch):
    monkeypatch.setattr(splice, "PAGE_BYTES", 200)  # several pages per row group, a page boundary mid-batch
    d, sizes = 7, [33, 1, 50]
    x = values(sum(sizes), d, value_type)
    emb = list_array(x, d, list_type, value_type, item_nullable=nullable)
    schema = pa.schema([pa.field("key", pa.string()), pa.field("embedding", emb.type, nullable=nullable),
                        pa.field("punsafe", pa.float32())], metadata={b"origin": b"test"})
    table = pa.table({"key": [f"k{i}" for i in range(len(emb))], "embedding": emb,
                      "punsafe": np.linspace(0, 1, len(emb), dtype=np.float32)}, schema=schema)
    starts = np.cumsum([0] + sizes)
    batches = [table.slice(a, b - a) for a, b in zip(starts[:-1], starts[1:])]
    theirs, ours, writer = write_both(tmp_path, schema, batches)
    assert writer.encoded == ["embedding"]
    assert writer.pages_written == sum(-(-n // (200 // (d * x.itemsize))) for n in sizes)
    assert_same_bits(pq.read_table(ours), pq.read_table(theirs))
    assert_same_bits(pq.read_table(ours), table)
    assert_layout(ours)
    meta = pq.read_metadata(ours)
    assert meta.num_row_groups == 3 and [meta.row_group(i).num_rows for i in range(3)] == sizes
    assert {kind for kind, _, _ in page_summary(open(ours, "rb"), meta, 0, "embedding")} == {"DATA_PAGE"}
    for group, (a, b) in enumerate(zip(starts[:-1], starts[1:])):  # our own reader, the job's fast path
        got = read_float_list_column(open(ours, "rb"), meta, group, "embedding")
        assert got is not None
        assert_same_bits(pa.table({"e": got}), pa.table({"e": emb.slice(a, b - a)}))


@pytest.mark.parametrize("d", [1, 2, 3, 39, 40, 768])  # repetition levels: one run, bit-packed, two runs a row
def test_row_widths_from_one_value_to_clip_size(tmp_path, d):
    x = values(300, d, pa.float16())
    emb = list_array(x, d, "list", pa.float16())
    table = pa.table({"embedding": emb, "id": np.arange(300)})
    theirs, ours, writer = write_both(tmp_path, table.schema, [table.slice(0, 250), table.slice(250)])
    assert writer.encoded == ["embedding"] and writer.pages_written >= 2
    assert_same_bits(pq.read_table(ours), pq.read_table(theirs))
    assert_layout(ours)


def test_batches_that_are_not_uniform_are_encoded_by_pyarrow_in_the_same_file(tmp_path):
    d = 4
    uniform = [[float(i + j) for j in range(d)] for i in range(10)]
    odd = [
        uniform[:2] + [None] + uniform[3:],  # a null row
        uniform[:2] + [[]] + uniform[3:],  # an empty list
        uniform[:2] + [[1.0, 2.0]] + uniform[3:],  # a short row
        uniform[:2] + [[1.0, None, 3.0, 4.0]] + uniform[3:],  # a null item
    ]
    schema = pa.schema([pa.field("emb", pa.list_(pa.float32())), pa.field("id", pa.int64())])
    batches = [pa.table({"emb": pa.array(rows, schema.field("emb").type), "id": np.arange(10)}, schema=schema)
               for rows in [uniform] + odd + [uniform]]
    theirs, ours, writer = write_both(tmp_path, schema, batches)
    assert writer.pages_written == 2  # the two uniform batches, one page each
    assert_same_bits(pq.read_table(ours), pq.read_table(theirs))
    assert pq.read_table(ours).column("emb").to_pylist() == [r for b in [uniform] + odd + [uniform] for r in b]
    assert_layout(ours)


def test_other_columns_of_every_shape_keep_their_codecs_and_dictionaries(tmp_path):
    """Nested columns before and after the embeddings (several leaves each), a dotted name, a second float
    list compressed with zstd (not encoded here), a column holding nulls; statistics and dictionaries as
    pyarrow writes them."""
    n, d = 120, 5
    x = values(n, d, pa.float32())
    emb = list_array(x, d, "list", pa.float32())
    rng = np.random.default_rng(1)
    table = pa.table({
        "emb": emb,
        "meta": pa.array([{"a": i, "b": [str(i)] * (i % 3)} for i in range(n)]),
        "a.b": pa.array(rng.integers(0, 5, n)),
        "tags": pa.array([{"x": i} if i % 2 else {} for i in range(n)], pa.map_(pa.string(), pa.int64())),
        "second": list_array(values(n, 3, pa.float16(), seed=2), 3, "list", pa.float16()),
        "caption": pa.array([None if i % 7 == 0 else f"c{i % 4}" for i in range(n)]),
    })
    schema = table.schema
    codecs = column_compression(schema, "zstd", "none")
    codecs = {k: ("zstd" if k.startswith("second.") else v) for k, v in codecs.items()}
    options = dict(compression=codecs, use_dictionary=scalar_columns(schema), write_statistics=scalar_columns(schema))
    with pq.ParquetWriter(tmp_path / "pyarrow.parquet", schema, **options) as writer:
        writer.write_table(table.slice(0, 70))
        writer.write_table(table.slice(70))
    with open(tmp_path / "spliced.parquet", "wb") as sink:
        ours = SplicedParquetWriter(sink, schema, columns=float_list_columns(schema), **options)
        ours.write_table(table.slice(0, 70))
        ours.write_table(table.slice(70))
        ours.close()
    assert ours.encoded == ["emb"]
    assert_same_bits(pq.read_table(tmp_path / "spliced.parquet"), pq.read_table(tmp_path / "pyarrow.parquet"))
    assert_layout(tmp_path / "spliced.parquet")
    theirs, mine = pq.read_metadata(tmp_path / "pyarrow.parquet"), pq.read_metadata(tmp_path / "spliced.parquet")
    for group in range(2):
        for i in range(theirs.num_columns):
            a, b = theirs.row_group(group).column(i), mine.row_group(group).column(i)
            assert a.path_in_schema == b.path_in_schema
            if a.path_in_schema.startswith("emb."):
                assert b.compression == "UNCOMPRESSED" and not b.is_stats_set and not b.has_dictionary_page
                continue
            assert (a.compression, a.encodings, a.has_dictionary_page, a.total_compressed_size) == (
                b.compression, b.encodings, b.has_dictionary_page, b.total_compressed_size)
            assert a.is_stats_set == b.is_stats_set
            if a.is_stats_set:
                assert a.statistics.equals(b.statistics)


def test_an_empty_file_has_the_schema_and_no_rows(tmp_path):
    emb = list_array(values(3, 4, pa.float16()), 4, "list", pa.float16())
    schema = pa.table({"embedding": emb, "punsafe": pa.array([0.5] * 3, pa.float32())}).schema
    theirs, ours, writer = write_both(tmp_path, schema, [])
    assert writer.encoded == ["embedding"]
    assert pq.read_table(ours).equals(schema.empty_table())
    assert pq.read_table(ours).schema.equals(pq.read_table(theirs).schema, check_metadata=True)


def test_compressed_embeddings_are_left_to_pyarrow(tmp_path):
    emb = list_array(values(10, 4, pa.float32()), 4, "list", pa.float32())
    table = pa.table({"embedding": emb})
    _, ours, writer = write_both(tmp_path, table.schema, [table], embedding="zstd")
    assert writer.encoded == [] and writer.pages_written == 0
    assert pq.read_metadata(ours).row_group(0).column(0).compression == "ZSTD"


def test_a_row_longer_than_a_page_is_left_to_pyarrow(tmp_path, monkeypatch):
    monkeypatch.setattr(splice, "PAGE_BYTES", 16)
    emb = list_array(values(10, 8, pa.float32()), 8, "list", pa.float32())  # 32 bytes a row
    table = pa.table({"embedding": emb, "id": np.arange(10)})
    theirs, ours, writer = write_both(tmp_path, table.schema, [table])
    assert writer.pages_written == 0
    assert_same_bits(pq.read_table(ours), pq.read_table(theirs))


def test_a_table_of_another_schema_is_refused(tmp_path):
    emb = list_array(values(2, 4, pa.float32()), 4, "list", pa.float32())
    with open(tmp_path / "f.parquet", "wb") as sink:
        writer = SplicedParquetWriter(sink, pa.schema([("embedding", emb.type)]), compression={}, use_dictionary=[],
                                      write_statistics=[], columns=["embedding"])
        with pytest.raises(ValueError, match="not the writer's"):
            writer.write_table(pa.table({"other": emb}))


def test_spark_reads_the_embedding_values(spark, tmp_path):
    """Spark's own parquet reader (parquet-mr, vectorized) on a spliced file: every float back, every row;
    16 values a row (bit-packed repetition levels) and 48 (two runs a row)."""
    x = values(2000, 16, pa.float32(), seed=3)
    x[np.isnan(x)] = 1.0  # Spark compares NaN as equal anyway; keep the check simple
    wide = values(2000, 48, pa.float64(), seed=4)
    wide[np.isnan(wide)] = 1.0
    table = pa.table({"id": np.arange(2000), "embedding": list_array(x, 16, "list", pa.float32()),
                      "e64": list_array(wide, 48, "large_list", pa.float64())})
    folder = tmp_path / "out"
    folder.mkdir()
    _, ours, writer = write_both(tmp_path, table.schema, [table.slice(0, 1500), table.slice(1500)])
    assert writer.encoded == ["embedding", "e64"] and writer.pages_written > 2
    ours.rename(folder / "part-0.parquet")
    rows = spark.read.parquet(str(folder)).orderBy("id").collect()
    assert [r.id for r in rows] == list(range(2000))
    got = np.array([r.embedding for r in rows], np.float32)
    assert np.array_equal(got.view(np.uint32), x.reshape(-1, 16).view(np.uint32))
    assert np.array_equal(np.array([r.e64 for r in rows]).view(np.uint64), wide.reshape(-1, 48).view(np.uint64))


# --- from a hostile review: where the writer differed from pq.ParquetWriter (all fixed) ---------------------------


def test_an_empty_batch_makes_a_row_group_as_pyarrow_does(tmp_path):
    emb = list_array(values(10, 4, pa.float32()), 4, "list", pa.float32())
    table = pa.table({"embedding": emb, "id": np.arange(10)})
    theirs, ours, writer = write_both(tmp_path, table.schema, [table.slice(0, 5), table.slice(5, 0), table.slice(5)])
    assert writer.encoded == ["embedding"]
    assert_same_bits(pq.read_table(ours), pq.read_table(theirs))
    assert pq.read_metadata(ours).num_row_groups == pq.read_metadata(theirs).num_row_groups == 3


def test_a_batch_longer_than_a_row_group_is_cut_as_pyarrow_cuts_it(tmp_path):
    n = 1024 * 1024 + 5  # one byte and one float16 a row: ~3 MB
    emb = list_array(np.zeros(n, np.float16), 1, "fixed_size_list", pa.float16())
    table = pa.table({"k": np.zeros(n, np.int8), "embedding": emb})
    theirs, ours, writer = write_both(tmp_path, table.schema, [table])
    assert writer.pages_written >= 1
    assert [pq.read_metadata(ours).row_group(i).num_rows for i in range(pq.read_metadata(ours).num_row_groups)] == [
        pq.read_metadata(theirs).row_group(i).num_rows for i in range(pq.read_metadata(theirs).num_row_groups)]


def test_compression_none_is_accepted_as_by_pyarrow(tmp_path):
    emb = list_array(values(10, 4, pa.float32()), 4, "list", pa.float32())
    table = pa.table({"embedding": emb, "id": np.arange(10)})
    options = dict(compression=None, use_dictionary=[], write_statistics=[])
    with open(tmp_path / "f.parquet", "wb") as sink:
        writer = SplicedParquetWriter(sink, table.schema, columns=["embedding"], **options)
        writer.write_table(table)
        writer.close()
    assert writer.encoded == ["embedding"]
    assert_same_bits(pq.read_table(tmp_path / "f.parquet"), table)


def test_statistics_of_an_embedding_when_asked_for_all_columns(tmp_path):
    emb = list_array(values(10, 4, pa.float32()), 4, "list", pa.float32())
    table = pa.table({"embedding": emb, "id": np.arange(10)})
    options = dict(compression="none", use_dictionary=False, write_statistics=True)
    with pq.ParquetWriter(tmp_path / "pyarrow.parquet", table.schema, **options) as theirs:
        theirs.write_table(table)
    with open(tmp_path / "spliced.parquet", "wb") as sink:
        ours = SplicedParquetWriter(sink, table.schema, columns=["embedding"], **options)
        ours.write_table(table)
        ours.close()
    a = pq.read_metadata(tmp_path / "pyarrow.parquet").row_group(0).column(0)
    b = pq.read_metadata(tmp_path / "spliced.parquet").row_group(0).column(0)
    assert a.is_stats_set == b.is_stats_set
    assert ours.encoded == [] and ours.pages_written == 0  # the embedding was pyarrow's: asked for statistics


def test_close_twice_leaves_the_file_as_it_was(tmp_path):
    emb = list_array(values(10, 4, pa.float32()), 4, "list", pa.float32())
    table = pa.table({"embedding": emb})
    with open(tmp_path / "f.parquet", "wb") as sink:
        writer = SplicedParquetWriter(sink, table.schema, columns=["embedding"], compression="none",
                                      use_dictionary=[], write_statistics=[])
        writer.write_table(table)
        writer.close()
        size = sink.tell()
        writer.close()
        assert sink.tell() == size
        with pytest.raises(Exception):
            writer.write_table(table)


def test_a_column_named_after_the_embedding_keeps_the_scalar_codec():
    schema = pa.schema([("embedding", pa.list_(pa.float32())), ("embedding.model", pa.string())])
    assert column_compression(schema, "zstd", "none") == {"embedding.list.element": "none", "embedding.model": "zstd"}


def test_narrow_rows_are_not_much_larger_than_pyarrows(tmp_path):
    table = pa.table({"embedding": list_array(values(20000, 1, pa.float16()), 1, "list", pa.float16())})
    theirs, ours, writer = write_both(tmp_path, table.schema, [table])
    assert writer.pages_written == 1
    assert ours.stat().st_size < 1.1 * theirs.stat().st_size
