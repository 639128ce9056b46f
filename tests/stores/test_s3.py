"""The job with input and output on a real S3 server (SeaweedFS on 127.0.0.1)."""

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from clip_nsfw_spark.driver.config import JobConfig
from clip_nsfw_spark.driver.job import run_job
from clip_nsfw_spark.errors import OutputError
from clip_nsfw_spark.tools.sample import write_parquet_sample
from clip_nsfw_spark.spark.runner import spark_runner
from clip_nsfw_spark.driver.output import TASK_RECORD
from conftest import ROOT, needs_models
from s3server import SECRET_KEY


def read_s3_dir(fs, path):
    files = sorted(p for p in fs.find(path) if p.endswith(".parquet") and "/_" not in p[len(path):])
    tables = []
    for name in files:
        with fs.open(name, "rb") as handle:
            tables.append(pq.read_table(handle))
    return files, tables


@needs_models
def test_job_on_s3_equals_local_and_never_shows_the_secret(s3_server, spark, tmp_path, capfd):
    fs = s3_server.filesystem()
    fs.mkdir("data")
    options = s3_server.storage_options()
    write_parquet_sample("s3://data/emb", rows=1500, files=3, row_group_rows=256, storage_options=options)
    write_parquet_sample(str(tmp_path / "local-in"), rows=1500, files=3, row_group_rows=256)
    report = run_job(JobConfig(input="s3://data/emb", output="s3://data/scored", storage_options=options,
                               rows_per_task=300), runner=spark_runner(spark))
    run_job(JobConfig(input=str(tmp_path / "local-in"), output=str(tmp_path / "local-out"), rows_per_task=300))
    files, tables = read_s3_dir(fs, "data/scored")
    local = sorted(p.name for p in (tmp_path / "local-out").glob("*.parquet"))
    assert [f.rsplit("/", 1)[-1] for f in files] == local and len(local) == 6
    for name, table in zip(local, tables):
        assert table.equals(pq.read_table(tmp_path / "local-out" / name))
    assert fs.exists("data/scored/_SUCCESS") and not fs.exists("data/scored/_clip_nsfw_tmp")
    stored = fs.cat("data/scored/_clip_nsfw_report.json").decode()
    assert json.loads(stored)["rows"]["read"] == 1500 and report["rows"]["written"] == {"annotated": 1500}
    captured = capfd.readouterr()
    for text in (stored, json.dumps(report), captured.out, captured.err):
        assert SECRET_KEY not in text
    assert json.loads(stored)["config"]["storage_options"]["secret"] == "***"


