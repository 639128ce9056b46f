"""A column chunk's pages → its data pages: CRC-checked, decompressed, level streams and value bytes apart.

``data_pages(pages, plan)`` takes ``(header, body)`` pairs (page_headers.py's header dicts, the page's
compressed bytes: decode.py yields them from a chunk held whole, stream.py from a read-ahead block) and
yields one ``DataPage`` per data page, v1 or v2, until the plan's level count is reached: the dictionary
page is decoded on the way (PLAIN, to the storage dtype), index pages are skipped. Each page's CRC-32 is
checked before anything else (``Damaged``); every size the header states is checked against the bytes
independently of the codec call (``decompress``), and anything that does not add up is ``Undecodable``.

``check_uniform_page(plan, filled, page)`` raises ``NotUniform`` unless the page's levels are whole rows
of ``d`` present values (levels.py's check kernels, never materialising the levels).

``read_exact`` / ``read_into`` read a byte range of the source into numpy buffers.
"""

from __future__ import annotations

import zlib
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from clip_nsfw_spark.parquet.checksum import crc32
from clip_nsfw_spark.parquet.chunk_plan import ChunkPlan
from clip_nsfw_spark.parquet.errors import Damaged, NotUniform, Undecodable
from clip_nsfw_spark.parquet.levels import check_def_levels, check_rep_levels
from clip_nsfw_spark.parquet.spec import (DataPageHeader, DataPageHeaderV2, DictionaryPageHeader, Encoding, PageHeader,
                                          PageType)


class DataPage(NamedTuple):
    """One data page, levels and values apart, ready for the kernels."""

    n: int  # levels on the page (values, null items, null rows, empty lists)
    nulls: int  # of them not a value: known on v2 pages, -1 on v1 (the levels say)
    rep: np.ndarray  # repetition levels: a hybrid stream, no length prefix
    defs: np.ndarray  # definition levels: likewise
    encoding: int  # the values' Encoding
    values: np.ndarray  # the decompressed value bytes
    dictionary: np.ndarray | None  # the chunk's dictionary read so far (storage dtype), None before one


def data_pages(pages, plan: ChunkPlan):
    """Walk the chunk's pages (``(header, body)`` pairs from ``pages``); yield a ``DataPage`` per data
    page. Stops after ``plan.n_levels`` levels."""
    n_total, codec, storage = plan.n_levels, plan.codec, plan.storage
    dictionary = None
    filled = 0
    while filled < n_total:
        header, body = next(pages)
        check_crc(header, body)
        ptype, usize, csize = header.get(PageHeader.TYPE), header.get(PageHeader.UNCOMPRESSED_PAGE_SIZE), body.shape[0]
        if ptype == PageType.DICTIONARY_PAGE:
            dph = header.get(PageHeader.DICTIONARY_PAGE_HEADER) or {}
            count = dph.get(DictionaryPageHeader.NUM_VALUES, -1)
            if dph.get(DictionaryPageHeader.ENCODING) not in (Encoding.PLAIN, Encoding.PLAIN_DICTIONARY) or count < 0:
                raise Undecodable("dictionary page not PLAIN")
            page = decompress(body, usize, codec)
            if page.shape[0] < count * storage.itemsize:
                raise Undecodable("truncated dictionary page")
            dictionary = page[:count * storage.itemsize].view(storage).copy()  # aligned, ≤ a few MiB
            continue
        if ptype == PageType.INDEX_PAGE:
            continue
        if ptype == PageType.DATA_PAGE:
            dph = header.get(PageHeader.DATA_PAGE_HEADER) or {}
            n, nulls, encoding = dph.get(DataPageHeader.NUM_VALUES, -1), -1, dph.get(DataPageHeader.ENCODING)
            page = decompress(body, usize, codec)
            rep, p = _levels_v1(page, 0, dph.get(DataPageHeader.REPETITION_LEVEL_ENCODING))
            defs, p = _levels_v1(page, p, dph.get(DataPageHeader.DEFINITION_LEVEL_ENCODING))
            values = page[p:]
        elif ptype == PageType.DATA_PAGE_V2:
            dph = header.get(PageHeader.DATA_PAGE_HEADER_V2) or {}
            n, nulls = dph.get(DataPageHeaderV2.NUM_VALUES, -1), dph.get(DataPageHeaderV2.NUM_NULLS, -1)
            encoding = dph.get(DataPageHeaderV2.ENCODING)
            rlen = dph.get(DataPageHeaderV2.REPETITION_LEVELS_BYTE_LENGTH, -1)
            dlen = dph.get(DataPageHeaderV2.DEFINITION_LEVELS_BYTE_LENGTH, -1)
            if nulls < 0 or rlen < 0 or dlen < 0 or rlen + dlen > csize:
                raise Undecodable("v2 page with bad level lengths")
            rep, defs = body[:rlen], body[rlen:rlen + dlen]
            values = body[rlen + dlen:]
            if dph.get(DataPageHeaderV2.IS_COMPRESSED, True) and codec is not None:  # levels never are in v2
                values = decompress(values, usize - rlen - dlen, codec)
        else:
            raise Undecodable(f"page type {ptype}")
        if n < 0 or filled + n > n_total:
            raise Undecodable("more values than the chunk metadata says")
        yield DataPage(n, nulls, rep, defs, encoding, values, dictionary)
        filled += n


