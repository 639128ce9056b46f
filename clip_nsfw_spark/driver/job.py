"""The scoring job on the driver: validate, plan, prepare the model, run the tasks, write the report.

Output layout under ``output``:

* annotate: ``<rel>`` (every input row and column + one float32 score per embedding column + a reason
  column, null when the row was scored);
* filter: ``<rel>`` (the kept rows) and ``_rejected/<rel>`` (rows that could not be scored, with reason);
* split: ``safe/<rel>``, ``unsafe/<rel>`` and ``_rejected/<rel>``;
* ``_clip_nsfw_report.json`` (see ``build_report``), then ``_SUCCESS`` last;
* ``_clip_nsfw_tasks/`` (one state file per completed task, and ``_job.json``: what this output is for);
* ``_clip_nsfw_lease.json`` while a run writes the output (lease.py: one run at a time).

``<rel>`` is the input file's path relative to the input root (hive ``key=value`` folders included), or
``<stem>.slice-NNNNN.parquet`` when a large file is cut into several tasks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import logging
import time
from typing import Callable

import numpy as np
import pyarrow as pa

from clip_nsfw_spark.contract import (TASKS_SUMMED, Head, ScoreOutput, ScoreTarget, Task, TaskConfig,
                                      add_figures)
from clip_nsfw_spark.driver.config import JobConfig
from clip_nsfw_spark.errors import ConfigError, DimensionError, InputChangedError, InputError, OutputError
from clip_nsfw_spark.storage.lease import RunLease
from clip_nsfw_spark.scoring.outcomes import rows_unaccounted
from clip_nsfw_spark.driver.output import (OutputTarget, check_output_names, check_planned_inputs, clear_output,
                                           read_by_spark, recorded_files, refuse_nested_runs, tool_name,
                                           BATCH_RECORD, TASK_RECORD, validate_output)
from clip_nsfw_spark.driver.planner import Listed, Plan, footer_cache, plan as plan_input, read_footer_cache
from clip_nsfw_spark.driver.progress import ProgressWatcher
from clip_nsfw_spark.driver.report import build_report
from clip_nsfw_spark.models.registry import fitting_model_hint
from clip_nsfw_spark.storage.filesystem import (RunStores, accessing, canonical_in, exists_fresh, filesystem,
                                                 find_sizes_fresh, is_local, is_storage_error, join, location,
                                                 open_run_stores, read_fresh, read_many_fresh, remove, unstrip,
                                                 write_whole)
from clip_nsfw_spark.storage.s3_listing import sample_every
from clip_nsfw_spark.executor.reader import damaged, is_damage, parquet_file, unreadable, unreadable_footer
from clip_nsfw_spark.executor.worker import Worker
from clip_nsfw_spark.executor.writer import (FOOTERS_STATE, JOB_STATE, MANIFEST_DIR, REPORT_NAME, ROW_ID_COLUMNS,
                                             SUCCESS_NAME, TASKS_DIR, TMP_DIR, npy_values, output_paths,
                                             output_schemas)

# A runner runs a worker over tasks and returns, in any order, each task's stats or sums of several tasks'
# (contract.sum_of_tasks: what the Spark runner returns per Spark partition); spark.spark_runner, or None:
# here, one after the other.
Runner = Callable[[list[Task], Worker], list[dict]]

log = logging.getLogger(__name__)
# mode scores: the first of these present is the sidecar's id; none present → source_file + row_index.
ID_CANDIDATES = ("key", "id", "uid", "hash", "image_path", "url")


# Files the driver reads for the widths before giving up (each costs a footer and a few pages): a dataset
# whose first files hold no non-empty embedding (failed shards, all-null files) still gets its width checked.
WIDTH_PROBE_FILES = 32


def embedding_widths(plan: Plan, in_fs) -> dict[str, int]:
    """The embedding width of each column to score: the npy width (every file checked by the planner), or
    the commonest non-zero list length in the first non-empty rows of the first parquet file that has some
    (up to ``WIDTH_PROBE_FILES`` files, in plan order; fixed-size lists: the type's). Empty and null rows are
    rejected per row later, never taken for the width; a column with no such row in those files is absent."""
    if not plan.tasks:
        return {}
    if plan.layout == "laion-npy":
        return {"embedding": plan.npy_width}
    widths: dict[str, int] = {}
    probed: set[str] = set()
    for task in plan.tasks:
        if len(widths) == len(plan.embedding_columns) or len(probed) == WIDTH_PROBE_FILES:
            break
        if task.path in probed or task.rows == 0:  # rows 0: known empty from its footer (not ROWS_FROM_FOOTER)
            continue
        probed.add(task.path)
        missing = [column for column in plan.embedding_columns if column not in widths]
        widths.update(_widths_in_file(task.path, missing, in_fs))
    return widths


def _widths_in_file(path: str, columns: list[str], in_fs) -> dict[str, int]:
    """``embedding_widths`` for one parquet file: the columns of ``columns`` that have a non-empty row there."""
    widths = {}
    with in_fs.open(path, "rb") as handle:
        # Buffered, no pre-buffering: the driver reads a few pages, not the whole first column chunk.
        try:
            parquet = parquet_file(handle)
        except Exception as err:  # noqa: BLE001 - planned from its listing (an S3 resume): its footer is read here
            if is_storage_error(err) and not is_damage(err):
                raise  # the store's failure: accessing() around this call names it
            raise unreadable_footer(unstrip(in_fs, path), err) from err
        for column in columns:
            width = None
            for group in range(parquet.metadata.num_row_groups):
                try:
                    width = _first_width(parquet.iter_batches(batch_size=1024, row_groups=[group], columns=[column]))
                except Exception as err:
                    if is_damage(err):
                        raise damaged(unstrip(in_fs, path), group, err) from err
                    refused = unreadable(unstrip(in_fs, path), group, err)
                    if refused is not None:
                        raise refused from err
                    raise
                if width is not None:
                    widths[column] = width
                    break
    return widths


def _first_width(batches) -> int | None:
    """The commonest non-zero list length in the first batch that has one (None: no such batch)."""
    for batch in batches:
        values = batch.column(0)
        lengths = np.array([values.type.list_size]) if pa.types.is_fixed_size_list(values.type) \
            else values.value_lengths().drop_null().to_numpy(zero_copy_only=False)
        lengths = lengths[lengths > 0]
        if len(lengths):
            return int(np.bincount(lengths).argmax())
    return None


def resolve_heads(config: JobConfig) -> list[Head]:
    """Fetch, verify and convert every head of the run once (cache.py); their widths, columns, thresholds."""
    from clip_nsfw_spark.models.heads import resolve_head

    return [resolve_head(choice, config.threshold) for choice in config.choices()]


def score_targets(config: JobConfig, plan: Plan, heads: list[Head]) -> tuple[ScoreTarget, ...]:
    """One score column per head and embedding column. One embedding column: the head's column
    (``punsafe``, ``pviolence`` or its own); several: ``<column>_<embedding column>``; a single head may be
    named per column by ``score_columns``."""
    several = len(plan.embedding_columns) > 1
    targets = []
    for position, embedding in enumerate(plan.embedding_columns):
        outputs = []
        for index, head in enumerate(heads):
            if config.score_columns:
                name = config.score_columns[position]
            else:
                name = f"{head.score_column}_{embedding}" if several else head.score_column
            outputs.append(ScoreOutput(name, index, head.threshold))
        targets.append(ScoreTarget(embedding, tuple(outputs)))
    return tuple(targets)


def check_widths(widths: dict[str, int], heads: list[Head]) -> None:
    """Fail early (before any task runs) when a head does not fit the data's embedding width."""
    for column, width in widths.items():
        for head in heads:
            if width != head.dim:
                raise DimensionError(f"column {column!r} holds {width}-d embeddings but model {head.name!r} "
                                     f"expects {head.dim}-d{fitting_model_hint(width)}")


def written_columns(plan: Plan, config: JobConfig) -> tuple[list[str], bool]:
    """The input columns each output keeps, in order, and whether row ids are added (``ROW_ID_COLUMNS``).

    annotate/filter/split keep every column, or ``columns`` (in that order), or all but ``drop_columns``;
    ``scores`` keeps only the id columns (``id_columns``, else the first of ``ID_CANDIDATES`` present,
    else the file and row number). Unknown names are errors listing the columns there are.
    """
    names = plan.schema.names
    asked = config.id_columns or config.columns or config.drop_columns
    unknown = [c for c in asked if c not in names]
    if unknown:
        raise InputError(f"column(s) {', '.join(map(repr, unknown))} not in the input; columns found: "
                         f"{', '.join(names)}")
    if config.mode == "scores":
        if config.id_columns:
            return list(config.id_columns), False
        found = next((c for c in ID_CANDIDATES if c in names), None)
        return ([found], False) if found else ([], True)
    if config.columns:
        return list(config.columns), False
    return [c for c in names if c not in config.drop_columns], False


def check_output_columns(plan: Plan, config: JobConfig, score_columns: tuple[str, ...],
                         kept: list[str] | None = None, row_ids: bool = False) -> None:
    """Refuse an output schema with two columns of one name (pyarrow could not read it back).

    An input may already hold a score column (LAION's joined metadata has ``punsafe``; so does an output
    of this job scored again): that is an error unless ``replace_scores`` says to overwrite it.
    """
    kept = plan.schema.names if kept is None else kept
    added = list(score_columns) + [config.reason_column]
    # Names are compared case-insensitively where a reader of the output is: Spark (by default) takes
    # "PUNSAFE" and "punsafe" for one column, and a PUNSAFE=0/ folder would replace every score.
    if plan.layout == "laion-npy" and config.write_embeddings:
        added.insert(0, "embedding")
    if row_ids:
        added[:0] = ROW_ID_COLUMNS
    keys = {key.lower(): key for key in plan.partition_keys}
    for name in added:  # Spark and pyarrow datasets turn key=value folders into columns
        if name.lower() in keys:
            how = ("name an id column with --id-column (the row ids source_file/row_index would be hidden)"
                   if name in ROW_ID_COLUMNS else "name the new column differently (--score-column, reason_column)")
            raise InputError(f"the input's folders are named {keys[name.lower()]}=…, which readers of the output "
                             f"turn into a column {keys[name.lower()]!r} (Spark compares column names ignoring "
                             f"case): it would hide or clash with the new column {name!r}. {how[0].upper()}{how[1:]}")
    lowered = [name.lower() for name in added]
    repeated = sorted({name for name in added if lowered.count(name.lower()) > 1})
    kept_by_lower = {name.lower(): name for name in kept}
    for name in added:
        twin = kept_by_lower.get(name.lower())
        if twin is not None and twin != name:
            raise InputError(f"the input has a column {twin!r}, which Spark (comparing column names ignoring case) "
                             f"would take for the new column {name!r}; name the new column differently "
                             "(--score-column, reason_column) or leave the input column out (drop_columns)")
    if repeated:
        how = ("give each head its own score_column under models: in the YAML" if len(config.choices()) > 1
               else "give each a distinct name with --score-column / reason_column")
        raise ConfigError(f"the output would hold two columns named {', '.join(map(repr, repeated))} (score "
                          f"columns {list(score_columns)}, reason column {config.reason_column!r}): {how}")
    # Only what this job writes may be replaced: float score columns, and the reason column when it comes
    # with one of them (an output of this job scored again) — never an id or data column by a name clash.
    scores_present = [n for n in score_columns if n in kept and pa.types.is_floating(plan.schema.field(n).type)]
    replaceable = set(scores_present)
    if scores_present and config.reason_column in kept \
            and pa.types.is_string(plan.schema.field(config.reason_column).type):
        replaceable.add(config.reason_column)
    for name in added:
        if name in plan.embedding_columns and name in score_columns + (config.reason_column,):
            # an embedding column is read for scoring even when not written: never overwritten
            raise InputError(f"{name!r} is an embedding column this run scores; name the new column differently "
                             "(--score-column, reason_column)")
        if name not in kept:
            continue
        if name not in replaceable:
            raise InputError(f"the input already has a column {name!r}, which the output would add again; "
                             "name the new column differently (--score-column, reason_column)")
        if not config.replace_scores:
            raise InputError(
                f"the input already has a column {name!r} (LAION's joined metadata has 'punsafe'; so does an "
                f"output of this job): name the new column differently (--score-column NAME or reason_column) "
                f"or pass --replace-scores to overwrite {name!r} with the new values")


def _last_footers(target: OutputTarget) -> dict:
    """The footers the output's last run planned with and the files it planned from their listing
    (planner.footer_cache), or {} when there are none or they are damaged (then every footer is read again,
    and a file planned from its listing before may be planned from its footer now: its task runs again). A
    store that does not answer is an error, not an empty plan (that would rerun finished tasks)."""
    try:
        data = read_fresh(target.fs, join(target.root, TASKS_DIR, FOOTERS_STATE))
    except FileNotFoundError:
        return {}
    except Exception as err:
        raise OutputError(f"--resume could not read {unstrip(target.fs, join(target.root, TASKS_DIR, FOOTERS_STATE))} "
                          f"(how the last run planned each file): {err}. Nothing was changed; run again.") from err
    return read_footer_cache(data)


def _check_rows(plan: Plan, stats: list[dict], mode: str, keep: str) -> None:
    """Rows planned = rows read = rows written (+ rows deliberately left out), for each task's ``stats``:
    else fail, naming the task. (A worker checks its own task before recording it complete; this checks
    the states a resume takes over, and the stats of runners that return them whole.)"""
    planned = {task.task_id: task for task in plan.tasks}
    for s in stats:
        task = planned[s["task_id"]]
        # A task planned from the listing counted its rows from the footer it read (its rows_planned).
        problem = rows_unaccounted(task.rows if task.rows_known else s.get("rows_planned", -1), s, mode, keep)
        if problem:
            raise OutputError(f"task {task.rel} ({task.path}) {problem}; the output is not trustworthy. Check that "
                              "the input did not change during the run, then rerun with --overwrite.")


def run_sequentially(tasks: list[Task], worker: Worker) -> list[dict]:
    """The runner without Spark: every task here, one after the other."""
    return [worker(task) for task in tasks]


# The task phase's core-seconds: one task at a time, but its read-ahead and write-behind threads may use
# every core this process may run on.
run_sequentially.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_job(config: JobConfig, runner: Runner | None = None, progress: bool = False) -> dict:
    """Run the whole job; return the report (also written next to the output).

    ``runner(tasks, worker)`` runs ``worker`` (worker.Worker, a picklable ``Task → stats``) over the tasks
    and returns their stats; ``None`` runs them here, one after the other (the Spark runner is
    spark.spark_runner). A runner may wrap the worker (tests inject faults, the benchmark a constant
    scorer); the job itself always uses it as made. ``progress`` shows tasks done, rows/s and ETA while
    they run (see progress.py).

    The output is validated first (``validate_output``, before planning and model conversion), then the
    run holds the output's lease (lease.py) until it ends: another run cannot write the same output.
    """
    stores = open_run_stores(config.input, config.output, config.storage_options)  # the run's one each
    target = validate_output(config, stores)
    with RunLease(target.fs, target.root) as lease:
        # With this run's lease in place: a run started at once above or below shows. A resume of its own
        # output looks below in the listing its state is judged from (_prepare_state), made after planning.
        refuse_nested_runs(target, look_below=not (config.resume and target.non_empty))
        return _run_job(config, stores, target, lease, runner, progress)


def overlap_wanted(config: JobConfig, stores: RunStores, in_process: bool) -> bool:
    """The job's ``overlap`` resolved: "auto" overlaps where a task would otherwise wait for storage (an input
    or output not on a local disk) or leave cores idle (tasks run one at a time in this process); not where
    every core runs a task of its own on local files: there the stages already keep the cores busy, and
    threads of one task competing with the other tasks cost more than they overlap (bench/bench.py's
    overlap-pyarrow-f16 case, docs/performance.md)."""
    if config.overlap != "auto":
        return config.overlap == "on"
    return in_process or not (is_local(stores.in_fs) and is_local(stores.out_fs))


def task_config(config: JobConfig, plan: Plan, target: OutputTarget, run_id: str, targets: tuple[ScoreTarget, ...],
                write_columns: list[str] | None, row_ids: bool, overlap: bool = False) -> TaskConfig:
    """The frozen, typed config every task of this run receives. ``embedding_type`` is the effective one:
    "float32" only where it widens a kept float16 embedding (a resume compares it: asking for float32 on
    float32 input, or with the embeddings left out, changes no output and is not a different job)."""
    tasks = TaskConfig(
        input=config.input, output=target.url, storage_options=dict(config.storage_options), layout=plan.layout,
        mode=config.mode, keep=config.keep, targets=targets, reason_column=config.reason_column,
        write_columns=None if write_columns is None else tuple(write_columns), row_ids=row_ids,
        write_embeddings=config.write_embeddings, compression=config.compression,
        embedding_compression=config.embedding_compression, batch_rows=config.batch_rows,
        histogram_bins=config.histogram_bins, run_id=run_id, parquet_codec=config.parquet_codec,
        embedding_type=config.embedding_type, overlap=overlap, npy_value_type=plan.npy_value_type or "float16",
        input_schema=plan.schema.remove_metadata().serialize().to_pybytes() if plan.listed else b"",
        input_schema_of=plan.schema_of if plan.listed else "")
    if tasks.embedding_type != "input":
        as_read = dataclasses.replace(tasks, embedding_type="input")
        if float16_kept(tasks, plan) == float16_kept(as_read, plan):  # nothing widened
            tasks = as_read
    return tasks


def float16_kept(tasks: TaskConfig, plan: Plan) -> list[str]:
    """The columns the outputs keep with float16 values anywhere in their type (Spark cannot read them):
    embeddings unless ``embedding_type: float32`` widens them, and any other float16 column."""
    if plan.schema is None:
        return []
    schemas = output_schemas(plan.schema, tasks, plan.npy_width or 0)
    return sorted({f.name for schema in schemas.values() for f in schema if _holds_float16(f.type)})


def _holds_float16(arrow_type: pa.DataType) -> bool:
    if arrow_type == pa.float16():
        return True
    return any(_holds_float16(arrow_type.field(i).type) for i in range(arrow_type.num_fields))


def fingerprint(config: JobConfig, tasks: TaskConfig, heads: list[Head], stores: RunStores | None = None) -> dict:
    """What the output was written for, as stored in ``_job.json`` (JSON values): a ``--resume`` with any
    difference would mix two datasets. The input in its one canonical spelling ("in/", "./in" and
    "/abs/in" resume the same run; a glob is kept whole). ``stores``: the run's filesystems, opened once."""
    opened = (stores.in_fs, stores.in_root) if stores else filesystem(config.input, config.storage_options)
    values = {
        "input": location(*canonical_in(*opened)), "layout": tasks.layout,
        "embedding_columns": list(tasks.embedding_columns), "score_columns": list(tasks.score_columns),
        "reason_column": config.reason_column, "mode": config.mode, "threshold": config.threshold,
        "keep": config.keep, "rows_per_task": config.rows_per_task, "write_embeddings": config.write_embeddings,
        "compression": config.compression, "embedding_compression": config.embedding_compression,
        "replace_scores": config.replace_scores, "histogram_bins": config.histogram_bins,
        "embedding_type": tasks.embedding_type,
        # the npy rows' type as written (after embedding_type): what an older output holds decides a resume
        "npy_value_type": str(npy_values(tasks)) if tasks.layout == "laion-npy" and tasks.write_embeddings else None,
        "write_columns": None if tasks.write_columns is None else list(tasks.write_columns),
        "heads": [[h.name, h.sha256, h.score_column, h.threshold] for h in heads],
        # Row ids' source_file spelling: canonical folders since #23 (as typed before): never mixed in one output.
        "source_file": "canonical folder" if tasks.row_ids else None}
    return json.loads(json.dumps(values))


def _run_job(config: JobConfig, stores: RunStores, target: OutputTarget, lease: RunLease, runner: Runner | None,
             progress: bool) -> dict:
    started = time.perf_counter()
    durations = {}
    in_fs = stores.in_fs
    plan = plan_input(config, known=_last_footers(target) if config.resume else None,
                      read_remotely=getattr(runner, "read_footers", None), stores=stores)
    if config.score_columns and len(config.score_columns) != len(plan.embedding_columns):
        raise ConfigError(f"score_columns {list(config.score_columns)} must name one column per embedding column "
                          f"{list(plan.embedding_columns)}")
    durations["plan"] = time.perf_counter() - started

    t0 = time.perf_counter()
    heads = resolve_heads(config)
    with accessing(in_fs, stores.in_root, "input"):  # the store down: one clear error, not its traceback
        widths = embedding_widths(plan, in_fs)
    check_widths(widths, heads)
    targets = score_targets(config, plan, heads)
    score_columns = tuple(o.score_column for t in targets for o in t.outputs)
    kept, row_ids = written_columns(plan, config)
    check_output_columns(plan, config, score_columns, kept, row_ids)
    durations["model"] = time.perf_counter() - t0

    out_fs, out_root = target.fs, target.root
    check_planned_inputs(plan, in_fs, target)
    check_output_names(plan, target, config.mode)
    if config.overwrite and target.non_empty:
        clear_output(target, lease.fence)
    tasks_config = task_config(config, plan, target, lease.run_id, targets, kept, row_ids,
                               overlap_wanted(config, stores, in_process=runner is None))
    worker = Worker(tasks_config, tuple(heads))
    with accessing(out_fs, out_root, "output"):
        done, resume_actions = _prepare_state(target, fingerprint(config, tasks_config, heads, stores),
                                              config.resume, plan, config.mode, lease.fence)
    if plan.footers and plan.footers_changed:  # what a resume plans unchanged files from, without reading them
        lease.fence("writing the plan's footers")
        with accessing(out_fs, out_root, "output"):
            write_whole(out_fs, join(out_root, TASKS_DIR, FOOTERS_STATE), footer_cache(plan.footers))
    # Largest first: with uneven tasks the cores stay busy to the end instead of waiting on one big task.
    pending = sorted((task for task in plan.tasks if task.task_id not in done), key=lambda task: -task.weight)
    rows = f"{plan.total_rows} rows" + (f" and {plan.listed} files whose tasks count theirs" if plan.listed else "")
    log.info("%d tasks (%s) in %s; %d already complete; model %s", len(plan.tasks), rows,
             config.input, len(plan.tasks) - len(pending), ", ".join(h.name for h in heads))
    for path, why in plan.skipped[:20]:
        log.warning("skipped %s: %s", path, why)
    half = float16_kept(tasks_config, plan)
    if half:
        embeddings = [name for name in half if name in tasks_config.embedding_columns or plan.layout == "laion-npy"]
        way_out = ("write_embeddings: false" if plan.layout == "laion-npy" else f"--drop-columns {','.join(half)}")
        log.warning("the outputs keep %s as float16 parquet, which Spark (3.5 to 4.x) cannot read "
                    "(PARQUET_TYPE_ILLEGAL); pyarrow, DuckDB and polars can. For Spark readers rerun with %s",
                    ", ".join(half), (f"--embedding-type float32 (exact, twice the bytes) or {way_out}"
                                      if embeddings == half else way_out))

    t0 = time.perf_counter()
    started_before = getattr(runner, "startup_seconds", 0.0) or 0.0  # Spark started to read footers, if it was
    # Nothing to run (a resume of a finished output): no watcher, whose last poll would list every task's state.
    watcher = ProgressWatcher(out_fs, out_root, TASKS_DIR, {t.task_id: t.rows for t in plan.tasks}, set(done),
                              rows_before=sum(s["rows_read"] for s in done.values())) if progress and pending \
        else contextlib.nullcontext()
    try:
        with watcher:
            new_stats = (runner or run_sequentially)(pending, worker)
    except InputChangedError:
        # A file is not what the plan read (changed since, or footers kept from the last plan that no longer
        # hold): the next --resume reads every footer again instead of planning from them once more. How each
        # file was planned is kept (a footer marked stale, a listed file as it was): each is planned the same
        # way again, so that no finished task runs again for a change of planning alone.
        stale = {path: how if isinstance(how, Listed) else dataclasses.replace(how, identity="")
                 for path, how in plan.footers.items()}
        cache = join(out_root, TASKS_DIR, FOOTERS_STATE)
        with contextlib.suppress(Exception):  # a run that lost its lease removes nothing
            lease.fence("marking the plan's footers stale")
            written = False
            with contextlib.suppress(Exception):  # never leave the footers in place: a resume would trust them
                if stale:  # else nothing was planned from footers or listings (the LAION layout)
                    write_whole(out_fs, cache, footer_cache(stale))
                    written = True
            if not written:
                remove(out_fs, cache)
        raise
    # A Spark started lazily for this phase (spark.runner.lazy_spark_runner) is reported apart, not as task time.
    # only a start inside the task phase (not one for the planning's footers) is taken out of it
    startup = (getattr(runner, "startup_seconds", 0.0) or 0.0) - started_before
    durations["run"] = time.perf_counter() - t0 - startup
    if startup:
        durations["spark_start"] = startup

    # Sums, not every task's stats: a million tasks' stats would fill the driver (~4.5 kB each).
    completed, totals, whole, rows_run = set(done), {}, list(done.values()), 0
    run_totals: dict = {}  # this run's tasks only: the account of its task phase's core-seconds
    for result in new_stats:
        if TASKS_SUMMED in result:  # a Spark partition's tasks: each checked by its worker, summed on the executor
            completed.update(result[TASKS_SUMMED])
            totals = add_figures(totals, result["figures"])
            run_totals = add_figures(run_totals, result["figures"])
            rows_run += result["figures"].get("rows_read") or 0
        else:
            completed.add(result["task_id"])
            whole.append(result)
            run_totals = add_figures(run_totals, result)
            rows_run += result["rows_read"]
    missing = [t.rel for t in plan.tasks if t.task_id not in completed]
    if missing:
        raise OutputError(f"{len(missing)} tasks did not report completion (first: {missing[0]}); "
                          "run again with --resume")
    _check_rows(plan, whole, config.mode, config.keep)
    for result in whole:
        totals = add_figures(totals, result)
    lease.fence("removing its temp folder")  # a run that lost its lease must not mark the output complete
    with accessing(out_fs, out_root, "output"):  # the store down at the end: one clear error; --resume finishes
        if exists_fresh(out_fs, join(out_root, TMP_DIR)):
            remove(out_fs, join(out_root, TMP_DIR), recursive=True)
    durations["total"] = time.perf_counter() - started
    report = build_report(config, tasks_config, plan, heads, totals, durations,
                          resumed=len(plan.tasks) - len(pending), resume_actions=resume_actions,
                          rows_run=rows_run, run_totals=run_totals,
                          cores=getattr(runner or run_sequentially, "cores", None) if pending else None,
                          outside_workers=getattr(runner, "outside_workers", None) if pending else None)
    lease.fence("writing the report")
    with accessing(out_fs, out_root, "output"):
        write_whole(out_fs, join(out_root, REPORT_NAME), json.dumps(report, indent=2))
    lease.fence("writing _SUCCESS")
    with accessing(out_fs, out_root, "output"):
        write_whole(out_fs, join(out_root, SUCCESS_NAME), b"")
    return report


# Fingerprint keys newer than some outputs, and what their absence meant: before embedding_compression,
# embedding columns were written with the output's compression.
# histogram_bins was not recorded before; an output without it is taken to have the default, 20 (a legacy
# output written with another value and resumed with 20 could still mix histogram widths).
_ABSENT_MEANS = {"embedding_compression": lambda previous: previous.get("compression"),
                 "histogram_bins": lambda previous: 20,
                 "embedding_type": lambda previous: "input",
                 # before it, npy values were written as float16 whatever the npy held (float32 when widened)
                 "npy_value_type": lambda previous: (
                     ("float32" if previous.get("embedding_type") == "float32" else "float16")
                     if previous.get("layout") == "laion-npy" and previous.get("write_embeddings") else None),
                 "source_file": lambda previous: "as typed" if previous.get("mode") == "scores"
                 and previous.get("write_columns") == [] else None}


def _prepare_state(target: OutputTarget, fingerprint: dict, resume: bool, plan: Plan, mode: str,
                   fence: Callable[[str], None]) -> tuple[dict, dict]:
    """Create the state folder; on resume, check it is the same job and sort the completed tasks.

    ``fence(step)`` raises unless this run still holds the output's lease (lease.RunLease.fence); it is
    called right before every removal and write. A resume lists the output once: other outputs nested in
    it are refused from that listing (``refuse_nested_runs``), and the state is judged from it.

    Returns ``(done, actions)``: the stats of tasks that are complete for the input as it is now, keyed
    by task id, and what the resume did. A task whose input changed (size, modification time/ETag, row
    count, footer) is run again, after its old outputs are removed; the outputs of a task whose input
    is gone are removed. Nothing stale survives a resume.
    """
    out_fs, out_root = target.fs, target.root
    state_dir = join(out_root, TASKS_DIR)
    job_file = join(state_dir, JOB_STATE)
    done, actions = {}, {"reused": 0, "rerun_changed": [], "rerun_missing": [], "removed_gone": [],
                         "removed_unrecorded": []}
    previous = None
    fence("reading the output's state")  # a paused run learns it lost the output before judging it
    if resume:
        try:
            previous = _state_json(read_fresh(out_fs, job_file), unstrip(out_fs, job_file))
        except FileNotFoundError:  # gone since validate_output saw it (or never there): look below as any run
            previous = None
            refuse_nested_runs(target)
    if previous is not None:
        older_npy = "npy_value_type" not in previous
        for key, meaning in _ABSENT_MEANS.items():  # written by an older version, before the key existed
            if key not in previous:
                previous[key] = meaning(previous)
        written = fingerprint.get("npy_value_type")
        if older_npy and written is not None and previous["npy_value_type"] == written:
            # that version recorded embedding_type float32 where it widened the (always float16) npy rows; this
            # one writes a float32 npy's rows as they are ("input"): the same output, so the same job
            previous["embedding_type"] = fingerprint.get("embedding_type")
        changed = {k: (previous.get(k), v) for k, v in fingerprint.items() if previous.get(k) != v}
        if changed:  # refused before anything is removed: the output stays as it was
            raise OutputError("--resume refused: the output was written with other settings "
                              + ", ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in changed.items())
                              + ". Use --overwrite to start again.")
    parsed, manifests, existing, complete, batches = {}, {}, {}, set(), {}
    planned = {task.task_id: task for task in plan.tasks}
    if previous is not None:
        # One listing of the output; the states of tasks completed together come from their batch state (one
        # file per Spark task), the others fetched together (concurrently on object stores): a resume of
        # 100,000 tasks reads a few thousand files, not 100,000. Manifests are read only for tasks not
        # complete. Everything is read and checked before anything is removed: a damaged state or a foreign
        # file refuses the resume untouched.
        # What a complete output holds (a sample: every step-th task's names): on S3 they cut the listing
        # into key ranges listed at once.
        step = sample_every(len(plan.tasks))
        sample = plan.tasks[::step]
        expected = [join(out_root, rel) for task in sample for rel in output_paths(task.rel, mode).values()]
        expected += [join(folder, task.task_id + ".json") for task in sample
                     for folder in (state_dir, join(out_root, MANIFEST_DIR))]
        existing = find_sizes_fresh(out_fs, out_root, expected, weight=step)
        refuse_nested_runs(target, listing=existing)
        batches = _read_batches(out_fs, existing, state_dir)
        copies = {join(state_dir, state["task_id"] + ".json"): state
                  for states in batches.values() for state in states or ()}
        copies = {path: state for path, state in copies.items() if existing.get(path) == state.get("state_bytes")}
        parsed = _read_records(out_fs, existing, state_dir, skip={state["task_id"] for state in copies.values()})
        parsed = dict(sorted((parsed | copies).items()))

        def is_complete(stats: dict) -> bool:
            """Planned as it was, and every output file there with the bytes it was written with (a file cut
            short or replaced since: the task runs again; states older than ``output_bytes``: present)."""
            task = planned.get(stats["task_id"])
            sizes = stats.get("output_bytes")
            return task is not None and stats.get("source") == task.source and stats.get("rel") == task.rel \
                and bool(stats.get("outputs")) and all(join(out_root, rel) in existing for rel in stats["outputs"]) \
                and (not isinstance(sizes, dict) or all(existing.get(join(out_root, rel)) == sizes.get(rel)
                                                        for rel in stats["outputs"]))

        complete = {stats["task_id"] for stats in parsed.values() if is_complete(stats)}
        manifests = _read_records(out_fs, existing, join(out_root, MANIFEST_DIR), skip=complete)
        # An output of a version before manifests has none: a file at a name a task of this run writes may be
        # an older run's commit without its state (the task rewrites it). With manifests, names alone prove
        # nothing: a file no manifest or state names is foreign even where a task will write.
        legacy = not any(path.startswith(join(out_root, MANIFEST_DIR) + "/") for path in existing)
        planned_names = {rel for task in plan.tasks for rel in output_paths(task.rel, mode).values()} \
            if legacy else set()
        recorded = recorded_files({**parsed, **manifests})
        foreign = [path[len(out_root):].lstrip("/") for path in sorted(existing)]
        foreign = [rel for rel in foreign if read_by_spark(rel) and not tool_name(rel)
                   and rel not in recorded and rel not in planned_names]
        if foreign:
            raise OutputError(f"--resume refused: output {unstrip(out_fs, out_root)} holds {len(foreign)} file(s) that "
                              f"no manifest of clip-nsfw-spark names and no task of this run writes: "
                              f"{', '.join(foreign[:5])}{' …' if len(foreign) > 5 else ''}. Readers of the output "
                              "would take them as data. Move them out of the output folder (or rename them to start "
                              "with '_' or '.'); nothing was changed.")
    for name in (SUCCESS_NAME, REPORT_NAME):  # this run is not complete until it says so again
        if exists_fresh(out_fs, join(out_root, name)):
            fence(f"removing {name}")
            remove(out_fs, join(out_root, name))
    if previous is not None:
        for path, stats in parsed.items():
            task = planned.get(stats["task_id"])
            if stats["task_id"] in complete:
                done[task.task_id] = stats
                continue
            # Stale: remove the state file first (the task is then "not done"), then its outputs.
            outputs = stats.get("outputs") or list(output_paths(stats["rel"], mode).values())
            fence(f"removing the stale outputs of task {stats['rel']}")
            remove(out_fs, path)
            for rel in outputs:
                if join(out_root, rel) in existing:
                    fence(f"removing {rel}")
                    remove(out_fs, join(out_root, rel))
            changed = task is None or stats.get("source") != task.source or stats.get("rel") != task.rel
            kind = "removed_gone" if task is None else "rerun_changed" if changed else "rerun_missing"
            actions[kind].append(stats["rel"])
        # Committed but never recorded complete (killed between its commit and its state): what its manifest
        # names goes, whether its task runs again (it rewrites the same names) or its input is gone.
        for path, manifest in manifests.items():
            if manifest["task_id"] in done:
                continue
            present = [rel for rel in manifest.get("files") or () if join(out_root, rel) in existing]
            for rel in present:
                fence(f"removing {rel}")
                remove(out_fs, join(out_root, rel))
            fence(f"removing the manifest {path}")
            remove(out_fs, path)
            if present and manifest["task_id"] not in {s["task_id"] for s in parsed.values()}:
                actions["removed_unrecorded"].append(manifest["rel"])
        # A batch state must never speak for a task that runs again (its new state would be shadowed): those
        # covering a task not complete now go, as do damaged ones (None).
        for path, states in sorted(batches.items()):
            if states is None or any(state["task_id"] not in done for state in states):
                fence(f"removing the batch state {path}")
                remove(out_fs, path)
        actions["reused"] = len(done)
        for key, what in (("rerun_changed", "re-running %d task(s) whose input changed: %s"),
                          ("rerun_missing", "re-running %d task(s) whose outputs are missing: %s"),
                          ("removed_gone", "removed the outputs of %d task(s) whose input is gone: %s"),
                          ("removed_unrecorded", "removed the files of %d task(s) committed but never recorded "
                                                 "complete: %s")):
            if actions[key]:
                log.warning("resume: " + what, len(actions[key]), ", ".join(actions[key][:10]))
    fence("writing the job state")
    out_fs.makedirs(state_dir, exist_ok=True)
    write_whole(out_fs, job_file, json.dumps(fingerprint))
    return done, actions


def _read_records(fs, existing: set[str], folder: str, skip: set[str] = frozenset()) -> dict[str, dict]:
    """The task states (or manifests) directly in ``folder``, found in the listing ``existing``, parsed, by
    path; those of the task ids in ``skip`` are not read. A damaged one refuses (``_state_json``)."""
    prefix = folder.rstrip("/") + "/"
    names = [path for path in existing if path.startswith(prefix) and TASK_RECORD.fullmatch(path[len(prefix):])
             and path[len(prefix):-len(".json")] not in skip]
    found = {}
    for path, data in sorted(read_many_fresh(fs, names).items()):
        if isinstance(data, FileNotFoundError):
            continue  # gone since the listing
        if isinstance(data, Exception):
            raise data
        found[path] = _state_json(data, unstrip(fs, path), task_state=True)
    return found


def _read_batches(fs, existing: dict, folder: str) -> dict[str, list[dict] | None]:
    """The batch states (writer.batch_state_name) directly in ``folder``: ``{path: [task state, …]}``, None
    for a damaged one (only copies: a resume then reads the tasks' own state files, and removes it)."""
    prefix = folder.rstrip("/") + "/"
    names = [path for path in existing if path.startswith(prefix) and BATCH_RECORD.fullmatch(path[len(prefix):])]
    found: dict[str, list[dict] | None] = {}
    for path, data in sorted(read_many_fresh(fs, names).items()):
        if isinstance(data, FileNotFoundError):
            continue
        if isinstance(data, Exception):
            raise data
        try:
            states = json.loads(data)["states"]
            valid = isinstance(states, list) and all(
                isinstance(state, dict) and _task_record_problem(state) is None for state in states)
        except (ValueError, KeyError, TypeError):
            valid = False
        found[path] = states if valid else None
    return found


def _task_record_problem(value: dict) -> str | None:
    """Why a task state or manifest cannot be one this tool wrote (wrong keys or types), or None."""
    if not isinstance(value.get("task_id"), str) or not isinstance(value.get("rel"), str):
        return "it has no task_id/rel strings"
    for key in ("outputs", "files"):
        names = value.get(key, [])
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            return f"its {key} is not a list of file names"
    if not isinstance(value.get("source", ""), str):
        return "its source is not a string"
    return None


def _state_json(data: bytes, path: str, task_state: bool = False) -> dict:
    """A state file's JSON object; a damaged one (truncated, edited, not an object) is an OutputError that
    names it (``path``, as shown) and the way out, not a traceback."""
    try:
        value = json.loads(data)
    except ValueError as err:
        value, why = None, f"it is not valid JSON ({err})"
    else:
        why = "it is not a JSON object" if not isinstance(value, dict) else \
            _task_record_problem(value) if task_state else None
    if why is None:
        return value
    if task_state:
        way_out = ("remove that one file and rerun with --resume (its task runs again and replaces its own "
                   "output files), or rerun with --overwrite")
    else:
        way_out = "rerun with --overwrite to start the output again"
    raise OutputError(f"--resume refused: the state file {path} is damaged: {why}; it was not written by this "
                      f"tool as it is now (state files are written whole). Nothing was changed. To go on, {way_out}.")
