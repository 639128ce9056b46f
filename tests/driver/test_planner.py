"""planner.py: input → tasks that cover every row exactly once, with unique names, stable ids and the identity
of what they read; skipped files named with a reason; LAION files paired by number."""

import gzip
import os
import pickle
import re
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_nsfw_spark.driver.config import JobConfig
from clip_nsfw_spark.errors import ConfigError, InputError
from clip_nsfw_spark.driver.planner import file_identity, footer_cache, plan, read_footer_cache
from clip_nsfw_spark.tools.sample import write_laion_sample, write_parquet_sample

GROUPS = [5, 12, 3, 30, 1, 9]  # uneven row groups, one larger than the rows_per_task tried below


def write_groups(path, sizes, dim=4):
    """A parquet file with one row group per entry of ``sizes``; row i has key i."""
    path.parent.mkdir(parents=True, exist_ok=True)
    start = 0
    schema = pa.schema([("key", pa.int64()), ("emb", pa.list_(pa.float32(), dim))])
    with pq.ParquetWriter(path, schema) as writer:
        for n in sizes:
            values = pa.array(np.zeros(n * dim, np.float32))
            writer.write_table(pa.table({"key": pa.array(np.arange(start, start + n), pa.int64()),
                                         "emb": pa.FixedSizeListArray.from_arrays(values, dim)}, schema=schema))
            start += n
    assert [pq.ParquetFile(path).metadata.row_group(i).num_rows for i in range(len(sizes))] == list(sizes)


def plan_of(path, **options):
    return plan(JobConfig(input=str(path), output="unused", **options))


@pytest.mark.parametrize("rows_per_task", range(1, 62))
def test_row_group_slices_cover_every_row_exactly_once(tmp_path, rows_per_task):
    write_groups(tmp_path / "in" / "a.parquet", GROUPS)
    found = plan_of(tmp_path / "in", rows_per_task=rows_per_task)
    groups = [g for task in found.tasks for g in task.row_groups]
    assert groups == list(range(len(GROUPS)))  # every group once, slices contiguous and in file order
    for task in found.tasks:
        assert task.rows == sum(GROUPS[g] for g in task.row_groups)
        assert task.rows <= rows_per_task or len(task.row_groups) == 1  # only a big group alone may exceed
        assert task.kind == "parquet" and task.path == str(tmp_path / "in" / "a.parquet")
    # Greedy: a slice stops only where the next group would not fit.
    for this, after in zip(found.tasks, found.tasks[1:]):
        assert this.rows + GROUPS[after.row_groups[0]] > rows_per_task
    assert found.total_rows == sum(task.rows for task in found.tasks) == sum(GROUPS)
    rels = [task.rel for task in found.tasks]
    if len(rels) == 1:
        assert rels == ["a.parquet"]
    else:
        assert rels == [f"a.slice-{i:05d}.parquet" for i in range(len(rels))]
    assert len({task.task_id for task in found.tasks}) == len(found.tasks)


def test_slices_of_a_nested_file_stay_in_its_folder(tmp_path):
    write_groups(tmp_path / "in" / "k=1" / "part.pq", [3, 3])
    found = plan_of(tmp_path / "in", rows_per_task=3)
    assert [t.rel for t in found.tasks] == ["k=1/part.slice-00000.parquet", "k=1/part.slice-00001.parquet"]
    assert found.partition_keys == ("k",)


def test_an_empty_file_is_one_task_of_no_rows(tmp_path):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"emb": pa.array([], pa.list_(pa.float32()))}), tmp_path / "in" / "empty.parquet")
    found = plan_of(tmp_path / "in")
    assert [(t.rel, t.rows) for t in found.tasks] == [("empty.parquet", 0)] and found.total_rows == 0


def test_task_ids_are_unique_stable_and_name_safe(tmp_path):
    for name in ("a.parquet", "b/a.parquet", "c/a.parquet", "c/a.parquet.pq"):
        write_groups(tmp_path / "in" / name, [2])
    first, again = plan_of(tmp_path / "in"), plan_of(tmp_path / "in")
    ids = [t.task_id for t in first.tasks]
    assert len(set(ids)) == len({t.rel for t in first.tasks}) == 4
    assert ids == [t.task_id for t in again.tasks]  # a resume finds its state files by these ids
    assert all(re.fullmatch(r"[0-9a-f]{20}", i) for i in ids)
    shutil.copytree(tmp_path / "in", tmp_path / "moved")  # ids name outputs, not where the input lies
    assert [t.task_id for t in plan_of(tmp_path / "moved").tasks] == ids


def test_tasks_cross_to_executors_as_they_are(tmp_path):
    """A Task is plain frozen data: it pickles as it is (no dict on the way), equal and with its id."""
    write_groups(tmp_path / "in" / "a.parquet", [3, 3])
    write_laion_sample(str(tmp_path / "laion"), rows=40, files=1)
    tasks = plan_of(tmp_path / "in", rows_per_task=3).tasks + plan_of(tmp_path / "laion", rows_per_task=15).tasks
    for task in tasks:
        shipped = pickle.loads(pickle.dumps(task))
        assert shipped == task and shipped.task_id == task.task_id and isinstance(shipped.row_groups, tuple)


