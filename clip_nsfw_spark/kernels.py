"""Dense-layer kernels that add up products in the same order as TensorFlow's CPU MatMul.

Why this exists: float32 sums depend on their order. TensorFlow (Eigen's blocked GEMM) computes each
output as a chain of fused multiply-adds over k, restarted at every block of ``kc`` rows of the kernel,
the block results then added in order. BLAS (OpenBLAS sgemm) uses another order, and on LAION's
models that alone moves scores by up to 3e-5 from TensorFlow's. Following TensorFlow's order makes the
hidden layers bit-identical (verified at conversion time, see convert.py), so the scores match the
original model to ~1e-7.

``dense_relu_tf_order`` is compiled with numba (``fastmath={"contract"}`` lets LLVM fuse ``acc + a * w``
into one FMA instruction, exactly what Eigen does; nothing else is relaxed). Without numba the scorer
falls back to BLAS (``matmul_blas``): faster to start, ~1e-5 from TensorFlow.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

# Rows that share each loaded kernel row: 8 keeps 8 × 512 float32 accumulators (16 KiB) in L1;
# measured here 8 ≈ 1.2x faster than 4, larger blocks no better.
_ROW_BLOCK = 8


def _dense_relu_tf_order_py(x, kernel, bias, block, relu, out):  # pragma: no cover - compiled below
    """out (n, m) = act(x (n, k) @ kernel (k, m) + bias (m,)), summing k in blocks of ``block``."""
    n, k_total = x.shape
    m = kernel.shape[1]
    acc = np.empty((_ROW_BLOCK, m), np.float32)
    for i0 in range(0, n, _ROW_BLOCK):
        rows = min(_ROW_BLOCK, n - i0)
        for r in range(rows):
            for j in range(m):
                out[i0 + r, j] = 0.0
        for start in range(0, k_total, block):
            stop = min(start + block, k_total)
            for r in range(rows):
                for j in range(m):
                    acc[r, j] = 0.0
            for k in range(start, stop):
                for r in range(rows):
                    a = x[i0 + r, k]
                    for j in range(m):
                        acc[r, j] = acc[r, j] + a * kernel[k, j]  # one FMA, as in Eigen
            for r in range(rows):
                for j in range(m):
                    out[i0 + r, j] = out[i0 + r, j] + acc[r, j]
        for r in range(rows):
            for j in range(m):
                value = out[i0 + r, j] + bias[j]
                if relu and value < 0.0:  # NaN stays NaN, as in tf.nn.relu
                    value = 0.0
                out[i0 + r, j] = value


def _dot_lanes8_py(x, weights, bias, out):  # pragma: no cover - compiled below
    """out (n,) = x (n, k) @ weights (k,) + bias, for the 1-output layer.

    TensorFlow uses a matrix-vector kernel there whose exact order we have not pinned down. Eight FMA
    lanes (lane j takes k ≡ j mod 8) reduced pairwise ((0+1)+(2+3))+((4+5)+(6+7)), then the leftover k
    in order, is the layout closest to it of those measured (tests/test_parity.py). Each row is summed on
    its own, so a score never depends on its batch.
    """
    n, k_total = x.shape
    full = k_total - k_total % 8
    lanes = np.empty(8, np.float32)
    for i in range(n):
        for j in range(8):
            lanes[j] = 0.0
        for start in range(0, full, 8):
            for j in range(8):
                lanes[j] = lanes[j] + x[i, start + j] * weights[start + j]
        total = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))
        for k in range(full, k_total):
            total = total + x[i, k] * weights[k]
        out[i] = total + bias


try:  # numba is a core dependency, but keep the package importable without it
    import numba

    _compile = numba.njit(fastmath={"contract"}, cache=True, boundscheck=False, nogil=True)
    dense_relu_tf_order = _compile(_dense_relu_tf_order_py)
    dot_lanes8 = _compile(_dot_lanes8_py)
    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only where numba is missing
    dense_relu_tf_order = dot_lanes8 = None
    HAVE_NUMBA = False


def dense(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray, block: int, relu: bool,
          tf_order: bool) -> np.ndarray:
    """One Dense layer: float32 (n, k) → float32 (n, m), in TensorFlow's order when ``tf_order``."""
    if tf_order and HAVE_NUMBA and kernel.shape[1] == 1:
        out = np.empty((x.shape[0], 1), np.float32)
        dot_lanes8(np.ascontiguousarray(x), np.ascontiguousarray(kernel[:, 0]), bias[0], out[:, 0])
        if relu:
            np.maximum(out, np.float32(0), out=out)
        return out
    if tf_order and HAVE_NUMBA:
        out = np.empty((x.shape[0], kernel.shape[1]), np.float32)
        dense_relu_tf_order(np.ascontiguousarray(x), kernel, bias, block or kernel.shape[0], relu, out)
        return out
    return matmul_blas(x, kernel, bias, relu)


def matmul_blas(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray, relu: bool) -> np.ndarray:
    h = x @ kernel
    h += bias
    if relu:
        np.maximum(h, np.float32(0), out=h)
    return h
