"""What one float-list column chunk must be, from the footer alone: ``plan_chunk`` → ``ChunkPlan``.

``plan_chunk(metadata, row_group, column)`` checks, before any page is read, everything the decoders rely
on that the footer says: a top-level ``list`` / ``large_list`` / ``fixed_size_list`` of ``halffloat`` /
``float`` / ``double`` (the stored Arrow schema applied), one leaf with one repetition level, a physical
type matching the value type (spec.FLOAT_LEAVES), the chunk in this file, a codec decoded here, a
non-empty row group, fixed-size lists of the chunk's row width. Anything else raises ``Undecodable``.
The ``ChunkPlan`` it returns is then the decoders' only view of the footer.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clip_nsfw_spark.parquet.errors import Undecodable
from clip_nsfw_spark.parquet.spec import FLOAT_LEAVES, PhysicalType

# pyarrow's names of the codecs (ColumnChunkMetaData.compression) → pyarrow.decompress codec; None: stored.
# BROTLI and LZ4_RAW (pyarrow says "LZ4") are left to pyarrow: their streams hold no decompressed length to
# check a page by, and pyarrow.decompress returns the length it is told whatever the data held.
CODECS = {"UNCOMPRESSED": None, "SNAPPY": "snappy", "GZIP": "gzip", "ZSTD": "zstd"}


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
    """One float-list column chunk of one row group, as its footer describes it (checked)."""

    arrow_type: pa.DataType  # the column's type as pyarrow reads it: list / large_list / fixed_size_list
    value_type: pa.DataType  # halffloat / float / double
    storage: np.dtype  # unsigned dtype of the values' bits (<u2 / <u4 / <u8): what the kernels fill
    codec: str | None  # pyarrow.decompress codec, None: stored (planned with decoding=False: pyarrow's name)
    list_nullable: bool  # the list field may be null (definition levels then say null rows)
    item_nullable: bool  # the items may be null
    n_rows: int  # rows in the row group (≥ 1)
    d: int | None  # values per row if every row can have the same length (levels / rows), else None
    n_levels: int  # levels in the chunk (ColumnMetaData.num_values): one per value, null or empty slot
    max_def: int  # the leaf's maximum definition level (≥ 1): a present value
    start: int  # file offset of the chunk's first page (the dictionary page when there is one)
    size: int  # the chunk's bytes (total compressed size): pages end exactly there
    leaf: int  # the leaf's column index in the file's schema

    @property
    def def_bit_width(self) -> int:
        """Bit width of the definition levels' hybrid streams."""
        return int(self.max_def).bit_length()


def plan_chunk(metadata: pq.FileMetaData, row_group: int, column: str, decoding: bool = True) -> ChunkPlan:
    """What the chunk must be, from the footer: arrow type, leaf index, levels, d, value dtype, codec
    (``decoding=False``: any codec, for reading page headers only). ``Undecodable`` otherwise."""
    schema = metadata.schema.to_arrow_schema()  # applies the stored ARROW:schema (large/fixed-size lists)
    if schema.get_field_index(column) < 0:  # missing, or the name is duplicated
        raise Undecodable(f"no single top-level column {column!r}")
    arrow_type = schema.field(column).type
    if not (pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)
            or pa.types.is_fixed_size_list(arrow_type)):
        raise Undecodable(f"{column!r} is {arrow_type}, not a list")
    value_type = arrow_type.value_type
    leaves = [i for i in range(metadata.num_columns)
              if metadata.schema.column(i).path.split(".")[0] == column]
    if len(leaves) != 1 or "." in column:
        raise Undecodable(f"{column!r} is not one leaf column")
    leaf = leaves[0]
    desc = metadata.schema.column(leaf)
    if desc.max_repetition_level != 1 or desc.max_definition_level < 1:
        raise Undecodable("not a single-level list")
    physical = desc.physical_type
    stored = FLOAT_LEAVES.get(value_type)
    if stored is None or physical != stored.physical.name or (  # halffloat: FIXED_LEN_BYTE_ARRAY(2), FLOAT16
            stored.physical == PhysicalType.FIXED_LEN_BYTE_ARRAY
            and (desc.length != 2 or desc.logical_type.type != "FLOAT16")):
        raise Undecodable(f"{physical} stored as {value_type}")
    chunk = metadata.row_group(row_group).column(leaf)
    if chunk.file_path:  # the chunk lives in another file (external column chunk), not in ``source``
        raise Undecodable(f"column chunk in {chunk.file_path!r}")
    codec = chunk.compression
    if codec not in CODECS and decoding:
        raise Undecodable(f"codec {codec}")
    n_rows = metadata.row_group(row_group).num_rows
    n_levels = chunk.num_values
    if n_rows <= 0 or n_levels <= 0:
        raise Undecodable("an empty row group")
    d = None if n_levels % n_rows else n_levels // n_rows  # None: not all rows can have one length
    if pa.types.is_fixed_size_list(arrow_type) and arrow_type.list_size != d:
        raise Undecodable("fixed-size list of another size")
    if pa.types.is_list(arrow_type) and n_levels >= 2**31:
        raise Undecodable("more values than int32 offsets hold")
    start = chunk.data_page_offset
    if chunk.has_dictionary_page and chunk.dictionary_page_offset:  # 0: unset by some old writers
        start = min(start, chunk.dictionary_page_offset)
    return ChunkPlan(arrow_type=arrow_type, value_type=value_type, storage=stored.storage,
                     codec=CODECS.get(codec, codec), list_nullable=schema.field(column).nullable,
                     item_nullable=arrow_type.value_field.nullable, n_rows=n_rows, d=d, n_levels=n_levels,
                     max_def=desc.max_definition_level, start=start, size=chunk.total_compressed_size, leaf=leaf)
