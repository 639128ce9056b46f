"""One task, start to finish, on whatever process runs it: read a slice, score it, write it atomically.

No Spark here: a ``Worker`` is a picklable callable ``Task → stats``; Spark's runner (spark/runner.py) calls it
in its Python workers, the sequential runner (job.py) in the driver, which is how the tests prove both
give the same output. Heads arrive as portable-weights bytes and are loaded once per process
(``scorer_for``), then reused by every task the process runs.

A task's files are written under temporary names and moved to their final names only when complete
(writer.py); the task's state file (``<output>/_clip_nsfw_tasks/<task_id>.json``) is written last. A task
with a state file is complete; a retried or resumed task rewrites its outputs whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import resource
import time
from collections import Counter
from typing import Callable

import numpy as np
import pyarrow as pa

from clip_nsfw_spark.scoring.batch import score_batch
from clip_nsfw_spark.scoring.outcomes import rows_unaccounted
from clip_nsfw_spark.scoring.scorer import scorer_for
from clip_nsfw_spark.contract import Head, Task, TaskConfig
from clip_nsfw_spark.errors import ClipNsfwError, InputError, OutputError, TaskError
from clip_nsfw_spark.storage.lease import FENCE_REUSE_SECONDS, check_owner
from clip_nsfw_spark.executor.overlap import WriteBehind, read_ahead
from clip_nsfw_spark.executor.reader import open_parquet, task_batches, with_footer_rows
from clip_nsfw_spark.executor.stages import StageClock
from clip_nsfw_spark.storage.filesystem import (canonical_file_name, filesystem, join, renames_atomically, unstrip,
                                                write_whole)
from clip_nsfw_spark.executor.writer import (MANIFEST_DIR, ROW_ID_COLUMNS, TASKS_DIR, OutputFiles, batch_state_name,
                                             npy_values, output_schemas, route)

log = logging.getLogger(__name__)
@dataclasses.dataclass(frozen=True)
class Worker:
    """``worker(task) → stats``: runs ``process_task`` with the run's config and heads.

    ``make_scorer`` (Head → scorer) and ``open_filesystem`` (url, storage_options → (fs, root))
    are the seams a test or a benchmark replaces, e.g. by a constant scorer or a filesystem that fails
    on purpose; the job always uses the defaults. Picklable: it crosses to Spark executors.
    """

    config: TaskConfig
    heads: tuple[Head, ...]
    make_scorer: Callable = scorer_for
    open_filesystem: Callable = filesystem

    def __call__(self, task: Task) -> dict:
        return process_task(task, self)

    def record_together(self, results: list[dict]) -> None:
        """Write the states of several completed tasks (``results``: what ``__call__`` returned) into one
        batch state (``TASKS_DIR/_batch-<id>.json``): a resume reads it instead of a state file per task.

        Only a copy: each task's own state file still says it is complete (a batch entry counts only while
        that file exists with the size it had), so a failure here is logged, never fatal; a run that lost
        its lease writes nothing."""
        if len(results) < 2:
            return
        out_fs, out_root = self.open_filesystem(self.config.output, self.config.storage_options)
        try:
            check_owner(out_fs, out_root, self.config.run_id)
            name = batch_state_name(result["task_id"] for result in results)
            write_whole(out_fs, join(out_root, TASKS_DIR, name), json.dumps({"states": results}))
        except Exception as err:  # noqa: BLE001 - a resume then reads the tasks' own state files
            log.warning("the batch state of %d tasks was not written (%s); a resume reads their own state files",
                        len(results), err)


def process_task(task: Task, worker: Worker) -> dict:
    """Score one task and write its outputs; return its statistics (also stored in its state file).

    Stage seconds, wall and CPU (executor/stages.py): model, open, read, decode, score, encode, write, commit.
    Errors leave as one line naming the task's file: this package's
    own errors as they are (input problems: retrying cannot help), anything else as ``TaskError`` (it may
    be transient: the Spark runner retries it).
    """
    try:
        return _process_task(task, worker)
    except ClipNsfwError:
        raise
    except Exception as err:
        in_fs, _ = worker.open_filesystem(worker.config.input, worker.config.storage_options)
        where = unstrip(in_fs, task.path) + (f" and {unstrip(in_fs, task.npy_path)}" if task.npy_path else "")
        cause = f"{type(err).__name__}: {' '.join(str(err).split())}"  # one line: pyarrow's span several
        if isinstance(err, (ValueError, TypeError, KeyError, IndexError)) and "pyarrow" in type(err).__module__:
            raise InputError(f"cannot read {where}: {cause}") from err
        raise TaskError(f"task {task.rel} ({where}) failed: {cause}") from err


def _read_columns(task: Task, config: TaskConfig, names: list[str]) -> list[str] | None:
    """The parquet columns to read: what the outputs keep, plus the embeddings to score (None: all)."""
    kept = config.write_columns
    if kept is None:
        return None
    needed = set(kept) | (set(config.embedding_columns) if task.kind == "parquet" else set())
    return [c for c in names if c in needed]


def _process_task(task: Task, worker: Worker) -> dict:
    started = time.perf_counter()
    config = worker.config
    # One clock per thread (stages.py): this one's (open, score, commit), the read-ahead thread's (read,
    # decode) and the write-behind thread's (encode, write).
    clock, reading, writing = StageClock(), StageClock(), StageClock()
    with clock("model"):  # a scorer is built once per process (scorer_for): later tasks find it built
        scorers = [worker.make_scorer(head) for head in worker.heads]
    with contextlib.ExitStack() as opened:
        with clock("open"):
            in_fs, _ = worker.open_filesystem(config.input, config.storage_options)
            out_fs, out_root = worker.open_filesystem(config.output, config.storage_options)
            stats = TaskStats(config)
            # one open and one footer read, for the schema and the rows (the footer's bytes count as opening)
            source = opened.enter_context(open_parquet(task, in_fs, StageClock()))
            task = with_footer_rows(task, source, config.input_schema, config.input_schema_of)
            files = OutputFiles(out_fs, out_root, task.rel, config,
                                output_schemas(source.schema, config, scorers[0].dim), writing)
        # the outputs' first bytes, written as they were opened, are writing's (timed on it), not opening's
        clock.add("open", -writing.wall["write"], -writing.cpu["write"])
        try:
            _score_and_write(task, worker, source, in_fs, files, stats, scorers, clock, reading, writing)
            with clock("commit"):
                written_before = writing.wall["write"], writing.cpu["write"]
                check_owner(out_fs, out_root, config.run_id)  # a run that lost its lease must not commit
                checked = [time.time()]

                def fence(moved: int) -> None:  # before each file: a commit can be long (uploads), or be paused
                    if time.time() - checked[0] > FENCE_REUSE_SECONDS:
                        check_owner(out_fs, out_root, config.run_id,
                                    not_moved=f"{moved} of this task's files were moved into place before this "
                                              "check and are left as they are (the names may hold another run's "
                                              "files by now); the others were not.")
                        checked[0] = time.time()

                # The manifest first: a file under a final name is then always one this tool can tell is its
                # own (--overwrite and --resume remove what manifests name, nothing guessed from file names).
                if renames_atomically(out_fs):  # object stores have no folders to make (and it costs requests)
                    out_fs.makedirs(join(out_root, MANIFEST_DIR), exist_ok=True)
                write_whole(out_fs, join(out_root, MANIFEST_DIR, task.task_id + ".json"),
                            json.dumps({"task_id": task.task_id, "rel": task.rel, "run_id": config.run_id,
                                        "files": files.written}))
                files.commit(fence)
            # the files' last bytes (their footers), written while committing, count as writing, not committing
            clock.add("commit", -(writing.wall["write"] - written_before[0]),
                      -(writing.cpu["write"] - written_before[1]))
        except BaseException:
            files.abort()
            raise
    result = {"task_id": task.task_id, "rel": task.rel, "source": task.source, "rows_planned": task.rows,
              "outputs": files.written, "output_bytes": files.sizes, "rows_read": stats.rows_read,
              "rows_written": {str(stream): rows for stream, rows in files.rows.items()}} | stats.summary()
    problem = rows_unaccounted(task.rows, result, config.mode, config.keep)
    if problem:  # never recorded complete: a --resume removes what its manifest names and runs it again
        raise OutputError(f"task {task.rel} ({unstrip(in_fs, task.path)}) {problem}; the task is not recorded "
                          "complete. Check that the input did not change during the run, then rerun with --resume.")
    clock.merge(reading).merge(writing)
    with clock("commit"):
        if renames_atomically(out_fs):
            out_fs.makedirs(join(out_root, TASKS_DIR), exist_ok=True)
        fence(len(files.written))  # a long commit (a big upload): fenced again before the state
    # The stats hold every stage but the state's own write (one small file), which the state cannot count.
    result |= _figures(started, clock)
    # The last write, whole or not at all: its presence means "this task is complete".
    state = json.dumps(result).encode()
    write_whole(out_fs, join(out_root, TASKS_DIR, task.task_id + ".json"), state)
    return result | {"state_bytes": len(state)}  # a batch state's copy is used only while sizes match


def _figures(started: float, clock: StageClock) -> dict:
    wall, cpu = clock.figures()
    return {"seconds": time.perf_counter() - started, "stage_seconds": wall, "stage_cpu_seconds": cpu,
            "worker_max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def _score_and_write(task: Task, worker: Worker, source, in_fs, files: OutputFiles, stats: "TaskStats", scorers,
                     clock: StageClock, reading: StageClock, writing: StageClock) -> None:
    """Every batch of the task read and decoded, scored, routed and encoded into ``files``: with
    ``config.overlap`` the reading a thread ahead and the writing a thread behind (overlap.py), else in
    turn in this thread. Each thread times its stages on its own clock."""
    config = worker.config
    columns = _read_columns(task, config, source.schema.names)
    source.handle.clock = reading  # the storage reads of the batches are the read-ahead thread's
    # what was read and written before the batches (the outputs' first bytes, written when they were opened)
    before = {(id(c), stage): (c.wall[stage], c.cpu[stage]) for c, stage in ((reading, "read"), (writing, "write"))}

    def batches():
        rows = task_batches(task, in_fs, config.batch_rows, reading, columns, source,
                            own_decoder=config.parquet_codec == "own")
        source_file = unstrip(in_fs, canonical_file_name(in_fs, task.path))  # one spelling, whatever was typed
        while True:
            with reading("decode"):
                item = next(rows, None)
                if item is None:
                    return
                batch, npy, first_row = item
                table = _with_added_columns(pa.Table.from_batches([batch]), npy, first_row, source_file, config)
            yield table, npy

    def write(scored) -> None:
        with writing("encode"):
            route(scored.table, scored.ok, scored.unsafe, scored.reasons, config, files)

    if not config.overlap:  # one thread: every stage of the task in turn (job.overlap_wanted)
        for table, npy in batches():
            with clock("score"):
                scored = score_batch(table, npy, config.targets, scorers, Counter())
                stats.add(scored)
            write(scored)
    else:
        with WriteBehind(write, name=f"clip-nsfw-write-{task.task_id}") as writer, \
                contextlib.closing(read_ahead(batches, name=f"clip-nsfw-read-{task.task_id}")) as read:
            for table, npy in read:
                with clock("score"):
                    scored = score_batch(table, npy, config.targets, scorers, Counter())
                    stats.add(scored)
                writer.submit(scored)
            writer.finish()
    # storage reads and writes were timed inside decoding and encoding (the same thread's: pyarrow reads in
    # the calling thread), so count them once, as read and write
    for clock_, outer, inner in ((reading, "decode", "read"), (writing, "encode", "write")):
        wall, cpu = before[id(clock_), inner]
        clock_.wall[outer] = max(0.0, clock_.wall[outer] - (clock_.wall[inner] - wall))
        clock_.cpu[outer] = max(0.0, clock_.cpu[outer] - (clock_.cpu[inner] - cpu))


def _with_added_columns(table: pa.Table, npy: np.ndarray | None, first_row: int, source_file: str,
                        config: TaskConfig) -> pa.Table:
    """The batch plus the columns the task adds before scoring: row ids (a sidecar without id columns:
    the join key) and, in the LAION layout with ``write_embeddings``, the npy rows in the planned type
    (``writer.npy_values``: the npy files' own, float16 widened under ``embedding_type: float32``; exact)."""
    if config.row_ids:
        table = table.append_column(ROW_ID_COLUMNS[0], pa.array([source_file] * table.num_rows, pa.string()))
        table = table.append_column(ROW_ID_COLUMNS[1], pa.array(np.arange(first_row, first_row + table.num_rows)))
    if npy is not None and config.write_embeddings:
        table = table.append_column("embedding", pa.FixedSizeListArray.from_arrays(
            pa.array(npy.astype(npy_values(config)).reshape(-1)), npy.shape[1]))
    return table


class TaskStats:
    """A task's counts, summed over its batches: rows read, unsafe and rejected (by reason), and per score
    column the unsafe count, a histogram of valid scores over [0, 1] and how many fell below 0 / above 1
    (raw-output heads are not bounded)."""

    def __init__(self, config: TaskConfig):
        self.columns = config.score_columns
        self.bins = np.linspace(0.0, 1.0, config.histogram_bins + 1)
        self.histograms = {name: np.zeros(config.histogram_bins, dtype=np.int64) for name in self.columns}
        self.outside = {name: [0, 0] for name in self.columns}
        self.flagged: Counter = Counter()
        self.rejected: Counter = Counter()
        self.rows_read = self.unsafe = 0

    def add(self, scored) -> None:
        self.rows_read += scored.table.num_rows
        for name, values in scored.scores.items():
            self.histograms[name] += np.histogram(values, bins=self.bins)[0]
            self.outside[name][0] += int((values < 0).sum())
            self.outside[name][1] += int((values > 1).sum())
        self.flagged.update(scored.flagged)
        self.rejected.update(str(reason) for reason in scored.problems)  # a row counts once: its first problem
        self.unsafe += int(scored.unsafe.sum())

    def summary(self) -> dict:
        return {"rows_unsafe": self.unsafe, "rows_rejected": sum(self.rejected.values()),
                "rejected_by_reason": dict(self.rejected),
                "histograms": {name: h.tolist() for name, h in self.histograms.items()},
                "outside_0_1": self.outside,
                "unsafe_by_column": {name: self.flagged.get(name, 0) for name in self.columns}}
