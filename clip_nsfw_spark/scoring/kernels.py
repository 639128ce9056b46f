"""Dense layers summed in one fixed order, the same bits on every CPU, batch size, thread and process.

The order (``ORDER``, recorded in every portable weights file):

* **Dense layer** ``z = act(x @ W + b)``, x float32 (n, K), W float32 (K, m): k is cut into blocks of
  ``K_BLOCK`` = 256 (the last one shorter); in each block, output ``z[i, j]`` gets one chain of fused
  multiply-adds in ascending k started from +0.0; the block sums are added in order::

      for each block q = [256q, min(256q + 256, K)):
          s = +0.0f;  for k in block:  s = fmaf(x[i, k], W[k, j], s)
          T = s if q == 0 else T + s          (one float32 addition; T = +0.0 when K = 0)
      z[i, j] = T + b[j]                      (one float32 addition)
      relu: z = +0.0 if z < 0 else z          (NaN stays NaN, -0.0 stays -0.0)

  Every layer follows it, the 1-output layer included. Why blocks of 256: it is the k-block TensorFlow's
  CPU MatMul (Eigen's blocked GEMM, FMA chains restarted per block) measured on both the AMD EPYC and the
  Intel Xeon machines for LAION's 512-wide layers, so the order is the one closest to TensorFlow's usual
  one; on ViT-B/32 that puts the scores within ~1e-7 of TensorFlow where one chain over all of k, blocks
  of 64 or even float64 sums land 1.5–2e-6 away (TensorFlow's own error). It is a constant, never measured
  on the running machine.
* **Sigmoid** (last layer): ``s = float32(1.0 / (1.0 + exp64(-double(z))))`` in float64, where ``exp64`` is
  the routine below (``_exp64``: Cody–Waite reduction by ln 2, a degree-13 Taylor polynomial evaluated by
  FMA, scaling by 2^n), made only of correctly rounded IEEE operations. NaN stays NaN.

Why the bits cannot depend on the machine: a fused multiply-add is correctly rounded by IEEE 754, so an FMA
chain in a fixed order has exactly one result. The kernel spreads SIMD lanes across *outputs* (never across
k), so each lane runs its own scalar chain whatever the vector width (SSE, AVX2, AVX-512, NEON), tile shape,
batch size or thread count. Fusion is not left to the compiler: the tile is emitted as LLVM IR calling
``llvm.fma`` (fused by definition; a libm ``fmaf`` call on hardware without FMA), and no fast-math flag is
set anywhere, so LLVM may neither split nor reassociate it.

Speed: ``_fma_tile`` is a register-blocked micro-kernel (a tile of ``_MR`` rows × ``_NV`` vectors of ``_L``
outputs held in registers, k streamed, weights pre-packed in panels of ``_NR`` columns), the layout of a
BLAS sgemm kernel; the tile shape is picked for the target CPU and changes speed only, never bits.
"""

from __future__ import annotations

import math

import numpy as np

from clip_nsfw_spark.scoring.weights import K_BLOCK, ORDER  # noqa: F401  (the order documented above, and its id)

try:  # numba is a core dependency; keep the package importable without it (the scorer then refuses)
    import numba
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic, overload

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only where numba is missing
    HAVE_NUMBA = False
    encode_rows = gemm_panels = sigmoid_column = score_rows = dense_reference = finite_rows_of_bits = None
    category_code_table = None


def read_only_view(array: np.ndarray) -> np.ndarray:
    """A read-only view of ``array`` (zero-copy), as the scorer's kernel and the rows' check are called with:
    numba compiles a kernel per argument type, and a read-only array is another type than a writable one, so
    passing views of one kind keeps one compiled kernel per dtype, the one warmed with the model
    (scorer.warm). (The parquet decoder does the same for its own kernels: parquet/ imports no scoring code.)"""
    view = array.view()
    view.flags.writeable = False
    return view


