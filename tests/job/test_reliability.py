"""Bad input gets a clear error or a documented per-row policy; faults end with output equal to a clean run."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_nsfw_spark.driver.config import JobConfig
from clip_nsfw_spark.errors import DamagedInputError, InputError, ModelError
from clip_nsfw_spark.driver.job import run_job
from clip_nsfw_spark.executor.writer import REPORT_NAME, SUCCESS_NAME
from clip_nsfw_spark.tools.sample import embedding_array, metadata, write_laion_sample, write_parquet_sample
from clip_nsfw_spark.scoring.weights import PortableWeights
from conftest import ROOT, needs_models


def run(source, output, **options):
    return run_job(JobConfig(input=str(source), output=str(output), **options))


def read_outputs(root):
    """{relative path: table} of every data file (not _ state), for comparing two runs."""
    found = {}
    for path in sorted(root.rglob("*.parquet")):
        rel = path.relative_to(root)
        if not str(rel).startswith(("_clip_nsfw", )):
            found[str(rel)] = pq.read_table(path)
    return found


def assert_same_outputs(a, b):
    left, right = read_outputs(a), read_outputs(b)
    assert sorted(left) == sorted(right)
    for name in left:
        assert left[name].equals(right[name]), name
    assert not (a / "_clip_nsfw_tmp").exists() and not (b / "_clip_nsfw_tmp").exists()


# ------------------------------------------------------------------------------------------- bad input


def test_named_column_missing_lists_the_columns(tmp_path):
    write_parquet_sample(str(tmp_path / "in"), rows=10, files=1)
    with pytest.raises(InputError, match="embedding column 'img_emb' not found .*columns found: key, url, caption, embedding"):
        run(tmp_path / "in", tmp_path / "out", embedding_columns=("img_emb",))


def test_non_numeric_or_absent_embedding_column(tmp_path):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"key": ["a"], "embedding": [["x", "y"]]}), tmp_path / "in" / "a.parquet")
    with pytest.raises(InputError, match=r"'embedding' .* is list<element: string>, expected a list of float16/float32/float64"):
        run(tmp_path / "in", tmp_path / "out", embedding_columns=("embedding",))
    with pytest.raises(InputError, match=r"no embedding column .*key \(string\), embedding \(list<element: string>\)"):
        run(tmp_path / "in", tmp_path / "out")


@pytest.mark.parametrize("damage", ["empty", "truncated", "not parquet"])
def test_corrupt_parquet_names_the_file(tmp_path, damage):
    write_parquet_sample(str(tmp_path / "in"), rows=200, files=2)
    victim = tmp_path / "in" / "part-00001.parquet"
    data = victim.read_bytes()
    victim.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "not parquet": b"hello" * 100}[damage])
    with pytest.raises(InputError, match=r"cannot read parquet file .*part-00001.parquet: .*truncated or not parquet"):
        run(tmp_path / "in", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _with_checksums_and_a_flipped_value(path, row_group: int) -> None:
    """Rewrite ``path`` with page CRCs (row groups of 100 rows), then flip one byte inside a value of the
    embedding column's first data page of ``row_group``: what a bad disk or a bad copy does."""
    pq.write_table(pq.read_table(path), path, row_group_size=100, write_page_checksum=True)
    chunk = pq.read_metadata(path).row_group(row_group).column(3)
    assert chunk.path_in_schema.startswith("embedding")
    data = bytearray(path.read_bytes())
    data[chunk.data_page_offset + chunk.total_compressed_size // 2] ^= 0x04
    path.write_bytes(bytes(data))


@needs_models
@pytest.mark.parametrize("mode", ["annotate", "filter"])
def test_a_damaged_page_fails_its_file_once_with_one_line_naming_file_and_row_group(tmp_path, mode):
    write_parquet_sample(str(tmp_path / "in"), rows=400, files=2)
    _with_checksums_and_a_flipped_value(tmp_path / "in" / "part-00001.parquet", row_group=1)
    with pytest.raises(DamagedInputError) as caught:
        run(tmp_path / "in", tmp_path / "out", mode=mode, rows_per_task=10_000)
    message = str(caught.value)
    assert "\n" not in message
    assert f"{tmp_path}/in/part-00001.parquet is damaged: row group 1: " in message and "CRC" in message
    # the damaged file's task left nothing; the run is not marked complete
    assert not list((tmp_path / "out").rglob("part-00001*.parquet"))
    assert not (tmp_path / "out" / SUCCESS_NAME).exists()


@needs_models
def test_damage_met_by_the_drivers_width_probe_names_the_file(tmp_path):
    write_parquet_sample(str(tmp_path / "in"), rows=400, files=2)
    _with_checksums_and_a_flipped_value(tmp_path / "in" / "part-00000.parquet", row_group=0)
    with pytest.raises(DamagedInputError, match=rf"^{tmp_path}/in/part-00000.parquet is damaged: row group 0: .*CRC"):
        run(tmp_path / "in", tmp_path / "out")


@needs_models
def test_zero_row_dataset_gives_empty_outputs_and_a_report(tmp_path):
    (tmp_path / "in").mkdir()
    empty = pa.table(metadata(0, 0) | {"embedding": embedding_array(np.zeros((0, 768), np.float16), True)})
    pq.write_table(empty, tmp_path / "in" / "a.parquet")
    report = run(tmp_path / "in", tmp_path / "out", mode="split")
    assert report["rows"]["read"] == 0 and report["rows"]["written"] == {"safe": 0, "unsafe": 0}
    assert pq.read_table(tmp_path / "out" / "safe" / "a.parquet").schema.names[-1] == "punsafe"
    assert (tmp_path / "out" / SUCCESS_NAME).exists()


def test_npy_and_metadata_that_do_not_align(tmp_path):
    write_laion_sample(str(tmp_path / "l"), rows=100, files=2)
    meta = tmp_path / "l" / "metadata" / "metadata_1.parquet"
    pq.write_table(pq.read_table(meta).slice(0, 10), meta)
    with pytest.raises(InputError, match=r"img_emb_1.npy has 50 rows but .*metadata_1.parquet has 10: they must align"):
        run(tmp_path / "l", tmp_path / "out")
    os.remove(tmp_path / "l" / "img_emb" / "img_emb_1.npy")
    with pytest.raises(InputError, match=r"metadata_1.parquet has no partner file number 1 in img_emb/"):
        run(tmp_path / "l", tmp_path / "out")


def test_truncated_npy_names_the_file(tmp_path):
    write_laion_sample(str(tmp_path / "l"), rows=100, files=1)
    npy = tmp_path / "l" / "img_emb" / "img_emb_0.npy"
    npy.write_bytes(npy.read_bytes()[:-1000])
    with pytest.raises(InputError, match=r"img_emb_0.npy is truncated: expected 100 rows of 768 float16"):
        run(tmp_path / "l", tmp_path / "out")


def test_portable_weights_are_never_unpickled(tmp_path):
    evil = tmp_path / "evil.npz"
    np.savez(evil, format=np.array("clip-nsfw-spark/portable-weights/v1"), header=np.array([{"x": 1}], dtype=object))
    with pytest.raises(ModelError, match="not a portable weights file.*allow_pickle"):
        PortableWeights.load(evil)


# ---------------------------------------------------------------------------------------------- faults


def _cli(args, fault=None, **kwargs):
    """The job's command line; with ``fault``, through tests/faults.py (the same command, plus --fault)."""
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable)
    command = [sys.executable, str(ROOT / "tests" / "faults.py"), "--fault", fault] if fault else \
        [sys.executable, "-m", "clip_nsfw_spark.cli", "run"]
    return subprocess.Popen([*command, *args], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)


