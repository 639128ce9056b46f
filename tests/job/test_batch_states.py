"""Batch states (issue #22, resume at scale): a Spark task that completed several job tasks also writes their
states into one file, ``_clip_nsfw_tasks/_batch-<id>.json``, and a resume reads those instead of a state file
per task. Each task's own state file still decides whether it is complete: a batch entry counts only while
that file exists with the size it had, a batch covering a task that runs again is removed before it runs,
and a damaged one is ignored and removed."""

import dataclasses
import hashlib
import json
import os
import urllib.parse

import pyarrow.parquet as pq
import pytest

from clip_nsfw_spark.driver.config import JobConfig
from clip_nsfw_spark.driver.job import run_job
from clip_nsfw_spark.driver.output import tool_name
from clip_nsfw_spark.driver.planner import footer_cache, read_footer_cache
from clip_nsfw_spark.errors import InputChangedError
from clip_nsfw_spark.executor.writer import REPORT_NAME, TASKS_DIR
from clip_nsfw_spark.tools.sample import write_parquet_sample
from conftest import needs_models
from s3server import LatencyProxy

FILES = 12  # local[2]: 8 Spark tasks (4 per core) of 1 or 2 job tasks each


@pytest.fixture
def spark_runner(spark):
    from clip_nsfw_spark.spark.runner import spark_runner as make

    return make(spark)


def batches(out) -> dict[str, list[dict]]:
    return {p.name: json.loads(p.read_text())["states"] for p in sorted((out / TASKS_DIR).glob("_batch-*.json"))}


def states(out) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / TASKS_DIR).glob("[0-9a-f]*.json"))}


def data_rows(out) -> int:
    return sum(pq.read_metadata(p).num_rows for p in out.glob("*.parquet"))


@pytest.fixture
def finished(tmp_path, spark_runner):
    write_parquet_sample(str(tmp_path / "in"), rows=1200, files=FILES)
    config = JobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    first = run_job(config, runner=spark_runner)
    return tmp_path, config, first


@needs_models
def test_a_spark_task_of_several_tasks_writes_their_states_together(finished):
    tmp_path, _, first = finished
    out = tmp_path / "out"
    together = batches(out)
    own = states(out)
    assert len(own) == FILES and 1 <= len(together) < FILES
    covered = [state["task_id"] for group in together.values() for state in group]
    assert len(covered) == len(set(covered)) and set(covered) <= set(own)
    for group in together.values():
        for state in group:  # a copy of the task's own state, and the size that file has
            path = out / TASKS_DIR / f"{state['task_id']}.json"
            assert state.pop("state_bytes") == os.path.getsize(path)
            assert state == own[state["task_id"]]
    assert first["rows"]["read"] == 1200


@needs_models
def test_a_resume_takes_the_batch_copies_while_the_tasks_own_states_are_as_they_were(finished, spark_runner):
    """A copy is used in place of its task's state file: shown by a state edited to the same size (never done
    by the tool), which the resume does not see: the task stays done."""
    tmp_path, config, first = finished
    out = tmp_path / "out"
    group = next(iter(batches(out).values()))
    path = out / TASKS_DIR / f"{group[0]['task_id']}.json"
    edited = path.read_text().replace(group[0]["source"], "x" * len(group[0]["source"]))
    path.write_text(edited)
    again = run_job(dataclasses.replace(config, resume=True), runner=spark_runner)
    assert again["tasks_resumed"] == FILES and again["rows"] == first["rows"]
    path.write_text(edited + " ")  # one byte more: the copy no longer speaks for it; the state is read, stale
    third = run_job(dataclasses.replace(config, resume=True), runner=spark_runner)
    assert third["tasks_resumed"] == FILES - 1 and third["resume"]["rerun_changed"] == [group[0]["rel"]]
    assert third["rows"] == first["rows"] and data_rows(out) == 1200


@needs_models
def test_a_batch_covering_a_task_that_runs_again_is_removed_before_it_runs(finished, spark_runner):
    tmp_path, config, first = finished
    before = batches(tmp_path / "out")
    name, group = next(iter(before.items()))
    changed = tmp_path / "in" / group[0]["rel"]
    pq.write_table(pq.read_table(changed).slice(0, 50), changed)  # the input changed: its task runs again
    again = run_job(dataclasses.replace(config, resume=True), runner=spark_runner)
    assert again["resume"]["rerun_changed"] == [group[0]["rel"]]
    after = batches(tmp_path / "out")
    assert name not in after and set(before) - {name} <= set(after)
    # The rerun task's state now comes from its own file (or a new batch), never from the old copy.
    third = run_job(dataclasses.replace(config, resume=True), runner=spark_runner)
    assert third["tasks_resumed"] == FILES and third["rows"] == again["rows"]
    assert again["rows"]["read"] == 1200 - 100 + 50


@needs_models
def test_a_damaged_batch_state_is_ignored_and_removed(finished, spark_runner):
    tmp_path, config, first = finished
    out = tmp_path / "out"
    name = next(iter(batches(out)))
    (out / TASKS_DIR / name).write_text('{"states": [{"task_id": 7}]')
    again = run_job(dataclasses.replace(config, resume=True), runner=spark_runner)
    assert again["tasks_resumed"] == FILES and again["rows"] == first["rows"]
    assert not (out / TASKS_DIR / name).exists() and (out / REPORT_NAME).exists()


