"""One run at a time per output (issue #10, class 10) and Ctrl-C ending with one line.

A run holds ``<output>/_clip_nsfw_lease.json`` while it lives; a second run is refused; a task whose run
no longer holds the lease does not move its files into place (in-process and on Spark executors).
"""

import json
import re
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from clip_nsfw_spark.driver.config import JobConfig
from clip_nsfw_spark.errors import OutputError
from clip_nsfw_spark.driver.job import run_job
from clip_nsfw_spark.executor.writer import REPORT_NAME, SUCCESS_NAME
from clip_nsfw_spark.storage import lease as lease_module
from clip_nsfw_spark.storage.lease import LEASE_NAME, STALE_SECONDS, RunLease, read_lease, stale_reason
from clip_nsfw_spark.storage.filesystem import filesystem
from clip_nsfw_spark.tools.sample import write_parquet_sample
from conftest import ROOT, needs_models
from helpers import assert_same, snapshot, stopped, wait_for

INTERRUPTED = "clip-nsfw-spark: interrupted; the output is incomplete: rerun with --resume"


def write_lease(out, run_id="0th3rrun", host="elsewhere", pid=4242, age=0.0, pidns=None):
    """Another run's lease, written as a run writes it: whole, then renamed into place (a reader running
    at the same time, such as a heartbeat thread, never sees it half-written)."""
    aside = out / f"{LEASE_NAME}.{run_id}"
    aside.write_text(json.dumps({"run_id": run_id, "host": host, "pid": pid, "pidns": pidns,
                                 "started": "2026-01-01 00:00:00 UTC", "heartbeat": time.time() - age}))
    os.replace(aside, out / LEASE_NAME)


