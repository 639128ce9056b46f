"""Scorers: the exact numpy implementation of LAION's NSFW detector, and TensorFlow as the reference.

Contract shared by both: ``scorer(embeddings)`` takes a 2-D array of shape ``(n, scorer.dim)`` and dtype
float16, float32 or float64, and returns float32 scores of shape ``(n,)`` in [0, 1] (1 = NSFW; LAION's
``punsafe``). NaN inputs are scored as the original model scores them (numeric NaN → 0), never raised.

This module imports numpy (and numba, through kernels.py) only; TensorFlow is imported by the
'tensorflow' backend when it is chosen.
"""

from __future__ import annotations

import os

import numpy as np

from .errors import ClipNsfwError, DimensionError, MissingDependencyError, ModelError
from .kernels import HAVE_NUMBA, PackedLayer, encode_rows, score_rows
from .models import REGISTRY, canonical_name, fitting_model_hint, prepare_model, saved_model_dir
from .weights import ORDER, PortableWeights

# Rows per chunk: a chunk's activations stay in L2 cache (240 × 768 float32 = 720 KiB at the input), and
# 240 is a multiple of every register tile height (12, 6, 4). Speed only: a row's bits never depend on it.
CHUNK_ROWS = 240
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
    """The LAION detector without TensorFlow: a numba kernel for the encoding and the layers.

    Every layer is summed in the fixed order of ``kernels.ORDER`` (recorded in the weights file), so a
    row's score is a pure function of (weights, row): the same bits for any batch size, thread count,
    process or CPU. Holds only arrays: picklable, cheap to build, safe to call from several threads.
    """

    backend = "numpy"

    def __init__(self, weights: PortableWeights, name: str | None = None, sha256: str | None = None):
        if not HAVE_NUMBA:
            raise MissingDependencyError("the numpy scorer needs numba (its fixed-order kernel): pip install numba")
        if weights.order != ORDER:
            raise ModelError(f"weights {weights.name!r} were made for summation order {weights.order!r}; this "
                             f"scorer computes {ORDER!r}. Convert the model again (registry models re-derive "
                             "themselves in the cache: `clip-nsfw-spark model fetch`).")
        self.weights = weights
        self.name = name or weights.name
        self.sha256 = sha256
        self.dim = weights.dim
        self._mean = weights.mean
        # TensorFlow computes max(sqrt(var), eps) at run time in float32; doing the same keeps the
        # normalisation bit-identical (sqrt, subtraction and division are all correctly rounded).
        self._scale = np.maximum(np.sqrt(weights.variance), np.float32(weights.epsilon)).astype(np.float32)
        columns = weights.categorical
        self._columns = np.array([c.column for c in columns], np.int64)
        self._lo = np.concatenate([c.lo for c in columns] or [np.zeros(0, np.int32)]).astype(np.int32)
        self._hi = np.concatenate([c.hi for c in columns] or [np.zeros(0, np.int32)]).astype(np.int32)
        self._codes = np.concatenate([c.interval_codes for c in columns] or [np.zeros(0, np.float32)])
        self._codes = self._codes.astype(np.float32)
        self._starts = np.cumsum([0] + [len(c.lo) for c in columns]).astype(np.int64)
        self._defaults = np.array([c.default for c in columns], np.float32)
        self._layers = [PackedLayer(kernel, bias, activation == "relu")
                        for kernel, bias, activation in zip(weights.kernels, weights.biases, weights.activations)]
        if "sigmoid" in weights.activations[:-1]:
            raise ModelError(f"a sigmoid is supported on the output layer only; found {weights.activations}")
        # Keras heads end in a sigmoid; raw-output heads (ViT-H/14, user state dicts) in a linear layer.
        self._sigmoid = weights.activations[-1] == "sigmoid"

    def __repr__(self) -> str:
        return f"NumpyScorer(name={self.name!r}, dim={self.dim})"

    def __call__(self, embeddings) -> np.ndarray:
        array = check_embeddings(embeddings, self.dim, self.name)
        if array.dtype == np.float16:  # decoded in the kernel through a table of every float16's value
            array = np.ascontiguousarray(array).view(np.uint16)
        scores = np.empty(len(array), dtype=np.float32)
        layers = self._layers
        score_rows(array, _FLOAT16_TO_FLOAT32, self._mean, self._scale, self._columns, self._lo, self._hi,
                   self._codes, self._starts, self._defaults, tuple(layer.panels for layer in layers),
                   tuple(layer.bias for layer in layers), np.array([layer.relu for layer in layers], np.int64),
                   np.array([layer.width for layer in layers], np.int64), CHUNK_ROWS, self._sigmoid, scores)
        return scores

    def encode(self, chunk: np.ndarray) -> np.ndarray:
        """The model's input encoding: float16/32/64 (m, dim) → normalised float32 (m, dim) features."""
        x = np.empty(chunk.shape, np.float32)
        if chunk.dtype == np.float16:  # decoded through a table of every float16's float32 value: exact
            chunk = np.ascontiguousarray(chunk).view(np.uint16)
        encode_rows(chunk, _FLOAT16_TO_FLOAT32, self._mean, self._scale, self._columns, self._lo, self._hi,
                    self._codes, self._starts, self._defaults, x)
        return x


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
