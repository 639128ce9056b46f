"""The driver's planner: turn an input URL into a list of small, independent, serialisable tasks.

(reader.py is its counterpart on executors: a task → batches of rows.)

A task is one slice of one input file: whole row groups of a parquet file (at most ``rows_per_task``
rows, unless one row group is larger), a whole small parquet file planned from its listing alone
(``planned_from_listing``: many files on an object store; its task counts its rows), or a row range of a
LAION ``img_emb_N.npy`` file with the same rows of its ``metadata_N.parquet``. Tasks hold only strings and
integers, so they cross to Spark executors as plain data; the executor opens the files itself (pyarrow +
fsspec).

Naming rules (no two tasks may ever write the same file, see ``_check_unique``):

* a path that exists is taken literally, even when it holds glob characters (``data[1]/``, ``what?/``);
  only a path that does not exist is expanded as a glob;
* output names are input paths relative to a root that every input shares: the folder itself, the
  parent of a single file, or the part of a glob before its first wildcard component
  (``in/sub?/*.parquet`` → ``in``, so ``sub1/part.parquet`` and ``sub2/part.parquet`` stay apart);
* parquet files are ``.parquet``, ``.parq``, ``.pq`` or extension-less (Hadoop part files); other
  visible files are skipped and reported; ``_``/``.`` files and folders are ignored, as Spark does;
* a task records the identity of what it reads (size, modification time or ETag, and when its footer was
  read on the driver its row count and a footer digest), so that a resume can tell a changed input from a
  finished one.
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import gzip
import hashlib
import io
import itertools
import json
import logging
import os
import re
import threading
import time
from stat import S_ISREG
from typing import Collection

import pyarrow as pa
import pyarrow.parquet as pq

from clip_nsfw_spark.driver.config import JobConfig
from clip_nsfw_spark.scoring.embeddings import is_embedding_type
from clip_nsfw_spark.errors import ConfigError, InputError
from clip_nsfw_spark.contract import ESTIMATED_BYTES_PER_ROW, ROWS_FROM_FOOTER, Task
from clip_nsfw_spark.executor.reader import WHOLE_FILE_BYTES, npy_header, schema_problem, unreadable_footer
from clip_nsfw_spark.executor.writer import JOB_STATE, SUCCESS_NAME, TASKS_DIR
from clip_nsfw_spark.storage.lease import LEASE_NAME
from clip_nsfw_spark.storage.s3_listing import find_in_ranges, sample_every
from clip_nsfw_spark.storage.filesystem import (RunStores, accessing, canonical, canonical_path, filesystem, glob_root,
                                                is_local, join, location, unstrip)

log = logging.getLogger(__name__)
PARQUET_EXTENSIONS = (".parquet", ".parq", ".pq")
# Footers and npy headers are read this many at a time on a remote store, where each is one request whose
# latency (~20 ms on S3) would dominate: then the S3 client's CPU bounds it (docs/scale.md).
PLAN_THREADS = 32
# Above this many footers to read on a remote store, a run on Spark reads them in Spark tasks of
# FOOTERS_PER_SPARK_TASK each (as Spark's own parallel partition discovery does above
# spark.sql.sources.parallelPartitionDiscovery.threshold): the driver's one process, bound by the S3 client's
# CPU (~120-300 footers/s on 2 vCPUs), is not what plans 100,000 files; a cluster's cores are.
EXECUTOR_PLANNING_FILES = 5000
FOOTERS_PER_SPARK_TASK = 1000
PLAN_LOG_SECONDS = 10.0
# Above this many files on an object store, small files are planned from their listing, without reading their
# footers (planned_from_listing): the footers of 100,000 files cost ~270 s of the driver's S3 client CPU
# on 2 vCPUs, their listing ~10 s. Below it, every footer is read on the driver as before, so that a file of
# another schema is refused before anything is written (above it, by the task that reads it).
LISTING_PLAN_FILES = 1000
# A footer is read as one ranged GET of the file's last FOOTER_TAIL bytes (pyarrow's own first footer read;
# a second GET only for a larger footer), FOOTER_BATCH files per batched call of an async store's client
# (s3fs, gcsfs: coroutines on its event loop, PLAN_THREADS in flight, no file objects): 2.5 times less
# client CPU per footer than opening each file, which is what bounds planning on S3 (docs/scale.md). A batch's
# tails are held together: 256 × 64 KiB = 16 MiB.
FOOTER_TAIL = 64 * 1024
FOOTER_BATCH = 256
NPY_NUMBER = re.compile(r"(\d+)\.npy$")
PARQUET_NUMBER = re.compile(r"(\d+)\.(?:parquet|parq|pq)$")
# Table formats whose folders hold files of removed versions: listing their files would read stale rows.
TABLE_FORMAT_MARKERS = {"_delta_log": "Delta", ".hoodie": "Hudi"}


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the driver learnt: the tasks, the columns to score, the common schema, what was skipped.

    ``skipped`` holds ``(path, why)`` for every visible file that is not read (never silently);
    ``widths`` the embedding width found in each npy file (laion-npy) for the dimension check;
    ``npy_value_type`` the type the npy values are written as (``write_embeddings``): the widest, exact for all;
    ``total_rows`` the rows of the tasks whose rows are known (all but the ``listed`` ones).
    """

    tasks: tuple[Task, ...]
    layout: str
    embedding_columns: tuple[str, ...]
    schema: pa.Schema
    total_rows: int
    skipped: tuple[tuple[str, str], ...] = ()
    npy_width: int | None = None
    npy_value_type: str | None = None  # laion-npy: the widest value type of the npy files (float16/32/64)
    folders: tuple[str, ...] = ()  # local folders walked (real paths, symlinked ones included)
    partition_keys: tuple[str, ...] = ()  # hive ``key=value`` folder keys: readers make them columns
    footers: dict = dataclasses.field(default_factory=dict, repr=False)  # {path: Footer | Listed}: see footer_cache
    footers_changed: bool = True  # whether ``footers`` differ from the ``known`` ones planned from
    schema_of: str = ""  # the file ``schema`` was read from, as the user spells it
    listed: int = 0  # tasks planned from the listing (rows ROWS_FROM_FOOTER): not counted in ``total_rows``


