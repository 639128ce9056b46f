"""Driver-side progress: tasks done / total, rows/s and ETA, from the tasks' state files.

Watching the output's ``_clip_nsfw_tasks/`` folder works the same for every runner (in-process, classic
Spark, Spark Connect) and every store (local, S3, HDFS): a task's state file appears when it is complete.
On a terminal a tqdm bar (rows, tasks, rows/s, ETA) is redrawn in place; otherwise (a log, a file, Airflow)
a plain log line is written every ``log_every`` seconds, which reads well where ``\r`` does not.

Cost: a poll is one fresh listing of that folder (past fsspec's listing cache, which would otherwise show
the folder as it was at the first poll) and nothing else: a task's rows come from the plan, not from its
state file. On S3 a listing is one request per 1,000 names, so a poll of 100,000 tasks takes ~100
requests; the wait between polls grows with the time a poll takes (``POLL_DUTY``), which keeps the
requests per second the watcher sends bounded whatever the number of tasks.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

from tqdm import tqdm

from clip_nsfw_spark.storage.filesystem import join, list_fresh

log = logging.getLogger(__name__)
POLL_DUTY = 0.2  # at most this share of the time is spent listing: wait ≥ 4 × the last poll's duration


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class ProgressWatcher:
    """Polls the state folder in a background thread while the tasks run (``with`` block).

    ``rows_by_task`` maps the id of every planned task to its rows; ``already`` holds the ids complete
    before this run (a resume) and ``rows_before`` their rows. State files of tasks not in the plan are
    not counted. When some task's rows are not known before it runs (negative: planned from the listing,
    contract.ROWS_FROM_FOOTER), progress, rate and ETA are counted in tasks instead of rows.
    ``interactive`` (default: whether ``stream`` is a terminal) draws a tqdm bar on ``stream``
    (default: standard error).
    """

    def __init__(self, fs, root: str, state_dir: str, rows_by_task: dict[str, int], already: set,
                 rows_before: int = 0, interactive: bool | None = None, poll_seconds: float = 1.0,
                 log_every: float = 30.0, stream=None):
        self.fs, self.state_dir = fs, join(root, state_dir)
        self.unit = "rows" if all(rows >= 0 for rows in rows_by_task.values()) else "tasks"
        # What a task adds to the count: its rows, or 1 when counting tasks.
        self.rows_by_task = dict(rows_by_task) if self.unit == "rows" else dict.fromkeys(rows_by_task, 1)
        self.total_tasks, self.total_rows = len(self.rows_by_task), sum(self.rows_by_task.values())
        self.seen = set(already)
        self.rows_done = 0  # rows (or tasks) completed during this run (the rate counts only these)
        # rows (or tasks) completed by an earlier, resumed run
        self.rows_before = rows_before if self.unit == "rows" else len(self.seen & set(self.rows_by_task))
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.poll_seconds, self.log_every = poll_seconds, log_every
        self._bar = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="clip-nsfw-progress", daemon=True)
        self._started = time.monotonic()
        self._last_log = self._started

    def __enter__(self):
        if self.interactive:
            self._bar = tqdm(total=self.total_rows, initial=self._rows_total(), unit=self.unit, unit_scale=True,
                             file=self.stream, dynamic_ncols=True, smoothing=0.1, mininterval=0.5)
            self._draw()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)
        if exc[0] is None:
            self.poll()  # the last line shows where the run ended, not the poll before it
        if self._bar is not None:
            self._draw()
            self._bar.close()
        else:
            log.info("progress %s", self.line())

    def _draw(self) -> None:
        """The bar to the rows counted so far, with the task count beside it."""
        if self.unit == "rows":  # counting tasks, the bar itself says how many
            self._bar.set_postfix_str(f"{len(self.seen)}/{self.total_tasks} tasks", refresh=False)
        self._bar.update(self._rows_total() - self._bar.n)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self._started, 1e-9)
        rate = self.rows_done / elapsed
        remaining = self.total_rows - self._rows_total()
        eta = _duration(remaining / rate) if rate > 0 and remaining > 0 else "--"
        done = len(self.seen)
        width = 24
        filled = int(width * done / self.total_tasks) if self.total_tasks else width
        if self.unit == "tasks":
            return (f"[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total_tasks} tasks  "
                    f"{rate:,.1f} tasks/s  ETA {eta}")
        return (f"[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total_tasks} tasks  "
                f"{self._rows_total():,}/{self.total_rows:,} rows  {rate:,.0f} rows/s  ETA {eta}")

    def _rows_total(self) -> int:
        return self.rows_done + self.rows_before

    def poll(self) -> None:
        try:
            names = list_fresh(self.fs, self.state_dir)
        except Exception:  # noqa: BLE001 - the store is slow or down for a moment (botocore's connection
            return  # errors are no OSError): the next poll tells; a progress line never ends a run
        for path in names:
            name = path.rstrip("/").rsplit("/", 1)[-1]
            task_id = name[:-5]
            if name.endswith(".json") and task_id in self.rows_by_task and task_id not in self.seen:
                self.seen.add(task_id)
                self.rows_done += self.rows_by_task[task_id]

    def _run(self) -> None:
        wait = self.poll_seconds
        while not self._stop.wait(wait):
            started = time.monotonic()
            self.poll()
            now = time.monotonic()
            wait = max(self.poll_seconds, (now - started) * (1 - POLL_DUTY) / POLL_DUTY)
            if self._bar is not None:
                self._draw()
            elif now - self._last_log >= self.log_every:
                self._last_log = now
                log.info("progress %s", self.line())
