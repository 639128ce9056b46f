"""Page-level parquet decoder for one float-list column of one row group: pyarrow's answer, faster.

``read_float_list_column(source, metadata, row_group, column)`` reads the column chunk's bytes in one read,
walks its pages (Thrift compact page headers parsed here), decompresses them with ``pyarrow.decompress`` and
decodes the values with numba kernels straight into one preallocated ``(n_rows * d,)`` array, then wraps it
zero-copy as the Arrow list type the file's Arrow schema names (rows with nulls or other lengths: a
general path, below). It returns either an array equal to

    pq.ParquetFile(source).read_row_group(row_group, columns=[column]).column(column).combine_chunks()

(same type: ``list`` / ``large_list`` / ``fixed_size_list`` of ``halffloat`` / ``float`` / ``double``, same
item field) or ``None`` when the chunk is outside what it decodes; the caller then uses pyarrow. It never
returns a different answer: everything it relies on is checked, not assumed.

Why: pyarrow's default writer dictionary-encodes float16 lists (≤ 65,536 distinct values, so the
dictionary never overflows) and pyarrow reads those ~3x slower than PLAIN float32; ``read_dictionary=``
does not apply to non-BYTE_ARRAY columns. Decoding the indices with one gather is memory-bound.

What is decoded (anything else → ``None``):

* physical types FLOAT, DOUBLE, FIXED_LEN_BYTE_ARRAY(2) with the Float16 logical type, under a top-level
  list field with one repetition level (3-level ``list.element``, Spark's legacy 2-level lists, or a bare
  repeated field);
* the fast path: every row a non-null list of the same length ``d``, no null items — verified from the
  repetition and definition levels of every page (RLE/bit-packed hybrid, checked run by run without
  materialising them), never assumed; the result is then one values buffer with computed offsets;
* otherwise (null rows, empty lists, rows of different lengths, null items) a general path for ``list`` /
  ``large_list``: levels materialised, offsets and validity bitmaps built from them (definition level
  thresholds from the Arrow schema's nullability, cross-checked with the column's maximum definition
  level); ``fixed_size_list`` columns with such rows are refused;
* data pages v1 and v2; a dictionary page (PLAIN) with RLE_DICTIONARY / PLAIN_DICTIONARY indices, PLAIN and
  BYTE_STREAM_SPLIT data pages, mixed in one chunk (pyarrow's and parquet-mr's fallback from dictionary to
  PLAIN once the dictionary is full);
* codecs UNCOMPRESSED, SNAPPY, GZIP and ZSTD, each page's decompressed length checked independently of
  the codec call (``pyarrow.decompress`` returns the size it is told whatever the data held): SNAPPY's
  length preamble, GZIP decompressed by zlib (its CRC-32 and length trailer checked), ZSTD by its own
  frame check. BROTLI and LZ4_RAW streams carry no length to check them by: those chunks are pyarrow's.

Validation (the rule: never a different answer from pyarrow reading with ``page_checksum_verification``;
on a damaged file at least as strict as it): a page's CRC-32, when its header has one, is checked against
its bytes before anything is decoded, and a mismatch raises ``Damaged`` (the file is damaged: no other
reader would accept it either); anything else that does not add up (sizes, counts, levels, dictionary
indices, truncation) makes this module step aside (``None`` / ``Unsupported``) and pyarrow, reading with
checksum verification, decides.

Memory: the chunk's compressed bytes plus the decoded values (4 bytes per float32 value) are held at once.

Streaming, for chunks too large for that (a 1M-row group of 768-d float16 is 1.5 GB decoded):
``open_float_list_stream(source, metadata, row_group, column)`` returns a ``FloatListStream`` whose
``read(n)`` gives the next ``n`` rows (``iter_float_list_column(..., batch_rows)`` wraps it as an iterator
of ``batch_rows``-row arrays), or ``None`` up front when the chunk does not stream. Pages are read one at a
time through a read-ahead block of a few MiB, so memory is one batch + one page + the dictionary whatever
the chunk size. Only the fast path streams (every row a non-null list of ``d`` values); ``None`` when the
footer, the encodings the chunk lists or its first data page say otherwise. A later page that breaks
that (nulls or other lengths after uniform pages, an encoding or page the first pages did not show)
raises the public ``Unsupported``: the rows returned until then are right, and the caller reads the rest
of that row group's column with pyarrow (reader.py does). A row spanning two pages is handled (the levels
are checked at global positions; pyarrow's writer never splits rows across pages).
"""

from __future__ import annotations

import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clip_nsfw_spark.parquet.thrift import BOOL, I32, STRUCT, ThriftError, decode_struct

try:  # numba is a core dependency; without it every call returns None (pyarrow then reads)
    import numba

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only where numba is missing
    HAVE_NUMBA = False

__all__ = ["Damaged", "FloatListStream", "Unsupported", "iter_float_list_column", "open_float_list_stream",
           "page_summary", "read_float_list_column"]

# parquet.thrift enum values used here
_DATA_PAGE, _INDEX_PAGE, _DICTIONARY_PAGE, _DATA_PAGE_V2 = 0, 1, 2, 3
_PLAIN, _PLAIN_DICTIONARY, _RLE, _RLE_DICTIONARY, _BYTE_STREAM_SPLIT = 0, 2, 3, 8, 9

# pyarrow's names of the codecs (ColumnChunkMetaData.compression) → pyarrow.decompress codec; None: stored.
# BROTLI and LZ4_RAW (pyarrow says "LZ4") are left to pyarrow: their streams hold no decompressed length to
# check a page by, and pyarrow.decompress returns the length it is told whatever the data held.
_CODECS = {"UNCOMPRESSED": None, "SNAPPY": "snappy", "GZIP": "gzip", "ZSTD": "zstd"}


class Damaged(Exception):
    """A page's bytes do not match the CRC-32 its header records: the file is damaged (pyarrow with
    ``page_checksum_verification`` refuses it too). Raised, never answered with ``None``: a caller must
    not read the chunk another way."""


class _Unsupported(Exception):
    """Internal: the chunk is outside what this module decodes; the public function returns None."""


