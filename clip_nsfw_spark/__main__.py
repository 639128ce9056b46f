"""``python -m clip_nsfw_spark``: the command line, as ``python -m clip_nsfw_spark.cli`` and ``clip-nsfw-spark``."""

import sys

from clip_nsfw_spark.cli.main import main

sys.exit(main())
