"""The output folder's safety: validate it before any work, and clear only what this tool wrote.

``validate_output`` runs first (before planning and model conversion) and deletes nothing;
``clear_output`` (``--overwrite``) runs after every validation passed, while the run holds the output's
lease; ``check_planned_inputs`` checks, once the input is planned, that no input file or folder reaches
into the output through a symlink. Paths are compared in their canonical spelling (storage.canonical).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

from clip_nsfw_spark.driver.config import JobConfig
from clip_nsfw_spark.errors import OutputError
from clip_nsfw_spark.storage.lease import LEASE_NAME, refuse_if_held
from clip_nsfw_spark.driver.planner import PARQUET_EXTENSIONS, Plan
from clip_nsfw_spark.storage.filesystem import (accessing, exists_fresh, find_fresh, is_local, join, list_fresh, locations,
                                                 remove, unstrip, within)
from clip_nsfw_spark.executor.writer import JOB_STATE, REPORT_NAME, SUCCESS_NAME, TASKS_DIR

log = logging.getLogger(__name__)


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
        exists = exists_fresh(out_fs, out_root)
        if exists and not out_fs.isdir(out_root):
            raise OutputError(f"output {shown} is a file; it must be a folder")
        refuse_if_held(out_fs, out_root, url)
        entries = [p for p in list_fresh(out_fs, out_root) if p.rstrip("/").rsplit("/", 1)[-1] != LEASE_NAME] \
            if exists else []
    _refuse_nested(out_fs, out_root, shown)
    target = OutputTarget(out_fs, out_root, url, bool(entries))
    if not target.non_empty:
        return target
    if not (config.overwrite or config.resume):
        raise OutputError(f"output {shown} is not empty. Use --overwrite to replace it, "
                          "--resume to finish an interrupted run, or choose another folder.")
    if config.resume and not exists_fresh(out_fs, join(out_root, TASKS_DIR, JOB_STATE)):
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


def foreign_files(fs, root: str) -> list[str]:
    """Files under ``root`` (relative paths) this tool never writes.

    The tool writes its ``_clip_nsfw*`` files, ``_SUCCESS`` and parquet data files, which keep the input's
    names: a name ending in ``.parquet``/``.parq``/``.pq`` counts as data, any other file is opened and
    counts as data only if it starts with parquet's magic bytes ``PAR1``.
    """
    links = _symlinks(fs, root)
    found = [link + " (a symlink)" for link in links]
    for path in sorted(find_fresh(fs, root)):
        rel = path[len(root):].lstrip("/")
        if any(rel == link or rel.startswith(link + "/") for link in links):
            continue
        if rel.split("/", 1)[0].startswith("_clip_nsfw") or rel == SUCCESS_NAME or rel.endswith(PARQUET_EXTENSIONS):
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
            names = sorted(p[len(root):].lstrip("/") for p in find_fresh(fs, root))
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
            if exists_fresh(fs, join(root, name)):
                remove(fs, join(root, name))
        if exists_fresh(fs, join(root, TASKS_DIR)):
            for path in list_fresh(fs, join(root, TASKS_DIR)):
                if path.rstrip("/").rsplit("/", 1)[-1] != JOB_STATE:
                    remove(fs, path, recursive=True)
        for path in list_fresh(fs, root):
            if path.rstrip("/").rsplit("/", 1)[-1] in (LEASE_NAME, TASKS_DIR):
                continue
            remove(fs, path, recursive=True)  # a symlink: the link, never what it points to


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
