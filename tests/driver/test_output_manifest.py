"""Ownership from a manifest, not from names (issue #23, classes 3 and 5).

Before a task moves its files to their final names it writes ``_clip_nsfw_files/<task_id>.json`` naming
them. ``--overwrite`` removes exactly the files manifests and task states name (plus the tool's own
``_clip_nsfw*`` files); a file nothing names that a reader would take as data refuses the run, naming it;
a hidden one is left alone. A resume removes the files of a task that committed but was never recorded
complete, even when its input is gone since.
"""

import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_nsfw_spark.driver.config import JobConfig
from clip_nsfw_spark.driver.job import run_job
from clip_nsfw_spark.errors import OutputError
from clip_nsfw_spark.executor.writer import MANIFEST_DIR, REPORT_NAME, SUCCESS_NAME, TASKS_DIR
from clip_nsfw_spark.tools.sample import write_parquet_sample
from conftest import needs_models
from faults import Fault
from helpers import snapshot


def rows_on_disk(out):
    return sum(pq.read_metadata(p).num_rows for p in out.rglob("*.parquet")
               if not any(part.startswith(("_", ".")) for part in p.relative_to(out).parts))


@pytest.fixture
def finished(tmp_path):
    write_parquet_sample(str(tmp_path / "in"), rows=3000, files=3)
    run_job(JobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out")))
    return tmp_path


@needs_models
def test_every_task_has_a_manifest_naming_its_files(finished):
    out = finished / "out"
    manifests = {p.stem: json.loads(p.read_text()) for p in (out / MANIFEST_DIR).glob("*.json")}
    states = {p.stem: json.loads(p.read_text()) for p in (out / TASKS_DIR).glob("[0-9a-f]*.json")}
    assert sorted(manifests) == sorted(states) and len(manifests) == 3
    for task_id, manifest in manifests.items():
        assert manifest["files"] == states[task_id]["outputs"] and manifest["run_id"]


@needs_models
@pytest.mark.parametrize("name", ["my_reference/labels.parquet", "part-00000.parquet.bak", "labels.parquet",
                                  "_rejected/mine.parquet", "notes/README"])
def test_overwrite_refuses_a_file_no_manifest_names_that_readers_would_take_as_data(finished, name):
    out = finished / "out"
    (out / name).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"label": [1, 2]}), out / name)  # a real parquet file, whatever its name
    before = snapshot(out)
    with pytest.raises(OutputError, match=rf"holds 1 file\(s\) that no manifest of clip-nsfw-spark names: {name}\. "):
        run_job(JobConfig(input=str(finished / "in"), output=str(out), overwrite=True))
    assert snapshot(out) == before
    with pytest.raises(OutputError, match=rf"--resume refused: .* no task of this run writes: {name}\. .*nothing "
                                          "was changed"):
        run_job(JobConfig(input=str(finished / "in"), output=str(out), resume=True))
    assert snapshot(out) == before


@needs_models
def test_overwrite_removes_what_manifests_name_and_leaves_hidden_files_alone(finished):
    out = finished / "out"
    keep = {".labels.parquet": b"PAR1 mine", "_notes/x.parquet": b"PAR1 mine too", "safe/.keep": b""}
    for name, data in keep.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    write_parquet_sample(str(finished / "in2"), rows=500, files=1)
    report = run_job(JobConfig(input=str(finished / "in2"), output=str(out), overwrite=True, mode="split",
                               threshold=0.05))
    assert report["rows"]["read"] == 500 and rows_on_disk(out) == 500
    for name, data in keep.items():
        assert (out / name).read_bytes() == data, name
    assert not (out / "part-00001.parquet").exists() and not (out / "part-00002.parquet").exists()
    assert len(list((out / MANIFEST_DIR).glob("*.json"))) == 1


@needs_models
def test_a_task_committed_but_not_recorded_is_reconciled_when_its_input_is_gone(finished):
    """The issue's case: a task's files committed, the task killed before its state, then its input
    deleted: the resume must not report fewer rows than the output holds."""
    source, out = finished / "in", finished / "interrupted"
    fault = Fault(point="commit", match="part-00001", after=1, action="raise")
    with pytest.raises(Exception, match="injected fault at commit"):
        run_job(JobConfig(input=str(source), output=str(out)), runner=lambda tasks, worker: [
            fault.wrap(worker)(task) for task in sorted(tasks, key=lambda t: t.rel)])
    assert (out / "part-00001.parquet").exists()  # committed under its final name …
    assert not [p for p in (out / TASKS_DIR).glob("[0-9a-f]*.json")
                if json.loads(p.read_text())["rel"] == "part-00001.parquet"]  # … but never recorded complete
    (source / "part-00001.parquet").unlink()
    report = run_job(JobConfig(input=str(source), output=str(out), resume=True))
    assert report["resume"]["removed_unrecorded"] == ["part-00001.parquet"]
    assert report["rows"]["read"] == rows_on_disk(out) == 2000
    assert not (out / "part-00001.parquet").exists() and (out / SUCCESS_NAME).exists()
    assert json.loads((out / REPORT_NAME).read_text())["rows"]["read"] == 2000


