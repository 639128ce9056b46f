"""Command-line options of the scoring job, shared by ``clip-nsfw-spark run`` and ``jobs/score_embeddings.py``."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import threading

from clip_nsfw_spark.driver.config import (DEFAULT_MODEL, EMBEDDING_TYPES, KEEP, LAYOUTS, MODES, OVERLAPS,
                                           PARQUET_CODECS, JobConfig)
from clip_nsfw_spark.errors import ConfigError, Terminated

log = logging.getLogger(__name__)


def _storage_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, found {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


# The JobConfig fields the command line sets (every option's ``dest``); the others come from --config.
OPTION_KEYS = ("input", "output", "layout", "embedding_columns", "score_columns", "models", "mode", "id_columns",
               "columns", "drop_columns", "threshold", "keep", "replace_scores", "overwrite", "resume", "master",
               "rows_per_task", "batch_rows", "storage_options", "parquet_codec", "overlap", "input_suffixes",
               "allow_incomplete_input", "embedding_type", "read_every_footer")
assert set(OPTION_KEYS) <= set(JobConfig.keys()), set(OPTION_KEYS) - set(JobConfig.keys())


def _default(key: str):
    return JobConfig.__dataclass_fields__[key].default


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """The job's options (one per ``OPTION_KEYS`` field, named ``--field-name``; list fields repeat and are
    named in the singular), plus ``--config`` and ``--local-runner``. Defaults are JobConfig's."""
    parser.add_argument("--config", help="YAML file with the job's keys (see conf/score_embeddings.yaml)")
    parser.add_argument("--input", help="parquet file/folder/glob, or a LAION folder with img_emb/ and metadata/")
    parser.add_argument("--output", help="output folder (local path, file://, s3://, hdfs://)")
    parser.add_argument("--layout", choices=LAYOUTS, help=f"input layout (default {_default('layout')})")
    parser.add_argument("--embedding-column", dest="embedding_columns", action="append",
                        help="embedding column to score (repeat for several); default: the one list-of-floats column")
    parser.add_argument("--score-column", dest="score_columns", action="append",
                        help="name of the score column, one per embedding column (default punsafe)")
    parser.add_argument("--model", dest="models", action="append",
                        help=f"a head: {DEFAULT_MODEL} (default), vit-b-32, vit-h-14, violence-l-14, violence-b-32, or a path "
                             "to a model; repeat to run several heads in one pass (e.g. --model vit-l-14 "
                             "--model violence-l-14)")
    parser.add_argument("--mode", choices=MODES,
                        help="annotate (add scores), filter, split (safe/ unsafe/), or scores (a sidecar: ids, "
                             f"scores and reason only); default {_default('mode')}")
    parser.add_argument("--id-column", dest="id_columns", action="append",
                        help="mode scores: id column to keep (repeat); default: the first of key, id, uid, hash, "
                             "image_path, url, else source_file + row_index")
    parser.add_argument("--columns", dest="columns", action="append",
                        help="write only these input columns (repeat; e.g. the metadata without the embeddings)")
    parser.add_argument("--drop-columns", dest="drop_columns", action="append",
                        help="write every input column but these (repeat; e.g. --drop-columns embedding)")
    parser.add_argument("--threshold", type=float, help=f"unsafe ⇔ score ≥ threshold (default {_default('threshold')})")
    parser.add_argument("--keep", choices=KEEP, help=f"filter mode: which side to keep (default {_default('keep')})")
    parser.add_argument("--replace-scores", dest="replace_scores", action="store_true", default=None,
                        help="overwrite score/reason columns the input already has (e.g. LAION's punsafe)")
    parser.add_argument("--overwrite", action="store_true", default=None, help="replace a non-empty output")
    parser.add_argument("--resume", action="store_true", default=None, help="finish an interrupted run")
    parser.add_argument("--master", help="Spark master (default: the active session, else local[*])")
    parser.add_argument("--rows-per-task", type=int, dest="rows_per_task",
                        help=f"cut larger files into tasks of about this many rows (default {_default('rows_per_task'):,})")
    parser.add_argument("--batch-rows", type=int, dest="batch_rows",
                        help=f"rows read, scored and written at a time (default {_default('batch_rows'):,})")
    parser.add_argument("--storage-option", dest="storage_options", action="append", type=_storage_option,
                        metavar="KEY=VALUE", help="fsspec option, e.g. endpoint_url=http://127.0.0.1:8333 or anon=true")
    parser.add_argument("--parquet-codec", dest="parquet_codec", choices=PARQUET_CODECS,
                        help="own: embedding pages decoded and written by this package (default, several times "
                             "faster); pyarrow: by pyarrow alone, the same values (a way out of a codec problem)")
    parser.add_argument("--overlap", dest="overlap", choices=OVERLAPS,
                        help="read ahead and write behind in threads while scoring: auto (default: when the input "
                             "or output is not a local disk, or tasks run without Spark), on, off")
    parser.add_argument("--embedding-type", dest="embedding_type", choices=EMBEDDING_TYPES,
                        help="value type of the embeddings an output keeps: input (as read, the default) or "
                             "float32 (float16 widened exactly: Spark cannot read float16 parquet)")
    parser.add_argument("--input-suffix", dest="input_suffixes", action="append",
                        help="also read input files ending so as parquet (repeat; e.g. .snappy); files skipped for "
                             "their suffix are listed in the report")
    parser.add_argument("--allow-incomplete-input", dest="allow_incomplete_input", action="store_true", default=None,
                        help="score an unfinished output of this tool (refused by default: it lacks rows)")
    parser.add_argument("--read-every-footer", dest="read_every_footer", action="store_true", default=None,
                        help="read every new input file's footer on the driver, so that a file of another schema "
                             "is refused before anything is written (by default, above 1,000 files on an object "
                             "store each task reads the footer of its small file; a resume plans each file as "
                             "its output's last run did)")
    parser.add_argument("--local-runner", action="store_true",
                        help="run tasks in this process without Spark (small data, debugging)")