def test_file_identity_changes_with_size_version_and_footer():
    base = {"size": 100, "mtime": 1_700_000_000_000_000_000}
    same = file_identity(dict(base))
    assert file_identity(base) == same
    assert file_identity(base | {"size": 101}) != same
    assert file_identity(base | {"mtime": base["mtime"] + 1}) != same
    assert file_identity(base, "footer-a") != file_identity(base, "footer-b")
    # An object store's ETag identifies the content: it wins over the time the object was written.
    tagged = file_identity(base | {"ETag": '"abc"'})
    assert tagged == file_identity(base | {"ETag": '"abc"', "mtime": 5}) != file_identity(base | {"ETag": '"abd"'})


def test_a_changed_input_file_changes_its_tasks_source(tmp_path):
    path = tmp_path / "in" / "a.parquet"
    write_groups(path, [4, 4])
    before = plan_of(tmp_path / "in", rows_per_task=4).tasks
    assert len({t.source for t in before}) == 1  # every slice of one file carries the file's identity
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    touched = plan_of(tmp_path / "in", rows_per_task=4).tasks
    assert [t.source for t in touched] != [t.source for t in before]
    write_groups(path, [8])  # same rows, other row groups
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    regrouped = plan_of(tmp_path / "in", rows_per_task=8).tasks
    assert regrouped[0].source not in {t.source for t in touched}


def test_a_changed_npy_file_changes_its_tasks_source(tmp_path):
    write_laion_sample(str(tmp_path / "l"), rows=60, files=1)
    before = plan_of(tmp_path / "l").tasks[0].source
    npy = tmp_path / "l" / "img_emb" / "img_emb_0.npy"
    stat = os.stat(npy)
    os.utime(npy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert plan_of(tmp_path / "l").tasks[0].source != before


def test_laion_files_pair_by_number_in_numeric_order_and_split_into_contiguous_ranges(tmp_path):
    write_laion_sample(str(tmp_path / "l"), rows=11 * 50, files=11, dim=16)  # img_emb_0 … img_emb_10
    found = plan_of(tmp_path / "l", rows_per_task=20)
    assert found.layout == "laion-npy" and found.embedding_columns == ("embedding",) and found.npy_width == 16
    assert found.total_rows == 550 and found.schema.names == ["key", "url", "caption"]
    numbers = []
    for task in found.tasks:
        number = re.fullmatch(r".*/metadata_(\d+)\.parquet", task.path).group(1)
        assert task.kind == "laion-npy" and task.npy_path == str(tmp_path / "l" / "img_emb" / f"img_emb_{number}.npy")
        assert task.rows == task.row_stop - task.row_start and task.row_groups == ()
        numbers.append(int(number))
    assert numbers == sorted(numbers) and sorted(set(numbers)) == list(range(11))  # 2 before 10
    for number in range(11):
        ranges = [(t.row_start, t.row_stop) for t, n in zip(found.tasks, numbers) if n == number]
        assert ranges == [(0, 20), (20, 40), (40, 50)]
        rels = [t.rel for t, n in zip(found.tasks, numbers) if n == number]
        assert rels == [f"metadata_{number}.slice-{i:05d}.parquet" for i in range(3)]
    one = plan_of(tmp_path / "l", rows_per_task=50).tasks
    assert [t.rel for t in one][:3] == ["metadata_0.parquet", "metadata_1.parquet", "metadata_2.parquet"]


def test_files_skipped_in_the_laion_folders_are_named_with_a_reason(tmp_path):
    write_laion_sample(str(tmp_path / "l"), rows=20, files=1)
    (tmp_path / "l" / "img_emb" / "notes.txt").write_text("x")
    (tmp_path / "l" / "metadata" / "readme.md").write_text("x")
    (tmp_path / "l" / "metadata" / "_SUCCESS").write_text("")  # hidden: neither read nor reported
    skipped = sorted((os.path.relpath(p, tmp_path / "l"), why) for p, why in plan_of(tmp_path / "l").skipped)
    assert skipped == [("img_emb/notes.txt", "not a .npy file"), ("metadata/readme.md", "not a parquet file")]


def test_hidden_files_are_neither_read_nor_reported(tmp_path):
    write_groups(tmp_path / "in" / "a.parquet", [2])
    for hidden in ("_SUCCESS", ".a.parquet.crc", "_tmp/b.parquet", ".spark/c.parquet"):
        (tmp_path / "in" / hidden).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / hidden).write_bytes(b"not parquet")
    found = plan_of(tmp_path / "in")
    assert [t.rel for t in found.tasks] == ["a.parquet"] and found.skipped == ()


