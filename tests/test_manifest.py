"""Ownership from a manifest, not from names (issue #23, classes 3 and 5).

Before a task moves its files to their final names it writes ``_clip_nsfw_files/<task_id>.json`` naming
them. ``--overwrite`` removes exactly the files manifests and task states name (plus the tool's own
``_clip_nsfw*`` files); a file nothing names that a reader would take as data refuses the run, naming it;
a hidden one is left alone. A resume removes the files of a task that committed but was never recorded
complete, even when its input is gone since.
"""

import json
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
from test_lease import snapshot


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