def _is_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def _hidden(rel: str) -> bool:
    """Spark's rule: ``.x`` and ``_x`` are hidden, but not ``_key=value`` (a hive partition folder)."""
    return any(part.startswith(".") or (part.startswith("_") and "=" not in part) for part in rel.split("/") if part)


def _is_parquet_name(path: str, suffixes: tuple[str, ...] = ()) -> bool:
    """Parquet's usual names, Spark's suffix-less part files, and the extra ``suffixes`` asked for."""
    name = path.rsplit("/", 1)[-1].lower()
    return name.endswith(PARQUET_EXTENSIONS + tuple(s.lower() for s in suffixes)) or "." not in name


def _refuse_unfinished_outputs(fs, base: str, entries: dict, allow: bool, own_output: str | None = None) -> None:
    """An output of this tool that is not finished (its state folder or lease without ``_SUCCESS``) is
    refused as input unless ``allow``: it holds some of its rows, and a run over it would look complete.
    ``own_output`` (a ``storage.location``) is this run's output, reached through a symlink of the input:
    not an input's unfinished output but the output inside the input, which the driver refuses as such."""
    outputs = set()
    for path in entries:
        rel = path[len(base):].lstrip("/")
        parts = rel.split("/")
        for i, part in enumerate(parts):
            if part in (TASKS_DIR, LEASE_NAME):
                outputs.add("/".join([base.rstrip("/")] + parts[:i]) if i else base.rstrip("/"))
    unfinished = sorted(folder for folder in outputs if f"{folder}/{SUCCESS_NAME}" not in entries
                        and location(fs, canonical_path(fs, folder)) != own_output)
    if not allow and not unfinished:  # a part of an output (its safe/, a glob or a file of it): look above
        folder = base.rstrip("/")
        while folder and folder not in ("/", "."):
            tool_output = fs.exists(f"{folder}/{TASKS_DIR}/{JOB_STATE}") or fs.exists(f"{folder}/{LEASE_NAME}")
            if tool_output and not fs.exists(f"{folder}/{SUCCESS_NAME}") \
                    and location(fs, canonical_path(fs, folder)) != own_output:
                unfinished = [folder]
                break
            if "/" not in folder.strip("/") or (not is_local(fs) and folder.count("/") == 0):
                break
            folder = folder.rsplit("/", 1)[0]
    if unfinished and not allow:
        raise InputError(f"input {unstrip(fs, unfinished[0])} is an unfinished output of clip-nsfw-spark (it has "
                         "its state or lease but no _SUCCESS): it holds only some of its rows. Finish that run "
                         "(--resume) first, or pass --allow-incomplete-input to score what is there.")


def file_identity(info: dict, extra: str = "") -> str:
    """A short digest of what identifies a file's content without reading it: size, and the
    modification time or ETag that the store reports (plus ``extra``, e.g. a footer digest)."""
    return hashlib.sha1(f"{info.get('size')}|{_version(info) or ''}|{extra}".encode()).hexdigest()[:20]


def _version(info: dict) -> str | None:
    """The version a listing gives a file (ETag, or a modification or creation time), or None."""
    return next((str(info[key]) for key in ("ETag", "etag", "mtime", "LastModified", "last_modified",
                                            "modified", "created") if info.get(key) is not None), None)


def _footer_digest(meta: pq.FileMetaData, schema: pa.Schema | None = None) -> str:
    groups = ",".join(f"{meta.row_group(i).num_rows}:{meta.row_group(i).total_byte_size}"
                      for i in range(meta.num_row_groups))
    schema = meta.schema.to_arrow_schema() if schema is None else schema
    return hashlib.sha1(f"{meta.num_rows}|{groups}|{schema}".encode()).hexdigest()[:20]


def _walk_local(root: str, folders: set | None = None) -> dict[str, dict]:
    """Files under a local folder, following symlinked folders (a loop is an error) → {path: info}.
    The real path of every folder walked is added to ``folders``."""
    found, seen = {}, set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            raise InputError(f"{folder} leads back to {real} (a symlink loop); remove the loop and run again")
        seen.add(real)
        if folders is not None:
            folders.add(real)
        dirs.sort()
        for name in files:
            path = os.path.join(folder, name)
            stat = os.stat(path)  # follows symlinks: the identity of what is read
            # a FIFO, socket or device is listed, never opened (reading a FIFO blocks until a writer comes)
            kind = "file" if S_ISREG(stat.st_mode) else "other"
            found[path] = {"name": path, "size": stat.st_size, "mtime": stat.st_mtime_ns, "type": kind}
    return found


