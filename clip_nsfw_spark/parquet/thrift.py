"""Thrift compact protocol, both ways, keeping every field's wire type: enough to rewrite a parquet footer.

A struct decodes to a list of ``Field(id, type, value)`` in wire order; ``encode_struct`` writes that list
back. Values: ``int`` for byte/i16/i32/i64, ``bool``, ``bytes`` for binary (strings too) and for a double
(its 8 raw bytes: never converted, so never altered), ``ThriftList(element_type, items)`` for lists and
sets, a nested field list for structs. Maps are refused (parquet's footer has none).

Decoding then encoding gives back the same bytes for anything a standard Thrift library wrote (tests
check it on pyarrow's footers), so a footer can be edited field by field without knowing every field.
"""

from __future__ import annotations

from typing import NamedTuple

BOOL, BYTE, I16, I32, I64, DOUBLE, BINARY, LIST, SET, MAP, STRUCT = 1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12
_TRUE, _FALSE = 1, 2  # the two wire types of a bool field; a decoded Field says BOOL for both
_MAX_DEPTH = 32


class ThriftError(ValueError):
    """The bytes are not a Thrift compact struct this module reads."""


class ThriftList(NamedTuple):
    element_type: int
    items: list


class Field(NamedTuple):
    id: int
    type: int
    value: object


def decode_struct(buf: bytes, pos: int = 0) -> tuple[list[Field], int]:
    """The struct at ``buf[pos:]`` as a field list, and the position after it."""
    if not 0 <= pos < len(buf):
        raise ThriftError(f"no Thrift struct at {pos} in {len(buf)} bytes")
    reader = _Reader(buf, pos)
    return reader.struct(0), reader.pos


def encode_struct(fields: list[Field]) -> bytes:
    """The compact-protocol bytes of a field list (fields written in list order, ids need not ascend)."""
    out = bytearray()
    _write_struct(out, fields)
    return bytes(out)


def get(fields: list[Field], field_id: int, default=None):
    """The value of field ``field_id``, or ``default`` when absent."""
    for field in fields:
        if field.id == field_id:
            return field.value
    return default


def with_fields(fields: list[Field], changes: dict[int, tuple[int, object] | None]) -> list[Field]:
    """``fields`` with ``changes`` applied, in ascending id order (as Thrift writers emit them):
    ``{id: (type, value)}`` sets a field (replaced, or added), ``{id: None}`` removes it."""
    out = [f if f.id not in changes else Field(f.id, *changes[f.id]) for f in fields
           if not (f.id in changes and changes[f.id] is None)]
    present = {f.id for f in out}
    for field_id, change in changes.items():
        if change is not None and field_id not in present:
            out.append(Field(field_id, *change))
    return sorted(out, key=lambda f: f.id)


class _Reader:
    def __init__(self, buf: bytes, pos: int):
        self.buf, self.pos = buf, pos

    def byte(self) -> int:
        if self.pos >= len(self.buf):
            raise ThriftError("truncated Thrift struct")
        b = self.buf[self.pos]
        self.pos += 1
        return b

    def varint(self) -> int:
        shift = result = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7
            if shift > 63:
                raise ThriftError("varint longer than 64 bits")

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise ThriftError("truncated Thrift struct")
        out = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return out

    def value(self, ttype: int, depth: int):
        if depth > _MAX_DEPTH:
            raise ThriftError("Thrift struct nested too deep")
        if ttype == BYTE:
            return self.byte()
        if ttype in (I16, I32, I64):
            return self.zigzag()
        if ttype == DOUBLE:
            return self.take(8)
        if ttype == BINARY:
            return self.take(self.varint())
        if ttype in (LIST, SET):
            head = self.byte()
            size, etype = head >> 4, head & 0x0F
            if size == 15:
                size = self.varint()
            if etype in (_TRUE, _FALSE):  # in a list a bool is a byte of its own
                return ThriftList(BOOL, [self.byte() == 1 for _ in range(size)])
            return ThriftList(etype, [self.value(etype, depth + 1) for _ in range(size)])
        if ttype == STRUCT:
            return self.struct(depth + 1)
        raise ThriftError(f"Thrift compact type {ttype} not read here")

    def struct(self, depth: int) -> list[Field]:
        fields, last = [], 0
        while True:
            head = self.byte()
            if head == 0:  # STOP
                return fields
            delta, ttype = head >> 4, head & 0x0F
            field_id = last + delta if delta else self.zigzag()
            if ttype in (_TRUE, _FALSE):
                fields.append(Field(field_id, BOOL, ttype == _TRUE))
            else:
                fields.append(Field(field_id, ttype, self.value(ttype, depth)))
            last = field_id


def uleb128(n: int) -> bytes:
    """``n`` ≥ 0 as an unsigned LEB128 varint (Thrift's compact integers, parquet's RLE run headers)."""
    out = bytearray()
    _varint(out, n)
    return bytes(out)


def _varint(out: bytearray, n: int) -> None:
    if n < 0:
        raise ThriftError("negative varint")
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _zigzag(out: bytearray, n: int) -> None:
    _varint(out, (n << 1) ^ (n >> 63) if n < 0 else n << 1)


def _write_value(out: bytearray, ttype: int, value) -> None:
    if ttype == BYTE:
        out.append(value & 0xFF)
    elif ttype in (I16, I32, I64):
        _zigzag(out, value)
    elif ttype == DOUBLE:
        if len(value) != 8:
            raise ThriftError("a double is 8 bytes")
        out += value
    elif ttype == BINARY:
        _varint(out, len(value))
        out += value
    elif ttype in (LIST, SET):
        etype, items = value
        wire = _TRUE if etype == BOOL else etype
        if len(items) < 15:
            out.append((len(items) << 4) | wire)
        else:
            out.append(0xF0 | wire)
            _varint(out, len(items))
        for item in items:
            if etype == BOOL:
                out.append(1 if item else 2)
            else:
                _write_value(out, etype, item)
    elif ttype == STRUCT:
        _write_struct(out, value)
    else:
        raise ThriftError(f"Thrift compact type {ttype} not written here")


def _write_struct(out: bytearray, fields: list[Field]) -> None:
    last = 0
    for field_id, ttype, value in fields:
        wire = (_TRUE if value else _FALSE) if ttype == BOOL else ttype
        delta = field_id - last
        if 0 < delta <= 15:
            out.append((delta << 4) | wire)
        else:
            out.append(wire)
            _zigzag(out, field_id)
        if ttype != BOOL:
            _write_value(out, ttype, value)
        last = field_id
    out.append(0)  # STOP
