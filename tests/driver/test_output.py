"""The input is never written or deleted, whatever the spelling; --overwrite removes only this tool's output.

Issue #10, classes 1 (path aliasing), 2 (overwrite and typed config) and 8 (long paths). Every case is
run as a user would run it (``run_job`` with ``overwrite=True`` where that makes it most dangerous) and
checks the input byte for byte afterwards.
"""

import hashlib
import json
import os
import re

import pyarrow.parquet as pq
import pytest

from clip_nsfw_spark.driver.config import JobConfig
from clip_nsfw_spark.errors import ConfigError, OutputError
from clip_nsfw_spark.driver.job import run_job
from clip_nsfw_spark.executor.writer import REPORT_NAME, SUCCESS_NAME
from clip_nsfw_spark.tools.sample import write_parquet_sample
from conftest import ROOT, needs_models

REFUSED_AS_INPUT = r"(is the input|is inside the input|contains the input) "


def snapshot(folder) -> dict:
    """{relative path: sha256} of every file under ``folder`` (symlinks not followed): the input's identity."""
    found = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as handle:
                found[os.path.relpath(path, folder)] = hashlib.sha256(handle.read()).hexdigest()
    return found


@pytest.fixture
def tree(tmp_path):
    """``d/in`` (two parquet files), ``d/link`` → ``d/in``, ``d/away`` → ``d/a/b`` (so ``away/..`` is ``d/a``),
    ``d/box/data`` → ``d/in`` (a folder that holds the input's path, not its data)."""
    d = tmp_path / "d"
    write_parquet_sample(str(d / "in"), rows=60, files=2)
    (d / "a" / "b").mkdir(parents=True)
    os.symlink(d / "in", d / "link")
    os.symlink(d / "a" / "b", d / "away")
    (d / "box").mkdir()
    os.symlink(d / "in", d / "box" / "data")
    return d


# (input, output) spelled relative to d; every output here is the input, inside it or around it.
ALIASES = {
    "double slash": ("in", "//in"),
    "double slash inside": ("in", "//in/scored"),
    "dot and trailing slash": ("in", "/in/./"),
    "dot-dot": ("in", "/a/../in"),
    "dot-dot inside": ("in", "/a/b/../../in/scored"),
    "file url": ("in", "file://{d}/in"),
    "file url inside": ("in", "file://{d}//in/scored/"),
    "file url naming localhost": ("in", "file://localhost{d}/in/scored"),
    "output through a symlink into the input": ("in", "/link/scored"),
    "not-yet-existing output under a symlink": ("in", "/link/new/deeper/scored"),
    "output is a symlink to the input": ("in", "/link"),
    "input reached through a symlink": ("link", "/in/scored"),
    "input through a symlink, output the target": ("link/", "/in"),
    "output contains the input (dot spelling)": ("in", "/./"),
    "output contains the input (file url)": ("in", "file://{d}/a/.."),
    "output holds the symlink the input is named by": ("box/data", "/box"),
    "glob input, output inside its folder": ("in/*.parquet", "/in/out"),
    "glob with ? before *": ("in/part-0000?.parquet", "/in/out"),
    "glob through a symlink": ("link/*.parquet", "/in/out"),
}


def _spell(d, text: str) -> str:
    return text.format(d=d) if text.startswith("file://") else f"{d}{text}"


@pytest.mark.parametrize("case", ALIASES)
def test_no_spelling_of_the_input_is_accepted_as_output(tree, case):
    source, output = ALIASES[case]
    before = snapshot(tree / "in")
    config = JobConfig(input=f"{tree}/{source}", output=_spell(tree, output), overwrite=True)
    with pytest.raises(OutputError, match=REFUSED_AS_INPUT + re.escape(os.path.realpath(tree / "in"))):
        run_job(config)
    assert snapshot(tree / "in") == before
    assert not (tree / "in" / "scored").exists() and not (tree / "in" / "out").exists()


