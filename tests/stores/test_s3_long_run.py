"""Long runs on S3 (issue #28): files the job rewrites are read fresh, progress moves, a long run completes.

s3fs keeps what it learnt of a path (listings, sizes, ETags) and opens files with the ETag it cached: a
file rewritten since — the lease at every heartbeat, task states, the job state — then reads as it was, as
gone, or fails with FileExpired. These tests rewrite such files behind a filesystem's back on the real
S3 server, and run the job long enough, with S3's latency added by a proxy, to meet its own rewrites.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from clip_nsfw_spark.driver.config import JobConfig
from clip_nsfw_spark.driver.job import run_job
from clip_nsfw_spark.driver.progress import ProgressWatcher
from clip_nsfw_spark.executor.writer import REPORT_NAME, SUCCESS_NAME
from clip_nsfw_spark.storage.filesystem import find_fresh, list_fresh, read_fresh, read_many_fresh
from clip_nsfw_spark.storage.lease import LEASE_NAME, check_owner, read_lease
from clip_nsfw_spark.tools.sample import write_parquet_sample
from clip_nsfw_spark.driver.output import TASK_RECORD
from conftest import ROOT, needs_models
from s3server import LatencyProxy

pytestmark = pytest.mark.slow  # 2,000 files through a 20 ms proxy, a killed run resumed


def _bucket(fs, name):
    if not fs.exists(name):
        fs.mkdir(name)
    return name


def test_a_rewritten_file_is_read_as_it_is_now(s3_server):
    fs, other = s3_server.filesystem(), s3_server.filesystem()  # two clients: the job's and another process's
    _bucket(fs, "fresh")
    other.pipe_file("fresh/out/_clip_nsfw_lease.json", json.dumps({"run_id": "a", "heartbeat": time.time()}).encode())
    fs.ls("fresh/out")  # the listing cache now holds the lease's size and ETag
    with fs.open("fresh/out/_clip_nsfw_lease.json", "rb") as handle:
        assert json.loads(handle.read())["run_id"] == "a"
    other.pipe_file("fresh/out/_clip_nsfw_lease.json", json.dumps({"run_id": "b", "heartbeat": time.time()}).encode())
    with pytest.raises(OSError, match="no longer exists"):  # what the job met before: s3fs's FileExpired
        with fs.open("fresh/out/_clip_nsfw_lease.json", "rb") as handle:
            handle.read()
    fs.ls("fresh/out")
    other.pipe_file("fresh/out/_clip_nsfw_lease.json", json.dumps({"run_id": "c", "heartbeat": time.time()}).encode())
    assert json.loads(read_fresh(fs, "fresh/out/_clip_nsfw_lease.json"))["run_id"] == "c"
    assert read_lease(fs, "fresh/out")["run_id"] == "c"
    check_owner(fs, "fresh/out", "c")  # a task of run c may commit
    other.pipe_file("fresh/out/_clip_nsfw_lease.json", json.dumps({"run_id": "d", "heartbeat": time.time()}).encode())
    with pytest.raises(Exception, match="run c no longer holds the lease"):
        check_owner(fs, "fresh/out", "c")
    other.rm("fresh/out/_clip_nsfw_lease.json")
    assert read_lease(fs, "fresh/out") is None
    with pytest.raises(FileNotFoundError):
        read_fresh(fs, "fresh/out/_clip_nsfw_lease.json")


def test_listings_and_batch_reads_see_what_another_client_wrote(s3_server):
    fs, other = s3_server.filesystem(), s3_server.filesystem()
    _bucket(fs, "fresh")
    other.pipe_file("fresh/list[1]/a.json", b"1")
    assert [p.rsplit("/", 1)[-1] for p in list_fresh(fs, "fresh/list[1]")] == ["a.json"]
    assert fs.ls("fresh/list[1]", detail=False)  # cached now
    other.pipe_file("fresh/list[1]/b.json", b"2")
    other.pipe_file("fresh/list1/c.json", b"not mine")  # what a glob of list[1] would match
    assert len(fs.ls("fresh/list[1]", detail=False)) == 1  # the cache: what progress saw before
    assert [p.rsplit("/", 1)[-1] for p in sorted(list_fresh(fs, "fresh/list[1]"))] == ["a.json", "b.json"]
    assert find_fresh(fs, "fresh/list[1]") == {"fresh/list[1]/a.json", "fresh/list[1]/b.json"}
    found = read_many_fresh(fs, ["fresh/list[1]/a.json", "fresh/list[1]/b.json", "fresh/list[1]/gone.json"])
    assert found["fresh/list[1]/a.json"] == b"1" and found["fresh/list[1]/b.json"] == b"2"
    assert isinstance(found["fresh/list[1]/gone.json"], FileNotFoundError)
    assert list_fresh(fs, "fresh/nothing-here") == [] and find_fresh(fs, "fresh/nothing-here") == set()


def test_progress_on_s3_sees_each_new_state_within_one_poll(s3_server):
    fs, other = s3_server.filesystem(), s3_server.filesystem()
    _bucket(fs, "fresh")
    rows = {f"{i:020x}": 100 + i for i in range(5)}
    watcher = ProgressWatcher(fs, "fresh/progress", "_clip_nsfw_tasks", rows, already=set(), interactive=False)
    watcher.poll()
    assert watcher.seen == set()
    for number, task_id in enumerate(rows, 1):
        other.pipe_file(f"fresh/progress/_clip_nsfw_tasks/{task_id}.json", b"{}")
        watcher.poll()
        assert len(watcher.seen) == number
    other.pipe_file("fresh/progress/_clip_nsfw_tasks/not-planned.json", b"{}")  # a stale state: not counted
    watcher.poll()
    assert watcher.rows_done == sum(rows.values()) and "5/5 tasks" in watcher.line()


def _run(args, env, **kwargs):
    command = [sys.executable, str(ROOT / "tests" / "faults.py"), "--heartbeat", "0.5", *args]
    return subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kwargs)


def _states(fs, root):
    """The task states (not the job state, batch states or the plan's footers)."""
    return [p for p in list_fresh(fs, f"{root}/_clip_nsfw_tasks") if TASK_RECORD.fullmatch(p.rsplit("/", 1)[-1])]


def _output_rows(fs, root):
    files = sorted(p for p in find_fresh(fs, root) if p.endswith(".parquet") and "/_" not in p[len(root):])
    return files, sum(pq.read_metadata(fs.open(p, "rb")).num_rows for p in files)


@needs_models
def test_a_long_run_with_s3_latency_completes_and_a_killed_one_resumes(s3_server, tmp_path):
    """24 tasks on local[2] through a proxy adding 20 ms to every S3 request, with the lease rewritten
    every 0.5 s: the run outlives dozens of heartbeats while every task reads the lease at commit."""
    fs = s3_server.filesystem()
    _bucket(fs, "longrun")
    options = s3_server.storage_options()
    write_parquet_sample("s3://longrun/in", rows=2400, files=24, storage_options=options)
    write_parquet_sample(str(tmp_path / "in"), rows=2400, files=24)
    clean = run_job(JobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "clean")))
    proxy = LatencyProxy(s3_server.port, delay=0.02)
    try:
        env = dict(os.environ, **dict(s3_server.env(), AWS_ENDPOINT_URL=proxy.endpoint))
        slow = "point=write,after=0,action=sleep,seconds=0.3"  # every task ≥ 0.3 s: the run lasts many beats
        run = _run(["--fault", slow, "--input", "s3://longrun/in", "--output", "s3://longrun/out",
                    "--master", "local[2]"], env)
        out, err = run.communicate(timeout=900)
        assert run.returncode == 0, err[-4000:]
        assert "no longer exists" not in err and "FileExpired" not in err
        assert "progress [########################] 24/24 tasks  2,400/2,400 rows" in err, err[-3000:]
        report = json.loads(read_fresh(fs, f"longrun/out/{REPORT_NAME}"))
        assert report["rows"] == clean["rows"]
        files, rows = _output_rows(fs, "longrun/out")
        assert len(files) == 24 and rows == 2400
        assert not fs.exists(f"longrun/out/{LEASE_NAME}")
        # The run really went through the slow endpoint: each of the 24 tasks read its input and wrote its
        # output, manifest and state there. (Not a total: the lease heartbeats' count follows the run's length.)
        assert proxy.kinds["GET"] >= 24 and proxy.kinds["PUT"] >= 3 * 24, dict(proxy.kinds)

        killed = _run(["--fault", slow, "--input", "s3://longrun/in", "--output", "s3://longrun/killed",
                       "--master", "local[2]"], env, start_new_session=True)
        deadline = time.time() + 300
        while time.time() < deadline and len(_states(fs, "longrun/killed")) < 6:
            assert killed.poll() is None, killed.communicate()[1][-3000:]
            time.sleep(0.2)
        os.killpg(killed.pid, signal.SIGKILL)  # driver, JVM and workers at once: nothing cleans up
        killed.communicate(timeout=60)
        done_before = len(_states(fs, "longrun/killed"))
        assert 6 <= done_before < 24 and not fs.exists(f"longrun/killed/{SUCCESS_NAME}")
        resumed = _run(["--input", "s3://longrun/in", "--output", "s3://longrun/killed", "--resume",
                        "--master", "local[2]"], env)
        out, err = resumed.communicate(timeout=900)
        assert resumed.returncode == 0, err[-4000:]
        report = json.loads(read_fresh(fs, f"longrun/killed/{REPORT_NAME}"))
        assert report["rows"] == clean["rows"]
        assert report["tasks_resumed"] >= done_before
        files, rows = _output_rows(fs, "longrun/killed")
        assert len(files) == 24 and rows == 2400  # none lost, none twice
        assert "24/24 tasks  2,400/2,400 rows" in err
    finally:
        proxy.close()