def _find_files(fs, root: str, folders: set | None = None, expected: Collection[str] = ()) -> dict[str, dict]:
    """The files under ``root`` with their listing info; ``expected`` (the last plan's files, on a resume)
    lets an S3 listing run in key ranges at once (``s3_listing.find_in_ranges``, from a sample of them)."""
    if is_local(fs):
        return _walk_local(root, folders)
    step = sample_every(len(expected))
    found = find_in_ranges(fs, root, itertools.islice(expected, 0, None, step), step) if expected else None
    if found is None:
        found = fs.find(root, detail=True)
    return {path: info for path, info in found.items() if info.get("type") != "directory"}


def _table_format(fs, folder: str) -> str | None:
    """The table format whose metadata ``folder`` holds (Delta, Hudi, Iceberg), or None."""
    for marker, name in TABLE_FORMAT_MARKERS.items():
        if fs.isdir(join(folder, marker)):
            return f"a {name} table ({marker}/)"
    metadata = join(folder, "metadata")
    if fs.isdir(metadata) and any(p.endswith(".metadata.json") for p in fs.ls(metadata, detail=False)):
        return "an Iceberg table (metadata/*.metadata.json)"
    return None


def _refuse_table_formats(fs, root: str, paths) -> None:
    """Refuse to list a table format's files: its folders also hold files of removed versions. Checked for
    the input folder, every folder above it (a Delta partition folder) and every folder listed."""
    folders, folder = [], root.rstrip("/")
    while folder and folder not in ("/", "."):
        folders.append(folder)
        parent = folder.rsplit("/", 1)[0] if "/" in folder.strip("/") else ""
        folder = "/" if folder.startswith("/") and parent == "" else parent
    hits = [(f, _table_format(fs, f)) for f in folders]
    hits += [(p.split(f"/{marker}/")[0], f"a {name} table ({marker}/)") for p in paths
             for marker, name in TABLE_FORMAT_MARKERS.items() if f"/{marker}/" in p]
    for folder, what in hits:
        if what:
            raise InputError(
                f"{unstrip(fs, folder)} is {what}: its folders also hold files of removed versions, so reading "
                f"{unstrip(fs, root)} file by file would score stale or duplicated rows. Export the current "
                "version to plain parquet (e.g. spark.read.format(…).load(…).write.parquet(…)) and score that.")


def list_parquet_files(fs, root: str, folders: set | None = None, suffixes: tuple[str, ...] = (),
                       allow_incomplete: bool = False, own_output: str | None = None,
                       expected: Collection[str] = ()) -> tuple[dict[str, dict], str, list[tuple[str, str]]]:
    """Parquet files under ``root`` (a file, folder tree or glob) → ``({path: info}, base, skipped)``.

    ``base`` is the root the output names are relative to; ``skipped`` lists visible files that are
    not parquet, with the reason. Paths that exist are taken literally, before any glob expansion.
    ``suffixes`` are read as parquet too (``input_suffixes``); an unfinished output of this tool is
    refused unless ``allow_incomplete``. ``expected``: files the caller expects (a resume's last plan):
    on S3 they let the listing of a folder run in ranges at once.
    """
    if fs.exists(root):
        if fs.isfile(root):
            entries, base = {root: fs.info(root)}, root.rsplit("/", 1)[0]
            _refuse_unfinished_outputs(fs, base, entries, allow_incomplete, own_output)
            return entries, base, []
        entries, base = _find_files(fs, root, folders, expected), root
    elif _is_glob(root):
        base = glob_root(root)
        entries = {}
        try:
            matched = fs.glob(root, detail=True)
        except ValueError as err:
            raise InputError(f"input {unstrip(fs, root)} is not a valid glob: {err}") from err
        for path, info in sorted(matched.items()):
            if info.get("type") == "directory":
                entries.update(_find_files(fs, path, folders))  # a matched folder: everything under it
            else:
                entries[path] = info
    else:
        raise InputError(f"input {unstrip(fs, root)} does not exist. Check the path (and the storage "
                         "options/credentials for remote storage).")
    _refuse_table_formats(fs, base, entries)
    _refuse_unfinished_outputs(fs, base, entries, allow_incomplete, own_output)
    files, skipped = {}, []
    for path in sorted(entries):
        rel = path[len(base):].lstrip("/")
        if _hidden(rel):
            continue
        if entries[path].get("type") not in (None, "file"):
            skipped.append((path, f"not a regular file ({entries[path].get('type')})"))
        elif _is_parquet_name(path, suffixes):
            files[path] = entries[path]
        else:
            suffix = "." + path.rsplit("/", 1)[-1].rsplit(".", 1)[-1]
            skipped.append((path, f"skipped for its suffix {suffix} (read: {', '.join(PARQUET_EXTENSIONS + suffixes)} "
                                  f"and names without one; --input-suffix {suffix} reads it as parquet)"))
    if not files:
        what = f" ({len(skipped)} other files skipped, e.g. {skipped[0][0]})" if skipped else ""
        raise InputError(f"no parquet files found under {unstrip(fs, root)}{what}")
    return files, base, skipped


def detect_layout(fs, root: str, config: JobConfig) -> str:
    if config.layout != "auto":
        return config.layout
    if fs.isdir(join(root, config.embeddings_dir)):  # not isdir(root): on S3 that lists its whole top level
        return "laion-npy"
    return "parquet"


