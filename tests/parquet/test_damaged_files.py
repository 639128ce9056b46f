"""Damaged parquet files: the job's reader is at least as strict as pyarrow with checksum verification.

The rule (docs/faults.md, "What the parquet reader and writer guarantee"), checked on every damaged file here: when pyarrow reading
with ``page_checksum_verification=True`` refuses the file, the job's reader refuses it too, with one
``DamagedInputError`` (permanent: never retried) naming the file and the row group; when pyarrow reads it,
the job's reader either refuses it or returns pyarrow's values bit for bit. Never a third answer.

Damage is made on real files of every codec, page version and encoding the writers make (with and without
page CRCs): truncated chunks, flipped bytes in page headers, bodies and dictionaries, page headers that lie
about sizes and counts, wrong CRCs, wrong dictionary index bit widths, then a seeded fuzz loop over page
header fields and bytes. Both of the job's paths are checked: a row group decoded whole, and streamed.
"""

from __future__ import annotations

import io
import itertools
import random
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_nsfw_spark.errors import DamagedInputError
from clip_nsfw_spark.executor import reader
from clip_nsfw_spark.executor.reader import OpenParquet, parquet_file
from clip_nsfw_spark.parquet.spec import DataPageHeader, DataPageHeaderV2, PageHeader, PageType
from clip_nsfw_spark.parquet.thrift import I32, STRUCT, decode_struct, encode_struct, get, with_fields

COLUMN = "emb"
ROWS, DIM = 120, 16
CODECS = ["none", "snappy", "gzip", "zstd", "brotli", "lz4"]


