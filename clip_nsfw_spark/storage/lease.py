"""One run at a time per output folder: a lease file the driver holds and every task checks at commit.

``<output>/_clip_nsfw_lease.json`` holds ``{"run_id", "host", "pid", "pidns", "started", "heartbeat"}``
(``heartbeat`` in seconds since the epoch). The driver creates it before it deletes or writes anything,
refreshes ``heartbeat`` every ``HEARTBEAT_SECONDS`` while the run lives, and removes it when the run ends
(also on errors and Ctrl-C). A second run on the same output is refused while the lease is live. A lease is
stale, and may be taken over, when its heartbeat is older than ``STALE_SECONDS`` or its pid is gone on this
same host and pid namespace (a killed driver). Every task reads the lease just before moving its files into
place and refuses to commit when its run no longer owns it, so a run that lost its lease never overwrites
another run's files.

Atomicity: on a local (or NFS-like POSIX) filesystem the lease is written aside and hard-linked into
place (an exclusive create that is never seen half-written), and a stale one is taken over by an atomic
``rename`` first, so exactly one of two racing runs wins. Object
stores have no exclusive create through fsspec: the lease is written, then read back after
``SETTLE_SECONDS``; the run whose id is read back wins. Two runs whose check and write are more than
``SETTLE_SECONDS`` apart while both saw no lease could still both start; the commit-time check then makes
the loser's tasks fail rather than overwrite. The check at commit is not a transaction either: a lease
taken over between a task's check and its move is possible in principle, which is why a lease becomes
stale only after minutes without a heartbeat, not seconds.

Fencing: a run acts on its output only while its lease is young. Right before every destructive or
completing step (clear, resume's removals, the job state, the report, ``_SUCCESS``) the driver calls
``RunLease.fence``, and every task calls ``check_owner`` before its commit: both read the lease fresh and
refuse unless it names this run with a heartbeat younger than ``fence_seconds()`` (half the stale time).
A run that was paused (Ctrl-Z, SIGSTOP, a long GC) or cut off from the store past that age stops without
touching anything, whether or not another run has taken its lease over by then; the heartbeat thread
does not revive such a lease either.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid

from clip_nsfw_spark.errors import LeaseLostError, LeaseUnreadableError, OutputError
from clip_nsfw_spark.storage.filesystem import (accessing, is_local, is_storage_error, is_webhdfs, join, read_fresh,
                                                remove, rename_file, unstrip)

log = logging.getLogger(__name__)
LEASE_NAME = "_clip_nsfw_lease.json"
HEARTBEAT_SECONDS = 20.0
STALE_SECONDS = 120.0  # fits a scheduler retry: Airflow's DAG here waits 5 minutes
SETTLE_SECONDS = 1.0
FENCE_REUSE_SECONDS = 2.0  # a fence check stands this long: far below fence_seconds()'s margin to stale


def fence_seconds() -> float:
    """The oldest heartbeat a run still acts under: half the stale time, so a lease another run may take
    over is never acted on, and a step that starts in time ends long before the lease could go stale."""
    return STALE_SECONDS / 2


def heartbeat_age(lease: dict, now: float | None = None) -> float:
    """Seconds since the lease's last heartbeat (infinite when it has none)."""
    try:
        return (time.time() if now is None else now) - float(lease.get("heartbeat"))
    except (TypeError, ValueError):
        return float("inf")


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


def read_lease(fs, root: str) -> dict | None:
    """The lease of the output at ``root``, or None when there is none. A lease that is not a JSON object
    (being created by another run at this moment) reads as a live lease of run ``?``, aged by its mtime.
    Storage errors propagate: an unreachable store is not a lost lease."""
    path = join(root, LEASE_NAME)
    try:
        data = read_fresh(fs, path)  # rewritten at every heartbeat: never from a cache
    except FileNotFoundError:
        return None
    try:
        lease = json.loads(data)
    except ValueError:
        lease = None
    if not isinstance(lease, dict):
        return {"run_id": "?", "host": "?", "pid": -1, "started": "?", "heartbeat": _mtime(fs, path)}
    return lease


def _mtime(fs, path: str) -> float:
    try:
        modified = fs.modified(path)
        return modified.timestamp()
    except Exception:  # noqa: BLE001 - no timestamp: count it as fresh, the safe side
        return time.time()


