"""Why decoding a float-list column chunk stops: the decoder's exceptions, public and internal.

* ``Damaged`` (public, raised to the caller): a page's bytes do not match the CRC-32 its header records.
  The file is damaged; no reader accepts it, so the caller must not fall back to another one.
* ``Unsupported`` (public, raised by a stream mid-way): a page met after the first rows were returned is
  outside what this package decodes; the rows returned are right, the caller reads the rest with pyarrow.
* ``Undecodable`` (internal): the chunk is outside what this package decodes (type, codec, encoding, a
  size or count that does not add up). The public entry points turn it into ``None`` (pyarrow reads) or,
  mid-stream, into ``Unsupported``.
* ``NotUniform`` (internal, an ``Undecodable``): the levels show null rows, empty lists, rows of other
  lengths or null items: whole-chunk decoding then takes its general path, a stream stops.
"""


class Damaged(Exception):
    """A page's bytes do not match the CRC-32 its header records: the file is damaged (pyarrow with
    ``page_checksum_verification`` refuses it too). Raised, never answered with ``None``: a caller must
    not read the chunk another way."""


class Unsupported(Exception):
    """Raised by ``FloatListStream.read`` when a page met mid-stream is outside what this package decodes
    (an encoding or codec the chunk's first pages did not show, rows that stop being lists of ``d``
    values, a damaged page). The rows already returned are right; the stream is finished and the caller
    reads the rest of the row group's column (from ``stream.rows_read`` on) with pyarrow."""


class Undecodable(Exception):
    """Internal: the chunk is outside what this package decodes; the public functions return None."""


class NotUniform(Undecodable):
    """Internal: the levels show nulls, empty lists or rows of different lengths (the general path)."""
