"""clip-nsfw-spark: LAION's CLIP-based NSFW detector, exact and TensorFlow-free, as a Spark job.

Public API::

    from clip_nsfw_spark import load_scorer
    scorer = load_scorer("vit-l-14")          # or "vit-b-32", a SavedModel dir/zip, a portable .npz
    scores = scorer(embeddings)               # (n, 768) float16/32/64 → (n,) float32 in [0, 1]

Importing this package imports numpy only (never TensorFlow, never Spark).
"""

from clip_nsfw_spark.errors import ClipNsfwError
from clip_nsfw_spark.api import load_scorer
from clip_nsfw_spark.scoring.scorer import NumpyScorer

__version__ = "0.1.0"
__all__ = ["ClipNsfwError", "NumpyScorer", "load_scorer", "__version__"]
