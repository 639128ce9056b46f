"""The ``clip-nsfw-spark`` command: ``model fetch|info`` and ``run`` (the scoring job).

Errors of this package print as one clear line (no traceback) and exit with status 2; anything else is
a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from clip_nsfw_spark.errors import ClipNsfwError
from clip_nsfw_spark.models.registry import REGISTRY


def _cmd_model(args) -> int:
    from clip_nsfw_spark.models.heads import describe_head

    names = args.names or list(REGISTRY)
    infos = [describe_head(name) for name in names]
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
    from clip_nsfw_spark.errors import ConfigError
    from clip_nsfw_spark.storage.filesystem import filesystem
    from clip_nsfw_spark.tools.sample import write_laion_sample, write_parquet_sample

    for name, value in (("rows", args.rows), ("files", args.files), ("dim", args.dim)):
        if value < 1:
            raise ConfigError(f"sample --{name} must be at least 1, found {value}")
    if args.files > args.rows and args.layout != "labelled":
        raise ConfigError(f"sample --files {args.files} is more than --rows {args.rows}: every file needs a row")
    fs, root = filesystem(args.output)
    visible = [p for p in fs.ls(root, detail=False) if not p.rstrip("/").rsplit("/", 1)[-1].startswith(".")] \
        if fs.isdir(root) else None
    if fs.exists(root) and (visible is None or visible):
        # its names (part-00000.parquet …) would replace some files of a dataset and leave the others: a mix
        raise ConfigError(f"sample: {args.output} exists and is not an empty folder; nothing was written. "
                          "Give a new folder (the sample writes part-00000… files into it).")
    if args.layout == "parquet":
        write_parquet_sample(args.output, args.rows, args.files, args.dim)
    elif args.layout == "labelled":
        from clip_nsfw_spark.tools.sample import write_labelled_sample

        write_labelled_sample(args.output, args.rows, args.dim)
    else:
        write_laion_sample(args.output, args.rows, args.files, args.dim)
    print(f"wrote {args.rows:,} rows of {args.dim}-d float16 embeddings to {args.output} ({args.layout})")
    return 0


def _cmd_package(args) -> int:
    from clip_nsfw_spark.tools.package import build_environment_archive

    from clip_nsfw_spark.tools.package import default_archive_name

    out = args.out or default_archive_name(args.spark, args.python)
    path = build_environment_archive(out, args.extras, args.python, args.spark)
    print(f"wrote {path}; use: spark-submit --archives {path}#environment "
          "--conf spark.pyspark.python=./environment/bin/python jobs/score_embeddings.py …")
    return 0


def _class_labels(pairs):
    if not pairs:
        return None
    mapping = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if value not in ("0", "1"):
            raise ClipNsfwError(f"--class-label expects NAME=0 or NAME=1, found {pair!r}")
        mapping[name] = int(value)
    return mapping


def _cmd_evaluate(args) -> int:
    from clip_nsfw_spark.tools.evaluate import DEFAULT_THRESHOLDS, evaluate

    options = dict(compare=args.compare, recall=args.recall, precision=args.precision,
                   class_labels=_class_labels(args.class_label), embedding_column=args.embedding_column,
                   label_column=args.label_column)
    thresholds = tuple(args.threshold or DEFAULT_THRESHOLDS)
    if args.spark:
        from clip_nsfw_spark.spark.runner import spark_runner, spark_session

        with spark_session(args.master or "local[*]") as spark:
            report = evaluate(args.model, args.data, args.out, thresholds, runner=spark_runner(spark), **options)
    else:
        report = evaluate(args.model, args.data, args.out, thresholds, **options)
    for name, result in report["models"].items():
        print(f"{name}: ROC-AUC {result['roc_auc']:.4f}  PR-AUC {result['pr_auc']:.4f}")
    print(f"report: {args.out}/report.md")
    return 0


def _cmd_train(args) -> int:
    from clip_nsfw_spark.tools.train import train

    summary = train(args.data, args.out, args.method, args.max_trials, args.epochs, args.seed,
                    args.validation_fraction, _class_labels(args.class_label), args.embedding_column, args.label_column)
    print(json.dumps(summary, indent=2))
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
    sample.add_argument("--layout", choices=["parquet", "laion-npy", "labelled"], default="parquet",
                        help="labelled: generated class folders (porn/ sexy/ neutral/ drawings/) for evaluate/train")
    sample.set_defaults(func=_cmd_sample)

    package = commands.add_parser("package", help="pack the library + executor dependencies for spark-submit --archives")
    package.add_argument("--out", help="archive to write (.tar.gz); default dist/clip-nsfw-spark-env-spark<LINE>-py<X.Y>.tar.gz")
    package.add_argument("--spark", choices=["3.5", "4.0", "4.1+"], default="4.1+",
                         help="the cluster's Spark line: 3.5 (EMR 7.x, Dataproc 2.2, Databricks LTS), 4.0 (EMR Spark 8), "
                              "4.1+ (default)")
    package.add_argument("--python", default=sys.executable,
                         help="interpreter to build with: the same Python version as the cluster's nodes")
    package.add_argument("--extras", default="s3", help="extras to include (default s3; '' for none)")
    package.set_defaults(func=_cmd_package)

    evaluate = commands.add_parser("evaluate", help="metrics, threshold sweep, per-class breakdown and plots on labelled data")
    evaluate.add_argument("--model", action="append", required=True, help="registry name or path (repeat to compare)")
    evaluate.add_argument("--data", required=True, help="class folders (img_emb/) or parquet with a label column")
    evaluate.add_argument("--out", default="evaluation", help="folder for report.json, report.md and PNGs")
    evaluate.add_argument("--threshold", type=float, action="append", help="thresholds to report (repeat)")
    evaluate.add_argument("--recall", type=float, help="also find the threshold reaching this recall")
    evaluate.add_argument("--precision", type=float, help="also find the threshold reaching this precision")
    evaluate.add_argument("--compare", action="store_true", help="also score float16-quantised inputs")
    evaluate.add_argument("--class-label", action="append", metavar="NAME=0|1", help="class → label (repeat)")
    evaluate.add_argument("--embedding-column")
    evaluate.add_argument("--label-column", default="label")
    evaluate.add_argument("--spark", action="store_true", help="score parquet data with the Spark job (large sets)")
    evaluate.add_argument("--master", help="Spark master for --spark (default local[*])")
    evaluate.set_defaults(func=_cmd_evaluate)

    train = commands.add_parser("train", help="train a new head (autokeras search or a plain Keras MLP)")
    train.add_argument("--data", required=True, help="labelled data, as for evaluate")
    train.add_argument("--out", required=True, help="folder to export the model to")
    train.add_argument("--method", choices=["autokeras", "mlp"], default="autokeras")
    train.add_argument("--max-trials", type=int, default=1)
    train.add_argument("--epochs", type=int, default=10)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--validation-fraction", type=float, default=0.2)
    train.add_argument("--class-label", action="append", metavar="NAME=0|1")
    train.add_argument("--embedding-column")
    train.add_argument("--label-column", default="label")
    train.set_defaults(func=_cmd_train)

    try:
        from clip_nsfw_spark.cli.run import add_run_command
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