def config_from_args(args) -> JobConfig:
    overrides = {key: getattr(args, key) for key in OPTION_KEYS}
    if overrides.get("models"):  # --model on the command line replaces the file's model/models
        overrides["model"] = DEFAULT_MODEL
    if overrides.get("storage_options") is not None:
        overrides["storage_options"] = dict(overrides["storage_options"])
    return JobConfig.load(args.config, overrides)


def summary(report: dict) -> str:
    rows = report["rows"]
    lines = [
        f"clip-nsfw-spark: {report['config']['mode']} done in {report['durations_seconds']['total']:.1f} s "
        + ("(nothing left to score)" if report.get("tasks_resumed") == report["input"]["tasks"]
           else f"({report.get('throughput_rows_per_second') or 0:,.0f} rows/s while scoring)"),
        *[f"  {'model' if i == 0 else '':9} {h['name']} (sha256 {h['sha256'][:12]}…): "
          + ", ".join(f"{col} ≥ {h['threshold']} on {c['unsafe']:,} rows" for col, c in h["score_columns"].items())
          for i, h in enumerate(report["heads"])],
        f"  rows      read {rows['read']:,}  unsafe {rows['unsafe']:,} (a score ≥ its threshold)  "
        f"rejected {rows['rejected']:,}",
        "  written   " + ", ".join(f"{k} {v:,}" for k, v in sorted(rows["written"].items())),
        f"  tasks     {report['input']['tasks']} ({report['tasks_resumed']} resumed)",
    ]
    if report["input"].get("skipped_files"):
        lines.append(f"  skipped   {report['input']['skipped_files']} input file(s) that are not parquet "
                     f"(e.g. {report['input']['skipped_examples'][0]}); see the report")
    resume = report.get("resume") or {}
    if any(resume.get(key) for key in ("rerun_changed", "rerun_missing", "removed_gone", "removed_unrecorded")):
        lines.append(f"  resume    re-ran {len(resume['rerun_changed'])} task(s) whose input changed and "
                     f"{len(resume.get('rerun_missing', ()))} whose outputs were missing, removed the outputs of "
                     f"{len(resume['removed_gone'])} whose input is gone"
                     + (f" and the files of {len(resume['removed_unrecorded'])} committed but never recorded "
                        "complete" if resume.get("removed_unrecorded") else ""))
    if rows["rejected_by_reason"]:
        lines.append("  rejected  " + ", ".join(f"{k}: {v:,}" for k, v in rows["rejected_by_reason"].items()))
    return "\n".join(lines)