def _cli(args, **kwargs):
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable)
    return subprocess.Popen([sys.executable, "-m", "clip_nsfw_spark.cli", "run", *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


@needs_models
def test_a_live_lease_refuses_other_runs_and_a_stale_one_is_taken_over(tmp_path):
    write_parquet_sample(str(tmp_path / "in"), rows=40, files=2)
    out = tmp_path / "out"
    run_job(JobConfig(input=str(tmp_path / "in"), output=str(out)))
    assert not (out / LEASE_NAME).exists()  # released by a finished run
    write_lease(out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for flags in ({"resume": True}, {"overwrite": True}, {}):
        with pytest.raises(OutputError, match=rf"output {out} is being written by run 0th3rrun started at "
                                              r"2026-01-01 00:00:00 UTC on host elsewhere, pid 4242; wait for it "
                                              r"or, if it died, rerun with --resume after \d{4}-"):
            run_job(JobConfig(input=str(tmp_path / "in"), output=str(out), **flags))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    write_lease(out, age=STALE_SECONDS + 5)  # no heartbeat for longer than the stale time
    assert run_job(JobConfig(input=str(tmp_path / "in"), output=str(out), resume=True))["tasks_resumed"] == 2
    assert not (out / LEASE_NAME).exists()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    # Fresh heartbeat, but its driver is dead: on this host and in this pid namespace only.
    write_lease(out, host=socket.gethostname(), pid=gone.pid, pidns=os.readlink("/proc/self/ns/pid"))
    assert run_job(JobConfig(input=str(tmp_path / "in"), output=str(out), overwrite=True))["rows"]["read"] == 40
    assert (out / SUCCESS_NAME).exists() and not (out / LEASE_NAME).exists()


def _stealing_runner(out, inner=None):
    """A runner that lets the first task commit, then hands the lease to another run, then runs the rest."""

    def run(tasks, worker):
        first = [worker(tasks[0])]
        write_lease(out)
        rest = tasks[1:]
        return first + (inner(rest, worker) if inner else [worker(t) for t in rest])

    return run


@needs_models
def test_a_task_whose_run_lost_the_lease_does_not_commit(tmp_path):
    write_parquet_sample(str(tmp_path / "in"), rows=60, files=3)
    out = tmp_path / "out"
    with pytest.raises(OutputError, match=r"run \w+ no longer holds the lease of output .*out: it is held by run "
                                          r"0th3rrun \(host elsewhere, pid 4242\)\. This task's files were not "
                                          r"moved into place"):
        run_job(JobConfig(input=str(tmp_path / "in"), output=str(out)), runner=_stealing_runner(out))
    assert sorted(p.name for p in out.glob("*.parquet")) == ["part-00000.parquet"]
    assert len(list((out / "_clip_nsfw_tasks").glob("[0-9a-f]*.json"))) == 1
    assert json.loads((out / LEASE_NAME).read_text())["run_id"] == "0th3rrun"  # the other run's lease stays
    assert not (out / SUCCESS_NAME).exists()


@needs_models
def test_executors_check_the_lease_at_commit(tmp_path, spark):
    from clip_nsfw_spark.spark.runner import spark_runner

    write_parquet_sample(str(tmp_path / "in"), rows=60, files=3)
    out = tmp_path / "out"
    with pytest.raises(Exception, match="no longer holds the lease"):
        run_job(JobConfig(input=str(tmp_path / "in"), output=str(out)),
                runner=_stealing_runner(out, spark_runner(spark)))
    # Only the task that committed before the takeover is there (a task Spark killed when the job failed may
    # leave its temp file in _clip_nsfw_tmp/: never under a final name, removed by the next complete run).
    assert sorted(p.name for p in out.glob("*.parquet")) == ["part-00000.parquet"]
    assert len(list((out / "_clip_nsfw_tasks").glob("[0-9a-f]*.json"))) == 1
    assert not (out / SUCCESS_NAME).exists()


@needs_models
def test_a_second_run_on_the_same_output_is_refused_and_the_first_completes(tmp_path):
    source = tmp_path / "in"
    write_parquet_sample(str(source), rows=24000, files=24)
    run_job(JobConfig(input=str(source), output=str(tmp_path / "clean")))
    out = tmp_path / "out"
    first = _cli(["--input", str(source), "--output", str(out), "--master", "local[1]", "--batch-rows", "20"])
    wait_for(lambda: (out / LEASE_NAME).exists() and any((out / "_clip_nsfw_tasks").glob("[0-9a-f]*.json")),
              first)
    lease = json.loads((out / LEASE_NAME).read_text())
    for flag in ("--overwrite", "--resume"):
        second = _cli(["--input", str(source), "--output", str(out), flag, "--local-runner"])
        _, err = second.communicate(timeout=300)
        assert second.returncode == 2, err[-3000:]
        assert (f"is being written by run {lease['run_id']} started at {lease['started']} on host "
                f"{socket.gethostname()}, pid {first.pid}; wait for it or, if it died, rerun with --resume after") \
            in err
    assert first.poll() is None, "the first run ended before the second was tried: make it slower"
    out_text, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert "read 24,000" in out_text
    assert_same(tmp_path / "clean", out)
    assert not (out / LEASE_NAME).exists() and not (out / "_clip_nsfw_tmp").exists()


@needs_models
@pytest.mark.parametrize("signum, status, line", [
    (signal.SIGINT, 130, INTERRUPTED),  # Ctrl-C in a terminal
    (signal.SIGTERM, 143, "clip-nsfw-spark: terminated (SIGTERM); the output is incomplete: rerun with --resume"),
])
def test_ctrl_c_or_sigterm_ends_with_one_line_and_resume_completes(tmp_path, signum, status, line):
    source = tmp_path / "in"
    write_parquet_sample(str(source), rows=16000, files=16)
    run_job(JobConfig(input=str(source), output=str(tmp_path / "clean")))
    out = tmp_path / "out"
    process = _cli(["--input", str(source), "--output", str(out), "--master", "local[1]", "--batch-rows", "20"],
                   start_new_session=True)
    wait_for(lambda: any((out / "_clip_nsfw_tasks").glob("[0-9a-f]*.json")), process)
    os.killpg(process.pid, signum)  # what Ctrl-C in a terminal (or a scheduler) does: the whole group
    _, err = process.communicate(timeout=300)
    assert process.returncode == status, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert err.count(line) == 1
    assert not (out / LEASE_NAME).exists() and not (out / SUCCESS_NAME).exists()
    resumed = _cli(["--input", str(source), "--output", str(out), "--resume", "--local-runner"])
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert_same(tmp_path / "clean", out)
    assert json.loads((out / REPORT_NAME).read_text())["rows"]["read"] == 16000


def test_a_jvm_gone_mid_update_prints_no_python_traceback(spark, capsys):
    """SIGTERM to the process group ends the JVM while PySpark's accumulator server reads from it: the
    EOFError must not be printed by socketserver after the run's one line (it was, now and then, in CI).
    Any other error in that server is still reported."""
    server = spark.sparkContext._accumulatorServer
    for error, printed in ((EOFError(), False), (ConnectionResetError(), False), (ValueError("bad"), True)):
        try:
            raise error
        except Exception:
            server.handle_error(None, ("127.0.0.1", 4242))
        assert ("Traceback" in capsys.readouterr().err) is printed, error


def test_the_heartbeat_refreshes_the_lease_and_notices_a_takeover(tmp_path, monkeypatch):
    monkeypatch.setattr(lease_module, "HEARTBEAT_SECONDS", 0.05)
    fs, root = filesystem(str(tmp_path / "out"))
    with RunLease(fs, root) as held:
        first = read_lease(fs, root)["heartbeat"]
        deadline = time.time() + 10
        while time.time() < deadline and read_lease(fs, root)["heartbeat"] == first:
            time.sleep(0.02)
        assert read_lease(fs, root)["heartbeat"] > first
        with pytest.raises(OutputError, match="is being written by run " + held.run_id):
            RunLease(fs, root).acquire()
        write_lease(tmp_path / "out")  # another run takes it (as after a wrongly judged stale lease)
        time.sleep(0.3)
        assert held.lost == "run 0th3rrun on host elsewhere took its lease over"
        with pytest.raises(OutputError, match=rf"run {held.run_id} lost the lease of output .*out"):
            held.fence("writing the report")
    assert read_lease(fs, root)["run_id"] == "0th3rrun"  # not released: it is not ours


def test_a_lease_with_a_heartbeat_that_is_not_a_number_is_stale_not_a_crash(tmp_path):
    from clip_nsfw_spark.storage.lease import describe

    for heartbeat in ("soon", None, [1]):
        lease = {"run_id": "r", "heartbeat": heartbeat}
        assert "no heartbeat for inf s" in stale_reason(lease)
        assert "rerun with --resume after" in describe(lease, "out")


def test_stale_means_an_old_heartbeat_or_a_dead_pid_on_this_host():
    now = time.time()
    fresh = {"run_id": "r", "host": socket.gethostname(), "pid": os.getpid(),
             "pidns": os.readlink("/proc/self/ns/pid"), "heartbeat": now}
    assert stale_reason(fresh) is None
    assert "no heartbeat for" in stale_reason(fresh | {"heartbeat": now - STALE_SECONDS - 1})
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert "is gone" in stale_reason(fresh | {"pid": gone.pid})
    assert stale_reason(fresh | {"pid": gone.pid, "pidns": "pid:[1]"}) is None  # another container's pid
    assert stale_reason(fresh | {"pid": gone.pid, "host": "elsewhere"}) is None


def test_the_lease_on_s3_admits_one_run(s3_server):
    s3 = s3_server.filesystem()
    s3.mkdir("leases")
    fs, root = filesystem("s3://leases/out", s3_server.storage_options())
    with RunLease(fs, root) as held:
        assert read_lease(fs, root)["run_id"] == held.run_id
        with pytest.raises(OutputError, match=f"output s3://leases/out is being written by run {held.run_id}"):
            RunLease(fs, root).acquire()
    assert read_lease(fs, root) is None


# --- Fencing (issue #23, class 1): a run acts only while it holds a young lease -------------------------------

def _faults(args, **kwargs):
    """The job's command line through tests/faults.py (its --stale, --heartbeat and --stop-before)."""
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable)
    return subprocess.Popen([sys.executable, str(ROOT / "tests" / "faults.py"), *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


@needs_models
@pytest.mark.parametrize("step, flag", [("clear", "--overwrite"), ("prepare", "--resume"), ("report", "--overwrite")])
def test_a_paused_run_whose_output_was_taken_over_stops_without_touching_it(tmp_path, step, flag):
    """The issue's case: a run paused past its lease (SIGSTOP, as Ctrl-Z or a long GC), another run takes the
    output over and finishes, the first wakes up (SIGCONT): it must not delete, write or mark anything."""
    source, out = tmp_path / "in", tmp_path / "out"
    write_parquet_sample(str(source), rows=3000, files=3)
    run_job(JobConfig(input=str(source), output=str(out)))
    common = ["--input", str(source), "--output", str(out), "--local-runner", "--stale", "4"]
    paused = _faults([*common, flag, "--heartbeat", "0.5", "--stop-before", step], start_new_session=True)
    stopped(paused)
    time.sleep(4.5)  # its lease goes stale for the next run
    other = _faults([*common, "--overwrite", "--threshold", "0.3"])
    _, err = other.communicate(timeout=600)
    assert other.returncode == 0, err[-3000:]
    assert "taking over the stale lease" in err
    taken_over = snapshot(out)
    os.kill(paused.pid, signal.SIGCONT)
    _, err = paused.communicate(timeout=300)
    assert paused.returncode == 2, err[-3000:]
    assert "lost the lease of output" in err and "changed nothing" in err, err[-3000:]
    woken = err.split("faults.py: stopping before", 1)[1]  # what it did after SIGCONT
    assert "Traceback" not in woken and "removing" not in woken, woken
    assert snapshot(out) == taken_over  # the other run's output, to the byte
    assert json.loads((out / REPORT_NAME).read_text())["config"]["threshold"] == 0.3


@needs_models
def test_a_run_paused_past_half_its_stale_time_stops_even_if_nobody_took_over(tmp_path):
    source, out = tmp_path / "in", tmp_path / "out"
    write_parquet_sample(str(source), rows=2000, files=2)
    run_job(JobConfig(input=str(source), output=str(out)))
    before = snapshot(out)
    paused = _faults(["--input", str(source), "--output", str(out), "--local-runner", "--overwrite", "--stale", "4",
                      "--heartbeat", "0.5", "--stop-before", "clear"], start_new_session=True)
    stopped(paused)
    time.sleep(3)  # more than half of 4 s: another run may be about to take the lease over
    os.kill(paused.pid, signal.SIGCONT)
    _, err = paused.communicate(timeout=300)
    assert paused.returncode == 2, err[-3000:]
    assert re.search(r"no heartbeat for \d+ s, more than the 2 s a run acts under", err), err[-3000:]
    assert "changed nothing" in err
    after = snapshot(out)
    assert after == before  # its own lease is not left behind either
    assert not (out / LEASE_NAME).exists()


@needs_models
def test_a_task_does_not_commit_under_a_lease_without_a_recent_heartbeat(tmp_path):
    """The executors' side: the lease names the run but its driver has not beaten for more than the fence
    time (paused, or cut off from the store): the task's files stay out of place."""
    write_parquet_sample(str(tmp_path / "in"), rows=60, files=3)
    out = tmp_path / "out"

    def runner(tasks, worker):
        stats = [worker(tasks[0])]
        lease = json.loads((out / LEASE_NAME).read_text())
        write_lease(out, run_id=lease["run_id"], host=lease["host"], pid=lease["pid"], pidns=lease["pidns"],
                    age=lease_module.fence_seconds() + 5)
        return stats + [worker(task) for task in tasks[1:]]

    with pytest.raises(OutputError, match=r"has had no heartbeat for \d+ s \(a task commits only within \d+ s of "
                                          r"one\): its driver is paused or cannot reach the store"):
        run_job(JobConfig(input=str(tmp_path / "in"), output=str(out)), runner=runner)
    assert len(list(out.glob("*.parquet"))) == 1
    assert not (out / SUCCESS_NAME).exists()


# --- One lease over a tree (issue #23, class 2) ----------------------------------------------------------------

@needs_models
@pytest.mark.parametrize("held, target", [("out", "out/sub"), ("out", "out/a/b/c"), ("out/sub", "out"),
                                          ("out/a/b/c", "out"), ("out/sub", "out/sub/deeper")])
def test_a_run_refuses_an_output_above_or_below_a_folder_another_run_holds(tmp_path, held, target):
    write_parquet_sample(str(tmp_path / "in"), rows=40, files=2)
    (tmp_path / held).mkdir(parents=True)
    write_lease(tmp_path / held)  # live, another host's: a run writing there now
    before = snapshot(tmp_path)
    inside = target.startswith(held + "/")
    message = (rf"output .*{target} is inside .*{held}, a folder another clip-nsfw-spark run is writing" if inside
               else rf"output .*{target} holds other clip-nsfw-spark outputs or runs \({held[len(target) + 1:]}\)")
    with pytest.raises(OutputError, match=message):
        run_job(JobConfig(input=str(tmp_path / "in"), output=str(tmp_path / target)))
    assert snapshot(tmp_path) == before and not (tmp_path / target / LEASE_NAME).exists()


@needs_models
def test_an_output_holding_a_finished_or_stale_output_of_the_tool_is_refused(tmp_path):
    write_parquet_sample(str(tmp_path / "in"), rows=40, files=2)
    run_job(JobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out" / "2024" / "scored")))
    with pytest.raises(OutputError, match=r"holds other clip-nsfw-spark outputs or runs \(2024/scored\)"):
        run_job(JobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out")))
    (tmp_path / "other" / "sub").mkdir(parents=True)
    write_lease(tmp_path / "other" / "sub", age=STALE_SECONDS + 60)  # a dead run's unfinished output
    with pytest.raises(OutputError, match=r"holds other clip-nsfw-spark outputs or runs \(sub\)"):
        run_job(JobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "other")))


@needs_models
def test_two_runs_started_together_above_and_below_do_not_both_write(tmp_path, monkeypatch):
    """The race the lease closes: the inner run takes its lease after the outer one validated its folder
    (no nested output yet) and before the outer one looks again, holding its own lease."""
    from clip_nsfw_spark.driver import job

    write_parquet_sample(str(tmp_path / "in"), rows=40, files=2)
    validate = job.validate_output

    def validate_then_inner_run_starts(config, stores):
        target = validate(config, stores)
        (tmp_path / "out" / "sub").mkdir(parents=True)
        write_lease(tmp_path / "out" / "sub")
        return target

    monkeypatch.setattr(job, "validate_output", validate_then_inner_run_starts)
    with pytest.raises(OutputError, match=r"holds other clip-nsfw-spark outputs or runs \(sub\)"):
        run_job(JobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out")))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["sub"]  # its lease released, nothing written


@needs_models
def test_nested_runs_are_refused_on_s3(s3_server, tmp_path):
    write_parquet_sample(str(tmp_path / "in"), rows=40, files=2)
    s3 = s3_server.filesystem()
    s3.mkdir("nest")
    s3.pipe_file(f"nest/out/sub/{LEASE_NAME}", json.dumps({"run_id": "0th3rrun", "host": "elsewhere", "pid": 1,
                                                           "started": "?", "heartbeat": time.time()}).encode())
    options = s3_server.storage_options()
    with pytest.raises(OutputError, match=r"output s3://nest/out holds other clip-nsfw-spark outputs or runs \(sub\)"):
        run_job(JobConfig(input=str(tmp_path / "in"), output="s3://nest/out", storage_options=options))
    with pytest.raises(OutputError, match=r"output s3://nest/out/sub/x is inside s3://nest/out/sub, a folder another"):
        run_job(JobConfig(input=str(tmp_path / "in"), output="s3://nest/out/sub/x", storage_options=options))
    assert sorted(s3.find("nest")) == [f"nest/out/sub/{LEASE_NAME}"]


@needs_models
def test_a_run_paused_between_two_files_of_a_commit_stops_before_the_next(tmp_path):
    """Paused after a task moved one of its split files into place (a long upload on S3, a GC): the run
    that took over finished meanwhile; the woken task must neither move its other files over the new
    output nor remove the name it wrote a moment ago (it holds the other run's file now)."""
    source, out = tmp_path / "in", tmp_path / "out"
    write_parquet_sample(str(source), rows=300, files=3)
    run_job(JobConfig(input=str(source), output=str(out), mode="split"))
    common = ["--input", str(source), "--output", str(out), "--local-runner", "--stale", "4", "--mode", "split",
              "--overwrite"]
    paused = _faults([*common, "--fault", f"point=commit,match=part-00001,after=1,action=stop,once={tmp_path}/once"],
                     start_new_session=True)
    stopped(paused)
    time.sleep(4.5)
    other = _faults([*common, "--threshold", "0.05"])
    _, err = other.communicate(timeout=600)
    assert other.returncode == 0, err[-3000:]
    taken_over = snapshot(out)
    os.kill(paused.pid, signal.SIGCONT)
    _, err = paused.communicate(timeout=300)
    assert paused.returncode == 2, err[-3000:]
    assert "1 of this task's files were moved into place before this check and are left as they are" in err, err
    assert snapshot(out) == taken_over
