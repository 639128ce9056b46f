"""PySpark's Python worker daemon, with this package and its numba kernels loaded before it forks workers.

Spark starts one daemon per executor (``python -m <spark.python.daemon.module>``) and forks a Python worker
from it for each task slot. A plain daemon's worker then imports this package, loads the scorer's numba
kernels from the on-disk cache and, at their first use, the parquet decoder's: ~1.3 CPU seconds per worker
(imports 0.5, kernels 0.8; AMD EPYC), paid by every core of every executor. This daemon pays it
once before forking (``preload``); each worker starts with the pages in place, shared copy-on-write.
CPU and memory saved, not necessarily time: the preload runs on one core before the first fork while the
others wait, so where every core runs one reused worker the first tasks start later (measured on local[2]:
docs/performance.md); where workers start again and again (PySpark stops idle workers between the jobs of a
long session; ``spark.python.worker.reuse=false``) each start is nearly free. Opt-in, therefore.

Turned on by ``CLIP_NSFW_PRELOAD=1`` for sessions this package starts itself (not under spark-submit) on a
local master, where the workers' interpreter imports this same package from the same folder
(``spark/runner.spark_session``); on a cluster whose executors have the package installed (the Docker image;
not ``--py-files`` alone: the daemon starts before any file is shipped), by
``--conf spark.python.daemon.module=clip_nsfw_spark.spark.daemon``.

Fork safety: PySpark's daemon forks from a single thread, and so must this one. The preload starts no thread
(pyarrow writes and decodes in memory here, it never reads a file: its readers start IO threads). Before and
after preloading the daemon counts its threads (but jemalloc's, ``FORK_SAFE_THREADS``); if there is more than
one, or the preload fails, it replaces itself with PySpark's plain daemon (``exec``, nothing written to
Spark yet; one line on stderr, the executor's log), so an unsafe preload never reaches a worker. Not
covered: a failure while Python imports this package for ``-m`` (before any of this runs); the session
checks that the workers' interpreter finds this very package first.

The daemon's CPU seconds before its first fork (its start, imports and preload) are counted once, by the
first worker that asks (stages.process_seconds_once), and only where the preload ended during the run's
task phase: they wait in a pipe every forked worker inherits, and only one read can take them.
"""

from __future__ import annotations

import contextlib
import os
import struct
import sys
import time

# The Keras heads' depths (LAION's ViT-L/14: 4 dense layers, ViT-B/32: 3): the scoring kernel is compiled
# per number of layers and input dtype. Another depth loads its kernel in the worker, as without preloading.
PRELOADED_DEPTHS = (3, 4)


def main() -> None:
    """Preload, then run PySpark's daemon (or exec a plain one where preloading was unsafe or failed)."""
    if _threads() != 1:  # threads already (OpenBLAS's, where OPENBLAS_NUM_THREADS/OMP_NUM_THREADS allow
        # more than one), or none countable (no /proc): nothing may be preloaded safely
        _exec_plain_daemon(f"{_threads() or 'uncounted'} threads at the start (a thread's lock could be copied "
                           "held into a worker); set OPENBLAS_NUM_THREADS=1 for the preload")
    try:
        with _stdout_to_stderr():  # the daemon's stdout is Spark's channel: nothing but its port may go there
            preload()
    except Exception as err:  # noqa: BLE001 - any failure: the plain daemon still serves the job
        _exec_plain_daemon(f"the preload failed ({type(err).__name__}: {err})")
    if _threads() != 1:
        _exec_plain_daemon(f"{_threads()} threads after the preload (a thread's lock could be copied held "
                           "into a worker)")
    from pyspark import daemon

    from clip_nsfw_spark.executor import stages

    # all of this process's CPU so far, its start and the -m imports included: what each worker would pay
    stages.offer_preload_seconds(_seconds_pipe(time.process_time(), time.time()), os.getpid())
    prepare_forks()
    daemon.manager()


def prepare_forks() -> None:
    """What the forked workers must not inherit as it is: numpy's global random state (not reseeded at a
    fork, unlike Python's: every worker would draw the same numbers from ``np.random``, e.g. in a user's UDF
    in the same session, which PySpark's own daemon, importing numpy only after its forks, never did); and
    the preloaded objects in the collector's sight (a worker's gc.collect(), PySpark's after each task,
    would write into every one of them and so copy the pages it shares with the daemon: Python's gc docs)."""
    import gc

    import numpy as np

    os.register_at_fork(after_in_child=np.random.seed)
    gc.collect()
    gc.freeze()


