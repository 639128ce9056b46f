"""The job's configuration: one frozen object built from YAML + command-line overrides, validated early.

Every key is documented in ``conf/score_embeddings.yaml``. Unknown keys are errors (a typo must never be
silently ignored), and so are values out of range. Secrets never need to be in the file: s3fs reads the
usual AWS environment/config; whatever is given in ``storage_options`` is redacted in logs and reports.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from clip_nsfw_spark.contract import EmbeddingType, Keep, Layout, Mode, Overlap, ParquetCodec
from clip_nsfw_spark.errors import ConfigError
from clip_nsfw_spark.models.registry import HeadSpec

MODES = typing.get_args(Mode)
LAYOUTS = typing.get_args(Layout)
KEEP = typing.get_args(Keep)
PARQUET_CODECS = typing.get_args(ParquetCodec)
OVERLAPS = typing.get_args(Overlap)
EMBEDDING_TYPES = typing.get_args(EmbeddingType)
# Parquet codecs pyarrow writes (checked before any work: a typo must not fail inside every task).
COMPRESSIONS = ("none", "snappy", "gzip", "brotli", "lz4", "zstd")
SECRET_WORDS = ("secret", "password", "token", "key", "credential", "session")
DEFAULT_MODEL = "vit-l-14"


def parse_head_spec(item: Any, where: str = "models") -> HeadSpec:
    """A YAML/CLI item of ``models``: ``"violence-l-14"`` or ``{model: …, score_column: …, threshold: …}``."""
    if isinstance(item, HeadSpec):
        return item
    if isinstance(item, str) and item:
        return HeadSpec(item)
    if not isinstance(item, collections.abc.Mapping):
        raise ConfigError(f"each entry of {where} must be a model name or a mapping with 'model' "
                          f"(and optionally 'score_column', 'threshold'); found {_found(item)}")
    unknown = sorted(set(item) - {"model", "score_column", "threshold"})
    if unknown or not isinstance(item.get("model"), str) or not item.get("model"):
        raise ConfigError(f"an entry of {where} must have 'model' (a name or path) and may have "
                          f"'score_column', 'threshold'; found {dict(item)!r}")
    column, threshold = item.get("score_column"), item.get("threshold")
    if column is not None and (not isinstance(column, str) or not column):
        raise ConfigError(f"score_column of {item['model']} in {where} must be a column name; found {_found(column)}")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))):
        raise ConfigError(f"threshold of {item['model']} in {where} must be a number; found {_found(threshold)}")
    return HeadSpec(item["model"], column, None if threshold is None else float(threshold))


# A histogram bin costs ~40 bytes in every task state and the report, per head: 10M bins made a 381 MB report,
# 100M ran a 24 GiB machine out of memory (a hostile user's finding).
MAX_HISTOGRAM_BINS = 100_000


@dataclasses.dataclass(frozen=True)
class JobConfig:
    """What to score, with which model, and where to write it. See conf/score_embeddings.yaml."""

    input: str
    output: str
    layout: Layout = "auto"
    embedding_columns: tuple[str, ...] = ()
    score_columns: tuple[str, ...] = ()
    reason_column: str = "nsfw_reject_reason"
    model: str = DEFAULT_MODEL
    models: tuple[HeadSpec, ...] = ()
    mode: Mode = "annotate"
    id_columns: tuple[str, ...] = ()
    columns: tuple[str, ...] = ()
    drop_columns: tuple[str, ...] = ()
    threshold: float = 0.5
    keep: Keep = "safe"
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
    embedding_compression: str = "none"
    histogram_bins: int = 20
    parquet_codec: ParquetCodec = "own"
    embedding_type: EmbeddingType = "input"
    overlap: Overlap = "auto"
    input_suffixes: tuple[str, ...] = ()
    allow_incomplete_input: bool = False
    read_every_footer: bool = False

    def __post_init__(self):
        for key in ("embedding_columns", "score_columns", "id_columns", "columns", "drop_columns", "input_suffixes"):
            if isinstance(getattr(self, key), list):
                object.__setattr__(self, key, tuple(getattr(self, key)))
        if isinstance(self.models, (str, collections.abc.Mapping)):
            object.__setattr__(self, "models", (self.models,))
        if isinstance(self.models, (list, tuple)):
            object.__setattr__(self, "models", tuple(parse_head_spec(item) for item in self.models))
        if not self.input:
            raise ConfigError("'input' is required: a parquet file, folder, glob, or a LAION embedding folder")
        if not self.output:
            raise ConfigError("'output' is required: the folder the results are written to")
        check_types(self)
        if not 0.0 <= float(self.threshold) <= 1.0:
            raise ConfigError(f"threshold must be a number in [0, 1] (unsafe ⇔ score ≥ threshold); "
                              f"found {self.threshold!r}")
        if self.overwrite and self.resume:
            raise ConfigError("choose one of overwrite (start again) and resume (finish what is missing)")
        if self.score_columns and self.embedding_columns and len(self.score_columns) != len(self.embedding_columns):
            raise ConfigError(f"score_columns {list(self.score_columns)} must name one column per embedding "
                              f"column {list(self.embedding_columns)}")
        for key in ("batch_rows", "rows_per_task", "histogram_bins"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be a positive integer; found {getattr(self, key)!r}")
        if self.histogram_bins > MAX_HISTOGRAM_BINS:  # each task state and the report hold every bin per head
            raise ConfigError(f"histogram_bins must be at most {MAX_HISTOGRAM_BINS:,} (the report and every task's "
                              f"state hold each bin; 1,000 resolve scores to 0.001); found {self.histogram_bins:,}")
        if self.models and self.model != DEFAULT_MODEL:
            raise ConfigError(f"give the heads either as model ({self.model!r}) or as models "
                              f"({[m.model for m in self.models]}), not both")
        for choice in self.models:
            if choice.threshold is not None and not 0.0 <= choice.threshold <= 1.0:
                raise ConfigError(f"threshold of {choice.model} must be in [0, 1]; found {choice.threshold!r}")
        if self.score_columns and len(self.choices()) > 1:
            raise ConfigError("score_columns names one column per embedding column for a single model; with "
                              "several models give each its own score_column under models:")
        for key in ("score_columns", "id_columns", "columns", "drop_columns", "embedding_columns"):
            if any(not name for name in getattr(self, key)):
                raise ConfigError(f"{key} must hold column names; found an empty name in {list(getattr(self, key))}")
            repeated = sorted({name for name in getattr(self, key) if getattr(self, key).count(name) > 1})
            if repeated:
                raise ConfigError(f"{key} names {', '.join(map(repr, repeated))} more than once; name each column once "
                                  "(the output would hold two columns of one name, which readers refuse)")
        bad = [suffix for suffix in self.input_suffixes if not suffix.startswith(".") or "/" in suffix or suffix == "."]
        if bad:
            raise ConfigError(f"input_suffixes are file name endings starting with a dot (e.g. .snappy, .gz.parquet); "
                              f"found {bad[0]!r}")
        if not self.reason_column:
            raise ConfigError("reason_column must be a column name; found an empty name")
        if self.columns and self.drop_columns:
            raise ConfigError("choose one of columns (keep only these) and drop_columns (keep all but these)")
        if self.keep != "safe" and self.mode != "filter":
            raise ConfigError(f"keep: {self.keep} is for mode filter (which side to keep); mode {self.mode} "
                              + ("writes both sides, safe/ and unsafe/" if self.mode == "split" else
                                 "keeps every row") + ": leave keep out, or use mode filter")
        if self.mode == "scores" and (self.columns or self.drop_columns):
            raise ConfigError("mode scores writes only id columns, scores and the reason: name the ids with "
                              "id_columns, not columns/drop_columns")
        if self.id_columns and self.mode != "scores":
            raise ConfigError("id_columns is for mode scores (a sidecar of ids and scores); with "
                              f"mode {self.mode} use columns or drop_columns")
        for key in ("compression", "embedding_compression"):
            codec = getattr(self, key).lower()
            codec = "none" if codec == "uncompressed" else codec  # parquet's and Spark's name for it
            if codec not in COMPRESSIONS:
                raise ConfigError(f"{key} must be one of {', '.join(COMPRESSIONS)}; found {getattr(self, key)!r}")
            object.__setattr__(self, key, codec)  # one spelling: resume compares them

    def choices(self) -> tuple[HeadSpec, ...]:
        """The heads of this run, in order: ``models`` if given, else the one ``model``."""
        return self.models or (HeadSpec(self.model),)

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
        # A key given without a value (YAML ``key:`` or ``null``) means its default.
        values = {key: value for key, value in values.items() if value is not None or key in ("input", "output")}
        for key in ("input", "output"):  # absent: the same clear error as empty (see __post_init__)
            values.setdefault(key, None)
        for key in ("embedding_columns", "score_columns", "id_columns", "columns", "drop_columns", "input_suffixes"):
            if isinstance(values.get(key), str):
                values[key] = (values[key],)
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
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
                loaded = yaml.load(Path(path).read_text(), Loader=_UniqueKeyLoader) or {}
            except _DuplicateKey as err:
                raise ConfigError(f"config file {path}: {err}") from None
            except (OSError, yaml.YAMLError) as err:
                raise ConfigError(f"cannot read config file {path}: {err}") from err
            if not isinstance(loaded, dict):
                raise ConfigError(f"{path} must hold a mapping of keys to values, found {type(loaded).__name__}")
            values.update(loaded)
        given = {key: value for key, value in (overrides or {}).items() if value is not None}
        _refuse_unused_threshold(values, given, path)
        values.update(given)
        return cls.from_mapping(values, where=str(path) if path else "configuration")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["embedding_columns"] = list(self.embedding_columns)
        data["score_columns"] = list(self.score_columns)
        for key in ("id_columns", "columns", "drop_columns"):
            data[key] = list(getattr(self, key))
        return data

    def redacted(self) -> dict:
        """The resolved config for logs and reports: storage secrets replaced by '***'."""
        data = self.to_dict()
        data["storage_options"] = redact(self.storage_options)
        return data


class _DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: the plain loader keeps the last
    one silently (``threshold: 0.3`` then ``threshold: 0.9`` would run with 0.9)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(f"the key {key!r} is given twice (lines {seen[key] + 1} and "
                                    f"{key_node.start_mark.line + 1}); the second would silently win. Give each "
                                    "key once")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _refuse_unused_threshold(values: dict, given: dict, path: str | None) -> None:
    """A ``--threshold`` on the command line that a head of the YAML's ``models:`` overrides with its own
    would be silently ignored for that head: refuse, naming the head and the way out."""
    if "threshold" not in given or "models" in given or not isinstance(values.get("models"), list):
        return  # (--model replaces the YAML's heads, their thresholds with them)
    own = [item for item in values["models"] if isinstance(item, dict) and item.get("threshold") is not None]
    if own:
        names = ", ".join(f"{item.get('model')} (threshold {item['threshold']})" for item in own)
        raise ConfigError(f"--threshold {given['threshold']} would not apply to {names}: a head's own threshold under "
                          f"models: in {path} wins over threshold. Change it there, or remove it there to use "
                          "--threshold for that head.")


def _found(value: Any) -> str:
    """How a wrongly typed value is named in an error: its YAML kind and its value."""
    kinds = ((bool, "the boolean"), (int, "the integer"), (float, "the number"), (str, "the string"),
             (collections.abc.Mapping, "a mapping"), ((list, tuple), "a list"))
    kind = next((name for types_, name in kinds if isinstance(value, types_)), f"a {type(value).__name__}")
    # Containers are named, not printed: storage_options may hold secrets.
    if isinstance(value, (collections.abc.Mapping, list, tuple)):
        return kind
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
        if number is not None and math.isfinite(number) and not value.strip().lower().startswith(("0x", "0b", "0o")):
            # YAML 1.1 (PyYAML) reads 5e-1 or 1e-1 (no decimal point) as text, not as a number
            shown = int(number) if number.is_integer() else number  # batch_rows: 1e3 → 1000, not 1000.0
            return f"{kind} {value!r} (YAML reads it as text: write {shown!r})"
    return f"{kind} {value!r}"


def _type_error(name: str, hint: Any, value: Any) -> str | None:
    """Why ``value`` does not fit the annotation ``hint`` of field ``name``, or None if it does.

    Strict on purpose: YAML's ``"false"`` is a string and ``0`` an integer, never a boolean; a boolean is
    never a number; an enum (Literal) takes only its listed values.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = [_type_error(name, arg, value) for arg in args if arg is not type(None)]
        return None if None in errors else errors[0]
    if hint is bool:
        ok, expected = isinstance(value, bool), "true or false (a YAML boolean)"
    elif hint is int:
        ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif hint is float:
        ok, expected = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif hint is str:
        ok, expected = isinstance(value, str), "a string"
    elif origin is Literal:
        if isinstance(value, str) and value in args:
            return None
        return f"{name} must be one of {', '.join(args)}; found {value!r}"
    elif origin is tuple and args and args[0] is not str:
        ok, expected = isinstance(value, tuple) and all(isinstance(item, args[0]) for item in value), \
            f"a list of {args[0].__name__}"
    elif origin is tuple:
        ok = isinstance(value, (tuple, list)) and all(isinstance(item, str) for item in value)
        expected = "a list of strings"
        if isinstance(value, (tuple, list)) and not ok:
            bad = next(item for item in value if not isinstance(item, str))
            return f"{name} must be {expected}; found {_found(bad)} in it"
    elif hint is dict or origin is dict:
        if isinstance(value, collections.abc.Mapping):
            return None
        kind = _found(value).split(" ")[:2]  # the kind only: a misplaced value may hold a secret
        return f"{name} must be a mapping of fsspec options (endpoint_url, anon, profile …), found {' '.join(kind)}"
    else:  # a field type this checker does not know: a programming error, caught by the tests
        raise TypeError(f"no type check for field {name!r} of type {hint!r}")
    return None if ok else f"{name} must be {expected}, found {_found(value)}"


def check_types(config: "JobConfig") -> None:
    """Raise ConfigError for the first field whose value does not fit its annotation (see ``_type_error``)."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        problem = _type_error(field.name, hints[field.name], getattr(config, field.name))
        if problem:
            raise ConfigError(problem)


def redact(options: Any) -> Any:
    """Replace the values of secret-looking keys (recursively) by '***'."""
    if isinstance(options, dict):
        return {k: ("***" if any(w in str(k).lower() for w in SECRET_WORDS) and v is not None else redact(v))
                for k, v in options.items()}
    if isinstance(options, list):
        return [redact(v) for v in options]
    return options
