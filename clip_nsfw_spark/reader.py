"""Input discovery and planning: turn an input URL into a list of small, independent, serialisable tasks.

A task is one slice of one input file: whole row groups of a parquet file (at most ``rows_per_task``
rows, unless one row group is larger), or a row range of a LAION ``img_emb_N.npy`` file with the same
rows of its ``metadata_N.parquet``. Tasks hold only strings and integers, so they cross to Spark
executors as plain data; the executor opens the files itself (pyarrow + fsspec).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .config import JobConfig
from .embeddings import is_embedding_type
from .errors import InputError
from .storage import accessing, filesystem, join, unstrip

NPY_PATTERN = re.compile(r"(\d+)\.npy$")
PARQUET_NUMBER = re.compile(r"(\d+)\.parquet$")


@dataclasses.dataclass(frozen=True)
class Task:
    """One unit of work. ``rel`` is the output name relative to the output root (deterministic)."""

    kind: str  # "parquet" | "laion-npy"
    path: str  # the parquet file (data or metadata) in the input filesystem's terms
    rel: str
    row_groups: tuple[int, ...] = ()  # parquet: the row groups of this slice
    row_start: int = 0  # laion-npy: rows [row_start, row_stop) of both files
    row_stop: int = 0
    npy_path: str = ""

    @property
    def task_id(self) -> str:
        return hashlib.sha1(self.rel.encode()).hexdigest()[:20]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Task":
        data = dict(data)
        data["row_groups"] = tuple(data.get("row_groups") or ())
        return cls(**data)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the driver learnt: the tasks, the columns to score, the common schema."""

    tasks: tuple[Task, ...]
    layout: str
    embedding_columns: tuple[str, ...]
    schema: pa.Schema
    total_rows: int


def _is_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def _visible(rel: str) -> bool:
    return not any(part.startswith(("_", ".")) for part in rel.split("/"))


def list_parquet_files(fs, root: str) -> tuple[list[str], str]:
    """Parquet files under ``root`` (a file, folder tree or glob), sorted; and the base for relative names."""
    if _is_glob(root):
        files = sorted(p for p in fs.glob(root) if fs.isfile(p))
        base = root.split("*")[0].rsplit("/", 1)[0]
    elif fs.isfile(root):
        return [root], root.rsplit("/", 1)[0]
    elif fs.isdir(root):
        files = sorted(p for p in fs.find(root) if _visible(p[len(root):].lstrip("/")))
        base = root
    else:
        raise InputError(f"input {unstrip(fs, root)} does not exist. Check the path (and the storage "
                         "options/credentials for remote storage).")
    files = [p for p in files if p.endswith(".parquet") or "." not in p.rsplit("/", 1)[-1]]
    if not files:
        raise InputError(f"no parquet files found under {unstrip(fs, root)}")
    return files, base


def detect_layout(fs, root: str, config: JobConfig) -> str:
    if config.layout != "auto":
        return config.layout
    if not _is_glob(root) and fs.isdir(root) and fs.isdir(join(root, config.embeddings_dir)):
        return "laion-npy"
    return "parquet"


def _read_footer(fs, path: str) -> pq.FileMetaData:
    try:
        with fs.open(path, "rb") as handle:
            return pq.ParquetFile(handle).metadata
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for corrupt files
        raise InputError(f"cannot read parquet file {unstrip(fs, path)}: {err}. The file is truncated or not "
                         "parquet; fix or remove it and run again.") from err


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


def plan(config: JobConfig) -> Plan:
    """Discover the input and cut it into tasks. Reads only footers/headers, never data."""
    fs, root = filesystem(config.input, config.storage_options)
    with accessing(fs, root):
        return _plan(fs, root, config)


def _plan(fs, root: str, config: JobConfig) -> Plan:
    layout = detect_layout(fs, root, config)
    if layout == "laion-npy":
        return _plan_laion(fs, root, config)
    files, base = list_parquet_files(fs, root)
    tasks, schema, first, total = [], None, None, 0
    for path in files:
        meta = _read_footer(fs, path)
        schema, first = _same_schema(fs, schema, first, path, meta)
        rel = path[len(base):].lstrip("/") or path.rsplit("/", 1)[-1]
        tasks.extend(_slice_row_groups(path, rel, meta, config.rows_per_task))
        total += meta.num_rows
    columns = choose_embedding_columns(schema, config, unstrip(fs, first))
    return Plan(tuple(tasks), layout, columns, schema, total)


def _same_schema(fs, schema, first, path, meta) -> tuple[pa.Schema, str]:
    """The dataset's schema so far (taken from the first file); raise if ``path``'s schema differs."""
    file_schema = meta.schema.to_arrow_schema()
    if schema is None:
        return file_schema, path
    if not file_schema.remove_metadata().equals(schema.remove_metadata()):
        raise InputError(_schema_difference(fs, first, schema, path, file_schema))
    return schema, first