def test_relative_spellings_are_compared_as_absolute_paths(tree, monkeypatch):
    monkeypatch.chdir(tree / "a")
    before = snapshot(tree / "in")
    for source, output in [("../in", str(tree / "in" / "x")), (str(tree / "in"), "../in/./x"),
                           ("../link", "b/../../in"),
                           ("~/" + os.path.relpath(tree / "in", os.path.expanduser("~")), "../in/y")]:
        with pytest.raises(OutputError, match=REFUSED_AS_INPUT):
            run_job(JobConfig(input=source, output=output, overwrite=True))
    assert snapshot(tree / "in") == before and sorted(os.listdir(tree / "a")) == ["b"]


def test_a_bind_mount_of_the_input_is_the_input(tree):
    """Two paths, one folder: compared by device and inode too (as a case-insensitive filesystem would need)."""
    import shutil
    import subprocess
    import sys

    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("needs unshare (a private mount namespace) to bind-mount without touching the system")
    (tree / "mnt").mkdir()
    check = ("import sys; from clip_nsfw_spark.driver.config import JobConfig; from clip_nsfw_spark.driver.job import run_job\n"
             "try:\n    run_job(JobConfig(input=sys.argv[1], output=sys.argv[2], overwrite=True))\n"
             "except Exception as err:\n    print(err)")
    script = f'mount --bind "$1" "$2" && exec "{sys.executable}" -c "$3" "$1" "$2/scored"'
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", str(tree / "in"), str(tree / "mnt"), check],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert re.search(r"output .*mnt/scored is inside the input .*in: choose", result.stdout), \
        result.stdout + result.stderr
    assert sorted(snapshot(tree / "in")) == ["part-00000.parquet", "part-00001.parquet"]


@needs_models
def test_dot_dot_after_a_symlink_means_what_the_kernel_means(tree):
    """``d/away/../in`` is ``d/a/in`` (away → d/a/b), not the input ``d/in``: accepted and written there."""
    report = run_job(JobConfig(input=str(tree / "in"), output=f"{tree}/away/../in"))
    assert report["rows"]["read"] == 60
    assert (tree / "a" / "in" / SUCCESS_NAME).exists()
    assert sorted(snapshot(tree / "in")) == ["part-00000.parquet", "part-00001.parquet"]


def test_s3_keys_are_compared_after_normalising(s3_server):
    fs = s3_server.filesystem()
    fs.mkdir("alias")
    options = s3_server.storage_options()
    write_parquet_sample("s3://alias/in", rows=40, files=2, storage_options=options)
    before = sorted(fs.find("alias/in"))
    for output in ["s3://alias//in/x", "s3://alias/in/", "s3://alias/./in", "s3://alias/in/../in/scored",
                   "s3://alias//", "s3://alias"]:
        with pytest.raises(OutputError, match=REFUSED_AS_INPUT + "s3://alias/in"):
            run_job(JobConfig(input="s3://alias/in", output=output, overwrite=True, storage_options=options))
    with pytest.raises(OutputError, match="is inside the input s3://alias/in"):
        run_job(JobConfig(input="s3://alias//in/*.parquet", output="s3://alias/in/out", storage_options=options))
    assert sorted(fs.find("alias/in")) == before


@needs_models
@pytest.mark.parametrize("flag", ["resume", "overwrite"])
def test_a_symlink_in_the_output_is_never_written_through(tmp_path, flag):
    """A split output whose ``safe/`` was replaced by a symlink to the input: a rerun would write the input."""
    write_parquet_sample(str(tmp_path / "in"), rows=60, files=2)
    out = tmp_path / "out"
    run_job(JobConfig(input=str(tmp_path / "in"), output=str(out), mode="split", threshold=0.05))
    for state in (out / "_clip_nsfw_tasks").glob("[0-9a-f]*.json"):
        state.unlink()
    (out / "_SUCCESS").unlink()
    for path in (out / "safe").iterdir():
        path.unlink()
    (out / "safe").rmdir()
    os.symlink(tmp_path / "in", out / "safe")
    before = snapshot(tmp_path / "in")
    with pytest.raises(OutputError, match=r"output .*out holds symlinks \(safe\); this tool never writes one"):
        run_job(JobConfig(input=str(tmp_path / "in"), output=str(out), mode="split", threshold=0.05,
                          **{flag: True}))
    assert snapshot(tmp_path / "in") == before and (out / "safe").is_symlink()


