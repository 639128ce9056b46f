"""The job's configuration: one frozen object built from YAML + command-line overrides, validated early.

Every key is documented in ``conf/score_embeddings.yaml``. Unknown keys are errors (a typo must never be
silently ignored), and so are values out of range. Secrets never need to be in the file: s3fs reads the
usual AWS environment/config; whatever is given in ``storage_options`` is redacted in logs and reports.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

MODES = ("annotate", "filter", "split")
LAYOUTS = ("auto", "parquet", "laion-npy")
KEEP = ("safe", "unsafe")
# Parquet codecs pyarrow writes (checked before any work: a typo must not fail inside every task).
COMPRESSIONS = ("none", "snappy", "gzip", "brotli", "lz4", "zstd")
SECRET_WORDS = ("secret", "password", "token", "key", "credential", "session")


@dataclasses.dataclass(frozen=True)
class JobConfig:
    """What to score, with which model, and where to write it. See conf/score_embeddings.yaml."""

    input: str
    output: str
    layout: str = "auto"
    embedding_columns: tuple[str, ...] = ()
    score_columns: tuple[str, ...] = ()
    reason_column: str = "nsfw_reject_reason"
    model: str = "vit-l-14"
    mode: str = "annotate"
    threshold: float = 0.5
    keep: str = "safe"
    overwrite: bool = False
    resume: bool = False
    master: str | None = None
    storage_options: dict = dataclasses.field(default_factory=dict)
    batch_rows: int = 16384
    rows_per_task: int = 1_000_000
    metadata_dir: str = "metadata"
    embeddings_dir: str = "img_emb"
    write_embeddings: bool = False
    replace_scores: bool = False
    compression: str = "zstd"
    histogram_bins: int = 20

    def __post_init__(self):
        if not self.input:
            raise ConfigError("'input' is required: a parquet file, folder, glob, or a LAION embedding folder")
        if not self.output:
            raise ConfigError("'output' is required: the folder the results are written to")
        for key, allowed in (("mode", MODES), ("layout", LAYOUTS), ("keep", KEEP)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key} must be one of {', '.join(allowed)}; found {getattr(self, key)!r}")
        if not isinstance(self.threshold, (int, float)) or not 0.0 <= float(self.threshold) <= 1.0:
            raise ConfigError(f"threshold must be a number in [0, 1] (unsafe ⇔ score ≥ threshold); "
                              f"found {self.threshold!r}")
        if self.overwrite and self.resume:
            raise ConfigError("choose one of overwrite (start again) and resume (finish what is missing)")
        if self.score_columns and self.embedding_columns and len(self.score_columns) != len(self.embedding_columns):
            raise ConfigError(f"score_columns {list(self.score_columns)} must name one column per embedding "
                              f"column {list(self.embedding_columns)}")
        for key in ("batch_rows", "rows_per_task", "histogram_bins"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ConfigError(f"{key} must be a positive integer; found {getattr(self, key)!r}")
        if not isinstance(self.compression, str) or self.compression.lower() not in COMPRESSIONS:
            raise ConfigError(f"compression must be one of {', '.join(COMPRESSIONS)}; found {self.compression!r}")
        if not isinstance(self.storage_options, dict):
            raise ConfigError("storage_options must be a mapping of fsspec options (endpoint_url, anon, profile …)")

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_mapping(cls, values: dict[str, Any], where: str = "configuration") -> "JobConfig":
        known = set(cls.keys())
        unknown = [key for key in values if key not in known]
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, known, n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ConfigError(f"unknown key(s) in {where}: {', '.join(hints)}. Valid keys: {', '.join(sorted(known))}")
        values = dict(values)
        for key in ("embedding_columns", "score_columns"):
            if isinstance(values.get(key), str):
                values[key] = (values[key],)
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        if values.get("storage_options") is None:
            values.pop("storage_options", None)
        if "threshold" in values and isinstance(values["threshold"], str):
            try:
                values["threshold"] = float(values["threshold"])
            except ValueError as err:
                raise ConfigError(f"threshold must be a number in [0, 1]; found {values['threshold']!r}") from err
        try:
            return cls(**values)
        except TypeError as err:
            raise ConfigError(f"invalid {where}: {err}") from err

    @classmethod
    def load(cls, path: str | None = None, overrides: dict[str, Any] | None = None) -> "JobConfig":
        """Read a YAML file (safe loader), apply overrides (None values are ignored), validate."""
        values: dict[str, Any] = {}
        if path:
            try:
                loaded = yaml.safe_load(Path(path).read_text()) or {}
            except (OSError, yaml.YAMLError) as err:
                raise ConfigError(f"cannot read config file {path}: {err}") from err
            if not isinstance(loaded, dict):
                raise ConfigError(f"{path} must hold a mapping of keys to values, found {type(loaded).__name__}")
            values.update(loaded)
        values.update({key: value for key, value in (overrides or {}).items() if value is not None})
        return cls.from_mapping(values, where=str(path) if path else "configuration")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["embedding_columns"] = list(self.embedding_columns)
        data["score_columns"] = list(self.score_columns)
        return data

    def redacted(self) -> dict:
        """The resolved config for logs and reports: storage secrets replaced by '***'."""
        data = self.to_dict()
        data["storage_options"] = redact(self.storage_options)
        return data


def redact(options: Any) -> Any:
    """Replace the values of secret-looking keys (recursively) by '***'."""
    if isinstance(options, dict):
        return {k: ("***" if any(w in str(k).lower() for w in SECRET_WORDS) and v is not None else redact(v))
                for k, v in options.items()}
    if isinstance(options, list):
        return [redact(v) for v in options]
    return options