@needs_models
def test_a_task_committed_but_not_recorded_runs_again_when_its_input_is_there(finished):
    source, out = finished / "in", finished / "interrupted"
    fault = Fault(point="commit", match="part-00002", after=1, action="raise")
    with pytest.raises(Exception, match="injected fault at commit"):
        run_job(JobConfig(input=str(source), output=str(out)), runner=lambda tasks, worker: [
            fault.wrap(worker)(task) for task in sorted(tasks, key=lambda t: t.rel)])
    report = run_job(JobConfig(input=str(source), output=str(out), resume=True))
    assert report["rows"]["read"] == rows_on_disk(out) == 3000 and report["tasks_resumed"] == 2
    for name in ("part-00000.parquet", "part-00001.parquet", "part-00002.parquet"):
        assert pq.read_table(out / name).equals(pq.read_table(finished / "out" / name)), name


@needs_models
def test_an_output_written_before_manifests_existed_still_overwrites(finished):
    """Outputs of earlier versions have task states but no manifests: the states name their files."""
    out = finished / "out"
    shutil.rmtree(out / MANIFEST_DIR)
    report = run_job(JobConfig(input=str(finished / "in"), output=str(out), overwrite=True, threshold=0.2))
    assert report["rows"]["read"] == rows_on_disk(out) == 3000


# --- Found by the hostile review of this change ---------------------------------------------------------------

@needs_models
@pytest.mark.parametrize("mode, name", [("split", "safe/part-00002.parquet"), ("filter", "_rejected/part-00002.parquet")])
def test_resume_refuses_a_user_file_at_a_name_a_task_will_write(tmp_path, mode, name):
    """Names alone prove nothing: a file no manifest names, where a pending task would write (or, for
    _rejected/, might not write at all), is the user's; resume refuses as overwrite does."""
    source, out = tmp_path / "in", tmp_path / "out"
    write_parquet_sample(str(tmp_path / "all"), rows=300, files=3)
    source.mkdir()
    for i in (0, 1):
        shutil.copy(tmp_path / "all" / f"part-0000{i}.parquet", source)
    run_job(JobConfig(input=str(source), output=str(out), mode=mode))
    shutil.copy(tmp_path / "all" / "part-00002.parquet", source)  # a new input file: its task is pending
    (out / name).parent.mkdir(exist_ok=True)
    pq.write_table(pa.table({"mine": [1]}), out / name)
    before = snapshot(out)
    with pytest.raises(OutputError, match=rf"no task of this run writes: {name}\. "):
        run_job(JobConfig(input=str(source), output=str(out), mode=mode, resume=True))
    assert snapshot(out) == before


@needs_models
def test_user_files_named_like_the_tools_are_left_alone(finished):
    out = finished / "out"
    keep = {"_clip_nsfw_report.json.bak": b"{}", "_clip_nsfw_backup/p.parquet": b"PAR1",
            "_clip_nsfw_tasks/notes.json": b"{\"files\": [\"part-00000.parquet\"]}", "_clip_nsfw_lease.json.bak": b"x"}
    for name, data in keep.items():
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_bytes(data)
    run_job(JobConfig(input=str(finished / "in"), output=str(out), overwrite=True, threshold=0.3))
    for name, data in keep.items():
        assert (out / name).read_bytes() == data, name


@needs_models
@pytest.mark.parametrize("state", ['{"task_id": [1], "rel": "x"}', '{"task_id": "zzz", "rel": null}',
                                   '{"task_id": "zzz", "rel": "x", "outputs": [1, 2]}',
                                   '{"task_id": "zzz", "rel": "x", "outputs": "part-00000.parquet"}'])
def test_a_task_state_of_wrong_types_refuses_the_resume_untouched(finished, state):
    out = finished / "out"
    path = sorted((out / TASKS_DIR).glob("[0-9a-f]*.json"))[0]
    path.write_text(state)
    before = snapshot(out)
    with pytest.raises(OutputError, match=rf"the state file {path} is damaged: .*Nothing was changed"):
        run_job(JobConfig(input=str(finished / "in"), output=str(out), resume=True))
    assert snapshot(out) == before


@needs_models
def test_a_failed_resume_leaves_no_report_saying_succeeded(finished):
    source, out = finished / "in", finished / "out"
    (source / "part-00002.parquet").unlink()
    os.utime(source / "part-00001.parquet", (1, 1))  # changed: its task runs again
    fault = Fault(point="write", match="part-00001", after=1, action="raise")
    with pytest.raises(Exception, match="injected fault at write"):
        run_job(JobConfig(input=str(source), output=str(out), resume=True),
                runner=lambda tasks, worker: [fault.wrap(worker)(t) for t in tasks])
    assert not (out / REPORT_NAME).exists() and not (out / SUCCESS_NAME).exists()
