"""The command line. ``python -m clip_nsfw_spark`` (or ``.cli``) and the ``clip-nsfw-spark`` script."""

from clip_nsfw_spark.cli.main import main

__all__ = ["main"]
