"""pages.read_float_list_column against pyarrow on files written by pyarrow, pandas and Spark.

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

from clip_nsfw_spark.parquet.pages import (
    Unsupported,
    iter_float_list_column,
    open_float_list_stream,
    page_summary,
    read_float_list_column,
)

COL = "embedding"
LEFT_TO_PYARROW = ("brotli", "lz4")  # codecs pages.py does not decode (module docstring)
UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def unit_rows(rows: int, dim: int, dtype, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(rows, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(dtype)


def list_array(x: np.ndarray, kind: str = "list") -> pa.Array:
    rows, dim = x.shape
    flat = pa.array(x.reshape(-1))
    if kind == "fixed":
        return pa.FixedSizeListArray.from_arrays(flat, dim)
    if kind == "large":
        return pa.LargeListArray.from_arrays(pa.array(np.arange(rows + 1, dtype=np.int64) * dim), flat)
    return pa.ListArray.from_arrays(pa.array(np.arange(rows + 1, dtype=np.int32) * dim), flat)


def write(path, x: np.ndarray, kind: str = "list", **options) -> str:
    pq.write_table(pa.table({"key": np.arange(x.shape[0]), COL: list_array(x, kind)}), path, **options)
    return str(path)


def expected(path: str, row_group: int, column: str = COL) -> pa.Array:
    return pq.ParquetFile(path).read_row_group(row_group, columns=[column]).column(column).combine_chunks()


def decode(path: str, row_group: int, column: str = COL):
    with open(path, "rb") as f:
        return read_float_list_column(f, pq.read_metadata(path), row_group, column)


def assert_same(got, want: pa.Array) -> None:
    """Equal to pyarrow's array: same type (list kind, item field, value type), same values bit for bit."""
    assert got is not None, "the decoder refused a chunk it should decode"
    assert got.type == want.type, f"type {got.type}, pyarrow {want.type}"
    assert len(got) == len(want) and got.null_count == want.null_count == 0
    assert got.equals(want) or _has_nan(want)  # Array.equals treats NaN as unequal to itself
    width = want.type.value_type.bit_width // 8
    got_bits = got.flatten().to_numpy(zero_copy_only=True).view(UINT[width])
    want_bits = want.flatten().to_numpy(zero_copy_only=True).view(UINT[width])
    np.testing.assert_array_equal(got_bits, want_bits)
    if not pa.types.is_fixed_size_list(want.type):
        np.testing.assert_array_equal(got.offsets.to_numpy(), want.offsets.to_numpy())


def _has_nan(a: pa.Array) -> bool:
    return bool(np.isnan(a.flatten().to_numpy(zero_copy_only=False)).any())


def assert_all_row_groups(path: str, column: str = COL) -> int:
    groups = pq.read_metadata(path).num_row_groups
    for rg in range(groups):
        assert_same(decode(path, rg, column), expected(path, rg, column))
    return groups


def pages_of(path: str, row_group: int = 0, column: str = COL) -> list[tuple[str, str, int]]:
    with open(path, "rb") as f:
        return page_summary(f, pq.read_metadata(path), row_group, column)


def data_encodings(path: str, row_group: int = 0, column: str = COL) -> set[str]:
    return {enc for kind, enc, _ in pages_of(path, row_group, column) if kind.startswith("DATA_PAGE")}


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
# ---------------------------------------------------------------------------------------------------------
def assert_same_with_nulls(got, want: pa.Array) -> None:
    assert got is not None, "the decoder refused a chunk it should decode"
    assert got.type == want.type, f"type {got.type}, pyarrow {want.type}"
    assert got.null_count == want.null_count and got.to_pylist() == want.to_pylist()
    assert got.equals(want)
    np.testing.assert_array_equal(got.offsets.to_numpy(), want.offsets.to_numpy())


HOLES = ["null_row", "null_item", "empty_list", "ragged", "all"]


