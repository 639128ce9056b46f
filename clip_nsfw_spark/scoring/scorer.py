"""Scorers: the exact numpy implementation of LAION's NSFW detector, and TensorFlow as the reference.

Contract shared by both: ``scorer(embeddings)`` takes a 2-D array of shape ``(n, scorer.dim)`` and dtype
float16, float32 or float64, and returns float32 scores of shape ``(n,)`` in [0, 1] (1 = NSFW; LAION's
``punsafe``). NaN inputs are scored as the original model scores them (numeric NaN → 0), never raised.

This module imports numpy (and numba, through kernels.py) only; TensorFlow is imported by the
'tensorflow' backend when it is chosen.
"""

from __future__ import annotations

import io
import os

import numpy as np

from clip_nsfw_spark.scoring.embeddings import check_embeddings, finite_rows
from clip_nsfw_spark.errors import MissingDependencyError, ModelError
from clip_nsfw_spark.scoring.kernels import (HAVE_NUMBA, PackedLayer, category_code_table, encode_rows, read_only_view,
                                             score_rows)
from clip_nsfw_spark.scoring.prompts import PROMPT_FORMAT, PromptHead, PromptScorer
from clip_nsfw_spark.scoring.weights import ORDER, PortableWeights

# Rows per chunk: a chunk's activations stay in L2 cache (240 × 768 float32 = 720 KiB at the input), and
# 240 is a multiple of every register tile height (12, 6, 4). Speed only: a row's bits never depend on it.
CHUNK_ROWS = 240
# Categorical columns whose every float16 code is tabled (256 KB each; LAION's heads have 3 and 5); a model
# with more takes its float16 codes by binary search, as float rows do.
MAX_TABLED_COLUMNS = 64
_FLOAT16_TO_FLOAT32 = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


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
        self._codes16 = None  # made on the first float16 call (_float16_codes); never pickled
        self._no_codes16 = np.zeros((len(columns), 0), np.float32)
        self._layers = [PackedLayer(kernel, bias, activation == "relu")
                        for kernel, bias, activation in zip(weights.kernels, weights.biases, weights.activations)]
        if "sigmoid" in weights.activations[:-1]:
            raise ModelError(f"a sigmoid is supported on the output layer only; found {weights.activations}")
        # Keras heads end in a sigmoid; raw-output heads (ViT-H/14, user state dicts) in a linear layer.
        self._sigmoid = weights.activations[-1] == "sigmoid"

    def __repr__(self) -> str:
        return f"NumpyScorer(name={self.name!r}, dim={self.dim})"

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_codes16"] = None  # 256 KB per categorical column: made again where it is used
        return state

    def _float16_codes(self) -> np.ndarray:
        """Every float16's code in each categorical column, looked up once (C × 256 KB, the kernel's own binary
        search): float16 rows then take a code with one load per column. (C, 0) past ``MAX_TABLED_COLUMNS``
        columns (a user's model): the kernel then searches, as for floats. Threads racing here build equal
        tables; either is kept."""
        if self._codes16 is None:
            if len(self._columns) > MAX_TABLED_COLUMNS:
                self._codes16 = self._no_codes16
            else:
                codes16 = np.empty((len(self._columns), 1 << 16), np.float32)
                category_code_table(_FLOAT16_TO_FLOAT32, self._lo, self._hi, self._codes, self._starts,
                                    self._defaults, codes16)
                self._codes16 = codes16
        return self._codes16

    def __call__(self, embeddings) -> np.ndarray:
        array = check_embeddings(embeddings, self.dim, self.name)
        codes16 = self._no_codes16
        if array.dtype == np.float16:  # widened in the kernel (the CPU's conversion, or a table): exact
            array = np.ascontiguousarray(array).view(np.uint16)
            codes16 = self._float16_codes()
        array = read_only_view(array)  # one compiled kernel per dtype, warmed once (warm)
        scores = np.empty(len(array), dtype=np.float32)
        layers = self._layers
        score_rows(array, _FLOAT16_TO_FLOAT32, self._mean, self._scale, self._columns, self._lo, self._hi,
                   self._codes, self._starts, self._defaults, codes16, tuple(layer.panels for layer in layers),
                   tuple(layer.bias for layer in layers), np.array([layer.relu for layer in layers], np.int64),
                   np.array([layer.width for layer in layers], np.int64), CHUNK_ROWS, self._sigmoid, scores)
        return scores

    def encode(self, chunk: np.ndarray) -> np.ndarray:
        """The model's input encoding: float16/32/64 (m, dim) → normalised float32 (m, dim) features."""
        x = np.empty(chunk.shape, np.float32)
        codes16 = self._no_codes16
        if chunk.dtype == np.float16:  # widened in the kernel (the CPU's conversion, or a table): exact
            chunk = np.ascontiguousarray(chunk).view(np.uint16)
            codes16 = self._float16_codes()
        encode_rows(chunk, _FLOAT16_TO_FLOAT32, self._mean, self._scale, self._columns, self._lo, self._hi,
                    self._codes, self._starts, self._defaults, codes16, x)
        return x


def portable_format(source: str | os.PathLike | bytes) -> str:
    """The ``format`` string of a portable file (a path or its bytes), read without unpickling."""
    handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    with np.load(handle, allow_pickle=False) as npz:
        return str(npz["format"])


def portable_dim(source: str | os.PathLike | bytes) -> int:
    """The embedding width a portable file's head takes, read without building its scorer (no packing)."""
    if portable_format(source) == PROMPT_FORMAT:
        return PromptHead.load(source).dim
    return PortableWeights.load(source).dim


_SCORERS: dict[str, object] = {}


def scorer_for(head):
    """The scorer of a ``contract.Head``, built once per process from its bytes (the cache holds while
    Python workers are reused): an MLP head (NumpyScorer) or a prompt head (PromptScorer), numpy only."""
    scorer = _SCORERS.get(head.sha256)
    if scorer is None:
        scorer = scorer_from_portable(head.data, name=head.name, sha256=head.sha256)
        warm(scorer)
        _SCORERS[head.sha256] = scorer
    return scorer


def warm(scorer) -> None:
    """Load (or compile) the numba kernels a batch of float16 or float32 rows calls: ``scorer``'s (one per
    number of layers and input dtype) and the rows' check of every batch (embeddings.finite_rows). numba does
    it at a kernel's first call: here, with the model (or in the preloading daemon, spark/daemon.py), not
    inside the first batch's scoring, which the job's report counts apart from the model's load. A prompt
    head's scorer is numpy only: nothing to load."""
    if isinstance(scorer, NumpyScorer):
        for dtype in (np.float16, np.float32):
            scorer(np.zeros((1, scorer.dim), dtype))
            finite_rows(np.zeros((1, scorer.dim), dtype))


def scorer_from_portable(source: str | os.PathLike | bytes, name: str | None = None, sha256: str | None = None):
    """A NumpyScorer (MLP heads) or PromptScorer (prompt heads) for a portable file's path or bytes."""
    if portable_format(source) == PROMPT_FORMAT:
        return PromptScorer(PromptHead.load(source), name=name, sha256=sha256)
    return NumpyScorer(PortableWeights.load(source), name=name, sha256=sha256)
