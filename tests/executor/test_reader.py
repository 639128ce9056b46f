"""reader.py: a task → exactly its rows, in order, in bounded batches, with the npy rows that belong to them."""


import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_nsfw_spark.errors import InputChangedError, InputError
from clip_nsfw_spark.contract import Task
from clip_nsfw_spark.executor.reader import open_parquet, read_npy_rows, task_batches
from clip_nsfw_spark.executor.stages import StageClock

LOCAL = fsspec.filesystem("file")


def numbered_parquet(path, rows: int, row_group: int, dim: int = 3) -> pa.Table:
    """Row i has key i and embedding [i, i, i] (float16 holds the integers up to 2048 exactly)."""
    values = np.repeat(np.arange(rows, dtype=np.float16), dim)
    table = pa.table({"key": pa.array(np.arange(rows), pa.int64()), "caption": [f"c{i}" for i in range(rows)],
                      "emb": pa.FixedSizeListArray.from_arrays(pa.array(values), dim)},
                     metadata={"origin": "reader-test"})
    pq.write_table(table, path, row_group_size=row_group)
    return table


def read(task, batch_rows, columns=None, clock=None):
    return list(task_batches(task, LOCAL, batch_rows, StageClock() if clock is None else clock, columns))


def test_a_parquet_task_yields_exactly_its_row_groups_in_order(tmp_path):
    path = str(tmp_path / "a.parquet")
    table = numbered_parquet(path, 50, row_group=7)  # 7 groups of 7 rows and one of 1
    task = Task("parquet", path, "a.parquet", (2, 3), rows=14)
    batches = read(task, batch_rows=5)
    # A batch never spans two row groups (one reader per group bounds the memory).
    assert [(first, b.num_rows) for b, _, first in batches] == [(14, 5), (19, 2), (21, 5), (26, 2)]
    assert all(npy is None for _, npy, _ in batches)
    got = pa.Table.from_batches([b for b, _, _ in batches])
    assert got.equals(table.slice(14, 14).replace_schema_metadata(got.schema.metadata))
    for batch, _, first in batches:  # first_row is the batch's first row's index in its file
        assert batch.column("key").to_pylist() == list(range(first, first + batch.num_rows))


def test_tasks_over_all_row_groups_read_every_row_once(tmp_path):
    path = str(tmp_path / "a.parquet")
    numbered_parquet(path, 50, row_group=7)
    tasks = [Task("parquet", path, "x", groups, rows=sum(min(7, 50 - 7 * g) for g in groups))
             for groups in ((0,), (1, 2, 3), (4, 5), (6, 7))]
    keys = [k for task in tasks for b, _, _ in read(task, 4) for k in b.column("key").to_pylist()]
    assert keys == list(range(50))


def test_only_the_columns_asked_for_are_read(tmp_path):
    path = str(tmp_path / "a.parquet")
    numbered_parquet(path, 20, row_group=8)
    task = Task("parquet", path, "a.parquet", (0, 1, 2), rows=20)
    assert {tuple(b.schema.names) for b, _, _ in read(task, 6, ["caption"])} == {("caption",)}
    assert {tuple(b.schema.names) for b, _, _ in read(task, 6)} == {("key", "caption", "emb")}
    # Nothing to keep (a sidecar of row ids): one column is read, to count the rows.
    counted = read(task, 6, [])
    assert {b.num_columns for b, _, _ in counted} == {1} and sum(b.num_rows for b, _, _ in counted) == 20


def test_a_task_whose_row_groups_hold_other_rows_than_planned_reads_nothing(tmp_path):
    path = str(tmp_path / "a.parquet")
    numbered_parquet(path, 20, row_group=8)
    with pytest.raises(InputChangedError, match=r"its row groups \[1, 2\] now hold 12 rows, the plan counted 16"):
        read(Task("parquet", path, "a.parquet", (1, 2), rows=16), 6)


def test_storage_reads_are_timed_apart_from_decoding(tmp_path):
    """The file's reads (its handle, on open_parquet's clock) are the "read" stage; the npy rows' reads are
    timed on task_batches' clock; nothing else is timed by the reader (decoding is the caller's)."""
    path = str(tmp_path / "a.parquet")
    numbered_parquet(path, 20, row_group=8)
    task = Task("parquet", path, "a.parquet", (0, 1, 2), rows=20)
    opening, reading = StageClock(), StageClock()
    with open_parquet(task, LOCAL, opening) as source:
        assert opening.wall["read"] > 0 and set(opening.wall) == {"read"}  # the footer
        source.handle.clock = reading
        list(task_batches(task, LOCAL, 6, StageClock(), source=source))
    assert reading.wall["read"] > 0 and reading.cpu["read"] >= 0 and set(reading.wall) == {"read"}


