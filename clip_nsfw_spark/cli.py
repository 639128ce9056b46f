"""The ``clip-nsfw-spark`` command: ``model fetch|info`` and ``run`` (the scoring job).

Errors of this package print as one clear line (no traceback) and exit with status 2; anything else is
a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .errors import ClipNsfwError
from .models import REGISTRY, canonical_name, prepare_model


def _model_info(name: str) -> dict:
    from .weights import PortableWeights

    resolved = prepare_model(name)
    weights = PortableWeights.load(resolved.portable)
    spec = REGISTRY.get(canonical_name(name) or "")
    return {
        "name": canonical_name(name) or resolved.name,
        "clip_model": spec.clip_model if spec else None,
        "dim": weights.dim,
        "sha256": resolved.sha256,
        "source": str(resolved.source),
        "url": spec.url if spec else None,
        "portable_weights": str(resolved.portable),
        "saved_model": str(resolved.saved_model) if resolved.saved_model else None,
        "categorical_columns": [c.column for c in weights.categorical],
        "layers": [list(k.shape) for k in weights.kernels],
        "summation_blocks": list(weights.block_sizes),
    }


def _cmd_model(args) -> int:
    names = args.names or list(REGISTRY)
    infos = [_model_info(name) for name in names]
    if args.json:
        print(json.dumps(infos if len(infos) > 1 else infos[0], indent=2))
        return 0
    for info in infos:
        if args.action == "fetch":
            print(f"{info['name']}: ready ({info['dim']}-d, sha256 {info['sha256']})")
            continue
        for key, value in info.items():
            print(f"{key:20} {value}")
        print()
    return 0


def _cmd_sample(args) -> int:
    from .sample import write_laion_sample, write_parquet_sample

    if args.layout == "parquet":
        write_parquet_sample(args.output, args.rows, args.files, args.dim)
    else:
        write_laion_sample(args.output, args.rows, args.files, args.dim)
    print(f"wrote {args.rows:,} rows of {args.dim}-d float16 embeddings to {args.output} ({args.layout})")
    return 0


def _cmd_package(args) -> int:
    from .package import build_environment_archive

    path = build_environment_archive(args.out, args.extras)
    print(f"wrote {path}; use: spark-submit --archives {path}#environment "
          "--conf spark.pyspark.python=./environment/bin/python jobs/score_embeddings.py …")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clip-nsfw-spark",
        description="LAION's CLIP-based NSFW detector on embedding datasets, with Spark.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    model = commands.add_parser("model", help="fetch, verify and convert models; show their details")
    model.add_argument("action", choices=["fetch", "info"])
    model.add_argument("names", nargs="*", help=f"registry names ({', '.join(REGISTRY)}) or paths; "
                                                "default: every registry model")
    model.add_argument("--json", action="store_true", help="print JSON")
    model.set_defaults(func=_cmd_model)

    sample = commands.add_parser("sample", help="write a LAION-like sample dataset (parquet or laion-npy)")
    sample.add_argument("output")
    sample.add_argument("--rows", type=int, default=200_000)
    sample.add_argument("--files", type=int, default=4)
    sample.add_argument("--dim", type=int, default=768)
    sample.add_argument("--layout", choices=["parquet", "laion-npy"], default="parquet")
    sample.set_defaults(func=_cmd_sample)

    package = commands.add_parser("package", help="pack the library + executor dependencies for spark-submit --archives")
    package.add_argument("--out", default="dist/clip-nsfw-spark-env.tar.gz", help="archive to write (.tar.gz)")
    package.add_argument("--extras", default="s3", help="extras to include (default s3; '' for none)")
    package.set_defaults(func=_cmd_package)

    try:
        from .job_cli import add_run_command
    except ImportError:  # the job's module is optional at this layer
        pass
    else:
        add_run_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except ClipNsfwError as err:
        print(f"clip-nsfw-spark: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
