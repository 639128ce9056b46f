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
import logging
import os
import time
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .config import JobConfig
from .errors import ConfigError, DimensionError, InputError, OutputError
from .progress import ProgressWatcher
from .models import prepare_model
from .registry import REGISTRY, canonical_name, fitting_model_hint
from .reader import Plan, Task, plan as plan_input
from .lease import LEASE_NAME, RunLease, refuse_if_held
from .storage import accessing, canonical, filesystem, is_local, join, location, locations, unstrip, within
from .worker import FAULT_ENV, TASKS_DIR, TMP_DIR, output_paths, process_task

log = logging.getLogger(__name__)
REPORT_NAME = "_clip_nsfw_report.json"
SUCCESS_NAME = "_SUCCESS"
JOB_STATE = "_job.json"
_DATA_SUFFIXES = (".parquet", ".parq", ".pq")
# Settings that change what is written: a resume with different values would mix two datasets.
_FINGERPRINT_KEYS = ("input", "layout", "embedding_columns", "score_columns", "reason_column", "mode",
                     "threshold", "keep", "rows_per_task", "write_embeddings", "compression", "replace_scores",
                     "write_columns")
# mode scores: the first of these present is the sidecar's id; none present → source_file + row_index.
ID_CANDIDATES = ("key", "id", "uid", "hash", "image_path", "url")
ROW_ID_COLUMNS = ("source_file", "row_index")


@dataclasses.dataclass(frozen=True)
class OutputTarget:
    """The output folder after validation: ``fs`` and its canonical ``root`` (``storage.canonical``), the
    canonical ``url`` every process writes to, and whether it held anything besides a lease (``non_empty``)."""

    fs: Any
    root: str
    url: str
    non_empty: bool


def validate_output(config: JobConfig) -> OutputTarget:
    """Check the output folder before any work, deleting nothing: the first step of ``run_job``.

    Refuses: an output that is the input, lies inside it or contains it (compared in canonical form, so no
    spelling, symlink or ``file://`` aliases them); a file; a folder another live run is writing (its lease);
    a non-empty folder without ``overwrite``/``resume``; ``resume`` on a folder this tool did not write; and
    ``overwrite`` of a folder this tool did not write, or that holds files it does not write (see
    ``foreign_files``).
    """
    out_fs, out_paths = locations(config.output, config.storage_options)
    in_fs, in_paths = locations(config.input, config.storage_options, glob_base=True)
    out_root, in_base = out_paths[0], in_paths[0]
    url = unstrip(out_fs, out_root)
    shown = url if config.output.rstrip("/") == url else f"{config.output} (that is {url})"
    inside = any(within(out_fs, o, in_fs, i) for o in out_paths for i in in_paths)
    contains = any(within(in_fs, i, out_fs, o) for o in out_paths for i in in_paths)
    if inside or contains:
        relation = "is the input" if inside and contains else "is inside the input" if inside else "contains the input"
        raise OutputError(f"output {shown} {relation} {unstrip(in_fs, in_base)}: choose an output folder outside "
                          "the input; the input is never modified")
    with accessing(in_fs, in_base, "input"):  # storage errors (credentials, endpoint) name the input first
        in_fs.exists(in_base)
    with accessing(out_fs, out_root, "output"):
        exists = out_fs.exists(out_root)
        if exists and not out_fs.isdir(out_root):
            raise OutputError(f"output {shown} is a file; it must be a folder")
        refuse_if_held(out_fs, out_root, url)
        entries = [p for p in out_fs.ls(out_root, detail=False) if p.rstrip("/").rsplit("/", 1)[-1] != LEASE_NAME] \
            if exists else []
    _refuse_nested(out_fs, out_root, shown)
    target = OutputTarget(out_fs, out_root, url, bool(entries))
    if not target.non_empty:
        return target
    if not (config.overwrite or config.resume):
        raise OutputError(f"output {shown} is not empty. Use --overwrite to replace it, "
                          "--resume to finish an interrupted run, or choose another folder.")
    if config.resume and not out_fs.exists(join(out_root, TASKS_DIR, JOB_STATE)):
        raise OutputError(f"--resume refused: {shown} is not empty and was not written by "
                          "clip-nsfw-spark (no _clip_nsfw_tasks/_job.json). Choose another output folder.")
    links = _symlinks(out_fs, out_root)
    if links:
        raise OutputError(f"output {shown} holds symlinks ({_listing(links)}); this tool never writes one and "
                          "would write through them (perhaps into the input). Remove them or choose another "
                          "output folder.")
    if config.overwrite:
        _refuse_foreign(target, shown)
    return target


