"""Issue #10, the data side: no row lost, nothing stale kept, nothing unscored let through as safe.

Each test is a hostile-but-realistic input that lost rows, kept stale outputs or passed unscored rows on
the first version (found by a hostile run), and a few other spellings of the same class.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_nsfw_spark.driver.config import JobConfig
from clip_nsfw_spark.errors import ConfigError, DimensionError, InputError, OutputError
from clip_nsfw_spark.driver.job import _check_rows, run_job
from clip_nsfw_spark.executor.writer import REPORT_NAME, SUCCESS_NAME
from clip_nsfw_spark.contract import Task
from clip_nsfw_spark.driver.planner import plan
from clip_nsfw_spark.tools.sample import embedding_array, embeddings, metadata, write_laion_sample, write_parquet_sample
from conftest import ROOT, needs_models


def run(source, output, runner=None, **options):
    return run_job(JobConfig(input=str(source), output=str(output), **options), runner=runner)


def data_files(root):
    """{relative path: table} of the data files of an output (state and report excluded)."""
    return {str(p.relative_to(root)): pq.read_table(p) for p in sorted(root.rglob("*.parquet"))
            if not str(p.relative_to(root)).startswith("_clip_nsfw")}


def rows_on_disk(root) -> int:
    return sum(t.num_rows for t in data_files(root).values())


def write(path, rows, seed=0, dim=768, dtype=np.float16, start=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(metadata(rows, start) | {"embedding": embedding_array(embeddings(rows, dim, seed, dtype), True)})
    pq.write_table(table, path)
    return table


# ------------------------------------------------------------------ class 3: names that collide, globs, extensions


def test_planner_names_outputs_by_full_relative_path_under_a_glob(tmp_path):
    for run_name, rows in (("run-a", 80), ("run-b", 30), ("run-c", 50)):  # img2dataset runs: same file names
        write(tmp_path / "in" / run_name / "00000.parquet", rows, seed=rows)
    found = plan(JobConfig(input=str(tmp_path / "in" / "run-?" / "*.parquet"), output=str(tmp_path / "o")))
    assert [t.rel for t in found.tasks] == ["run-a/00000.parquet", "run-b/00000.parquet", "run-c/00000.parquet"]
    assert len({t.task_id for t in found.tasks}) == 3 and found.total_rows == 160
    glob_dir = plan(JobConfig(input=str(tmp_path / "in" / "run-*"), output=str(tmp_path / "o")))  # folders matched
    assert [t.rel for t in glob_dir.tasks] == [t.rel for t in found.tasks]


@needs_models
def test_glob_over_same_named_files_keeps_every_row(tmp_path):
    write(tmp_path / "in" / "sub1" / "part.parquet", 800, seed=1)
    write(tmp_path / "in" / "sub2" / "part.parquet", 300, seed=2)
    report = run(str(tmp_path / "in" / "sub?" / "*.parquet"), tmp_path / "out")
    assert sorted(data_files(tmp_path / "out")) == ["sub1/part.parquet", "sub2/part.parquet"]
    assert rows_on_disk(tmp_path / "out") == report["rows"]["read"] == 1100


def test_existing_paths_are_taken_literally_before_glob_expansion(tmp_path):
    write(tmp_path / "data[1]" / "a.parquet", 20)
    write(tmp_path / "data1" / "a.parquet", 30)
    write(tmp_path / "what?" / "a.parquet", 10)
    assert plan(JobConfig(input=str(tmp_path / "data[1]"), output="o")).total_rows == 20
    assert plan(JobConfig(input=str(tmp_path / "what?"), output="o")).total_rows == 10
    assert plan(JobConfig(input=str(tmp_path / "data[1]" / "a.parquet"), output="o")).total_rows == 20


def test_parquet_extensions_are_read_and_anything_skipped_is_reported(tmp_path):
    write(tmp_path / "in" / "a.parquet", 10)
    write(tmp_path / "in" / "b.pq", 20)
    write(tmp_path / "in" / "c.PARQ", 30)
    (tmp_path / "in" / "notes.txt").write_text("not data")
    (tmp_path / "in" / "._a.parquet").write_bytes(b"\0\0macos")  # AppleDouble junk: hidden, ignored
    found = plan(JobConfig(input=str(tmp_path / "in"), output="o"))
    assert [t.rel for t in found.tasks] == ["a.parquet", "b.pq", "c.PARQ"] and found.total_rows == 60
    assert [(os.path.basename(p), why.split(" (")[0]) for p, why in found.skipped] == [
        ("notes.txt", "skipped for its suffix .txt")]
    assert "--input-suffix .txt reads it as parquet" in found.skipped[0][1]


def test_input_suffixes_read_other_endings_as_parquet(tmp_path):
    write(tmp_path / "in" / "a.parquet", 10)
    write(tmp_path / "in" / "b.snappy", 20)  # a parquet file under another name, as some writers name them
    write(tmp_path / "in" / "c.gz.parquet", 5)
    (tmp_path / "in" / "notes.txt").write_text("not data")
    found = plan(JobConfig(input=str(tmp_path / "in"), output="o", input_suffixes=(".SNAPPY",)))
    assert [t.rel for t in found.tasks] == ["a.parquet", "b.snappy", "c.gz.parquet"] and found.total_rows == 35
    assert [os.path.basename(p) for p, _ in found.skipped] == ["notes.txt"]
    for bad in ("snappy", ".", "./x"):
        with pytest.raises(ConfigError, match="input_suffixes are file name endings starting with a dot"):
            JobConfig(input="i", output="o", input_suffixes=(bad,))


@needs_models
@pytest.mark.parametrize("leftover", ["_clip_nsfw_tasks/_job.json", "_clip_nsfw_lease.json"])
def test_an_unfinished_output_of_the_tool_is_refused_as_input_unless_allowed(tmp_path, leftover):
    write(tmp_path / "in" / "a.parquet", 10)
    write(tmp_path / "in" / "b.parquet", 10)
    run(tmp_path / "in", tmp_path / "first")
    assert plan(JobConfig(input=str(tmp_path / "first"), output="o")).total_rows == 20  # finished: fine
    (tmp_path / "first" / "_SUCCESS").unlink()
    (tmp_path / "first" / leftover).parent.mkdir(exist_ok=True)
    (tmp_path / "first" / leftover).write_text("{}")
    for spelling in (tmp_path / "first", tmp_path):  # the output itself, or a folder above it
        with pytest.raises(InputError, match=r"input .*first is an unfinished output of clip-nsfw-spark .* pass "
                                             r"--allow-incomplete-input"):
            plan(JobConfig(input=str(spelling), output="o"))
    assert plan(JobConfig(input=str(tmp_path / "first"), output="o", allow_incomplete_input=True)).total_rows == 20


@needs_models
def test_skipped_files_are_in_the_report(tmp_path):
    write(tmp_path / "in" / "a.parquet", 10)
    (tmp_path / "in" / "readme.md").write_text("#")
    report = run(tmp_path / "in", tmp_path / "out")
    assert report["input"]["skipped_files"] == 1 and "readme.md" in report["input"]["skipped_examples"][0]


def test_two_tasks_that_would_write_one_file_are_refused(tmp_path):
    write(tmp_path / "in" / "a.parquet", 30)
    pq.write_table(pq.read_table(tmp_path / "in" / "a.parquet"), tmp_path / "in" / "a.parquet.tmp", row_group_size=10)
    os.replace(tmp_path / "in" / "a.parquet.tmp", tmp_path / "in" / "a.parquet")  # 3 row groups → 3 slices
    write(tmp_path / "in" / "a.slice-00001.parquet", 5)  # a file named like one of those slices
    with pytest.raises(InputError, match=r"a.parquet and .*a.slice-00001.parquet would both be written as "
                                         r"'a.slice-00001.parquet'"):
        plan(JobConfig(input=str(tmp_path / "in"), output="o", rows_per_task=10))


def test_rows_planned_must_equal_rows_written():
    task = Task("parquet", "/d/a.parquet", "a.parquet", (0,), rows=10)
    from clip_nsfw_spark.driver.planner import Plan

    the_plan = Plan((task,), "parquet", ("embedding",), pa.schema([]), 10)
    good = {"task_id": task.task_id, "rows_read": 10, "rows_rejected": 1, "rows_unsafe": 2,
            "rows_written": {"safe": 7, "unsafe": 2, "rejected": 1}}
    _check_rows(the_plan, [good], "split", "safe")
    lost = good | {"rows_written": {"safe": 5, "unsafe": 2, "rejected": 1}}
    with pytest.raises(OutputError, match=r"task a.parquet .* planned 10 rows, read 10, wrote"):
        _check_rows(the_plan, [lost], "split", "safe")
    short = good | {"rows_read": 9, "rows_written": {"annotated": 9}}
    with pytest.raises(OutputError, match="planned 10 rows, read 9"):
        _check_rows(the_plan, [short], "annotate", "safe")


def test_table_formats_are_refused_not_listed(tmp_path):
    write(tmp_path / "delta" / "part-0.parquet", 10)
    write(tmp_path / "delta" / "part-1-removed.parquet", 10)
    (tmp_path / "delta" / "_delta_log").mkdir()
    (tmp_path / "delta" / "_delta_log" / "00000000000000000000.json").write_text("{}")
    with pytest.raises(InputError, match=r"is a Delta table \(_delta_log/\).*removed versions"):
        plan(JobConfig(input=str(tmp_path / "delta"), output="o"))
    with pytest.raises(InputError, match="Delta table"):
        plan(JobConfig(input=str(tmp_path / "delta" / "*.parquet"), output="o"))


def test_symlinked_sub_folders_are_followed(tmp_path):
    write(tmp_path / "elsewhere" / "b.parquet", 15)
    write(tmp_path / "in" / "a.parquet", 10)
    os.symlink(tmp_path / "elsewhere", tmp_path / "in" / "more")
    found = plan(JobConfig(input=str(tmp_path / "in"), output="o"))
    assert [t.rel for t in found.tasks] == ["a.parquet", "more/b.parquet"] and found.total_rows == 25
    os.symlink(tmp_path / "in", tmp_path / "elsewhere" / "loop")
    with pytest.raises(InputError, match="symlink loop"):
        plan(JobConfig(input=str(tmp_path / "in"), output="o"))


# ------------------------------------------------------------------------ class 4: resume after the input changed


@needs_models
def test_resume_reruns_changed_inputs_and_removes_outputs_of_gone_ones(tmp_path):
    source = tmp_path / "in"
    for index in range(4):
        write(source / f"f{index}.parquet", 1000, seed=index, start=1000 * index)
    out = tmp_path / "out"
    run(source, out, mode="split", threshold=0.05)
    write(source / "f1.parquet", 1500, seed=11, start=5000)  # rewritten: 1000 → 1500 rows
    os.remove(source / "f2.parquet")  # deleted
    write(source / "f9.parquet", 500, seed=9, start=9000)  # added
    report = run(source, out, mode="split", threshold=0.05, resume=True)
    clean = tmp_path / "clean"
    run(source, clean, mode="split", threshold=0.05)
    left, right = data_files(out), data_files(clean)
    assert sorted(left) == sorted(right) and not any("f2" in name for name in left)
    for name in left:
        assert left[name].equals(right[name]), name
    assert report["rows"]["read"] == rows_on_disk(out) - sum(
        t.num_rows for n, t in left.items() if n.startswith("_rejected")) == 4000
    assert report["resume"] == {"reused": 2, "rerun_changed": ["f1.parquet"], "rerun_missing": [],
                                "removed_gone": ["f2.parquet"], "removed_unrecorded": []}


@needs_models
def test_resume_after_touching_a_file_reruns_it(tmp_path):
    source = tmp_path / "in"
    write(source / "a.parquet", 100)
    run(source, tmp_path / "out")
    table = pq.read_table(source / "a.parquet")
    pq.write_table(table.set_column(0, "key", pa.array(["changed"] * 100)), source / "a.parquet")  # same rows
    report = run(source, tmp_path / "out", resume=True)
    assert report["resume"]["rerun_changed"] == ["a.parquet"]
    assert set(pq.read_table(tmp_path / "out" / "a.parquet").column("key").to_pylist()) == {"changed"}


# ------------------------------------------------------------------------------- class 5: LAION file pairing


def test_laion_files_pair_by_the_number_as_written(tmp_path):
    write_laion_sample(str(tmp_path / "l"), rows=200, files=2)
    os.rename(tmp_path / "l" / "metadata" / "metadata_0.parquet", tmp_path / "l" / "metadata" / "metadata_00.parquet")
    with pytest.raises(InputError, match=r"img_emb_0.npy has no partner file number 0 in metadata/ \(a file "
                                         r"numbered '00' is there"):
        plan(JobConfig(input=str(tmp_path / "l"), output="o"))
    os.rename(tmp_path / "l" / "metadata" / "metadata_00.parquet", tmp_path / "l" / "metadata" / "metadata_0.parquet")
    np.save(tmp_path / "l" / "img_emb" / "img_emb_01.npy", embeddings(100, 768, 5))
    with pytest.raises(InputError, match=r"img_emb_01.npy and .*img_emb_1.npy have the same number written differently"):
        plan(JobConfig(input=str(tmp_path / "l"), output="o"))


def test_laion_layout_ignores_hidden_files_and_checks_every_npy_header(tmp_path):
    write_laion_sample(str(tmp_path / "l"), rows=200, files=2)
    (tmp_path / "l" / "img_emb" / "._img_emb_0.npy").write_bytes(b"\0\x05\x16\x07AppleDouble")
    (tmp_path / "l" / "metadata" / "._metadata_0.parquet").write_bytes(b"\0\x05\x16\x07")
    assert plan(JobConfig(input=str(tmp_path / "l"), output="o")).total_rows == 200
    np.save(tmp_path / "l" / "img_emb" / "img_emb_1.npy", embeddings(100, 512, 1))
    with pytest.raises(InputError, match=r"img_emb_1.npy holds 512-d embeddings but .*img_emb_0.npy holds 768-d"):
        plan(JobConfig(input=str(tmp_path / "l"), output="o"))
    np.save(tmp_path / "l" / "img_emb" / "img_emb_1.npy", np.array([[object()]] * 100, dtype=object))
    with pytest.raises(InputError, match=r"img_emb_1.npy holds object values .*expected float16, float32 or float64"):
        plan(JobConfig(input=str(tmp_path / "l"), output="o"))
    npy = tmp_path / "l" / "img_emb" / "img_emb_1.npy"
    np.save(npy, embeddings(100, 768, 1))
    npy.write_bytes(npy.read_bytes()[:-10])
    with pytest.raises(InputError, match=r"img_emb_1.npy is truncated: expected 100 rows of 768 float16"):
        plan(JobConfig(input=str(tmp_path / "l"), output="o"))


@needs_models
def test_big_endian_npy_scores_like_little_endian(tmp_path):
    write_laion_sample(str(tmp_path / "l"), rows=100, files=1)
    run(tmp_path / "l", tmp_path / "little")
    npy = tmp_path / "l" / "img_emb" / "img_emb_0.npy"
    np.save(npy, np.load(npy).astype(">f2"))
    run(tmp_path / "l", tmp_path / "big")
    assert pq.read_table(tmp_path / "big" / "metadata_0.parquet").equals(
        pq.read_table(tmp_path / "little" / "metadata_0.parquet"))


# --------------------------------------------------------------------- class 6: unscored rows are never "safe"


@needs_models
def test_rows_that_cannot_be_scored_are_rejected_never_kept_as_safe(tmp_path, scorers):
    good = embeddings(5, 768, 3, np.float64)
    overflow = good[0].copy()
    overflow[10] = 1e300  # float32(1e300) = inf
    blowup = np.full(768, 3e38)  # finite in float32; the MLP overflows → NaN score
    rows = [good[0].tolist(), overflow.tolist(), blowup.tolist(), good[1].tolist(), good[2].tolist()]
    with_null = good[3].tolist()
    with_null[7] = None
    rows.append(with_null)
    table = pa.table(metadata(6, 0) | {"embedding": pa.array(rows, pa.list_(pa.float64()))})
    (tmp_path / "in").mkdir()
    pq.write_table(table, tmp_path / "in" / "x.parquet")
    assert not np.isfinite(scorers["vit-l-14"](blowup[None, :])[0])  # the premise of the blow-up row

    report = run(tmp_path / "in", tmp_path / "ann")
    out = pq.read_table(tmp_path / "ann" / "x.parquet")
    assert out.column("nsfw_reject_reason").to_pylist() == [
        None, "value out of float32 range", "score not finite", None, None, "null value in embedding"]
    assert out.column("punsafe").null_count == 3
    assert report["rows"]["rejected_by_reason"] == {"value out of float32 range": 1, "score not finite": 1,
                                                    "null value in embedding": 1}
    for keep in ("safe", "unsafe"):
        run(tmp_path / "in", tmp_path / f"filter-{keep}", mode="filter", threshold=0.0 if keep == "unsafe" else 1.0,
            keep=keep)
        kept = pq.read_table(tmp_path / f"filter-{keep}" / "x.parquet")
        rejected = pq.read_table(tmp_path / f"filter-{keep}" / "_rejected" / "x.parquet")
        assert kept.column("key").to_pylist() == ["000000000", "000000003", "000000004"]
        assert rejected.column("key").to_pylist() == ["000000001", "000000002", "000000005"]


# ------------------------------------------------------------------------ class 7: duplicate output columns


@needs_models
def test_an_existing_score_column_is_refused_or_replaced_in_place(tmp_path):
    n = 50
    x = embeddings(n, 768, 4)
    joined = pa.table(metadata(n, 0) | {"punsafe": pa.array(np.full(n, 0.25, np.float64)),
                                        "embedding": embedding_array(x, True)})
    (tmp_path / "in").mkdir()
    pq.write_table(joined, tmp_path / "in" / "a.parquet")
    with pytest.raises(InputError, match=r"already has a column 'punsafe' .*--score-column NAME .*--replace-scores"):
        run(tmp_path / "in", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    run(tmp_path / "in", tmp_path / "renamed", score_columns=("punsafe_v2",))
    renamed = pq.read_table(tmp_path / "renamed" / "a.parquet")
    assert renamed.column_names == ["key", "url", "caption", "punsafe", "embedding", "punsafe_v2", "nsfw_reject_reason"]
    run(tmp_path / "in", tmp_path / "replaced", replace_scores=True)
    replaced = pq.read_table(tmp_path / "replaced" / "a.parquet")
    assert replaced.column_names == ["key", "url", "caption", "punsafe", "embedding", "nsfw_reject_reason"]
    assert replaced.schema.field("punsafe").type == pa.float32()
    assert replaced.column("punsafe").equals(renamed.column("punsafe_v2"))


@needs_models
def test_an_output_scored_again(tmp_path):
    write_parquet_sample(str(tmp_path / "in"), rows=300, files=1)
    run(tmp_path / "in", tmp_path / "once")
    with pytest.raises(InputError, match="already has a column 'punsafe'"):
        run(tmp_path / "once", tmp_path / "twice", mode="filter", threshold=1.0)
    run(tmp_path / "once", tmp_path / "twice", mode="filter", threshold=1.0, replace_scores=True)
    once = pq.read_table(tmp_path / "once" / "part-00000.parquet")
    twice = pq.read_table(tmp_path / "twice" / "part-00000.parquet")
    assert twice.equals(once)  # same columns, same scores, reason rewritten (null: every row was scored)


def test_colliding_reason_and_score_column_names_are_refused(tmp_path):
    write(tmp_path / "in" / "a.parquet", 10)
    with pytest.raises(InputError, match="already has a column 'key'"):
        run(tmp_path / "in", tmp_path / "o1", reason_column="key")
    with pytest.raises(InputError, match="already has a column 'key'"):
        run(tmp_path / "in", tmp_path / "o1", reason_column="key", replace_scores=True)
    with pytest.raises(ConfigError, match="two columns named 'x'"):
        run(tmp_path / "in", tmp_path / "o2", score_columns=("x",), reason_column="x")
    with pytest.raises(InputError, match="'embedding' is an embedding column this run scores"):
        run(tmp_path / "in", tmp_path / "o3", score_columns=("embedding",), replace_scores=True)
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o3"))


# --------------------------------------------------------------- class 9: errors are one line, checked early


def test_writer_options_are_checked_before_any_work():
    with pytest.raises(ConfigError, match="compression must be one of none, snappy, gzip, brotli, lz4, zstd; "
                                          "found 'zstdd'"):
        JobConfig(input="in", output="out", compression="zstdd")


def _cli(*args, timeout=600):
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable)
    return subprocess.run([sys.executable, "-m", "clip_nsfw_spark.cli", "run", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=timeout)


@needs_models
def test_an_error_inside_a_spark_task_is_one_line_and_the_run_resumable(tmp_path):
    source = tmp_path / "in"
    write_parquet_sample(str(source), rows=600, files=3, row_group_rows=100, fixed=False, dtype=np.float32)
    victim = source / "part-00001.parquet"
    good = victim.read_bytes()
    meta = pq.read_metadata(victim)
    column = meta.row_group(0).column(meta.schema.to_arrow_schema().get_field_index("embedding"))
    damaged = bytearray(good)
    start = column.data_page_offset + 40
    damaged[start:start + 2000] = os.urandom(2000)  # the data pages, not the footer: only the task sees it
    victim.write_bytes(bytes(damaged))
    result = _cli("--input", str(source), "--output", str(tmp_path / "out"), "--master", "local[2]")
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("clip-nsfw-spark: error:")]
    assert len(errors) == 1 and "part-00001.parquet" in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / SUCCESS_NAME).exists()
    victim.write_bytes(good)
    resumed = _cli("--input", str(source), "--output", str(tmp_path / "out"), "--resume", "--master", "local[2]")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert rows_on_disk(tmp_path / "out") == 600 and (tmp_path / "out" / SUCCESS_NAME).exists()
    assert not (tmp_path / "out" / "_clip_nsfw_tmp").exists()


@needs_models
def test_an_unwritable_output_is_one_line(tmp_path):
    write(tmp_path / "in" / "a.parquet", 10)
    (tmp_path / "file").write_text("x")
    result = _cli("--input", str(tmp_path / "in"), "--output", str(tmp_path / "file" / "out"), "--local-runner")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "file/out" in result.stderr.splitlines()[-1]


@needs_models
def test_dimension_is_checked_on_every_npy_file_before_any_task(tmp_path):
    write_laion_sample(str(tmp_path / "l"), rows=100, files=1, dim=512)
    with pytest.raises(DimensionError, match=r"holds 512-d embeddings but model 'vit-l-14' expects 768-d"):
        run(tmp_path / "l", tmp_path / "out")
    report = json.loads(json.dumps(run(tmp_path / "l", tmp_path / "out", model="vit-b-32")))
    assert report["rows"]["read"] == 100 and (tmp_path / "out" / REPORT_NAME).exists()


# ------------------------------------------------- a second hostile run (on the merged #10/#14 code)


@needs_models
def test_an_interrupted_overwrite_never_leaves_an_output_that_looks_complete(tmp_path, monkeypatch):
    from clip_nsfw_spark.driver import output

    source = tmp_path / "in"
    write_parquet_sample(str(source), rows=400, files=8)
    run(source, tmp_path / "out")
    removed, real_remove = [], output.remove

    def remove_then_interrupt(fs, path, *args, **kwargs):  # Ctrl-C in the middle of clearing the output
        removed.append(str(path))
        if len(removed) == 12:  # markers, 8 task states, then 2 data files; the lease's clean-up must still work
            raise KeyboardInterrupt
        return real_remove(fs, path, *args, **kwargs)

    monkeypatch.setattr(output, "remove", remove_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(source, tmp_path / "out", overwrite=True)
    monkeypatch.setattr(output, "remove", real_remove)
    assert removed[:2] == [str(tmp_path / "out" / SUCCESS_NAME), str(tmp_path / "out" / REPORT_NAME)]
    assert not (tmp_path / "out" / SUCCESS_NAME).exists() and not (tmp_path / "out" / REPORT_NAME).exists()
    assert not list((tmp_path / "out" / "_clip_nsfw_tasks").glob("[0-9a-f]*.json"))
    report = run(source, tmp_path / "out", resume=True)
    assert report["tasks_resumed"] == 0 and rows_on_disk(tmp_path / "out") == 400


@needs_models
def test_resume_reruns_a_task_whose_outputs_are_missing(tmp_path):
    source = tmp_path / "in"
    write_parquet_sample(str(source), rows=300, files=3)
    run(source, tmp_path / "out")
    os.remove(tmp_path / "out" / "part-00001.parquet")  # the state file says done; the file is gone
    report = run(source, tmp_path / "out", resume=True)
    assert report["tasks_resumed"] == 2 and rows_on_disk(tmp_path / "out") == 300
    assert report["resume"]["rerun_missing"] == ["part-00001.parquet"] and report["resume"]["rerun_changed"] == []
    assert report["output"] == str(tmp_path / "out")  # the canonical spelling the CLI prints


@needs_models
def test_input_files_that_are_symlinks_into_the_output_are_refused(tmp_path):
    source = tmp_path / "in"
    write_parquet_sample(str(source), rows=200, files=2)
    run(source, tmp_path / "out", mode="split", threshold=0.01)
    (tmp_path / "curated").mkdir()
    for path in (tmp_path / "out" / "safe").glob("*.parquet"):
        os.symlink(path, tmp_path / "curated" / path.name)
    with pytest.raises(OutputError, match=r"input file .*curated/part-0000\d.parquet is .*out/safe/.*inside the output"):
        run(tmp_path / "curated", tmp_path / "out", overwrite=True, score_columns=("p2",))
    assert rows_on_disk(tmp_path / "curated") > 0 and (tmp_path / "out" / SUCCESS_NAME).exists()


@needs_models
def test_an_output_inside_a_symlinked_folder_of_the_input_is_refused(tmp_path):
    write_parquet_sample(str(tmp_path / "in"), rows=100, files=1)
    write_parquet_sample(str(tmp_path / "other"), rows=50, files=1)
    os.symlink(tmp_path / "other", tmp_path / "in" / "more")
    with pytest.raises(OutputError, match=r"output .*other/scored is inside .*other, a folder of the input"):
        run(tmp_path / "in", tmp_path / "other" / "scored")
    assert not (tmp_path / "other" / "scored").exists()


@needs_models
def test_an_output_inside_another_output_is_refused(tmp_path):
    write_parquet_sample(str(tmp_path / "in"), rows=100, files=1)
    run(tmp_path / "in", tmp_path / "out")
    with pytest.raises(OutputError, match=r"output .*out/v2 is inside .*out, an output of clip-nsfw-spark"):
        run(tmp_path / "in", tmp_path / "out" / "v2")


@needs_models
def test_a_row_rejected_on_one_column_is_not_counted_unsafe_on_another(tmp_path):
    x = embeddings(300, 768, 6, np.float32)
    rows = [r.tolist() for r in x]
    other = list(rows)
    other[0] = None
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"img": pa.array(rows, pa.list_(pa.float32())),
                             "txt": pa.array(other, pa.list_(pa.float32()))}), tmp_path / "in" / "a.parquet")
    report = run(tmp_path / "in", tmp_path / "split", mode="split", threshold=0.0, embedding_columns=("img", "txt"))
    assert report["rows"] | {"written": None} == report["rows"] | {
        "read": 300, "unsafe": 299, "safe": 0, "rejected": 1, "written": None}
    assert report["rows"]["written"] == {"safe": 0, "unsafe": 299, "rejected": 1}


def test_hive_folder_keys_that_clash_with_a_new_column_are_refused(tmp_path):
    for value in (0, 1):
        write(tmp_path / "in" / f"punsafe={value}" / "a.parquet", 10, seed=value)
    with pytest.raises(InputError, match=r"folders are named punsafe=…, which readers of the output turn into a column"):
        run(tmp_path / "in", tmp_path / "out")
    assert plan(JobConfig(input=str(tmp_path / "in"), output="o")).partition_keys == ("punsafe",)


@pytest.mark.parametrize("folder", ["PUNSAFE", "Punsafe", "nsfw_REJECT_reason"])
def test_hive_folder_keys_that_differ_only_in_case_are_refused(tmp_path, folder):
    """Spark compares column names ignoring case: a PUNSAFE=0/ folder replaces every score (issue #23, class 7)."""
    for value in (0, 1):
        write(tmp_path / "in" / f"{folder}={value}" / "a.parquet", 10, seed=value)
    with pytest.raises(InputError, match=rf"folders are named {folder}=…, .*ignoring case"):
        run(tmp_path / "in", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_input_columns_that_differ_only_in_case_from_a_new_column_are_refused(tmp_path):
    table = write(tmp_path / "staging.parquet", 10)
    (tmp_path / "in").mkdir()
    pq.write_table(table.append_column("PUNSAFE", pa.array([0.5] * 10, pa.float32())), tmp_path / "in" / "a.parquet")
    with pytest.raises(InputError, match=r"the input has a column 'PUNSAFE', which Spark .* would take for the new "
                                         r"column 'punsafe'"):
        run(tmp_path / "in", tmp_path / "out", replace_scores=True)
    with pytest.raises(InputError, match=r"the input has a column 'key', which Spark .* new column 'KEY'"):
        run(tmp_path / "in", tmp_path / "out", score_columns=("KEY",))
    with pytest.raises(ConfigError, match=r"two columns named 'P', 'p'"):
        run(tmp_path / "in", tmp_path / "out", score_columns=("p",), reason_column="P")
    assert not (tmp_path / "out").exists()
    report = run(tmp_path / "in", tmp_path / "out", drop_columns=("PUNSAFE",))  # the way out the message gives
    assert report["rows"]["read"] == 10
    assert pq.read_table(tmp_path / "out").column_names[-2:] == ["punsafe", "nsfw_reject_reason"]


def test_underscore_hive_keys_are_read_as_spark_reads_them(tmp_path):
    write(tmp_path / "in" / "_shard=1" / "a.parquet", 10)
    write(tmp_path / "in" / "_tmp" / "b.parquet", 10)  # a plain _ folder stays hidden
    found = plan(JobConfig(input=str(tmp_path / "in"), output="o"))
    assert [t.rel for t in found.tasks] == ["_shard=1/a.parquet"]


def test_table_formats_above_the_input_and_iceberg_are_refused(tmp_path):
    write(tmp_path / "delta" / "date=1" / "part-0.parquet", 10)
    (tmp_path / "delta" / "_delta_log").mkdir()
    with pytest.raises(InputError, match=r"delta is a Delta table \(_delta_log/\)"):
        plan(JobConfig(input=str(tmp_path / "delta" / "date=1"), output="o"))
    write(tmp_path / "ice" / "data" / "part-0.parquet", 10)
    (tmp_path / "ice" / "metadata").mkdir()
    (tmp_path / "ice" / "metadata" / "v1.metadata.json").write_text("{}")
    for target in (tmp_path / "ice", tmp_path / "ice" / "data"):
        with pytest.raises(InputError, match=r"ice is an Iceberg table"):
            plan(JobConfig(input=str(target), output="o"))


def test_files_beside_the_laion_folders_are_reported(tmp_path):
    write_laion_sample(str(tmp_path / "l"), rows=100, files=1)
    (tmp_path / "l" / "text_emb").mkdir()
    write(tmp_path / "l" / "stray.parquet", 5)
    skipped = sorted(os.path.basename(p) for p, _ in plan(JobConfig(input=str(tmp_path / "l"), output="o")).skipped)
    assert skipped == ["stray.parquet", "text_emb"]


@pytest.mark.parametrize("spelling,message", [
    ("{d}/in/**.parquet", "is not a valid glob"),
    ("foo://bucket/x", "cannot use foo://bucket/x: Protocol not known"),
])
def test_bad_input_urls_are_one_line(tmp_path, spelling, message):
    write(tmp_path / "in" / "a.parquet", 10)
    result = _cli("--input", spelling.format(d=tmp_path), "--output", str(tmp_path / "o"), "--local-runner")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert message in result.stderr.splitlines()[-1]


def test_input_files_with_repeated_column_names_are_refused_at_planning(tmp_path):
    (tmp_path / "in").mkdir()
    table = pa.Table.from_arrays([pa.array(["a"]), pa.array(["b"]), embedding_array(embeddings(1, 768, 0), True)],
                                 names=["key", "key", "embedding"])
    pq.write_table(table, tmp_path / "in" / "a.parquet")
    with pytest.raises(InputError, match=r"a.parquet has several columns named 'key'"):
        plan(JobConfig(input=str(tmp_path / "in"), output="o"))


@needs_models
def test_resume_accepts_other_spellings_of_the_same_input(tmp_path, monkeypatch):
    write_parquet_sample(str(tmp_path / "in"), rows=200, files=2)
    run(str(tmp_path / "in"), tmp_path / "out")
    os.remove(tmp_path / "out" / SUCCESS_NAME)
    monkeypatch.chdir(tmp_path)
    for spelling in (str(tmp_path / "in") + "/", "in", "./in/"):
        assert run(spelling, tmp_path / "out", resume=True)["tasks_resumed"] == 2


@needs_models
def test_an_existing_folder_with_a_glob_character_is_literal_for_the_output_check(tmp_path):
    write_parquet_sample(str(tmp_path / "q?x" / "in"), rows=50, files=1)
    report = run(tmp_path / "q?x" / "in", tmp_path / "q?x" / "out")
    assert report["rows"]["read"] == 50


def test_empty_column_names_are_refused():
    with pytest.raises(ConfigError, match="score_columns must hold column names; found an empty name"):
        JobConfig(input="i", output="o", score_columns=("",))


@pytest.mark.parametrize("key", ["source_file", "ROW_INDEX"])
def test_hive_folders_named_like_the_row_ids_are_refused_in_scores_mode(tmp_path, key):
    for value in ("a", "b"):
        path = tmp_path / "in" / f"{key}={value}" / "p.parquet"
        path.parent.mkdir(parents=True)
        pq.write_table(pa.table({"caption": ["x"] * 5, "embedding": embedding_array(embeddings(5, 768, 1), True)}), path)
    with pytest.raises(InputError, match=rf"folders are named {key}=…, .*Name an id column with --id-column"):
        run(tmp_path / "in", tmp_path / "out", mode="scores")


@needs_models
def test_parts_of_an_unfinished_output_are_refused_as_input(tmp_path):
    write(tmp_path / "in" / "a.parquet", 10)
    write(tmp_path / "in" / "b.parquet", 10)
    run(tmp_path / "in", tmp_path / "split", mode="split", threshold=0.05)
    (tmp_path / "split" / "_SUCCESS").unlink()
    for spelling in ("split/safe", "split/unsafe/a.parquet", "split/safe/*.parquet"):
        with pytest.raises(InputError, match=r"input .*split is an unfinished output of clip-nsfw-spark"):
            plan(JobConfig(input=str(tmp_path / spelling), output="o"))
        assert plan(JobConfig(input=str(tmp_path / spelling), output="o", allow_incomplete_input=True)).tasks