@needs_models
def test_cli_reads_credentials_and_endpoint_from_the_aws_environment(s3_server, tmp_path):
    fs = s3_server.filesystem()
    fs.mkdir("envtest")
    write_parquet_sample("s3://envtest/in", rows=400, files=2, storage_options=s3_server.storage_options())
    env = dict(os.environ, **s3_server.env())
    result = subprocess.run([sys.executable, "-m", "clip_nsfw_spark.cli", "run", "--input", "s3://envtest/in",
                             "--output", "s3://envtest/out", "--mode", "split", "--master", "local[2]"],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert SECRET_KEY not in result.stdout + result.stderr
    safe = len(read_s3_dir(fs, "envtest/out/safe")[0])
    assert safe == 2 and fs.exists("envtest/out/_SUCCESS")


def test_wrong_credentials_give_a_clear_error_without_the_secret(s3_server, tmp_path):
    fs = s3_server.filesystem()
    fs.mkdir("creds")
    write_parquet_sample("s3://creds/in", rows=100, files=1, storage_options=s3_server.storage_options())
    env = dict(os.environ, **(s3_server.env() | {"AWS_SECRET_ACCESS_KEY": "wrong-" + SECRET_KEY}))
    result = subprocess.run([sys.executable, "-m", "clip_nsfw_spark.cli", "run", "--input", "s3://creds/in",
                             "--output", "s3://creds/out", "--local-runner"],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "s3://creds/in" in result.stderr and "credentials" in result.stderr
    assert "Traceback" not in result.stderr and SECRET_KEY not in result.stdout + result.stderr
    assert not fs.exists("creds/out")


@needs_models
def test_s3_server_restarted_during_a_run(s3_server, tmp_path):
    """Either the run survives the restart (client retries) or it fails clearly; --resume then finishes it,
    and the output equals a clean run. No partial file is ever visible under a final name."""
    import time

    from clip_nsfw_spark.executor.writer import SUCCESS_NAME

    fs = s3_server.filesystem()
    fs.mkdir("restart")
    options = s3_server.storage_options()
    write_parquet_sample("s3://restart/in", rows=3200, files=8, storage_options=options)
    write_parquet_sample(str(tmp_path / "in"), rows=3200, files=8)
    run_job(JobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "clean")))
    env = dict(os.environ, **s3_server.env())
    args = [sys.executable, "-m", "clip_nsfw_spark.cli", "run", "--input", "s3://restart/in",
            "--output", "s3://restart/out", "--master", "local[2]", "--batch-rows", "50"]
    slow = [sys.executable, str(ROOT / "tests" / "faults.py"), "--fault", "point=write,after=1,action=sleep,seconds=0.02",
            *args[4:]]  # the same run, each write slowed down: the restart comes in the middle of it
    first = subprocess.Popen(slow, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not _completed_tasks(fs):
        time.sleep(0.2)
    assert _completed_tasks(fs), "no task completed before the restart"
    s3_server.restart()
    out, err = first.communicate(timeout=900)
    fs = s3_server.filesystem()
    if first.returncode != 0:
        assert first.returncode == 2 and "Traceback" not in err, err[-3000:]
        assert not fs.exists(f"restart/out/{SUCCESS_NAME}")
        for name in fs.find("restart/out"):  # whatever is visible under a final name is complete parquet
            if name.endswith(".parquet") and "/_clip_nsfw_tmp/" not in name:
                with fs.open(name, "rb") as handle:
                    pq.read_metadata(handle)
        resumed = subprocess.run(args[:-4] + ["--resume", "--master", "local[2]"], env=env,
                                 cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        # this process listed the output above, before the resume wrote the rest: s3fs would answer open() from
        # that listing (FileNotFoundError for a file written since); CI failed so once
        fs.invalidate_cache()
    files, tables = read_s3_dir(fs, "restart/out")
    local = sorted(p.name for p in (tmp_path / "clean").glob("*.parquet"))
    assert [f.rsplit("/", 1)[-1] for f in files] == local
    for name, table in zip(local, tables):
        assert table.equals(pq.read_table(tmp_path / "clean" / name))
    assert fs.exists(f"restart/out/{SUCCESS_NAME}")


def _completed_tasks(fs) -> int:
    try:
        return len([p for p in fs.ls("restart/out/_clip_nsfw_tasks", refresh=True)
                    if TASK_RECORD.fullmatch(p.rsplit("/", 1)[-1])])
    except (FileNotFoundError, OSError):
        return 0


# Names with characters fsspec would expand as patterns, and a neighbour each pattern would match.
GLOB_NAMES = [("out[1]", "out1"), ("out?", "outX"), ("out*", "out-other"), ("out{a,b}", "outa"),
              ("out with space", "out"), ("outé ☃", "oute")]


@needs_models
@pytest.mark.parametrize("name, neighbour_name", GLOB_NAMES)
def test_glob_characters_in_s3_names_are_taken_literally(s3_server, tmp_path, name, neighbour_name):
    """``out[1]`` is a name, not a pattern: writing, overwriting and resuming it never touch ``out1``; an
    input named so reads its own files only (issue #23, class 6)."""
    fs = s3_server.filesystem()
    bucket = "globs-" + str(GLOB_NAMES.index((name, neighbour_name)))
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    options = s3_server.storage_options()
    write_parquet_sample(f"s3://{bucket}/in/{name}", rows=600, files=3, storage_options=options)
    write_parquet_sample(f"s3://{bucket}/in/{neighbour_name}", rows=200, files=1, storage_options=options)
    source = f"s3://{bucket}/in/{name}"
    neighbour = run_job(JobConfig(input=source, output=f"s3://{bucket}/{neighbour_name}", storage_options=options))
    assert neighbour["rows"]["read"] == 600  # the input named with pattern characters: its own rows only
    before = {path: fs.cat_file(path) for path in fs.find(f"{bucket}/{neighbour_name}")}
    for flags in ({}, {"overwrite": True}, {"resume": True}):
        report = run_job(JobConfig(input=source, output=f"s3://{bucket}/{name}", storage_options=options, **flags))
        assert report["rows"] == neighbour["rows"]
        fs.invalidate_cache()
        assert {path: fs.cat_file(path) for path in fs.find(f"{bucket}/{neighbour_name}")} == before, flags
        names = sorted(p[len(f"{bucket}/{name}/"):] for p in fs.find(f"{bucket}/{name}"))
        assert [n for n in names if not n.startswith("_")] == sorted(
            p[len(f"{bucket}/{neighbour_name}/"):] for p in before
            if not p[len(f"{bucket}/{neighbour_name}/"):].startswith("_"))
        assert "_clip_nsfw_lease.json" not in names and "_SUCCESS" in names


@needs_models
def test_keys_too_long_for_an_object_store_are_refused_at_planning(s3_server, tmp_path):
    deep = tmp_path / "in" / "/".join("k" * 200 for _ in range(5))
    write_parquet_sample(str(deep), rows=20, files=1)
    fs = s3_server.filesystem()
    if not fs.exists("longkeys"):
        fs.mkdir("longkeys")
    with pytest.raises(OutputError, match=r"its key is 10\d\d bytes, over the 1024 an object store accepts"):
        run_job(JobConfig(input=str(tmp_path / "in"), output="s3://longkeys/out",
                          storage_options=s3_server.storage_options()))
    assert fs.find("longkeys") == []


def test_the_s3_server_has_a_volume_for_every_bucket_the_suite_makes(s3_server):
    """SeaweedFS gives each bucket a volume of its own and by default caps volumes at free disk / 1 GiB: on a
    CI machine with a fuller disk the suite's buckets ran out and every later upload failed. The cap must not
    depend on the disk."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{s3_server.ports['master']}/dir/status", timeout=10) as answer:
        topology = json.loads(answer.read())["Topology"]
    assert topology["Max"] >= 500, topology