def written_by_this_tool(fs, root: str) -> bool:
    """Whether the folder holds this tool's state (``_clip_nsfw_tasks/_job.json``) or report."""
    return fs.exists(join(root, TASKS_DIR, JOB_STATE)) or fs.exists(join(root, REPORT_NAME))


def foreign_files(fs, root: str) -> list[str]:
    """Files under ``root`` (relative paths) this tool never writes.

    The tool writes its ``_clip_nsfw*`` files, ``_SUCCESS`` and parquet data files, which keep the input's
    names: a name ending in ``.parquet``/``.parq``/``.pq`` counts as data, any other file is opened and
    counts as data only if it starts with parquet's magic bytes ``PAR1``.
    """
    links = _symlinks(fs, root)
    found = [link + " (a symlink)" for link in links]
    for path in sorted(fs.find(root)):
        rel = path[len(root):].lstrip("/")
        if any(rel == link or rel.startswith(link + "/") for link in links):
            continue
        if rel.split("/", 1)[0].startswith("_clip_nsfw") or rel == SUCCESS_NAME or rel.endswith(_DATA_SUFFIXES):
            continue
        try:
            with fs.open(path, "rb") as handle:
                if handle.read(4) == b"PAR1":
                    continue
        except OSError:
            pass
        found.append(rel)
    return found


def _symlinks(fs, root: str) -> list[str]:
    """Symlinks under a local ``root`` (relative paths, not followed). This tool never writes one: a symlink
    in an output is foreign, and a symlink into the input would make the job write inside the input."""
    if not is_local(fs):
        return []
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            if os.path.islink(os.path.join(dirpath, name)):
                found.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(found)


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _refuse_nested(fs, root: str, shown: str) -> None:
    """Refuse an output inside another output of this tool: reading the outer one would give its rows
    and the inner ones together (and a resume of the outer one would not notice)."""
    parent = root.rstrip("/").rsplit("/", 1)[0] if "/" in root.strip("/") else ""
    with accessing(fs, root, "output"):
        while parent and parent != "/":
            if written_by_this_tool(fs, parent):
                raise OutputError(f"output {shown} is inside {unstrip(fs, parent)}, an output of clip-nsfw-spark: "
                                  "readers of that folder would get both datasets. Choose a folder outside it.")
            parent = parent.rsplit("/", 1)[0] if "/" in parent.strip("/") else ""


def _mount_points(fs, root: str) -> list[str]:
    """Folders under a local ``root`` that are mount points (relative paths): this tool never makes one,
    and deleting through it would delete another filesystem's files (a bind mount of the input …)."""
    if not is_local(fs) or not os.path.isdir(root):
        return []
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        for name in dirnames:
            if os.path.ismount(os.path.join(dirpath, name)):
                found.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(found)


def _refuse_foreign(target: OutputTarget, shown: str) -> None:
    """Refuse to overwrite a folder this tool did not write, or one holding files it does not write."""
    fs, root = target.fs, target.root
    mounts = _mount_points(fs, root)
    if mounts:
        raise OutputError(f"--overwrite refused: output {shown} holds mount points ({_listing(mounts)}); this "
                          "tool never makes one, and removing the output would delete the files of the "
                          "filesystem mounted there. Unmount them or choose another output folder.")
    with accessing(fs, root, "output"):
        if not written_by_this_tool(fs, root):
            names = sorted(p[len(root):].lstrip("/") for p in fs.find(root))
            names = [n for n in names if n != LEASE_NAME]
            raise OutputError(
                f"--overwrite refused: output {shown} was not written by clip-nsfw-spark (it has no "
                f"{TASKS_DIR}/{JOB_STATE} or {REPORT_NAME}); it holds {len(names)} file(s): {_listing(names)}. "
                "Choose a new or empty output folder; if this folder is really meant to be replaced, empty it "
                "yourself first.")
        foreign = foreign_files(fs, root)
    if foreign:
        raise OutputError(
            f"--overwrite refused: output {shown} holds {len(foreign)} file(s) clip-nsfw-spark does not write: "
            f"{_listing(foreign)}. Move them out of the output folder (overwrite removes only this tool's "
            "outputs) or choose another output folder.")