def _schema_difference(fs, first, schema, path, other) -> str:
    mine, theirs = {f.name: f.type for f in schema}, {f.name: f.type for f in other}
    changes = [f"{n}: {mine.get(n, 'missing')} vs {theirs.get(n, 'missing')}"
               for n in dict.fromkeys(list(mine) + list(theirs)) if mine.get(n) != theirs.get(n)]
    return (f"the schema of {unstrip(fs, path)} differs from {unstrip(fs, first)} ({'; '.join(changes) or 'field order'}). "
            "All input files must share one schema: score them in separate runs or rewrite them.")


def _slice_row_groups(path: str, rel: str, meta: pq.FileMetaData, rows_per_task: int) -> list[Task]:
    groups, current, rows = [], [], 0
    for index in range(meta.num_row_groups):
        n = meta.row_group(index).num_rows
        if current and rows + n > rows_per_task:
            groups.append(current)
            current, rows = [], 0
        current.append(index)
        rows += n
    if current or not groups:
        groups.append(current)
    if len(groups) == 1:
        return [Task("parquet", path, rel, tuple(groups[0]))]
    stem = rel[: -len(".parquet")] if rel.endswith(".parquet") else rel
    return [Task("parquet", path, f"{stem}.slice-{i:05d}.parquet", tuple(g)) for i, g in enumerate(groups)]


def _npy_header(fs, path: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data offset of a .npy file, reading only its header."""
    with fs.open(path, "rb") as handle:
        try:
            version = np.lib.format.read_magic(handle)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(handle)
        except ValueError as err:
            raise InputError(f"{unstrip(fs, path)} is not a valid .npy file: {err}") from err
        offset = handle.tell()
    if fortran or len(shape) != 2:
        raise InputError(f"{unstrip(fs, path)} must hold a C-ordered 2-D array (rows × dim); found shape {shape}")
    return shape, dtype, offset


def _plan_laion(fs, root: str, config: JobConfig) -> Plan:
    emb_dir, meta_dir = join(root, config.embeddings_dir), join(root, config.metadata_dir)
    if not fs.isdir(meta_dir):
        raise InputError(f"{unstrip(fs, root)} has {config.embeddings_dir}/ but no {config.metadata_dir}/ folder; "
                         "set metadata_dir if your mirror names it differently")
    npys = {int(m.group(1)): p for p in fs.ls(emb_dir, detail=False) if (m := NPY_PATTERN.search(p))}
    metas = {int(m.group(1)): p for p in fs.ls(meta_dir, detail=False) if (m := PARQUET_NUMBER.search(p))}
    for number in sorted(set(npys) ^ set(metas)):
        has, lacks = ((npys[number], config.metadata_dir) if number in npys else (metas[number], config.embeddings_dir))
        raise InputError(f"{unstrip(fs, has)} has no partner file number {number} in {lacks}/: embeddings and "
                         "metadata must pair up row for row")
    if not npys:
        raise InputError(f"no img_emb_N.npy files in {unstrip(fs, emb_dir)}")
    tasks, schema, first, total = [], None, None, 0
    for number in sorted(npys):
        shape, _, _ = _npy_header(fs, npys[number])
        meta = _read_footer(fs, metas[number])
        if meta.num_rows != shape[0]:
            raise InputError(f"{unstrip(fs, npys[number])} has {shape[0]} rows but {unstrip(fs, metas[number])} has "
                             f"{meta.num_rows}: they must align row for row")
        schema, first = _same_schema(fs, schema, first, metas[number], meta)
        name = metas[number].rsplit("/", 1)[-1]
        stem = name[: -len(".parquet")]
        starts = list(range(0, shape[0], config.rows_per_task)) or [0]
        for i, start in enumerate(starts):
            stop = min(start + config.rows_per_task, shape[0])
            rel = name if len(starts) == 1 else f"{stem}.slice-{i:05d}.parquet"
            tasks.append(Task("laion-npy", metas[number], rel, (), start, stop, npys[number]))
        total += shape[0]
    return Plan(tuple(tasks), "laion-npy", ("embedding",), schema, total)


def read_npy_rows(fs, path: str, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a 2-D .npy file, reading only those bytes."""
    shape, dtype, offset = _npy_header(fs, path)
    row_bytes = shape[1] * dtype.itemsize
    with fs.open(path, "rb") as handle:
        handle.seek(offset + start * row_bytes)
        data = handle.read((stop - start) * row_bytes)
    if len(data) != (stop - start) * row_bytes:
        raise InputError(f"{unstrip(fs, path)} is truncated: expected {shape[0]} rows of {shape[1]} {dtype}")
    return np.frombuffer(data, dtype=dtype).reshape(stop - start, shape[1])