@needs_models
@pytest.mark.parametrize("point", ["write", "commit"])
def test_killed_python_worker_is_retried_without_duplicates_or_partial_files(tmp_path, point):
    source = tmp_path / "in"
    write_parquet_sample(str(source), rows=1200, files=3, row_group_rows=100)
    run(source, tmp_path / "clean", mode="split", threshold=0.01, batch_rows=100)
    # write: killed in the middle of the task's files (after 8 writes: well into the first batches);
    # commit: killed after 2 of its 3 files (safe, unsafe, rejected) got their final names.
    after = 8 if point == "write" else 2
    fault = f"point={point},match=part-00001,after={after},action=kill,once={tmp_path / 'fired'}"
    process = _cli(["--input", str(source), "--output", str(tmp_path / "faulty"), "--mode", "split",
                    "--threshold", "0.01", "--batch-rows", "100", "--master", "local[2,3]"], fault)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    assert (tmp_path / "fired").exists()  # the worker really was killed once
    assert_same_outputs(tmp_path / "clean", tmp_path / "faulty")
    report = json.loads((tmp_path / "faulty" / REPORT_NAME).read_text())
    assert report["rows"]["read"] == 1200


@needs_models
def test_job_killed_midway_then_resumed_equals_a_clean_run(tmp_path):
    source = tmp_path / "in"
    write_parquet_sample(str(source), rows=2000, files=8)
    run(source, tmp_path / "clean")
    process = _cli(["--input", str(source), "--output", str(tmp_path / "out"), "--master", "local[1]",
                    "--batch-rows", "50"], "point=write,after=1,action=sleep,seconds=0.01",
                   start_new_session=True)
    state = tmp_path / "out" / "_clip_nsfw_tasks"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(state.glob("[0-9a-f]*.json"))) < 2:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # the whole job: driver, JVM and workers
    process.wait(timeout=60)
    done = len(list(state.glob("[0-9a-f]*.json")))
    assert 2 <= done < 8, done
    assert not (tmp_path / "out" / SUCCESS_NAME).exists()
    refused = _cli(["--input", str(source), "--output", str(tmp_path / "out"), "--local-runner"])
    assert refused.wait(timeout=300) == 2 and "--resume" in refused.stderr.read()
    resumed = _cli(["--input", str(source), "--output", str(tmp_path / "out"), "--resume", "--master", "local[2]"])
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert f"({done} resumed)" in out
    assert_same_outputs(tmp_path / "clean", tmp_path / "out")


