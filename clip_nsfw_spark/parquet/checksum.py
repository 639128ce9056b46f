"""The CRC-32 of parquet page headers (zlib's polynomial, as parquet-format specifies).

zlib-ng's (a dependency: PCLMULQDQ/VPCLMULQDQ folding, ~24 GB/s on the AMD EPYC of docs/performance.md)
where it is installed, else the standard library's zlib (~4 GB/s there: 0.37 µs per 768-d float16 row,
paid once writing each page and once reading it back). Both give the same value for the same bytes.
"""

from __future__ import annotations

try:
    from zlib_ng.zlib_ng import crc32
except ImportError:  # pragma: no cover - zlib-ng is a dependency; a missing wheel only costs speed
    from zlib import crc32

__all__ = ["crc32"]
