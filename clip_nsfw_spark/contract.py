"""What the driver hands executors: one task, the run's frozen task config, the heads.

Everything here is plain frozen data (strings, numbers, bytes, tuples) that pickles as it is: the driver
builds it once (driver/), Spark or the local runner ships it, executors (executor/) only read it. Nothing
here imports IO, Spark or the rest of the package.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Literal

Mode = Literal["annotate", "filter", "split", "scores"]
Layout = Literal["auto", "parquet", "laion-npy"]
Keep = Literal["safe", "unsafe"]
# Who decodes and encodes embedding pages: this package (parquet/decode.py, stream.py, splice.py) or pyarrow alone.
ParquetCodec = Literal["own", "pyarrow"]
# The value type of the embeddings an output keeps: as read ("input"), or float32 (Spark ≤ 4.x cannot read
# FLOAT16 parquet at all: an output meant for Spark readers widens float16 to float32, exactly).
EmbeddingType = Literal["input", "float32"]
# Whether a task reads ahead and writes behind in threads of its own while it scores (executor/overlap.py):
# "auto" where cores or storage would otherwise wait (see driver/job.overlap_wanted), "on", "off".
Overlap = Literal["auto", "on", "off"]


# Task.rows of a parquet task planned from the file's listing, before anyone has read its footer.
ROWS_FROM_FOOTER = -1
# Bytes per row to weigh such a task by: a 512-d float16 embedding, the smallest a head takes (an estimate).
ESTIMATED_BYTES_PER_ROW = 1024


@dataclasses.dataclass(frozen=True)
class Task:
    """One unit of work. ``rel`` is the output name relative to the output root (unique in a plan).

    ``rows`` is how many rows the task must read (checked against what it read), or ``ROWS_FROM_FOOTER``
    for a parquet file planned from its listing alone (many small files on an object store, see
    planner.LISTING_PLAN_FILES): the task then reads all of its row groups and takes their rows from the
    footer it reads anyway (``executor.reader.with_footer_rows``). ``source`` identifies the bytes it reads
    (see ``file_identity``), so that ``--resume`` re-runs a task whose input changed.
    """

    kind: str  # "parquet" | "laion-npy"
    path: str  # the parquet file (data or metadata) in the input filesystem's terms
    rel: str
    row_groups: tuple[int, ...] = ()  # parquet: the row groups of this slice
    row_start: int = 0  # laion-npy: rows [row_start, row_stop) of both files
    row_stop: int = 0
    npy_path: str = ""
    rows: int = 0
    source: str = ""
    size: int = -1  # bytes of ``path`` as listed, when the task reads all of it (else -1): see reader.open_parquet

    @property
    def task_id(self) -> str:
        return hashlib.sha1(self.rel.encode()).hexdigest()[:20]

    @property
    def rows_known(self) -> bool:
        return self.rows != ROWS_FROM_FOOTER

    @property
    def weight(self) -> int:
        """Its rows, or for a task planned from the listing an estimate from its bytes (what to balance and
        order tasks by; never a count)."""
        return self.rows if self.rows_known else max(self.size, 0) // ESTIMATED_BYTES_PER_ROW


@dataclasses.dataclass(frozen=True)
class Head:
    """One safety head, the same value from the registry to the executor (models/heads.resolve_head makes it
    once per run on the driver; executors build their scorer from ``data`` alone, numpy only).

    ``sha256`` of the portable weights is the per-process scorer cache key; ``score_column`` and
    ``threshold`` are the head's own (a row is unsafe for it when ``score >= threshold``); ``dim`` the
    embedding width it takes; ``source`` where the driver's cache holds it (for the report).
    """

    name: str
    sha256: str
    data: bytes = dataclasses.field(repr=False)
    score_column: str = "punsafe"
    threshold: float = 0.5
    dim: int = 0
    source: str = ""


@dataclasses.dataclass(frozen=True)
class ScoreOutput:
    """One score column: written from head ``head`` (index into the run's heads); unsafe ⇔ score ≥ threshold."""

    score_column: str
    head: int
    threshold: float


@dataclasses.dataclass(frozen=True)
class ScoreTarget:
    """An embedding column (in the LAION npy layout: the npy rows) and the score columns made from it."""

    embedding_column: str
    outputs: tuple[ScoreOutput, ...]


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """Everything a task needs, resolved on the driver and frozen: what crosses to executors.

    ``output`` is the output's canonical URL; ``write_columns`` the input columns the outputs keep (None:
    all); ``row_ids`` whether ``source_file``/``row_index`` are added (a sidecar without id columns);
    ``run_id`` the lease a task must still hold to commit (lease.check_owner); ``parquet_codec`` "pyarrow"
    turns this package's page decoder and writer off (the same values, pyarrow's speed).
    """

    input: str
    output: str
    storage_options: dict
    layout: Literal["parquet", "laion-npy"]
    mode: Mode
    keep: Keep
    targets: tuple[ScoreTarget, ...]
    reason_column: str
    write_columns: tuple[str, ...] | None
    row_ids: bool
    write_embeddings: bool
    compression: str
    batch_rows: int
    histogram_bins: int
    run_id: str | None = None
    embedding_compression: str = "none"
    parquet_codec: ParquetCodec = "own"
    embedding_type: EmbeddingType = "input"
    # laion-npy with write_embeddings: the npy values' type as written (before embedding_type widens float16)
    npy_value_type: str = "float16"
    # The plan's input schema (arrow IPC bytes) and the file it was read from (as the user spells it), when
    # some task was planned from the listing: such a task checks its file's schema against it, as the planner
    # checks every footer it reads (b"": none).
    input_schema: bytes = dataclasses.field(default=b"", repr=False)
    input_schema_of: str = ""
    # Read-ahead and write-behind threads in each task (executor/overlap.py): the job's "overlap" resolved.
    overlap: bool = False

    @property
    def score_columns(self) -> tuple[str, ...]:
        return tuple(o.score_column for t in self.targets for o in t.outputs)

    @property
    def embedding_columns(self) -> tuple[str, ...]:
        return tuple(t.embedding_column for t in self.targets)


# What a task's statistics add to the run's report: summed over tasks (numbers, per-key counts, histograms
# elementwise), except the worker's peak memory (the largest). A task's stats and a sum of several have these
# same keys, so sums of sums are sums: an executor sums the tasks of its Spark partition and the driver keeps
# one total instead of every task's stats (~4.5 kB each, gigabytes at a million tasks).
REPORT_FIGURES = ("rows_read", "rows_unsafe", "rows_written", "rejected_by_reason", "stage_seconds",
                  "stage_cpu_seconds", "histograms", "outside_0_1", "unsafe_by_column", "worker_max_rss_mb")


def add_figures(total: dict, stats: dict) -> dict:
    """``total`` + the ``REPORT_FIGURES`` of ``stats`` (a task's stats or another total), as a new dict.

    ``{}`` is the empty total. Nested values are added key by key (a key missing on one side counts 0),
    lists element by element; ``worker_max_rss_mb`` takes the larger.
    """
    def add(a, b):
        if isinstance(b, dict):
            a = a or {}
            return {key: add(a.get(key), b.get(key)) for key in dict.fromkeys([*a, *b])}
        if isinstance(b, list):
            return list(b) if a is None else [add(x, y) for x, y in zip(a, b, strict=True)]
        if b is None:
            return a
        return b if a is None else a + b

    summed = {key: add(total.get(key), stats.get(key)) for key in REPORT_FIGURES if key != "worker_max_rss_mb"}
    summed["worker_max_rss_mb"] = max(total.get("worker_max_rss_mb", 0), stats.get("worker_max_rss_mb", 0))
    return summed


TASKS_SUMMED = "tasks_summed"


def sum_of_tasks(results: list[dict]) -> dict:
    """Several tasks' stats as one record: ``{TASKS_SUMMED: [task ids], "figures": summed REPORT_FIGURES}``
    (what a Spark partition of several tasks sends back to the driver, instead of every task's stats)."""
    figures: dict = {}
    for stats in results:
        figures = add_figures(figures, stats)
    return {TASKS_SUMMED: [stats["task_id"] for stats in results], "figures": figures}
