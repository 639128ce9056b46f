"""Read-ahead and write-behind threads: a task's next batch is read and decoded, and its last one encoded
and written, while the current batch is scored.

Why threads help: the scoring kernels (numba, ``nogil``), pyarrow's reads, decompression and parquet
encoding, and numpy's copies release the GIL, so the three stages of a task run on several cores at once
where cores are free (the last tasks of a stage, an executor with more cores than tasks), and a stage
that waits for storage (an object store's latency, a disk's writeback) no longer stops the others.

Memory stays bounded: each queue holds at most ``depth`` batches, so a task holds at most
``2 × depth + 3`` batches at once (one in each stage, the queued ones). A batch may be a slice of its row
group's whole decoded column (executor/reader.py decodes chunks up to 256 MiB whole), which any of its
batches in flight keeps alive: with row groups of few batches, the batches in flight can hold several row
groups' columns instead of one. Order is kept (one thread per
stage). An error in any stage stops the others and is raised in the task's own thread, after that stage's
thread has ended; so does closing the task early (an interrupt). A second interrupt while a thread
finishes its item can leave that thread running for the rest of its item.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

_DONE = object()
_POLL_SECONDS = 0.1  # how often a blocked thread looks whether it was told to stop


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


def read_ahead(produce: Callable[[], Iterator], depth: int = 1, name: str = "clip-nsfw-read") -> Iterator:
    """The items of ``produce()``, made in a thread of their own up to ``depth`` items ahead.

    ``produce`` is called in that thread (it is a function, so that its generator is created and closed
    there). An error raised there is raised here, where its item would have come. Closing this generator
    (or an error in its consumer) stops the thread and waits for it: it ends after the item it is making.
    """
    items: queue.Queue = queue.Queue(maxsize=max(depth, 1))
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            source = produce()
            try:
                for item in source:
                    if not put(item):
                        return
            finally:
                close = getattr(source, "close", None)
                if close is not None:
                    close()
        except BaseException as err:  # noqa: BLE001 - handed to the consumer's thread
            put(_Failed(err))
            return
        put(_DONE)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()


class WriteBehind:
    """``consume(item)`` for each ``submit``ted item, in order, in a thread of its own.

    ``submit`` blocks while ``depth`` items wait; it raises the error of an earlier item, if one failed.
    ``finish()`` waits for every item and raises the first error; ``cancel()`` drops what waits and waits
    for the item being consumed. Use as a context manager: leaving it by an error cancels.
    """

    def __init__(self, consume: Callable, depth: int = 1, name: str = "clip-nsfw-write"):
        self._consume = consume
        self._items: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                item = self._items.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            if item is _DONE or self._stop.is_set():
                return
            try:
                self._consume(item)
            except BaseException as err:  # noqa: BLE001 - raised in the submitter's thread
                self._error = err
                self._stop.set()
                return

    def _raise(self) -> None:
        if self._error is not None:
            self._thread.join()  # it has ended (it set the error last): nothing of it outlives the error
            raise self._error

    def submit(self, item) -> None:
        while True:
            self._raise()
            if self._stop.is_set():
                self._raise()  # the error is set before the stop: a stop seen now with an error is that error
                raise RuntimeError("submit after the write-behind thread was cancelled")
            try:
                self._items.put(item, timeout=_POLL_SECONDS)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        """Wait until every submitted item is consumed; raise the first error."""
        while self._thread.is_alive():
            try:
                self._items.put(_DONE, timeout=_POLL_SECONDS)
                break
            except queue.Full:
                continue
        self._thread.join()
        self._raise()

    def cancel(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> "WriteBehind":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is not None:
            self.cancel()
        elif self._thread.is_alive():  # left without finish(): every item is still consumed, errors raised
            self.finish()
