"""clip-nsfw-spark: LAION's CLIP-based NSFW detector, exact and TensorFlow-free, as a Spark job.

Public API::

    from clip_nsfw_spark import load_scorer
    scorer = load_scorer("vit-l-14")          # or "vit-b-32", a SavedModel dir/zip, a portable .npz
    scores = scorer(embeddings)               # (n, 768) float16/32/64 → (n,) float32 in [0, 1]

Importing this package imports numpy only (never TensorFlow, never Spark).
"""

import time as _time

# This process's CPU seconds when the package began to import (a Spark worker's start, apart from its
# imports: executor/stages.process_seconds_once).
IMPORTED_AT_CPU = _time.process_time()

from clip_nsfw_spark.errors import ClipNsfwError  # noqa: E402
from clip_nsfw_spark.api import load_scorer  # noqa: E402
from clip_nsfw_spark.scoring.scorer import NumpyScorer  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ClipNsfwError", "NumpyScorer", "load_scorer", "__version__"]