# The wire type of every PageHeader field read here, and of the fields of its nested page headers (by the
# PageHeader field holding them), with the fields parquet.thrift requires: a field of another type is one a
# generated Thrift reader skips, and a required field missing makes it refuse the header: so do we.
_HEADER_TYPES = {1: I32, 2: I32, 3: I32, 4: I32, 5: STRUCT, 6: STRUCT, 7: STRUCT, 8: STRUCT}
_HEADER_REQUIRED = {1, 2, 3}
_SUB_HEADERS = {5: ({1: I32, 2: I32, 3: I32, 4: I32, 5: STRUCT}, {1, 2, 3, 4}),  # DataPageHeader
                7: ({1: I32, 2: I32, 3: BOOL}, {1, 2}),  # DictionaryPageHeader
                8: ({1: I32, 2: I32, 3: I32, 4: I32, 5: I32, 6: I32, 7: BOOL, 8: STRUCT}, {1, 2, 3, 4, 5, 6})}  # V2


def _as_dict(fields: list) -> dict:
    """A decoded Thrift struct as ``{field id: value}``, nested structs too (lists stay thrift.ThriftList)."""
    return {f.id: _as_dict(f.value) if f.type == STRUCT else f.value for f in fields}


def _check_types(fields: list, types: dict, required: set, what: str) -> None:
    """``_Unsupported`` when a field in ``types`` has another wire type or a ``required`` field is missing."""
    for f in fields:
        if f.id in types and f.type != types[f.id]:
            raise _Unsupported(f"{what} field {f.id} has wire type {f.type}, expected {types[f.id]}")
        if what != "page header" and types.get(f.id) == I32 and f.value < 0:  # counts, lengths, enums
            raise _Unsupported(f"{what} field {f.id} is negative ({f.value})")
        if f.id in _SUB_HEADERS and what == "page header":
            _check_types(f.value, *_SUB_HEADERS[f.id], f"page header field {f.id}")
    missing = required - {f.id for f in fields}
    if missing:
        raise _Unsupported(f"{what} without its required field(s) {sorted(missing)}")


def _page_header(buf, pos: int) -> tuple[dict, int]:
    """Decode one PageHeader at ``buf[pos:]``; returns (fields by thrift id, position after the header).
    Unknown fields are decoded too, i.e. skipped correctly whatever their type; ``_Unsupported`` when the
    bytes run out or are not a Thrift struct (a truncated or damaged header), or a field read here has
    another wire type than parquet.thrift gives it."""
    try:
        fields, end = decode_struct(buf, pos)
    except ThriftError as err:
        raise _Unsupported(f"page header: {err}") from err
    _check_types(fields, _HEADER_TYPES, _HEADER_REQUIRED, "page header")
    return _as_dict(fields), end


