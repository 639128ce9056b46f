"""Planning from the listing (planner.planned_from_listing): above LISTING_PLAN_FILES files on a remote store, a
small file becomes one task without its footer being read on the driver; its task reads the footer, counts its
rows and checks its schema. Real S3 server (tests/s3server.py, its proxy counts every request), real models;
the threshold is lowered so that a few files cross it."""

import dataclasses

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_nsfw_spark.contract import ROWS_FROM_FOOTER
from clip_nsfw_spark.driver import planner
from clip_nsfw_spark.driver.config import JobConfig
from clip_nsfw_spark.driver.job import run_job, run_sequentially
from clip_nsfw_spark.errors import InputChangedError, InputError
from clip_nsfw_spark.executor import reader
from clip_nsfw_spark.spark.runner import spark_runner
from clip_nsfw_spark.storage.filesystem import find_fresh
from clip_nsfw_spark.tools.sample import write_parquet_sample
from conftest import needs_models
from s3server import LatencyProxy

BUCKET = "listplan"


@pytest.fixture
def listed(s3_server, monkeypatch):
    """(filesystem, storage options through a counting proxy, the proxy); 6 files of 100 rows in BUCKET/in,
    and more than LISTING_PLAN_FILES files from 4 on."""
    fs = s3_server.filesystem()
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
        write_parquet_sample(f"s3://{BUCKET}/in", rows=600, files=6, row_group_rows=40,
                             storage_options=s3_server.storage_options())
    monkeypatch.setattr(planner, "LISTING_PLAN_FILES", 3)
    proxy = LatencyProxy(s3_server.port, delay=0)
    yield fs, dict(s3_server.storage_options(), endpoint_url=proxy.endpoint), proxy
    proxy.close()


def copy_input(fs, folder: str, files: int) -> None:
    """The first ``files`` files of BUCKET/in copied to BUCKET/``folder``, an input of this test's own."""
    for i in range(files):
        fs.copy(f"{BUCKET}/in/part-{i:05d}.parquet", f"{BUCKET}/{folder}/part-{i:05d}.parquet")


def outputs(fs, root) -> dict[str, bytes]:
    return {path[len(root):]: fs.cat_file(path) for path in sorted(find_fresh(fs, root)) if path.endswith(".parquet")}