@needs_models
def test_spark_jvm_killed_midway_is_one_line_naming_the_jvm_then_resume_completes(tmp_path):
    """The OOM killer (here kill -9) takes the driver's JVM mid-run: the command ends with exit 2 and one line
    saying Spark's JVM stopped answering (hostile review 18 saw "the Spark job failed: ConnectionRefusedError"
    after py4j's tracebacks); --resume then finishes with the output of a clean run."""
    source = tmp_path / "in"
    write_parquet_sample(str(source), rows=2000, files=8)
    run(source, tmp_path / "clean")
    # ~1 s of injected sleep per task (25 batches × 0.04 s): the kill lands seconds before the last task ends
    process = _cli(["--input", str(source), "--output", str(tmp_path / "out"), "--master", "local[1]",
                    "--batch-rows", "10"], "point=write,after=1,action=sleep,seconds=0.04")
    state = tmp_path / "out" / "_clip_nsfw_tasks"
    deadline = time.time() + 300
    while time.time() < deadline and not list(state.glob("[0-9a-f]*.json")):
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.2)
    children = subprocess.run(["pgrep", "-P", str(process.pid), "java"], capture_output=True, text=True).stdout.split()
    assert len(children) == 1, children
    os.kill(int(children[0]), signal.SIGKILL)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 2, err[-3000:]
    assert "Spark's JVM stopped answering" in err and "rerun with --resume" in err, err[-3000:]
    assert not (tmp_path / "out" / SUCCESS_NAME).exists()
    resumed = _cli(["--input", str(source), "--output", str(tmp_path / "out"), "--resume", "--master", "local[2]"])
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert_same_outputs(tmp_path / "clean", tmp_path / "out")


# -------------------------------------------------------------------------------------------- security


def test_embedded_local_spark_listens_on_loopback_only(spark):
    pid = spark._jvm.java.lang.ProcessHandle.current().pid()
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A = LISTEN
                listening.append(fields[1].split(":")[0])
    assert listening, "the JVM should listen somewhere (block manager, driver RPC, UI)"
    loopback = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}
    assert set(listening) <= loopback, listening


def test_resume_refuses_a_folder_it_did_not_write(tmp_path):
    write_parquet_sample(str(tmp_path / "in"), rows=10, files=1)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.csv").write_text("someone else's data")
    from clip_nsfw_spark.errors import OutputError

    with pytest.raises(OutputError, match="not empty and was not written by clip-nsfw-spark"):
        run(tmp_path / "in", tmp_path / "out", resume=True)
    assert (tmp_path / "out" / "precious.csv").read_text() == "someone else's data"