# ------------------------------------------------------------------------------ class 2: --overwrite


@pytest.mark.parametrize("line, message", [
    ('overwrite: "false"', "overwrite must be true or false (a YAML boolean), found the string 'false'"),
    ("overwrite: 0", "overwrite must be true or false (a YAML boolean), found the integer 0"),
    ("resume: 'no'", "resume must be true or false (a YAML boolean), found the string 'no'"),
    ("write_embeddings: 1", "write_embeddings must be true or false (a YAML boolean), found the integer 1"),
    ("batch_rows: 100.0", "batch_rows must be an integer, found the number 100.0"),
    ("batch_rows: true", "batch_rows must be an integer, found the boolean True"),
    ("rows_per_task: '1000'", "rows_per_task must be an integer, found the string '1000'"),
    ("threshold: true", "threshold must be a number, found the boolean True"),
    ("threshold: '0.3'", "threshold must be a number, found the string '0.3'"),
    ("mode: [filter]", "mode must be one of annotate, filter, split, scores; found ['filter']"),
    ("keep: true", "keep must be one of safe, unsafe; found True"),
    ("embedding_columns: [1, 2]", "embedding_columns must be a list of strings; found the integer 1 in it"),
    ("storage_options: anon", "storage_options must be a mapping of fsspec options"),
    ("model: 2", "model must be a string, found the integer 2"),
    # PyYAML reads exponents without a decimal point as text (hostile review 18): the message says how to write it
    ("threshold: 5e-1", "threshold must be a number, found the string '5e-1' (YAML reads it as text: write 0.5)"),
    ("batch_rows: 1e3", "found the string '1e3' (YAML reads it as text: write 1000)"),
])
def test_config_values_are_typed(tmp_path, line, message):
    config = tmp_path / "job.yaml"
    config.write_text(f"input: {tmp_path}/in\noutput: {tmp_path}/out\n{line}\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        JobConfig.load(str(config))


@needs_models
def test_quoted_false_never_deletes_a_finished_output(tmp_path):
    write_parquet_sample(str(tmp_path / "in"), rows=50, files=1)
    run_job(JobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out")))
    (tmp_path / "out" / "notes.txt").write_text("mine")
    before = snapshot(tmp_path / "out")
    config = tmp_path / "job.yaml"
    config.write_text(f"input: {tmp_path}/in\noutput: {tmp_path}/out\noverwrite: 'false'\n")
    with pytest.raises(ConfigError, match="found the string 'false'"):
        run_job(JobConfig.load(str(config)))
    assert snapshot(tmp_path / "out") == before


def test_overwrite_refuses_a_folder_this_tool_did_not_write(tmp_path):
    write_parquet_sample(str(tmp_path / "in"), rows=10, files=1)
    out = tmp_path / "out"
    for i in range(7):
        (out / f"sub{i}").mkdir(parents=True)
        (out / f"sub{i}" / "data.csv").write_text("someone else's data")
    before = snapshot(out)
    with pytest.raises(OutputError, match=r"--overwrite refused: output .*out was not written by clip-nsfw-spark "
                                          r"\(it has no _clip_nsfw_tasks/_job.json or _clip_nsfw_report.json\); "
                                          r"it holds 7 file\(s\): sub0/data.csv, sub1/data.csv, .*sub4/data.csv "
                                          r"and 2 more\. Choose a new or empty output folder"):
        run_job(JobConfig(input=str(tmp_path / "in"), output=str(out), overwrite=True))
    assert snapshot(out) == before


@needs_models
def test_overwrite_keeps_files_it_did_not_write_and_replaces_its_own(tmp_path):
    write_parquet_sample(str(tmp_path / "in"), rows=90, files=3)
    write_parquet_sample(str(tmp_path / "in2"), rows=40, files=2)
    out = tmp_path / "out"
    run_job(JobConfig(input=str(tmp_path / "in"), output=str(out), mode="split", threshold=0.05))
    (out / "safe" / "notes.md").write_text("my notes")
    (out / "README").write_text("not parquet")
    before = snapshot(out)
    with pytest.raises(OutputError, match=r"holds 2 file\(s\) that no manifest of clip-nsfw-spark names: README, "
                                          r"safe/notes.md\. Readers of the output would take them as data"):
        run_job(JobConfig(input=str(tmp_path / "in2"), output=str(out), overwrite=True))
    assert snapshot(out) == before
    (out / "safe" / "notes.md").unlink()
    (out / "README").unlink()
    report = run_job(JobConfig(input=str(tmp_path / "in2"), output=str(out), overwrite=True))
    assert report["rows"]["read"] == 40
    data = sorted(p for p in snapshot(out) if not p.startswith("_"))
    assert data == ["part-00000.parquet", "part-00001.parquet"]  # nothing of the split run is left


def test_output_is_validated_before_planning_and_model_conversion(tmp_path):
    """A non-empty output is refused first: no model is fetched or converted for a run that cannot start."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.parquet").write_bytes(b"not parquet")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x.txt").write_text("x")
    with pytest.raises(OutputError, match="is not empty"):
        run_job(JobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model="no-such-model"))


# ------------------------------------------------------------------------------ class 8: long paths


@needs_models
def test_deep_hive_paths_are_written_and_leave_no_temp_files(tmp_path):
    parts = [f"k{i}=" + "v" * 70 for i in range(3)] + ["part-" + "p" * 60 + ".parquet"]
    rel = "/".join(parts)
    assert max(map(len, parts)) <= 73 and len(rel) >= 280
    write_parquet_sample(str(tmp_path / "staging"), rows=30, files=1)
    target = tmp_path / "in" / rel
    target.parent.mkdir(parents=True)
    os.rename(tmp_path / "staging" / "part-00000.parquet", target)
    report = run_job(JobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), mode="split",
                               threshold=0.05))
    assert report["rows"]["read"] == 30
    written = sum(pq.read_metadata(tmp_path / "out" / side / rel).num_rows for side in ("safe", "unsafe"))
    assert written == 30
    assert not (tmp_path / "out" / "_clip_nsfw_tmp").exists()
    assert json.loads((tmp_path / "out" / REPORT_NAME).read_text())["status"] == "succeeded"


# ------------------------------------------------------------------------------ class 6 of #23: names as patterns


@needs_models
@pytest.mark.parametrize("name, neighbour_name", [("out[1]", "out1"), ("out?", "outX"), ("out*", "out-other"),
                                                  ("out{a,b}", "outa"), ("out with space", "out"),
                                                  ("outé ☃", "oute")])
def test_glob_characters_in_local_names_are_taken_literally(tmp_path, name, neighbour_name):
    """The local twin of test_s3's: an input and an output named with pattern characters; a neighbour the
    pattern would match is never read, written or removed, through a run, an overwrite and a resume."""
    write_parquet_sample(str(tmp_path / "in" / name), rows=300, files=3)
    write_parquet_sample(str(tmp_path / "in" / neighbour_name), rows=100, files=1)
    source = str(tmp_path / "in" / name)
    neighbour = run_job(JobConfig(input=source, output=str(tmp_path / neighbour_name)))
    assert neighbour["rows"]["read"] == 300
    before = snapshot(tmp_path / neighbour_name)
    for flags in ({}, {"overwrite": True}, {"resume": True}):
        report = run_job(JobConfig(input=source, output=str(tmp_path / name), **flags))
        assert report["rows"] == neighbour["rows"], flags
        assert snapshot(tmp_path / neighbour_name) == before, flags
        assert sorted(p.name for p in (tmp_path / name).glob("part-*")) == [
            "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]


@needs_models
def test_file_urls_naming_localhost_are_this_machine(tmp_path):
    """RFC 8089's file://localhost/path: fsspec took "localhost" for a relative folder (issue #23)."""
    write_parquet_sample(str(tmp_path / "in"), rows=50, files=1)
    report = run_job(JobConfig(input=f"file://localhost{tmp_path}/in", output=f"file://localhost{tmp_path}/out"))
    assert report["rows"]["read"] == 50 and (tmp_path / "out" / SUCCESS_NAME).exists()
    assert report["output"] == str(tmp_path / "out")


@needs_models
def test_a_fifo_in_the_output_does_not_hang_the_run(tmp_path):
    """Nothing under an output is opened to guess what it is: a FIFO is listed, never read (issue #23)."""
    write_parquet_sample(str(tmp_path / "in"), rows=50, files=1)
    run_job(JobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out")))
    os.mkfifo(tmp_path / "out" / ".pipe")  # hidden: a reader would not take it as data, so it stays
    report = run_job(JobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), overwrite=True))
    assert report["rows"]["read"] == 50 and (tmp_path / "out" / ".pipe").exists()
    os.mkfifo(tmp_path / "out" / "pipe")  # visible: readers would try it as data
    with pytest.raises(OutputError, match=r"that no manifest of clip-nsfw-spark names: pipe\."):
        run_job(JobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), overwrite=True))
    with pytest.raises(OutputError, match=r"no task of this run writes: pipe\."):
        run_job(JobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), resume=True))


