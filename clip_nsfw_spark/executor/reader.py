"""The executor's reader: one task → batches of rows (parquet row groups, or LAION metadata + npy slices).

Reads only what the task's outputs need (``columns``), one row group at a time, so memory stays at about
one row group whatever the file size. Float-list (embedding) columns are decoded by parquet/ (decode.py, stream.py) when it can
(the same arrays as pyarrow's, several times faster on the dictionary-encoded float16 that pyarrow's
default writer makes; a large row group's column streamed batch by batch), by pyarrow otherwise. The
driver's counterpart, which makes the tasks, is planner.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clip_nsfw_spark.scoring.embeddings import is_embedding_type
from clip_nsfw_spark.errors import DamagedInputError, InputChangedError, InputError, TaskError
from clip_nsfw_spark.parquet.decode import read_float_list_column
from clip_nsfw_spark.parquet.errors import Damaged, Unsupported
from clip_nsfw_spark.parquet.stream import open_float_list_stream
from clip_nsfw_spark.contract import ROWS_FROM_FOOTER, Task
from clip_nsfw_spark.executor.stages import StageClock, TimedFile
from clip_nsfw_spark.storage.filesystem import is_storage_error, raised_in, read_fresh, unstrip

_log = logging.getLogger(__name__)
NPY_DTYPES = (np.dtype("float16"), np.dtype("float32"), np.dtype("float64"))
NPY_HEADER_BLOCK = 1 << 16

# Float-list column chunks that decode to more than this are streamed (parquet/stream.py, batch by batch) rather
# than decoded whole: the worker's memory must stay bounded (a 1M-row group of 768-d float16 is 1.5 GB).
# Smaller chunks are decoded whole: that path also decodes null rows and ragged lists, which the stream
# leaves to pyarrow (bench/pages_bench.py --stream: on uniform rows the two are about as fast).
DECODE_CHUNK_MAX_BYTES = 256 << 20


@dataclasses.dataclass(frozen=True)
class OpenParquet:
    """A task's parquet file, open: pyarrow's reader (``file``, footer read once) and the handle it reads."""

    file: pq.ParquetFile
    handle: object
    where: str  # the file as the user wrote its URL, for messages

    @property
    def schema(self) -> pa.Schema:
        return self.file.schema_arrow


# A small file on an object store, read whole by one task, is fetched in one GET and read from memory: a file
# object on S3 costs a HEAD (its size and ETag) and a GET per read pyarrow makes (footer tail, footer, data):
# 4 requests of ~20 ms each instead of 1, for the typical small files of img2dataset outputs (docs/scale.md).
# The planner gives a task the file's size (Task.size) only when the task reads all of it.
WHOLE_FILE_BYTES = 32 << 20


@contextlib.contextmanager
def open_parquet(task: Task, fs, clock: StageClock | None = None) -> Iterator[OpenParquet]:
    """The task's parquet file (data, or LAION metadata), open for ``task_batches``.

    A file on an object store (an async fsspec store: s3fs, gcsfs, adlfs) of 1 to WHOLE_FILE_BYTES bytes that
    the task reads whole (``task.size`` set by the planner) is read in one ranged request of one byte more
    than planned, a consistent copy of one version of the object; if that does not give exactly the planned
    size the file changed since planning (InputChangedError, before anything is written; memory stays
    bounded however large it grew). Other files, and every file elsewhere, are opened as file objects.

    ``clock``: the file's reads are timed as "read" on ``clock`` (stages.TimedFile; ``handle.clock`` may be
    replaced by the thread that reads the batches)."""
    clock = clock or StageClock()
    where = unstrip(fs, task.path)
    if 0 < task.size <= WHOLE_FILE_BYTES and getattr(fs, "async_impl", False):
        data = read_fresh(fs, task.path, max_bytes=task.size + 1)
        if len(data) != task.size:
            found = f"{len(data):,} bytes" if len(data) <= task.size else f"more than {task.size:,} bytes"
            raise InputChangedError(f"cannot read {where}: it has {found}, the plan listed {task.size:,}: "
                                    "the file changed since it was planned. Rerun with --resume (tasks whose "
                                    "input changed run again)")
        handle = TimedFile(io.BytesIO(data), clock, "read")
        try:
            opened = parquet_file(handle)
        except (pa.ArrowException, OSError, ValueError) as err:  # pyarrow's several types for a file not parquet
            if task.rows != ROWS_FROM_FOOTER or isinstance(err, MemoryError):
                raise
            # Planned from its listing, this file's footer is read here first: its damage is the planner's error.
            raise unreadable_footer(where, err, " (planned from its listing: its task reads its footer)") from err
        yield OpenParquet(opened, handle, where)
        return
    with fs.open(task.path, "rb") as handle:
        timed = TimedFile(handle, clock, "read")
        yield OpenParquet(parquet_file(timed), timed, where)


def schema_problem(where: str, schema: pa.Schema, first_where: str | None = None,
                   first: pa.Schema | None = None) -> str | None:
    """Why the file ``where`` of ``schema`` cannot be read with a dataset whose schema ``first`` came from
    ``first_where`` (None: the first file, checked alone), or None. Schema-level metadata is ignored."""
    repeated = sorted({n for n in schema.names if schema.names.count(n) > 1})
    if repeated:
        return (f"{where} has several columns named {', '.join(map(repr, repeated))}; no reader can tell them "
                "apart. Rewrite the file with distinct column names.")
    if first is None or schema.remove_metadata().equals(first.remove_metadata()):
        return None
    mine, theirs = {f.name: f.type for f in first}, {f.name: f.type for f in schema}
    changes = [f"{n}: {mine.get(n, 'missing')} vs {theirs.get(n, 'missing')}"
               for n in dict.fromkeys(list(mine) + list(theirs)) if mine.get(n) != theirs.get(n)]
    return (f"the schema of {where} differs from {first_where} ({'; '.join(changes) or 'field order'}). "
            "All input files must share one schema: score them in separate runs or rewrite them.")


def unreadable_footer(where: str, err: BaseException, how: str = "") -> InputError:
    """The one-line error for a file whose footer could not be read (``how``: how it came to be read): a
    damaged file when pyarrow refused its bytes; when the store failed to serve them (a connection refused or
    reset, a timeout, a NameNode in safe mode), an error that says so: the file may be sound, and must not be
    called damaged (a user told to remove it might delete a good file)."""
    cause = " ".join(str(err).split()).rstrip(".")
    if isinstance(err, FileNotFoundError):
        return InputError(f"cannot read parquet file {where}{how}: it is gone ({cause}); it was removed or renamed "
                          "since the input was listed. Run again once the input stays as it is.")
    if is_storage_error(err) and not is_damage(err):
        return InputError(f"cannot read parquet file {where}{how}: the store failed to serve it "
                          f"({type(err).__name__}: {cause}); nothing is known against the file itself. Check that "
                          "the store answers (endpoint, network, credentials, permissions) and run again.")
    return InputError(f"cannot read parquet file {where}{how}: {cause}. The file is truncated or not parquet; fix "
                      "or remove it and run again.")


def with_footer_rows(task: Task, source: OpenParquet, input_schema: bytes, schema_of: str) -> Task:
    """``task`` as the planner would have made it from the footer just read: a task planned from the listing
    (``rows`` is ``ROWS_FROM_FOOTER``) gets all of its file's row groups and their rows, once its schema is
    checked against the plan's (``input_schema``, arrow IPC bytes, read from the file ``schema_of``), as the
    planner checks each footer it reads. Another task is returned as it is."""
    if task.rows != ROWS_FROM_FOOTER:
        return task
    if task.kind != "parquet" or task.row_groups or not input_schema:  # never made so by the planner
        raise TaskError(f"task {task.rel} has no planned rows but is not a whole parquet file planned from its "
                        "listing with the plan's schema: a driver and executors of different versions?")
    problem = schema_problem(source.where, source.schema, schema_of, pa.ipc.read_schema(pa.py_buffer(input_schema)))
    if problem:
        raise InputError(f"{problem} (found by the task that reads it: this file was planned from its listing, "
                         "without reading its footer; the outputs of tasks already complete are kept, and a "
                         "--resume after the fix runs the rest)")
    meta = source.file.metadata
    group_rows = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    if sum(group_rows) != meta.num_rows:
        raise DamagedInputError(f"{source.where} is damaged: its row groups hold {sum(group_rows)} rows, its footer "
                                f"says {meta.num_rows}; rewrite or re-copy the file from its source, or leave it out")
    return dataclasses.replace(task, row_groups=tuple(range(meta.num_row_groups)), rows=sum(group_rows))


def parquet_file(handle) -> pq.ParquetFile:
    """pyarrow's reader of an open parquet file as the job reads every file: buffered reads, no
    pre-buffering (memory about one row group whatever the file size), and every page that records a
    CRC-32 checked against it (a damaged page is an error, never a wrong value)."""
    return pq.ParquetFile(handle, pre_buffer=False, buffer_size=1 << 20, page_checksum_verification=True)


def is_damage(err: BaseException) -> bool:
    """True when ``err`` is pyarrow's own verdict on a file's bytes (a checksum, decompression or
    decoding failure raised by its C++ reader), not an error of the storage it reads through: those
    reach pyarrow from the Python file object and are re-raised as they were (their traceback ends
    outside pyarrow), or carry an errno."""
    if isinstance(err, Damaged):
        return True
    if type(err) not in (OSError, pa.ArrowInvalid, pa.ArrowIOError) or getattr(err, "errno", None):
        return False
    if _unsupported(err):  # a sound file in a codec or encoding pyarrow does not read (LZO …)
        return False
    return "pyarrow" in raised_in(err)


def _unsupported(err: BaseException) -> bool:
    text = str(err).lower()
    return "not supported" in text or "not implemented" in text or "unsupported" in text


def unreadable(where: str, group: int, err: BaseException) -> InputError | None:
    """The one-line error for a row group pyarrow cannot read though it may be sound (a codec or encoding
    its C++ reader does not implement, such as LZO), or None for any other error."""
    if type(err) not in (OSError, pa.ArrowInvalid, pa.ArrowIOError, pa.ArrowNotImplementedError) \
            or not _unsupported(err):
        return None
    cause = " ".join(str(err).split()).rstrip(".")
    return InputError(f"cannot read {where}: row group {group}: {cause}. The job reads with pyarrow, which does not "
                      "support this; rewrite the file with snappy, gzip, zstd, lz4 or no compression")


def damaged(where: str, group: int, err: BaseException) -> DamagedInputError:
    """The one-line error for a damaged row group of ``where``."""
    cause = " ".join(str(err).split()).rstrip(".")
    return DamagedInputError(f"{where} is damaged: row group {group}: {cause}. No reader should accept it (pyarrow "
                             "with page checksum verification refuses it too); rewrite or re-copy the file from "
                             "its source, or leave it out of the input")


def task_batches(task: Task, fs, batch_rows: int, clock: StageClock, columns: list[str] | None = None,
                 source: OpenParquet | None = None,
                 own_decoder: bool = True) -> Iterator[tuple[pa.RecordBatch, np.ndarray | None, int]]:
    """Yield ``(batch, npy_rows_or_None, first_row)`` for the task's rows, at most ``batch_rows`` at a time.

    ``columns`` are the parquet columns to read (None: all): an output that does not keep the embeddings
    reads them only for scoring, and a sidecar reads only its ids. ``npy_rows`` (laion-npy) is the
    (batch rows, width) float array of the same rows; ``first_row`` the index, in its file, of the batch's
    first row. ``clock``: the npy rows' reads are timed on it as "read" (a parquet file's reads are timed by
    its handle: ``open_parquet``'s ``clock``). ``source``: the file already open
    (``open_parquet``), else it is opened here. ``own_decoder=False`` reads every column with pyarrow
    (``parquet_codec: pyarrow``), never with parquet/'s decoder.
    """
    if source is None:
        with open_parquet(task, fs) as opened:
            yield from task_batches(task, fs, batch_rows, clock, columns, opened, own_decoder)
        return
    meta = source.file.metadata
    offsets = np.cumsum([0] + [meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
    if columns is not None and not columns:  # nothing to keep (npy sidecar with row ids): count rows
        columns = source.schema.names[:1]
    if task.kind == "parquet":
        if task.row_groups and max(task.row_groups) >= meta.num_row_groups:
            raise InputChangedError(f"cannot read {unstrip(fs, task.path)}: it now has {meta.num_row_groups} row "
                                    f"group(s), the plan reads row group {max(task.row_groups)}: the file changed "
                                    "during the run. Rerun with --resume (tasks whose input changed run again)")
        found = sum(meta.row_group(group).num_rows for group in task.row_groups)
        if found != task.rows:  # before anything is written: a file rewritten since planning, or a stale plan
            raise InputChangedError(f"cannot read {unstrip(fs, task.path)}: its row groups {list(task.row_groups)} "
                                    f"now hold {found} rows, the plan counted {task.rows}: the file changed since "
                                    "it was planned. Rerun with --resume (tasks whose input changed run again)")
        for group in task.row_groups:
            position = int(offsets[group])
            for batch in _row_group_batches(source, [group], batch_rows, columns, own_decoder):
                yield batch, None, position
                position += batch.num_rows
        return
    # laion-npy: rows [row_start, row_stop) of the metadata file and of the npy file, read together.
    groups = [i for i in range(meta.num_row_groups)
              if offsets[i] < task.row_stop and offsets[i + 1] > task.row_start]
    position = int(offsets[groups[0]]) if groups else 0
    for batch in _row_group_batches(source, groups, batch_rows, columns, own_decoder):
        first, position = position, position + batch.num_rows
        lo, hi = max(task.row_start, first), min(task.row_stop, position)
        if hi > lo:
            with clock("read"):
                rows = read_npy_rows(fs, task.npy_path, lo, hi)
            yield batch.slice(lo - first, hi - lo), rows, lo


def _row_group_batches(source: OpenParquet, groups, batch_rows: int, columns: list[str] | None = None,
                       own_decoder: bool = True):
    """Batches of the given row groups, one reader per row group, with the columns in ``columns``' order.

    One ``iter_batches`` call over many row groups kept every buffer it had read until it finished
    (measured: 1.6 GB of RSS after 800k rows of a 2M-row file); one reader per group peaks at ~0.5 GB.
    Float-list columns parquet/ can decode come from it (whole row group then sliced, or streamed when
    the chunk is large); the other columns from pyarrow, whose batch sizes the float-list columns follow.
    pyarrow decodes in the calling thread (``use_threads=False``): a task's reading is one thread's work, which
    its clock can time (executor/stages.py), and each core already runs a task of its own.
    """
    for group in groups:
        try:
            yield from _group_batches(source, group, batch_rows, columns, own_decoder)
        except Exception as err:
            if is_damage(err):
                raise damaged(source.where, group, err) from err
            refused = unreadable(source.where, group, err)
            if refused is not None:
                raise refused from err
            raise


def _group_batches(source: OpenParquet, group: int, batch_rows: int, columns: list[str] | None, own_decoder: bool):
    """``_row_group_batches`` of one row group."""
    names = source.schema.names if columns is None else columns
    rows = source.file.metadata.row_group(group).num_rows
    decoded = _decoded_float_lists(source, group, names, batch_rows) if own_decoder else {}
    if not decoded:
        got = 0
        for batch in source.file.iter_batches(batch_size=batch_rows, row_groups=[group], columns=columns,
                                                  use_threads=False):
            got += batch.num_rows
            yield batch
        if got != rows:  # pyarrow skips pages of a type it does not know: rows would vanish unnoticed
            raise Damaged(f"its columns hold {got} rows, the footer says {rows}")
        return
    rest = [name for name in names if name not in decoded]
    others = source.file.iter_batches(batch_size=batch_rows, row_groups=[group], columns=rest,
                                          use_threads=False) if rest else None
    start = 0
    while start < rows:
        other = next(others, None) if others is not None else None
        if others is not None and other is None:
            raise Damaged(f"its columns {rest} hold {start} rows, the footer says {rows}")
        n = other.num_rows if other is not None else min(batch_rows, rows - start)
        fields = [source.schema.field(name) if name in decoded else other.schema.field(name) for name in names]
        arrays = [decoded[name].slice(start, n) if name in decoded else other.column(name) for name in names]
        yield pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields))
        start += n


def _decoded_float_lists(source: OpenParquet, group: int, names: list[str], batch_rows: int) -> dict:
    """``{column: its rows}`` for the float-list columns among ``names`` that parquet/ decodes: the row
    group's whole column (a ``pa.Array``) when it decodes to at most ``DECODE_CHUNK_MAX_BYTES``, else a
    ``_StreamedColumn``; both are read with ``.slice(start, n)``. The other columns are pyarrow's."""
    meta = source.file.metadata.row_group(group)
    stored: Counter = Counter()  # per top-level column: uncompressed bytes, and values (leaf entries)
    values: Counter = Counter()
    for i in range(meta.num_columns):
        chunk = meta.column(i)
        top = chunk.path_in_schema.split(".", 1)[0]
        stored[top] += chunk.total_uncompressed_size
        values[top] += chunk.num_values
    decoded = {}
    for name in names:
        arrow_type = source.schema.field(name).type
        if not is_embedding_type(arrow_type):
            continue
        # dictionary indices can be narrower than the values they stand for: count the decoded values too
        if max(stored[name], values[name] * arrow_type.value_type.bit_width // 8) > DECODE_CHUNK_MAX_BYTES:
            stream = open_float_list_stream(source.handle, source.file.metadata, group, name)
            if stream is not None:
                decoded[name] = _StreamedColumn(source, group, name, stream, batch_rows)
            continue
        array = read_float_list_column(source.handle, source.file.metadata, group, name)
        if array is not None:
            decoded[name] = array
    return decoded


class _StreamedColumn:
    """A float-list column of one row group read in order, ``slice(start, n)`` after ``slice(…, start)``:
    from parquet/stream.py's stream, or — once the stream meets a page it cannot decode (``parquet.errors.Unsupported``) —
    from pyarrow for the rest of the row group (rows before ``start`` read again and dropped: slower,
    memory still one batch)."""

    def __init__(self, source: OpenParquet, group: int, name: str, stream, batch_rows: int):
        self.source, self.group, self.name, self.batch_rows = source, group, name, batch_rows
        self.stream, self.fallback, self.pending = stream, None, None

    def slice(self, start: int, n: int) -> pa.Array:
        if self.fallback is None:
            if start != self.stream.rows_read:
                raise RuntimeError(f"{self.name!r} row group {self.group}: rows asked from {start}, "
                                   f"the stream is at {self.stream.rows_read}")
            try:
                array = self.stream.read(n)
            except Unsupported as err:
                _log.warning("%r, row group %d: %s", self.name, self.group, err)
                self.fallback = (batch.column(0) for batch in self.source.file.iter_batches(
                    batch_size=self.batch_rows, row_groups=[self.group], columns=[self.name], use_threads=False))
                self._pyarrow_rows(start, keep=False)  # the rows the stream already returned
            else:
                if len(array) != n:
                    raise RuntimeError(f"{self.name!r} row group {self.group}: the stream gave {len(array)} "
                                       f"rows from row {start}, the other columns {n}")
                return array
        return self._pyarrow_rows(n)

    def _pyarrow_rows(self, n: int, keep: bool = True) -> pa.Array | None:
        """The next ``n`` rows of pyarrow's batches of the column (batch remainders carried over); with
        ``keep=False`` they are dropped."""
        pieces = []
        while n > 0:
            if self.pending is None or len(self.pending) == 0:
                self.pending = next(self.fallback, None)
                if self.pending is None:
                    raise Damaged(f"column {self.name!r} ends before the row group's last row")
            piece = self.pending.slice(0, n)
            self.pending = self.pending.slice(len(piece))
            if keep:
                pieces.append(piece)
            n -= len(piece)
        if not keep:
            return None
        return pieces[0] if len(pieces) == 1 else pa.concat_arrays(pieces)


def read_npy_rows(fs, path: str, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a 2-D .npy file, reading only those bytes, in native byte order."""
    shape, dtype, offset = npy_header(fs, path)
    row_bytes = shape[1] * dtype.itemsize
    with fs.open(path, "rb") as handle:
        handle.seek(offset + start * row_bytes)
        data = handle.read((stop - start) * row_bytes)
    if len(data) != (stop - start) * row_bytes:
        raise InputError(f"{unstrip(fs, path)} is truncated: expected {shape[0]} rows of {shape[1]} {dtype}")
    rows = np.frombuffer(data, dtype=dtype).reshape(stop - start, shape[1])
    return rows if dtype.isnative else rows.astype(dtype.newbyteorder("="))


def npy_header(fs, path: str, size: int | None = None) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data offset of a .npy file, reading only its header; checks what the job needs:
    a C-ordered 2-D float16/32/64 array (either byte order) whose data is all there (when ``size`` is known).
    Reads 64 KiB blocks (a header is ~128 bytes): s3fs's default read-ahead would fetch 50 MB of rows."""
    with fs.open(path, "rb", block_size=NPY_HEADER_BLOCK) as handle:
        try:
            version = np.lib.format.read_magic(handle)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(handle)
        except ValueError as err:
            raise InputError(f"{unstrip(fs, path)} is not a valid .npy file: {err}") from err
        offset = handle.tell()
    where = unstrip(fs, path)
    if dtype.hasobject or dtype.newbyteorder("=") not in NPY_DTYPES:
        raise InputError(f"{where} holds {dtype} values ({dtype.str}); expected float16, float32 or float64 "
                         "embeddings. Re-save it with np.save(path, array.astype('float16')).")
    if fortran or len(shape) != 2:
        raise InputError(f"{where} must hold a C-ordered 2-D array (rows × dim); found shape {shape}"
                         + (" in Fortran order" if fortran else ""))
    if size is not None and size < offset + shape[0] * shape[1] * dtype.itemsize:
        raise InputError(f"{where} is truncated: expected {shape[0]} rows of {shape[1]} {dtype.name} "
                         f"({offset + shape[0] * shape[1] * dtype.itemsize} bytes), found {size} bytes")
    return shape, dtype, offset
