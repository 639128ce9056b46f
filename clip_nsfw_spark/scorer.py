"""Scorers: the exact numpy implementation of LAION's NSFW detector, and TensorFlow as the reference.

Contract shared by both: ``scorer(embeddings)`` takes a 2-D array of shape ``(n, scorer.dim)`` and dtype
float16, float32 or float64, and returns float32 scores of shape ``(n,)`` in [0, 1] (1 = NSFW; LAION's
``punsafe``). NaN inputs are scored as the original model scores them (numeric NaN → 0), never raised.

This module imports numpy only; TensorFlow is imported by the 'tensorflow' backend when it is chosen.
"""

from __future__ import annotations

import os

import numpy as np

from .errors import ClipNsfwError, DimensionError
from .kernels import HAVE_NUMBA, dense
from .models import REGISTRY, canonical_name, fitting_model_hint, prepare_model, saved_model_dir
from .weights import PortableWeights, sortable_int32

# Rows per chunk: small enough that a chunk's activations stay in L2 cache (1024 × 512 float32 = 2 MiB
# at the widest layer), large enough that sgemm runs near its peak.
CHUNK_ROWS = 1024
_FLOAT16_TO_FLOAT32 = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


def check_embeddings(embeddings, dim: int, name: str) -> np.ndarray:
    """Validate a 2-D float array of width ``dim``; raise DimensionError/TypeError that say how to fix it."""
    array = np.asarray(embeddings)
    if array.ndim != 2:
        raise DimensionError(f"{name} expects a 2-D array of shape (n, {dim}); found shape {array.shape}")
    if array.dtype not in (np.float16, np.float32, np.float64):
        raise TypeError(f"{name} expects float16, float32 or float64 embeddings; found {array.dtype}")
    if array.shape[1] != dim:
        raise DimensionError(f"model {name} expects {dim}-d embeddings ({dim} columns), found "
                             f"{array.shape[1]}-d{fitting_model_hint(array.shape[1])}")
    return array


class NumpyScorer:
    """The LAION detector without TensorFlow: numpy for the encoding, a numba kernel for the layers.

    ``tf_order=True`` (default, needs numba) sums the hidden layers in TensorFlow's order, which makes
    them bit-identical to the original model; ``False`` uses BLAS (≈1e-5 from TensorFlow on extreme
    inputs). Holds only arrays: picklable, cheap to build, safe to call from several threads.
    """

    backend = "numpy"

    def __init__(self, weights: PortableWeights, name: str | None = None, sha256: str | None = None,
                 tf_order: bool = True):
        self.weights = weights
        self.tf_order = tf_order and HAVE_NUMBA
        self.name = name or weights.name
        self.sha256 = sha256
        self.dim = weights.dim
        self._mean = weights.mean
        # TensorFlow computes max(sqrt(var), eps) at run time in float32; doing the same keeps the
        # normalisation bit-identical (sqrt, subtraction and division are all correctly rounded).
        self._scale = np.maximum(np.sqrt(weights.variance), np.float32(weights.epsilon)).astype(np.float32)
        self._categorical = [(c.column, c.lo, c.hi, c.interval_codes, np.float32(c.default))
                             for c in weights.categorical]
        self._layers = list(zip(weights.kernels, weights.biases, weights.activations, weights.block_sizes))

    def __repr__(self) -> str:
        return f"NumpyScorer(name={self.name!r}, dim={self.dim})"

    def __call__(self, embeddings) -> np.ndarray:
        array = check_embeddings(embeddings, self.dim, self.name)
        scores = np.empty(len(array), dtype=np.float32)
        for start in range(0, len(array), CHUNK_ROWS):
            stop = min(start + CHUNK_ROWS, len(array))
            scores[start:stop] = self._score_chunk(array[start:stop])
        return scores

    def encode(self, chunk: np.ndarray) -> np.ndarray:
        """The model's input encoding: float16/32/64 (m, dim) → normalised float32 (m, dim) features."""
        if chunk.dtype == np.float16:
            # A 256 KiB table of every float16's float32 value: exact, and ~4x faster than numpy's cast.
            x = _FLOAT16_TO_FLOAT32[np.ascontiguousarray(chunk).view(np.uint16)]
        else:
            x = np.array(chunk, dtype=np.float32, order="C", copy=True)
        codes = [(column, self._lookup(x[:, column], lo, hi, values, default))
                 for column, lo, hi, values, default in self._categorical]
        np.copyto(x, np.float32(0), where=np.isnan(x))
        for column, code in codes:
            x[:, column] = code
        x -= self._mean
        x /= self._scale
        return x

    @staticmethod
    def _lookup(values, lo, hi, codes, default) -> np.ndarray:
        keys = sortable_int32(values)
        slot = np.searchsorted(lo, keys, side="right") - 1
        hit = slot >= 0
        slot_safe = np.where(hit, slot, 0)
        hit &= keys <= hi[slot_safe]
        return np.where(hit, codes[slot_safe], default).astype(np.float32)

    def _score_chunk(self, chunk: np.ndarray) -> np.ndarray:
        h = self.encode(chunk)
        for kernel, bias, activation, block in self._layers:
            # Every layer, the 1-output one included, sums each row on its own in a fixed order, so a
            # row's score never depends on the other rows in its batch (BLAS picks kernels by size).
            h = dense(h, kernel, bias, block, activation == "relu", self.tf_order)
            if activation == "sigmoid":
                # exp(-z) overflows to inf for z < -88, giving 1/(1+inf) = 0: the right limit.
                with np.errstate(over="ignore"):
                    h = np.float32(1) / (np.float32(1) + np.exp(-h))
        return h.reshape(-1)


