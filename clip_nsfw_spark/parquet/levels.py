"""numba kernels over RLE/bit-packed hybrid streams (levels and dictionary indices), and rows from levels.

A hybrid stream is a sequence of runs, each starting with a ULEB128 header h: h & 1 == 0 → an RLE run of
h >> 1 copies of one value stored in ceil(bw / 8) little-endian bytes; h & 1 == 1 → (h >> 1) groups of 8
bit-packed values, LSB first, bw bytes per group. The last bit-packed group may be padded past ``n``.

One kernel walks every such stream: ``hybrid(buf, bw, n, each, run, ctx, state)`` reads run headers,
checks every run against the buffer's end, unpacks bit-packed values and hands them on; what is done
with them is its two hook arguments (numba functions; ``hybrid`` is inlined into each kernel that uses it,
so each hook pair compiles to its own loop, as fast as a hand-written one):

    each(ctx, state, at, v) -> state          one value of a bit-packed run (at, v: uint64)
    run(ctx, state, at, count, v) -> state    an RLE run: ``count`` copies of v from position ``at``

``state`` is carried from run to run (a flag, a position in a row, the largest index seen). The hooks
never stop the walk: a check records its verdict in ``state`` (no branch out of the unpacking loop), and
the walk ends after ``n`` values or at the first malformed run. The four uses:

* ``check_def_levels(buf, bw, n, want)``: all ``n`` levels equal ``want`` (no null row, item, empty list);
* ``check_rep_levels(buf, bw, n, start, d)``: 0 exactly at global positions that are multiples of ``d``,
  1 elsewhere (every row one list of ``d`` values, pages cut anywhere);
* ``decode_levels(buf, bw, n, out)``: the levels into ``out`` (uint8);
* ``gather_dictionary(buf, bw, n, dictionary, out)``: ``out[:n] = dictionary[indices]``.

``assemble`` builds Arrow offsets and validity from materialised levels (the general path). Every kernel
is compiled without bounds checks: each index is kept inside its array by the code itself
(tests/parquet/test_levels.py reruns the kernel tests with numba's bounds checks forced on).
"""

from __future__ import annotations

import numpy as np

try:  # numba is a core dependency; without it every public decoder returns None (pyarrow then reads)
    import numba

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only where numba is missing
    HAVE_NUMBA = False

