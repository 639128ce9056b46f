"""Prompt heads: clip-retrieval's violence detector as a continuous score, exact to its argmax rule.

LAION's ``violence_detection_vit_l_14.npy`` / ``_b_32.npy`` hold two unit-length CLIP text embeddings
(float32, shape (2, d)). clip-retrieval flags an image embedding ``x`` violent when
``argmax(x @ prompts.T) == 1`` (numpy's argmax: a tie gives index 0, i.e. *not* violent; a NaN
similarity wins where it stands first).

The score here: with similarities ``s0, s1`` (float32, computed by ``similarities`` in one fixed summation
order, so a row's score never depends on its batch), ``p = 1 / (1 + exp(-100 · (s1 − s0)))`` in float32,
i.e. ``softmax(100 · [s0, s1])[1]`` with CLIP's logit scale 100. Where float32 rounding would put ``p`` on
the wrong side of 0.5 (|s1 − s0| below ~1e-9, where ``exp`` rounds to 1, and at exact ties) or makes it
NaN (Inf inputs), ``p`` is moved to the boundary on the argmax rule's side: **0.5** when the rule says
violent, **0.49999997** (the largest float32 below 0.5) when it does not. So ``score >= 0.5`` equals the
argmax rule exactly, for every row, and an exact tie scores 0.49999997.

NaN inputs are replaced by 0 first, as the NSFW heads do with numeric NaN (an all-NaN row scores as the
zero row: a tie, not violent). This module imports numpy only.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path

import numpy as np

from clip_nsfw_spark.scoring.embeddings import check_embeddings
from clip_nsfw_spark.errors import ModelError
from clip_nsfw_spark.scoring.kernels import dense
from clip_nsfw_spark.scoring.weights import save_npz

PROMPT_FORMAT = "clip-nsfw-spark/prompt-head/v1"
LOGIT_SCALE = 100.0  # CLIP's logit scale (exp of its learned temperature, clamped at 100)
BELOW_HALF = np.nextafter(np.float32(0.5), np.float32(0))  # 0.49999997
CHUNK_ROWS = 4096


def fixed_order_dense(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray, relu: bool) -> np.ndarray:
    """float32 (n, k) @ float32 (k, m) + bias (m,) → float32 (n, m), each output one fixed-order sum over k.

    The single place this module calls ``kernels.dense``: the project's one summation order (FMA chains in
    k-blocks, see kernels.py), so a similarity is a pure function of (prompt file, row) on every CPU.
    """
    return dense(x, kernel, bias, relu)


@dataclasses.dataclass(frozen=True)
class PromptHead:
    """Two prompt embeddings (float32 (2, d)); class 1 is the flagged one (violent)."""

    name: str
    prompts: np.ndarray
    logit_scale: float = LOGIT_SCALE
    metadata: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.prompts.ndim != 2 or self.prompts.shape[0] != 2 or self.prompts.dtype != np.float32:
            raise ModelError(f"{self.name}: prompt embeddings must be float32 of shape (2, d), found "
                             f"{self.prompts.dtype} {self.prompts.shape}")
        if not np.isfinite(self.prompts).all():
            raise ModelError(f"{self.name}: prompt embeddings hold NaN or Inf")

    @property
    def dim(self) -> int:
        return int(self.prompts.shape[1])

    @classmethod
    def from_npy(cls, path: str | os.PathLike, name: str) -> "PromptHead":
        """Read LAION's ``violence_detection_vit_*.npy`` (no pickle)."""
        try:
            prompts = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ModelError(f"{path} is not a .npy of prompt embeddings: {err}") from err
        norms = np.linalg.norm(prompts.astype(np.float64), axis=-1).round(6).tolist() if prompts.ndim == 2 else []
        return cls(name, np.ascontiguousarray(prompts), metadata={"source": Path(path).name, "norms": norms})

    def save(self, path: str | os.PathLike) -> None:
        """Write the portable ``.npz`` atomically (temporary name, then rename)."""
        header = {"name": self.name, "dim": self.dim, "logit_scale": self.logit_scale, "flagged_class": 1,
                  "metadata": self.metadata}
        save_npz(path, {"format": np.array(PROMPT_FORMAT), "header": np.array(json.dumps(header)),
                        "prompts": self.prompts})

    @classmethod
    def load(cls, source: str | os.PathLike | bytes) -> "PromptHead":
        """Read a portable prompt-head file (a path or its bytes). Never unpickles."""
        handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
        with np.load(handle, allow_pickle=False) as npz:
            if str(npz["format"]) != PROMPT_FORMAT:
                raise ModelError(f"not a prompt-head file: format {str(npz['format'])!r}, expected {PROMPT_FORMAT!r}")
            header = json.loads(str(npz["header"]))
            return cls(header["name"], npz["prompts"], float(header["logit_scale"]), header.get("metadata", {}))