@needs_models
def test_output_names_too_long_for_the_filesystem_are_refused_at_planning(tmp_path):
    """A slice adds ".slice-00000" to a file name that just fits: over the filesystem's NAME_MAX (255 on
    ext4, xfs, tmpfs), found before any task."""
    name_max = os.pathconf(tmp_path, "PC_NAME_MAX")
    name = "n" * (name_max - 13) + ".parquet"
    write_parquet_sample(str(tmp_path / "staging"), rows=300, files=1)
    (tmp_path / "in").mkdir()
    os.rename(tmp_path / "staging" / "part-00000.parquet", tmp_path / "in" / name)
    pq.write_table(pq.read_table(tmp_path / "in" / name), tmp_path / "in" / name, row_group_size=100)
    assert run_job(JobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "whole")))["rows"]["read"] == 300
    with pytest.raises(OutputError, match=rf"the output file for input n+\.slice-00000\.parquet would be .*: its name "
                                          rf"part n+… is {name_max + 7} bytes, over this filesystem's {name_max}\. "
                                          r"Choose a shorter"):
        run_job(JobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "sliced"), rows_per_task=100))
    assert not (tmp_path / "sliced").exists()


def test_a_file_url_naming_another_host_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for url in ("file://server/share/out", "file://127.0.0.2/data"):
        with pytest.raises(ConfigError, match="a file URL names a path on this machine"):
            run_job(JobConfig(input=str(tmp_path / "in"), output=url))
    assert list(tmp_path.iterdir()) == []


