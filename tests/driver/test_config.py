"""config.py: JobConfig and the heads it asks for (HeadSpec) — YAML loading, defaults, unknown keys with "did you mean",
conflicting options, and the messages that say what was expected and what was found.

Pure Python: no Spark, no model. The per-field type messages (booleans, integers, enums …) are in
driver/test_output.py::test_config_values_are_typed; the conf/ files in ops/test_packaging.py.
"""

import dataclasses
import re

import pytest

from clip_nsfw_spark.driver.config import JobConfig, parse_head_spec
from clip_nsfw_spark.models.registry import HeadSpec
from clip_nsfw_spark.errors import ClipNsfwError, ConfigError


def write(tmp_path, text: str):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_and_normalised_containers():
    config = JobConfig(input="in", output="out", embedding_columns=["a", "b"], score_columns=["pa", "pb"])
    assert config.embedding_columns == ("a", "b") and config.score_columns == ("pa", "pb")  # lists → tuples
    assert (config.mode, config.layout, config.keep, config.threshold, config.model) == \
           ("annotate", "auto", "safe", 0.5, "vit-l-14")
    assert config.choices() == (HeadSpec("vit-l-14"),)
    assert config.storage_options == {} and config.storage_options is not JobConfig("i", "o").storage_options
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.threshold = 0.1


def test_yaml_file_then_overrides_then_defaults(tmp_path):
    path = write(tmp_path, "input: a\noutput: b\nthreshold: 0.2\nmode: filter\nbatch_rows:\n"
                           "embedding_columns: emb\nstorage_options: {anon: true}\n")
    config = JobConfig.load(path, overrides={"mode": "split", "keep": None, "output": "c"})
    assert config.input == "a" and config.output == "c"  # an override wins over the file
    assert config.mode == "split" and config.keep == "safe"  # a None override leaves the file/default
    assert config.threshold == 0.2
    assert config.batch_rows == 16384  # "batch_rows:" without a value means the default
    assert config.embedding_columns == ("emb",)  # one name may be given without a list
    assert config.storage_options == {"anon": True}
    assert JobConfig.load(None, {"input": "x", "output": "y"}) == JobConfig(input="x", output="y")


def test_unknown_keys_are_named_with_a_suggestion_and_the_valid_keys(tmp_path):
    path = write(tmp_path, "input: a\noutput: b\ntreshold: 0.3\nbatch_row: 10\nxyzzy: red\n")
    with pytest.raises(ConfigError) as caught:
        JobConfig.load(path)
    message = str(caught.value)
    assert message.startswith(f"unknown key(s) in {path}: 'treshold' (did you mean 'threshold'?), "
                              "'batch_row' (did you mean 'batch_rows'?), 'xyzzy'. Valid keys: ")
    assert message.endswith(", ".join(sorted(JobConfig.keys())))
    with pytest.raises(ConfigError, match=re.escape("unknown key(s) in --set: 'mdoe' (did you mean 'mode'?)")):
        JobConfig.from_mapping({"input": "a", "output": "b", "mdoe": "filter"}, where="--set")


@pytest.mark.parametrize("text, message", [
    ("- input: a\n", "must hold a mapping of keys to values, found list"),
    ("just words\n", "must hold a mapping of keys to values, found str"),
    ("input: [a\n", "cannot read config file"),
    ("", "'input' is required: a parquet file, folder, glob, or a LAION embedding folder"),  # an empty file
    ("input:\noutput: b\n", "'input' is required: a parquet file, folder, glob, or a LAION embedding folder"),
    ("input: a\noutput:\n", "'output' is required: the folder the results are written to"),
])
def test_files_that_are_not_a_config_say_why(tmp_path, text, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        JobConfig.load(write(tmp_path, text))


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=re.escape(f"cannot read config file {tmp_path / 'nope.yaml'}")):
        JobConfig.load(str(tmp_path / "nope.yaml"))