def _concurrently(fs, function, items: list, what: str) -> list:
    """``[function(item) for item in items]``, in order, ``PLAN_THREADS`` at a time on a remote store (one
    after the other on a local disk, where nothing waits); a progress line every ``PLAN_LOG_SECONDS``. The
    first error in item order is raised, as the loop would."""
    if is_local(fs) or len(items) < 2 or PLAN_THREADS < 2:
        return [function(item) for item in items]
    lock, started, done, last = threading.Lock(), time.monotonic(), [0], [time.monotonic()]

    def one(item):
        result = function(item)
        with lock:
            done[0] += 1
            now = time.monotonic()
            if now - last[0] >= PLAN_LOG_SECONDS:
                last[0] = now
                log.info("planning: %s of %s %s read (%.0f/s)", f"{done[0]:,}", f"{len(items):,}", what,
                         done[0] / (now - started))
        return result

    with concurrent.futures.ThreadPoolExecutor(max_workers=PLAN_THREADS) as pool:
        return list(pool.map(one, items))


@dataclasses.dataclass(frozen=True)
class Footer:
    """What the planner takes from a parquet footer, and the listing identity of the file it was read from
    (``file_identity`` without extra): all a resume needs to plan the file again without reading it."""

    identity: str
    num_rows: int
    group_rows: tuple[int, ...]
    digest: str  # _footer_digest: part of the tasks' source
    schema: pa.Schema


def _footer(info: dict, meta: pq.FileMetaData) -> Footer:
    schema = meta.schema.to_arrow_schema()
    return Footer(file_identity(info), meta.num_rows,
                  tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups)), _footer_digest(meta, schema),
                  schema)


FOOTER_CACHE_VERSION = 1


def _schema_text(schema: pa.Schema) -> str:
    """A schema as base64 Arrow IPC (JSON-safe); ``_schema_of`` reads it back."""
    return base64.b64encode(schema.serialize().to_pybytes()).decode()


def _schema_of(text: str) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text)))


def _encode_footer(footer: Footer) -> list:
    return [footer.identity, footer.num_rows, list(footer.group_rows), footer.digest, _schema_text(footer.schema)]


def _decode_footer(value: list) -> Footer:
    identity, rows, groups, digest, schema = value
    return Footer(identity, rows, tuple(groups), digest, _schema_of(schema))


def read_footers_here(input_url: str, storage_options: dict, items: list) -> list[dict]:
    """The footers of ``items`` (``(path, listing info)``) read in this process (``read_footers``): what a
    Spark task runs when the footers are read on executors. ``[{"footer": …} | {"error": message}]``, in
    order (``footers_from_executors`` decodes them)."""
    fs, _ = filesystem(input_url, storage_options)
    found = read_footers(fs, dict(items), [path for path, _ in items])
    return [{"error": str(footer)} if isinstance(footer, InputError) else {"footer": _encode_footer(footer)}
            for footer in found]


def footers_from_executors(results: list[dict], paths: list[str]) -> dict:
    """``read_footers_here``'s results for ``paths`` → ``{path: Footer}``; the first file's error (in path
    order, as when read here) is raised."""
    for path, result in zip(paths, results, strict=True):
        if "error" in result:
            raise InputError(result["error"])
    return {path: _decode_footer(result["footer"]) for path, result in zip(paths, results)}


@dataclasses.dataclass(frozen=True)
class Listed:
    """A file the last plan planned from its listing (``planned_from_listing``), with its listing identity."""

    identity: str


def footer_cache(footers: dict) -> bytes:
    """``{path: Footer | Listed}`` as gzipped JSON (each distinct schema once, as Arrow IPC): stored with the
    output's state so that a resume re-plans unchanged files from their listing alone, and plans each file
    the way it was planned before (``read_footer_cache``). Listed files are an optional ``listed`` key that
    a reader of only ``files`` ignores."""
    schemas, files, listed = {}, {}, {}
    for path, footer in footers.items():
        if isinstance(footer, Listed):
            listed[path] = footer.identity
            continue
        text = _schema_text(footer.schema)
        key = hashlib.sha1(text.encode()).hexdigest()[:20]
        schemas.setdefault(key, text)
        files[path] = [footer.identity, footer.num_rows, list(footer.group_rows), footer.digest, key]
    document = {"version": FOOTER_CACHE_VERSION, "schemas": schemas, "files": files, "listed": listed}
    return gzip.compress(json.dumps(document).encode(), 1)


def read_footer_cache(data: bytes) -> dict:
    """``footer_cache``'s bytes → ``{path: Footer | Listed}``; ``{}`` for anything damaged or of another
    version (the footers are then read again, and files are planned by the rule for a new output: a file
    planned otherwise before runs again, see ``planned_from_listing``)."""
    try:
        value = json.loads(gzip.decompress(data))
        if value.get("version") != FOOTER_CACHE_VERSION:
            return {}
        schemas = {key: _schema_of(text) for key, text in value["schemas"].items()}
        found: dict = {path: Listed(identity) for path, identity in (value.get("listed") or {}).items()
                       if isinstance(identity, str)}
        return found | {path: Footer(identity, int(rows), tuple(int(n) for n in groups), digest, schemas[key])
                        for path, (identity, rows, groups, digest, key) in value["files"].items()
                        if isinstance(identity, str) and isinstance(digest, str) and sum(groups) == rows}
    except Exception:  # noqa: BLE001 - any damage: read the footers again
        return {}