INTERRUPTED = "clip-nsfw-spark: interrupted; the output is incomplete: rerun with --resume"
TERMINATED = "clip-nsfw-spark: terminated (SIGTERM); the output is incomplete: rerun with --resume"


def _raise_terminated(signum, frame):
    from clip_nsfw_spark.spark.runner import silence_py4j_logs  # no pyspark import: safe in the local runner too

    silence_py4j_logs()
    raise Terminated()


def _raise_interrupted(signum, frame):
    """Ctrl-C outside a running Spark job (starting Spark, planning, converting): one KeyboardInterrupt,
    and no py4j tracebacks from calls to the JVM that the interruption cut short."""
    from clip_nsfw_spark.spark.runner import silence_py4j_logs

    silence_py4j_logs()
    raise KeyboardInterrupt


def run_from_args(args, default_master: str | None, wrap_worker=None) -> int:
    """Run the job from parsed options; print the summary. Ctrl-C (SIGINT) ends with one line and status 130,
    SIGTERM with one line and 143 (128 + the signal, the shell's convention): the run's lease is released
    on the way out, so ``--resume`` can follow at once.

    ``wrap_worker`` (worker.Worker → a callable Task → stats) wraps the worker every task runs, for tools
    built on this command line (the tests' fault injection, tests/faults.py); the job never sets it."""
    from clip_nsfw_spark.driver.job import run_job, run_sequentially
    from clip_nsfw_spark.executor.writer import REPORT_NAME

    config = config_from_args(args)
    # Python's default SIGTERM ends the process at once, skipping every ``finally``: the lease would stay
    # until it goes stale and a scheduler's retry on another host would be refused until then.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    previous_int = signal.signal(signal.SIGINT, _raise_interrupted) if main_thread else None
    try:
        if args.local_runner:
            report = run_job(config, runner=_wrapped(run_sequentially, wrap_worker), progress=True)
        else:
            from clip_nsfw_spark.spark.runner import lazy_spark_runner, spark_runner, spark_session

            with contextlib.ExitStack() as stack:
                def start_spark():
                    master = config.master or default_master
                    try:
                        spark = stack.enter_context(spark_session(master))
                    except Exception as err:  # noqa: BLE001 - py4j/pyspark raise many types for a JVM that did not start
                        first = (str(err).strip().splitlines() or [""])[0].rstrip(".")
                        after = ("the tasks already complete are kept: rerun with --resume" if config.resume
                                 else "nothing was written: run again")
                        raise ConfigError(
                            f"Spark did not start (master {master!r}): {type(err).__name__}: {first}. Check --master "
                            "(local[*], yarn, k8s://https://host:443, spark://host:7077, sc://host:15002) and that "
                            f"Java 17+ is installed; Spark's own message, if any, is above. Fix it and {after}.") from err
                    if main_thread:  # PySpark's own handler calls the JVM from inside the signal handler
                        signal.signal(signal.SIGINT, _raise_interrupted)
                    return spark

                # A new run starts Spark first, before it touches the output; a resume may find nothing left to
                # run (a finished output), so Spark starts only when a task or a footer read needs it.
                runner = lazy_spark_runner(start_spark) if config.resume else spark_runner(start_spark())
                report = run_job(config, runner=_wrapped(runner, wrap_worker), progress=True)
    except Terminated:
        print(TERMINATED, file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
            signal.signal(signal.SIGINT, previous_int)
    print(summary(report))
    print(f"  report    {report.get('output', config.output).rstrip('/')}/{REPORT_NAME}")
    return 0


def _wrapped(runner, wrap_worker):
    if wrap_worker is None:
        return runner
    return lambda tasks, worker: runner(tasks, wrap_worker(worker))


def add_run_command(commands) -> None:
    run = commands.add_parser("run", help="score an embedding dataset (annotate, filter or split)")
    add_job_arguments(run)
    run.set_defaults(func=lambda args: run_from_args(args, default_master="local[*]"))
