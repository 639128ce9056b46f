"""spark-submit entry point: ``spark-submit jobs/score_embeddings.py --config conf/score_embeddings.yaml [--key value]``.

Thin on purpose: the options are those of ``clip-nsfw-spark run``; the master comes from spark-submit.
"""

import argparse
import logging
import sys

from clip_nsfw_spark.errors import ClipNsfwError
from clip_nsfw_spark.cli.run import add_job_arguments, run_from_args


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="score_embeddings.py", description=__doc__)
    add_job_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run_from_args(args, default_master=None)
    except ClipNsfwError as err:
        print(f"score_embeddings: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
