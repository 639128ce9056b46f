"""The scoring job on the driver: validate, plan, prepare the model, run the tasks, write the report.

Output layout under ``output``:

* annotate: ``<rel>`` (every input row and column + one float32 score per embedding column + a reason
  column, null when the row was scored);
* filter: ``<rel>`` (the kept rows) and ``_rejected/<rel>`` (rows that could not be scored, with reason);
* split: ``safe/<rel>``, ``unsafe/<rel>`` and ``_rejected/<rel>``;
* ``_clip_nsfw_report.json`` (see ``build_report``), then ``_SUCCESS`` last;
* ``_clip_nsfw_tasks/`` (one state file per completed task, and ``_job.json``: what this output is for).

``<rel>`` is the input file's path relative to the input root (hive ``key=value`` folders included), or
``<stem>.slice-NNNNN.parquet`` when a large file is cut into several tasks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .config import JobConfig
from .errors import ConfigError, DimensionError, InputError, OutputError
from .progress import ProgressWatcher
from .models import REGISTRY, canonical_name, fitting_model_hint, prepare_model
from .reader import Plan, Task, plan as plan_input
from .storage import accessing, filesystem, join, unstrip
from .weights import PortableWeights
from .worker import FAULT_ENV, TASKS_DIR, TMP_DIR, output_paths, process_task

log = logging.getLogger(__name__)
REPORT_NAME = "_clip_nsfw_report.json"
SUCCESS_NAME = "_SUCCESS"
JOB_STATE = "_job.json"
# Settings that change what is written: a resume with different values would mix two datasets.
_FINGERPRINT_KEYS = ("input", "layout", "embedding_columns", "score_columns", "reason_column", "mode",
                     "threshold", "keep", "rows_per_task", "write_embeddings", "compression", "replace_scores")


def default_score_columns(embedding_columns: tuple[str, ...]) -> tuple[str, ...]:
    if len(embedding_columns) == 1:
        return ("punsafe",)
    return tuple(f"punsafe_{column}" for column in embedding_columns)


def _normal(fs, path: str) -> str:
    return unstrip(fs, path).rstrip("/") + "/"


def check_output(config: JobConfig, in_fs, in_root: str) -> tuple:
    """Refuse outputs inside the input (or the reverse) and non-empty outputs without overwrite/resume."""
    out_fs, out_root = filesystem(config.output, config.storage_options)
    same_store = type(out_fs) is type(in_fs)
    base_in = in_root.split("*")[0] if any(c in in_root for c in "*?[") else in_root
    a, b = _normal(in_fs, base_in), _normal(out_fs, out_root)
    if same_store and (b.startswith(a) or a.startswith(b)):
        raise OutputError(f"output {unstrip(out_fs, out_root)} is inside the input {unstrip(in_fs, base_in)} (or "
                          "contains it): choose an output folder outside the input; the input is never modified")
    with accessing(out_fs, out_root, "output"):
        exists = out_fs.exists(out_root)
        non_empty = exists and out_fs.isdir(out_root) and bool(out_fs.ls(out_root, detail=False))
    if exists and not out_fs.isdir(out_root):
        raise OutputError(f"output {unstrip(out_fs, out_root)} is a file; it must be a folder")
    if non_empty and not (config.overwrite or config.resume):
        raise OutputError(f"output {unstrip(out_fs, out_root)} is not empty. Use --overwrite to replace it, "
                          "--resume to finish an interrupted run, or choose another folder.")
    if non_empty and config.resume and not out_fs.exists(join(out_root, TASKS_DIR, JOB_STATE)):
        raise OutputError(f"--resume refused: {unstrip(out_fs, out_root)} is not empty and was not written by "
                          "clip-nsfw-spark (no _clip_nsfw_tasks/_job.json). Choose another output folder.")
    if non_empty and config.overwrite:
        log.info("overwrite: removing %s", unstrip(out_fs, out_root))
        out_fs.rm(out_root, recursive=True)
    return out_fs, out_root


def _check_dimension(plan: Plan, in_fs, dim: int, model_name: str) -> None:
    """Fail early (before any task runs) when the data's embedding width does not fit the model."""
    first = plan.tasks[0] if plan.tasks else None
    if first is None:
        return
    if plan.layout == "laion-npy":
        widths = {"embedding": plan.npy_width}  # the planner checked that every npy file has this width
    else:
        with in_fs.open(first.path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            widths = {}
            for column in plan.embedding_columns:
                for batch in parquet.iter_batches(batch_size=64, columns=[column]):
                    values = batch.column(0)
                    lengths = np.array([values.type.list_size]) if pa.types.is_fixed_size_list(values.type) \
                        else values.value_lengths().drop_null().to_numpy(zero_copy_only=False)
                    if len(lengths):
                        widths[column] = int(np.bincount(lengths).argmax())
                        break
    for column, width in widths.items():
        if width != dim:
            raise DimensionError(f"column {column!r} holds {width}-d embeddings but model {model_name!r} expects "
                                 f"{dim}-d{fitting_model_hint(width)}")


def check_output_columns(plan: Plan, config: JobConfig, score_columns: tuple[str, ...]) -> None:
    """Refuse an output schema with two columns of one name (pyarrow could not read it back).

    An input may already hold a score column (LAION's joined metadata has ``punsafe``; so does an output
    of this job scored again): that is an error unless ``replace_scores`` says to overwrite it.
    """
    if len(score_columns) != len(plan.embedding_columns):
        raise ConfigError(f"score_columns {list(score_columns)} must name one column per embedding column "
                          f"{list(plan.embedding_columns)}")
    added = list(score_columns) + [config.reason_column]
    if plan.layout == "laion-npy" and config.write_embeddings:
        added.insert(0, "embedding")
    repeated = sorted({name for name in added if added.count(name) > 1})
    if repeated:
        raise ConfigError(f"the output would hold two columns named {', '.join(map(repr, repeated))} (score "
                          f"columns {list(score_columns)}, reason column {config.reason_column!r}): give each "
                          "a distinct name with --score-column / reason_column")
    # Only what this job writes may be replaced: float score columns, and the reason column when it comes
    # with one of them (an output of this job scored again) — never an id or data column by a name clash.
    scores_present = [n for n in score_columns if n in plan.schema.names
                      and pa.types.is_floating(plan.schema.field(n).type)]
    replaceable = set(scores_present)
    if scores_present and config.reason_column in plan.schema.names \
            and pa.types.is_string(plan.schema.field(config.reason_column).type):
        replaceable.add(config.reason_column)
    for name in added:
        if name not in plan.schema.names:
            continue
        if name in plan.embedding_columns or name not in replaceable:
            raise InputError(f"the input already has a column {name!r}, which the output would add again; "
                             "name the new column differently (--score-column, reason_column)")
        if not config.replace_scores:
            raise InputError(
                f"the input already has a column {name!r} (LAION's joined metadata has 'punsafe'; so does an "
                f"output of this job): name the new column differently (--score-column NAME or reason_column) "
                f"or pass --replace-scores to overwrite {name!r} with the new values")


def _check_rows(plan: Plan, stats: list[dict], mode: str, keep: str) -> None:
    """Rows planned = rows read = rows written (+ rows deliberately left out): else fail, naming the task."""
    by_id = {s["task_id"]: s for s in stats}
    for task in plan.tasks:
        s = by_id[task.task_id]
        written, read = s["rows_written"], s["rows_read"]
        rejected, unsafe = s["rows_rejected"], s["rows_unsafe"]
        safe = read - unsafe - rejected
        expected = {"annotate": {"annotated": read},
                    "filter": {"kept": safe if keep == "safe" else unsafe, "rejected": rejected},
                    "split": {"safe": safe, "unsafe": unsafe, "rejected": rejected}}[mode]
        found = {stream: written.get(stream, 0) for stream in expected}
        if read != task.rows or found != expected:
            raise OutputError(f"task {task.rel} ({task.path}) planned {task.rows} rows, read {read}, wrote "
                              f"{found} where {expected} was due; the output is not trustworthy. Check that "
                              "the input did not change during the run, then rerun with --overwrite.")


def run_job(config: JobConfig, runner: Callable | None = None, progress: bool = False,
            io_only: bool = False) -> dict:
    """Run the whole job; return the report (also written next to the output).

    ``runner(tasks, task_config, model)`` runs ``process_task`` over the tasks and returns their stats;
    ``None`` runs them here, one after the other (the Spark runner lives in spark.py). ``progress``
    shows tasks done, rows/s and ETA while they run (see progress.py). ``io_only`` replaces the model
    by a constant 0 (the benchmark's IO floor; never for real outputs).
    """
    started = time.perf_counter()
    durations = {}
    in_fs, in_root = filesystem(config.input, config.storage_options)
    plan = plan_input(config)
    score_columns = tuple(config.score_columns or default_score_columns(plan.embedding_columns))
    check_output_columns(plan, config, score_columns)
    durations["plan"] = time.perf_counter() - started

    t0 = time.perf_counter()
    resolved = prepare_model(config.model)
    weights = PortableWeights.load(resolved.portable)
    model_name = canonical_name(config.model) or resolved.name
    _check_dimension(plan, in_fs, weights.dim, model_name)
    model = {"bytes": resolved.portable.read_bytes(), "sha256": resolved.sha256, "name": model_name,
             "io_only": io_only}
    durations["model"] = time.perf_counter() - t0

    out_fs, out_root = check_output(config, in_fs, in_root)
    task_config = config.to_dict() | {
        "layout": plan.layout, "embedding_columns": list(plan.embedding_columns),
        "score_columns": list(score_columns),
        "fault": os.environ.get(FAULT_ENV),  # tests only (see worker.inject_fault)
    }
    fingerprint = {key: task_config[key] for key in _FINGERPRINT_KEYS} | {"model_sha256": resolved.sha256}
    with accessing(out_fs, out_root, "output"):
        done, resume_actions = _prepare_state(out_fs, out_root, fingerprint, config.resume, plan, config.mode)
    pending = [task for task in plan.tasks if task.task_id not in done]
    log.info("%d tasks (%d rows) in %s; %d already complete; model %s", len(plan.tasks), plan.total_rows,
             config.input, len(plan.tasks) - len(pending), model_name)
    for path, why in plan.skipped[:20]:
        log.warning("skipped %s: %s", path, why)

    t0 = time.perf_counter()
    watcher = ProgressWatcher(out_fs, out_root, TASKS_DIR, len(plan.tasks), plan.total_rows, set(done),
                              rows_before=sum(s["rows_read"] for s in done.values())) if progress \
        else contextlib.nullcontext()
    with watcher:
        if runner is None:
            new_stats = [process_task(task, task_config, model) for task in pending]
        else:
            new_stats = runner(pending, task_config, model)
    durations["run"] = time.perf_counter() - t0

    stats = list(done.values()) + list(new_stats)
    by_id = {s["task_id"]: s for s in stats}
    missing = [t.rel for t in plan.tasks if t.task_id not in by_id]
    if missing:
        raise OutputError(f"{len(missing)} tasks did not report completion (first: {missing[0]}); "
                          "run again with --resume")
    _check_rows(plan, [by_id[t.task_id] for t in plan.tasks], config.mode, config.keep)
    stats = [by_id[t.task_id] for t in plan.tasks]
    if out_fs.exists(join(out_root, TMP_DIR)):
        out_fs.rm(join(out_root, TMP_DIR), recursive=True)
    durations["total"] = time.perf_counter() - started
    report = build_report(config, task_config, plan, resolved, weights.dim, model_name, stats, durations,
                          resumed=len(plan.tasks) - len(pending), resume_actions=resume_actions)
    with out_fs.open(join(out_root, REPORT_NAME), "w") as handle:
        handle.write(json.dumps(report, indent=2))
    with out_fs.open(join(out_root, SUCCESS_NAME), "w") as handle:
        handle.write("")
    return report


def _prepare_state(out_fs, out_root: str, fingerprint: dict, resume: bool, plan: Plan, mode: str) -> tuple[dict, dict]:
    """Create the state folder; on resume, check it is the same job and sort the completed tasks.

    Returns ``(done, actions)``: the stats of tasks that are complete for the input as it is now, keyed
    by task id, and what the resume did. A task whose input changed (size, modification time/ETag, row
    count, footer) is run again, after its old outputs are removed; the outputs of a task whose input
    is gone are removed. Nothing stale survives a resume.
    """
    state_dir = join(out_root, TASKS_DIR)
    job_file = join(state_dir, JOB_STATE)
    done, actions = {}, {"reused": 0, "rerun_changed": [], "removed_gone": []}
    if out_fs.exists(join(out_root, SUCCESS_NAME)):
        out_fs.rm(join(out_root, SUCCESS_NAME))  # this run is not complete until it says so again
    if resume and out_fs.exists(job_file):
        with out_fs.open(job_file, "r") as handle:
            previous = json.load(handle)
        changed = {k: (previous.get(k), v) for k, v in fingerprint.items() if previous.get(k) != v}
        if changed:
            raise OutputError("--resume refused: the output was written with other settings "
                              + ", ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in changed.items())
                              + ". Use --overwrite to start again.")
        planned = {task.task_id: task for task in plan.tasks}
        for path in out_fs.ls(state_dir, detail=False):
            name = path.rsplit("/", 1)[-1]
            if not name.endswith(".json") or name.startswith("_"):
                continue
            with out_fs.open(path, "r") as handle:
                stats = json.load(handle)
            task = planned.get(stats["task_id"])
            if task is not None and stats.get("source") == task.source and stats.get("rel") == task.rel:
                done[task.task_id] = stats
                continue
            # Stale: remove the state file first (the task is then "not done"), then its outputs.
            outputs = stats.get("outputs") or list(output_paths(Task("parquet", "", stats["rel"]), mode).values())
            out_fs.rm(path)
            for rel in outputs:
                if out_fs.exists(join(out_root, rel)):
                    out_fs.rm(join(out_root, rel))
            (actions["rerun_changed"] if task is not None else actions["removed_gone"]).append(stats["rel"])
        actions["reused"] = len(done)
        for key in ("rerun_changed", "removed_gone"):
            if actions[key]:
                log.warning("resume: %s %d task(s) whose input %s: %s", "re-running" if key == "rerun_changed"
                            else "removed the outputs of", len(actions[key]),
                            "changed" if key == "rerun_changed" else "is gone", ", ".join(actions[key][:10]))
    out_fs.makedirs(state_dir, exist_ok=True)
    with out_fs.open(job_file, "w") as handle:
        handle.write(json.dumps(fingerprint))
    return done, actions


def build_report(config, task_config, plan, resolved, dim, model_name, stats, durations, resumed,
                 resume_actions=None) -> dict:
    """The JSON report: config (secrets redacted), model, row counts by stream and reason, histogram, timing."""
    written: dict[str, int] = {}
    rejected: dict[str, int] = {}
    stages: dict[str, float] = {}
    bins = config.histogram_bins
    histogram = np.zeros(bins, dtype=np.int64)
    for s in stats:
        for stream, n in s["rows_written"].items():
            written[stream] = written.get(stream, 0) + n
        for reason, n in s["rejected_by_reason"].items():
            rejected[reason] = rejected.get(reason, 0) + n
        for stage, seconds in s["stage_seconds"].items():
            stages[stage] = stages.get(stage, 0.0) + seconds
        histogram += np.asarray(s["histogram"], dtype=np.int64)
    rows_read = sum(s["rows_read"] for s in stats)
    unsafe = sum(s["rows_unsafe"] for s in stats)
    n_rejected = sum(rejected.values())
    spec = REGISTRY.get(canonical_name(config.model) or "")
    return {
        "status": "succeeded",
        "config": config.redacted() | {k: task_config[k] for k in ("layout", "embedding_columns", "score_columns")},
        "model": {"name": model_name, "sha256": resolved.sha256, "dim": dim, "source": str(resolved.source),
                  "clip_model": spec.clip_model if spec else None},
        "input": {"layout": plan.layout, "tasks": len(plan.tasks), "rows": plan.total_rows,
                  "skipped_files": len(plan.skipped), "skipped_examples": [f"{p}: {why}" for p, why in plan.skipped[:10]]},
        "rows": {"read": rows_read, "written": written, "unsafe": unsafe, "safe": rows_read - unsafe - n_rejected,
                 "rejected": n_rejected, "rejected_by_reason": rejected,
                 "kept": written.get("kept") if config.mode == "filter" else None},
        "threshold": config.threshold,
        "score_histogram": {"edges": np.linspace(0, 1, bins + 1).round(6).tolist(), "counts": histogram.tolist()},
        "durations_seconds": {k: round(v, 3) for k, v in durations.items()},
        "task_stage_seconds": {k: round(v, 3) for k, v in stages.items()},
        "throughput_rows_per_second": round(rows_read / durations["run"], 1) if durations.get("run") else None,
        "tasks_resumed": resumed,
        "resume": resume_actions,
        "worker_max_rss_mb": max((s.get("worker_max_rss_mb", 0) for s in stats), default=0),
    }