def test_only_the_first_footer_is_read_and_the_other_files_are_one_task_each(listed, monkeypatch):
    fs, options, proxy = listed
    config = JobConfig(input=f"s3://{BUCKET}/in", output=f"s3://{BUCKET}/never", storage_options=options,
                       rows_per_task=1000)
    plan = planner.plan(config)
    read = sorted(path for kind, path, _ in proxy.log if kind == "GET" and path.endswith(".parquet"))
    assert read == [f"/{BUCKET}/in/part-00000.parquet"]  # the schema's footer, nothing else
    # The first file is planned from its footer (its row groups of 40, 40 and 20 rows) ...
    assert (plan.tasks[0].rows, plan.tasks[0].row_groups) == (100, (0, 1, 2))
    listed_tasks = plan.tasks[1:]
    # ... the other five from their listing: one task each, its size, rows counted when it runs.
    assert [t.rel for t in listed_tasks] == [f"part-0000{i}.parquet" for i in range(1, 6)]
    assert all(t.rows == ROWS_FROM_FOOTER and t.row_groups == () and t.size == fs.size(f"{BUCKET}/in/{t.rel}")
               for t in listed_tasks)
    assert plan.listed == 5 and plan.total_rows == 100 and plan.schema_of == f"s3://{BUCKET}/in/part-00000.parquet"
    # At or below the threshold, or for a file larger than rows_per_task rows of 512-d float16 would fill,
    # every footer is read as before.
    monkeypatch.setattr(planner, "LISTING_PLAN_FILES", 6)
    assert planner.plan(config).listed == 0
    monkeypatch.setattr(planner, "LISTING_PLAN_FILES", 3)
    assert planner.plan(dataclasses.replace(config, read_every_footer=True)).listed == 0  # the way out
    smallest = min(t.size for t in listed_tasks)
    assert planner.plan(JobConfig(input=config.input, output=config.output, storage_options=options,
                                  rows_per_task=smallest // 1024 - 1)).listed == 0


def test_a_local_input_is_always_planned_from_its_footers(tmp_path, monkeypatch):
    write_parquet_sample(str(tmp_path / "in"), rows=600, files=6)
    monkeypatch.setattr(planner, "LISTING_PLAN_FILES", 3)
    plan = planner.plan(JobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out")))
    assert plan.listed == 0 and all(t.rows == 100 for t in plan.tasks)


@needs_models
def test_a_run_planned_from_the_listing_writes_what_a_run_planned_from_footers_writes(listed, monkeypatch):
    fs, options, _ = listed
    from_listing = run_job(JobConfig(input=f"s3://{BUCKET}/in", output=f"s3://{BUCKET}/listing",
                                     storage_options=options))
    monkeypatch.setattr(planner, "LISTING_PLAN_FILES", 100)
    from_footers = run_job(JobConfig(input=f"s3://{BUCKET}/in", output=f"s3://{BUCKET}/footers",
                                     storage_options=options))
    assert from_listing["input"]["tasks_planned_from_listing"] == 5
    assert from_footers["input"]["tasks_planned_from_listing"] == 0
    assert from_listing["input"]["rows"] == from_footers["input"]["rows"] == 600
    assert from_listing["rows"] == from_footers["rows"] and from_listing["rows"]["read"] == 600
    assert from_listing["throughput_rows_per_second"] > 0
    assert outputs(fs, f"{BUCKET}/listing") == outputs(fs, f"{BUCKET}/footers")  # byte for byte


@needs_models
def test_on_spark_the_tasks_planned_from_the_listing_write_the_same_output(listed, spark):
    """Spark packs them by their estimated weight; the progress watcher counts tasks (rows are not known)."""
    fs, options, _ = listed
    config = dict(input=f"s3://{BUCKET}/in", storage_options=options)
    here = run_job(JobConfig(output=f"s3://{BUCKET}/here", **config))
    there = run_job(JobConfig(output=f"s3://{BUCKET}/spark", **config), runner=spark_runner(spark), progress=True)
    assert there["input"] == here["input"] and there["rows"] == here["rows"]
    assert outputs(fs, f"{BUCKET}/here") == outputs(fs, f"{BUCKET}/spark")


@needs_models
def test_a_resume_takes_every_task_planned_from_the_listing_and_reruns_a_changed_file(listed):
    fs, options, proxy = listed
    copy_input(fs, "changing", 5)
    config = dict(input=f"s3://{BUCKET}/changing", output=f"s3://{BUCKET}/resumed", storage_options=options)
    first = run_job(JobConfig(**config))
    proxy.log.clear()
    again = run_job(JobConfig(resume=True, **config))
    assert again["tasks_resumed"] == 5 and again["throughput_rows_per_second"] is None
    assert again["input"]["rows"] == 500 and again["rows"] == first["rows"]
    assert not [path for kind, path, _ in proxy.log if "/changing/part-00003" in path]  # not read again
    # A file rewritten (same rows, other values): its listing identity (ETag) changed, its task runs again.
    table = pq.read_table(fs.open(f"{BUCKET}/changing/part-00003.parquet"))
    table = table.set_column(0, table.schema[0], pa.array(table.column(0).to_pylist()[::-1], table.schema[0].type))
    with fs.open(f"{BUCKET}/changing/part-00003.parquet", "wb") as handle:
        pq.write_table(table, handle)
    rerun = run_job(JobConfig(resume=True, **config))
    assert rerun["tasks_resumed"] == 4 and rerun["resume"]["rerun_changed"] == ["part-00003.parquet"]
    assert rerun["input"]["rows"] == 500 and rerun["rows"]["read"] == 500


@needs_models
def test_a_resume_of_an_output_planned_from_footers_keeps_planning_those_files_from_them(listed, monkeypatch):
    fs, options, proxy = listed
    config = dict(input=f"s3://{BUCKET}/in", output=f"s3://{BUCKET}/older", storage_options=options)
    monkeypatch.setattr(planner, "LISTING_PLAN_FILES", 100)  # as an output written before planning from listings
    run_job(JobConfig(**config))
    monkeypatch.setattr(planner, "LISTING_PLAN_FILES", 3)
    proxy.log.clear()
    again = run_job(JobConfig(resume=True, **config))
    assert again["tasks_resumed"] == 6 and again["input"]["tasks_planned_from_listing"] == 0  # nothing rerun
    assert not [path for kind, path, _ in proxy.log if kind == "GET" and "/in/part-00003" in path]


@needs_models
def test_a_file_of_another_schema_is_refused_by_its_task_naming_both_files_and_a_resume_finishes(listed):
    fs, options, _ = listed
    copy_input(fs, "mixed", 4)
    table = pq.read_table(fs.open(f"{BUCKET}/in/part-00004.parquet"))
    with fs.open(f"{BUCKET}/mixed/part-00004.parquet", "wb") as handle:  # one more column
        pq.write_table(table.append_column("extra", pa.array(range(table.num_rows))), handle)
    config = dict(input=f"s3://{BUCKET}/mixed", output=f"s3://{BUCKET}/mixed-out", storage_options=options)

    def in_name_order(tasks, worker):  # the odd file last, as Spark's other tasks go on when one fails
        return run_sequentially(sorted(tasks, key=lambda task: task.rel), worker)

    with pytest.raises(InputError, match=rf"the schema of s3://{BUCKET}/mixed/part-00004\.parquet differs from "
                                         rf"s3://{BUCKET}/mixed/part-00000\.parquet \(extra: missing vs int64\)\. "
                                         r"All input files must share one schema.*planned from its listing"):
        run_job(JobConfig(**config), runner=in_name_order)
    written = [path for path in find_fresh(fs, f"{BUCKET}/mixed-out") if path.endswith(".parquet")]
    assert not [path for path in written if "part-00004" in path] and not fs.exists(f"{BUCKET}/mixed-out/_SUCCESS")
    fs.rm(f"{BUCKET}/mixed/part-00004.parquet")  # the fix: the odd file out of the input
    report = run_job(JobConfig(resume=True, **config))
    assert report["tasks_resumed"] == 4 and not report["resume"]["rerun_changed"]
    assert report["input"]["rows"] == 400 and report["rows"]["read"] == 400


def test_listing_task_bytes_follows_rows_per_task():
    assert planner.listing_task_bytes(1_000_000) == reader.WHOLE_FILE_BYTES  # read whole by one GET
    assert planner.listing_task_bytes(1000) == 1000 * 1024


@needs_models
def test_a_file_rewritten_after_a_plan_from_its_listing_is_refused_before_anything_is_written(listed):
    fs, options, _ = listed
    copy_input(fs, "rewritten", 5)

    def rewrite_then_run(tasks, worker):  # between the plan and the tasks: another file under the name
        fs.pipe_file(f"{BUCKET}/rewritten/part-00002.parquet", fs.cat_file(f"{BUCKET}/in/part-00005.parquet")[:-9])
        return run_sequentially(tasks, worker)

    with pytest.raises(InputChangedError,
                       match=r"part-00002.parquet: it has (more than )?[\d,]+ bytes, the plan listed"):
        run_job(JobConfig(input=f"s3://{BUCKET}/rewritten", output=f"s3://{BUCKET}/rewritten-out",
                          storage_options=options), runner=rewrite_then_run)
    assert not [path for path in find_fresh(fs, f"{BUCKET}/rewritten-out") if "part-00002" in path]
    # The footers kept for a resume are marked stale (one no longer holds): a resume reads them again, but
    # plans every file the way it was planned, the listed ones from their listing.
    kept = planner.read_footer_cache(fs.cat_file(f"{BUCKET}/rewritten-out/_clip_nsfw_tasks/_footers.json.gz"))
    kept = {path.rsplit("/", 1)[-1]: how for path, how in kept.items()}
    assert kept["part-00000.parquet"].identity == "" and isinstance(kept["part-00000.parquet"], planner.Footer)
    assert {name: how for name, how in kept.items() if isinstance(how, planner.Listed)}.keys() == \
        {f"part-0000{i}.parquet" for i in range(1, 5)}


@needs_models
def test_a_file_planned_from_its_listing_stays_so_when_the_input_shrinks_below_the_threshold(listed, monkeypatch):
    fs, options, _ = listed
    copy_input(fs, "shrinking", 5)
    config = dict(input=f"s3://{BUCKET}/shrinking", output=f"s3://{BUCKET}/shrunk", storage_options=options)
    assert run_job(JobConfig(**config))["input"]["tasks_planned_from_listing"] == 4
    fs.rm(f"{BUCKET}/shrinking/part-00004.parquet")
    monkeypatch.setattr(planner, "LISTING_PLAN_FILES", 100)  # or a later version with another threshold
    again = run_job(JobConfig(resume=True, **config))
    assert again["tasks_resumed"] == 4 and again["input"]["tasks_planned_from_listing"] == 3
    assert again["resume"]["removed_gone"] == ["part-00004.parquet"] and not again["resume"]["rerun_changed"]


@needs_models
def test_a_file_planned_from_its_listing_that_is_not_parquet_is_named_by_its_task(listed):
    fs, options, _ = listed
    copy_input(fs, "notparquet", 4)
    fs.pipe_file(f"{BUCKET}/notparquet/readme", b"Permission is hereby granted, free of charge, " * 20)
    with pytest.raises(InputError, match=rf"cannot read parquet file s3://{BUCKET}/notparquet/readme \(planned from "
                                         r"its listing: its task reads its footer\): .* The file is truncated or not "
                                         r"parquet; fix or remove it and run again"):
        run_job(JobConfig(input=f"s3://{BUCKET}/notparquet", output=f"s3://{BUCKET}/notparquet-out",
                          storage_options=options))


def test_the_plan_cache_keeps_footers_and_listed_files_apart():
    schema = pa.schema([("embedding", pa.list_(pa.float16()))])
    footer = planner.Footer("id1", 30, (10, 20), "digest", schema)
    data = planner.footer_cache({"b/x.parquet": footer, "b/y.parquet": planner.Listed("id2")})
    assert planner.read_footer_cache(data) == {"b/y.parquet": planner.Listed("id2"), "b/x.parquet": footer}


@needs_models
def test_after_a_changed_input_a_resume_of_an_output_planned_from_footers_reruns_no_finished_task(listed, monkeypatch):
    """The InputChangedError drops the kept footers' trust, not how each file was planned: above the threshold
    the resume reads those footers again instead of planning the files from their listing (new sources)."""
    fs, options, _ = listed
    copy_input(fs, "stale", 5)
    config = dict(input=f"s3://{BUCKET}/stale", output=f"s3://{BUCKET}/stale-out", storage_options=options)

    def rewrite_then_run_in_name_order(tasks, worker):
        fs.pipe_file(f"{BUCKET}/stale/part-00002.parquet", fs.cat_file(f"{BUCKET}/in/part-00005.parquet")[:-9])
        return run_sequentially(sorted(tasks, key=lambda task: task.rel), worker)

    monkeypatch.setattr(planner, "LISTING_PLAN_FILES", 100)  # planned from footers, as before this feature
    with pytest.raises(InputChangedError):
        run_job(JobConfig(**config), runner=rewrite_then_run_in_name_order)
    copy_input(fs, "stale", 5)  # the input as it was
    monkeypatch.setattr(planner, "LISTING_PLAN_FILES", 3)
    again = run_job(JobConfig(resume=True, **config))
    assert again["tasks_resumed"] == 2 and again["input"]["tasks_planned_from_listing"] == 0
    assert not again["resume"]["rerun_changed"] and again["rows"]["read"] == 500