def preload() -> None:
    """Import what a Python worker runs and load the kernels it calls: the scorer's (``PRELOADED_DEPTHS``,
    float16 and float32 inputs), the rows' check, and the parquet decoder's (a few rows of float16 and
    float32 embeddings, written in memory by pyarrow, decoded by this package's decoder). No file, no thread:
    pyarrow's record-batch readers start IO threads, so pyarrow only writes here and reads the footer."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    import pyspark.worker  # noqa: F401 - what PySpark's daemon imports in each worker after the fork
    import clip_nsfw_spark.executor.worker  # noqa: F401 - numpy, pyarrow, numba, this package
    import clip_nsfw_spark.spark.runner  # noqa: F401 - what a Spark task's function imports
    try:  # what an S3 job's workers import (storage/s3_listing.py), shared here rather than once per worker
        import botocore.handlers  # noqa: F401
        import botocore.parsers  # noqa: F401
        import botocore.utils  # noqa: F401
        import fsspec.asyn  # noqa: F401
    except ImportError:  # the core install has no s3fs
        pass
    from clip_nsfw_spark.parquet.stream import iter_float_list_column
    from clip_nsfw_spark.scoring.scorer import NumpyScorer, warm

    for depth in PRELOADED_DEPTHS:
        warm(NumpyScorer(_synthetic_weights(depth)))
    for dtype, arrow_type in ((np.float16, pa.float16()), (np.float32, pa.float32())):
        values = pa.array(np.linspace(-1, 1, 8 * 8).astype(dtype), arrow_type)
        column = pa.ListArray.from_arrays(pa.array(np.arange(0, 8 * 8 + 1, 8, dtype=np.int32)), values)
        file = io.BytesIO()
        pq.write_table(pa.table({"embedding": column}), file)  # dictionary-encoded pages, as pyarrow writes
        data = file.getvalue()
        # (None where this pyarrow wrote pages the decoder leaves to pyarrow: then nothing to load)
        for _ in iter_float_list_column(io.BytesIO(data), pq.read_metadata(io.BytesIO(data)), 0, "embedding", 4) \
                or ():
            pass


def _synthetic_weights(depth: int, dim: int = 8):
    """A head of ``depth`` dense layers (relu, then a sigmoid output) on ``dim``-d inputs: only its depth
    matters (numba compiles the scoring kernel per number of layers and input dtype, not per width)."""
    import numpy as np

    from clip_nsfw_spark.scoring.weights import PortableWeights

    widths = [dim] + [4] * (depth - 1) + [1]
    kernels = [np.full((a, b), 0.01, np.float32) for a, b in zip(widths, widths[1:])]
    return PortableWeights.build(name=f"preload-{depth}", dim=dim, mean=np.zeros(dim), variance=np.ones(dim),
                                 epsilon=1e-3, vocabularies={}, kernels=kernels,
                                 biases=[np.zeros(w) for w in widths[1:]],
                                 activations=["relu"] * (depth - 1) + ["sigmoid"])


def _seconds_pipe(seconds: float, ended: float) -> int:
    """The read end of a pipe holding ``seconds`` and when the preload ``ended`` (epoch seconds; 16 bytes),
    its write end closed: one read takes them, later reads find the pipe empty (reads of ≤ PIPE_BUF bytes
    are atomic)."""
    read_end, write_end = os.pipe()
    os.write(write_end, struct.pack("<dd", seconds, ended))
    os.close(write_end)
    os.set_blocking(read_end, False)
    return read_end


# Threads that may exist when the daemon forks: jemalloc's background thread (pyarrow's allocator); jemalloc's
# own fork handlers take its locks around a fork (the child starts without the background thread).
FORK_SAFE_THREADS = ("jemalloc_bg_thd",)


def _threads() -> int:
    """This process's threads but ``FORK_SAFE_THREADS`` (Linux: /proc), or 0 where they cannot be counted
    (then nothing is preloaded)."""
    try:
        names = []
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/comm") as comm:
                names.append(comm.read().strip())
    except OSError:
        return 0
    return sum(name not in FORK_SAFE_THREADS for name in names)


def _exec_plain_daemon(why: str):
    """Become PySpark's own daemon (same interpreter, arguments and environment), saying ``why`` on stderr
    (the executor's log)."""
    print(f"clip-nsfw-spark: PySpark's plain worker daemon runs instead of the preloading one: {why}",
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", "pyspark.daemon", *sys.argv[1:]])


@contextlib.contextmanager
def _stdout_to_stderr():
    """File descriptor 1 pointed at stderr for the block (Python's and any library's writes), then restored."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


if __name__ == "__main__":
    main()