def clear_output(target: OutputTarget) -> None:
    """Remove everything in a validated output folder (``--overwrite``), keeping the folder and the lease.

    Runs only after every validation passed and while this run holds the lease; it checks ownership and
    foreign files again first, since the folder may have changed since ``validate_output``.
    """
    fs, root = target.fs, target.root
    _refuse_foreign(target, target.url)
    log.info("overwrite: removing the previous output in %s", target.url)
    with accessing(fs, root, "output"):
        # What says "complete" goes first: interrupted here, the folder must never look like a finished
        # output (or hold task states whose files are gone), whatever order the store lists names in.
        # _job.json stays: it marks the folder as this tool's, so --resume/--overwrite still accept it.
        for name in (SUCCESS_NAME, REPORT_NAME):
            if fs.exists(join(root, name)):
                fs.rm(join(root, name))
        if fs.exists(join(root, TASKS_DIR)):
            for path in fs.ls(join(root, TASKS_DIR), detail=False):
                if path.rstrip("/").rsplit("/", 1)[-1] != JOB_STATE:
                    fs.rm(path, recursive=True)
        for path in fs.ls(root, detail=False):
            if path.rstrip("/").rsplit("/", 1)[-1] in (LEASE_NAME, TASKS_DIR):
                continue
            if is_local(fs) and os.path.islink(path):
                os.unlink(path)  # the link, never what it points to
            else:
                fs.rm(path, recursive=True)


def check_planned_inputs(plan: Plan, in_fs, target: OutputTarget) -> None:
    """The input as the planner found it must not touch the output, through symlinks either: no file it
    reads may resolve into the output (``--overwrite`` would delete it), and the output may not lie in a
    folder the planner walked (it follows symlinked folders: the output would be written into the input)."""
    if not (is_local(in_fs) and is_local(target.fs)):
        return  # object stores have no symlinks: validate_output's canonical comparison is the whole check
    for task in plan.tasks:
        for path in filter(None, (task.path, task.npy_path)):
            real = os.path.realpath(path)
            if within(in_fs, real, target.fs, target.root):
                raise OutputError(f"input file {path} is {real}, inside the output {target.url} (through a "
                                  "symlink): the output would overwrite its own input. Choose another output folder.")
    for folder in plan.folders:
        if within(target.fs, target.root, in_fs, folder):
            raise OutputError(f"output {target.url} is inside {folder}, a folder of the input (reached through a "
                              "symlink): choose an output folder outside the input; the input is never modified")


