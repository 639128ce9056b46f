"""Progress from the tasks' state files: counts, rows and the rendered line."""

import dataclasses
import logging
import time

import pytest

from clip_nsfw_spark.driver.config import JobConfig
from clip_nsfw_spark.driver.job import run_job
from clip_nsfw_spark.driver.progress import ProgressWatcher
from clip_nsfw_spark.storage.filesystem import filesystem
from clip_nsfw_spark.tools.sample import write_parquet_sample
from conftest import needs_models


def test_watcher_counts_completed_tasks_and_rows(tmp_path, caplog):
    fs, root = filesystem(str(tmp_path))
    state = tmp_path / "_clip_nsfw_tasks"
    state.mkdir()
    (state / "_job.json").write_text("{}")
    (state / "aaa.json").write_text("{}")
    rows = {"old": 1000, "aaa": 1000, "bbb": 500, "ccc": 1500}  # a task's rows come from the plan
    watcher = ProgressWatcher(fs, root, "_clip_nsfw_tasks", rows, already={"old"}, rows_before=1000,
                              interactive=False)
    watcher.poll()
    (state / "bbb.json").write_text("{not json yet")  # a state file being written counts: it exists
    (state / "zzz.json").write_text("{}")  # a task not in the plan (a stale state) does not
    watcher.poll()
    assert watcher.seen == {"old", "aaa", "bbb"} and watcher.rows_done == 1500
    line = watcher.line()
    assert "3/4 tasks" in line and "2,500/4,000 rows" in line and "rows/s" in line and "ETA" in line
    with caplog.at_level(logging.INFO, logger="clip_nsfw_spark.driver.progress"):
        with watcher:
            (state / "ccc.json").write_text("{}")
    assert caplog.messages[-1].startswith("progress [########################] 4/4 tasks  4,000/4,000 rows")


def test_the_wait_between_polls_grows_with_the_time_a_poll_takes(tmp_path, monkeypatch):
    fs, root = filesystem(str(tmp_path))
    watcher = ProgressWatcher(fs, root, "_clip_nsfw_tasks", {"a": 1}, already=set(), interactive=False,
                              poll_seconds=0.01)
    waits, polls = [], []
    monkeypatch.setattr(watcher, "poll", lambda: (polls.append(1), time.sleep(0.05)))
    monkeypatch.setattr(watcher._stop, "wait", lambda seconds: waits.append(seconds) or len(waits) > 3)
    watcher._run()
    assert len(polls) == 3 and waits[0] == 0.01 and all(w >= 0.05 * 4 * 0.9 for w in waits[1:])


def test_on_a_terminal_a_tqdm_bar_counts_rows_and_tasks(tmp_path, caplog):
    """Interactive: a tqdm bar on the stream (rows, rate, tasks), no log lines; it ends at the run's end."""
    import io

    fs, root = filesystem(str(tmp_path))
    state = tmp_path / "_clip_nsfw_tasks"
    state.mkdir()
    stream = io.StringIO()
    watcher = ProgressWatcher(fs, root, "_clip_nsfw_tasks", {"old": 1000, "aaa": 1000, "bbb": 2000}, already={"old"},
                              rows_before=1000, interactive=True, poll_seconds=0.05, stream=stream)
    with caplog.at_level(logging.INFO, logger="clip_nsfw_spark.driver.progress"):
        with watcher:
            (state / "aaa.json").write_text("{}")
            time.sleep(0.3)
            (state / "bbb.json").write_text("{}")
    drawn = stream.getvalue()
    assert "rows" in drawn and "3/3 tasks" in drawn and "4.00k/4.00k" in drawn and "100%" in drawn
    assert not [m for m in caplog.messages if m.startswith("progress")]


@needs_models
def test_a_resume_with_nothing_to_run_lists_no_state_folder(tmp_path, monkeypatch):
    """A finished output's resume starts no watcher: its last poll would list every task's state (100,000
    names on a 100,000-task output) to say what the summary says. A run with tasks to do is still watched."""
    polls = []
    monkeypatch.setattr(ProgressWatcher, "poll", lambda self: polls.append(self.total_tasks))
    write_parquet_sample(str(tmp_path / "in"), rows=60, files=3)
    config = JobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    first = run_job(config, progress=True)
    assert first["input"]["tasks"] == 3 and polls == [3]  # the last poll, at the end of the run
    again = run_job(dataclasses.replace(config, resume=True), progress=True)
    assert again["tasks_resumed"] == 3 and polls == [3]


def test_tasks_whose_rows_are_not_known_are_counted_as_tasks(tmp_path):
    """Tasks planned from the listing (rows contract.ROWS_FROM_FOOTER) have no rows before they run: progress,
    rate and ETA count tasks."""
    fs, root = filesystem(str(tmp_path))
    state = tmp_path / "_clip_nsfw_tasks"
    state.mkdir()
    rows = {"old": 100, "aaa": -1, "bbb": -1, "ccc": -1}
    watcher = ProgressWatcher(fs, root, "_clip_nsfw_tasks", rows, already={"old"}, rows_before=100, interactive=False)
    (state / "aaa.json").write_text("{}")
    watcher.poll()
    assert watcher.unit == "tasks" and watcher.rows_done == 1 and watcher.rows_before == 1
    line = watcher.line()
    assert "2/4 tasks" in line and "tasks/s" in line and "rows" not in line and "ETA" in line


def test_a_store_that_is_down_never_ends_the_watcher_or_prints_a_traceback(tmp_path):
    """An S3 server restarted mid-run: botocore's EndpointConnectionError is no OSError. The watcher's thread
    must skip that poll (the run's own error, if any, says what happened), not die with a traceback on stderr
    (CI saw "Exception in thread clip-nsfw-progress" in a run that otherwise failed cleanly)."""
    import socket
    import threading

    with socket.socket() as probe:  # a loopback port nothing listens on: a real client, a server that is down
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "k", "secret": "s",
               "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}
    fs, root = filesystem("s3://bucket/out", storage_options=options)
    with pytest.raises(Exception) as raised:  # what the watcher meets: not an OSError
        fs.ls("bucket/out/_clip_nsfw_tasks")
    assert not isinstance(raised.value, OSError), type(raised.value)
    died = []
    previous, threading.excepthook = threading.excepthook, died.append
    try:
        watcher = ProgressWatcher(fs, root, "_clip_nsfw_tasks", {"aaa": 10}, already=set(), interactive=False,
                                  poll_seconds=0.05)
        with watcher:
            time.sleep(0.5)
            assert watcher._thread.is_alive()
    finally:
        threading.excepthook = previous
    assert died == [] and watcher.seen == set()
