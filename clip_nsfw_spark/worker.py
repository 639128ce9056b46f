"""One task, start to finish, on whatever process runs it: read a slice, score it, write it atomically.

No Spark here: the same function runs in a Spark Python worker and in the local sequential runner,
which is how the tests prove both give the same output. The model arrives as portable-weights bytes and
is loaded once per process (``scorer_for``), then reused by every task the process runs.

Output files are written under a temporary name in ``<output>/_clip_nsfw_tmp/`` and moved to their final
name only when complete; the task's state file (``<output>/_clip_nsfw_tasks/<task_id>.json``) is written
last. A task with a state file is complete; a retried or resumed task rewrites its outputs whole.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import signal
import time
import uuid
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .embeddings import REASON_SCORE, decode, row_problems
from .errors import ClipNsfwError, InputError, TaskError
from .lease import check_owner
from .reader import Task, read_npy_rows
from .storage import filesystem, join, unstrip

FAULT_ENV = "CLIP_NSFW_FAULT"
TMP_DIR = "_clip_nsfw_tmp"
TASKS_DIR = "_clip_nsfw_tasks"
REJECTED_DIR = "_rejected"
_SCORERS: dict[str, object] = {}


class ConstantScorer:
    """Scores every row 0: the benchmark's IO floor (the job with the model taken out)."""

    def __init__(self, dim: int):
        self.dim = dim

    def __call__(self, embeddings) -> np.ndarray:
        return np.zeros(len(embeddings), dtype=np.float32)


def scorer_for(model_bytes: bytes, sha256: str, name: str, io_only: bool = False):
    """The scorer for a head's portable bytes, built once per process (the cache holds while workers are
    reused): an MLP head (NumpyScorer) or a prompt head (PromptScorer), numpy only."""
    from .scorer import scorer_from_portable  # executors: numpy heads only, never torch or TensorFlow

    if io_only:
        return ConstantScorer(scorer_from_portable(model_bytes).dim)
    scorer = _SCORERS.get(sha256)
    if scorer is None:
        scorer = scorer_from_portable(model_bytes, name=name, sha256=sha256)
        _SCORERS[sha256] = scorer
    return scorer


def inject_fault(spec: str | None, point: str, task: Task, count: int) -> None:
    """Test-only fault injection, driven by ``CLIP_NSFW_FAULT`` on the driver (it reaches executors in the
    task config). Format: ``point=batch|commit,match=<substring of the task's output name>,after=<n>,
    action=kill|raise|sleep[,seconds=<s>][,once=<flag file>]``. ``kill`` SIGKILLs the Python worker (as a
    preempted executor would die); ``once`` makes the fault fire a single time, so Spark's retry succeeds.
    """
    if not spec:
        return
    fault = dict(item.split("=", 1) for item in spec.split(",") if "=" in item)
    if fault.get("point") != point or fault.get("match", "") not in task.rel or count < int(fault.get("after", 0)):
        return
    once = fault.get("once")
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return
    action = fault.get("action", "raise")
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "sleep":
        time.sleep(float(fault.get("seconds", 1)))
    else:
        raise RuntimeError(f"injected fault at {point} of {task.rel}")


def output_paths(task: Task, mode: str) -> dict[str, str]:
    """Relative output file per stream for ``task`` (rejected rows only exist in filter/split)."""
    if mode == "annotate":
        return {"annotated": task.rel}
    if mode == "scores":
        return {"scores": task.rel}
    if mode == "filter":
        return {"kept": task.rel, "rejected": join(REJECTED_DIR, task.rel)}
    return {"safe": join("safe", task.rel), "unsafe": join("unsafe", task.rel),
            "rejected": join(REJECTED_DIR, task.rel)}


def _is_float_list(field: pa.Field) -> bool:
    return (pa.types.is_list(field.type) or pa.types.is_large_list(field.type)
            or pa.types.is_fixed_size_list(field.type)) and pa.types.is_floating(field.type.value_type)