def stale_reason(lease: dict, now: float | None = None) -> str | None:
    """Why ``lease`` may be taken over (its heartbeat is too old, its driver is gone), or None if live."""
    age = heartbeat_age(lease, now)
    if age > STALE_SECONDS:
        return f"no heartbeat for {age:.0f} s (stale after {STALE_SECONDS:.0f} s)"
    # The pid means something only in the same pid namespace: containers sharing the host's name
    # (docker --network host) have their own pids.
    if lease.get("host") == socket.gethostname() and lease.get("pidns") == _pid_namespace() \
            and isinstance(lease.get("pid"), int) and lease["pid"] > 0:
        try:
            os.kill(lease["pid"], 0)
        except ProcessLookupError:
            return f"its driver (pid {lease['pid']} on this host) is gone"
        except PermissionError:
            pass  # the process exists under another user
    return None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def describe(lease: dict, url: str) -> str:
    stale_at = datetime.datetime.fromtimestamp(time.time() - min(heartbeat_age(lease), 1e9) + STALE_SECONDS,
                                               datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return (f"output {url} is being written by run {lease.get('run_id')} started at {lease.get('started')} on "
            f"host {lease.get('host')}, pid {lease.get('pid')}; wait for it or, if it died, rerun with --resume "
            f"after {stale_at} (its lease is stale {STALE_SECONDS / 60:.0f} minutes after its last heartbeat, "
            f"or at once on that host when its pid is gone)")


def refuse_if_held(fs, root: str, url: str) -> dict | None:
    """Raise OutputError when a live run holds the output's lease; return a stale lease (or None)."""
    lease = read_lease(fs, root)
    if lease is not None and stale_reason(lease) is None:
        raise OutputError(describe(lease, url))
    return lease


def check_owner(fs, root: str, run_id: str | None,
                not_moved: str = "This task's files were not moved into place.") -> None:
    """Raise LeaseLostError unless run ``run_id`` still holds a young lease (tasks call this before their
    manifest, before each file they commit and before their state). ``not_moved`` says in the error what
    the task left undone."""
    if run_id is None:
        return
    try:
        lease = read_lease(fs, root)
    except Exception as err:
        if not is_storage_error(err):
            raise
        # The store failed, not the lease: neither a lost lease nor an OutputError (which would fail the run
        # at once); a TaskError, which the Spark runner retries in place (a store down a moment is survived).
        cause = " ".join(f"{type(err).__name__}: {err}".split())
        raise LeaseUnreadableError(f"cannot read the lease of output {unstrip(fs, root)} to check that run {run_id} "
                                   f"still holds it: {cause}. {not_moved}") from err
    if lease is None or lease.get("run_id") != run_id:
        holder = "no run" if lease is None else f"run {lease.get('run_id')} (host {lease.get('host')}, " \
                                                 f"pid {lease.get('pid')})"
        raise LeaseLostError(f"run {run_id} no longer holds the lease of output {unstrip(fs, root)}: it is held "
                             f"by {holder}. {not_moved} Rerun with --resume once no other run writes this output.")
    age = heartbeat_age(lease)
    if age > fence_seconds():  # the driver is paused or cut off: another run may take the lease over
        raise LeaseLostError(f"run {run_id}'s lease of output {unstrip(fs, root)} has had no heartbeat for "
                             f"{age:.0f} s (a task commits only within {fence_seconds():.0f} s of one): its driver "
                             f"is paused or cannot reach the store. {not_moved} Rerun with --resume.")


def _paused(age: float) -> str:
    return (f"no heartbeat for {age:.0f} s, more than the {fence_seconds():.0f} s a run acts under: it was paused "
            "or could not reach the store, and another run may take its lease over")


class RunLease:
    """The lease of one run, as a context manager: acquired on entry, refreshed by a thread, released on exit.

    ``lost`` is None while the run owns the lease, else why it does not any more.
    """

    def __init__(self, fs, root: str, run_id: str | None = None):
        self.fs, self.root, self.url = fs, root, unstrip(fs, root)
        self.path = join(root, LEASE_NAME)
        self.run_id = run_id or new_run_id()
        self.record = {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                       "pidns": _pid_namespace(),
                       "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
                       "heartbeat": time.time()}
        self.lost: str | None = None
        self._fenced_at = float("-inf")
        self._created = False
        self._wrote = False  # a lease of this run was written (a failed acquire must then remove it)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "RunLease":
        try:
            self.acquire()
        except BaseException:
            # A lease written whose read-back failed (the store down a moment) would refuse every other run
            # until stale: remove it if it is this run's (release never removes another's). A store that failed
            # before anything was written gets no second round of requests (or timeouts).
            if self._wrote:
                self.release()
            raise
        self._thread = threading.Thread(target=self._beat, name="clip-nsfw-lease", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.release()

    def acquire(self) -> None:
        with accessing(self.fs, self.root, "output"):  # e.g. a read-only output: one clear error
            self._created = is_local(self.fs) and not self.fs.exists(self.root)
            self.fs.makedirs(self.root, exist_ok=True)
            if is_local(self.fs):
                self._acquire_local()
            else:
                self._acquire_remote()
        log.info("run %s holds the lease of %s", self.run_id, self.url)

    def _acquire_local(self) -> None:
        # Written whole aside, then hard-linked to the lease's name: link() is an exclusive create (EEXIST
        # if the name exists) that never shows another reader an empty or half-written lease.
        aside = f"{self.path}.{self.run_id}"
        with open(aside, "w") as handle:
            handle.write(json.dumps(self.record))
        try:
            for _ in range(5):
                try:
                    os.link(aside, self.path)
                except FileExistsError:
                    self._take_over_local()
                    continue
                return
        finally:
            os.remove(aside)
        raise OutputError(f"could not take the lease of output {self.url}: another run keeps taking it")

    def _take_over_local(self) -> None:
        lease = refuse_if_held(self.fs, self.root, self.url)
        if lease is None:
            return  # released meanwhile: try to create it again
        moved = f"{self.path}.stale-{self.run_id}"
        try:
            os.rename(self.path, moved)  # atomic: of two runs taking over, only one moves it
        except FileNotFoundError:
            return
        log.warning("taking over the stale lease of %s from run %s: %s", self.url, lease.get("run_id"),
                    stale_reason(lease))
        os.remove(moved)

    def _acquire_remote(self) -> None:
        lease = refuse_if_held(self.fs, self.root, self.url)
        if lease is not None:
            log.warning("taking over the stale lease of %s from run %s: %s", self.url, lease.get("run_id"),
                        stale_reason(lease))
        self._write()
        time.sleep(SETTLE_SECONDS)
        now = read_lease(self.fs, self.root)
        if now is None or now.get("run_id") != self.run_id:
            raise OutputError(describe(now or {}, self.url))

    def _write(self) -> None:
        self._wrote = True  # set first: a write that fails half-way may still have put the lease there
        data = json.dumps(self.record)
        if is_local(self.fs):  # never a half-written lease: write aside, then rename over it
            aside = f"{self.path}.{self.run_id}"
            with open(aside, "w") as handle:
                handle.write(data)
            os.replace(aside, self.path)
        elif is_webhdfs(self.fs):  # WebHDFS writes a file in two requests (create, append): aside, then rename2
            aside = join(self.root, f"_clip_nsfw_aside.{self.run_id}.lease")
            self.fs.pipe_file(aside, data.encode())
            rename_file(self.fs, aside, self.path, replace=True)
        else:  # an object appears whole
            self.fs.pipe_file(self.path, data.encode())

    def refresh(self) -> None:
        """Write a new heartbeat if this run still owns the lease; otherwise record that it was lost."""
        lease = read_lease(self.fs, self.root)
        if lease is not None and lease.get("run_id") == "?":
            return  # unreadable for now (another writer mid-write): judge it at the next beat, not now
        if lease is None or lease.get("run_id") != self.run_id:
            self.lost = "its lease was removed" if lease is None else \
                f"run {lease.get('run_id')} on host {lease.get('host')} took its lease over"
            return
        age = heartbeat_age(lease)
        if age > fence_seconds():  # paused or cut off that long: another run may be taking it over now
            self.lost = _paused(age)
            return
        self.record["heartbeat"] = time.time()
        self._write()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS) and self.lost is None:
            try:
                self.refresh()
            except Exception as err:  # noqa: BLE001 - a missed heartbeat is retried; staleness takes minutes
                log.warning("could not refresh the lease of %s: %s", self.url, err)

    def fence(self, step: str) -> None:
        """Raise OutputError unless this run still holds a young lease; call it right before ``step`` (a
        destructive or completing action, named in the error). Reads the lease fresh, never the heartbeat
        thread's last view: a paused run wakes up here, before it touches anything."""
        if self.lost is None and time.time() - self._fenced_at < FENCE_REUSE_SECONDS:
            return  # checked a moment ago: a loop of deletes reads the lease every few seconds, not per delete
        if self.lost is None:
            with accessing(self.fs, self.root, "output"):
                lease = read_lease(self.fs, self.root)
            if lease is None or lease.get("run_id") != self.run_id:
                self.lost = "its lease is gone" if lease is None else f"run {lease.get('run_id')} holds it now"
            elif heartbeat_age(lease) > fence_seconds():
                self.lost = _paused(heartbeat_age(lease))
            else:
                self._fenced_at = time.time()
        if self.lost:
            raise LeaseLostError(f"run {self.run_id} lost the lease of output {self.url} ({self.lost}); it stopped "
                                 f"before {step} and changed nothing. Make sure one run at a time writes this "
                                 "output, then rerun with --resume.")


    def release(self) -> None:
        try:
            lease = read_lease(self.fs, self.root)
            if lease is not None and lease.get("run_id") == self.run_id:
                remove(self.fs, self.path)
            if self._created and not self.fs.ls(self.root, detail=False):
                # a run that failed before writing leaves no output folder (WebHDFS: fsspec's rmdir does nothing)
                self.fs.rm(self.root) if is_webhdfs(self.fs) else self.fs.rmdir(self.root)
        except Exception as err:  # noqa: BLE001 - the run's own error (if any) matters more
            log.warning("could not release the lease of %s: %s", self.url, err)