def test_an_unreadable_footer_is_an_input_error_naming_the_file(tmp_path):
    write_groups(tmp_path / "in" / "a.parquet", [2])
    (tmp_path / "in" / "b.parquet").write_bytes(b"PAR1 but not really")
    with pytest.raises(InputError, match=rf"cannot read parquet file {tmp_path}/in/b.parquet: .*truncated or not "
                                         "parquet"):
        plan_of(tmp_path / "in")


def _same_size_garbage(path):
    """Overwrite ``path`` with bytes no reader can parse, keeping its size and modification time: its listing
    identity stays, so only a planner that does not read its footer can plan it."""
    stat = os.stat(path)
    with open(path, "r+b") as handle:
        handle.write(b"\xab" * stat.st_size)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_resume_plans_unchanged_files_from_the_last_plans_footers(tmp_path):
    write_parquet_sample(str(tmp_path / "in"), rows=900, files=3, row_group_rows=100)
    config = JobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), rows_per_task=250)
    first = plan(config)
    known = read_footer_cache(footer_cache(first.footers))
    assert set(known) == set(first.footers) and len(known) == 3
    for path in known:
        _same_size_garbage(path)
    again = plan(config, known=known)  # no footer read: the files could not be parsed any more
    assert again.tasks == first.tasks and again.schema.equals(first.schema) and again.total_rows == 900
    assert first.footers_changed and not again.footers_changed  # the job writes the kept footers only if changed
    os.remove(sorted(known)[0])  # a file gone: the kept footers name one file too many
    assert plan(config, known=known).footers_changed
    with pytest.raises(InputError, match="cannot read parquet file"):
        plan(config)


def test_a_task_knows_its_files_size_only_when_it_reads_the_whole_file(tmp_path):
    """Task.size lets a reader fetch a small file whole in one request: only for a task that reads all of it
    (a slice would fetch the whole file once per slice)."""
    write_parquet_sample(str(tmp_path / "in"), rows=900, files=3, row_group_rows=100)
    whole = plan(JobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out")))
    assert [t.size for t in whole.tasks] == [os.path.getsize(t.path) for t in whole.tasks]
    sliced = plan(JobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), rows_per_task=250))
    assert len(sliced.tasks) > 3 and {t.size for t in sliced.tasks} == {-1}


def test_a_changed_file_is_read_again_and_a_damaged_cache_is_no_cache(tmp_path):
    write_parquet_sample(str(tmp_path / "in"), rows=900, files=3, row_group_rows=100)
    config = JobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), rows_per_task=250)
    first = plan(config)
    known = read_footer_cache(footer_cache(first.footers))
    changed = sorted(known)[1]
    pq.write_table(pq.read_table(changed).slice(0, 40), changed, row_group_size=20)
    again = plan(config, known=known)
    assert again.footers[changed].num_rows == 40 and again.footers[changed].group_rows == (20, 20)
    assert again.footers_changed
    assert [t.rows for t in again.tasks if t.path == changed] == [40]
    assert again.tasks == plan(config).tasks
    for damaged in (b"", b"not gzip", gzip.compress(b"{}"), gzip.compress(b'{"version": 99}'),
                    footer_cache(first.footers)[:-7]):
        assert read_footer_cache(damaged) == {}


def test_a_fifo_named_like_parquet_in_the_input_is_skipped_never_opened(tmp_path):
    """Hostile review 18: a FIFO named zz.parquet in the input hung the planner (it opened it to read its
    footer; a FIFO blocks until a writer comes). It is listed as not a regular file and skipped."""
    import os
    import threading

    write_groups(tmp_path / "in" / "a.parquet", [2])
    os.mkfifo(tmp_path / "in" / "zz.parquet")
    result = {}
    worker = threading.Thread(target=lambda: result.update(plan=plan_of(tmp_path / "in")), daemon=True)
    worker.start()
    worker.join(60)
    if worker.is_alive():  # unblock the planner's open() so the thread can end, then fail
        with open(tmp_path / "in" / "zz.parquet", "wb"):
            pass
        pytest.fail("the planner blocked on the FIFO")
    found = result["plan"]
    assert [t.rel for t in found.tasks] == ["a.parquet"]
    assert [(path.rsplit("/", 1)[-1], why) for path, why in found.skipped] == [("zz.parquet", "not a regular file (other)")]


def test_the_laion_layout_refuses_a_named_embedding_column_and_says_what_the_folder_lacks(tmp_path):
    """A hostile user's findings: --embedding-column was silently ignored in the LAION layout (the npy rows are
    the embeddings), and a folder with neither img_emb/ nor metadata/ was said to have img_emb/."""
    write_laion_sample(str(tmp_path / "l"), rows=20, files=1, dim=16)
    with pytest.raises(ConfigError, match=r"embedding_columns \['foo'\] name parquet columns; in the LAION layout"):
        plan_of(tmp_path / "l", embedding_columns=("foo",))
    (tmp_path / "flat").mkdir()
    write_parquet_sample(str(tmp_path / "flat"), rows=10, files=1, dim=16)
    with pytest.raises(InputError, match="flat has neither an img_emb/ nor a metadata/ folder"):
        plan_of(tmp_path / "flat", layout="laion-npy")