def scalar_columns(schema: pa.Schema) -> list[str]:
    """All columns but float lists (embeddings): the ones worth dictionary encoding and min/max statistics.
    For embeddings a dictionary of up to 65,536 float16 values makes writing and every later read several
    times slower, and statistics nobody filters on cost a pass over every value when writing."""
    return [f.name for f in schema if not _is_float_list(f)]


class _AtomicParquet:
    """A parquet file that appears under its final name only when complete (temp file, then move).

    The temp name is ``_clip_nsfw_tmp/<32 hex>.parquet`` whatever ``rel`` is: a name built from a deep
    relative path would pass the filesystem's 255-byte limit on one name ("File name too long").
    """

    def __init__(self, fs, root: str, rel: str, schema: pa.Schema, compression: str):
        self.fs, self.final = fs, join(root, rel)
        self.tmp = join(root, TMP_DIR, uuid.uuid4().hex + ".parquet")
        fs.makedirs(join(root, TMP_DIR), exist_ok=True)
        self._handle = fs.open(self.tmp, "wb")
        self._writer = pq.ParquetWriter(self._handle, schema, compression=compression,
                                        use_dictionary=scalar_columns(schema),
                                        write_statistics=scalar_columns(schema))
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self._writer.write_table(table)
            self.rows += table.num_rows

    def commit(self) -> None:
        self._writer.close()
        self._handle.close()
        parent = self.final.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        self.fs.mv(self.tmp, self.final)

    def abort(self) -> None:
        try:
            self._writer.close()
            self._handle.close()
        finally:
            if self.fs.exists(self.tmp):
                self.fs.rm(self.tmp)


