"""Where a worker's seconds go: wall and CPU seconds per stage, per thread, and the worker process's own.

A task's stages (``TASK_STAGES``) are timed by the thread that runs them (``StageClock``): wall seconds, and
the thread's CPU seconds (``time.thread_time``: a thread waiting for IO, for the GIL or for another stage's
queue uses none). CPU spent on threads no clock follows (an fsspec store's event loop, a library's own pool)
is not in any stage: the account counts it as idle. With read-ahead and write-behind threads (worker.py) the
stages of one task overlap: their wall seconds can add up to more than the task's, their CPU seconds cannot
exceed what the cores gave. So the run's account of core-seconds (driver/report.py) is made of CPU seconds:
each stage's, the process's own (``PROCESS_STAGES``, counted once per Python process), and the rest of ``cores
× the task phase's wall seconds`` as idle (or spent outside the Python workers: Spark's JVM, scheduling).

``TimedFile`` wraps a file object to tell its reads or writes (storage) from the work around them (decoding,
encoding).
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter

# A task's stages, in pipeline order. open: the input opened and its footer read, the output files
# created; read: bytes read from storage; decode: those bytes into Arrow/numpy batches; score: embeddings
# checked and scored; encode: scored batches routed and encoded as parquet; write: bytes written to
# storage; commit: files moved or uploaded into place and the manifest written (the state file's own write,
# the task's last, is not timed: the state holds these figures).
TASK_STAGES = ("open", "read", "decode", "score", "encode", "write", "commit")
# Paid once per Python worker process, before or at its first task: worker_start: the process started
# (forked) and set up by PySpark until this package's first import; imports: this package and what it
# imports, and the first Spark task's function unpickled; model: the scorers built and their kernels
# loaded (numba's on-disk cache) or compiled. transfer: a Spark task's tasks taken from what Spark sent and
# its record of results put together (pickling it and sending it are not timed). worker_start and imports
# are CPU seconds; they are reported as the wall seconds of those stages too (the process was busy).
PROCESS_STAGES = ("worker_start", "imports", "model", "transfer")


class StageClock:
    """Seconds per stage of one thread: ``wall[stage]`` and ``cpu[stage]`` (this thread's CPU).

    ``with clock("score"): ...`` times a block; ``clock.add(...)`` adds measured seconds. Not shared
    between threads: each thread has its own clock, merged into one with ``merge``.
    """

    def __init__(self):
        self.wall: Counter = Counter()
        self.cpu: Counter = Counter()

    @contextlib.contextmanager
    def __call__(self, stage: str):
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self.wall[stage] += time.perf_counter() - wall
            self.cpu[stage] += time.thread_time() - cpu

    def add(self, stage: str, wall: float, cpu: float) -> None:
        self.wall[stage] += wall
        self.cpu[stage] += cpu

    def merge(self, other: "StageClock") -> "StageClock":
        self.wall.update(other.wall)
        self.cpu.update(other.cpu)
        return self

    def figures(self) -> tuple[dict, dict]:
        """``(wall seconds, CPU seconds)`` by stage, rounded to microseconds, stages never timed left out."""
        return ({k: round(v, 6) for k, v in self.wall.items() if v},
                {k: round(v, 6) for k, v in self.cpu.items() if v})


class TimedFile:
    """A file object whose ``read``/``readinto``/``write`` calls are timed as ``stage`` on ``clock``;
    everything else is the wrapped file's. ``clock`` may be replaced when another thread takes the file
    over (each thread times on its own clock); the file is used by one thread at a time. ``bytes_written``
    counts what ``write`` was given."""

    def __init__(self, file, clock: StageClock, stage: str):
        self._file, self.clock, self._stage = file, clock, stage
        self.bytes_written = 0

    def _timed(self, method, *args):
        with self.clock(self._stage):
            return method(*args)

    def read(self, *args):
        return self._timed(self._file.read, *args)

    def __getattr__(self, name):
        attribute = getattr(self._file, name)
        if name == "readinto":  # timed too, and only where the file has one (callers test for it)
            return lambda buffer: self._timed(attribute, buffer)
        return attribute

    def write(self, data):
        self.bytes_written += memoryview(data).nbytes
        return self._timed(self._file.write, data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()


_process_counted = False
_counted_until: float | None = None  # this process's CPU seconds already counted elsewhere (planning)
_preloaded: tuple[int, int] | None = None  # (the preloading daemon's pid, the pipe holding its preload's CPU)


def offer_preload_seconds(pipe: int, daemon_pid: int) -> None:
    """Called by the preloading daemon (spark/daemon.py) before it forks: the workers it forks find the
    package imported in their parent, and ``pipe`` holding the preload's CPU seconds for one of them."""
    global _preloaded
    _preloaded = (daemon_pid, pipe)


def _preload_seconds(phase_started: float | None) -> float | None:
    """The preloading daemon's CPU seconds for the first worker that asks, where its preload ended after
    ``phase_started`` (epoch seconds; None: whenever); 0.0 for the others, and where it ended before (it
    was a planning's, or an earlier job's, cost); None in a process not forked from such a daemon."""
    import os
    import struct

    if _preloaded is None or os.getpid() == _preloaded[0]:
        return None
    try:
        data = os.read(_preloaded[1], 16)
    except OSError:  # empty (another worker took them), or the descriptor gone: nothing to count
        data = b""
    if len(data) != 16:
        return 0.0
    seconds, ended = struct.unpack("<dd", data)
    return seconds if phase_started is None or ended >= phase_started else 0.0


def mark_process_seconds() -> None:
    """Count this process's CPU seconds so far as spent elsewhere (reading footers for the planner): its
    first task then reports only what came after as imports, and no worker start."""
    global _counted_until
    _counted_until = time.process_time()


def process_seconds_once(phase_started: float | None = None) -> dict:
    """``{"worker_start": s, "imports": s}``, CPU seconds of this process before its first task, the first time
    it is called in a process; ``{}`` after that (a reused Python worker counts them once).

    worker_start: the process's CPU seconds until this package began to import (``clip_nsfw_spark.IMPORTED_AT_CPU``;
    a Python worker forked by PySpark's daemon starts from zero at its fork); imports: from then until now.
    A worker forked by the preloading daemon (spark/daemon.py) found everything imported: worker_start is all
    its CPU before its first task, imports the daemon's CPU before it forked (its start, imports and kernels),
    counted by one worker, and only where the daemon preloaded after ``phase_started`` (the task phase's
    start, epoch seconds: a daemon started earlier, e.g. to read footers, was not this phase's cost).
    """
    global _process_counted
    if _process_counted:
        return {}
    _process_counted = True
    preloaded = _preload_seconds(phase_started)
    if _counted_until is not None:  # the process read footers first: its start and first imports were planning
        return {"imports": round(time.process_time() - _counted_until + (preloaded or 0.0), 6)}
    if preloaded is not None:  # forked from the preloading daemon: its CPU so far is its start
        return {"worker_start": round(time.process_time(), 6), "imports": round(preloaded, 6)}
    import clip_nsfw_spark

    at_import = clip_nsfw_spark.IMPORTED_AT_CPU
    return {"worker_start": round(at_import, 6), "imports": round(time.process_time() - at_import, 6)}
