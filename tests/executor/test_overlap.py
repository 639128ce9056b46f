"""overlap.py: read-ahead and write-behind threads keep order, bound memory, raise errors where the task
runs, and never outlive the task that started them."""

import threading
import time

import pytest

from clip_nsfw_spark.executor.overlap import WriteBehind, read_ahead


def _threads(prefix: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(prefix)]


def test_read_ahead_yields_every_item_in_order_and_its_thread_ends():
    assert list(read_ahead(lambda: iter(range(100)), name="t-order")) == list(range(100))
    assert _threads("t-order") == []


def test_read_ahead_makes_at_most_depth_items_ahead():
    made = []

    def produce():
        for i in range(20):
            made.append(i)
            yield i

    items = read_ahead(produce, depth=2, name="t-bound")
    assert next(items) == 0
    time.sleep(0.3)  # the thread runs ahead as far as it may
    # item 0 taken, 2 waiting in the queue, 1 made and waiting to be put: never the 20
    assert len(made) <= 1 + 2 + 1
    assert list(items) == list(range(1, 20))


def test_an_error_in_the_producer_is_raised_where_its_item_would_have_come():
    def produce():
        yield 1
        yield 2
        raise ValueError("damaged at item 3")

    got = []
    with pytest.raises(ValueError, match="damaged at item 3"):
        for item in read_ahead(produce, name="t-error"):
            got.append(item)
    assert got == [1, 2] and _threads("t-error") == []


def test_closing_early_stops_the_producer_and_closes_its_generator():
    closed = threading.Event()

    def produce():
        try:
            for i in range(10**9):
                yield i
        finally:
            closed.set()  # e.g. a file handle released in the producer's own thread

    items = read_ahead(produce, name="t-close")
    assert next(items) == 0
    items.close()  # what an error in the consumer (or an interrupt) does to the generator
    assert closed.is_set() and _threads("t-close") == []


def test_write_behind_consumes_in_order_and_finish_waits_for_all():
    consumed = []
    with WriteBehind(lambda item: (time.sleep(0.001), consumed.append(item)), depth=1, name="t-write") as writer:
        for i in range(50):
            writer.submit(i)
        writer.finish()
    assert consumed == list(range(50)) and _threads("t-write") == []


def test_an_error_in_the_consumer_is_raised_by_the_next_submit_or_finish():
    def consume(item):
        if item == 3:
            raise OSError("injected: no space left on device")

    writer = WriteBehind(consume, name="t-write-error")
    with pytest.raises(OSError, match="no space left"):
        for i in range(1000):
            writer.submit(i)
        writer.finish()
    assert _threads("t-write-error") == []


def test_leaving_by_an_error_cancels_what_waits_and_waits_for_the_thread():
    consumed, started = [], threading.Event()

    def consume(item):
        started.set()
        time.sleep(0.5)  # still consuming item 0 when the task stops
        consumed.append(item)

    with pytest.raises(KeyboardInterrupt):
        with WriteBehind(consume, depth=1, name="t-cancel") as writer:
            writer.submit(0)
            started.wait(5)
            writer.submit(1)  # waiting in the queue
            raise KeyboardInterrupt
    # the item being consumed was finished, the waiting one dropped, and the thread has ended: nothing it was
    # given is written after the task stopped
    assert consumed == [0] and _threads("t-cancel") == []
    time.sleep(0.6)
    assert consumed == [0]


def test_a_block_left_without_finish_consumes_everything_and_leaves_no_thread():
    consumed = []
    with WriteBehind(lambda item: (time.sleep(0.01), consumed.append(item)), name="t-unfinished") as writer:
        for i in range(5):
            writer.submit(i)
    assert consumed == list(range(5)) and _threads("t-unfinished") == []


def test_an_error_in_the_consumer_of_read_ahead_stops_the_producer():
    made = []

    def produce():
        for i in range(10**6):
            made.append(i)
            yield i

    with pytest.raises(ZeroDivisionError):
        for item in read_ahead(produce, name="t-consumer-error"):
            if item == 5:
                1 / 0  # noqa: B018 - an error while the current batch is scored
    assert _threads("t-consumer-error") == [] and len(made) < 10**6