def similarities(x: np.ndarray, prompts: np.ndarray) -> np.ndarray:
    """float32 (n, d) rows, float32 (2, d) prompts → float32 (n, 2) dot products, in the fixed order."""
    kernel = np.ascontiguousarray(prompts.T)
    return fixed_order_dense(np.ascontiguousarray(x, dtype=np.float32), kernel, np.zeros(2, np.float32), False)


def argmax_rule(sims: np.ndarray) -> np.ndarray:
    """bool (n,): clip-retrieval's ``argmax(sims) == 1`` for float32 (n, 2) similarities (NaN-aware)."""
    s0, s1 = sims[:, 0], sims[:, 1]
    return ~np.isnan(s0) & (np.isnan(s1) | (s1 > s0))


def score_from_similarities(sims: np.ndarray, logit_scale: float = LOGIT_SCALE) -> np.ndarray:
    """float32 (n, 2) similarities → float32 (n,) scores with ``score >= 0.5 ⇔ argmax_rule`` (module docstring)."""
    sims = np.asarray(sims, dtype=np.float32)
    flagged = argmax_rule(sims)
    with np.errstate(over="ignore", invalid="ignore"):
        margin = np.float32(logit_scale) * (sims[:, 1] - sims[:, 0])
        p = np.float32(1) / (np.float32(1) + np.exp(-margin))
    # fmax/fmin ignore NaN: a NaN p lands exactly on the boundary, on the rule's side.
    return np.where(flagged, np.fmax(p, np.float32(0.5)), np.fmin(p, BELOW_HALF)).astype(np.float32)


class PromptScorer:
    """Scores float16/32/64 (n, d) embeddings with a PromptHead → float32 (n,) in [0, 1]. Holds arrays only."""

    backend = "numpy"

    def __init__(self, head: PromptHead, name: str | None = None, sha256: str | None = None):
        self.head = head
        self.name = name or head.name
        self.sha256 = sha256
        self.dim = head.dim

    def __repr__(self) -> str:
        return f"PromptScorer(name={self.name!r}, dim={self.dim})"

    def clean(self, chunk: np.ndarray) -> np.ndarray:
        """float16/32/64 (m, d) → float32 (m, d) with NaN → 0 (float16 → float32 is exact)."""
        x = np.array(chunk, dtype=np.float32, order="C", copy=True)
        np.copyto(x, np.float32(0), where=np.isnan(x))
        return x

    def similarities(self, embeddings) -> np.ndarray:
        """float32 (n, 2): the similarities the score and the argmax rule are computed from."""
        array = check_embeddings(embeddings, self.dim, self.name)
        return similarities(self.clean(array), self.head.prompts)

    def __call__(self, embeddings) -> np.ndarray:
        array = check_embeddings(embeddings, self.dim, self.name)
        scores = np.empty(len(array), dtype=np.float32)
        for start in range(0, len(array), CHUNK_ROWS):
            chunk = self.clean(array[start:start + CHUNK_ROWS])
            scores[start:start + len(chunk)] = score_from_similarities(
                similarities(chunk, self.head.prompts), self.head.logit_scale)
        return scores