def test_dot_folders_are_hidden_even_with_an_equals_sign():
    from clip_nsfw_spark.driver.output import read_by_spark

    assert not read_by_spark("safe/.old=1/z.parquet") and read_by_spark("safe/_k=1/z.parquet")
    assert read_by_spark("_rejected/a.parquet") and not read_by_spark("safe/_tmp/a.parquet")


@needs_models
def test_a_folder_holding_only_hidden_files_is_an_empty_output(tmp_path):
    """Hostile review 18: a .gitkeep (or a Finder's .DS_Store) made the folder "not empty", and the two ways
    out the message named were refused too. Hidden names are no data to any reader: the run writes beside
    them, leaves them as they are, and a later --overwrite and --resume work."""
    write_parquet_sample(str(tmp_path / "in"), rows=60, files=2)
    out = tmp_path / "out"
    out.mkdir()
    (out / ".gitkeep").write_text("")
    (out / ".DS_Store").write_bytes(b"\x00\x01")
    report = run_job(JobConfig(input=str(tmp_path / "in"), output=str(out)))
    assert report["rows"]["read"] == 60 and (out / SUCCESS_NAME).exists()
    assert (out / ".gitkeep").read_text() == "" and (out / ".DS_Store").read_bytes() == b"\x00\x01"
    again = run_job(JobConfig(input=str(tmp_path / "in"), output=str(out), resume=True))
    assert again["tasks_resumed"] == 2
    run_job(JobConfig(input=str(tmp_path / "in"), output=str(out), overwrite=True))
    assert (out / ".gitkeep").exists() and (out / ".DS_Store").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / ".gitkeep").write_text("")
    (other / "notes.txt").write_text("mine")  # a visible file still makes a folder not empty
    with pytest.raises(OutputError, match="is not empty"):
        run_job(JobConfig(input=str(tmp_path / "in"), output=str(other)))