# --------------------------------------------------------------------------------------------------------
# numba kernels: RLE/bit-packed hybrid runs (levels and dictionary indices), no per-value Python.
# A hybrid stream is a sequence of runs, each starting with a ULEB128 header h: h & 1 == 0 → an RLE run of
# h >> 1 copies of one value stored in ceil(bw / 8) little-endian bytes; h & 1 == 1 → (h >> 1) groups of 8
# bit-packed values, LSB first, bw bytes per group. The last bit-packed group may be padded past ``n``.
# --------------------------------------------------------------------------------------------------------
if HAVE_NUMBA:
    _jit = numba.njit(cache=True, boundscheck=False, nogil=True)

    @_jit
    def _run_header(buf, p, end):
        """(header, position after it), or (-1, p) when the ULEB128 runs past ``end`` or over 32 bits."""
        h = 0
        shift = 0
        while p < end:
            b = np.int64(buf[p])
            p += 1
            h |= (b & 0x7F) << shift
            if b < 0x80:
                return h, p
            shift += 7
            if shift > 28:
                return -1, p
        return -1, p

    @_jit
    def _rle_value(buf, p, nbytes):
        v = np.int64(0)
        for k in range(nbytes):
            v |= np.int64(buf[p + k]) << (8 * k)
        return v

    @_jit
    def _check_def_levels(buf, bw, n, want):
        """True when the hybrid stream ``buf`` (bit width ``bw``) holds ``n`` levels all equal to ``want``."""
        end = buf.shape[0]
        p = 0
        i = 0
        nbytes = (bw + 7) // 8
        mask = (np.int64(1) << bw) - 1
        while i < n:
            h, p = _run_header(buf, p, end)
            if h < 0:
                return False
            if h & 1:
                stop = p + (h >> 1) * bw
                if stop > end:
                    return False
                count = min((h >> 1) * 8, n - i)
                acc = np.int64(0)
                have = 0
                q = p
                for _ in range(count):
                    while have < bw:
                        acc |= np.int64(buf[q]) << have
                        q += 1
                        have += 8
                    if (acc & mask) != want:
                        return False
                    acc >>= bw
                    have -= bw
                i += count
                p = stop
            else:
                if p + nbytes > end or (h >> 1) == 0:
                    return False
                if _rle_value(buf, p, nbytes) != want:
                    return False
                p += nbytes
                i += min(h >> 1, n - i)
        return True

    @_jit
    def _check_rep_levels(buf, bw, n, start, d):
        """True when the ``n`` repetition levels in ``buf`` are 0 exactly at global level positions that are
        multiples of ``d`` and 1 elsewhere (every row one list of ``d`` entries); ``start`` is the global
        position of the page's first level."""
        end = buf.shape[0]
        p = 0
        i = 0
        r = start % d  # position inside the current row; a row starts where r == 0
        nbytes = (bw + 7) // 8
        mask = (np.int64(1) << bw) - 1
        while i < n:
            h, p = _run_header(buf, p, end)
            if h < 0:
                return False
            if h & 1:
                stop = p + (h >> 1) * bw
                if stop > end:
                    return False
                count = min((h >> 1) * 8, n - i)
                acc = np.int64(0)
                have = 0
                q = p
                for _ in range(count):
                    while have < bw:
                        acc |= np.int64(buf[q]) << have
                        q += 1
                        have += 8
                    v = acc & mask
                    if v != (0 if r == 0 else 1):
                        return False
                    acc >>= bw
                    have -= bw
                    r += 1
                    if r == d:
                        r = 0
                i += count
                p = stop
            else:
                c = h >> 1
                if p + nbytes > end or c == 0:
                    return False
                v = _rle_value(buf, p, nbytes)
                p += nbytes
                c = min(c, n - i)
                if v == 0:
                    if not (r == 0 and (c == 1 or d == 1)):
                        return False
                elif v == 1:
                    if r == 0 or r + c > d:
                        return False
                else:
                    return False
                r = (r + c) % d
                i += c
        return True

    @_jit
    def _unsplit(streams, n, out):
        """BYTE_STREAM_SPLIT: byte k of value i is streams[k * n + i]; out (n,) uint16/32/64 gets the values.

        One pass per byte stream over the page's values (a page is ~1 MiB, so ``out`` stays in cache):
        contiguous loads and stores the compiler vectorizes, rather than byte-by-byte scattering."""
        item = out.itemsize
        for i in range(n):
            out[i] = streams[i]
        for k in range(1, item):
            base = k * n
            shift = out.dtype.type(8 * k)  # same unsigned type: no widening to int64 in the loop
            for i in range(n):
                out[i] |= out.dtype.type(streams[base + i]) << shift

    @_jit
    def _gather_run(buf, p, bw, count, dictionary, out, i):
        """out[i:i + count] = dictionary[the ``count`` bw-bit indices bit-packed from buf[p]]; returns the
        largest index seen (the caller refuses the chunk if it is outside the dictionary).

        Indices are clamped to the dictionary while gathering and the range is checked once afterwards: no
        early exit in the loop, which keeps it branch-free. Where a 4-byte window at the index's first byte
        lies inside ``buf`` (all but the last few indices of a page), one little-endian 32-bit read and a
        shift give the index (bw ≤ 25; bw 16: one byte pair, no shift); the tail, and wider indices, go
        through a byte-wise bit reader.

        Every array position here is a uint64 (and every operand of it too: numba turns uint64 mixed with
        int64 into float64). A signed position costs a compare-and-select per access (numba wraps negative
        indices), and that also stops LLVM from merging the four byte loads into one 32-bit load: with
        int64 positions the index extraction alone took 1.9 ns per index, 0.4 with uint64, and the whole
        gather 2.3-2.4 → 1.0 ns (bw 15, f16 dictionary, AMD EPYC). Measured and not kept: a dictionary
        padded to 2^bw (no clamp), unpacking into a scratch array then gathering in a second loop, and
        two aligned 64-bit word loads per index: equal or slower, the dictionary loads dominate.
        """
        u8, u3, u7 = np.uint64(8), np.uint64(3), np.uint64(7)
        b = np.uint64(bw)
        mask = (np.uint64(1) << b) - np.uint64(1)
        last = np.uint64(dictionary.shape[0] - 1)
        at = np.uint64(i)  # out[at + k]
        mx = np.uint64(0)
        fast = 0
        if bw <= 25:
            # the window of index k starts at byte p + (k * bw >> 3); it must end inside buf
            fast = min(count, max(0, ((buf.shape[0] - 4 - p) * 8) // bw + 1))
        first = np.uint64(p) * u8  # bit position of index 0 in buf
        if bw == 16:  # float16 dictionaries over 32,768 entries: whole little-endian byte pairs, no shift
            q = np.uint64(p)
            for k in range(fast):
                j = np.uint64(buf[q]) | (np.uint64(buf[q + np.uint64(1)]) << u8)
                q += np.uint64(2)
                mx = max(mx, j)
                out[at + np.uint64(k)] = dictionary[min(j, last)]
        else:
            for k in range(fast):
                bit = first + np.uint64(k) * b
                q = bit >> u3
                w = (np.uint64(buf[q]) | (np.uint64(buf[q + np.uint64(1)]) << u8)
                     | (np.uint64(buf[q + np.uint64(2)]) << np.uint64(16))
                     | (np.uint64(buf[q + np.uint64(3)]) << np.uint64(24)))
                j = (w >> (bit & u7)) & mask
                mx = max(mx, j)
                out[at + np.uint64(k)] = dictionary[min(j, last)]
        if fast < count:
            bit = first + np.uint64(fast) * b
            q = bit >> u3
            skip = bit & u7
            have = np.uint64(0)
            acc = np.uint64(0)
            for k in range(fast, count):
                while have < b + skip:
                    acc |= np.uint64(buf[q]) << have
                    q += np.uint64(1)
                    have += u8
                acc >>= skip
                have -= skip
                skip = np.uint64(0)
                j = acc & mask
                acc >>= b
                have -= b
                mx = max(mx, j)
                out[at + np.uint64(k)] = dictionary[min(j, last)]
        return np.int64(mx)

    @_jit
    def _gather_dictionary(buf, bw, n, dictionary, out):
        """out[:n] = dictionary[indices], the indices a hybrid stream of bit width ``bw`` (1..32) in ``buf``.

        dictionary (non-empty) and out share one unsigned dtype (the values' bits); returns n, or -1 when
        the stream is short or an index is outside the dictionary (the caller then refuses the chunk).
        """
        end = buf.shape[0]
        size = dictionary.shape[0]
        if size == 0:  # no index is valid (and the clamped gather below needs one entry)
            return -1 if n > 0 else 0
        p = 0
        i = 0
        nbytes = (bw + 7) // 8
        mx = np.int64(0)
        while i < n:
            h, p = _run_header(buf, p, end)
            if h < 0:
                return -1
            if h & 1:
                stop = p + (h >> 1) * bw
                if stop > end:
                    return -1
                count = min((h >> 1) * 8, n - i)
                mx = max(mx, _gather_run(buf, p, bw, count, dictionary, out, i))
                i += count
                p = stop
            else:
                c = h >> 1
                if p + nbytes > end or c == 0:
                    return -1
                j = _rle_value(buf, p, nbytes)
                p += nbytes
                if j >= size:
                    return -1
                c = min(c, n - i)
                v = dictionary[j]
                for k in range(c):
                    out[i + k] = v
                i += c
        return n if mx < size else -1


# --------------------------------------------------------------------------------------------------------
# The column chunk
# --------------------------------------------------------------------------------------------------------
def _bit_width(max_level: int) -> int:
    return int(max_level).bit_length()


def _column_plan(metadata: pq.FileMetaData, row_group: int, column: str, decoding: bool = True) -> dict:
    """What the chunk must be, from the footer: arrow type, leaf index, levels, d, value dtype, codec
    (``decoding=False``: any codec, for reading page headers only)."""
    schema = metadata.schema.to_arrow_schema()  # applies the stored ARROW:schema (large/fixed-size lists)
    if schema.get_field_index(column) < 0:  # missing, or the name is duplicated
        raise _Unsupported(f"no single top-level column {column!r}")
    arrow_type = schema.field(column).type
    if not (pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)
            or pa.types.is_fixed_size_list(arrow_type)):
        raise _Unsupported(f"{column!r} is {arrow_type}, not a list")
    value_type = arrow_type.value_type
    leaves = [i for i in range(metadata.num_columns)
              if metadata.schema.column(i).path.split(".")[0] == column]
    if len(leaves) != 1 or "." in column:
        raise _Unsupported(f"{column!r} is not one leaf column")
    leaf = leaves[0]
    desc = metadata.schema.column(leaf)
    if desc.max_repetition_level != 1 or desc.max_definition_level < 1:
        raise _Unsupported("not a single-level list")
    physical = desc.physical_type
    if physical == "FLOAT" and value_type == pa.float32():
        storage = np.dtype("<u4")
    elif physical == "DOUBLE" and value_type == pa.float64():
        storage = np.dtype("<u8")
    elif (physical == "FIXED_LEN_BYTE_ARRAY" and desc.length == 2 and desc.logical_type.type == "FLOAT16"
          and value_type == pa.float16()):
        storage = np.dtype("<u2")
    else:
        raise _Unsupported(f"{physical} stored as {value_type}")
    chunk = metadata.row_group(row_group).column(leaf)
    if chunk.file_path:  # the chunk lives in another file (external column chunk), not in ``source``
        raise _Unsupported(f"column chunk in {chunk.file_path!r}")
    codec = chunk.compression
    if codec not in _CODECS and decoding:
        raise _Unsupported(f"codec {codec}")
    n_rows = metadata.row_group(row_group).num_rows
    n_levels = chunk.num_values
    if n_rows <= 0 or n_levels <= 0:
        raise _Unsupported("an empty row group")
    d = None if n_levels % n_rows else n_levels // n_rows  # None: not all rows can have one length
    if pa.types.is_fixed_size_list(arrow_type) and arrow_type.list_size != d:
        raise _Unsupported("fixed-size list of another size")
    if pa.types.is_list(arrow_type) and n_levels >= 2**31:
        raise _Unsupported("more values than int32 offsets hold")
    start = chunk.data_page_offset
    if chunk.has_dictionary_page and chunk.dictionary_page_offset:  # 0: unset by some old writers
        start = min(start, chunk.dictionary_page_offset)
    return {"arrow_type": arrow_type, "value_type": value_type, "storage": storage, "codec": _CODECS.get(codec, codec),
            "list_nullable": schema.field(column).nullable, "item_nullable": arrow_type.value_field.nullable,
            "n_rows": n_rows, "d": d, "n_levels": n_levels, "max_def": desc.max_definition_level,
            "start": start, "size": chunk.total_compressed_size, "leaf": leaf}


def _read_exact(source, start: int, size: int) -> np.ndarray:
    """``size`` bytes of ``source`` from ``start`` as a uint8 array, read in one call where possible."""
    source.seek(start)
    readinto = getattr(source, "readinto", None)
    if readinto is None:
        data = np.frombuffer(source.read(size), np.uint8)
    else:
        data = np.empty(size, np.uint8)
        view, got = memoryview(data), 0
        while got < size:
            k = readinto(view[got:])
            if not k:
                break
            got += k
        data = data[:got]
    if data.shape[0] != size:
        raise _Unsupported("the file ends inside the column chunk")
    return data


def _read_into(source, start: int, out: np.ndarray) -> int:
    """Read ``source`` from ``start`` into the uint8 array ``out`` (no intermediate copy where the source
    has ``readinto``); returns the number of bytes read, fewer only where the file ends."""
    source.seek(start)
    readinto = getattr(source, "readinto", None)
    if readinto is None:
        data = source.read(out.shape[0])
        out[:len(data)] = np.frombuffer(data, np.uint8)
        return len(data)
    view, got = memoryview(out), 0
    while got < out.shape[0]:
        k = readinto(view[got:])
        if not k:
            break
        got += k
    return got


def _snappy_length(body: np.ndarray) -> int:
    """The uncompressed length a snappy block states in its ULEB128 preamble (-1: none readable)."""
    n, shift = 0, 0
    for k in range(min(5, body.shape[0])):
        b = int(body[k])
        n |= (b & 0x7F) << shift
        if b < 0x80:
            return n
        shift += 7
    return -1


def _decompress(body: np.ndarray, size: int, codec: str | None) -> np.ndarray:
    """A page's ``size`` decompressed bytes, their length established independently of the header's
    ``size`` (``_Unsupported`` when it differs or the data does not decompress)."""
    if codec is None:
        if body.shape[0] != size:
            raise _Unsupported("stored page of the wrong size")
        return body
    if codec == "gzip":  # zlib says how long the data really is, and checks gzip's CRC-32 and length trailer
        inflater = zlib.decompressobj(wbits=47)  # a gzip or zlib header, as Arrow's codec accepts
        try:
            out = inflater.decompress(body, size + 1)
        except zlib.error as err:
            raise _Unsupported(f"gzip page does not decompress: {err}") from err
        if len(out) != size or not inflater.eof or inflater.unused_data or inflater.unconsumed_tail:
            raise _Unsupported(f"gzip page of {len(out)}+ bytes, its header says {size}")
        return np.frombuffer(out, np.uint8)
    if codec == "snappy" and _snappy_length(body) != size:
        raise _Unsupported(f"snappy page of {_snappy_length(body)} bytes, its header says {size}")
    try:  # zstd: the decoder itself refuses a frame that does not end at exactly ``size`` bytes
        out = pa.decompress(body, decompressed_size=size, codec=codec, asbytes=False)
    except (pa.ArrowException, ValueError) as err:
        raise _Unsupported(f"{codec} page does not decompress: {err}") from err
    if out.size != size:
        raise _Unsupported("decompressed page of the wrong size")
    return np.frombuffer(out, np.uint8)


def _check_crc(header: dict, body: np.ndarray) -> None:
    """``Damaged`` when the page header records a CRC-32 (field 4) that its bytes do not have."""
    recorded = header.get(4)
    if recorded is not None and zlib.crc32(body) != recorded & 0xFFFFFFFF:
        raise Damaged(f"page CRC-32 mismatch: the header records {recorded & 0xFFFFFFFF:#010x}, the "
                      f"{body.shape[0]} bytes have {zlib.crc32(body):#010x}")


def _levels_v1(page: np.ndarray, p: int, encoding) -> tuple[np.ndarray, int]:
    """A v1 page's level stream (RLE with a 4-byte length prefix) at ``page[p:]`` and the position after."""
    if encoding != _RLE:
        raise _Unsupported(f"level encoding {encoding}")
    if p + 4 > page.shape[0]:
        raise _Unsupported("truncated levels")
    length = int.from_bytes(page[p:p + 4].tobytes(), "little")
    if p + 4 + length > page.shape[0]:
        raise _Unsupported("truncated levels")
    return page[p + 4:p + 4 + length], p + 4 + length


def _decode_values(values: np.ndarray, encoding, n: int, dictionary, out: np.ndarray) -> None:
    """Decode ``n`` non-null values of a data page into ``out[:n]`` (unsigned storage dtype)."""
    item = out.dtype.itemsize
    if encoding in (_RLE_DICTIONARY, _PLAIN_DICTIONARY):
        if dictionary is None or values.shape[0] < 1:
            raise _Unsupported("dictionary indices without a dictionary")
        bw = int(values[0])
        if bw > 32 or (bw == 0 and dictionary.shape[0] == 0):
            raise _Unsupported(f"index bit width {bw}")
        if bw == 0:  # a one-entry dictionary: every index is 0, no index bytes follow
            out[:n] = dictionary[0]
            return
        if _gather_dictionary(values[1:], bw, n, dictionary, out) != n:
            raise _Unsupported("dictionary indices out of range or truncated")
    elif encoding == _PLAIN:
        if values.shape[0] < n * item:
            raise _Unsupported("truncated PLAIN page")
        out[:n] = values[:n * item].view(out.dtype)
    elif encoding == _BYTE_STREAM_SPLIT:
        # byte k of every value is in stream k: streams (item, n) → values (n, item)
        if values.shape[0] < n * item:
            raise _Unsupported("truncated BYTE_STREAM_SPLIT page")
        _unsplit(values, n, out[:n])
    else:
        raise _Unsupported(f"value encoding {encoding}")


class _NotUniform(_Unsupported):
    """Internal: the levels show nulls, empty lists or rows of different lengths (the general path)."""


def _page_body_size(header: dict) -> int:
    """The compressed size of the page whose header is ``header``, checked."""
    usize, csize = header.get(2), header.get(3)
    if not isinstance(usize, int) or not isinstance(csize, int) or usize < 0 or csize < 0:
        raise _Unsupported("page header without sizes")
    return csize


def _chunk_pages(raw: np.ndarray):
    """Yield ``(header, body)`` for the pages of a column chunk held whole in ``raw``."""
    # every byte buffer the kernels see is then read-only like pyarrow.decompress's output: one numba
    # specialization per kernel and value width, not one per buffer origin
    raw.flags.writeable = False
    mv = memoryview(raw)  # page headers are parsed from a memoryview: int indexing, no numpy scalars
    pos = 0
    while True:
        header, pos = _page_header(mv, pos)
        csize = _page_body_size(header)
        if pos + csize > raw.shape[0]:
            raise _Unsupported("page runs past the column chunk")
        yield header, raw[pos:pos + csize]
        pos += csize


def _data_pages(pages, plan: dict):
    """Walk the chunk's pages (``(header, body)`` pairs from ``pages``); yield, per data page,
    ``(n, nulls, rep, defs, encoding, values, dictionary)``: n levels (nulls of them null, or -1 when a v1
    header does not say), the level streams (hybrid, no length prefix), the value encoding, the
    decompressed value bytes and the dictionary read so far (unsigned storage dtype) or None. Stops after
    ``plan["n_levels"]`` levels.
    """
    n_total, codec, storage = plan["n_levels"], plan["codec"], plan["storage"]
    dictionary = None
    filled = 0
    while filled < n_total:
        header, body = next(pages)
        _check_crc(header, body)
        ptype, usize, csize = header.get(1), header.get(2), body.shape[0]
        if ptype == _DICTIONARY_PAGE:
            dph = header.get(7) or {}
            count = dph.get(1, -1)
            if dph.get(2) not in (_PLAIN, _PLAIN_DICTIONARY) or count < 0:
                raise _Unsupported("dictionary page not PLAIN")
            page = _decompress(body, usize, codec)
            if page.shape[0] < count * storage.itemsize:
                raise _Unsupported("truncated dictionary page")
            dictionary = page[:count * storage.itemsize].view(storage).copy()  # aligned, ≤ a few MiB
            continue
        if ptype == _INDEX_PAGE:
            continue
        if ptype == _DATA_PAGE:
            dph = header.get(5) or {}
            n, nulls, encoding = dph.get(1, -1), -1, dph.get(2)
            page = _decompress(body, usize, codec)
            rep, p = _levels_v1(page, 0, dph.get(4))
            defs, p = _levels_v1(page, p, dph.get(3))
            values = page[p:]
        elif ptype == _DATA_PAGE_V2:
            dph = header.get(8) or {}
            n, nulls, encoding = dph.get(1, -1), dph.get(2, -1), dph.get(4)
            rlen, dlen = dph.get(6, -1), dph.get(5, -1)
            if nulls < 0 or rlen < 0 or dlen < 0 or rlen + dlen > csize:
                raise _Unsupported("v2 page with bad level lengths")
            rep, defs = body[:rlen], body[rlen:rlen + dlen]
            values = body[rlen + dlen:]
            if dph.get(7, True) and codec is not None:  # levels are never compressed in v2
                values = _decompress(values, usize - rlen - dlen, codec)
        else:
            raise _Unsupported(f"page type {ptype}")
        if n < 0 or filled + n > n_total:
            raise _Unsupported("more values than the chunk metadata says")
        yield n, nulls, rep, defs, encoding, values, dictionary
        filled += n


def _decode_uniform(raw: np.ndarray, plan: dict) -> np.ndarray:
    """All values of the chunk as the unsigned storage dtype, shape (n_rows * d,), when every row is a
    non-null list of d non-null values (checked on every page's levels; ``_NotUniform`` otherwise)."""
    n_total, d = plan["n_levels"], plan["d"]
    if d is None:
        raise _NotUniform("rows of different lengths")
    out = np.empty(n_total, plan["storage"])
    filled = 0
    for n, nulls, rep, defs, encoding, values, dictionary in _data_pages(_chunk_pages(raw), plan):
        _check_uniform_page(plan, filled, n, nulls, rep, defs)
        _decode_values(values, encoding, n, dictionary, out[filled:filled + n])
        filled += n
    return out


def _decode_general(raw: np.ndarray, plan: dict) -> pa.Array:
    """The chunk as pyarrow reads it when rows may be null, empty, of any length, with null items:
    levels materialised (one byte per level), then offsets, validity and item slots built in one pass."""
    arrow_type, n_rows, n_total, max_def = plan["arrow_type"], plan["n_rows"], plan["n_levels"], plan["max_def"]
    if pa.types.is_fixed_size_list(arrow_type):
        raise _Unsupported("null or short rows in a fixed-size list")
    list_def = int(plan["list_nullable"])  # def below this: a null row; equal: an empty list
    if max_def != list_def + 1 + int(plan["item_nullable"]):
        raise _Unsupported("definition levels do not match the Arrow schema's nullability")
    reps = np.empty(n_total, np.uint8)
    defs = np.empty(n_total, np.uint8)
    values = np.empty(n_total, plan["storage"])
    filled = n_values = 0
    for n, nulls, rep, dfs, encoding, page_values, dictionary in _data_pages(_chunk_pages(raw), plan):
        if not (_decode_levels(rep, 1, n, reps[filled:filled + n])
                and _decode_levels(dfs, _bit_width(max_def), n, defs[filled:filled + n])):
            raise _Unsupported("bad level stream")
        present = int(np.count_nonzero(defs[filled:filled + n] == max_def))
        if nulls >= 0 and present != n - nulls:
            raise _Unsupported("v2 page null count disagrees with its levels")
        _decode_values(page_values, encoding, present, dictionary, values[n_values:n_values + present])
        filled += n
        n_values += present
    large = pa.types.is_large_list(arrow_type)
    offsets = np.empty(n_rows + 1, np.int64 if large else np.int32)
    row_valid = np.empty(n_rows, np.uint8)
    items = np.empty(n_total, plan["storage"])
    item_valid = np.empty(n_total, np.uint8)
    n_items = _assemble(reps, defs, list_def, max_def, values[:n_values], offsets, row_valid, items, item_valid)
    if n_items < 0:
        raise _Unsupported("levels do not describe num_rows lists")
    item_bitmap = None if item_valid[:n_items].all() else _bitmap(item_valid[:n_items])
    row_bitmap = None if row_valid.all() else _bitmap(row_valid)
    child = pa.Array.from_buffers(plan["value_type"], n_items, [item_bitmap, pa.py_buffer(items[:n_items])])
    return pa.Array.from_buffers(arrow_type, n_rows, [row_bitmap, pa.py_buffer(offsets)], children=[child])


def _bitmap(valid: np.ndarray) -> pa.Buffer:
    return pa.py_buffer(np.packbits(valid.view(bool), bitorder="little"))


if HAVE_NUMBA:

    @_jit
    def _decode_levels(buf, bw, n, out):
        """out[:n] = the levels of the hybrid stream ``buf`` (bit width bw ≤ 8); False if it is short."""
        end = buf.shape[0]
        p = 0
        i = 0
        nbytes = (bw + 7) // 8
        mask = (np.int64(1) << bw) - 1
        while i < n:
            h, p = _run_header(buf, p, end)
            if h < 0:
                return False
            if h & 1:
                stop = p + (h >> 1) * bw
                if stop > end:
                    return False
                count = min((h >> 1) * 8, n - i)
                acc = np.int64(0)
                have = 0
                q = p
                for k in range(count):
                    while have < bw:
                        acc |= np.int64(buf[q]) << have
                        q += 1
                        have += 8
                    out[i + k] = acc & mask
                    acc >>= bw
                    have -= bw
                i += count
                p = stop
            else:
                c = h >> 1
                if p + nbytes > end or c == 0:
                    return False
                v = _rle_value(buf, p, nbytes)
                p += nbytes
                c = min(c, n - i)
                for k in range(c):
                    out[i + k] = v
                i += c
        return True

    @_jit
    def _assemble(reps, defs, list_def, max_def, values, offsets, row_valid, items, item_valid):
        """Rows from levels: a repetition level 0 starts a row; definition < list_def: the row is null;
        == list_def: empty; > list_def: an item slot, null unless == max_def (then the next value).
        Fills offsets (n_rows + 1), row_valid (n_rows), items/item_valid (item slots); returns the number
        of item slots, or -1 when the levels do not make exactly n_rows rows using every value."""
        n_rows = row_valid.shape[0]
        row = -1
        n_items = 0
        v = 0
        for i in range(reps.shape[0]):
            r = reps[i]
            dv = defs[i]
            if dv > max_def:
                return -1
            if r == 0:
                row += 1
                if row >= n_rows:
                    return -1
                offsets[row] = n_items
                row_valid[row] = 1 if dv >= list_def else 0
            elif r != 1 or row < 0 or dv <= list_def:  # a continuation must be another item
                return -1
            if dv > list_def:
                if dv == max_def:
                    if v >= values.shape[0]:
                        return -1
                    items[n_items] = values[v]
                    item_valid[n_items] = 1
                    v += 1
                else:
                    items[n_items] = 0
                    item_valid[n_items] = 0
                n_items += 1
        if row != n_rows - 1 or v != values.shape[0]:
            return -1
        offsets[n_rows] = n_items
        return n_items


def _to_arrow(values: np.ndarray, plan: dict) -> pa.Array:
    """Wrap the decoded values (n_rows * d,) zero-copy as the column's Arrow list type, no validity."""
    arrow_type, n_rows, d = plan["arrow_type"], plan["n_rows"], plan["d"]
    items = pa.Array.from_buffers(plan["value_type"], values.shape[0], [None, pa.py_buffer(values)])
    if pa.types.is_fixed_size_list(arrow_type):
        return pa.Array.from_buffers(arrow_type, n_rows, [None], children=[items])
    offsets = np.arange(n_rows + 1, dtype=np.int64 if pa.types.is_large_list(arrow_type) else np.int32) * d
    return pa.Array.from_buffers(arrow_type, n_rows, [None, pa.py_buffer(offsets)], children=[items])


def read_float_list_column(source, metadata: pq.FileMetaData, row_group: int, column: str) -> pa.Array | None:
    """One float-list column of one row group, decoded here; ``None`` when not decodable here.

    source: a seekable binary file object (``open(path, "rb")``, an fsspec file, a pyarrow NativeFile);
    metadata: that file's footer (``pq.read_metadata`` / ``ParquetFile.metadata``); row_group: its index;
    column: a top-level column name whose Arrow type is ``list`` / ``large_list`` / ``fixed_size_list`` of
    ``halffloat`` / ``float`` / ``double``.

    Returns an Arrow array of ``num_rows`` lists, of exactly the type pyarrow reads
    (``metadata.schema.to_arrow_schema()``), equal to
    ``ParquetFile(source).read_row_group(row_group, columns=[column]).column(column).combine_chunks()``.
    When every row holds ``d`` non-null values (the usual embedding column) it is one (num_rows * d,)
    values buffer wrapped zero-copy, no validity bitmaps; null rows, empty or ragged lists and null items
    are decoded exactly too (slower, for ``list`` / ``large_list``). ``None`` for another encoding / codec /
    type, a fixed-size list with null rows, or anything else unexpected (see the module docstring): the
    caller then reads with pyarrow. IO errors propagate. The source's position is moved.
    """
    if not HAVE_NUMBA:
        return None
    try:
        plan = _column_plan(metadata, row_group, column)
        raw = _read_exact(source, plan["start"], plan["size"])
        try:
            return _to_arrow(_decode_uniform(raw, plan), plan)
        except _NotUniform:
            return _decode_general(raw, plan)
    except _Unsupported:
        return None


# --------------------------------------------------------------------------------------------------------
# Streaming: the same decoding, a bounded number of rows at a time
# --------------------------------------------------------------------------------------------------------
class Unsupported(Exception):
    """Raised by ``FloatListStream.read`` when a page met mid-stream is outside what this module decodes
    (an encoding or codec the chunk's first pages did not show, rows that stop being lists of ``d``
    values, a damaged page). The rows already returned are right; the stream is finished and the caller
    reads the rest of the row group's column (from ``stream.rows_read`` on) with pyarrow."""


# Encodings a decodable chunk may list in its metadata (values, and levels: BIT_PACKED is listed by some
# parquet-mr versions without its pages using it; a page that does use it stops the stream).
_STREAM_ENCODINGS = {"PLAIN", "RLE", "RLE_DICTIONARY", "PLAIN_DICTIONARY", "BYTE_STREAM_SPLIT", "BIT_PACKED"}
_READ_AHEAD = 4 << 20  # bytes read from the source at a time (more when a page is larger)
_HEADER_PEEK = 1 << 10  # bytes a page header is first looked for in (statistics can make it longer)
_HEADER_MAX = 16 << 20  # a page header longer than this is refused (float statistics are a few bytes)


class _ChunkReader:
    """The pages of a column chunk read from ``source`` incrementally: a page header, then that page's
    bytes, through a read-ahead block of ``_READ_AHEAD`` bytes. Seeks before every read: the caller may
    share the file object with pyarrow, which moves its position between our reads."""

    def __init__(self, source, start: int, size: int):
        self.source, self.next, self.left = source, start, size  # file offset and bytes not yet read
        self.block, self.pos = np.empty(0, np.uint8), 0

    def _have(self) -> int:
        return self.block.shape[0] - self.pos

    def _fill(self, need: int) -> None:
        """Make at least ``need`` unread bytes available (fewer only where the chunk ends)."""
        have = self._have()
        if have >= need or not self.left:
            return
        more = min(self.left, max(need - have, _READ_AHEAD))
        block = np.empty(have + more, np.uint8)
        block[:have] = self.block[self.pos:]
        if _read_into(self.source, self.next, block[have:]) != more:
            raise _Unsupported("the file ends inside the column chunk")
        block.flags.writeable = False  # like pyarrow.decompress's output: one numba specialization
        self.block, self.pos = block, 0
        self.next += more
        self.left -= more

    def pages(self):
        """Yield ``(header, body)`` per page, as ``_chunk_pages`` does for a chunk held whole."""
        while True:
            peek = _HEADER_PEEK
            while True:
                self._fill(peek)
                try:
                    header, end = _page_header(memoryview(self.block), self.pos)
                    break
                except _Unsupported:
                    # the whole rest of the chunk was there, or a header no writer makes: malformed
                    if self._have() < peek or peek >= _HEADER_MAX:
                        raise
                    peek *= 4  # a long header (e.g. large statistics): look further
            size = _page_body_size(header)
            self.pos = end
            self._fill(size)
            if self._have() < size:
                raise _Unsupported("page runs past the column chunk")
            yield header, self.block[self.pos:self.pos + size]
            self.pos += size


class FloatListStream:
    """One float-list column of one row group, decoded ``read(n)`` rows at a time (``open_float_list_stream``).

    Only uniform chunks stream (every row a non-null list of ``d`` non-null values, as embeddings are);
    each ``read`` returns a fresh array that owns its values (zero-copy wrap, no validity bitmaps), of the
    column's Arrow type. Memory: the rows asked for + one decompressed page (+ its decoded values when
    the page straddles two reads) + the dictionary + a read-ahead block of a few MiB, whatever the chunk
    size. A page that turns out not decodable raises ``Unsupported``; the stream is then finished.
    """

    def __init__(self, plan: dict, pages, first):
        self._plan, self._pages = plan, pages
        self._carry = first  # decoded values (storage dtype) of a page, not yet returned
        self._filled = first.shape[0]  # levels (= values) decoded so far
        self._failed = False
        self.rows_read = 0
        self.num_rows = plan["n_rows"]

    def read(self, rows: int) -> pa.Array:
        """The next ``rows`` rows (fewer only at the end of the row group; 0 once it is all read)."""
        if self._failed:
            raise Unsupported("the stream stopped at an earlier error: read the rest with pyarrow")
        rows = max(0, min(rows, self.num_rows - self.rows_read))
        d = self._plan["d"]
        out = np.empty(rows * d, self._plan["storage"])
        got = min(self._carry.shape[0], out.shape[0])
        out[:got] = self._carry[:got]
        self._carry = self._carry[got:]
        try:
            while got < out.shape[0]:
                got += self._next_page(out[got:])
        except _Unsupported as err:
            self._failed = True
            raise Unsupported(f"stream stopped before row {self.rows_read} of {self.num_rows}: {err}; "
                              "read the rest with pyarrow") from err
        self.rows_read += rows
        return _to_arrow(out, dict(self._plan, n_rows=rows))

    def _next_page(self, out: np.ndarray) -> int:
        """Decode the next data page into ``out``: all of it, or its head when it is longer (the rest is
        carried over to the next read). Returns the number of values placed in ``out``."""
        n, nulls, rep, defs, encoding, values, dictionary = _next_data_page(self._pages)
        _check_uniform_page(self._plan, self._filled, n, nulls, rep, defs)
        self._filled += n
        if n <= out.shape[0]:  # the usual case: the page lands where it belongs, no copy
            _decode_values(values, encoding, n, dictionary, out[:n])
            return n
        page = np.empty(n, out.dtype)  # it straddles this read and the next: decoded aside
        _decode_values(values, encoding, n, dictionary, page)
        out[:] = page[:out.shape[0]]
        self._carry = page[out.shape[0]:]
        return out.shape[0]


def _next_data_page(pages):
    page = next(pages, None)
    if page is None:  # _data_pages stops at the chunk's value count, which is rows × d: never reached
        raise _Unsupported("the chunk ends before its last row")
    return page


def _check_uniform_page(plan: dict, filled: int, n: int, nulls: int, rep, defs) -> None:
    """``_NotUniform`` unless the page's ``n`` levels, starting at level ``filled``, are ``d``-value rows."""
    if nulls > 0:
        raise _NotUniform("a v2 page with nulls")
    if not _check_rep_levels(rep, 1, n, filled, plan["d"]):
        raise _NotUniform("rows are not all lists of the same length")
    if not _check_def_levels(defs, _bit_width(plan["max_def"]), n, plan["max_def"]):
        raise _NotUniform("null rows, empty lists or null items")


def open_float_list_stream(source, metadata: pq.FileMetaData, row_group: int, column: str) -> FloatListStream | None:
    """A ``FloatListStream`` over one float-list column of one row group, or ``None`` when this module
    does not stream it (then use ``read_float_list_column`` or pyarrow).

    Same arguments as ``read_float_list_column``. Decided before any row is returned, from the footer
    (type, codec, the encodings the chunk lists, row count × ``d`` = value count) and from the chunk's
    first pages (the dictionary page, and the first data page: decoded, and its levels checked uniform).
    Later pages are checked as they are read (``Unsupported``). The rows read one after another, to the
    end, equal ``read_float_list_column``'s array and pyarrow's read of the row group's column. The
    source's position is moved at every read; it may be used by others in between.
    """
    if not HAVE_NUMBA:
        return None
    try:
        plan = _column_plan(metadata, row_group, column)
        listed = set(metadata.row_group(row_group).column(plan["leaf"]).encodings)
        if plan["d"] is None or not listed <= _STREAM_ENCODINGS:
            return None
        pages = _data_pages(_ChunkReader(source, plan["start"], plan["size"]).pages(), plan)
        n, nulls, rep, defs, encoding, values, dictionary = _next_data_page(pages)
        _check_uniform_page(plan, 0, n, nulls, rep, defs)
        first = np.empty(n, plan["storage"])
        _decode_values(values, encoding, n, dictionary, first)
        return FloatListStream(plan, pages, first)
    except _Unsupported:
        return None


def iter_float_list_column(source, metadata: pq.FileMetaData, row_group: int, column: str, batch_rows: int):
    """Consecutive arrays of ``batch_rows`` rows (the last one shorter) of one float-list column of one row
    group, or ``None`` when it does not stream (``open_float_list_stream``). Their concatenation equals
    ``read_float_list_column(...)``; ``Unsupported`` mid-stream as ``FloatListStream.read``."""
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be at least 1, got {batch_rows}")
    stream = open_float_list_stream(source, metadata, row_group, column)
    if stream is None:
        return None

    def batches():
        while stream.rows_read < stream.num_rows:
            yield stream.read(batch_rows)

    return batches()


def page_summary(source, metadata: pq.FileMetaData, row_group: int, column: str) -> list[tuple[str, str, int]]:
    """(page type, value encoding, value count) of every page of the chunk, in file order, from the page
    headers only (nothing decompressed). For tests and debugging: e.g. shows where a writer fell back from
    dictionary indices to PLAIN pages. Raises ValueError when ``column`` is outside what this module reads.
    """
    names = {_DATA_PAGE: "DATA_PAGE", _INDEX_PAGE: "INDEX_PAGE", _DICTIONARY_PAGE: "DICTIONARY_PAGE",
             _DATA_PAGE_V2: "DATA_PAGE_V2"}
    encodings = {_PLAIN: "PLAIN", _PLAIN_DICTIONARY: "PLAIN_DICTIONARY", _RLE: "RLE",
                 _RLE_DICTIONARY: "RLE_DICTIONARY", _BYTE_STREAM_SPLIT: "BYTE_STREAM_SPLIT"}
    try:
        plan = _column_plan(metadata, row_group, column, decoding=False)
        raw = _read_exact(source, plan["start"], plan["size"])
        mv, pos, pages = memoryview(raw), 0, []
        while pos < raw.shape[0]:
            header, pos = _page_header(mv, pos)
            pos += header.get(3, 0)
            ptype = header.get(1)
            sub = header.get({_DATA_PAGE: 5, _DICTIONARY_PAGE: 7, _DATA_PAGE_V2: 8}.get(ptype, -1)) or {}
            encoding = sub.get(4 if ptype == _DATA_PAGE_V2 else 2)
            pages.append((names.get(ptype, str(ptype)), encodings.get(encoding, str(encoding)), sub.get(1, 0)))
    except _Unsupported as err:
        raise ValueError(f"{column!r} in row group {row_group}: {err}") from err
    return pages