if HAVE_NUMBA:
    jit = numba.njit(cache=True, boundscheck=False, nogil=True)
    # The walker is inlined at numba IR level into each kernel: its hooks are then constants there. Called,
    # it would take them as runtime values, which pins process addresses into the code: not cachable.
    inlined = numba.njit(cache=True, boundscheck=False, nogil=True, inline="always")

    @jit
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

    @jit
    def _rle_value(buf, p, nbytes):
        v = np.int64(0)
        for k in range(nbytes):
            v |= np.int64(buf[p + k]) << (8 * k)
        return v

    @inlined
    def hybrid(buf, bw, n, each, run, ctx, state):
        """Walk the first ``n`` values of the hybrid stream ``buf`` (bit width ``bw``, 0..32), handing
        bit-packed values to ``each`` and RLE runs to ``run`` (module docstring). Returns (complete,
        state): complete is False when the stream is short or malformed (a run header past the end or
        over 32 bits, a run past the end, an empty RLE run)."""
        end = buf.shape[0]
        p = 0
        i = 0
        nbytes = (bw + 7) // 8
        while i < n:
            h, p = _run_header(buf, p, end)
            if h < 0:
                return False, state
            if h & 1:
                stop = p + (h >> 1) * bw
                if stop > end:
                    return False, state
                count = min((h >> 1) * 8, n - i)
                state = _unpack(buf, p, bw, count, i, each, ctx, state)
                p = stop
            else:
                if p + nbytes > end or (h >> 1) == 0:
                    return False, state
                v = np.uint64(_rle_value(buf, p, nbytes))
                p += nbytes
                count = min(h >> 1, n - i)
                state = run(ctx, state, i, count, v)
            i += count
        return True, state

    @inlined
    def _unpack(buf, p, bw, count, i, each, ctx, state):
        """Hand the ``count`` bw-bit values bit-packed from buf[p] to ``each`` (positions i, i + 1, ...).

        Where a 4-byte window at the value's first byte lies inside ``buf`` (all but the last few values
        of a page), one little-endian 32-bit read and a shift give the value (bw ≤ 25; bw 16: one byte
        pair, no shift); the tail, and wider values, go through a byte-wise bit reader. The window may
        read past the run (never past ``buf``): those bits are masked off.

        Every array position here is a uint64 (and every operand of it too: numba turns uint64 mixed with
        int64 into float64). A signed position costs a compare-and-select per access (numba wraps negative
        indices), and that also stops LLVM from merging the four byte loads into one 32-bit load: with
        int64 positions the index extraction alone took 1.9 ns per index, 0.4 with uint64, and the whole
        dictionary gather 2.3-2.4 → 1.0 ns (bw 15, f16 dictionary, AMD EPYC). Measured and not kept: a
        dictionary padded to 2^bw (no clamp), unpacking into a scratch array then gathering in a second
        loop, and two aligned 64-bit word loads per index: equal or slower, the dictionary loads dominate.
        """
        u8, u3, u7 = np.uint64(8), np.uint64(3), np.uint64(7)
        b = np.uint64(bw)
        mask = (np.uint64(1) << b) - np.uint64(1)
        at = np.uint64(i)  # position of value k: at + k
        fast = 0
        if 0 < bw <= 25:
            # the window of value k starts at byte p + (k * bw >> 3); it must end inside buf
            fast = min(count, max(0, ((buf.shape[0] - 4 - p) * 8) // bw + 1))
        first = np.uint64(p) * u8  # bit position of value 0 in buf
        if bw == 16:  # float16 dictionaries over 32,768 entries: whole little-endian byte pairs, no shift
            q = np.uint64(p)
            for k in range(fast):
                v = np.uint64(buf[q]) | (np.uint64(buf[q + np.uint64(1)]) << u8)
                q += np.uint64(2)
                state = each(ctx, state, at + np.uint64(k), v)
        else:
            for k in range(fast):
                bit = first + np.uint64(k) * b
                q = bit >> u3
                w = (np.uint64(buf[q]) | (np.uint64(buf[q + np.uint64(1)]) << u8)
                     | (np.uint64(buf[q + np.uint64(2)]) << np.uint64(16))
                     | (np.uint64(buf[q + np.uint64(3)]) << np.uint64(24)))
                state = each(ctx, state, at + np.uint64(k), (w >> (bit & u7)) & mask)
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
                v = acc & mask
                acc >>= b
                have -= b
                state = each(ctx, state, at + np.uint64(k), v)
        return state

    # --- check_def_levels: ctx the wanted level (uint64), state "a level differed" -----------------------
    @jit
    def _def_each(want, bad, at, v):
        return bad | (v != want)

    @jit
    def _def_run(want, bad, at, count, v):
        return bad | (v != want)

    @jit
    def check_def_levels(buf, bw, n, want):
        """True when the hybrid stream ``buf`` (bit width ``bw``) holds ``n`` levels all equal to ``want``."""
        complete, bad = hybrid(buf, bw, n, _def_each, _def_run, np.uint64(want), False)
        return complete and not bad

    # --- check_rep_levels: ctx d, state (position inside the current row, "a level was wrong") -----------
    @jit
    def _rep_each(d, state, at, v):
        r, bad = state
        bad |= v != (np.uint64(0) if r == 0 else np.uint64(1))  # 0 starts a row, 1 continues it
        r += 1
        return (0 if r == d else r), bad

    @jit
    def _rep_run(d, state, at, count, v):
        r, bad = state
        if v == np.uint64(0):  # row starts: one at a time, unless every level is one (d == 1)
            bad |= not (r == 0 and (count == 1 or d == 1))
        elif v == np.uint64(1):  # continuations: inside one row
            bad |= r == 0 or r + count > d
        else:
            bad = True
        return (r + count) % d, bad

    @jit
    def check_rep_levels(buf, bw, n, start, d):
        """True when the ``n`` repetition levels in ``buf`` are 0 exactly at global level positions that are
        multiples of ``d`` and 1 elsewhere (every row one list of ``d`` entries); ``start`` is the global
        position of the page's first level."""
        complete, state = hybrid(buf, bw, n, _rep_each, _rep_run, d, (start % d, False))
        return complete and not state[1]

    # --- decode_levels: ctx the output array ----------------------------------------------------------
    @jit
    def _store_each(out, state, at, v):
        out[at] = v
        return state

    @jit
    def _store_run(out, state, at, count, v):
        for k in range(count):
            out[at + k] = v
        return state

    @jit
    def decode_levels(buf, bw, n, out):
        """out[:n] = the levels of the hybrid stream ``buf`` (bit width bw ≤ 8); False if it is short."""
        complete, _ = hybrid(buf, bw, n, _store_each, _store_run, out, 0)
        return complete

    # --- gather_dictionary: ctx (dictionary, out, last index), state the largest index seen ---------------
    @jit
    def _gather_each(ctx, largest, at, j):
        dictionary, out, last = ctx
        out[at] = dictionary[min(j, last)]  # clamped: the range is checked once, after the walk
        return max(largest, j)

    @jit
    def _gather_run(ctx, largest, at, count, j):
        dictionary, out, last = ctx
        v = dictionary[min(j, last)]
        for k in range(count):
            out[at + k] = v
        return max(largest, j)

    @jit
    def gather_dictionary(buf, bw, n, dictionary, out):
        """out[:n] = dictionary[indices], the indices a hybrid stream of bit width ``bw`` (1..32) in ``buf``.

        dictionary (non-empty) and out share one unsigned dtype (the values' bits); returns n, or -1 when
        the stream is short or an index is outside the dictionary (the caller then refuses the chunk).
        Indices are clamped to the dictionary while gathering and their range checked once at the end: no
        early exit in the loop, which keeps it branch-free.
        """
        size = dictionary.shape[0]
        if size == 0:  # no index is valid (and the clamped gather needs one entry)
            return -1 if n > 0 else 0
        complete, largest = hybrid(buf, bw, n, _gather_each, _gather_run,
                                   (dictionary, out, np.uint64(size - 1)), np.uint64(0))
        return n if complete and largest < np.uint64(size) else -1

    # --- rows from materialised levels (the general path) -----------------------------------------------
    @jit
    def assemble(reps, defs, list_def, max_def, values, offsets, row_valid, items, item_valid):
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

else:  # pragma: no cover - exercised only where numba is missing
    # The names stay importable; the public decoders check HAVE_NUMBA and return None before any is called.
    def jit(function):
        return function

    def _no_numba(*args):
        raise RuntimeError("numba is not installed")

    check_def_levels = check_rep_levels = decode_levels = gather_dictionary = assemble = _no_numba