def _read_footer(fs, path: str) -> pq.FileMetaData:
    try:
        with fs.open(path, "rb") as handle:
            return pq.ParquetFile(handle).metadata
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for corrupt files
        raise _unreadable(fs, path, err) from err


def _unreadable(fs, path: str, err: BaseException) -> InputError:
    return unreadable_footer(unstrip(fs, path), err)


def read_footers(fs, files: dict, paths: list[str]) -> list:
    """The ``Footer`` of each of ``paths`` (``files``: ``{path: listing info}``), in order; an unreadable
    file gives its ``InputError`` in its place (the caller raises the first, in path order).

    A local disk reads them one after the other (nothing waits); an async store's client reads each as one
    ranged GET of its tail, FOOTER_BATCH files per batched call (``_footers_batched``); other stores open
    the files PLAN_THREADS at a time. A progress line every PLAN_LOG_SECONDS."""

    def one(path):
        try:
            return _footer(files[path], _read_footer(fs, path))
        except InputError as err:
            return err

    sizes_known = all(isinstance(files[path].get("size"), int) for path in paths)
    if getattr(fs, "async_impl", False) and sizes_known and len(paths) > 1:
        found, started = [], time.monotonic()
        for begin in range(0, len(paths), FOOTER_BATCH):
            found += _footers_batched(fs, files, paths[begin:begin + FOOTER_BATCH])
            if time.monotonic() - started >= PLAN_LOG_SECONDS and len(found) < len(paths):
                log.info("planning: %s of %s parquet footers read (%.0f/s)", f"{len(found):,}", f"{len(paths):,}",
                         len(found) / (time.monotonic() - started))
        return found
    return _concurrently(fs, one, paths, "parquet footers")


def _footers_batched(fs, files: dict, paths: list[str]) -> list:
    """``read_footers`` on an async store: one batched call for the tails, a second for footers longer than
    FOOTER_TAIL (rare: thousands of columns)."""
    sizes = [files[path]["size"] for path in paths]
    starts = [max(0, size - FOOTER_TAIL) for size in sizes]
    tails: list = [b""] * len(paths)  # an empty file is not asked for (a range 0..-1 would fetch it whole)
    asked = [i for i, size in enumerate(sizes) if size > 0]
    for i, tail in zip(asked, fs.cat_ranges([paths[i] for i in asked], [starts[i] for i in asked],
                                            [sizes[i] for i in asked], batch_size=PLAN_THREADS, on_error="return")):
        tails[i] = tail
    longer = [i for i, tail in enumerate(tails) if isinstance(tail, bytes) and _footer_start(sizes[i], tail) < starts[i]]
    if longer:
        starts_longer = [_footer_start(sizes[i], tails[i]) for i in longer]
        more = fs.cat_ranges([paths[i] for i in longer], starts_longer, [sizes[i] for i in longer],
                             batch_size=PLAN_THREADS, on_error="return")
        for i, start, tail in zip(longer, starts_longer, more):
            tails[i], starts[i] = tail, start
    found = []
    for path, size, start, tail in zip(paths, sizes, starts, tails):
        try:
            if not isinstance(tail, bytes):
                raise tail if isinstance(tail, BaseException) else OSError(f"read {type(tail).__name__}")
            if len(tail) != size - start:  # changed since it was listed: what is read would not be this file
                raise ValueError(f"{size - start} bytes expected at offset {start}, {len(tail)} read: the file "
                                 "changed while the input was listed")  # the file's account, not the store's
            found.append(_footer(files[path], pq.ParquetFile(_FileTail(size, tail)).metadata))
        except Exception as err:  # noqa: BLE001 - the store's and pyarrow's many error types, as _read_footer
            found.append(_changed_since_listed(fs, path, size) or _unreadable(fs, path, err))
    return found


def _changed_since_listed(fs, path: str, size: int) -> InputError | None:
    """An InputError if ``path`` no longer has the ``size`` it was listed with (rewritten while planning: its
    tail read was of another file), else None."""
    try:
        fs.invalidate_cache(path)
        now = fs.info(path).get("size")
    except FileNotFoundError:
        now = None
    except Exception:  # noqa: BLE001 - cannot tell: the read's own error is reported
        return None
    if now == size:
        return None
    what = "was removed" if now is None else f"now has {now:,} bytes"
    return InputError(f"input file {unstrip(fs, path)} changed while the input was planned: it was listed with "
                      f"{size:,} bytes and {what}. Run again once nothing writes to the input.")


def _footer_start(size: int, tail: bytes) -> int:
    """Where the footer whose last bytes are ``tail`` (the end of a file of ``size`` bytes) begins; ``size``
    when the tail does not end with a footer length and magic (pyarrow then says what is wrong)."""
    if len(tail) < 8 or tail[-4:] != b"PAR1":
        return size
    return max(0, size - 8 - int.from_bytes(tail[-8:-4], "little"))


class _FileTail(io.RawIOBase):
    """A read-only file of ``size`` bytes of which only the last ``len(tail)`` are held: what pyarrow reads
    to parse a footer (a read before the tail is refused, not answered with zeros)."""

    def __init__(self, size: int, tail: bytes):
        super().__init__()
        self._size, self._tail, self._offset, self._position = size, tail, size - len(tail), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._position = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence] + offset
        return self._position

    def readinto(self, buffer) -> int:
        if self._position >= self._size:
            return 0
        if self._position < self._offset:
            raise OSError(f"byte {self._position} is before the {len(self._tail)} bytes read of the file's end")
        data = self._tail[self._position - self._offset:self._position - self._offset + len(buffer)]
        buffer[:len(data)] = data
        self._position += len(data)
        return len(data)


