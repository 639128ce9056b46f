"""The job's command line: every option sets one JobConfig field, with JobConfig's choices and defaults."""

import argparse
import subprocess
import sys
import typing

import pytest

from clip_nsfw_spark.driver.config import JobConfig
from clip_nsfw_spark.cli.run import OPTION_KEYS, add_job_arguments, config_from_args
from clip_nsfw_spark.scoring.outcomes import MODE_STREAMS


def parser():
    built = argparse.ArgumentParser()
    add_job_arguments(built)
    return built


def test_every_option_is_a_config_field_and_every_field_listed_has_an_option():
    dests = {action.dest for action in parser()._actions} - {"help", "config", "local_runner"}
    assert dests == set(OPTION_KEYS)
    assert set(OPTION_KEYS) <= set(JobConfig.keys())


def test_choices_come_from_the_config_types():
    actions = {action.dest: action for action in parser()._actions}
    hints = typing.get_type_hints(JobConfig)
    for key in ("mode", "layout", "keep"):
        assert tuple(actions[key].choices) == typing.get_args(hints[key])
    assert set(MODE_STREAMS) == set(typing.get_args(hints["mode"]))


def test_options_override_the_yaml_file_and_unset_options_do_not(tmp_path):
    conf = tmp_path / "job.yaml"
    conf.write_text("input: in\noutput: out\nmode: filter\nthreshold: 0.2\nbatch_rows: 100\n")
    config = config_from_args(parser().parse_args(["--config", str(conf), "--threshold", "0.3",
                                                   "--storage-option", "anon=true"]))
    assert (config.mode, config.threshold, config.batch_rows) == ("filter", 0.3, 100)
    assert config.storage_options == {"anon": True}


def test_a_bad_choice_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["--mode", "delete"])
    assert "invalid choice: 'delete'" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["clip_nsfw_spark", "clip_nsfw_spark.cli"])
def test_the_command_line_runs_as_a_module_of_either_name(module):
    """``python -m clip_nsfw_spark`` is what users try first; it is the same command line as ``.cli``."""
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-m", module, "run", "--help"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], check=False)
    assert done.returncode == 0, done.stderr
    assert "--input" in done.stdout and "--output" in done.stdout


def test_sample_never_writes_into_a_folder_holding_files_and_checks_its_numbers(tmp_path):
    """Hostile review 18: ``sample`` into a dataset replaced its part-00000/1 and kept part-00002 (a mix that
    reads as one dataset); --files 0 was a ZeroDivisionError, --dim 0 an ArrowInvalid, --rows -5 "wrote -5
    rows". Each is one line and exit 2 now, with nothing written."""
    import hashlib

    data = tmp_path / "data"
    data.mkdir()
    (data / "part-00000.parquet").write_bytes(b"the user's file")
    before = hashlib.sha256((data / "part-00000.parquet").read_bytes()).hexdigest()
    for extra, expected in ((["--files", "0"], "--files must be at least 1, found 0"),
                            (["--dim", "0"], "--dim must be at least 1"), (["--rows", "-5"], "--rows must be at least 1"),
                            (["--rows", "2", "--files", "3"], "more than --rows"), ([], "is not an empty folder")):
        result = subprocess.run([sys.executable, "-m", "clip_nsfw_spark", "sample", str(data), "--rows", "10", *extra],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and expected in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert sorted(p.name for p in data.iterdir()) == ["part-00000.parquet"]
    assert hashlib.sha256((data / "part-00000.parquet").read_bytes()).hexdigest() == before
    fresh = subprocess.run([sys.executable, "-m", "clip_nsfw_spark", "sample", str(tmp_path / "new"), "--rows", "10",
                            "--files", "2", "--dim", "4"], capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0 and len(list((tmp_path / "new").glob("*.parquet"))) == 2, fresh.stderr
