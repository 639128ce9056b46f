"""The output folder's safety: validate it before any work, and clear only what this tool wrote.

``validate_output`` runs first (before planning and model conversion) and deletes nothing;
``clear_output`` (``--overwrite``) runs after every validation passed, while the run holds the output's
lease; ``check_planned_inputs`` checks, once the input is planned, that no input file or folder reaches
into the output through a symlink. Paths are compared in their canonical spelling (storage.canonical).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Any, Callable

from clip_nsfw_spark.driver.config import JobConfig
from clip_nsfw_spark.errors import OutputError
from clip_nsfw_spark.storage.lease import LEASE_NAME, refuse_if_held
from clip_nsfw_spark.driver.planner import Plan
from clip_nsfw_spark.storage.filesystem import (RunStores, accessing, exists_fresh, find_fresh, is_local, join,
                                                 kind_fresh, list_fresh, open_run_stores, read_many_fresh, remove,
                                                 renames_atomically, unstrip, within)
from clip_nsfw_spark.executor.writer import (FOOTERS_STATE, JOB_STATE, MANIFEST_DIR, REJECTED_DIR, REPORT_NAME,
                                             SUCCESS_NAME, TASKS_DIR, TMP_DIR, output_paths)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class OutputTarget:
    """The output folder after validation: ``fs`` and its canonical ``root`` (``storage.canonical``), the
    canonical ``url`` every process writes to, and whether it held anything besides a lease (``non_empty``)."""

    fs: Any
    root: str
    url: str
    non_empty: bool


def validate_output(config: JobConfig, stores: RunStores | None = None) -> OutputTarget:
    """Check the output folder before any work, deleting nothing: the first step of ``run_job``.

    Refuses: an output that is the input, lies inside it or contains it (compared in canonical form, so no
    spelling, symlink or ``file://`` aliases them); a file; a folder another live run is writing (its lease);
    a non-empty folder without ``overwrite``/``resume``; ``resume`` on a folder this tool did not write; and
    ``overwrite`` of a folder this tool did not write, or that holds files it does not write (see
    ``foreign_files``). ``stores``: the run's filesystems, opened once (``open_run_stores``).
    """
    stores = stores or open_run_stores(config.input, config.output, config.storage_options)
    out_fs, out_paths = stores.out_fs, stores.out_paths
    in_fs, in_paths = stores.in_fs, stores.in_paths
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
        kind = kind_fresh(out_fs, out_root)  # not isdir(): on S3 that lists the whole top level
        exists = kind is not None
        if exists and kind != "directory":
            raise OutputError(f"output {shown} is a file; it must be a folder")
        refuse_if_held(out_fs, out_root, url)
        # A resume's own state shows the folder is not empty without listing its top level (100,000 files).
        ours = exists and config.resume and exists_fresh(out_fs, join(out_root, TASKS_DIR, JOB_STATE))
        # Hidden names (.gitkeep, .DS_Store …) are no data to any reader, nor to the resume's foreign-file check:
        # a folder holding only them is empty here too (they stay as they are).
        non_empty = ours or (exists and any(name != LEASE_NAME and not name.startswith(".")
                                            for name in (p.rstrip("/").rsplit("/", 1)[-1]
                                                         for p in list_fresh(out_fs, out_root))))
    target = OutputTarget(out_fs, out_root, url, non_empty)
    # A resume looks below once it holds the lease, in the listing its state is judged from (job._prepare_state):
    # listing 100,000 tasks' files on S3 takes a minute.
    refuse_nested_runs(target, shown, look_below=target.non_empty and not config.resume)
    if not target.non_empty:
        return target
    if not (config.overwrite or config.resume):
        raise OutputError(f"output {shown} is not empty. Use --overwrite to replace it, "
                          "--resume to finish an interrupted run, or choose another folder.")
    if config.resume and not ours:
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
    return exists_fresh(fs, join(root, TASKS_DIR, JOB_STATE)) or exists_fresh(fs, join(root, REPORT_NAME))


def read_by_spark(rel: str) -> bool:
    """Whether a reader of the output folder (Spark, and the readers that follow its rules) would take the
    file at ``rel`` as data: no part of its path starts with ``_`` or ``.`` (but ``_rejected``, this tool's
    stream, and ``_name=value`` partition folders count as data)."""
    parts = rel.split("/")
    return bool(rel) and all(not part.startswith((".", "_")) or (i == 0 and part == REJECTED_DIR)
                             or (part.startswith("_") and "=" in part) for i, part in enumerate(parts))


TASK_RECORD = re.compile(r"[0-9a-f]{20}\.json")  # a task state's or manifest's name: its task id
BATCH_RECORD = re.compile(r"_batch-[0-9a-f]{20}\.json")  # the states of several tasks (writer.batch_state_name)
_ASIDE = r"_clip_nsfw_aside\.[0-9a-f]{12}\.[^/]+"
_TOOL_NAMES = re.compile("|".join([
    re.escape(SUCCESS_NAME), re.escape(REPORT_NAME), re.escape(LEASE_NAME) + r"(\.(stale-)?[0-9a-f]{16})?", _ASIDE,
    re.escape(TASKS_DIR) + r"/(" + re.escape(JOB_STATE) + "|" + re.escape(FOOTERS_STATE)
    + r"|(_batch-)?[0-9a-f]{20}\.json|" + _ASIDE + ")",
    re.escape(MANIFEST_DIR) + r"/([0-9a-f]{20}\.json|" + _ASIDE + ")",
    re.escape(TMP_DIR) + r"/.+"]))


def tool_name(rel: str) -> bool:
    """Whether ``rel`` is one of the names this tool writes for itself: ``_SUCCESS``, the report, the lease
    (and its aside names), task states, manifests, temp and aside files, by their exact patterns. A user's
    ``_clip_nsfw_report.json.bak`` is not one (it is hidden, so left alone)."""
    return _TOOL_NAMES.fullmatch(rel) is not None


def records(fs, root: str) -> dict[str, dict]:
    """Every manifest (``_clip_nsfw_files/<task>.json``) and task state (``_clip_nsfw_tasks/<task>.json``)
    under ``root`` that parses, by path; read together (concurrently on object stores). A damaged one is
    left out: the files it named are then not known to be this tool's."""
    names = [path for folder in (MANIFEST_DIR, TASKS_DIR) for path in list_fresh(fs, join(root, folder))
             if TASK_RECORD.fullmatch(path.rsplit("/", 1)[-1])] if exists_fresh(fs, root) else []
    found = {}
    for path, data in read_many_fresh(fs, names).items():
        if isinstance(data, FileNotFoundError):
            continue
        if isinstance(data, Exception):
            raise data
        try:
            value = json.loads(data)
        except ValueError:
            continue
        if isinstance(value, dict):
            found[path] = value
    return found


def recorded_files(found: dict[str, dict]) -> set[str]:
    """The relative paths that manifests and task states (``records``) name as this tool's outputs."""
    return {rel for value in found.values() for rel in (value.get("files") or value.get("outputs") or ())
            if isinstance(rel, str)}


def ownership(fs, root: str) -> tuple[set[str], set[str]]:
    """``(owned, existing)``: the relative paths manifests and task states name as this tool's outputs,
    and the relative paths of every file under ``root`` now (one listing)."""
    return recorded_files(records(fs, root)), {path[len(root):].lstrip("/") for path in find_fresh(fs, root)}


def foreign_files(fs, root: str, owned: set[str], existing: set[str]) -> list[str]:
    """Files of ``existing`` (relative paths, see ``ownership``) that a reader of the output would take as
    data and that no manifest or task state of this tool names (``owned``), plus symlinks. Ownership is
    what the tool recorded, never guessed from a name or a suffix: ``my_reference/labels.parquet`` is
    foreign. Hidden files (``.x``, ``_x``) are not read as data: they are not foreign, and nothing removes
    them either."""
    links = _symlinks(fs, root)
    found = [link + " (a symlink)" for link in links]
    for rel in sorted(existing):
        if any(rel == link or rel.startswith(link + "/") for link in links):
            continue
        if tool_name(rel) or rel in owned or not read_by_spark(rel):
            continue
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
    """Refuse an output inside another output of this tool, finished or being written (its state, report
    or lease, live or stale): reading the outer one would give its rows and the inner ones together, and
    neither run's report would count the other's rows."""
    parent = root.rstrip("/").rsplit("/", 1)[0] if "/" in root.strip("/") else ""
    with accessing(fs, root, "output"):
        while parent and parent != "/":
            what = "an output of clip-nsfw-spark" if written_by_this_tool(fs, parent) else \
                "a folder another clip-nsfw-spark run is writing (it holds its lease)" \
                if exists_fresh(fs, join(parent, LEASE_NAME)) else None
            if what:
                raise OutputError(f"output {shown} is inside {unstrip(fs, parent)}, {what}: readers of that folder "
                                  "would get both datasets. Choose a folder outside it.")
            parent = parent.rsplit("/", 1)[0] if "/" in parent.strip("/") else ""


def nested_outputs(fs, root: str, listing=None) -> list[str]:
    """Folders under ``root`` (relative paths) that are outputs of this tool or held by a run's lease, at
    any depth: found by their ``_clip_nsfw_lease.json``, ``_clip_nsfw_report.json`` or
    ``_clip_nsfw_tasks/_job.json``. ``root``'s own files are not counted. ``listing``: the paths under
    ``root`` if already listed."""
    found = set()
    for path in find_fresh(fs, root) if listing is None else listing:
        rel = path[len(root):].lstrip("/")
        folder, _, name = rel.rpartition("/")
        if folder.endswith(TASKS_DIR) and name == JOB_STATE:
            folder = folder[: -len(TASKS_DIR)].rstrip("/")
        elif name not in (LEASE_NAME, REPORT_NAME):
            continue
        if folder and not folder.split("/", 1)[0].startswith("_clip_nsfw"):
            found.add(folder)
    return sorted(found)


def refuse_nested_runs(target: OutputTarget, shown: str | None = None, look_below: bool = True,
                       listing=None) -> None:
    """Refuse an output with another output of this tool (or a run's lease) above or below it, at any
    depth. Run again once this run holds its lease: two runs started together on ``out`` and ``out/sub``
    then see each other's lease (at least one of them refuses), where ``validate_output`` alone could
    let both through. ``look_below=False`` skips the listing (an output folder that was empty);
    ``listing`` (the paths under the output) is looked in instead of listing it again.
    """
    fs, root, shown = target.fs, target.root, shown or target.url
    _refuse_nested(fs, root, shown)
    with accessing(fs, root, "output"):
        inner = nested_outputs(fs, root, listing) if look_below else []
    if inner:
        raise OutputError(f"output {shown} holds other clip-nsfw-spark outputs or runs ({_listing(inner)}): "
                          "readers of it would get both datasets, and neither report would count the other's "
                          "rows. Choose an output folder that holds no other output, or move them out.")


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


def _refuse_foreign(target: OutputTarget, shown: str) -> tuple[set[str], set[str]]:
    """Refuse to overwrite a folder this tool did not write, or one holding files it does not write;
    return its ``ownership`` (what was read to decide)."""
    fs, root = target.fs, target.root
    mounts = _mount_points(fs, root)
    if mounts:
        raise OutputError(f"--overwrite refused: output {shown} holds mount points ({_listing(mounts)}); this "
                          "tool never makes one, and removing the output would delete the files of the "
                          "filesystem mounted there. Unmount them or choose another output folder.")
    with accessing(fs, root, "output"):
        if not written_by_this_tool(fs, root):
            names = sorted(p[len(root):].lstrip("/") for p in find_fresh(fs, root))
            names = [n for n in names if n != LEASE_NAME]
            raise OutputError(
                f"--overwrite refused: output {shown} was not written by clip-nsfw-spark (it has no "
                f"{TASKS_DIR}/{JOB_STATE} or {REPORT_NAME}); it holds {len(names)} file(s): {_listing(names)}. "
                "Choose a new or empty output folder; if this folder is really meant to be replaced, empty it "
                "yourself first.")
        owned, existing = ownership(fs, root)
        foreign = foreign_files(fs, root, owned, existing)
    if foreign:
        raise OutputError(
            f"--overwrite refused: output {shown} holds {len(foreign)} file(s) that no manifest of clip-nsfw-spark "
            f"names: {_listing(foreign)}. Readers of the output would take them as data, and overwrite removes "
            "only the files this tool recorded writing. Move them out of the output folder (or rename them to "
            "start with '_' or '.') or choose another output folder.")
    return owned, existing


def clear_output(target: OutputTarget, fence: Callable[[str], None]) -> None:
    """Remove this tool's files from a validated output folder (``--overwrite``), keeping the folder, the
    lease and ``_job.json``.

    Removes exactly: ``_SUCCESS`` and the report first (interrupted, the folder never looks complete),
    the task states, the files manifests and task states name, then the manifests and the tool's temp
    and aside files. A file nothing names is left alone (validation refused the run if a reader would
    take it as data). Runs only after every validation passed and while this run holds the lease; it
    checks ownership and foreign files again first, since the folder may have changed since
    ``validate_output``. ``fence(step)`` raises unless the run still holds its lease
    (lease.RunLease.fence): called before every removal, so a run paused here and woken after another
    run took the output over stops without deleting anything.
    """
    fs, root = target.fs, target.root
    owned, existing = _refuse_foreign(target, target.url)  # read once: what it checked is what goes
    fence("clearing the output for --overwrite")
    log.info("overwrite: removing the previous output in %s", target.url)
    with accessing(fs, root, "output"):
        # What says "complete" goes first, then the states (a task without one is "not done"), then data.
        # _job.json stays: it marks the folder as this tool's, so --resume/--overwrite still accept it.
        states = sorted(rel for rel in existing if rel.startswith(TASKS_DIR + "/") and tool_name(rel)
                        and rel != f"{TASKS_DIR}/{JOB_STATE}")
        data = sorted(rel for rel in owned & existing if not tool_name(rel))
        own = sorted(rel for rel in existing if tool_name(rel) and rel != LEASE_NAME
                     and not rel.startswith(TASKS_DIR + "/") and rel not in (SUCCESS_NAME, REPORT_NAME))
        for rel in [name for name in (SUCCESS_NAME, REPORT_NAME) if name in existing] + states + data + own:
            fence(f"removing {rel}")
            remove(fs, join(root, rel))
        _remove_empty_folders(fs, root, {rel.rsplit("/", 1)[0] for rel in data + own if "/" in rel})


def _remove_empty_folders(fs, root: str, folders: set[str]) -> None:
    """Remove the folders (relative, and their parents up to ``root``) that the removals left empty, on
    stores with real folders; object stores have none to remove."""
    if not renames_atomically(fs):
        return
    parents = {"/".join(f.split("/")[:i]) for f in folders for i in range(1, f.count("/") + 2)}
    for folder in sorted(parents, key=lambda f: f.count("/"), reverse=True):
        try:
            if not fs.ls(join(root, folder), detail=False):
                fs.rmdir(join(root, folder))
        except (FileNotFoundError, OSError):
            pass


S3_KEY_BYTES = 1024  # the longest object key S3 (and MinIO, SeaweedFS …) accept


def check_output_names(plan: Plan, target: OutputTarget, mode: str) -> None:
    """Refuse, at planning, output names the output's store cannot hold: on a local disk a path part
    longer than its NAME_MAX bytes (255 on ext4/xfs) or a path longer than PATH_MAX; on an object store
    a key over 1,024 bytes. Found when the first task commits, a long name would fail a run hours in."""
    fs, root = target.fs, target.root
    if is_local(fs):
        existing = root
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        name_max, path_max = os.pathconf(existing, "PC_NAME_MAX"), os.pathconf(existing, "PC_PATH_MAX")
    for task in plan.tasks:
        for rel in output_paths(task.rel, mode).values():
            path = join(root, rel)
            if is_local(fs):
                part = max(rel.split("/"), key=lambda p: len(p.encode()))
                problem = (f"its name part {part[:60]}… is {len(part.encode())} bytes, over this filesystem's "
                           f"{name_max}" if len(part.encode()) > name_max else
                           f"the path is {len(path.encode())} bytes, over this system's {path_max}"
                           if len(path.encode()) >= path_max else None)
            else:
                key = path.split("/", 1)[1] if "/" in path else ""
                problem = f"its key is {len(key.encode())} bytes, over the {S3_KEY_BYTES} an object store accepts" \
                    if len(key.encode()) > S3_KEY_BYTES else None
            if problem:
                raise OutputError(f"the output file for input {task.rel} would be {unstrip(fs, path)[:120]}…: "
                                  f"{problem}. Choose a shorter output folder, or rename the input files.")


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
