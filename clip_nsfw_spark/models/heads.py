"""Several safety heads over one embedding column, as a pure API (no Spark, no IO once loaded).

A *head* is a registry model or a user model with a score column and a threshold; a row is unsafe when any
head's score is at or over its threshold (``score >= threshold``, the job's convention; clip-retrieval
flags the NSFW heads with ``> 0.5``, so a score of exactly 0.5 is unsafe here and safe there).

Defaults per head (``REGISTRY`` in registry.py):

=================  ==============  =========  ================================================================
head               score column    threshold  score
=================  ==============  =========  ================================================================
vit-l-14           ``punsafe``     0.5        sigmoid output in [0, 1]
vit-b-32           ``punsafe``     0.5        sigmoid output in [0, 1]
vit-h-14           ``punsafe``     0.5        raw output of the last Linear, *not* bounded to [0, 1]
violence-l-14      ``pviolence``   0.5        softmax(100·sims)[1], ≥ 0.5 ⇔ clip-retrieval's argmax rule
violence-b-32      ``pviolence``   0.5        same, for ViT-B/32 embeddings
user models        ``punsafe``     0.5        as their file defines (portable weights, SavedModel, state dict)
=================  ==============  =========  ================================================================

Every NSFW head writes ``punsafe`` (LAION's column name, so an H/14 run is a drop-in for an L/14 run), and
every violence head ``pviolence``. One embedding column has one width, so at most one NSFW head and one
violence head fit it; two heads with the same column (e.g. a user NSFW head beside vit-l-14) need an
explicit ``score_column`` for one of them, or ``MultiScorer`` raises a ConfigError that says so.

Executors build scorers from a head's portable bytes alone (``scoring.scorer.scorer_for``): numpy only, never torch,
TensorFlow or Spark.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable

import numpy as np

from clip_nsfw_spark.contract import Head
from clip_nsfw_spark.errors import ConfigError, DimensionError
from clip_nsfw_spark.models.cache import prepare_model
from clip_nsfw_spark.models.registry import REGISTRY, HeadSpec, canonical_name, fitting_model_hint
from clip_nsfw_spark.scoring.prompts import PROMPT_FORMAT, PromptHead
from clip_nsfw_spark.scoring.scorer import portable_dim, portable_format, scorer_for
from clip_nsfw_spark.scoring.weights import PortableWeights

DEFAULT_SCORE_COLUMN = "punsafe"
DEFAULT_THRESHOLD = 0.5


def head_defaults(model: str) -> tuple[str, float]:
    """``(score_column, threshold)`` defaults of ``model`` (registry values, else punsafe / 0.5)."""
    spec = REGISTRY.get(canonical_name(os.fspath(model)) or "")
    return (spec.score_column, spec.threshold) if spec else (DEFAULT_SCORE_COLUMN, DEFAULT_THRESHOLD)


def resolve_head(spec: str | os.PathLike | HeadSpec, run_threshold: float | None = None) -> Head:
    """The one way a head is made, for the job, the DataFrame functions and ``load_head`` alike: fetch,
    verify and convert the model once (cache.py), read its width without building a scorer, and settle its
    column and threshold. The threshold rule, here only: the head's own, else the run's (``run_threshold``:
    the job's ``threshold``), else the registry's default."""
    if not isinstance(spec, HeadSpec):
        spec = HeadSpec(os.fspath(spec))
    resolved = prepare_model(spec.model)
    name = canonical_name(os.fspath(spec.model)) or resolved.name
    column, registry_threshold = head_defaults(spec.model)
    threshold = next(t for t in (spec.threshold, run_threshold, registry_threshold) if t is not None)
    data = resolved.portable.read_bytes()
    return Head(name, resolved.sha256, data, spec.score_column or column, float(threshold), portable_dim(data),
                str(resolved.source))


def load_head(model: str | os.PathLike | HeadSpec, score_column: str | None = None,
              threshold: float | None = None) -> Head:
    """``resolve_head`` for the Python API: ``model`` with ``score_column``/``threshold`` where the spec has none."""
    if not isinstance(model, HeadSpec):
        model = HeadSpec(os.fspath(model))
    model = dataclasses.replace(model, score_column=model.score_column or score_column,
                                threshold=threshold if model.threshold is None else model.threshold)
    return resolve_head(model)


def load_heads(models: Iterable[str | os.PathLike | HeadSpec | Head]) -> "MultiScorer":
    """``load_heads(["vit-l-14", "violence-l-14"])``: every head loaded, checked to share one width."""
    return MultiScorer([m if isinstance(m, Head) else load_head(m) for m in models])


def describe_head(name: str) -> dict:
    """What ``clip-nsfw-spark model info`` shows of a head (fetched, verified and converted first): the
    registry's record, the cache's files, its defaults and the portable weights' shapes (JSON values)."""
    resolved = prepare_model(name)
    spec = REGISTRY.get(canonical_name(name) or "")
    column, threshold = head_defaults(name)
    info = {
        "name": canonical_name(name) or resolved.name,
        "kind": spec.kind if spec else None,
        "clip_model": spec.clip_model if spec else None,
        "dim": None,
        "sha256": resolved.sha256,
        "pin": dict([spec.pin]) if spec else None,
        "source": str(resolved.source),
        "url": spec.url if spec else None,
        "portable_weights": str(resolved.portable),
        "saved_model": str(resolved.saved_model) if resolved.saved_model else None,
        "score": spec.score if spec else None,
        "score_column": column,
        "threshold": threshold,
    }
    if portable_format(resolved.portable) == PROMPT_FORMAT:
        head = PromptHead.load(resolved.portable)
        info |= {"dim": head.dim, "prompts": list(head.prompts.shape), "logit_scale": head.logit_scale}
        return info
    weights = PortableWeights.load(resolved.portable)
    info |= {
        "dim": weights.dim,
        "categorical_columns": [c.column for c in weights.categorical],
        "layers": [list(k.shape) for k in weights.kernels],
        "activations": list(weights.activations),
        "summation_order": weights.order,
    }
    return info


class MultiScorer:
    """Several heads over one embedding width; pure numpy once built (picklable: holds arrays only).

    ``heads`` are ``contract.Head`` values; each one's scorer is built from its bytes once per process.

    ``scorer(x)`` → dict score column → float32 (n,) scores, in head order; ``scores(x)`` → float32 (n, h);
    ``unsafe(x_or_scores)`` → bool (n,): any head at or over its threshold.
    """

    def __init__(self, heads: Iterable[Head]):
        self.heads = tuple(heads)
        if not self.heads:
            raise ConfigError("no heads: give at least one model (e.g. 'vit-l-14')")
        self._scorers = tuple(scorer_for(h) for h in self.heads)
        widths = {s.dim for s in self._scorers}  # the scorers' own: a Head made by hand may not say its width
        if len(widths) != 1:
            listed = ", ".join(f"{h.name} expects {s.dim}-d" for h, s in zip(self.heads, self._scorers))
            raise DimensionError(f"heads scored in one pass must share the embedding width; {listed}. Score "
                                 "each embedding column with the heads of its CLIP model.")
        columns = [h.score_column for h in self.heads]
        clashes = sorted({c for c in columns if columns.count(c) > 1})
        if clashes:
            who = ", ".join(f"{h.name} → {h.score_column}" for h in self.heads if h.score_column in clashes)
            raise ConfigError(f"two heads write the same score column ({who}); give one of them its own "
                              "score_column")
        self.dim = widths.pop()

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(h.score_column for h in self.heads)

    @property
    def thresholds(self) -> np.ndarray:
        return np.array([h.threshold for h in self.heads], dtype=np.float64)

    def __repr__(self) -> str:
        return f"MultiScorer({', '.join(f'{h.name}→{h.score_column}≥{h.threshold}' for h in self.heads)})"

    def _check(self, embeddings) -> np.ndarray:
        array = np.asarray(embeddings)
        if array.ndim != 2:
            raise DimensionError(f"heads expect a 2-D array of shape (n, {self.dim}); found shape {array.shape}")
        if array.shape[1] != self.dim:
            names = ", ".join(h.name for h in self.heads)
            raise DimensionError(f"heads {names} expect {self.dim}-d embeddings, found {array.shape[1]}-d"
                                 f"{fitting_model_hint(array.shape[1])}")
        return array

    def scores(self, embeddings) -> np.ndarray:
        """float16/32/64 (n, dim) → float32 (n, h), column j from head j."""
        array = self._check(embeddings)
        out = np.empty((len(array), len(self.heads)), dtype=np.float32)
        for j, scorer in enumerate(self._scorers):
            out[:, j] = scorer(array)
        return out

    def __call__(self, embeddings) -> dict[str, np.ndarray]:
        matrix = self.scores(embeddings)
        return {column: matrix[:, j] for j, column in enumerate(self.columns)}

    def flagged(self, scores: np.ndarray) -> np.ndarray:
        """bool (n, h): head j's score at or over its threshold (NaN is never flagged).

        Compared as the job compares one column: exactly, the float32 score widened to float64 against the
        threshold (numpy would round the threshold to float32 first).
        """
        scores = np.asarray(scores)
        return np.stack([scores[:, j].astype(np.float64) >= float(h.threshold) for j, h in enumerate(self.heads)],
                        axis=1)

    def unsafe(self, scores: np.ndarray) -> np.ndarray:
        """bool (n,): any head at or over its threshold, from float32 (n, h) ``scores``."""
        return self.flagged(scores).any(axis=1)
