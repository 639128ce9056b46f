"""State files written whole, and damaged ones refused with their path and a way out (issue #23, class 8).

Task states, ``_job.json``, the report and ``_SUCCESS`` go through ``storage.write_whole``: renamed into
place on local disks, one PUT on S3. A state file damaged from outside (truncated, emptied, edited) makes a
``--resume`` refuse before it changes anything, naming the file and what to do.
"""

import json
import threading

import pytest

from clip_nsfw_spark.driver.config import JobConfig
from clip_nsfw_spark.driver.job import run_job
from clip_nsfw_spark.errors import OutputError
from clip_nsfw_spark.executor.writer import JOB_STATE, REPORT_NAME, SUCCESS_NAME, TASKS_DIR
from clip_nsfw_spark.storage.filesystem import filesystem, read_fresh, write_whole
from clip_nsfw_spark.tools.sample import write_parquet_sample
from conftest import needs_models
from helpers import assert_same, snapshot

DAMAGES = {"truncated": lambda data: data[: len(data) // 2], "empty": lambda data: b"",
           "a list": lambda data: b"[1, 2]", "no task id": lambda data: b'{"rows_read": 1000}'}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished output of 3 tasks, and a clean copy to compare with."""
    root = tmp_path_factory.mktemp("state")
    write_parquet_sample(str(root / "in"), rows=3000, files=3)
    run_job(JobConfig(input=str(root / "in"), output=str(root / "clean")))
    return root


def _copy(finished, tmp_path):
    import shutil

    shutil.copytree(finished / "clean", tmp_path / "out")
    return tmp_path / "out"


@needs_models
@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_task_state_refuses_the_resume_untouched_and_the_way_out_works(finished, tmp_path, damage):
    out = _copy(finished, tmp_path)
    state = sorted((out / TASKS_DIR).glob("[0-9a-f]*.json"))[1]
    state.write_bytes(DAMAGES[damage](state.read_bytes()))
    before = snapshot(out)
    with pytest.raises(OutputError) as refused:
        run_job(JobConfig(input=str(finished / "in"), output=str(out), resume=True))
    message = str(refused.value)
    assert f"the state file {state} is damaged" in message
    assert "Nothing was changed" in message and "remove that one file and rerun with --resume" in message
    assert "Traceback" not in message
    assert snapshot(out) == before  # _SUCCESS and the old report included
    state.unlink()  # the way out the message gives
    report = run_job(JobConfig(input=str(finished / "in"), output=str(out), resume=True))
    assert report["tasks_resumed"] == 2 and report["rows"]["read"] == 3000
    assert_same(finished / "clean", out)


@needs_models
@pytest.mark.parametrize("change", ["cut short", "grown", "older state"])
def test_an_output_file_changed_since_its_task_completed_runs_that_task_again(finished, tmp_path, change):
    """Hostile review 18: a file cut short after its task's state was written (a copy interrupted, a disk
    filled) passed --resume, which wrote _SUCCESS over an output no reader could open. A task's state records
    each file's bytes; a file with other bytes makes the task run again. A state of an older version (no
    ``output_bytes``) keeps the rule it was written under: the file is there."""
    out = _copy(finished, tmp_path)
    victim = sorted(out.glob("*.parquet"))[1]
    data = victim.read_bytes()
    if change == "older state":
        for state in (out / TASKS_DIR).glob("[0-9a-f]*.json"):
            stats = json.loads(state.read_text())
            assert stats["output_bytes"] == {rel: (out / rel).stat().st_size for rel in stats["outputs"]}
            del stats["output_bytes"]
            state.write_text(json.dumps(stats))
        report = run_job(JobConfig(input=str(finished / "in"), output=str(out), resume=True))
        assert report["tasks_resumed"] == 3
        return
    victim.write_bytes(data[: len(data) // 2] if change == "cut short" else data + b"\0")
    report = run_job(JobConfig(input=str(finished / "in"), output=str(out), resume=True))
    assert report["tasks_resumed"] == 2 and report["rows"]["read"] == 3000
    assert victim.read_bytes() == data  # written again, as the first run wrote it
    assert_same(finished / "clean", out)


@needs_models
@pytest.mark.parametrize("damage", ["truncated", "empty", "a list"])
def test_a_damaged_job_state_refuses_the_resume_and_overwrite_starts_again(finished, tmp_path, damage):
    out = _copy(finished, tmp_path)
    job = out / TASKS_DIR / JOB_STATE
    job.write_bytes(DAMAGES[damage](job.read_bytes()))
    before = snapshot(out)
    with pytest.raises(OutputError, match=rf"the state file {job} is damaged: .*Nothing was changed\. To go on, "
                                          r"rerun with --overwrite"):
        run_job(JobConfig(input=str(finished / "in"), output=str(out), resume=True))
    assert snapshot(out) == before
    run_job(JobConfig(input=str(finished / "in"), output=str(out), overwrite=True))
    assert_same(finished / "clean", out)
    assert json.loads(job.read_text())["mode"] == "annotate"


@needs_models
def test_a_run_leaves_no_aside_files_and_every_state_parses(finished):
    out = finished / "clean"
    assert not [p for p in out.rglob("*") if "_clip_nsfw_aside" in p.name]
    for path in [out / REPORT_NAME, out / TASKS_DIR / JOB_STATE, *(out / TASKS_DIR).glob("[0-9a-f]*.json")]:
        assert isinstance(json.loads(path.read_text()), dict), path
    assert (out / SUCCESS_NAME).read_bytes() == b""


def test_write_whole_is_never_seen_half_written(tmp_path):
    """A reader polling while the file is rewritten again and again sees one whole version or another."""
    fs, root = filesystem(str(tmp_path))
    path = f"{root}/state.json"
    write_whole(fs, path, json.dumps({"n": 0, "pad": "x" * 200_000}))
    stop, seen, bad = threading.Event(), set(), []

    def read():
        while not stop.is_set():
            data = read_fresh(fs, path)
            try:
                seen.add(json.loads(data)["n"])
            except ValueError:
                bad.append(len(data))

    reader = threading.Thread(target=read)
    reader.start()
    for n in range(1, 300):
        write_whole(fs, path, json.dumps({"n": n, "pad": "x" * 200_000}))
    stop.set()
    reader.join()
    assert not bad and len(seen) > 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_write_whole_on_s3_is_one_put(s3_server):
    s3 = s3_server.filesystem()
    s3.mkdir("whole")
    fs, root = filesystem("s3://whole/out", s3_server.storage_options())
    write_whole(fs, f"{root}/state.json", '{"a": 1}')
    write_whole(fs, f"{root}/state.json", b'{"a": 2}')
    assert json.loads(read_fresh(fs, f"{root}/state.json")) == {"a": 2}
    assert s3.ls("whole/out", detail=False) == ["whole/out/state.json"]