def _target_cpu() -> tuple[str, str]:
    """(name, features) of the CPU numba compiles for, worked out exactly as numba's codegen does: the name
    NUMBA_CPU_NAME else the host's; the features NUMBA_CPU_FEATURES when set (even empty), else the host's
    (also under an explicit name: LLVM applies them on top of the name's own)."""
    from numba.core import config
    from numba.core.codegen import get_host_cpu_features
    import llvmlite.binding as llvm

    name = llvm.get_host_cpu_name() if config.CPU_NAME is None else config.CPU_NAME
    features = get_host_cpu_features() if config.CPU_FEATURES is None else config.CPU_FEATURES
    return name, features


def _tile_shape() -> tuple[int, int, int]:
    """(rows, vectors, lanes) of the register tile for the CPU numba compiles for. Speed only, never bits.

    AVX-512: 12 rows × 2 × 16 lanes = 24 zmm accumulators of 32; AVX2: 6 × 2 × 8 = 12 of 16 ymm;
    otherwise (SSE, NEON…) 4 × 2 × 4.
    """
    name, features = _target_cpu()
    flags = set(features.split(","))
    if "+avx512f" in flags or (name == "x86-64-v4" and "-avx512f" not in flags):
        return 12, 2, 16
    if "+avx2" in flags or (name in ("x86-64-v3", "x86-64-v4") and "-avx2" not in flags):
        return 6, 2, 8
    return 4, 2, 4


def _half_conversion_in_hardware() -> bool:
    """True where the target converts float16 → float32 with an instruction (x86's F16C: every x86-64-v3 CPU).

    Speed only: the conversion is exact either way (every float16 is a float32), and the encoding sends NaN
    to 0 before anything reads the value, so not even a NaN's payload can differ. Elsewhere the kernel reads
    the 65,536-entry table: LLVM would otherwise call a runtime helper the JIT may not provide."""
    import platform

    name, features = _target_cpu()
    flags = set(features.split(","))
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return x86 and "-f16c" not in flags and ("+f16c" in flags or name in ("x86-64-v3", "x86-64-v4"))


if HAVE_NUMBA:
    _MR, _NV, _L = _tile_shape()
    _HALF_IN_HARDWARE = _half_conversion_in_hardware()
else:  # pragma: no cover
    _MR, _NV, _L = 4, 2, 4
    _HALF_IN_HARDWARE = False
_NR = _NV * _L  # columns per packed weight panel (wide layers)