@pytest.mark.parametrize("options, message", [
    ({"overwrite": True, "resume": True},
     "choose one of overwrite (start again) and resume (finish what is missing)"),
    ({"columns": ("a",), "drop_columns": ("b",)},
     "choose one of columns (keep only these) and drop_columns (keep all but these)"),
    ({"mode": "scores", "columns": ("a",)},
     "mode scores writes only id columns, scores and the reason: name the ids with id_columns"),
    ({"mode": "filter", "id_columns": ("key",)},
     "id_columns is for mode scores (a sidecar of ids and scores); with mode filter use columns or drop_columns"),
    ({"model": "vit-b-32", "models": ("violence-b-32",)},
     "give the heads either as model ('vit-b-32') or as models (['violence-b-32']), not both"),
    ({"models": ("vit-l-14", "violence-l-14"), "score_columns": ("p",)},
     "score_columns names one column per embedding column for a single model"),
    ({"embedding_columns": ("a", "b"), "score_columns": ("p",)},
     "score_columns ['p'] must name one column per embedding column ['a', 'b']"),
    ({"threshold": 1.5}, "threshold must be a number in [0, 1] (unsafe ⇔ score ≥ threshold); found 1.5"),
    ({"threshold": -0.1}, "threshold must be a number in [0, 1] (unsafe ⇔ score ≥ threshold); found -0.1"),
    ({"models": ({"model": "vit-l-14", "threshold": 2},)}, "threshold of vit-l-14 must be in [0, 1]; found 2.0"),
    ({"batch_rows": 0}, "batch_rows must be a positive integer; found 0"),
    ({"rows_per_task": -5}, "rows_per_task must be a positive integer; found -5"),
    ({"histogram_bins": 0}, "histogram_bins must be a positive integer; found 0"),
    ({"histogram_bins": 100_000_001}, "histogram_bins must be at most 100,000 (the report"),
    ({"reason_column": ""}, "reason_column must be a column name; found an empty name"),
    ({"drop_columns": ("a", "")}, "drop_columns must hold column names; found an empty name in ['a', '']"),
])
def test_conflicting_or_out_of_range_options_are_refused(options, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        JobConfig(input="in", output="out", **options)


def test_the_edges_of_the_ranges_are_accepted():
    assert JobConfig(input="i", output="o", threshold=0).threshold == 0
    assert JobConfig(input="i", output="o", threshold=1.0, batch_rows=1, rows_per_task=1, histogram_bins=1)
    assert JobConfig(input="i", output="o", histogram_bins=100_000).histogram_bins == 100_000
    assert JobConfig(input="i", output="o", compression="ZSTD").compression == "zstd"  # any case, one spelling
    assert JobConfig(input="i", output="o", embedding_compression="UNCOMPRESSED").embedding_compression == "none"
    assert JobConfig(input="i", output="o", mode="scores", id_columns=("key",)).id_columns == ("key",)


def test_config_errors_are_value_errors_of_this_package():
    with pytest.raises(ConfigError) as caught:
        JobConfig(input="i", output="o", mode="drop")
    assert isinstance(caught.value, ClipNsfwError) and isinstance(caught.value, ValueError)


@pytest.mark.parametrize("item, expected", [
    ("violence-l-14", HeadSpec("violence-l-14")),
    ({"model": "violence-l-14"}, HeadSpec("violence-l-14")),
    ({"model": "violence-l-14", "score_column": "violent", "threshold": 0.8},
     HeadSpec("violence-l-14", "violent", 0.8)),
    ({"model": "/models/mine.nsfw.npz", "threshold": 1}, HeadSpec("/models/mine.nsfw.npz", None, 1.0)),
    (HeadSpec("vit-l-14", "p"), HeadSpec("vit-l-14", "p")),
])
def test_model_choices_parse_names_mappings_and_choices(item, expected):
    parsed = parse_head_spec(item)
    assert parsed == expected
    assert parsed.threshold is None or type(parsed.threshold) is float


@pytest.mark.parametrize("item, message", [
    (3, "each entry of models must be a model name or a mapping with 'model' (and optionally 'score_column', "
        "'threshold'); found the integer 3"),
    ("", "each entry of models must be a model name or a mapping with 'model'"),
    (["vit-l-14"], "each entry of models must be a model name or a mapping with 'model' (and optionally "
                   "'score_column', 'threshold'); found a list"),
    ({"model": "vit-l-14", "column": "p"}, "an entry of models must have 'model' (a name or path) and may have "
                                           "'score_column', 'threshold'; found {'model': 'vit-l-14', 'column': 'p'}"),
    ({"score_column": "p"}, "an entry of models must have 'model'"),
    ({"model": ""}, "an entry of models must have 'model'"),
    ({"model": "vit-l-14", "score_column": 5}, "score_column of vit-l-14 in models must be a column name; "
                                               "found the integer 5"),
    ({"model": "vit-l-14", "threshold": True}, "threshold of vit-l-14 in models must be a number; "
                                               "found the boolean True"),
    ({"model": "vit-l-14", "threshold": "0.5"}, "threshold of vit-l-14 in models must be a number; "
                                                "found the string '0.5'"),
])
def test_bad_model_choices_say_what_was_expected_and_found(item, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_head_spec(item)


def test_models_from_yaml_one_or_several(tmp_path):
    several = JobConfig.load(write(tmp_path, "input: a\noutput: b\nmodels:\n  - vit-l-14\n"
                                             "  - {model: violence-l-14, threshold: 0.6}\n"))
    assert several.models == (HeadSpec("vit-l-14"), HeadSpec("violence-l-14", None, 0.6))
    assert several.choices() == several.models
    assert JobConfig(input="a", output="b", models="violence-l-14").models == (HeadSpec("violence-l-14"),)
    assert JobConfig(input="a", output="b", models={"model": "x.npz"}).models == (HeadSpec("x.npz"),)


def test_redacted_hides_secret_looking_options_at_any_depth():
    config = JobConfig(input="s3://b/in", output="s3://b/out", storage_options={
        "key": "AKIA", "secret": "S3CR3T", "anon": False, "endpoint_url": "http://127.0.0.1:8333",
        "client_kwargs": {"aws_session_token": "T0K3N", "region_name": "eu-west-1"}, "profile": None})
    shown = config.redacted()
    assert shown["storage_options"] == {
        "key": "***", "secret": "***", "anon": False, "endpoint_url": "http://127.0.0.1:8333",
        "client_kwargs": {"aws_session_token": "***", "region_name": "eu-west-1"}, "profile": None}
    assert config.storage_options["secret"] == "S3CR3T"  # the config itself keeps what it was given
    assert shown["embedding_columns"] == [] and shown["input"] == "s3://b/in"


@pytest.mark.parametrize("key", ["columns", "drop_columns", "id_columns", "embedding_columns"])
def test_a_column_named_twice_is_refused(key):
    options = {"mode": "scores"} if key == "id_columns" else {}
    with pytest.raises(ConfigError, match=re.escape(f"{key} names 'key' more than once")):
        JobConfig(input="i", output="o", **options, **{key: ("key", "url", "key")})


def test_a_key_given_twice_in_the_yaml_is_refused(tmp_path):
    """YAML's loaders keep the last of two equal keys silently (issue #23)."""
    path = tmp_path / "job.yaml"
    path.write_text("input: in\noutput: out\nthreshold: 0.3\nmode: split\nthreshold: 0.9\n")
    with pytest.raises(ConfigError, match=r"the key 'threshold' is given twice \(lines 3 and 5\); the second would "
                                          "silently win"):
        JobConfig.load(str(path))
    path.write_text("input: in\noutput: out\nstorage_options:\n  anon: true\n  anon: false\n")
    with pytest.raises(ConfigError, match=r"the key 'anon' is given twice \(lines 4 and 5\)"):
        JobConfig.load(str(path))


def test_keep_is_for_filter_only():
    with pytest.raises(ConfigError, match="keep: unsafe is for mode filter .* mode split writes both sides"):
        JobConfig(input="i", output="o", mode="split", keep="unsafe")
    with pytest.raises(ConfigError, match="keep: unsafe is for mode filter .* mode annotate keeps every row"):
        JobConfig(input="i", output="o", keep="unsafe")
    assert JobConfig(input="i", output="o", mode="filter", keep="unsafe").keep == "unsafe"


def test_a_command_line_threshold_a_head_would_ignore_is_refused(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("input: in\noutput: out\nmodels:\n  - model: vit-l-14\n    threshold: 0.3\n  - vit-b-32\n")
    with pytest.raises(ConfigError, match=r"--threshold 0.9 would not apply to vit-l-14 \(threshold 0.3\): a head's "
                                          "own threshold under models: in .*job.yaml wins"):
        JobConfig.load(str(path), {"threshold": 0.9})
    config = JobConfig.load(str(path))  # without --threshold: the head's own, and the default for the other
    assert [choice.threshold for choice in config.choices()] == [0.3, None] and config.threshold == 0.5


def test_a_command_line_model_replaces_the_yaml_heads_and_their_thresholds(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("input: in\noutput: out\nmodels:\n  - model: vit-l-14\n    threshold: 0.3\n")
    config = JobConfig.load(str(path), {"models": ("vit-l-14",), "threshold": 0.9, "model": "vit-l-14"})
    assert [choice.threshold for choice in config.choices()] == [None] and config.threshold == 0.9
