"""What can happen to a row: the output streams it can go to, and why it may not be scored.

One enumeration of each, used by the writer (which file a row goes to), the worker (counts per task),
the driver (row checks, the report) and the reason column. Members are ``str``: they compare equal to,
format as and serialise to their value (``"rejected"``, ``"null embedding"``), so reports and outputs
are plain strings.
"""

from __future__ import annotations

import enum


class _Value(str, enum.Enum):
    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Stream(_Value):
    """An output stream: one parquet file per task and stream (see writer.output_paths)."""

    ANNOTATED = "annotated"  # mode annotate: every row, with scores and reasons
    SCORES = "scores"  # mode scores: ids, scores and the reason (a sidecar)
    KEPT = "kept"  # mode filter: the rows on the kept side of the threshold
    SAFE = "safe"  # mode split
    UNSAFE = "unsafe"  # mode split
    REJECTED = "rejected"  # filter and split: rows that could not be scored, with their reason


MODE_STREAMS = {
    "annotate": (Stream.ANNOTATED,),
    "scores": (Stream.SCORES,),
    "filter": (Stream.KEPT, Stream.REJECTED),
    "split": (Stream.SAFE, Stream.UNSAFE, Stream.REJECTED),
}


class Reason(_Value):
    """Why a row was not scored (the reason column holds the value, sometimes followed by ``: detail``)."""

    NULL_EMBEDDING = "null embedding"
    WRONG_LENGTH = "wrong length"
    NULL_VALUE = "null value in embedding"
    NON_FINITE = "NaN or Inf in embedding"
    OVERFLOW = "value out of float32 range"
    SCORE_NOT_FINITE = "score not finite"


class Problem(str):
    """The reason-column text for one row (``"wrong length: expected 768, found 512"``), carrying its
    ``reason`` (a ``Reason``) so counts are kept by category without parsing the text."""

    reason: Reason

    def __new__(cls, reason: Reason, detail: str = "") -> "Problem":
        text = super().__new__(cls, f"{reason.value}: {detail}" if detail else reason.value)
        text.reason = reason
        return text


def rows_unaccounted(planned: int, stats: dict, mode: str, keep: str) -> str | None:
    """What does not add up in a task's row counts, or None: rows planned = rows read, and every stream of
    ``mode`` got exactly its rows (``stats``: a task's statistics, see executor/worker.py)."""
    written, read = stats["rows_written"], stats["rows_read"]
    rejected, unsafe = stats["rows_rejected"], stats["rows_unsafe"]
    due = {Stream.ANNOTATED: read, Stream.SCORES: read, Stream.SAFE: read - unsafe - rejected,
           Stream.UNSAFE: unsafe, Stream.REJECTED: rejected}
    due[Stream.KEPT] = due[Stream.SAFE if keep == "safe" else Stream.UNSAFE]
    expected = {str(stream): due[stream] for stream in MODE_STREAMS[mode]}
    found = {stream: written.get(stream, 0) for stream in expected}
    if read == planned and found == expected:
        return None
    return f"planned {planned} rows, read {read}, wrote {found} where {expected} was due"
