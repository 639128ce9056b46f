"""A task's outputs: their names and schemas, which rows go to which stream, and atomic parquet files.

The output folder holds, besides the data files: ``_clip_nsfw_tmp/`` (files being written, under a
random name), ``_clip_nsfw_tasks/`` (one state file per completed task, and ``_job.json``), the report,
``_SUCCESS`` and, while a run writes, its lease (lease.py). A data file appears under its final name
only when complete; a task's state file is written after all its files are.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import uuid
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clip_nsfw_spark.contract import TaskConfig
from clip_nsfw_spark.errors import LeaseLostError, LeaseUnreadableError
from clip_nsfw_spark.executor.stages import StageClock, TimedFile
from clip_nsfw_spark.scoring.outcomes import MODE_STREAMS, Stream
from clip_nsfw_spark.parquet.splice import SplicedParquetWriter, leaf_paths
from clip_nsfw_spark.scoring.batch import set_column
from clip_nsfw_spark.scoring.embeddings import is_embedding_type
from clip_nsfw_spark.storage.filesystem import join, rename_file, renames_atomically

TMP_DIR = "_clip_nsfw_tmp"
TASKS_DIR = "_clip_nsfw_tasks"
MANIFEST_DIR = "_clip_nsfw_files"  # <task_id>.json per task: the final names it commits, written first
JOB_STATE = "_job.json"
FOOTERS_STATE = "_footers.json.gz"  # the last plan's parquet footers (planner.footer_cache), for a resume


def batch_state_name(task_ids) -> str:
    """The name, in TASKS_DIR, of the file that holds the states of several tasks completed together (one
    Spark task's): ``_batch-<20 hex>.json``, the same for the same tasks (a retried Spark task rewrites it)."""
    return f"_batch-{hashlib.sha1(','.join(sorted(task_ids)).encode()).hexdigest()[:20]}.json"
REPORT_NAME = "_clip_nsfw_report.json"
SUCCESS_NAME = "_SUCCESS"
REJECTED_DIR = "_rejected"
ROW_ID_COLUMNS = ("source_file", "row_index")
# Schema metadata a writer stored about the input's columns, which the outputs' columns no longer match:
# Spark reads its own stored schema instead of the file's, and would not see the score columns at all.
FOREIGN_SCHEMA_KEYS = (b"org.apache.spark.sql.parquet.row.metadata",)


def output_paths(rel: str, mode: str) -> dict[Stream, str]:
    """Relative output file per stream for a task's ``rel`` (rejected rows only exist in filter/split)."""
    where = {Stream.ANNOTATED: rel, Stream.SCORES: rel, Stream.KEPT: rel, Stream.SAFE: join("safe", rel),
             Stream.UNSAFE: join("unsafe", rel), Stream.REJECTED: join(REJECTED_DIR, rel)}
    return {stream: where[stream] for stream in MODE_STREAMS[mode]}


def float_list_columns(schema: pa.Schema) -> list[str]:
    """The float-list columns (embeddings)."""
    return [f.name for f in schema if is_embedding_type(f.type)]


def scalar_columns(schema: pa.Schema) -> list[str]:
    """All columns but float lists (embeddings): the ones worth dictionary encoding and min/max statistics.
    For embeddings a dictionary of up to 65,536 float16 values makes writing and every later read several
    times slower, and statistics nobody filters on cost a pass over every value when writing."""
    return [f.name for f in schema if not is_embedding_type(f.type)]


def column_compression(schema: pa.Schema, compression: str, embedding_compression: str) -> dict[str, str]:
    """The codec of every column: ``embedding_compression`` for float lists, ``compression`` for the rest.

    Embeddings are near-random floats: zstd saves 8-9 % of their size and halves write and read speed
    (bench/writer_policy.py, docs/performance.md), so they are written uncompressed by default. Their
    encoding stays PLAIN: BYTE_STREAM_SPLIT would be faster still, but Spark 3.5/4.0's vectorized reader
    cannot read it for float32, nor DuckDB 2.0 for float16 (bench/writer_compat.py).
    """
    # pyarrow takes per-column codecs keyed by the parquet leaf path ("emb.list.element"), silently ignores a
    # top-level name for a list, and leaves a leaf missing from the mapping uncompressed: so every leaf is
    # named, as the writer itself names it, and matched to its column by position (a scalar column named
    # "emb.model" is not a leaf of "emb").
    return {path: embedding_compression if is_embedding_type(field.type) else compression
            for field, paths in zip(schema, leaf_paths(schema)) for path in paths}


def _with_column(schema: pa.Schema, field: pa.Field) -> pa.Schema:
    """``schema`` plus ``field``; a column of the same name is replaced in place (``replace_scores``:
    the driver refuses such a clash otherwise)."""
    index = schema.get_field_index(field.name)
    return schema.append(field) if index < 0 else schema.set(index, field)


def widened(field: pa.Field) -> pa.Field:
    """``field`` with float16 embedding values as float32 (the list kind, size, item field name and
    nullability kept); any other field as it is. float32 holds every float16 value exactly."""
    if not is_embedding_type(field.type) or field.type.value_type != pa.float16():
        return field
    item = field.type.value_field.with_type(pa.float32())
    kind = field.type
    wide = pa.list_(item, kind.list_size) if pa.types.is_fixed_size_list(kind) else \
        pa.large_list(item) if pa.types.is_large_list(kind) else pa.list_(item)
    return field.with_type(wide)


def npy_values(config: TaskConfig) -> np.dtype:
    """The type the npy rows are written as (laion-npy, ``write_embeddings``): the npy files' own (the widest
    of them: exact for all), float16 widened to float32 under ``embedding_type: float32``."""
    dtype = np.dtype(config.npy_value_type)
    return np.dtype(np.float32) if config.embedding_type == "float32" and dtype == np.float16 else dtype


def output_schemas(input_schema: pa.Schema, config: TaskConfig, dim: int) -> dict[Stream, pa.Schema]:
    """The schema of each output stream: the input's fields and metadata, plus scores (+ reason).

    The reason column is in annotate, scores and rejected outputs; in the other streams only when the
    input already had one (a re-scored output: it is then rewritten, null for every scored row).
    """
    kept = config.write_columns
    metadata = {k: v for k, v in (input_schema.metadata or {}).items() if k not in FOREIGN_SCHEMA_KEYS} or None
    schema = pa.schema([input_schema.field(c) for c in (input_schema.names if kept is None else kept)],
                       metadata=metadata)
    if config.row_ids:
        schema = pa.schema([pa.field(ROW_ID_COLUMNS[0], pa.string()), pa.field(ROW_ID_COLUMNS[1], pa.int64())]
                           + list(schema), metadata=schema.metadata)
    if config.layout == "laion-npy" and config.write_embeddings:
        schema = _with_column(schema, pa.field("embedding", pa.list_(pa.from_numpy_dtype(npy_values(config)), dim)))
    if config.embedding_type == "float32":
        schema = pa.schema([widened(f) for f in schema], metadata=schema.metadata)
    for name in config.score_columns:
        schema = _with_column(schema, pa.field(name, pa.float32()))
    with_reason = _with_column(schema, pa.field(config.reason_column, pa.string()))
    if config.reason_column in schema.names:
        schema = with_reason
    return {stream: with_reason if stream in (Stream.ANNOTATED, Stream.SCORES, Stream.REJECTED) else schema
            for stream in MODE_STREAMS[config.mode]}


class AtomicParquet:
    """A parquet file that appears under its final name only when complete.

    Where the store renames atomically (a local disk, HDFS) the file is written under a temp name in the
    output, ``_clip_nsfw_tmp/<32 hex>.parquet`` whatever ``rel`` is (a name built from a deep relative path
    would pass the filesystem's 255-byte limit on one name), then renamed. An object store has no rename
    (s3fs's ``mv`` is a server-side copy plus a delete: every byte written twice), but an object appears only
    when its upload completes: there the file is built on the executor's local disk (``SPARK_LOCAL_DIRS``,
    else the temp folder) and uploaded under its final name at commit, once.

    ``clock``: the file's writes are timed as "write" on it (stages.TimedFile).
    """

    def __init__(self, fs, root: str, rel: str, schema: pa.Schema, compression: str | dict[str, str],
                 own_encoder: bool = True, clock: StageClock | None = None):
        self.fs, self.final = fs, join(root, rel)
        self.spooled = not renames_atomically(fs)
        if self.spooled:
            handle = tempfile.NamedTemporaryFile(prefix="clip-nsfw-", suffix=".parquet", dir=_local_dir(),
                                                 delete=False)
            self.tmp, self._handle = handle.name, handle
        else:
            self.tmp = join(root, TMP_DIR, uuid.uuid4().hex + ".parquet")
            fs.makedirs(join(root, TMP_DIR), exist_ok=True)
            self._handle = fs.open(self.tmp, "wb")
        self._handle = TimedFile(self._handle, clock or StageClock(), "write")  # storage writes, timed apart
        # every page carries its CRC-32: a reader that checks them (pyarrow's page_checksum_verification,
        # this job's own reader) refuses a page damaged after it was written instead of reading wrong values
        options = {"compression": compression, "use_dictionary": scalar_columns(schema),
                   "write_statistics": scalar_columns(schema), "write_page_checksum": True}
        # uncompressed embedding columns are encoded by splice.py (several times faster than pyarrow)
        spliced = SplicedParquetWriter(self._handle, schema, columns=float_list_columns(schema), **options) \
            if own_encoder else None
        self._writer = spliced if spliced is not None and spliced.encoded else \
            pq.ParquetWriter(self._handle, schema, **options)
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self._writer.write_table(table)
            self.rows += table.num_rows

    @property
    def size(self) -> int:
        """The file's bytes as written (complete once committed): a resume checks the file it finds has them."""
        return self._handle.bytes_written

    def commit(self) -> None:
        self._writer.close()
        self._handle.close()
        if self.spooled:
            try:
                self.fs.put_file(self.tmp, self.final)  # one upload; the object appears when it completes
            finally:
                os.remove(self.tmp)
            return
        parent = self.final.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        rename_file(self.fs, self.tmp, self.final, replace=True)  # a retried task's commit replaces its own file

    def abort(self) -> None:
        try:
            self._writer.close()
            self._handle.close()
        finally:
            if self.spooled:
                if os.path.exists(self.tmp):
                    os.remove(self.tmp)
            elif self.fs.exists(self.tmp):
                self.fs.rm_file(self.tmp)


def _local_dir() -> str | None:
    """Where an executor spools files for an object store: Spark's local dirs (executor-local disks on
    YARN/Kubernetes), else Python's temp folder."""
    for folder in os.environ.get("SPARK_LOCAL_DIRS", "").split(","):
        if folder and os.path.isdir(folder):
            return folder
    return None


class OutputFiles:
    """One task's output files, one per stream, committed together or not at all.

    The main streams' files exist even when empty; the rejected file only when a row is rejected.
    ``rows`` counts the rows written per stream; ``paths`` the relative path of every file made.
    """

    def __init__(self, fs, root: str, rel: str, config: TaskConfig, schemas: dict[Stream, pa.Schema],
                 clock: StageClock | None = None):
        self.fs, self.root, self.config, self.schemas = fs, root, config, schemas
        self.clock = clock or StageClock()  # the files' storage writes are timed on it (stages.TimedFile)
        self.paths = output_paths(rel, config.mode)
        self._files: dict[Stream, AtomicParquet] = {}
        try:
            for stream in schemas:
                if stream != Stream.REJECTED:
                    self._file(stream)
        except BaseException:
            self.abort()  # the files opened before the one that failed
            raise

    def _file(self, stream: Stream) -> AtomicParquet:
        if stream not in self._files:
            schema = self.schemas[stream]
            codecs = column_compression(schema, self.config.compression, self.config.embedding_compression)
            self._files[stream] = AtomicParquet(self.fs, self.root, self.paths[stream], schema, codecs,
                                                own_encoder=self.config.parquet_codec == "own", clock=self.clock)
        return self._files[stream]

    def write(self, stream: Stream, table: pa.Table) -> None:
        schema = self.schemas[stream]
        columns = [table.column(field.name) for field in schema]
        columns = [c if c.type == f.type else c.cast(f.type) for c, f in zip(columns, schema)]  # embedding_type
        self._file(stream).write(pa.Table.from_arrays(columns, schema=schema))

    @property
    def rows(self) -> dict[Stream, int]:
        return {stream: file.rows for stream, file in self._files.items()}

    @property
    def written(self) -> list[str]:
        return sorted(self.paths[stream] for stream in self._files)

    @property
    def sizes(self) -> dict[str, int]:
        """``{relative path: bytes}`` of every file made (complete once committed)."""
        return {self.paths[stream]: file.size for stream, file in sorted(self._files.items())}

    def commit(self, fence: Callable[[int], None] = lambda moved: None) -> None:
        """Move every file to its final name; if one move fails, remove the files already moved (the task
        is then not complete, and its outputs are not there to be mistaken for a complete set).

        ``fence(moved)`` runs before each file (``moved`` files are in place so far) and raises
        LeaseLostError when the run lost its lease: then nothing is removed, since the names already
        written may hold another run's files by now (the next run's resume or overwrite judges them).
        """
        moved = []
        try:
            for stream in sorted(self._files):
                fence(len(moved))
                self._files[stream].commit()
                moved.append(self._files[stream].final)
        except (LeaseLostError, LeaseUnreadableError):  # the names may hold another run's files by now
            raise
        except BaseException:
            for final in moved:
                try:
                    self.fs.rm_file(final)  # rm_file: a name, never a glob pattern
                except Exception:  # noqa: BLE001 - the error that stopped the commit matters more
                    pass
            raise

    def abort(self) -> None:
        for file in self._files.values():
            try:
                file.abort()
            except Exception:  # noqa: BLE001 - the error that made the task abort matters more
                pass


def route(table: pa.Table, ok: np.ndarray, unsafe: np.ndarray, reasons: list, config: TaskConfig,
          files: OutputFiles) -> None:
    """Write a scored batch (``table`` with its score columns) to its streams.

    ``ok`` (n,) marks scored rows, ``unsafe`` (n,) scored rows at or over a threshold, ``reasons`` (n,)
    None or why a row was not scored (it becomes the reason column). annotate/scores: every row; filter:
    the kept side and the rejected rows; split: safe, unsafe and rejected rows.
    """
    with_reason = set_column(table, config.reason_column, pa.array(reasons, type=pa.string()))
    if config.mode in ("annotate", "scores"):
        files.write(Stream.ANNOTATED if config.mode == "annotate" else Stream.SCORES, with_reason)
        return
    safe, flagged = ok & ~unsafe, ok & unsafe
    if config.mode == "filter":
        files.write(Stream.KEPT, with_reason.filter(pa.array(safe if config.keep == "safe" else flagged)))
    else:
        files.write(Stream.SAFE, with_reason.filter(pa.array(safe)))
        files.write(Stream.UNSAFE, with_reason.filter(pa.array(flagged)))
    if not ok.all():
        files.write(Stream.REJECTED, with_reason.filter(pa.array(~ok)))
