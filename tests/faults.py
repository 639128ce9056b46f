"""Fault injection for the tests, outside the product: a worker whose filesystems fail on purpose.

``Fault.wrap(worker)`` returns a callable ``Task → stats`` that runs the real worker, with filesystems that
fire the fault at a point of the tasks whose output name contains ``match``:

* ``write``: after ``after`` writes to output files (a task killed or slowed while writing);
* ``commit``: after ``after`` output files were moved to their final names (a task half committed).

Actions: ``kill`` (SIGKILL the Python worker, as a preempted executor dies), ``stop`` (SIGSTOP itself:
paused until SIGCONT), ``raise``, ``sleep``
(``seconds`` per firing: slows every write after the point). ``once``: a flag file, so the fault fires
a single time and a retry succeeds.

Run as a script it is the job's command line with one more option, ``--fault point=…,after=…,…``:
``python tests/faults.py --fault point=commit,match=part-00001,after=2,action=kill --input … --output …``.
Run so, its classes live in ``__main__`` and travel to Spark's Python workers by value.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import time

from clip_nsfw_spark.executor.writer import MANIFEST_DIR


@dataclasses.dataclass(frozen=True)
class Fault:
    point: str  # "write" | "commit"
    match: str = ""
    after: int = 0
    action: str = "raise"
    seconds: float = 1.0
    once: str | None = None

    @classmethod
    def parse(cls, spec: str) -> "Fault":
        """``point=write,match=part-00001,after=2,action=kill,once=/tmp/flag`` → Fault."""
        items = dict(item.split("=", 1) for item in spec.split(",") if "=" in item)
        return cls(point=items["point"], match=items.get("match", ""), after=int(items.get("after", 0)),
                   action=items.get("action", "raise"), seconds=float(items.get("seconds", 1.0)),
                   once=items.get("once"))

    def fire(self, where: str) -> None:
        if self.once:
            try:
                os.close(os.open(self.once, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return
        if self.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.action == "stop":  # paused (Ctrl-Z, a long GC): goes on at SIGCONT
            os.kill(os.getpid(), signal.SIGSTOP)
        elif self.action == "sleep":
            time.sleep(self.seconds)
        else:
            raise RuntimeError(f"injected fault at {self.point} of {where}")

    def wrap(self, worker):
        return FaultyWorker(worker, self)


@dataclasses.dataclass(frozen=True)
class FaultyWorker:
    """The worker, with failing filesystems for the tasks the fault matches."""

    worker: object
    fault: Fault

    def __call__(self, task):
        if self.fault.match not in task.rel:
            return self.worker(task)
        counts = {"write": 0, "commit": 0}  # one task's count, over all its files
        opener = FaultyOpener(self.worker.open_filesystem, self.fault, counts, task.rel)
        return dataclasses.replace(self.worker, open_filesystem=opener)(task)


@dataclasses.dataclass
class FaultyOpener:
    open_filesystem: object
    fault: Fault
    counts: dict
    where: str

    def __call__(self, url, storage_options=None):
        fs, root = self.open_filesystem(url, storage_options)
        return FaultyFilesystem(fs, self), root

    def step(self, point: str) -> None:
        if point != self.fault.point:
            return
        self.counts[point] += 1
        if self.counts[point] >= self.fault.after:
            self.fault.fire(self.where)


class FaultyFilesystem:
    """An fsspec filesystem whose written files count writes and whose ``mv`` (``put_file`` on object
    stores, where a task's files are built on local disk) counts commits."""

    def __init__(self, fs, opener: FaultyOpener):
        self._fs, self._opener = fs, opener

    def __getattr__(self, name):
        return getattr(self._fs, name)

    def open(self, path, mode="rb", **kwargs):
        handle = self._fs.open(path, mode, **kwargs)
        return CountingFile(handle, self._opener) if "w" in mode and MANIFEST_DIR not in path else handle

    def mv(self, source, target, **kwargs):
        result = self._fs.mv(source, target, **kwargs)
        if MANIFEST_DIR not in target:  # the manifest is written before the commit: counted as neither
            self._opener.step("commit")
        return result

    def put_file(self, source, target, **kwargs):  # an object store's commit: the spooled file uploaded
        result = self._fs.put_file(source, target, **kwargs)
        self._opener.step("commit")
        return result


class CountingFile:
    def __init__(self, handle, opener: FaultyOpener):
        self._handle, self._opener = handle, opener

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()

    def write(self, data):
        written = self._handle.write(data)
        self._opener.step("write")
        return written


# Driver steps a test can pause the driver before: (module, function) as job.py calls it.
STOP_POINTS = {"clear": ("clip_nsfw_spark.driver.job", "clear_output"),
               "prepare": ("clip_nsfw_spark.driver.job", "_prepare_state"),
               "report": ("clip_nsfw_spark.driver.job", "build_report")}


def _stop_before(point: tuple[str, str]) -> None:
    """Make the driver SIGSTOP itself when it reaches ``point``; it goes on when SIGCONT comes."""
    import importlib

    module = importlib.import_module(point[0])
    step = getattr(module, point[1])

    def stopped(*args, **kwargs):
        print(f"faults.py: stopping before {point[1]}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
        return step(*args, **kwargs)

    setattr(module, point[1], stopped)


def main(argv=None) -> int:
    from clip_nsfw_spark.errors import ClipNsfwError
    from clip_nsfw_spark.cli.run import add_job_arguments, run_from_args

    parser = argparse.ArgumentParser(prog="faults.py")
    parser.add_argument("--fault", help="point=write|commit,match=…,after=N,action=kill|raise|sleep")
    parser.add_argument("--heartbeat", type=float, help="the driver's lease heartbeat in seconds (default: lease.py's)")
    parser.add_argument("--stale", type=float, help="seconds without a heartbeat before a lease is stale")
    parser.add_argument("--stop-before", choices=sorted(STOP_POINTS),
                        help="the driver stops itself (SIGSTOP, as Ctrl-Z or a long pause) right before this step")
    add_job_arguments(parser)
    args = parser.parse_args(argv)
    from clip_nsfw_spark.storage import lease

    if args.heartbeat:
        lease.HEARTBEAT_SECONDS = args.heartbeat
    if args.stale:
        lease.STALE_SECONDS = args.stale
        # A run acts only within half the stale time of its last heartbeat: beat well inside it.
        lease.HEARTBEAT_SECONDS = min(lease.HEARTBEAT_SECONDS, args.stale / 8)
    if args.stop_before:
        _stop_before(STOP_POINTS[args.stop_before])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    fault = Fault.parse(args.fault) if args.fault else None
    try:
        return run_from_args(args, default_master="local[*]", wrap_worker=fault.wrap if fault else None)
    except ClipNsfwError as err:
        print(f"faults.py: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
