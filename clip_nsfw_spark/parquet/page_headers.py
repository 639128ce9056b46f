"""Parquet page headers: one Thrift ``PageHeader`` decoded and checked as a generated Thrift reader would.

``page_header(buf, pos)`` → ``({field id: value}, position after the header)``: the header as a dict keyed
by spec.PageHeader ids, nested page headers (data v1 / dictionary / data v2) as dicts keyed by their own
structs' ids (spec.DataPageHeader & co.), lists left as thrift.ThriftList. Unknown fields are decoded too,
i.e. skipped correctly whatever their type. ``Undecodable`` when the bytes run out or are not a Thrift
struct (a truncated or damaged header), when a field read here has another wire type than parquet.thrift
gives it (a generated reader would skip it, and then miss it), when a required field is missing (it
would refuse the header), or when a nested header's count, length or enum is negative.

``body_size(header)`` is the page's compressed size, checked.
"""

from __future__ import annotations

from clip_nsfw_spark.parquet.errors import Undecodable
from clip_nsfw_spark.parquet.spec import DataPageHeader, DataPageHeaderV2, DictionaryPageHeader, PageHeader
from clip_nsfw_spark.parquet.thrift import BOOL, I32, STRUCT, ThriftError, decode_struct

# The wire type of every PageHeader field read here, and of the fields of its nested page headers (by the
# PageHeader field holding them), with the fields parquet.thrift requires.
_HEADER_TYPES = {PageHeader.TYPE: I32, PageHeader.UNCOMPRESSED_PAGE_SIZE: I32, PageHeader.COMPRESSED_PAGE_SIZE: I32,
                 PageHeader.CRC: I32, PageHeader.DATA_PAGE_HEADER: STRUCT, PageHeader.INDEX_PAGE_HEADER: STRUCT,
                 PageHeader.DICTIONARY_PAGE_HEADER: STRUCT, PageHeader.DATA_PAGE_HEADER_V2: STRUCT}
_HEADER_REQUIRED = {PageHeader.TYPE, PageHeader.UNCOMPRESSED_PAGE_SIZE, PageHeader.COMPRESSED_PAGE_SIZE}
_V1 = DataPageHeader
_DICT = DictionaryPageHeader
_V2 = DataPageHeaderV2
_SUB_HEADERS = {
    PageHeader.DATA_PAGE_HEADER: (
        {_V1.NUM_VALUES: I32, _V1.ENCODING: I32, _V1.DEFINITION_LEVEL_ENCODING: I32,
         _V1.REPETITION_LEVEL_ENCODING: I32, _V1.STATISTICS: STRUCT},
        {_V1.NUM_VALUES, _V1.ENCODING, _V1.DEFINITION_LEVEL_ENCODING, _V1.REPETITION_LEVEL_ENCODING}),
    PageHeader.DICTIONARY_PAGE_HEADER: (
        {_DICT.NUM_VALUES: I32, _DICT.ENCODING: I32, _DICT.IS_SORTED: BOOL},
        {_DICT.NUM_VALUES, _DICT.ENCODING}),
    PageHeader.DATA_PAGE_HEADER_V2: (
        {_V2.NUM_VALUES: I32, _V2.NUM_NULLS: I32, _V2.NUM_ROWS: I32, _V2.ENCODING: I32,
         _V2.DEFINITION_LEVELS_BYTE_LENGTH: I32, _V2.REPETITION_LEVELS_BYTE_LENGTH: I32, _V2.IS_COMPRESSED: BOOL,
         _V2.STATISTICS: STRUCT},
        {_V2.NUM_VALUES, _V2.NUM_NULLS, _V2.NUM_ROWS, _V2.ENCODING, _V2.DEFINITION_LEVELS_BYTE_LENGTH,
         _V2.REPETITION_LEVELS_BYTE_LENGTH}),
}


def page_header(buf, pos: int) -> tuple[dict, int]:
    """Decode one PageHeader at ``buf[pos:]``; returns (fields by thrift id, position after the header)."""
    try:
        fields, end = decode_struct(buf, pos)
    except ThriftError as err:
        raise Undecodable(f"page header: {err}") from err
    _check_types(fields, _HEADER_TYPES, _HEADER_REQUIRED, "page header")
    return _as_dict(fields), end


def body_size(header: dict) -> int:
    """The compressed size of the page whose header is ``header``, checked."""
    usize, csize = header.get(PageHeader.UNCOMPRESSED_PAGE_SIZE), header.get(PageHeader.COMPRESSED_PAGE_SIZE)
    if not isinstance(usize, int) or not isinstance(csize, int) or usize < 0 or csize < 0:
        raise Undecodable("page header without sizes")
    return csize


def _as_dict(fields: list) -> dict:
    """A decoded Thrift struct as ``{field id: value}``, nested structs too (lists stay thrift.ThriftList)."""
    return {f.id: _as_dict(f.value) if f.type == STRUCT else f.value for f in fields}


def _check_types(fields: list, types: dict, required: set, what: str) -> None:
    """``Undecodable`` when a field in ``types`` has another wire type or a ``required`` field is missing."""
    for f in fields:
        if f.id in types and f.type != types[f.id]:
            raise Undecodable(f"{what} field {f.id} has wire type {f.type}, expected {types[f.id]}")
        if what != "page header" and types.get(f.id) == I32 and f.value < 0:  # counts, lengths, enums
            raise Undecodable(f"{what} field {f.id} is negative ({f.value})")
        if f.id in _SUB_HEADERS and what == "page header":
            _check_types(f.value, *_SUB_HEADERS[f.id], f"page header field {f.id}")
    missing = required - {f.id for f in fields}
    if missing:
        raise Undecodable(f"{what} without its required field(s) {sorted(missing)}")