def sample(codec: str, version: str, dictionary: bool, crc: bool = True, dtype=np.float32) -> bytes:
    """A small real file: an id column and a list<float> embedding column of several pages, two row groups."""
    values = np.random.default_rng(7).standard_normal((ROWS, DIM)).astype(dtype)
    if dictionary:  # few distinct values: a dictionary page, then RLE_DICTIONARY data pages
        values = np.round(values, 1).astype(dtype)
    flat = pa.array(values.ravel())
    emb = pa.ListArray.from_arrays(pa.array(np.arange(ROWS + 1, dtype=np.int32) * DIM), flat)
    sink = io.BytesIO()
    pq.write_table(pa.table({"id": np.arange(ROWS), COLUMN: emb}), sink, compression=codec,
                   data_page_version=version, use_dictionary=[COLUMN] if dictionary else False,
                   write_page_checksum=crc, data_page_size=1500, row_group_size=ROWS // 2)
    return sink.getvalue()


def pages(data: bytes, row_group: int = 0) -> list[tuple[int, int, list]]:
    """(header start, body start, header fields) of each page of the embedding chunk of ``row_group``."""
    chunk = pq.read_metadata(pa.BufferReader(data)).row_group(row_group).column(1)
    pos = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    end, found = pos + chunk.total_compressed_size, []
    while pos < end:
        fields, body = decode_struct(data, pos)
        found.append((pos, body, fields))
        pos = body + get(fields, PageHeader.COMPRESSED_PAGE_SIZE)
    return found


class RefusedAtOpen(Exception):
    """pyarrow could not even open the file (its footer): the job fails there too, before any page."""


def pyarrow_read(data: bytes):
    """pyarrow's verdict, with page checksum verification, read row group by row group as the job reads
    (a whole-file read of a damaged chunk can carry its leftover values into the next row group's rows):
    the column's values, or the exception (``RefusedAtOpen`` when the footer itself is refused)."""
    try:
        file = pq.ParquetFile(pa.BufferReader(data), page_checksum_verification=True)
    except Exception as err:  # noqa: BLE001 - any refusal is pyarrow's answer
        return RefusedAtOpen(str(err))
    try:
        return pa.concat_arrays([file.read_row_group(group, columns=[COLUMN]).column(COLUMN).combine_chunks()
                                 for group in range(file.metadata.num_row_groups)])
    except Exception as err:  # noqa: BLE001 - any refusal is pyarrow's answer
        return err


def job_read(data: bytes, stream: bool, monkeypatch):
    """The job's reader (reader.py: decode.py / stream.py, pyarrow as it falls back): the column, or the exception."""
    monkeypatch.setattr(reader, "DECODE_CHUNK_MAX_BYTES", 0 if stream else 1 << 30)
    handle = io.BytesIO(data)
    try:
        source = OpenParquet(parquet_file(handle), handle, "damaged.parquet")
        groups = range(source.file.metadata.num_row_groups)
        # the id column too: pyarrow reads it beside the decoded embeddings, row counts checked between them
        batches = list(reader._row_group_batches(source, groups, 50, ["id", COLUMN], own_decoder=True))
        return pa.concat_arrays([b.column(1) for b in batches])
    except Exception as err:  # noqa: BLE001 - checked by the caller
        return err


def assert_strict_or_equal(data: bytes, monkeypatch, what: str) -> str:
    """The rule, on both of the job's paths; returns "refused" / "read" (pyarrow's verdict)."""
    want = pyarrow_read(data)
    for stream in (False, True):
        got = job_read(data, stream, monkeypatch)
        path = f"{what}, {'streamed' if stream else 'whole'}"
        if isinstance(got, Exception):
            if isinstance(got, DamagedInputError):
                assert str(got).startswith("damaged.parquet is damaged: row group "), path
                assert "\n" not in str(got), path
                continue
            # anything else only where the footer itself is refused (the job fails at planning then)
            assert isinstance(want, RefusedAtOpen), f"{path}: {got!r} (retryable?) where pyarrow says {want!r}"
            continue
        assert not isinstance(want, Exception), f"{path}: the job read a file pyarrow refuses ({want})"
        assert got.type == want.type and len(got) == len(want), path
        unsigned = {2: np.uint16, 4: np.uint32, 8: np.uint64}[got.type.value_type.bit_width // 8]
        bits = got.flatten().to_numpy(zero_copy_only=False).view(unsigned)
        np.testing.assert_array_equal(bits, want.flatten().to_numpy(zero_copy_only=False).view(unsigned), path)
        np.testing.assert_array_equal(got.offsets.to_numpy(), want.offsets.to_numpy(), path)
        assert got.is_valid().equals(want.is_valid()), path
    return "refused" if isinstance(want, Exception) else "read"


def with_header(data: bytes, page: tuple, changes: dict) -> bytes | None:
    """``data`` with one page header's fields changed, or None when the new header is not the same length."""
    start, body, fields = page
    header = encode_struct(with_fields(fields, changes))
    return data[:start] + header + data[body:] if len(header) == body - start else None


def with_sub(data: bytes, page: tuple, field_id: int, delta: int) -> bytes | None:
    """The page's data/dictionary page header field ``field_id`` moved by ``delta`` (None: not present)."""
    fields = page[2]
    sub_id = {PageType.DATA_PAGE: PageHeader.DATA_PAGE_HEADER, PageType.DATA_PAGE_V2: PageHeader.DATA_PAGE_HEADER_V2,
              PageType.DICTIONARY_PAGE: PageHeader.DICTIONARY_PAGE_HEADER}[get(fields, PageHeader.TYPE)]
    sub = get(fields, sub_id)
    if not isinstance(get(sub, field_id), int):  # absent, or a struct (statistics)
        return None
    return with_header(data, page, {sub_id: (STRUCT, with_fields(sub, {field_id: (I32, get(sub, field_id) + delta)}))})


def flipped(data: bytes, at: int, bit: int = 0x10) -> bytes:
    return data[:at] + bytes([data[at] ^ bit]) + data[at + 1:]


def damages(data: bytes):
    """(name, damaged bytes) for the systematic damages of one file's first embedding chunk."""
    found = pages(data)
    first, last_end = found[0][0], found[-1][1] + get(found[-1][2], PageHeader.COMPRESSED_PAGE_SIZE)
    yield "file cut inside the chunk", data[:(first + last_end) // 2]
    yield "chunk bytes zeroed", data[:first] + bytes(last_end - first) + data[last_end:]
    for index, page in enumerate(found):
        start, body, fields = page
        size, recorded = get(fields, PageHeader.COMPRESSED_PAGE_SIZE), get(fields, PageHeader.CRC)
        kind = {PageType.DATA_PAGE: "v1", PageType.DICTIONARY_PAGE: "dictionary", PageType.DATA_PAGE_V2: "v2"}[
            get(fields, PageHeader.TYPE)]
        name = f"page {index} ({kind})"
        yield f"{name}: header byte flipped", flipped(data, start + 1)
        for at, where in ((body, "first"), (body + size // 2, "middle"), (body + size - 1, "last")):
            yield f"{name}: {where} body byte flipped", flipped(data, at)
        yield f"{name}: body zeroed", data[:body] + bytes(size) + data[body + size:]
        for delta in (-4, -1, 1, 4):
            yield f"{name}: uncompressed size {delta:+}", with_header(data, page, {
                PageHeader.UNCOMPRESSED_PAGE_SIZE: (I32, get(fields, PageHeader.UNCOMPRESSED_PAGE_SIZE) + delta)})
            yield f"{name}: compressed size {delta:+}", with_header(
                data, page, {PageHeader.COMPRESSED_PAGE_SIZE: (I32, size + delta)})
            # NUM_VALUES has one id in the three page headers (data v1, dictionary, data v2)
            yield f"{name}: value count {delta:+}", with_sub(data, page, DataPageHeader.NUM_VALUES, delta)
        if get(fields, PageHeader.TYPE) == PageType.DATA_PAGE_V2:
            v2 = get(fields, PageHeader.DATA_PAGE_HEADER_V2)
            yield f"{name}: null count +1", with_sub(data, page, DataPageHeaderV2.NUM_NULLS, 1)
            yield f"{name}: row count -1", with_sub(data, page, DataPageHeaderV2.NUM_ROWS, -1)
            yield f"{name}: row count negative", with_sub(data, page, DataPageHeaderV2.NUM_ROWS,
                                                          -(get(v2, DataPageHeaderV2.NUM_ROWS) + 5))
            yield f"{name}: definition levels length +1", with_sub(
                data, page, DataPageHeaderV2.DEFINITION_LEVELS_BYTE_LENGTH, 1)
        if recorded is not None:
            yield f"{name}: CRC off by one", with_header(data, page, {PageHeader.CRC: (I32, recorded ^ 1)})
            # the body damaged *and* the CRC made to match it: only the decoders' own checks are left
            damaged = flipped(data, body + size - 1)
            crc = zlib.crc32(damaged[body:body + size])
            yield f"{name}: last body byte flipped, CRC recomputed", with_header(
                damaged, page, {PageHeader.CRC: (I32, crc - (1 << 32) if crc >= 1 << 31 else crc)})


@pytest.mark.parametrize("dictionary", [False, True], ids=["plain", "dictionary"])
@pytest.mark.parametrize("version", ["1.0", "2.0"])
@pytest.mark.parametrize("codec", CODECS)
def test_systematic_damage_is_refused_or_read_as_pyarrow_reads_it(codec, version, dictionary, monkeypatch):
    data = sample(codec, version, dictionary)
    assert assert_strict_or_equal(data, monkeypatch, "undamaged") == "read"
    verdicts = {}
    for name, damaged in damages(data):
        if damaged is not None:
            verdicts[name] = assert_strict_or_equal(damaged, monkeypatch, f"{codec} {version}: {name}")
    # the suite damages what it says: most damage is refused (CRCs), and every CRC mismatch is
    assert sum(v == "refused" for v in verdicts.values()) > len(verdicts) // 2, verdicts
    assert all(verdicts[n] == "refused" for n in verdicts if "CRC off by one" in n), verdicts


@pytest.mark.parametrize("dictionary", [False, True], ids=["plain", "dictionary"])
@pytest.mark.parametrize("codec", ["none", "snappy", "gzip", "zstd"])
def test_damage_without_crcs_is_refused_or_read_as_pyarrow_reads_it(codec, dictionary, monkeypatch):
    # no CRC to catch a flipped byte: the decoders' own checks (sizes, counts, levels, indices) are all
    for version in ("1.0", "2.0"):
        data = sample(codec, version, dictionary, crc=False)
        for name, damaged in damages(data):
            if damaged is not None:
                assert_strict_or_equal(damaged, monkeypatch, f"{codec} {version} no CRC: {name}")


@pytest.mark.parametrize("codec", ["snappy", "gzip", "brotli", "lz4"])
def test_a_page_that_overstates_its_decompressed_size_is_refused(codec, monkeypatch):
    # pyarrow.decompress returns the size it is told whatever the data held: the job checks it otherwise
    data = sample(codec, "1.0", False, crc=False)
    first_data_page = pages(data)[1]
    size = get(first_data_page[2], PageHeader.UNCOMPRESSED_PAGE_SIZE)
    damaged = with_header(data, first_data_page, {PageHeader.UNCOMPRESSED_PAGE_SIZE: (I32, size + 4)})
    assert isinstance(pyarrow_read(damaged), OSError)
    for stream in (False, True):
        got = job_read(damaged, stream, monkeypatch)
        assert isinstance(got, DamagedInputError) and "decompress to expected size" in str(got), got


def test_a_wrong_index_bit_width_is_refused_or_read_as_pyarrow_reads_it(monkeypatch):
    data = sample("none", "1.0", True, crc=False)
    page = pages(data)[1]  # the first data page: levels (4-byte length + runs, twice), then the bit width
    start, body, fields = page
    p = body
    for _ in range(2):
        p += 4 + int.from_bytes(data[p:p + 4], "little")
    width = data[p]
    for wrong in (0, width - 1, width + 1, 33, 255):
        damaged = data[:p] + bytes([wrong % 256]) + data[p + 1:]
        assert_strict_or_equal(damaged, monkeypatch, f"bit width {width} → {wrong}")


def test_seeded_fuzz_of_page_headers_and_bytes(monkeypatch):
    # A few hundred random damages: a page header field set to a nearby or random value, or random bytes
    # flipped in the chunk, on files of every codec and page version, with and without CRCs. Seconds.
    rng = random.Random(20261206)
    files = [sample(codec, version, dictionary, crc, dtype)
             for codec, version, dictionary, crc in itertools.product(CODECS, ("1.0", "2.0"), (False, True), (True, False))
             for dtype in (np.float16, np.float32, np.float64)]
    tried = 0
    for _ in range(400):
        data = rng.choice(files)
        found = pages(data, rng.randrange(2))
        page = rng.choice(found)
        start, body, fields = page
        if rng.random() < 0.5:
            field = rng.choice([PageHeader.UNCOMPRESSED_PAGE_SIZE, PageHeader.COMPRESSED_PAGE_SIZE, PageHeader.CRC]
                               if get(fields, PageHeader.CRC) is not None
                               else [PageHeader.UNCOMPRESSED_PAGE_SIZE, PageHeader.COMPRESSED_PAGE_SIZE])
            value = get(fields, field) + rng.choice([-100, -8, -2, -1, 1, 2, 8, 100, rng.randrange(-2**31, 2**31)])
            damaged = with_header(data, page, {field: (I32, max(-2**31, min(2**31 - 1, value)))})
            if damaged is None:
                sub_field = rng.choice([1, 2, 3, 4, 5, 6])  # any of the page's own header's first fields
                damaged = with_sub(data, page, sub_field, rng.choice([-1, 1, 2, -100, -2**20, 2**20]))
        else:
            end = body + get(fields, PageHeader.COMPRESSED_PAGE_SIZE)
            damaged = data
            for _ in range(rng.choice([1, 1, 2, 8])):
                damaged = flipped(damaged, rng.randrange(start, end), 1 << rng.randrange(8))
        if damaged is None:
            continue
        assert_strict_or_equal(damaged, monkeypatch, f"fuzz case {tried}")
        tried += 1
    assert tried > 300


def test_outputs_carry_page_crcs_that_pyarrow_verifies(tmp_path):
    # both of the job's writers (splice.py for embeddings, pyarrow for the rest) record every page's CRC
    from clip_nsfw_spark.executor.writer import AtomicParquet

    schema = pa.schema([("id", pa.int64()), (COLUMN, pa.list_(pa.float32())), ("punsafe", pa.float32())])
    values = np.random.default_rng(1).standard_normal((3000, 64)).astype(np.float32)
    table = pa.table({"id": np.arange(3000), COLUMN: pa.ListArray.from_arrays(
        pa.array(np.arange(3001, dtype=np.int32) * 64), pa.array(values.ravel())),
        "punsafe": np.linspace(0, 1, 3000, dtype=np.float32)}, schema=schema)
    from fsspec.implementations.local import LocalFileSystem

    for own in (True, False):
        out = tmp_path / f"own-{own}"
        out.mkdir()
        file = AtomicParquet(LocalFileSystem(), str(out), "x.parquet", schema, {"id": "zstd", f"{COLUMN}.list.element": "none",
                                                                          "punsafe": "zstd"}, own_encoder=own)
        file.write(table)
        file.commit()
        data = (out / "x.parquet").read_bytes()
        meta = pq.read_metadata(pa.BufferReader(data))
        for group in range(meta.num_row_groups):
            for column in range(meta.num_columns):
                chunk = meta.row_group(group).column(column)
                pos = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
                end, seen = pos + chunk.total_compressed_size, 0
                while pos < end:
                    fields, body = decode_struct(data, pos)
                    assert get(fields, PageHeader.TYPE) in (PageType.DATA_PAGE, PageType.DICTIONARY_PAGE,
                                                            PageType.DATA_PAGE_V2), fields
                    size, seen = get(fields, PageHeader.COMPRESSED_PAGE_SIZE), seen + 1
                    assert get(fields, PageHeader.CRC) is not None, (own, column, "page without CRC")
                    assert get(fields, PageHeader.CRC) & 0xFFFFFFFF == zlib.crc32(data[body:body + size])
                    pos = body + size
                assert seen and pos == end
        read = pq.ParquetFile(pa.BufferReader(data), page_checksum_verification=True).read()
        assert read.equals(table)
        # and a flipped value byte is now an error, not a wrong score
        spot = meta.row_group(0).column(1).data_page_offset + 200
        with pytest.raises(OSError, match="CRC"):
            pq.ParquetFile(pa.BufferReader(flipped(data, spot)), page_checksum_verification=True).read()


def test_a_codec_pyarrow_does_not_implement_is_named_as_such_not_as_damage(monkeypatch):
    # LZO is a parquet codec that Arrow's C++ reader does not implement: the file may be sound, so the job
    # says so (an InputError, permanent) instead of calling it damaged
    from clip_nsfw_spark.errors import InputError

    data = sample("lz4", "1.0", False)
    footer = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    marker = b"element\x15\x0e"  # path_in_schema's last name, then codec (i32) LZ4_RAW: zigzag(7)
    assert data[footer:].count(marker) == 2  # one chunk per row group
    lzo = data[:footer] + data[footer:].replace(marker, b"element\x15\x06")  # zigzag(3): LZO
    for stream in (False, True):
        got = job_read(lzo, stream, monkeypatch)
        assert type(got) is InputError, got
        assert str(got).startswith("cannot read damaged.parquet: row group 0: ") and "not supported" in str(got)
        assert "damaged:" not in str(got).split(": row group")[0]