if HAVE_NUMBA:

    @intrinsic
    def _fma_tile(typingctx, a, lda, b, k, c, ldc, bias, relu, mr, nv, lanes):
        """c[r, :nv*lanes] = act(k-block FMA chains of row a[r, :k] with the packed panel b (k, nv*lanes) + bias).

        ``a``, ``b``, ``c``, ``bias`` are addresses of float32 data (bias: nv*lanes values); ``lda``/``ldc``
        row strides in elements; ``relu`` non-zero for ReLU. The accumulators of a k-block are LLVM vector
        values carried in phi nodes (registers); each lane is one output. c holds the running block total
        between blocks.
        """
        if not all(isinstance(t, types.IntegerLiteral) for t in (mr, nv, lanes)):
            return None
        rows, vectors, width = mr.literal_value, nv.literal_value, lanes.literal_value
        sig = types.void(*[types.intp] * 8, mr, nv, lanes)

        def codegen(context, builder, signature, args):
            a_addr, lda_v, b_addr, k_v, c_addr, ldc_v, bias_addr, relu_v = args[:8]
            f32, i64, i32 = ir.FloatType(), ir.IntType(64), ir.IntType(32)
            vec = ir.VectorType(f32, width)
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, vec, vec]),
                                                 f"llvm.fma.v{width}f32")
            vptr = vec.as_pointer()
            a_ptr = builder.inttoptr(a_addr, f32.as_pointer())
            b_ptr = builder.inttoptr(b_addr, f32.as_pointer())
            c_ptr = builder.inttoptr(c_addr, f32.as_pointer())
            a_rows = [builder.gep(a_ptr, [builder.mul(lda_v, ir.Constant(i64, r))]) for r in range(rows)]
            c_rows = [builder.gep(c_ptr, [builder.mul(ldc_v, ir.Constant(i64, r))]) for r in range(rows)]
            zero = ir.Constant(vec, [0.0] * width)
            bias_ptr = builder.inttoptr(bias_addr, f32.as_pointer())
            biases = [builder.load(builder.bitcast(builder.gep(bias_ptr, [ir.Constant(i64, v * width)]), vptr),
                                   align=4) for v in range(vectors)]
            relu_on = builder.icmp_signed("!=", relu_v, ir.Constant(i64, 0))

            def finish(total, v):
                """total + bias, then ReLU (z < 0 → +0.0; NaN and -0.0 compare false and stay)."""
                z = builder.fadd(total, biases[v])
                rectified = builder.select(builder.fcmp_ordered("<", z, zero), zero, z)
                return builder.select(relu_on, rectified, z)
            splat = ir.Constant(ir.VectorType(i32, width), [0] * width)
            k_block = ir.Constant(i64, K_BLOCK)
            entry = builder.block
            block_head = builder.append_basic_block("tile.block")
            loop = builder.append_basic_block("tile.loop")
            block_end = builder.append_basic_block("tile.block_end")
            empty = builder.append_basic_block("tile.empty")
            done = builder.append_basic_block("tile.done")
            builder.cbranch(builder.icmp_signed(">", k_v, ir.Constant(i64, 0)), block_head, empty)

            # One k-block: [start, min(start + K_BLOCK, k)), its chains started from zero in registers.
            builder.position_at_end(block_head)
            start = builder.phi(i64)
            start.add_incoming(ir.Constant(i64, 0), entry)
            after = builder.add(start, k_block)
            stop = builder.select(builder.icmp_signed("<", after, k_v), after, k_v)
            builder.branch(loop)

            builder.position_at_end(loop)
            kk = builder.phi(i64)
            kk.add_incoming(start, block_head)
            accumulators = []
            for _ in range(rows * vectors):
                phi = builder.phi(vec)
                phi.add_incoming(zero, block_head)
                accumulators.append(phi)
            b_row = builder.gep(b_ptr, [builder.mul(kk, ir.Constant(i64, vectors * width))])
            panel = [builder.load(builder.bitcast(builder.gep(b_row, [ir.Constant(i64, v * width)]), vptr),
                                  align=4) for v in range(vectors)]
            updated = []
            for r in range(rows):
                scalar = builder.load(builder.gep(a_rows[r], [kk]), align=4)
                lane0 = builder.insert_element(ir.Constant(vec, ir.Undefined), scalar, ir.Constant(i32, 0))
                broadcast = builder.shuffle_vector(lane0, ir.Constant(vec, ir.Undefined), splat)
                for v in range(vectors):
                    updated.append(builder.call(fma, [broadcast, panel[v], accumulators[r * vectors + v]]))
            k_next = builder.add(kk, ir.Constant(i64, 1))
            kk.add_incoming(k_next, loop)
            for phi, value in zip(accumulators, updated):
                phi.add_incoming(value, loop)
            builder.cbranch(builder.icmp_signed("<", k_next, stop), loop, block_end)

            # Fold the block into the running total kept in c: the first block is stored as is, later
            # ones added in order (one float32 addition each); after the last block, bias and ReLU.
            builder.position_at_end(block_end)
            first = builder.icmp_signed("==", start, ir.Constant(i64, 0))
            last = builder.icmp_signed(">=", after, k_v)
            for r in range(rows):
                for v in range(vectors):
                    target = builder.bitcast(builder.gep(c_rows[r], [ir.Constant(i64, v * width)]), vptr)
                    block_sum = updated[r * vectors + v]
                    total = builder.select(first, block_sum, builder.fadd(builder.load(target, align=4), block_sum))
                    builder.store(builder.select(last, finish(total, v), total), target, align=4)
            start.add_incoming(after, block_end)
            builder.cbranch(builder.icmp_signed("<", after, k_v), block_head, done)

            builder.position_at_end(empty)  # k = 0: an empty sum is +0.0
            for r in range(rows):
                for v in range(vectors):
                    target = builder.bitcast(builder.gep(c_rows[r], [ir.Constant(i64, v * width)]), vptr)
                    builder.store(finish(zero, v), target, align=4)
            builder.branch(done)
            builder.position_at_end(done)
            return context.get_dummy_value()

        return sig, codegen

    def _scalar_fma(name, fty):
        @intrinsic
        def fma(typingctx, a, b, c):
            sig = fty(fty, fty, fty)

            def codegen(context, builder, signature, args):
                lty = context.get_value_type(fty)
                fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(lty, [lty] * 3), name)
                return builder.call(fn, args)

            return sig, codegen

        return fma

    fma32 = _scalar_fma("llvm.fma.f32", types.float32)
    fma64 = _scalar_fma("llvm.fma.f64", types.float64)
    # No fastmath: IEEE semantics throughout. error_model="numpy": x / 0 is ±inf or NaN as in IEEE (and
    # TensorFlow), not a Python ZeroDivisionError, whose check would also stop LLVM vectorizing the loops.
    _jit = numba.njit(cache=True, boundscheck=False, nogil=True, error_model="numpy")

    @_jit
    def gemm_panels(x, k_total, panels, bias, relu, out):
        """out = act(x[:, :k_total] @ W + bias) in the documented order, W packed as ``panels``.

        x float32 (n, lda ≥ k_total) C-contiguous; panels float32 (P, k_total, NR) with NR = _NR, or _L for
        narrow layers; bias float32 (P*NR,) zero-padded; relu 0/1; out float32 (n, P*NR) C-contiguous
        (columns past the layer's width hold act(0 + 0)).
        """
        n, lda = x.shape
        n_panels, _, nr = panels.shape
        ldc = out.shape[1]
        full = n - n % _MR
        rest = n - full
        xa, pa, oa, ba = x.ctypes.data, panels.ctypes.data, out.ctypes.data, bias.ctypes.data
        pad_x = np.zeros((_MR, max(k_total, 1)), np.float32)  # the last rows, padded to a whole tile
        pad_out = np.empty((_MR, nr), np.float32)
        for r in range(rest):
            pad_x[r, :k_total] = x[full + r, :k_total]
        padded_a, padded_c, padded_lda = pad_x.ctypes.data, pad_out.ctypes.data, pad_x.shape[1]
        for p in range(n_panels):
            b, bias_p = pa + p * k_total * nr * 4, ba + p * nr * 4
            if nr == _L:
                for i in range(0, full, _MR):
                    _fma_tile(xa + i * lda * 4, lda, b, k_total, oa + (i * ldc + p * nr) * 4, ldc, bias_p, relu,
                              _MR, 1, _L)
                if rest:
                    _fma_tile(padded_a, padded_lda, b, k_total, padded_c, nr, bias_p, relu, _MR, 1, _L)
            else:
                for i in range(0, full, _MR):
                    _fma_tile(xa + i * lda * 4, lda, b, k_total, oa + (i * ldc + p * nr) * 4, ldc, bias_p, relu,
                              _MR, _NV, _L)
                if rest:
                    _fma_tile(padded_a, padded_lda, b, k_total, padded_c, nr, bias_p, relu, _MR, _NV, _L)
            for r in range(rest):
                for j in range(nr):
                    out[full + r, p * nr + j] = pad_out[r, j]
        # The tiles read pad_x through its address, which numba does not count as a use: without a use after
        # them it frees pad_x right after its last named use (above), and the padded rows read freed memory
        # that another thread may have taken by then (wrong scores for a call's last rows, seen with 4 threads
        # scoring at once). This store is that use; it changes no result.
        pad_x[0, 0] = 0.0

    @_jit
    def finite_rows_of_bits(bits, exponent, out):
        """out[i] = no value of row i is NaN or Inf, for IEEE floats given as their bits (uint16/32/64
        (n, d), C-contiguous): a value is NaN or Inf exactly when its exponent bits (``exponent``) are all set.

        One pass, no temporaries (numpy's ``isfinite(...).all(axis=1)`` makes two arrays the size of the
        batch); the per-row maximum vectorizes, and a row is not cut short (no branch in the inner loop).
        """
        for i in range(bits.shape[0]):
            largest = bits[i, 0] & exponent if bits.shape[1] else exponent ^ exponent
            for j in range(1, bits.shape[1]):
                largest = max(largest, bits[i, j] & exponent)
            out[i] = largest != exponent

    _LN2_HI = 6.93147180369123816490e-01  # fdlibm's split of ln 2: n * _LN2_HI is exact for |n| < 2^11
    _LN2_LO = 1.90821492927058770002e-10
    _INV_LN2 = 1.44269504088896338700e+00
    _TAYLOR = tuple(1.0 / math.factorial(i) for i in range(13, -1, -1))  # 1/13! … 1/0!

    @_jit
    def _exp64(x):
        """e**x in float64 from IEEE operations only (same bits everywhere); |x| is clamped to 200, where
        the float32 sigmoid is already exactly 0 or 1."""
        x = min(max(x, -200.0), 200.0)
        n = math.floor(x * _INV_LN2 + 0.5)
        r = fma64(-float(n), _LN2_HI, x)
        r = fma64(-float(n), _LN2_LO, r)
        p = _TAYLOR[0]
        for c in _TAYLOR[1:]:
            p = fma64(p, r, c)
        return math.ldexp(p, n)

    @_jit
    def sigmoid_column(out, scores):
        """scores[i] = sigmoid(out[i, 0]) by the documented float64 rule."""
        for i in range(out.shape[0]):
            z = out[i, 0]
            if z != z:
                scores[i] = z
            else:
                scores[i] = np.float32(1.0 / (1.0 + _exp64(-np.float64(z))))

    def _as_float32(value, table):  # pragma: no cover - replaced by the overload below inside numba
        raise NotImplementedError

    @overload(_as_float32)
    def _as_float32_impl(value, table):
        """float16 bit patterns (uint16) through the exact 65,536-entry table; floats rounded to nearest."""
        if isinstance(value, types.Integer):
            return lambda value, table: table[value]
        return lambda value, table: np.float32(value)

    @intrinsic
    def _half_bits_as_float32(typingctx, bits):
        """The float32 value of a float16 bit pattern (uint16), by LLVM's exact ``fpext half → float``."""
        if not (isinstance(bits, types.Integer) and bits.bitwidth == 16):
            return None

        def codegen(context, builder, signature, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

        return types.float32(bits), codegen

    @intrinsic
    def _float32_bits(typingctx, value):
        """The bits of a float32 as an int32 (LLVM's bitcast: no conversion)."""
        if value != types.float32:
            return None

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.IntType(32))

        return types.int32(value), codegen

    @numba.njit(cache=True, boundscheck=False, nogil=True, error_model="numpy", inline="always")
    def _interval_code(value, c, lo, hi, codes, starts, defaults):
        """The code of categorical column c's vocabulary interval holding float32 ``value`` (intervals
        ``lo/hi/codes[starts[c]:starts[c+1]]`` as sortable int32 keys, see weights.py), else ``defaults[c]``."""
        key = _float32_bits(value)
        if key < 0:
            key = key ^ np.int32(0x7FFFFFFF)
        first, last = starts[c], starts[c + 1]
        slot = first + np.searchsorted(lo[first:last], key, side="right") - 1
        if slot >= first and key <= hi[slot]:
            return codes[slot]
        return defaults[c]

    @_jit
    def category_code_table(table, lo, hi, codes, starts, defaults, out):
        """out[c, b] = the code categorical column c gives the float16 of bits b (out float32 (C, 65,536);
        ``table``: every float16's float32 value): the lookups of float16 rows done once per model."""
        for c in range(out.shape[0]):
            for b in range(out.shape[1]):
                out[c, b] = _interval_code(table[b], c, lo, hi, codes, starts, defaults)

    def _encode(raw, table, mean, scale, columns, lo, hi, codes, starts, defaults, codes16, x):
        raise NotImplementedError  # pragma: no cover - replaced by the overload below inside numba

    @overload(_encode, inline="always")
    def _encode_impl(raw, table, mean, scale, columns, lo, hi, codes, starts, defaults, codes16, x):
        """``encode_rows``, one loop per input kind (each measured the faster for it; the same bits):

        * float16 bits where the CPU converts float16 (x86 F16C): per row one loop the compiler vectorizes
          (a NaN's bits replaced by +0.0's, LLVM's exact ``fpext half → float``, the normalisation; no
          branch), and each categorical code one load from ``codes16``;
        * otherwise (float32/float64, or float16 through the table): per row a copy streamed in, then one
          scalar pass in L1 (NaN → 0, the normalisation), each code by a binary search over its intervals.
          Three vectorized passes measured as fast on rows in cache and slower on rows read from memory.
        """
        if isinstance(raw.dtype, types.Integer) and _HALF_IN_HARDWARE:
            def half_rows(raw, table, mean, scale, columns, lo, hi, codes, starts, defaults, codes16, x):
                n, d = raw.shape
                tabled = codes16.shape[1] == 65536  # else (C, 0): a model with too many columns to table
                for i in range(n):
                    source, row = raw[i], x[i]
                    for j in range(d):
                        h = source[j]
                        keep = np.uint16(np.uint16(h & np.uint16(0x7FFF)) <= np.uint16(0x7C00))  # 0: NaN
                        row[j] = (_half_bits_as_float32(np.uint16(h & np.uint16(-keep))) - mean[j]) / scale[j]
                    for c in range(len(columns)):
                        column = columns[c]
                        if tabled:
                            code = codes16[c, source[column]]
                        else:  # the exact value of the table (a NaN's payload kept), as searched_rows has it
                            code = _interval_code(table[source[column]], c, lo, hi, codes, starts, defaults)
                        row[column] = (code - mean[column]) / scale[column]
            return half_rows

        def searched_rows(raw, table, mean, scale, columns, lo, hi, codes, starts, defaults, codes16, x):
            n, d = raw.shape
            found = np.empty(len(columns), np.float32)
            for i in range(n):
                source, row = raw[i], x[i]
                for j in range(d):
                    row[j] = _as_float32(source[j], table)
                for c in range(len(columns)):
                    found[c] = _interval_code(row[columns[c]], c, lo, hi, codes, starts, defaults)
                for j in range(d):
                    value = row[j]
                    if value != value:
                        value = np.float32(0)
                    row[j] = (value - mean[j]) / scale[j]
                for c in range(len(columns)):
                    column = columns[c]
                    row[column] = (found[c] - mean[column]) / scale[column]
        return searched_rows

    @_jit
    def encode_rows(raw, table, mean, scale, columns, lo, hi, codes, starts, defaults, codes16, x):
        """The model's input encoding of raw (n, d) into float32 x (n, d), exactly as TensorFlow's graph does it.

        ``raw`` is float32/float64, or uint16 holding float16 bit patterns (widened exactly: by the CPU, or
        through ``table``, the float32 value of every float16). Categorical column c (``columns[c]``) takes
        the code of the vocabulary interval holding its float32 value (``_interval_code``; float16 rows:
        ``codes16``, float32 (C, 65,536), made by ``category_code_table``, or (C, 0): searched), else
        ``defaults[c]``; other columns NaN → 0; then every column (v - mean) / scale, in float32. One row at a
        time, while it is in L1.
        """
        _encode(raw, table, mean, scale, columns, lo, hi, codes, starts, defaults, codes16, x)

    @_jit
    def score_rows(raw, table, mean, scale, columns, lo, hi, codes, starts, defaults, codes16, panels, biases,
                   relus, widths, chunk_rows, sigmoid, scores):
        """The whole model on raw (n, d) → scores float32 (n,), ``chunk_rows`` rows at a time (speed only).

        Encoding as ``encode_rows``; layer l = ``gemm_panels`` with ``panels[l]``, ``biases[l]`` (tuples),
        ``relus[l]``, real output width ``widths[l]`` (arrays); the last layer's column 0 through the
        sigmoid when ``sigmoid`` (the Keras heads), else as it is (raw-output heads such as ViT-H/14).
        Each row's bits depend on that row only.
        """
        n, d = raw.shape
        for start in range(0, n, chunk_rows):
            stop = min(start + chunk_rows, n)
            h = np.empty((stop - start, d), np.float32)
            encode_rows(raw[start:stop], table, mean, scale, columns, lo, hi, codes, starts, defaults, codes16, h)
            width = d
            for layer in range(len(panels)):
                out = np.empty((stop - start, biases[layer].shape[0]), np.float32)
                gemm_panels(h, width, panels[layer], biases[layer], relus[layer], out)
                h, width = out, widths[layer]
            if sigmoid:
                sigmoid_column(h, scores[start:stop])
            else:
                for i in range(stop - start):
                    scores[start + i] = h[i, 0]

    @_jit
    def dense_reference(x, kernel, bias, relu):
        """The documented order written plainly, one scalar chain per output (slow; for tests)."""
        n, k_total = x.shape
        m = kernel.shape[1]
        out = np.empty((n, m), np.float32)
        for i in range(n):
            for j in range(m):
                total = np.float32(0)
                for start in range(0, k_total, K_BLOCK):
                    block = np.float32(0)
                    for k in range(start, min(start + K_BLOCK, k_total)):
                        block = fma32(x[i, k], kernel[k, j], block)
                    total = block if start == 0 else total + block
                value = total + bias[j]
                if relu and value < np.float32(0):
                    value = np.float32(0)
                out[i, j] = value
        return out