def choose_embedding_columns(schema: pa.Schema, config: JobConfig, where: str) -> tuple[str, ...]:
    names = schema.names
    if config.embedding_columns:
        for column in config.embedding_columns:
            if column not in names:
                raise InputError(f"embedding column {column!r} not found in {where}; columns found: "
                                 f"{', '.join(names)}")
            if not is_embedding_type(schema.field(column).type):
                raise InputError(f"column {column!r} in {where} is {schema.field(column).type}, expected a list "
                                 "of float16/float32/float64 (list, large_list or fixed_size_list)")
        return tuple(config.embedding_columns)
    candidates = [f.name for f in schema if is_embedding_type(f.type)]
    if len(candidates) == 1:
        return (candidates[0],)
    if not candidates:
        raise InputError(f"no embedding column (a list of floats) in {where}; columns found: "
                         f"{', '.join(f'{f.name} ({f.type})' for f in schema)}. Name one with --embedding-column.")
    raise InputError(f"several list-of-float columns in {where}: {', '.join(candidates)}. Choose with "
                     "--embedding-column (one or several).")


def plan(config: JobConfig, known: dict | None = None, read_remotely=None, stores: RunStores | None = None) -> Plan:
    """Discover the input and cut it into tasks. Reads only footers/headers, never data.

    ``known`` (``{path: Footer}``, from ``read_footer_cache``) spares the footer reads of files whose listing
    identity (size, modification time or ETag) is the one recorded: a resume of 100,000 files lists them
    instead of reading 100,000 footers. ``read_remotely(input, storage_options, [(path, info)])`` (the Spark
    runner's ``read_footers``) reads them on executors when there are more than EXECUTOR_PLANNING_FILES
    to read on a remote store. ``stores``: the run's filesystems, opened once (a planning-only call opens
    the input here)."""
    if stores is None:
        fs, root = filesystem(config.input, config.storage_options)
        output = _output_location(config)
    else:
        fs, root, output = stores.in_fs, stores.in_root, stores.out_location
    with accessing(fs, root):
        return _plan(fs, root, config, known or {}, read_remotely, output)


def _output_location(config: JobConfig) -> str | None:
    """This run's output as ``storage.location`` (None when it cannot be named: a planning-only call)."""
    try:
        return location(*canonical(config.output, config.storage_options))
    except Exception:  # noqa: BLE001 - an output the driver cannot open is reported by validate_output
        return None


def _plan(fs, root: str, config: JobConfig, known: dict, read_remotely=None, output: str | None = None) -> Plan:
    layout = detect_layout(fs, root, config)
    if layout == "laion-npy":
        result = _plan_laion(fs, root, config)
    else:
        folders: set = set()
        files, base, skipped = list_parquet_files(fs, root, folders, config.input_suffixes,
                                                  config.allow_incomplete_input, output, expected=known)
        tasks, schema, first, total = [], None, None, 0
        footers = {path: known[path] for path, info in files.items() if isinstance(known.get(path), Footer)
                   and known[path].identity == file_identity(info)}
        listed = planned_from_listing(fs, files, known, config.rows_per_task, config.read_every_footer)
        unread = [path for path in files if path not in footers and path not in listed]
        if listed and next(iter(files)) in listed:  # its footer is read anyway, for the plan's schema alone
            schema, first = _first_schema(fs, files)
        if listed:
            log.info("planning: %s of %s files planned from their listing (small files on a remote store: each "
                     "task reads its footer, counts its rows and checks its schema)", f"{len(listed):,}",
                     f"{len(files):,}")
        if footers:
            log.info("planning: %s of %s footers known from the output's last plan", f"{len(footers):,}",
                     f"{len(files):,}")
        if read_remotely is not None and len(unread) > EXECUTOR_PLANNING_FILES and not is_local(fs):
            log.info("planning: reading %s footers in Spark tasks of %s", f"{len(unread):,}", FOOTERS_PER_SPARK_TASK)
            results = read_remotely(config.input, config.storage_options, [(path, files[path]) for path in unread])
            footers |= footers_from_executors(results, unread)
        else:
            found = read_footers(fs, files, unread)
            for footer in found:
                if isinstance(footer, InputError):
                    raise footer
            footers |= dict(zip(unread, found))
        for path, info in files.items():
            rel = path[len(base):].lstrip("/") or path.rsplit("/", 1)[-1]
            if path in listed:
                tasks.append(Task("parquet", path, rel, rows=ROWS_FROM_FOOTER, source=file_identity(info, "listing"),
                                  size=_size(info)))
                continue
            footer = footers[path]
            schema, first = _same_schema(fs, schema, first, path, footer.schema)
            source = file_identity(info, footer.digest)
            tasks.extend(_slice_row_groups(path, rel, footer.group_rows, config.rows_per_task, source,
                                           _size(info)))
            total += footer.num_rows
        columns = choose_embedding_columns(schema, config, unstrip(fs, first))
        keys = sorted({part.split("=", 1)[0] for task in tasks for part in task.rel.split("/")[:-1] if "=" in part})
        listed_now = {path: Listed(file_identity(files[path])) for path in sorted(listed)}
        known_listed = {path: k for path, k in known.items() if isinstance(k, Listed)}
        known_footers = len(known) - len(known_listed)
        result = Plan(tuple(tasks), layout, columns, schema, total, tuple(skipped), folders=tuple(sorted(folders)),
                      partition_keys=tuple(keys), footers=footers | listed_now, schema_of=unstrip(fs, first),
                      listed=len(listed),  # footers ⊆ known unless read
                      footers_changed=bool(unread) or len(footers) != known_footers or listed_now != known_listed)
    _check_unique(fs, result.tasks)
    return result


