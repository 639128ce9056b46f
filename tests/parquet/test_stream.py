"""stream.open_float_list_stream / iter_float_list_column: rows read a batch at a time, equal to the
whole-chunk decoder's and pyarrow's; bounded reads and memory; refusals up front and ``Unsupported`` later.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_nsfw_spark.parquet import stream as stream_module
from clip_nsfw_spark.parquet.errors import Unsupported
from clip_nsfw_spark.parquet.stream import iter_float_list_column, open_float_list_stream
from float_list_files import (COL, LEFT_TO_PYARROW, assert_same, assert_same_with_nulls, data_encodings, decode,
                              expected, holed_rows, pages_of, stream_batches, unit_rows, write)


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
    # boundaries; pages ending mid-row are checked on the level kernels (test_levels.py): global positions.)
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
    _READ_AHEAD = 1 << 20
    monkeypatch.setattr(stream_module, "_READ_AHEAD", _READ_AHEAD)  # a 10 MB chunk is then 10 read-ahead blocks
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

    mib = 1 << 20
    monkeypatch.setattr(stream_module, "_READ_AHEAD", mib)
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
    path = write(tmp_path / "x.parquet", unit_rows(600, 32, np.float16), data_page_size=1024)
    real, calls = stream_module.decode_values, []

    def fifth_page_unknown(values, encoding, n, dictionary, out):
        calls.append(n)
        return real(values, 6 if len(calls) == 5 else encoding, n, dictionary, out)

    monkeypatch.setattr(stream_module, "decode_values", fifth_page_unknown)
    with open(path, "rb") as f:
        batches = iter_float_list_column(f, pq.read_metadata(path), 0, COL, 10)
        got = []
        with pytest.raises(Unsupported, match="value encoding 6"):
            got.extend(batches)
    per_page = calls[0] // 32
    assert sum(map(len, got)) == 4 * per_page // 10 * 10  # full batches before the fifth page
    assert pa.concat_arrays(got).equals(expected(path, 0).slice(0, sum(map(len, got))))