class PackedLayer:
    """A Dense layer's weights laid out for the kernel: panels of ``nr`` output columns, zero-padded.

    ``panels`` float32 (P, k, nr), ``bias`` float32 (P*nr,) zero-padded, ``width`` = m (real outputs).
    """

    __slots__ = ("panels", "bias", "width", "relu")

    def __init__(self, kernel: np.ndarray, bias: np.ndarray, relu: bool):
        kernel = np.asarray(kernel, np.float32)
        k, m = kernel.shape
        nr = _L if m <= _L else _NR
        n_panels = -(-m // nr)
        padded = np.zeros((k, n_panels * nr), np.float32)
        padded[:, :m] = kernel
        self.panels = np.ascontiguousarray(padded.reshape(k, n_panels, nr).transpose(1, 0, 2))
        self.bias = np.zeros(n_panels * nr, np.float32)
        self.bias[:m] = np.asarray(bias, np.float32).reshape(-1)
        self.width, self.relu = m, bool(relu)

    def forward(self, x: np.ndarray, k: int) -> np.ndarray:
        """x float32 (n, ≥k) C-contiguous, columns :k used → float32 (n, P*nr), columns :width meaningful."""
        out = np.empty((x.shape[0], self.bias.shape[0]), np.float32)
        gemm_panels(x, k, self.panels, self.bias, int(self.relu), out)
        return out


def _require_numba() -> None:
    if not HAVE_NUMBA:  # pragma: no cover
        from clip_nsfw_spark.errors import MissingDependencyError

        raise MissingDependencyError("the numpy scorer needs numba for its fixed-order kernel: pip install numba")


def dense(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray, relu: bool = False) -> np.ndarray:
    """One Dense layer in the fixed order (``ORDER``): float32 x (n, k), kernel (k, m), bias (m,) → (n, m).

    Any m ≥ 1. The result of each row depends on that row only (bit for bit, any batch size).
    """
    _require_numba()
    x = np.ascontiguousarray(x, dtype=np.float32)
    kernel = np.asarray(kernel, np.float32)
    if x.ndim != 2 or kernel.ndim != 2 or x.shape[1] != kernel.shape[0]:
        raise ValueError(f"dense expects x (n, k) and kernel (k, m); found {x.shape} and {kernel.shape}")
    layer = PackedLayer(kernel, bias, relu)
    return np.ascontiguousarray(layer.forward(x, kernel.shape[0])[:, :layer.width])


def sigmoid(z: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """The documented sigmoid of float32 z (n, ≥1) column 0 (+ bias[0]) → float32 (n,)."""
    _require_numba()
    z = np.array(z, dtype=np.float32, order="C", copy=True).reshape(len(z), -1)
    if bias is not None:
        z[:, 0] += np.asarray(bias, np.float32).reshape(-1)[0]
    scores = np.empty(len(z), np.float32)
    sigmoid_column(z, scores)
    return scores