def planned_from_listing(fs, files: dict[str, dict], known: dict, rows_per_task: int,
                         read_every_footer: bool = False) -> set[str]:
    """The files planned from their listing alone, without reading their footers, on an object store (an
    async fsspec store: s3fs, gcsfs, adlfs), among the files that qualify: 1 to
    ``listing_task_bytes(rows_per_task)`` bytes, a version (ETag or modification time) in their listing.

    Each file is planned as the output's last plan planned it (``known``, from ``read_footer_cache``), so
    that a resume never reruns a task for a change of planning: a file it listed (``Listed``) that still
    qualifies is planned from its listing, a file whose footer it kept (``Footer``, whether or not it still
    matches) from its footer. Files new to the output: above LISTING_PLAN_FILES files, all that qualify but
    the first (whose footer gives the plan its schema), unless ``read_every_footer``. A
    100,000-file plan then costs its listing (~100 requests) instead of 100,000 footer GETs. Each such task
    reads its file whole in one ranged GET (reader.open_parquet: one version of the object, its size checked
    against the listing), footer included, and checks its schema (docs/scale.md)."""
    if not getattr(fs, "async_impl", False):
        return set()
    bound = listing_task_bytes(rows_per_task)

    def qualifies(info: dict) -> bool:
        return 0 < _size(info) <= bound and _version(info) is not None

    listed = {path for path, how in known.items()
              if isinstance(how, Listed) and path in files and qualifies(files[path])}
    if read_every_footer or len(files) <= LISTING_PLAN_FILES:
        return listed
    first = next(iter(files))
    return listed | {path for path, info in files.items() if path != first and path not in known and qualifies(info)}


def _first_schema(fs, files: dict) -> tuple[pa.Schema, str]:
    """The first file's schema and path (its footer read for the schema alone: the file is planned from its
    listing)."""
    first = next(iter(files))
    footer, = read_footers(fs, files, [first])
    if isinstance(footer, InputError):
        raise footer
    return _same_schema(fs, None, None, first, footer.schema)


def listing_task_bytes(rows_per_task: int) -> int:
    """The largest file planned from its listing: one its task reads whole in one request
    (reader.WHOLE_FILE_BYTES), and small enough that it cannot hold more than ``rows_per_task`` rows of the
    narrowest embedding a head takes (ESTIMATED_BYTES_PER_ROW: a file of embeddings that compress would be
    one larger task, never a lost row)."""
    return min(WHOLE_FILE_BYTES, rows_per_task * ESTIMATED_BYTES_PER_ROW)


def _check_unique(fs, tasks) -> None:
    """No two tasks may write the same output: that would lose rows while every task reports success."""
    owners: dict[str, Task] = {}
    for task in tasks:
        other = owners.setdefault(task.rel, task)
        if other is not task:
            raise InputError(f"{unstrip(fs, other.path)} and {unstrip(fs, task.path)} would both be written as "
                             f"{task.rel!r}; score them in separate runs or rename one of them")


def _same_schema(fs, schema, first, path, file_schema: pa.Schema) -> tuple[pa.Schema, str]:
    """The dataset's schema so far (taken from the first file); raise if ``path``'s schema differs."""
    problem = schema_problem(unstrip(fs, path), file_schema, None if first is None else unstrip(fs, first), schema)
    if problem:
        raise InputError(problem)
    return (file_schema, path) if schema is None else (schema, first)


def _stem(rel: str) -> str:
    lower = rel.lower()
    for extension in PARQUET_EXTENSIONS:
        if lower.endswith(extension):
            return rel[: -len(extension)]
    return rel


def _size(info: dict) -> int:
    """A listing's size in bytes, -1 when the store gave none."""
    size = info.get("size")
    return size if isinstance(size, int) and size >= 0 else -1


def _slice_row_groups(path: str, rel: str, group_rows: tuple[int, ...], rows_per_task: int,
                      source: str, size: int = -1) -> list[Task]:
    groups, current, rows = [], [], 0
    for index, n in enumerate(group_rows):
        if current and rows + n > rows_per_task:
            groups.append(current)
            current, rows = [], 0
        current.append(index)
        rows += n
    if current or not groups:
        groups.append(current)
    counts = [sum(group_rows[i] for i in group) for group in groups]
    if len(groups) == 1:  # the task reads the whole file: its size lets a reader fetch it in one request
        return [Task("parquet", path, rel, tuple(groups[0]), rows=counts[0], source=source, size=size)]
    return [Task("parquet", path, f"{_stem(rel)}.slice-{i:05d}.parquet", tuple(g), rows=n, source=source)
            for i, (g, n) in enumerate(zip(groups, counts))]


