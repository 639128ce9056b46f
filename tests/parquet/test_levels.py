"""levels.py's kernels on hand-made RLE/bit-packed hybrid streams (encoded here, independently of them):
every bit width, RLE and bit-packed runs, ragged tails, pages cut mid-row, malformed streams.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from clip_nsfw_spark.parquet.levels import check_def_levels, check_rep_levels, decode_levels, gather_dictionary


def uleb128(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def hybrid(indices: list[int], bw: int, rle_every: int = 3) -> bytes:
    """Encode ``indices`` as RLE/bit-packed hybrid runs (independently of the decoder under test)."""
    out, i, run = bytearray(), 0, 0
    while i < len(indices):
        run += 1
        if run % rle_every == 0:  # an RLE run of the current value, as long as it repeats (at least 1)
            c = 1
            while i + c < len(indices) and indices[i + c] == indices[i]:
                c += 1
            out += uleb128(c << 1) + indices[i].to_bytes((bw + 7) // 8, "little")
            i += c
        else:  # 1..3 groups of 8, the last group padded with zeros past the end
            groups = min(1 + run % 3, -(-(len(indices) - i) // 8))
            chunk = indices[i:i + 8 * groups] + [0] * (8 * groups - len(indices[i:i + 8 * groups]))
            packed = sum(v << (k * bw) for k, v in enumerate(chunk))
            out += uleb128(groups << 1 | 1) + packed.to_bytes(groups * bw, "little")
            i += 8 * groups
    return bytes(out)


@pytest.mark.parametrize("bw", list(range(1, 33)))
def test_dictionary_index_kernel_every_bit_width(bw):
    rng = np.random.default_rng(bw)
    size = min(2**bw, 5000)
    dictionary = rng.integers(0, 2**32, size, dtype=np.uint64).astype(np.uint32)
    for n in (1, 7, 8, 9, 203, 1000):
        indices = rng.integers(0, size, n)
        indices[n // 3:n // 3 + n // 4] = indices[n // 3]  # a repeat, so some RLE runs are long
        stream = np.frombuffer(hybrid([int(v) for v in indices], bw), np.uint8)
        out = np.zeros(n, np.uint32)
        assert gather_dictionary(stream, bw, n, dictionary, out) == n
        np.testing.assert_array_equal(out, dictionary[indices])
        # an index past the dictionary's end, or a stream cut short, is refused (-1), never clamped
        assert gather_dictionary(stream, bw, n, dictionary[:int(indices.max())], out) == -1
        assert gather_dictionary(stream[:len(stream) // 2], bw, n, dictionary, out) == -1


def bit_packed(indices: list[int], bw: int, groups_per_run: int = 63) -> bytes:
    """Only bit-packed runs of ``groups_per_run`` groups (pyarrow's writer: 63), the last group zero-padded."""
    out = bytearray()
    for s in range(0, len(indices), 8 * groups_per_run):
        chunk = indices[s:s + 8 * groups_per_run]
        groups = -(-len(chunk) // 8)
        packed = sum(v << (k * bw) for k, v in enumerate(chunk))
        out += uleb128(groups << 1 | 1) + packed.to_bytes(groups * bw, "little")
    return bytes(out)


@pytest.mark.parametrize("bw", list(range(1, 33)))
def test_dictionary_index_kernel_long_runs_and_one_bad_index_anywhere(bw):
    """Pages of pyarrow-like 504-index runs: most indices read through the word-window fast path, the last
    few of the page (whose window would pass the page's end) through the tail reader. An index just past
    the dictionary's end is refused wherever it sits: first, inside the fast path, the page's last index."""
    rng = np.random.default_rng(100 + bw)
    size = min(2**bw, 3000)
    dictionary = rng.integers(0, 2**32, size, dtype=np.uint64).astype(np.uint32)
    n = 2 * 504 + 13
    indices = rng.integers(0, size, n)
    indices[-1] = size - 1  # the largest valid index, last in the page: read by the tail
    stream = np.frombuffer(bit_packed([int(v) for v in indices], bw), np.uint8)
    for dtype in (np.uint16, np.uint32, np.uint64):  # float16 / float32 / float64 bits
        out = np.zeros(n, dtype)
        assert gather_dictionary(stream, bw, n, dictionary.astype(dtype), out) == n
        np.testing.assert_array_equal(out, dictionary[indices].astype(dtype))
    if size == 2**bw:  # every bw-bit index is valid: no out-of-range index can be written
        return
    for at in (0, 300, 504 + 7, n - 2, n - 1):
        bad = indices.copy()
        bad[at] = size
        stream = np.frombuffer(bit_packed([int(v) for v in bad], bw), np.uint8)
        assert gather_dictionary(stream, bw, n, dictionary, np.zeros(n, np.uint32)) == -1, at
    # a page that ends exactly where its last index ends (no padding group): the tail reads to the last byte
    m = 8 * 3
    stream = np.frombuffer(bit_packed([int(v) for v in indices[:m]], bw), np.uint8)
    out = np.zeros(m, np.uint32)
    assert gather_dictionary(stream, bw, m, dictionary, out) == m
    np.testing.assert_array_equal(out, dictionary[indices[:m]])


def test_the_kernels_stay_inside_their_buffers(tmp_path):
    """The kernels are compiled without bounds checks and the walker's fast path reads a 4-byte window per
    bit-packed value: a window past the page's end would read stray bytes and still give the right value
    (they land above it), so only bounds checking shows it. Rerun every other kernel test in a subprocess
    with numba's bounds checks forced on (its own cache: the usual one holds the unchecked builds)."""
    import subprocess
    import sys

    env = dict(os.environ, NUMBA_BOUNDSCHECK="1", NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                          "-k", "kernel and not stay_inside"],
                         env=env, cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


@pytest.mark.parametrize("d", [1, 2, 7, 8, 9, 768])
def test_level_kernels_on_pages_split_mid_row(d):
    rng = np.random.default_rng(d)
    rows = 37
    reps = [0 if i % d == 0 else 1 for i in range(rows * d)]
    cuts = sorted({0, rows * d, *rng.integers(1, rows * d, 5).tolist()})  # pages end anywhere in a row
    for a, b in zip(cuts, cuts[1:]):
        for rle_every in (2, 3, 1000):
            stream = np.frombuffer(hybrid(reps[a:b], 1, rle_every), np.uint8)
            assert check_rep_levels(stream, 1, b - a, a, d)
            levels = np.empty(b - a, np.uint8)
            assert decode_levels(stream, 1, b - a, levels)
            np.testing.assert_array_equal(levels, reps[a:b])
            if d > 1 and 0 in reps[a:b]:  # read as if it started one level later: a row start misplaced
                assert not check_rep_levels(stream, 1, b - a, a + 1, d)
    for want in (1, 2, 3):
        defs = [want] * (rows * d)
        assert check_def_levels(np.frombuffer(hybrid(defs, 2), np.uint8), 2, len(defs), want)
        defs[len(defs) // 2] = want - 1
        assert not check_def_levels(np.frombuffer(hybrid(defs, 2), np.uint8), 2, len(defs), want)



# A stream that is short or malformed in each way the walker checks, for bit width 2 and n = 8 levels
MALFORMED = {
    "empty": b"",
    "run header cut": b"\x80",
    "run header over 32 bits": b"\x80\x80\x80\x80\x80\x01",
    "empty RLE run": b"\x00\x01",
    "RLE value cut": b"\x10",
    "bit-packed run past the end": b"\x03\x55",
    "fewer levels than n": b"\x08\x01",
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_every_kernel_refuses_the_same_malformed_streams(case):
    # one walker under all four kernels: each refuses what it refuses, whatever it does with the levels
    stream = np.frombuffer(MALFORMED[case], np.uint8)
    assert not check_def_levels(stream, 2, 8, 1)
    assert not check_rep_levels(stream, 2, 8, 0, 8)
    assert not decode_levels(stream, 2, 8, np.zeros(8, np.uint8))
    assert gather_dictionary(stream, 2, 8, np.arange(4, dtype=np.uint32), np.zeros(8, np.uint32)) == -1


def test_the_kernels_read_one_sound_stream_each_their_way():
    stream = np.frombuffer(b"\x10\x01", np.uint8)  # an RLE run: 8 copies of 1
    out = np.zeros(8, np.uint8)
    assert decode_levels(stream, 2, 8, out) and out.tolist() == [1] * 8
    assert check_def_levels(stream, 2, 8, 1) and not check_def_levels(stream, 2, 8, 2)
    assert not check_rep_levels(stream, 2, 8, 0, 8)  # a row must start with a 0
    assert check_rep_levels(stream, 2, 8, 1, 9)  # ... unless the page starts inside one
    values = np.zeros(8, np.uint32)
    assert gather_dictionary(stream, 2, 8, np.array([7, 9], np.uint32), values) == 8 and values.tolist() == [9] * 8
    assert gather_dictionary(stream, 2, 8, np.array([7], np.uint32), values) == -1  # index 1 of a 1-entry dictionary