@needs_models
def test_a_resume_on_s3_reads_one_batch_per_spark_task_not_a_state_per_task(s3_server, spark_runner):
    fs = s3_server.filesystem()
    if not fs.exists("batches"):
        fs.mkdir("batches")
    options = s3_server.storage_options()
    write_parquet_sample("s3://batches/in", rows=1200, files=FILES, storage_options=options)
    config = dict(input="s3://batches/in", output="s3://batches/out", storage_options=options)
    first = run_job(JobConfig(**config), runner=spark_runner)
    written = [p for p in fs.find(f"batches/out/{TASKS_DIR}") if "/_batch-" in p]
    assert written
    proxy = LatencyProxy(s3_server.port, delay=0)
    try:
        again = run_job(JobConfig(**config | {"resume": True, "storage_options": dict(
            options, endpoint_url=proxy.endpoint)}), runner=spark_runner)
    finally:
        proxy.close()
    assert again["tasks_resumed"] == FILES and again["rows"] == first["rows"]
    gets = [path for kind, path, _ in proxy.log if kind == "GET" and f"/{TASKS_DIR}/" in path]
    # The output is listed whole once (after the lease is held; its state is judged from that listing), its
    # top level not at all: at 100,000 tasks a listing of the output is 200+ pages.
    lists = [path for kind, path, _ in proxy.log if kind == "LIST"]
    assert len([path for path in lists if "prefix=out" in path and "delimiter=%2F" not in path]) == 1, lists
    # Nor is the top level of the input or the output listed page by page (s3fs's isdir() would): a folder's
    # kind is one HEAD and a one-key listing.
    queries = [urllib.parse.parse_qs(path.partition("?")[2], keep_blank_values=True) for path in lists]
    top = [q for q in queries if q.get("prefix") in (["in/"], ["out/"]) and q.get("delimiter") == ["/"]
           and q.get("max-keys") != ["1"]]
    assert not top and len(queries) == len(lists) and all("prefix" in q for q in queries), lists
    covered = sum(len(json.loads(fs.cat_file(p))["states"]) for p in written)
    assert len([p for p in gets if "/_batch-" in p]) == len(written)
    assert len([p for p in gets if "/_batch-" not in p and not p.endswith(("/_job.json", "/_footers.json.gz"))]) \
        == FILES - covered
    # The input's footers come from the last plan: the input is listed, and only its first file read (the
    # driver learns the embedding width from its first rows).
    read = [path for kind, path, _ in proxy.log if kind == "GET" and path.startswith("/batches/in/")]
    assert set(read) == {"/batches/in/part-00000.parquet"} and len(read) <= 2
    # Each state file is one GET (s3fs's cat_file would ask its size with a HEAD first), and the kept footers,
    # unchanged, are not written again.
    state_heads = [path for kind, path, _ in proxy.log if kind == "HEAD" and f"/{TASKS_DIR}/" in path
                   and ("/_batch-" in path or path.endswith("/_footers.json.gz"))]
    assert not state_heads, state_heads
    assert not [path for kind, path, _ in proxy.log if kind == "PUT" and path.endswith("/_footers.json.gz")]


@needs_models
def test_overwrite_takes_batch_states_for_the_tools_own(finished, spark_runner):
    tmp_path, config, first = finished
    assert tool_name(f"{TASKS_DIR}/_batch-{'0' * 20}.json") and not tool_name(f"{TASKS_DIR}/_batch-mine.json")
    assert tool_name(f"{TASKS_DIR}/_footers.json.gz")
    stray = tmp_path / "out" / TASKS_DIR / f"_batch-{'0' * 20}.json"  # a batch of an older plan: removed too
    stray.write_text('{"states": []}')
    again = run_job(dataclasses.replace(config, overwrite=True), runner=spark_runner)
    assert again["rows"] == first["rows"] and not stray.exists() and batches(tmp_path / "out")


@needs_models
def test_footers_kept_from_the_last_plan_that_no_longer_hold_are_dropped_after_one_failure(finished, spark_runner):
    """The kept footers say part-00001 has other row groups than it has (as if the file changed while keeping
    its size and modification time): its task stops before writing, the run marks the kept footers stale
    (keeping how each file was planned), and the next resume reads the footers again and completes."""
    tmp_path, config, first = finished
    out = tmp_path / "out"
    cache = out / TASKS_DIR / "_footers.json.gz"
    footers = read_footer_cache(cache.read_bytes())
    path = str(tmp_path / "in" / "part-00001.parquet")
    footers[path] = dataclasses.replace(footers[path], num_rows=60, group_rows=(60,))
    cache.write_bytes(footer_cache(footers))
    task_id = hashlib.sha1(b"part-00001.parquet").hexdigest()[:20]
    (out / TASKS_DIR / f"{task_id}.json").unlink()  # the task runs again on resume
    with pytest.raises(InputChangedError, match="part-00001.parquet: its row groups \\[0\\] now hold 100 rows, "
                                                "the plan counted 60"):
        run_job(dataclasses.replace(config, resume=True), runner=spark_runner)
    assert {f.identity for f in read_footer_cache(cache.read_bytes()).values()} == {""}  # none trusted again
    again = run_job(dataclasses.replace(config, resume=True), runner=spark_runner)
    assert again["rows"] == first["rows"] and data_rows(out) == 1200 and cache.exists()