def _numbered(fs, folder: str, pattern: re.Pattern, what: str) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """``{number as written: path}`` of the files in ``folder`` whose name matches ``pattern``.

    Files pair up by the number exactly as written: ``img_emb_0`` goes with ``metadata_0``, never with
    ``metadata_00``. Two files whose numbers are equal as integers but written differently are ambiguous.
    """
    numbered, skipped, by_value = {}, [], {}
    for path in sorted(fs.ls(folder, detail=False)):
        name = path.rsplit("/", 1)[-1]
        if name.startswith(("_", ".")):  # hidden, macOS ._ files, _SUCCESS …
            continue
        match = pattern.search(name)
        if not match:
            skipped.append((path, f"not a {what} file"))
            continue
        number = match.group(1)
        other = by_value.setdefault(int(number), path)
        if other != path:
            raise InputError(f"{unstrip(fs, other)} and {unstrip(fs, path)} have the same number written "
                             "differently: files pair up by their exact number; remove or rename one")
        numbered[number] = path
    return numbered, skipped


def _plan_laion(fs, root: str, config: JobConfig) -> Plan:
    emb_dir, meta_dir = join(root, config.embeddings_dir), join(root, config.metadata_dir)
    if config.embedding_columns:  # the embeddings are the npy rows: a named column would be silently ignored
        raise ConfigError(f"embedding_columns {list(config.embedding_columns)} name parquet columns; in the LAION "
                          f"layout the embeddings are the rows of {config.embeddings_dir}/*.npy. Leave "
                          "--embedding-column out, or pass --layout parquet to score a column of the parquet files")
    if not fs.isdir(meta_dir):
        has = (f"has {config.embeddings_dir}/ but no {config.metadata_dir}/ folder" if fs.isdir(emb_dir)
               else f"has neither an {config.embeddings_dir}/ nor a {config.metadata_dir}/ folder")
        raise InputError(f"{unstrip(fs, root)} {has} (the LAION layout); set "
                         "embeddings_dir/metadata_dir if your mirror names them differently, or --layout parquet")
    npys, skipped = _numbered(fs, emb_dir, NPY_NUMBER, ".npy")
    for path in sorted(fs.ls(root, detail=False)):  # text_emb/, stray files … are not read: say so
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name not in (config.embeddings_dir, config.metadata_dir) and not name.startswith(("_", ".")):
            skipped.append((path, f"not read in the LAION layout (only {config.embeddings_dir}/ and "
                                  f"{config.metadata_dir}/ are)"))
    metas, skipped_meta = _numbered(fs, meta_dir, PARQUET_NUMBER, "parquet")
    skipped += skipped_meta
    for number in sorted(set(npys) ^ set(metas), key=lambda n: (int(n), n)):
        has, lacks = ((npys[number], config.metadata_dir) if number in npys else (metas[number], config.embeddings_dir))
        near = [n for n in (metas if number in npys else npys) if int(n) == int(number)]
        hint = f" (a file numbered {near[0]!r} is there: numbers must be written the same way)" if near else ""
        raise InputError(f"{unstrip(fs, has)} has no partner file number {number} in {lacks}/{hint}: embeddings and "
                         "metadata must pair up row for row")
    if not npys:
        raise InputError(f"no img_emb_N.npy files in {unstrip(fs, emb_dir)}")
    def probe(number: str):
        npy_info, meta_info = fs.info(npys[number]), fs.info(metas[number])
        shape, dtype, _ = npy_header(fs, npys[number], npy_info.get("size"))
        return npy_info, meta_info, shape, dtype, _read_footer(fs, metas[number])

    tasks, schema, first, total, width, width_file, itemsize = [], None, None, 0, None, None, 0
    numbers = sorted(npys, key=lambda n: (int(n), n))
    probes = _concurrently(fs, probe, numbers, "npy/metadata pairs")
    for number, (npy_info, meta_info, shape, dtype, meta) in zip(numbers, probes):
        itemsize = max(itemsize, dtype.itemsize)
        if width is None:
            width, width_file = shape[1], npys[number]
        elif shape[1] != width:
            raise InputError(f"{unstrip(fs, npys[number])} holds {shape[1]}-d embeddings but {unstrip(fs, width_file)} "
                             f"holds {width}-d: one run scores one embedding width")
        if meta.num_rows != shape[0]:
            raise InputError(f"{unstrip(fs, npys[number])} has {shape[0]} rows but {unstrip(fs, metas[number])} has "
                             f"{meta.num_rows}: they must align row for row")
        schema, first = _same_schema(fs, schema, first, metas[number], meta.schema.to_arrow_schema())
        source = file_identity(meta_info, _footer_digest(meta)) + ":" + file_identity(npy_info, str(shape))
        name = metas[number].rsplit("/", 1)[-1]
        starts = list(range(0, shape[0], config.rows_per_task)) or [0]
        for i, start in enumerate(starts):
            stop = min(start + config.rows_per_task, shape[0])
            rel = name if len(starts) == 1 else f"{_stem(name)}.slice-{i:05d}.parquet"
            tasks.append(Task("laion-npy", metas[number], rel, (), start, stop, npys[number], stop - start, source,
                              _size(meta_info) if len(starts) == 1 else -1))  # size: read whole (open_parquet)
        total += shape[0]
    value_type = {2: "float16", 4: "float32", 8: "float64"}[itemsize]
    return Plan(tuple(tasks), "laion-npy", ("embedding",), schema, total, tuple(skipped), width, value_type)