def embedding_widths(plan: Plan, in_fs) -> dict[str, int]:
    """The embedding width of each column to score: the npy width (every file checked by the planner), or
    the commonest list length in the first rows of the first parquet file (fixed-size lists: the type's)."""
    first = plan.tasks[0] if plan.tasks else None
    if first is None:
        return {}
    if plan.layout == "laion-npy":
        return {"embedding": plan.npy_width}
    widths = {}
    with in_fs.open(first.path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        for column in plan.embedding_columns:
            for batch in parquet.iter_batches(batch_size=64, columns=[column]):
                values = batch.column(0)
                lengths = np.array([values.type.list_size]) if pa.types.is_fixed_size_list(values.type) \
                    else values.value_lengths().drop_null().to_numpy(zero_copy_only=False)
                if len(lengths):
                    widths[column] = int(np.bincount(lengths).argmax())
                    break
    return widths


@dataclasses.dataclass(frozen=True)
class RunHead:
    """A head as the driver resolved it: what executors need (``payload``) and what the report says."""

    name: str
    sha256: str
    source: str
    dim: int
    score_column: str  # before any per-embedding-column suffix
    threshold: float
    payload: dict


def resolve_heads(config: JobConfig) -> list[RunHead]:
    """Fetch, verify and convert every head of the run once (models.py); read their widths."""
    from .heads import head_defaults
    from .scorer import scorer_from_portable

    heads = []
    for choice in config.choices():
        resolved = prepare_model(choice.model)
        name = canonical_name(choice.model) or resolved.name
        data = resolved.portable.read_bytes()
        column, _ = head_defaults(choice.model)
        heads.append(RunHead(name, resolved.sha256, str(resolved.source), scorer_from_portable(data).dim,
                             choice.score_column or column,
                             float(config.threshold if choice.threshold is None else choice.threshold),
                             {"bytes": data, "sha256": resolved.sha256, "name": name}))
    return heads


def score_targets(config: JobConfig, plan: Plan, heads: list[RunHead]) -> list[tuple[str, list]]:
    """``[(embedding column, [(score column, head index, threshold), …]), …]``: one column per head and
    embedding column. One embedding column: the head's column (``punsafe``, ``pviolence`` or its own);
    several: ``<column>_<embedding column>``; a single head may be named per column by ``score_columns``."""
    several = len(plan.embedding_columns) > 1
    targets = []
    for position, embedding in enumerate(plan.embedding_columns):
        outputs = []
        for index, head in enumerate(heads):
            if config.score_columns:
                name = config.score_columns[position]
            else:
                name = f"{head.score_column}_{embedding}" if several else head.score_column
            outputs.append((name, index, head.threshold))
        targets.append((embedding, outputs))
    return targets


def check_widths(widths: dict[str, int], heads: list[RunHead]) -> None:
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
    for name in added:  # Spark and pyarrow datasets turn key=value folders into columns
        if name in plan.partition_keys:
            raise InputError(f"the input's folders are named {name}=…, which readers of the output turn into a "
                             f"column {name!r}: it would hide or clash with the new column of that name. Name "
                             "the new column differently (--score-column, reason_column)")
    if plan.layout == "laion-npy" and config.write_embeddings:
        added.insert(0, "embedding")
    if row_ids:
        added[:0] = ROW_ID_COLUMNS
    repeated = sorted({name for name in added if added.count(name) > 1})
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


def _check_rows(plan: Plan, stats: list[dict], mode: str, keep: str) -> None:
    """Rows planned = rows read = rows written (+ rows deliberately left out): else fail, naming the task."""
    by_id = {s["task_id"]: s for s in stats}
    for task in plan.tasks:
        s = by_id[task.task_id]
        written, read = s["rows_written"], s["rows_read"]
        rejected, unsafe = s["rows_rejected"], s["rows_unsafe"]
        safe = read - unsafe - rejected
        expected = {"annotate": {"annotated": read}, "scores": {"scores": read},
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

    The output is validated first (``validate_output``, before planning and model conversion), then the
    run holds the output's lease (lease.py) until it ends: another run cannot write the same output.
    """
    target = validate_output(config)
    with RunLease(target.fs, target.root) as lease:
        return _run_job(config, target, lease, runner, progress, io_only)


def _run_job(config: JobConfig, target: OutputTarget, lease: RunLease, runner: Callable | None, progress: bool,
             io_only: bool) -> dict:
    started = time.perf_counter()
    durations = {}
    in_fs, in_root = filesystem(config.input, config.storage_options)
    plan = plan_input(config)
    if config.score_columns and len(config.score_columns) != len(plan.embedding_columns):
        raise ConfigError(f"score_columns {list(config.score_columns)} must name one column per embedding column "
                          f"{list(plan.embedding_columns)}")
    durations["plan"] = time.perf_counter() - started

    t0 = time.perf_counter()
    heads = resolve_heads(config)
    check_widths(embedding_widths(plan, in_fs), heads)
    targets = score_targets(config, plan, heads)
    score_columns = tuple(name for _, outputs in targets for name, _, _ in outputs)
    kept, row_ids = written_columns(plan, config)
    check_output_columns(plan, config, score_columns, kept, row_ids)
    model = {"heads": [head.payload for head in heads], "io_only": io_only}
    durations["model"] = time.perf_counter() - t0

    out_fs, out_root = target.fs, target.root
    check_planned_inputs(plan, in_fs, target)
    if config.overwrite and target.non_empty:
        clear_output(target)
    task_config = config.to_dict() | {
        "output": target.url, "run_id": lease.run_id,  # one canonical spelling; the run tasks commit for
        "layout": plan.layout, "embedding_columns": list(plan.embedding_columns),
        "write_columns": kept, "row_ids": row_ids,
        "score_columns": list(score_columns), "targets": [[e, [list(o) for o in outs]] for e, outs in targets],
        "fault": os.environ.get(FAULT_ENV),  # tests only (see worker.inject_fault)
    }
    # The input in its one canonical spelling: "in/", "./in" and "/abs/in" resume the same run.
    fingerprint = {key: task_config[key] for key in _FINGERPRINT_KEYS} | {
        "input": location(*canonical(config.input, config.storage_options)),
        "heads": [[h.name, h.sha256, h.score_column, h.threshold] for h in heads]}
    with accessing(out_fs, out_root, "output"):
        done, resume_actions = _prepare_state(out_fs, out_root, fingerprint, config.resume, plan, config.mode)
    pending = [task for task in plan.tasks if task.task_id not in done]
    log.info("%d tasks (%d rows) in %s; %d already complete; model %s", len(plan.tasks), plan.total_rows,
             config.input, len(plan.tasks) - len(pending), ", ".join(h.name for h in heads))
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
    lease.check()  # a run that lost its lease must not mark the output complete
    if out_fs.exists(join(out_root, TMP_DIR)):
        out_fs.rm(join(out_root, TMP_DIR), recursive=True)
    durations["total"] = time.perf_counter() - started
    report = build_report(config, task_config, plan, heads, stats, durations,
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
            complete = all(out_fs.exists(join(out_root, rel)) for rel in stats.get("outputs", ()))
            if task is not None and stats.get("source") == task.source and stats.get("rel") == task.rel \
                    and stats.get("outputs") and complete:
                done[task.task_id] = stats
                continue
            # Stale: remove the state file first (the task is then "not done"), then its outputs.
            outputs = stats.get("outputs") or list(output_paths(Task("parquet", "", stats["rel"]), mode).values())
            out_fs.rm(path)
            for rel in outputs:
                if out_fs.exists(join(out_root, rel)):
                    out_fs.rm(join(out_root, rel))
            (actions["rerun_changed"] if task is not None else actions["removed_gone"]).append(stats["rel"])
            if task is not None and not complete:
                log.warning("resume: outputs of %s are missing; running it again", stats["rel"])
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


def build_report(config, task_config, plan, heads: list[RunHead], stats, durations, resumed,
                 resume_actions=None) -> dict:
    """The JSON report: config (secrets redacted), heads, row counts by stream and reason, per-head unsafe
    counts and score histograms, timing. ``model`` describes the first head (as when a run had one)."""
    written: dict[str, int] = {}
    rejected: dict[str, int] = {}
    stages: dict[str, float] = {}
    bins = config.histogram_bins
    histograms = {name: np.zeros(bins, dtype=np.int64) for name in task_config["score_columns"]}
    outside = {name: [0, 0] for name in task_config["score_columns"]}
    flagged = {name: 0 for name in task_config["score_columns"]}
    for s in stats:
        for stream, n in s["rows_written"].items():
            written[stream] = written.get(stream, 0) + n
        for reason, n in s["rejected_by_reason"].items():
            rejected[reason] = rejected.get(reason, 0) + n
        for stage, seconds in s["stage_seconds"].items():
            stages[stage] = stages.get(stage, 0.0) + seconds
        for name in histograms:
            histograms[name] += np.asarray(s["histograms"][name], dtype=np.int64)
            outside[name] = [a + b for a, b in zip(outside[name], s["outside_0_1"][name])]
            flagged[name] += s["unsafe_by_column"][name]
    rows_read = sum(s["rows_read"] for s in stats)
    unsafe = sum(s["rows_unsafe"] for s in stats)
    n_rejected = sum(rejected.values())
    edges = np.linspace(0, 1, bins + 1).round(6).tolist()
    columns_of = {index: [name for _, outputs in task_config["targets"] for name, i, _ in outputs if i == index]
                  for index in range(len(heads))}
    head_reports = []
    for index, head in enumerate(heads):
        spec = REGISTRY.get(canonical_name(head.name) or "")
        head_reports.append({
            "name": head.name, "sha256": head.sha256, "dim": head.dim, "source": head.source,
            "clip_model": spec.clip_model if spec else None, "threshold": head.threshold,
            "score_columns": {name: {"unsafe": flagged[name], "histogram": histograms[name].tolist(),
                                     "below_0": outside[name][0], "above_1": outside[name][1]}
                              for name in columns_of[index]}})
    first = head_reports[0]
    return {
        "status": "succeeded",
        "config": config.redacted() | {k: task_config[k] for k in ("layout", "embedding_columns", "score_columns")},
        "model": {k: first[k] for k in ("name", "sha256", "dim", "source", "clip_model")},
        "heads": head_reports,
        "input": {"layout": plan.layout, "tasks": len(plan.tasks), "rows": plan.total_rows,
                  "skipped_files": len(plan.skipped), "skipped_examples": [f"{p}: {why}" for p, why in plan.skipped[:10]]},
        "rows": {"read": rows_read, "written": written, "unsafe": unsafe, "safe": rows_read - unsafe - n_rejected,
                 "rejected": n_rejected, "rejected_by_reason": rejected,
                 "kept": written.get("kept") if config.mode == "filter" else None},
        "threshold": config.threshold,
        # Every score column together (raw heads' values outside [0, 1] are in the heads' below_0/above_1).
        "score_histogram": {"edges": edges, "counts": sum(histograms.values(), np.zeros(bins, np.int64)).tolist()},
        "durations_seconds": {k: round(v, 3) for k, v in durations.items()},
        "task_stage_seconds": {k: round(v, 3) for k, v in stages.items()},
        "throughput_rows_per_second": round(rows_read / durations["run"], 1) if durations.get("run") else None,
        "tasks_resumed": resumed,
        "resume": resume_actions,
        "worker_max_rss_mb": max((s.get("worker_max_rss_mb", 0) for s in stats), default=0),
    }
