"""``python -m clip_nsfw_spark.cli``."""

import sys

from clip_nsfw_spark.cli.main import main

sys.exit(main())