def test_the_opened_files_schema_is_its_arrow_schema(tmp_path):
    path = str(tmp_path / "a.parquet")
    table = numbered_parquet(path, 5, row_group=5)
    with open_parquet(Task("parquet", path, "a.parquet", (0,)), LOCAL) as source:
        schema = source.schema
    assert schema.remove_metadata().equals(table.schema.remove_metadata())
    assert schema.metadata[b"origin"] == b"reader-test"  # carried into the outputs (writer.output_schemas)


# ------------------------------------------------------------------------------------------ LAION layout


@pytest.fixture
def laion(tmp_path):
    """metadata with 100 rows in row groups of 30 (30, 30, 30, 10) and the npy whose row i is [i, -i]."""
    meta = str(tmp_path / "metadata_0.parquet")
    pq.write_table(pa.table({"key": pa.array(np.arange(100), pa.int64())}), meta, row_group_size=30)
    npy = str(tmp_path / "img_emb_0.npy")
    np.save(npy, np.stack([np.arange(100), -np.arange(100)], axis=1).astype(np.float32))
    return meta, npy


@pytest.mark.parametrize("start,stop", [(0, 100), (25, 65), (30, 60), (59, 61), (90, 100), (99, 100)])
@pytest.mark.parametrize("batch_rows", [7, 30, 1000])
def test_npy_rows_line_up_with_metadata_rows_across_row_groups(laion, start, stop, batch_rows):
    meta, npy = laion
    task = Task("laion-npy", meta, "metadata_0.parquet", (), start, stop, npy, stop - start)
    batches = read(task, batch_rows)
    keys = [k for b, _, _ in batches for k in b.column("key").to_pylist()]
    assert keys == list(range(start, stop))
    for batch, rows, first in batches:
        assert 0 < batch.num_rows <= batch_rows and rows.shape == (batch.num_rows, 2)
        assert rows[:, 0].tolist() == batch.column("key").to_pylist() == list(range(first, first + batch.num_rows))
        assert rows[:, 1].tolist() == [-k for k in range(first, first + batch.num_rows)]


def test_read_npy_rows_reads_a_slice_in_native_byte_order(tmp_path):
    x = (np.arange(40, dtype=np.float64).reshape(10, 4) / 8) - 2
    for dtype in ("<f2", ">f2", "<f4", ">f4", ">f8"):
        path = str(tmp_path / f"x{dtype[1:]}{'be' if dtype[0] == '>' else 'le'}.npy")
        np.save(path, x.astype(dtype))
        rows = read_npy_rows(LOCAL, path, 3, 7)
        assert rows.dtype.isnative and rows.dtype.itemsize == int(dtype[2]) and rows.shape == (4, 4)
        assert rows.tolist() == x[3:7].tolist()  # these values are exact in float16


def test_a_truncated_npy_is_an_input_error_naming_the_file(tmp_path):
    path = tmp_path / "img_emb_0.npy"
    np.save(path, np.ones((10, 4), np.float32))
    path.write_bytes(path.read_bytes()[:-2 * 16])  # the last two rows are gone
    assert read_npy_rows(LOCAL, str(path), 0, 8).shape == (8, 4)  # the rows that are there can be read
    with pytest.raises(InputError, match=rf"{path} is truncated: expected 10 rows of 4 float32"):
        read_npy_rows(LOCAL, str(path), 5, 10)


# ------------------------------------------------------------------------ float-list columns over budget


def embedding_parquet(path, rows: int, dim: int, row_group: int, hole: int | None = None) -> pa.Table:
    """key i, caption, and a dictionary-encoded float16 list column (pyarrow's default writer), small pages.
    ``hole``: that row null and the row after it longer, so the value count is still rows × dim."""
    x = np.random.default_rng(rows).normal(size=(rows, dim)).astype(np.float16)
    emb = pa.ListArray.from_arrays(pa.array(np.arange(rows + 1, dtype=np.int32) * dim), pa.array(x.reshape(-1)))
    if hole is not None:
        data = emb.to_pylist()
        data[hole], data[hole + 1] = None, data[hole + 1] + data[hole + 2][:dim - 1]
        emb = pa.array([None if r is None else [np.float16(v) for v in r] for r in data], pa.list_(pa.float16()))
    table = pa.table({"key": pa.array(np.arange(rows), pa.int64()), "caption": [f"c{i}" for i in range(rows)],
                      "emb": emb})
    pq.write_table(table, path, row_group_size=row_group, data_page_size=2048)
    return table