def check_uniform_page(plan: ChunkPlan, filled: int, page: DataPage) -> None:
    """``NotUniform`` unless the page's levels, starting at level ``filled``, are ``d``-value rows."""
    if page.nulls > 0:
        raise NotUniform("a v2 page with nulls")
    if not check_rep_levels(page.rep, 1, page.n, filled, plan.d):
        raise NotUniform("rows are not all lists of the same length")
    if not check_def_levels(page.defs, plan.def_bit_width, page.n, plan.max_def):
        raise NotUniform("null rows, empty lists or null items")


def check_crc(header: dict, body: np.ndarray) -> None:
    """``Damaged`` when the page header records a CRC-32 that its bytes do not have."""
    recorded = header.get(PageHeader.CRC)
    if recorded is not None and crc32(body) != recorded & 0xFFFFFFFF:
        raise Damaged(f"page CRC-32 mismatch: the header records {recorded & 0xFFFFFFFF:#010x}, the "
                      f"{body.shape[0]} bytes have {crc32(body):#010x}")


def decompress(body: np.ndarray, size: int, codec: str | None) -> np.ndarray:
    """A page's ``size`` decompressed bytes, their length established independently of the header's
    ``size`` (``Undecodable`` when it differs or the data does not decompress)."""
    if codec is None:
        if body.shape[0] != size:
            raise Undecodable("stored page of the wrong size")
        return body
    if codec == "gzip":  # zlib says how long the data really is, and checks gzip's CRC-32 and length trailer
        inflater = zlib.decompressobj(wbits=47)  # a gzip or zlib header, as Arrow's codec accepts
        try:
            out = inflater.decompress(body, size + 1)
        except zlib.error as err:
            raise Undecodable(f"gzip page does not decompress: {err}") from err
        if len(out) != size or not inflater.eof or inflater.unused_data or inflater.unconsumed_tail:
            raise Undecodable(f"gzip page of {len(out)}+ bytes, its header says {size}")
        return np.frombuffer(out, np.uint8)
    if codec == "snappy" and _snappy_length(body) != size:
        raise Undecodable(f"snappy page of {_snappy_length(body)} bytes, its header says {size}")
    try:  # zstd: the decoder itself refuses a frame that does not end at exactly ``size`` bytes
        out = pa.decompress(body, decompressed_size=size, codec=codec, asbytes=False)
    except (pa.ArrowException, ValueError) as err:
        raise Undecodable(f"{codec} page does not decompress: {err}") from err
    if out.size != size:
        raise Undecodable("decompressed page of the wrong size")
    return np.frombuffer(out, np.uint8)


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


def _levels_v1(page: np.ndarray, p: int, encoding) -> tuple[np.ndarray, int]:
    """A v1 page's level stream (RLE with a 4-byte length prefix) at ``page[p:]`` and the position after."""
    if encoding != Encoding.RLE:
        raise Undecodable(f"level encoding {encoding}")
    if p + 4 > page.shape[0]:
        raise Undecodable("truncated levels")
    length = int.from_bytes(page[p:p + 4].tobytes(), "little")
    if p + 4 + length > page.shape[0]:
        raise Undecodable("truncated levels")
    return page[p + 4:p + 4 + length], p + 4 + length


def read_exact(source, start: int, size: int) -> np.ndarray:
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
        raise Undecodable("the file ends inside the column chunk")
    return data


def read_into(source, start: int, out: np.ndarray) -> int:
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
