"""The parquet format's numbers, named as ``parquet.thrift`` (apache/parquet-format) names them: one place.

* Enum values: ``PageType``, ``Encoding``, ``PhysicalType`` (parquet.thrift's ``Type``),
  ``CompressionCodec``: ``IntEnum``s, so they compare equal to the plain ints a decoded header or footer
  holds (``header[PageHeader.TYPE] == PageType.DATA_PAGE``) and encode as those ints.
* Thrift field ids of the structs this package reads or writes: one class per struct, its fields as int
  constants (``ColumnMetaData.DATA_PAGE_OFFSET == 9``). Plain ints, not enums: a decoded ``Field.id`` is
  the number on the wire, and messages that name a field id print that number.
* ``FLOAT_LEAVES``: how each Arrow float type is stored in a parquet leaf (physical type) and the unsigned
  numpy dtype of its bits, which the decoder fills and the spliced writer writes.

Only names are defined here: which fields must be present, and with which wire types, is the business of
the code that reads them (page_headers.py for page headers).
"""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple

import numpy as np
import pyarrow as pa


class PhysicalType(IntEnum):
    """parquet.thrift ``enum Type``: how a leaf's values are stored."""

    BOOLEAN = 0
    INT32 = 1
    INT64 = 2
    INT96 = 3
    FLOAT = 4
    DOUBLE = 5
    BYTE_ARRAY = 6
    FIXED_LEN_BYTE_ARRAY = 7


class Encoding(IntEnum):
    """parquet.thrift ``enum Encoding`` (values, and levels: RLE / BIT_PACKED)."""

    PLAIN = 0
    PLAIN_DICTIONARY = 2
    RLE = 3
    BIT_PACKED = 4
    DELTA_BINARY_PACKED = 5
    DELTA_LENGTH_BYTE_ARRAY = 6
    DELTA_BYTE_ARRAY = 7
    RLE_DICTIONARY = 8
    BYTE_STREAM_SPLIT = 9


class CompressionCodec(IntEnum):
    """parquet.thrift ``enum CompressionCodec``."""

    UNCOMPRESSED = 0
    SNAPPY = 1
    GZIP = 2
    LZO = 3
    BROTLI = 4
    LZ4 = 5  # Hadoop's framing, deprecated
    ZSTD = 6
    LZ4_RAW = 7


class PageType(IntEnum):
    """parquet.thrift ``enum PageType``."""

    DATA_PAGE = 0
    INDEX_PAGE = 1
    DICTIONARY_PAGE = 2
    DATA_PAGE_V2 = 3


# ---------------------------------------------------------------------------------------------------------
# Thrift field ids, struct by struct (only the structs this package touches; every field of each listed)
# ---------------------------------------------------------------------------------------------------------
class FileMetaData:
    VERSION = 1
    SCHEMA = 2  # list<SchemaElement>, depth first
    NUM_ROWS = 3
    ROW_GROUPS = 4
    KEY_VALUE_METADATA = 5
    CREATED_BY = 6
    COLUMN_ORDERS = 7
    ENCRYPTION_ALGORITHM = 8
    FOOTER_SIGNING_KEY_METADATA = 9


class SchemaElement:
    TYPE = 1
    TYPE_LENGTH = 2
    REPETITION_TYPE = 3
    NAME = 4
    NUM_CHILDREN = 5  # set on group nodes only
    CONVERTED_TYPE = 6
    SCALE = 7
    PRECISION = 8
    FIELD_ID = 9
    LOGICAL_TYPE = 10


class RowGroup:
    COLUMNS = 1  # list<ColumnChunk>, one per leaf
    TOTAL_BYTE_SIZE = 2  # uncompressed
    NUM_ROWS = 3
    SORTING_COLUMNS = 4
    FILE_OFFSET = 5
    TOTAL_COMPRESSED_SIZE = 6
    ORDINAL = 7


class ColumnChunk:
    FILE_PATH = 1
    FILE_OFFSET = 2  # deprecated
    META_DATA = 3  # ColumnMetaData
    OFFSET_INDEX_OFFSET = 4
    OFFSET_INDEX_LENGTH = 5
    COLUMN_INDEX_OFFSET = 6
    COLUMN_INDEX_LENGTH = 7
    CRYPTO_METADATA = 8
    ENCRYPTED_COLUMN_METADATA = 9


class ColumnMetaData:
    TYPE = 1  # PhysicalType
    ENCODINGS = 2
    PATH_IN_SCHEMA = 3
    CODEC = 4  # CompressionCodec
    NUM_VALUES = 5  # levels, nulls included
    TOTAL_UNCOMPRESSED_SIZE = 6
    TOTAL_COMPRESSED_SIZE = 7
    KEY_VALUE_METADATA = 8
    DATA_PAGE_OFFSET = 9
    INDEX_PAGE_OFFSET = 10
    DICTIONARY_PAGE_OFFSET = 11
    STATISTICS = 12
    ENCODING_STATS = 13  # list<PageEncodingStats>
    BLOOM_FILTER_OFFSET = 14
    BLOOM_FILTER_LENGTH = 15
    SIZE_STATISTICS = 16
    GEOSPATIAL_STATISTICS = 17


class PageEncodingStats:
    PAGE_TYPE = 1
    ENCODING = 2
    COUNT = 3


class PageHeader:
    TYPE = 1  # PageType
    UNCOMPRESSED_PAGE_SIZE = 2
    COMPRESSED_PAGE_SIZE = 3
    CRC = 4  # CRC-32 of the page's (compressed) bytes, as a signed i32
    DATA_PAGE_HEADER = 5
    INDEX_PAGE_HEADER = 6
    DICTIONARY_PAGE_HEADER = 7
    DATA_PAGE_HEADER_V2 = 8


class DataPageHeader:
    NUM_VALUES = 1  # levels, nulls included
    ENCODING = 2
    DEFINITION_LEVEL_ENCODING = 3
    REPETITION_LEVEL_ENCODING = 4
    STATISTICS = 5


class DictionaryPageHeader:
    NUM_VALUES = 1
    ENCODING = 2
    IS_SORTED = 3


class DataPageHeaderV2:
    NUM_VALUES = 1
    NUM_NULLS = 2
    NUM_ROWS = 3
    ENCODING = 4
    DEFINITION_LEVELS_BYTE_LENGTH = 5
    REPETITION_LEVELS_BYTE_LENGTH = 6
    IS_COMPRESSED = 7  # default true; levels are never compressed
    STATISTICS = 8


# ---------------------------------------------------------------------------------------------------------
# Float-list leaves
# ---------------------------------------------------------------------------------------------------------
class FloatLeaf(NamedTuple):
    """How a float value type is stored in a parquet leaf."""

    physical: PhysicalType  # FIXED_LEN_BYTE_ARRAY(2) with the FLOAT16 logical type for halffloat
    storage: np.dtype  # little-endian unsigned dtype of the values' bits (decoded and written as bits)


FLOAT_LEAVES = {pa.float16(): FloatLeaf(PhysicalType.FIXED_LEN_BYTE_ARRAY, np.dtype("<u2")),
                pa.float32(): FloatLeaf(PhysicalType.FLOAT, np.dtype("<u4")),
                pa.float64(): FloatLeaf(PhysicalType.DOUBLE, np.dtype("<u8"))}