@pytest.fixture
def streamed(monkeypatch):
    """A float-list chunk over 10 kB is streamed; the list of streams opened (None: refused)."""
    from clip_nsfw_spark.executor import reader

    opened = []
    real = reader.open_float_list_stream

    def spy(*args):
        opened.append(real(*args))
        return opened[-1]

    monkeypatch.setattr(reader, "DECODE_CHUNK_MAX_BYTES", 10_000)
    monkeypatch.setattr(reader, "open_float_list_stream", spy)
    return opened


@pytest.mark.parametrize("batch_rows", [7, 256, 2000, 5000])
@pytest.mark.parametrize("columns", [None, ["emb"], ["emb", "key"]])
def test_float_list_chunks_over_the_budget_are_streamed_in_the_other_columns_batches(tmp_path, streamed,
                                                                                     batch_rows, columns):
    path = str(tmp_path / "a.parquet")
    table = embedding_parquet(path, 3000, 32, row_group=2000)  # 2000 × 32 float16 = 128 kB decoded
    batches = read(Task("parquet", path, "a.parquet", (0, 1), rows=3000), batch_rows, columns)
    assert len(streamed) == 2 and all(s is not None for s in streamed)  # both row groups streamed
    assert all(s.rows_read == s.num_rows for s in streamed)
    want = table.select(columns or table.column_names)
    got = pa.Table.from_batches([b for b, _, _ in batches])
    assert got.schema.remove_metadata() == want.schema and got.equals(want.replace_schema_metadata(got.schema.metadata))
    sizes = [b.num_rows for b, _, _ in batches]
    assert sizes == [min(batch_rows, 2000 - s) for s in range(0, 2000, batch_rows)] + \
        [min(batch_rows, 1000 - s) for s in range(0, 1000, batch_rows)]


def test_a_page_the_stream_cannot_decode_mid_row_group_falls_back_to_pyarrow_for_the_rest(tmp_path, streamed,
                                                                                          monkeypatch, caplog):
    from clip_nsfw_spark.parquet import stream as stream_module
    from clip_nsfw_spark.parquet.errors import Undecodable

    path = str(tmp_path / "a.parquet")
    table = embedding_parquet(path, 3000, 32, row_group=2000)
    real, calls = stream_module.decode_values, []

    def seventh_page_fails(values, encoding, n, dictionary, out):
        calls.append(n)
        if len(calls) == 7:
            raise Undecodable("a page this test made undecodable")
        return real(values, encoding, n, dictionary, out)

    monkeypatch.setattr(stream_module, "decode_values", seventh_page_fails)
    batches = read(Task("parquet", path, "a.parquet", (0, 1), rows=3000), 100)
    got = pa.Table.from_batches([b for b, _, _ in batches])
    assert got.equals(table.replace_schema_metadata(got.schema.metadata))
    assert 0 < streamed[0].rows_read < 2000  # row group 0 switched to pyarrow part way
    assert streamed[1].rows_read == 1000  # row group 1 streamed again from its start
    assert "stream stopped before row" in caplog.text and "a page this test made undecodable" in caplog.text


def test_rows_that_stop_being_uniform_mid_row_group_fall_back_to_pyarrow(tmp_path, streamed):
    # A real file: a null row and a longer row near the end of the row group, after uniform pages.
    path = str(tmp_path / "a.parquet")
    table = embedding_parquet(path, 2000, 16, row_group=2000, hole=1900)
    assert table.column("emb").null_count == 1
    for batch_rows in (64, 1000, 1900, 4096):
        batches = read(Task("parquet", path, "a.parquet", (0,), rows=2000), batch_rows)
        got = pa.Table.from_batches([b for b, _, _ in batches])
        assert got.equals(table.replace_schema_metadata(got.schema.metadata))
    assert [s.rows_read for s in streamed[:3]] == [1856, 1000, 0]  # where each stream gave up


def test_a_large_chunk_the_stream_refuses_up_front_is_read_by_pyarrow(tmp_path, streamed):
    path = str(tmp_path / "a.parquet")
    table = embedding_parquet(path, 2000, 16, row_group=2000, hole=3)  # a null row on the first page
    batches = read(Task("parquet", path, "a.parquet", (0,), rows=2000), 300)
    assert streamed == [None]
    got = pa.Table.from_batches([b for b, _, _ in batches])
    assert got.equals(table.replace_schema_metadata(got.schema.metadata))
