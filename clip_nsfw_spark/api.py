"""The package's face: ``load_scorer`` (any head by name or file, ready to call) and the TensorFlow reference.

This is where the pure scorers (scorer.py, prompts.py) meet the model cache (models.py): the first use of
a model fetches, verifies and converts it. TensorFlow is imported only for ``backend="tensorflow"``.
"""

from __future__ import annotations

import os

import numpy as np

from clip_nsfw_spark.scoring.embeddings import check_embeddings
from clip_nsfw_spark.errors import ClipNsfwError
from clip_nsfw_spark.models.cache import prepare_model, saved_model_dir
from clip_nsfw_spark.models.registry import REGISTRY, canonical_name
from clip_nsfw_spark.scoring.scorer import scorer_from_portable
from clip_nsfw_spark.scoring.weights import PortableWeights


class TensorFlowScorer:
    """The original SavedModel through TensorFlow's ``serving_default`` signature (float64 input)."""

    backend = "tensorflow"
    batch_rows = 65536

    def __init__(self, saved_model: os.PathLike, name: str, dim: int, sha256: str | None = None):
        from clip_nsfw_spark.models.convert import import_tensorflow

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
