"""Issue #23 on S3: fencing, ownership from manifests and reconciliation, where the store has no rename
and no exclusive create (the local twins are in storage/test_lease.py and driver/test_output_manifest.py)."""

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_nsfw_spark.driver.config import JobConfig
from clip_nsfw_spark.driver.job import run_job
from clip_nsfw_spark.errors import OutputError
from clip_nsfw_spark.executor.writer import MANIFEST_DIR, REPORT_NAME, SUCCESS_NAME, TASKS_DIR
from clip_nsfw_spark.storage.filesystem import find_fresh, read_fresh
from clip_nsfw_spark.tools.sample import write_parquet_sample
from clip_nsfw_spark.driver.output import TASK_RECORD
from conftest import ROOT, needs_models
from faults import Fault
from helpers import stopped


def _bucket(fs, name):
    if not fs.exists(name):
        fs.mkdir(name)


def s3_snapshot(fs, root):
    """{key: bytes} of every object under ``root``."""
    return {path: read_fresh(fs, path) for path in sorted(find_fresh(fs, root))}


def _paused_while_another_takes_over(s3_server, bucket: str, paused_flags: list, common: list):
    """Start ``faults.py`` with ``common`` + ``paused_flags`` (it stops itself), let its lease go stale, run
    ``common`` with ``--threshold 0.3`` to completion, then SIGCONT the first. Returns the first's
    ``(returncode, stderr)`` and the snapshot the second left."""
    fs = s3_server.filesystem()
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, **s3_server.env())
    command = [sys.executable, str(ROOT / "tests" / "faults.py"), *common]
    paused = subprocess.Popen([*command, *paused_flags], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    stopped(paused)
    time.sleep(4.5)  # past the --stale 4 the runs are given
    other = subprocess.run([*command, "--threshold", "0.3"], env=env, cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
    assert other.returncode == 0, other.stderr[-3000:]
    taken_over = s3_snapshot(fs, f"{bucket}/out")
    os.kill(paused.pid, signal.SIGCONT)
    _, err = paused.communicate(timeout=300)
    return paused.returncode, err, taken_over


@needs_models
def test_a_paused_run_on_s3_whose_output_was_taken_over_stops_without_touching_it(s3_server):
    fs = s3_server.filesystem()
    _bucket(fs, "fence")
    options = s3_server.storage_options()
    write_parquet_sample("s3://fence/in", rows=2000, files=2, storage_options=options)
    run_job(JobConfig(input="s3://fence/in", output="s3://fence/out", storage_options=options))
    common = ["--input", "s3://fence/in", "--output", "s3://fence/out", "--local-runner", "--stale", "4", "--overwrite"]
    returncode, err, taken_over = _paused_while_another_takes_over(
        s3_server, "fence", ["--heartbeat", "0.5", "--stop-before", "clear"], common)
    assert returncode == 2, err[-3000:]
    assert "lost the lease of output s3://fence/out" in err and "changed nothing" in err, err[-3000:]
    assert s3_snapshot(fs, "fence/out") == taken_over
    assert json.loads(taken_over[f"fence/out/{REPORT_NAME}"])["config"]["threshold"] == 0.3


@needs_models
def test_s3_overwrite_and_resume_go_by_the_manifests(s3_server):
    fs = s3_server.filesystem()
    _bucket(fs, "owned")
    options = s3_server.storage_options()
    write_parquet_sample("s3://owned/in", rows=3000, files=3, storage_options=options)
    run_job(JobConfig(input="s3://owned/in", output="s3://owned/out", storage_options=options))
    assert len(fs.ls("owned/out/" + MANIFEST_DIR, refresh=True)) == 3
    with fs.open("owned/out/my_reference/labels.parquet", "wb") as handle:  # a user's file: refused, kept
        pq.write_table(pa.table({"label": [1]}), handle)
    before = s3_snapshot(fs, "owned/out")
    for flags in ({"overwrite": True}, {"resume": True}):
        with pytest.raises(OutputError, match=r"my_reference/labels\.parquet"):
            run_job(JobConfig(input="s3://owned/in", output="s3://owned/out", storage_options=options, **flags))
        assert s3_snapshot(fs, "owned/out") == before
    fs.mv("owned/out/my_reference/labels.parquet", "owned/out/_mine/labels.parquet")  # hidden: left alone
    report = run_job(JobConfig(input="s3://owned/in", output="s3://owned/out", storage_options=options,
                               overwrite=True, threshold=0.2))
    assert report["rows"]["read"] == 3000 and fs.exists("owned/out/_mine/labels.parquet")

    # A task committed but never recorded complete, then its input deleted: reconciled on resume.
    fault = Fault(point="commit", match="part-00001", after=1, action="raise")
    with pytest.raises(Exception, match="injected fault at commit"):
        run_job(JobConfig(input="s3://owned/in", output="s3://owned/cut", storage_options=options),
                runner=lambda tasks, worker: [fault.wrap(worker)(t) for t in sorted(tasks, key=lambda t: t.rel)])
    assert fs.exists("owned/cut/part-00001.parquet")
    fs.rm_file("owned/in/part-00001.parquet")
    report = run_job(JobConfig(input="s3://owned/in", output="s3://owned/cut", storage_options=options, resume=True))
    assert report["resume"]["removed_unrecorded"] == ["part-00001.parquet"]
    data = sorted(p for p in find_fresh(fs, "owned/cut") if "/_" not in p[len("owned/cut"):])
    assert data == ["owned/cut/part-00000.parquet", "owned/cut/part-00002.parquet"]
    assert report["rows"]["read"] == 2000 and fs.exists(f"owned/cut/{SUCCESS_NAME}")
    states = [p for p in find_fresh(fs, f"owned/cut/{TASKS_DIR}") if TASK_RECORD.fullmatch(p.rsplit("/", 1)[-1])]
    assert len(states) == 2


@needs_models
def test_a_run_paused_between_two_uploads_of_a_commit_stops_before_the_next(s3_server, tmp_path):
    """The hostile review's case on S3: one check before a task's uploads was not enough."""
    fs = s3_server.filesystem()
    _bucket(fs, "uploads")
    options = s3_server.storage_options()
    write_parquet_sample("s3://uploads/in", rows=300, files=3, storage_options=options)
    run_job(JobConfig(input="s3://uploads/in", output="s3://uploads/out", storage_options=options, mode="split"))
    common = ["--input", "s3://uploads/in", "--output", "s3://uploads/out", "--local-runner", "--stale", "4",
              "--mode", "split", "--overwrite"]
    returncode, err, taken_over = _paused_while_another_takes_over(
        s3_server, "uploads", ["--fault", f"point=commit,match=part-00001,after=1,action=stop,once={tmp_path}/once"],
        common)
    assert returncode == 2, err[-3000:]
    assert "were moved into place before this check and are left as they are" in err, err[-3000:]
    assert s3_snapshot(fs, "uploads/out") == taken_over


@needs_models
def test_folder_marker_keys_are_not_files(s3_server):
    """Keys ending in "/" (the S3 console's "Create folder") are neither data nor foreign files."""
    fs = s3_server.filesystem()
    _bucket(fs, "markers")
    options = s3_server.storage_options()
    write_parquet_sample("s3://markers/in", rows=200, files=2, storage_options=options)
    def marker(key):  # PutObject of an empty key ending in "/", through s3fs's own client
        fs.call_s3("put_object", Bucket="markers", Key=key, Body=b"")

    marker("empty/")
    report = run_job(JobConfig(input="s3://markers/in", output="s3://markers/empty", storage_options=options))
    assert report["rows"]["read"] == 200
    marker("empty/safe/")
    for flags in ({"overwrite": True}, {"resume": True}):
        report = run_job(JobConfig(input="s3://markers/in", output="s3://markers/empty", storage_options=options,
                                   **flags))
        assert report["rows"]["read"] == 200, flags
