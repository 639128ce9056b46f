"""Driver-side progress: tasks done / total, rows/s and ETA, from the tasks' state files.

Watching the output's ``_clip_nsfw_tasks/`` folder works the same for every runner (in-process, classic
Spark, Spark Connect) and every store (local, S3, HDFS): a task's state file appears when it is complete.
On a terminal the line is redrawn in place; otherwise a log line is written every ``log_every`` seconds.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time

from clip_nsfw_spark.storage.filesystem import join

log = logging.getLogger(__name__)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class ProgressWatcher:
    """Polls the state folder in a background thread while the tasks run (``with`` block)."""

    def __init__(self, fs, root: str, state_dir: str, total_tasks: int, total_rows: int, already: set,
                 rows_before: int = 0, interactive: bool | None = None, poll_seconds: float = 1.0,
                 log_every: float = 30.0):
        self.fs, self.state_dir = fs, join(root, state_dir)
        self.total_tasks, self.total_rows = total_tasks, total_rows
        self.seen = set(already)
        self.rows_done = 0  # rows of tasks completed during this run (the rate counts only these)
        self.rows_before = rows_before  # rows of tasks completed by an earlier, resumed run
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self.poll_seconds, self.log_every = poll_seconds, log_every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="clip-nsfw-progress", daemon=True)
        self._started = time.monotonic()
        self._last_log = self._started

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)
        if self.interactive:
            sys.stderr.write("\n")
            sys.stderr.flush()

    def line(self) -> str:
        elapsed = max(time.monotonic() - self._started, 1e-9)
        rate = self.rows_done / elapsed
        remaining = self.total_rows - self._rows_total()
        eta = _duration(remaining / rate) if rate > 0 and remaining > 0 else "--"
        done = len(self.seen)
        width = 24
        filled = int(width * done / self.total_tasks) if self.total_tasks else width
        return (f"[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total_tasks} tasks  "
                f"{self._rows_total():,}/{self.total_rows:,} rows  {rate:,.0f} rows/s  ETA {eta}")

    def _rows_total(self) -> int:
        return self.rows_done + self.rows_before

    def poll(self) -> None:
        try:
            names = self.fs.ls(self.state_dir, detail=False) if self.fs.exists(self.state_dir) else []
        except OSError:
            return
        for path in names:
            name = path.rsplit("/", 1)[-1]
            task_id = name[:-5]
            if not name.endswith(".json") or name.startswith("_") or task_id in self.seen:
                continue
            try:
                with self.fs.open(path, "r") as handle:
                    self.rows_done += json.load(handle)["rows_read"]
            except (OSError, ValueError, KeyError):
                continue  # being written: next poll
            self.seen.add(task_id)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self.poll()
            now = time.monotonic()
            if self.interactive:
                sys.stderr.write("\r" + self.line())
                sys.stderr.flush()
            elif now - self._last_log >= self.log_every:
                self._last_log = now
                log.info("progress %s", self.line())