class TensorFlowScorer:
    """The original SavedModel through TensorFlow's ``serving_default`` signature (float64 input)."""

    backend = "tensorflow"
    batch_rows = 65536

    def __init__(self, saved_model: os.PathLike, name: str, dim: int, sha256: str | None = None):
        from .convert import import_tensorflow

        self._tf = import_tensorflow()
        self._loaded = self._tf.saved_model.load(os.fspath(saved_model))
        self._signature = self._loaded.signatures["serving_default"]
        (self._input_name,) = self._signature.structured_input_signature[1].keys()
        self.name, self.dim, self.sha256 = name, dim, sha256

    def __repr__(self) -> str:
        return f"TensorFlowScorer(name={self.name!r}, dim={self.dim})"

    def __call__(self, embeddings) -> np.ndarray:
        array = check_embeddings(embeddings, self.dim, self.name)
        out = np.empty(len(array), dtype=np.float32)
        for start in range(0, len(array), self.batch_rows):
            batch = self._tf.constant(array[start:start + self.batch_rows].astype(np.float64))
            result = self._signature(**{self._input_name: batch})
            out[start:start + len(batch)] = next(iter(result.values())).numpy().reshape(-1)
        return out


def load_scorer(model: str | os.PathLike = "vit-l-14", backend: str = "numpy"):
    """Return a scorer for ``model``: a registry name (the Keras NSFW models, ``vit-h-14``, the violence
    heads), a SavedModel dir/zip, a PyTorch ``.pth``/safetensors MLP state dict, or a portable ``.npz``.

    ``backend="numpy"`` (default) needs numpy only once the portable file exists; ``"tensorflow"`` runs
    the original graph (Keras models only). The first use of a model fetches, verifies and converts it
    (see models.py). Heads other than the Keras ones return a NumpyScorer (vit-h-14 and state dicts: raw
    last-layer output, not bounded to [0, 1]) or a PromptScorer (violence heads; see prompts.py).
    """
    from .heads import scorer_from_portable

    resolved = prepare_model(model)
    registry_name = canonical_name(os.fspath(model))
    name = registry_name or resolved.name
    if backend == "numpy":
        return scorer_from_portable(resolved.portable, name=name, sha256=resolved.sha256)
    if backend == "tensorflow":
        if resolved.saved_model is None and (registry_name is None or REGISTRY[registry_name].kind != "keras-zip"):
            raise ClipNsfwError(f"{name} has no TensorFlow graph (it is not a SavedModel); use backend='numpy'")
        weights_dim = REGISTRY[registry_name].dim if registry_name else PortableWeights.load(resolved.portable).dim
        return TensorFlowScorer(saved_model_dir(model), name=name, dim=weights_dim, sha256=resolved.sha256)
    raise ClipNsfwError(f"unknown backend {backend!r}: choose 'numpy' or 'tensorflow'")
