"""Float-list parquet files for the parquet tests: written by pyarrow, read back by pyarrow to compare with.

``page_summary`` lists a chunk's pages from their headers (a debugging view, for tests only: where a writer
fell back from dictionary indices to PLAIN pages, which page versions it wrote). ``decode`` /
``stream_batches`` read a file with the package's whole-chunk and streaming decoders; ``expected`` is
pyarrow's read of the same row group; ``assert_same`` compares them bit for bit, with the exact Arrow type.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clip_nsfw_spark.parquet.chunk_plan import plan_chunk
from clip_nsfw_spark.parquet.data_pages import read_exact
from clip_nsfw_spark.parquet.decode import read_float_list_column
from clip_nsfw_spark.parquet.errors import Undecodable
from clip_nsfw_spark.parquet.page_headers import page_header
from clip_nsfw_spark.parquet.spec import DataPageHeader, DataPageHeaderV2, Encoding, PageHeader, PageType
from clip_nsfw_spark.parquet.stream import iter_float_list_column

COL = "embedding"
LEFT_TO_PYARROW = ("brotli", "lz4")  # codecs the package does not decode (decode.py's docstring)
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



def page_summary(source, metadata: pq.FileMetaData, row_group: int, column: str) -> list[tuple[str, str, int]]:
    """(page type, value encoding, value count) of every page of the chunk, in file order, from the page
    headers only (nothing decompressed): e.g. where a writer fell back from dictionary indices to PLAIN
    pages. Raises ValueError when ``column`` is outside what the package reads."""
    sub_headers = {PageType.DATA_PAGE: PageHeader.DATA_PAGE_HEADER,
                   PageType.DICTIONARY_PAGE: PageHeader.DICTIONARY_PAGE_HEADER,
                   PageType.DATA_PAGE_V2: PageHeader.DATA_PAGE_HEADER_V2}
    try:
        plan = plan_chunk(metadata, row_group, column, decoding=False)
        raw = read_exact(source, plan.start, plan.size)
        mv, pos, pages = memoryview(raw), 0, []
        while pos < raw.shape[0]:
            header, pos = page_header(mv, pos)
            pos += header.get(PageHeader.COMPRESSED_PAGE_SIZE, 0)
            ptype = header.get(PageHeader.TYPE)
            sub = header.get(sub_headers.get(ptype, -1)) or {}
            # the value encoding and count have the same ids in data (v1) and dictionary page headers
            encoding = sub.get(DataPageHeaderV2.ENCODING if ptype == PageType.DATA_PAGE_V2 else DataPageHeader.ENCODING)
            pages.append((_name(PageType, ptype), _name(Encoding, encoding), sub.get(DataPageHeader.NUM_VALUES, 0)))
    except Undecodable as err:
        raise ValueError(f"{column!r} in row group {row_group}: {err}") from err
    return pages


def _name(enum, value) -> str:
    return enum(value).name if value in enum._value2member_map_ else str(value)


def pages_of(path: str, row_group: int = 0, column: str = COL) -> list[tuple[str, str, int]]:
    with open(path, "rb") as f:
        return page_summary(f, pq.read_metadata(path), row_group, column)


def data_encodings(path: str, row_group: int = 0, column: str = COL) -> set[str]:
    return {enc for kind, enc, _ in pages_of(path, row_group, column) if kind.startswith("DATA_PAGE")}



def stream_batches(path: str, batch_rows: int, row_group: int = 0, column: str = COL) -> list | None:
    with open(path, "rb") as f:
        batches = iter_float_list_column(f, pq.read_metadata(path), row_group, column, batch_rows)
        return None if batches is None else list(batches)


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