def holed_rows(case: str, dtype, rows: int = 40, dim: int = 8) -> list:
    data = [list(r) for r in unit_rows(rows, dim, dtype).astype(np.float64)]
    if case in ("null_row", "all"):
        data[17] = None
    if case in ("null_item", "all"):
        data[3][3] = None
        data[rows - 1][dim - 1] = None
    if case in ("empty_list", "all"):
        data[0] = []
        data[20] = []
    if case in ("ragged", "all"):
        data[5] = data[5][:7]
        data[6] = data[6] + data[7]
    if dtype == np.float16:  # pyarrow < 21 builds halffloat only from np.float16 scalars
        data = [None if r is None else [None if v is None else np.float16(v) for v in r] for r in data]
    return data


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


# ---------------------------------------------------------------------------------------------------------
# The index kernel on hand-made hybrid streams: every bit width, RLE and bit-packed runs, ragged tails
# ---------------------------------------------------------------------------------------------------------
def uleb128(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def hybrid(indices: list[int], bw: int, rle_every: int = 3) -> bytes:
    """Encode ``indices`` as RLE/bit-packed hybrid runs (independently of the decoder under test)."""
    out, i, run = bytearray(), 0, 0
    while i < len(indices):
        run += 1
        if run % rle_every == 0:  # an RLE run of the current value, as long as it repeats (at least 1)
            c = 1
            while i + c < len(indices) and indices[i + c] == indices[i]:
                c += 1
            out += uleb128(c << 1) + indices[i].to_bytes((bw + 7) // 8, "little")
            i += c
        else:  # 1..3 groups of 8, the last group padded with zeros past the end
            groups = min(1 + run % 3, -(-(len(indices) - i) // 8))
            chunk = indices[i:i + 8 * groups] + [0] * (8 * groups - len(indices[i:i + 8 * groups]))
            packed = sum(v << (k * bw) for k, v in enumerate(chunk))
            out += uleb128(groups << 1 | 1) + packed.to_bytes(groups * bw, "little")
            i += 8 * groups
    return bytes(out)


@pytest.mark.parametrize("bw", list(range(1, 33)))
def test_dictionary_index_kernel_every_bit_width(bw):
    from clip_nsfw_spark.parquet.pages import _gather_dictionary

    rng = np.random.default_rng(bw)
    size = min(2**bw, 5000)
    dictionary = rng.integers(0, 2**32, size, dtype=np.uint64).astype(np.uint32)
    for n in (1, 7, 8, 9, 203, 1000):
        indices = rng.integers(0, size, n)
        indices[n // 3:n // 3 + n // 4] = indices[n // 3]  # a repeat, so some RLE runs are long
        stream = np.frombuffer(hybrid([int(v) for v in indices], bw), np.uint8)
        out = np.zeros(n, np.uint32)
        assert _gather_dictionary(stream, bw, n, dictionary, out) == n
        np.testing.assert_array_equal(out, dictionary[indices])
        # an index past the dictionary's end, or a stream cut short, is refused (-1), never clamped
        assert _gather_dictionary(stream, bw, n, dictionary[:int(indices.max())], out) == -1
        assert _gather_dictionary(stream[:len(stream) // 2], bw, n, dictionary, out) == -1


def bit_packed(indices: list[int], bw: int, groups_per_run: int = 63) -> bytes:
    """Only bit-packed runs of ``groups_per_run`` groups (pyarrow's writer: 63), the last group zero-padded."""
    out = bytearray()
    for s in range(0, len(indices), 8 * groups_per_run):
        chunk = indices[s:s + 8 * groups_per_run]
        groups = -(-len(chunk) // 8)
        packed = sum(v << (k * bw) for k, v in enumerate(chunk))
        out += uleb128(groups << 1 | 1) + packed.to_bytes(groups * bw, "little")
    return bytes(out)


@pytest.mark.parametrize("bw", list(range(1, 33)))
def test_dictionary_index_kernel_long_runs_and_one_bad_index_anywhere(bw):
    """Pages of pyarrow-like 504-index runs: most indices read through the word-window fast path, the last
    few of the page (whose window would pass the page's end) through the tail reader. An index just past
    the dictionary's end is refused wherever it sits: first, inside the fast path, the page's last index."""
    from clip_nsfw_spark.parquet.pages import _gather_dictionary

    rng = np.random.default_rng(100 + bw)
    size = min(2**bw, 3000)
    dictionary = rng.integers(0, 2**32, size, dtype=np.uint64).astype(np.uint32)
    n = 2 * 504 + 13
    indices = rng.integers(0, size, n)
    indices[-1] = size - 1  # the largest valid index, last in the page: read by the tail
    stream = np.frombuffer(bit_packed([int(v) for v in indices], bw), np.uint8)
    for dtype in (np.uint16, np.uint32, np.uint64):  # float16 / float32 / float64 bits
        out = np.zeros(n, dtype)
        assert _gather_dictionary(stream, bw, n, dictionary.astype(dtype), out) == n
        np.testing.assert_array_equal(out, dictionary[indices].astype(dtype))
    if size == 2**bw:  # every bw-bit index is valid: no out-of-range index can be written
        return
    for at in (0, 300, 504 + 7, n - 2, n - 1):
        bad = indices.copy()
        bad[at] = size
        stream = np.frombuffer(bit_packed([int(v) for v in bad], bw), np.uint8)
        assert _gather_dictionary(stream, bw, n, dictionary, np.zeros(n, np.uint32)) == -1, at
    # a page that ends exactly where its last index ends (no padding group): the tail reads to the last byte
    m = 8 * 3
    stream = np.frombuffer(bit_packed([int(v) for v in indices[:m]], bw), np.uint8)
    out = np.zeros(m, np.uint32)
    assert _gather_dictionary(stream, bw, m, dictionary, out) == m
    np.testing.assert_array_equal(out, dictionary[indices[:m]])


def test_dictionary_index_kernels_stay_inside_the_page(tmp_path):
    """The kernels are compiled without bounds checks and the fast path reads a 4-byte window per index: a
    window past the page's end would read stray bytes and still give the right index (they land above
    it), so only bounds checking shows it. Rerun the kernel tests in a subprocess with numba's bounds
    checks forced on (its own cache: the usual one holds the unchecked builds)."""
    import subprocess
    import sys

    env = dict(os.environ, NUMBA_BOUNDSCHECK="1", NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                          "-k", "dictionary_index_kernel_every or dictionary_index_kernel_long"],
                         env=env, cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


@pytest.mark.parametrize("d", [1, 2, 7, 8, 9, 768])
def test_level_kernels_on_pages_split_mid_row(d):
    from clip_nsfw_spark.parquet.pages import _check_def_levels, _check_rep_levels, _decode_levels

    rng = np.random.default_rng(d)
    rows = 37
    reps = [0 if i % d == 0 else 1 for i in range(rows * d)]
    cuts = sorted({0, rows * d, *rng.integers(1, rows * d, 5).tolist()})  # pages end anywhere in a row
    for a, b in zip(cuts, cuts[1:]):
        for rle_every in (2, 3, 1000):
            stream = np.frombuffer(hybrid(reps[a:b], 1, rle_every), np.uint8)
            assert _check_rep_levels(stream, 1, b - a, a, d)
            levels = np.empty(b - a, np.uint8)
            assert _decode_levels(stream, 1, b - a, levels)
            np.testing.assert_array_equal(levels, reps[a:b])
            if d > 1 and 0 in reps[a:b]:  # read as if it started one level later: a row start misplaced
                assert not _check_rep_levels(stream, 1, b - a, a + 1, d)
    for want in (1, 2, 3):
        defs = [want] * (rows * d)
        assert _check_def_levels(np.frombuffer(hybrid(defs, 2), np.uint8), 2, len(defs), want)
        defs[len(defs) // 2] = want - 1
        assert not _check_def_levels(np.frombuffer(hybrid(defs, 2), np.uint8), 2, len(defs), want)


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


# ---------------------------------------------------------------------------------------------------------
# Streaming: open_float_list_stream / iter_float_list_column, rows read a batch at a time
# ---------------------------------------------------------------------------------------------------------
def stream_batches(path: str, batch_rows: int, row_group: int = 0, column: str = COL) -> list | None:
    with open(path, "rb") as f:
        batches = iter_float_list_column(f, pq.read_metadata(path), row_group, column, batch_rows)
        return None if batches is None else list(batches)


def assert_streams_like_pyarrow(path: str, batch_rows: int, row_group: int = 0) -> list:
    batches = stream_batches(path, batch_rows, row_group)
    assert batches is not None, "the stream refused a chunk it should decode"
    rows = pq.read_metadata(path).row_group(row_group).num_rows
    assert [len(b) for b in batches] == [min(batch_rows, rows - s) for s in range(0, rows, batch_rows)]
    want = expected(path, row_group)
    assert_same(pa.concat_arrays(batches), want)
    assert_same(pa.concat_arrays(batches), decode(path, row_group))
    for batch in batches:  # each batch owns its values: no offset into a shared buffer
        assert batch.offset == 0 and batch.null_count == 0
    return batches


def rows_per_page(path: str, dim: int) -> int:
    return max(n for kind, _, n in pages_of(path) if kind.startswith("DATA_PAGE")) // dim


@pytest.mark.parametrize("version", ["1.0", "2.0"])
@pytest.mark.parametrize("compression", ["none", "snappy", "zstd", "lz4", "gzip"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_stream_equals_whole_chunk_and_pyarrow(tmp_path, version, compression, dtype):
    # f16: dictionary throughout; f32: dictionary, then PLAIN pages once the small dictionary is full
    path = write(tmp_path / "x.parquet", unit_rows(700, 48, dtype), compression=compression,
                 data_page_version=version, data_page_size=4096,
                 dictionary_pagesize_limit=(1 << 20) if dtype == np.float16 else 4096)
    assert data_encodings(path) == ({"RLE_DICTIONARY"} if dtype == np.float16 else {"RLE_DICTIONARY", "PLAIN"})
    if compression in LEFT_TO_PYARROW:
        with open(path, "rb") as f:
            assert open_float_list_stream(f, pq.read_metadata(path), 0, COL) is None
        return
    page = rows_per_page(path, 48)
    assert 1 < page < 700
    for batch_rows in (1, 7, page, page + 1, 3 * page - 1, 699, 700, 10_000):
        assert_streams_like_pyarrow(path, batch_rows)


@pytest.mark.parametrize("kind", ["list", "large", "fixed"])
@pytest.mark.parametrize("encoding", ["PLAIN", "BYTE_STREAM_SPLIT", "dictionary"])
def test_stream_list_kinds_and_encodings(tmp_path, kind, encoding):
    options = {} if encoding == "dictionary" else {
        "use_dictionary": False, "column_encoding": {f"{COL}.list.element": encoding, "key": "PLAIN"}}
    path = write(tmp_path / "x.parquet", unit_rows(500, 32, np.float64), kind, data_page_size=2048, **options)
    batches = assert_streams_like_pyarrow(path, 37)
    assert {b.type for b in batches} == {expected(path, 0).type}


def test_stream_reads_of_any_length(tmp_path):
    # reads that end inside pages, span several pages, or are empty. (pyarrow's writer ends pages on row
    # boundaries; pages ending mid-row are checked on the level kernels above, which use global positions.)
    path = write(tmp_path / "x.parquet", unit_rows(1000, 9, np.float32), data_page_size=450,
                 use_dictionary=False, write_batch_size=10)
    counts = [n for kind, _, n in pages_of(path) if kind.startswith("DATA_PAGE")]
    assert len(counts) > 10, counts
    with open(path, "rb") as f:
        stream = open_float_list_stream(f, pq.read_metadata(path), 0, COL)
        sizes = [1, 0, 13, 113, 2, 400, 1, 5000]
        got = [stream.read(n) for n in sizes]
    assert [len(a) for a in got] == [1, 0, 13, 113, 2, 400, 1, 470] and stream.rows_read == 1000
    assert_same(pa.concat_arrays(got), expected(path, 0))
    assert len(stream.read(10)) == 0  # at the end: empty reads


def test_stream_several_row_groups(tmp_path):
    path = write(tmp_path / "x.parquet", unit_rows(1000, 16, np.float16), row_group_size=300, data_page_size=512)
    for rg in range(4):
        assert_streams_like_pyarrow(path, 64, rg)


class CountingFile(io.RawIOBase):
    """A file whose reads are recorded (sizes, and bytes so far), and whose position a neighbour moves
    after every read (as pyarrow does when the reader shares the handle with it)."""

    def __init__(self, path: str):
        self.f, self.reads = open(path, "rb"), []  # noqa: SIM115 - closed by close()

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, pos, whence=0):
        return self.f.seek(pos, whence)

    def tell(self):
        return self.f.tell()

    def readinto(self, b):
        k = self.f.readinto(b)
        self.reads.append(k)
        self.f.seek(0)  # a neighbour's read elsewhere in the file
        return k

    def close(self):
        self.f.close()
        super().close()


def test_stream_reads_the_chunk_incrementally_with_bounded_reads(tmp_path, monkeypatch):
    from clip_nsfw_spark.parquet import pages

    _READ_AHEAD = 1 << 20
    monkeypatch.setattr(pages, "_READ_AHEAD", _READ_AHEAD)  # a 10 MB chunk is then 10 read-ahead blocks
    path = write(tmp_path / "x.parquet", unit_rows(40_000, 64, np.float32), use_dictionary=False,
                 compression="none")
    chunk = pq.read_metadata(path).row_group(0).column(1)
    assert chunk.total_compressed_size > 2.5 * _READ_AHEAD
    source = CountingFile(path)
    meta = pq.read_metadata(path)
    stream = open_float_list_stream(source, meta, 0, COL)
    first = stream.read(1000)
    assert sum(source.reads) <= _READ_AHEAD + (1 << 20)  # one read-ahead block (+ a page), not the chunk
    got = [first] + [stream.read(1000) for _ in range(39)]
    assert sum(source.reads) == chunk.total_compressed_size  # each byte read once
    assert max(source.reads) <= _READ_AHEAD + (2 << 20)
    source.close()
    assert_same(pa.concat_arrays(got), expected(path, 0))


def test_stream_memory_is_a_batch_and_a_page_not_the_chunk(tmp_path, monkeypatch):
    # PLAIN float32, uncompressed: every buffer the stream holds is a numpy array, which tracemalloc sees
    import tracemalloc

    from clip_nsfw_spark.parquet import pages

    mib = 1 << 20
    monkeypatch.setattr(pages, "_READ_AHEAD", mib)
    path = write(tmp_path / "x.parquet", unit_rows(80_000, 64, np.float32), use_dictionary=False,
                 compression="none")  # a 20 MB chunk, 1 MiB pages
    meta = pq.read_metadata(path)
    batch_rows, rows = 1000, 0  # 256 kB a batch
    with open(path, "rb") as f:
        next(iter_float_list_column(f, meta, 0, COL, 1))  # kernels compiled / loaded outside the count
        tracemalloc.start()
        for batch in iter_float_list_column(f, meta, 0, COL, batch_rows):
            rows += len(batch)
            del batch
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert rows == 80_000
    # while a block is refilled, the old and the new one (each at most the read-ahead + a page), a page
    # decoded aside when it straddles two batches, the batch being filled and the one just returned
    bound = 2 * (mib + mib) + mib + 2 * batch_rows * 64 * 4
    assert peak < bound < meta.row_group(0).column(1).total_compressed_size / 3, (peak, bound)


def test_stream_refuses_up_front_what_it_does_not_stream(tmp_path):
    # null rows on the first page: None (whole-chunk decoding or pyarrow reads it), while pyarrow reads it
    value = pa.float32()
    arr = pa.array(holed_rows("null_row", np.float32), pa.list_(value))
    path = str(tmp_path / "x.parquet")
    pq.write_table(pa.table({COL: arr}), path)
    assert stream_batches(path, 10) is None
    assert_same_with_nulls(decode(path, 0), expected(path, 0))
    for case in ("ragged", "empty_list"):  # value count not rows × d, or levels not uniform
        pq.write_table(pa.table({COL: pa.array(holed_rows(case, np.float32), pa.list_(value))}), path)
        assert stream_batches(path, 10) is None
    path = write(tmp_path / "y.parquet", unit_rows(20, 4, np.float32))
    with open(path, "rb") as f:
        assert iter_float_list_column(f, pq.read_metadata(path), 0, "key", 10) is None  # not a list
        with pytest.raises(ValueError, match="batch_rows must be at least 1, got 0"):
            iter_float_list_column(f, pq.read_metadata(path), 0, COL, 0)


def test_stream_raises_unsupported_when_rows_stop_being_uniform_later(tmp_path):
    # rows 0..899 uniform, row 900 null, row 901 longer (so values = rows × 8 still): the first pages
    # stream, the page with the null row raises
    data = [list(r) for r in unit_rows(1000, 8, np.float32).astype(np.float64)]
    data[900], data[901] = None, data[901] + data[902][:7]
    path = str(tmp_path / "x.parquet")
    pq.write_table(pa.table({COL: pa.array(data, pa.list_(pa.float32()))}), path, data_page_size=512)
    assert len(pages_of(path)) > 8  # 128 rows a page: row 900 is on the 8th data page
    want = expected(path, 0)
    with open(path, "rb") as f:
        stream = open_float_list_stream(f, pq.read_metadata(path), 0, COL)
        got = [stream.read(100) for _ in range(8)]  # rows 0..799: before the null row's page
        with pytest.raises(Unsupported, match=r"stream stopped before row 800 of 1000: .*; read the rest with pyarrow"):
            while True:
                got.append(stream.read(100))
        with pytest.raises(Unsupported, match="stopped at an earlier error"):
            stream.read(1)
    done = pa.concat_arrays(got)
    assert len(done) == stream.rows_read and done.equals(want.slice(0, len(done)))


def test_stream_raises_unsupported_on_a_page_it_cannot_decode(tmp_path, monkeypatch):
    # A later page's value encoding is not one this module knows (patched in: pyarrow writes none such)
    from clip_nsfw_spark.parquet import pages

    path = write(tmp_path / "x.parquet", unit_rows(600, 32, np.float16), data_page_size=1024)
    real, calls = pages._decode_values, []

    def fifth_page_unknown(values, encoding, n, dictionary, out):
        calls.append(n)
        return real(values, 6 if len(calls) == 5 else encoding, n, dictionary, out)

    monkeypatch.setattr(pages, "_decode_values", fifth_page_unknown)
    with open(path, "rb") as f:
        batches = iter_float_list_column(f, pq.read_metadata(path), 0, COL, 10)
        got = []
        with pytest.raises(Unsupported, match="value encoding 6"):
            got.extend(batches)
    per_page = calls[0] // 32
    assert sum(map(len, got)) == 4 * per_page // 10 * 10  # full batches before the fifth page
    assert pa.concat_arrays(got).equals(expected(path, 0).slice(0, sum(map(len, got))))