def _task_batches(task: Task, fs, batch_rows: int, timings: Counter, columns: list[str] | None = None):
    """Yield ``(batch, npy_rows_or_None, first_row)`` for the task's rows, at most ``batch_rows`` at a time.

    ``columns`` are the parquet columns to read (None: all): an output that does not keep the embeddings
    reads them only for scoring, and a sidecar reads only its ids. ``first_row`` is the index, in its file,
    of the batch's first row.
    """
    with fs.open(task.path, "rb") as handle:
        # Buffered reads, no pre-buffering: memory stays at about one row group whatever the file size.
        parquet = pq.ParquetFile(handle, pre_buffer=False, buffer_size=1 << 20)
        meta = parquet.metadata
        offsets = np.cumsum([0] + [meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
        if columns is not None and not columns:  # nothing to keep (npy sidecar with row ids): count rows
            columns = parquet.schema_arrow.names[:1]
        if task.kind == "parquet":
            for group in task.row_groups:
                position = int(offsets[group])
                for batch in _timed(_row_group_batches(parquet, [group], batch_rows, columns), timings, "read"):
                    yield batch, None, position
                    position += batch.num_rows
            return
        # laion-npy: rows [row_start, row_stop) of the metadata file and of the npy file, read together.
        groups = [i for i in range(meta.num_row_groups)
                  if offsets[i] < task.row_stop and offsets[i + 1] > task.row_start]
        position = int(offsets[groups[0]]) if groups else 0
        for batch in _timed(_row_group_batches(parquet, groups, batch_rows, columns), timings, "read"):
            first, position = position, position + batch.num_rows
            lo, hi = max(task.row_start, first), min(task.row_stop, position)
            if hi > lo:
                t0 = time.perf_counter()
                rows = read_npy_rows(fs, task.npy_path, lo, hi)
                timings["read"] += time.perf_counter() - t0
                yield batch.slice(lo - first, hi - lo), rows, lo


def _row_group_batches(parquet: pq.ParquetFile, groups, batch_rows: int, columns: list[str] | None = None):
    """Batches of the given row groups, one reader per row group.

    One ``iter_batches`` call over many row groups kept every buffer it had read until it finished
    (measured: 1.6 GB of RSS after 800k rows of a 2M-row file); one reader per group peaks at ~0.5 GB.
    """
    for group in groups:
        yield from parquet.iter_batches(batch_size=batch_rows, row_groups=[group], columns=columns)


def _timed(iterator, timings: Counter, key: str):
    while True:
        t0 = time.perf_counter()
        try:
            item = next(iterator)
        except StopIteration:
            return
        finally:
            timings[key] += time.perf_counter() - t0
        yield item


def _with_column(schema: pa.Schema, field: pa.Field) -> pa.Schema:
    """``schema`` plus ``field``; a column of the same name is replaced in place (``replace_scores``:
    the planner refuses such a clash otherwise)."""
    index = schema.get_field_index(field.name)
    return schema.append(field) if index < 0 else schema.set(index, field)


def output_schemas(input_schema: pa.Schema, config: dict, dim: int) -> dict[str, pa.Schema]:
    """The schema of each output stream: the input's fields and metadata, plus scores (+ reason).

    The reason column is in annotate and rejected outputs; in the other streams only when the input
    already had one (a re-scored output: it is then rewritten, null for every scored row).
    """
    kept = config.get("write_columns")
    schema = input_schema if kept is None else pa.schema([input_schema.field(c) for c in kept],
                                                         metadata=input_schema.metadata)
    if config.get("row_ids"):
        schema = pa.schema([pa.field("source_file", pa.string()), pa.field("row_index", pa.int64())]
                           + list(schema), metadata=schema.metadata)
    if config["layout"] == "laion-npy" and config["write_embeddings"]:
        schema = _with_column(schema, pa.field("embedding", pa.list_(pa.float16(), dim)))
    for name in config["score_columns"]:
        schema = _with_column(schema, pa.field(name, pa.float32()))
    with_reason = _with_column(schema, pa.field(config["reason_column"], pa.string()))
    if config["reason_column"] in schema.names:
        schema = with_reason
    mode = config["mode"]
    if mode in ("annotate", "scores"):
        return {"annotated" if mode == "annotate" else "scores": with_reason}
    streams = {"kept": schema} if mode == "filter" else {"safe": schema, "unsafe": schema}
    return streams | {"rejected": with_reason}


def _set_column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    index = table.schema.get_field_index(name)
    return table.append_column(name, values) if index < 0 else table.set_column(index, name, values)


def _as_schema(table: pa.Table, schema: pa.Schema) -> pa.Table:
    return pa.Table.from_arrays([table.column(name) for name in schema.names], schema=schema)


@dataclasses.dataclass
class ScoredBatch:
    """One batch after scoring: the input columns plus one score column per (embedding column, head).

    ``ok`` (n,) marks rows that every head scored on every embedding column; ``unsafe`` (n,) rows with any
    score at or over its head's threshold; ``reasons`` (n,) None or why a row was not scored; ``problems``
    one short reason per unscored row (its first problem); ``scores`` the valid scores of each score
    column (for the histograms); ``flagged`` per score column, the rows at or over its threshold.
    """

    table: pa.Table
    ok: np.ndarray
    unsafe: np.ndarray
    reasons: list
    problems: list
    scores: dict
    flagged: dict


def score_batch(table: pa.Table, npy: np.ndarray | None, targets, scorers, timings: Counter) -> ScoredBatch:
    """Score a batch's embedding columns (or its npy rows) with every head. Pure: no IO.

    ``targets`` is ``[(embedding column, [(score column, head index, threshold), …]), …]`` and ``scorers``
    the heads' scorers (they share one width). Each embedding column is decoded once, whatever the number
    of heads. A row a head cannot score (a non-finite score) is rejected, never taken as safe.
    """
    n = table.num_rows
    reasons: list = [None] * n
    first_problem: dict[int, str] = {}
    unsafe = np.zeros(n, dtype=bool)
    ok_all = np.ones(n, dtype=bool)
    valid_scores, flagged = {}, {}
    several = len(targets) > 1
    for column, outputs in targets:
        if npy is not None:
            problems = row_problems(npy)
            ok = np.ones(n, dtype=bool)
            ok[list(problems)] = False
            matrix = npy if ok.all() else npy[ok]
            col_reasons = [problems.get(i) for i in range(n)]
        else:
            matrix, ok, col_reasons = decode(table.column(column), scorers[outputs[0][1]].dim)
        column_ok = ok.copy()
        for score_name, index, threshold in outputs:
            t0 = time.perf_counter()
            values = np.full(n, np.nan, dtype=np.float32)
            values[ok] = scorers[index](matrix)
            timings["score"] += time.perf_counter() - t0
            scored = ok & np.isfinite(values)
            for i in np.flatnonzero(ok & ~scored):
                col_reasons[i] = REASON_SCORE
            table = _set_column(table, score_name, pa.array(values, mask=~scored))
            over = scored & (values >= threshold)
            unsafe |= over
            column_ok &= scored
            valid_scores[score_name] = values[scored]
            flagged[score_name] = int(over.sum())
        ok_all &= column_ok
        for i in np.flatnonzero(~column_ok):
            label = f"{column}: {col_reasons[i]}" if several else col_reasons[i]
            reasons[i] = label if reasons[i] is None else f"{reasons[i]}; {label}"
            first_problem.setdefault(int(i), col_reasons[i].split(":")[0])
    # A row flagged by one head but rejected on another column or head is rejected, not unsafe.
    return ScoredBatch(table, ok_all, unsafe & ok_all, reasons, list(first_problem.values()), valid_scores, flagged)


def _write_batch(scored: ScoredBatch, config: dict, schemas: dict, writer) -> None:
    """Route a scored batch to its output streams (see ``output_paths``)."""
    with_reason = _set_column(scored.table, config["reason_column"], pa.array(scored.reasons, type=pa.string()))
    mode = config["mode"]
    if mode in ("annotate", "scores"):
        stream = "annotated" if mode == "annotate" else "scores"
        writer(stream).write(_as_schema(with_reason, schemas[stream]))
        return
    safe, unsafe = scored.ok & ~scored.unsafe, scored.ok & scored.unsafe
    if mode == "filter":
        keep = safe if config["keep"] == "safe" else unsafe
        writer("kept").write(_as_schema(with_reason.filter(pa.array(keep)), schemas["kept"]))
    else:
        writer("safe").write(_as_schema(with_reason.filter(pa.array(safe)), schemas["safe"]))
        writer("unsafe").write(_as_schema(with_reason.filter(pa.array(unsafe)), schemas["unsafe"]))
    if not scored.ok.all():
        writer("rejected").write(_as_schema(with_reason.filter(pa.array(~scored.ok)), schemas["rejected"]))


def process_task(task: Task, config: dict, model: dict) -> dict:
    """Score one task and write its outputs; return its statistics (also stored in its state file).

    ``config`` is ``JobConfig.to_dict()`` plus the resolved ``layout``, ``embedding_columns`` and
    ``score_columns``; ``model`` is ``{"bytes", "sha256", "name"}``. Stage seconds: read, score, write.

    Errors leave as one line naming the task's file: this package's own errors as they are (input
    problems: retrying cannot help), anything else as ``TaskError`` (it may be transient: Spark retries).
    """
    try:
        return _process_task(task, config, model)
    except ClipNsfwError:
        raise
    except Exception as err:
        in_fs, _ = filesystem(config["input"], config["storage_options"])
        where = unstrip(in_fs, task.path) + (f" and {unstrip(in_fs, task.npy_path)}" if task.npy_path else "")
        cause = f"{type(err).__name__}: {' '.join(str(err).split())}"  # one line: pyarrow's span several
        if isinstance(err, (ValueError, TypeError, KeyError, IndexError)) and "pyarrow" in type(err).__module__:
            raise InputError(f"cannot read {where}: {cause}") from err
        raise TaskError(f"task {task.rel} ({where}) failed: {cause}") from err


def _process_task(task: Task, config: dict, model: dict) -> dict:
    started = time.perf_counter()
    timings: Counter = Counter()
    scorers = [scorer_for(head["bytes"], head["sha256"], head["name"], model.get("io_only", False))
               for head in model["heads"]]
    in_fs, _ = filesystem(config["input"], config["storage_options"])
    out_fs, out_root = filesystem(config["output"], config["storage_options"])
    bins = np.linspace(0.0, 1.0, config["histogram_bins"] + 1)
    histograms = {name: np.zeros(config["histogram_bins"], dtype=np.int64) for name in config["score_columns"]}
    outside: dict[str, list[int]] = {name: [0, 0] for name in config["score_columns"]}  # below 0, above 1
    flagged: Counter = Counter()
    rejected_by_reason: Counter = Counter()
    rows_read = unsafe_rows = batches = 0
    with in_fs.open(task.path, "rb") as handle:
        input_schema = pq.ParquetFile(handle).schema_arrow
    schemas = output_schemas(input_schema, config, scorers[0].dim)
    # Read only what the outputs keep, plus the embeddings to score (parquet layout).
    kept = config.get("write_columns")
    needed = set(kept or ()) | (set(config["embedding_columns"]) if task.kind == "parquet" else set())
    read_columns = None if kept is None else [c for c in input_schema.names if c in needed]
    source_file = unstrip(in_fs, task.path)
    paths = output_paths(task, config["mode"])
    writers: dict[str, _AtomicParquet] = {}

    def writer(stream: str) -> _AtomicParquet:
        if stream not in writers:
            writers[stream] = _AtomicParquet(out_fs, out_root, paths[stream], schemas[stream], config["compression"])
        return writers[stream]

    try:
        for stream in schemas:  # main outputs exist even when empty; rejected only when needed
            if stream != "rejected":
                writer(stream)
        for batch, npy, first_row in _task_batches(task, in_fs, config["batch_rows"], timings, read_columns):
            rows_read += batch.num_rows
            table = pa.Table.from_batches([batch])
            if config.get("row_ids"):  # the sidecar's join key when the input has no id column
                table = table.append_column("source_file", pa.array([source_file] * batch.num_rows, pa.string()))
                table = table.append_column("row_index", pa.array(np.arange(first_row, first_row + batch.num_rows)))
            if npy is not None and config["write_embeddings"]:
                table = table.append_column("embedding", pa.FixedSizeListArray.from_arrays(
                    pa.array(npy.astype(np.float16).reshape(-1)), npy.shape[1]))
            scored = score_batch(table, npy, config["targets"], scorers, timings)
            for name, values in scored.scores.items():
                histograms[name] += np.histogram(values, bins=bins)[0]  # [0, 1]; raw heads may leave it
                outside[name][0] += int((values < 0).sum())
                outside[name][1] += int((values > 1).sum())
            flagged.update(scored.flagged)
            rejected_by_reason.update(scored.problems)  # a row counts once, by its first problem
            unsafe_rows += int(scored.unsafe.sum())
            t0 = time.perf_counter()
            _write_batch(scored, config, schemas, writer)
            timings["write"] += time.perf_counter() - t0
            batches += 1
            inject_fault(config.get("fault"), "batch", task, batches)
        t0 = time.perf_counter()
        check_owner(out_fs, out_root, config.get("run_id"))  # a run that lost its lease must not commit
        for number, stream in enumerate(sorted(writers)):
            writers[stream].commit()
            inject_fault(config.get("fault"), "commit", task, number + 1)
        timings["write"] += time.perf_counter() - t0
    except BaseException:
        for pending in writers.values():
            try:
                pending.abort()
            except Exception:  # noqa: BLE001 - the original error matters more
                pass
        raise
    stats = {
        "task_id": task.task_id, "rel": task.rel, "source": task.source, "rows_planned": task.rows,
        "outputs": sorted(paths[stream] for stream in writers), "rows_read": rows_read,
        "rows_written": {stream: w.rows for stream, w in writers.items()},
        "rows_unsafe": unsafe_rows, "rows_rejected": sum(rejected_by_reason.values()),
        "rejected_by_reason": dict(rejected_by_reason),
        "histograms": {name: h.tolist() for name, h in histograms.items()}, "outside_0_1": outside,
        "unsafe_by_column": {name: flagged.get(name, 0) for name in config["score_columns"]},
        "seconds": time.perf_counter() - started, "stage_seconds": dict(timings),
        "worker_max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    out_fs.makedirs(join(out_root, TASKS_DIR), exist_ok=True)
    with out_fs.open(join(out_root, TASKS_DIR, task.task_id + ".json"), "w") as handle:
        handle.write(json.dumps(stats))  # the last write: its presence means "this task is complete"
    return stats

