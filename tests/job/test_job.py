"""The scoring job end to end: real local Spark, real models, real parquet files on disk."""

import dataclasses
import hashlib
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_nsfw_spark.driver.config import JobConfig
from clip_nsfw_spark.errors import ConfigError, DimensionError, InputError, OutputError
from clip_nsfw_spark.driver.job import run_job
from clip_nsfw_spark.executor.writer import REPORT_NAME, SUCCESS_NAME
from clip_nsfw_spark.tools.sample import embedding_array, embeddings, metadata, write_laion_sample, write_parquet_sample
from clip_nsfw_spark.scoring.weights import PortableWeights
from conftest import ROOT, needs_models


@pytest.fixture
def spark_runner(spark):
    from clip_nsfw_spark.spark.runner import spark_runner as make

    return make(spark)


def run(input, output, runner=None, **options):
    return run_job(JobConfig(input=str(input), output=str(output), **options), runner=runner)


def read_dir(path):
    return pq.read_table(str(path), partitioning=None)


@needs_models
def test_annotate_parquet_spark_equals_local_and_scorer(tmp_path, spark_runner, scorers):
    source = tmp_path / "in"
    write_parquet_sample(str(source), rows=3000, files=3, row_group_rows=400)
    report = run(source, tmp_path / "spark", spark_runner, rows_per_task=400)
    run(source, tmp_path / "local", rows_per_task=400)
    for name in sorted(os.listdir(source)):  # 1000-row files, 400-row groups: three slices each
        sizes = [pq.read_metadata(tmp_path / "spark" / name.replace(".parquet", f".slice-{i:05d}.parquet")).num_rows
                 for i in range(3)]
        assert sizes == [400, 400, 200]
    spark_out, local_out = read_dir(tmp_path / "spark"), read_dir(tmp_path / "local")
    assert spark_out.equals(local_out)
    original = read_dir(source)
    assert spark_out.drop_columns(["punsafe", "nsfw_reject_reason"]).equals(original)
    x = np.stack(original.column("embedding").to_numpy(zero_copy_only=False))
    expected = scorers["vit-l-14"](x)
    assert np.max(np.abs(spark_out.column("punsafe").to_numpy() - expected)) <= 1e-6
    assert spark_out.schema.field("punsafe").type == pa.float32()
    assert report["rows"]["read"] == 3000 and report["rows"]["written"] == {"annotated": 3000}
    assert report["input"]["tasks"] == 9 and sum(report["score_histogram"]["counts"]) == 3000
    assert (tmp_path / "spark" / SUCCESS_NAME).exists()
    files = sorted(p.name for p in (tmp_path / "spark").iterdir())
    assert {"_SUCCESS", "_clip_nsfw_report.json", "_clip_nsfw_files"} <= set(files) and "_clip_nsfw_tmp" not in files


@needs_models
def test_list_float32_several_columns_and_metadata_preserved(tmp_path, scorers):
    n = 500
    l14, b32 = embeddings(n, 768, 1, np.float32), embeddings(n, 512, 2, np.float32)
    table = pa.table(metadata(n, 0) | {"img": embedding_array(l14, fixed=False), "other": embedding_array(b32, False)})
    table = table.replace_schema_metadata({b"owner": b"data-team"})
    (tmp_path / "in").mkdir()
    pq.write_table(table, tmp_path / "in" / "a.parquet")
    with pytest.raises(InputError, match="several list-of-float columns in .*img, other"):
        run(tmp_path / "in", tmp_path / "out0")
    run(tmp_path / "in", tmp_path / "out", embedding_columns=("img",))
    out = pq.read_table(tmp_path / "out" / "a.parquet")
    assert out.schema.metadata[b"owner"] == b"data-team"
    assert out.column_names == ["key", "url", "caption", "img", "other", "punsafe", "nsfw_reject_reason"]
    assert np.max(np.abs(out.column("punsafe").to_numpy() - scorers["vit-l-14"](l14))) <= 1e-6
    with pytest.raises(DimensionError, match=r"'other' holds 512-d .* expects 768-d.*--model vit-b-32"):
        run(tmp_path / "in", tmp_path / "out2", embedding_columns=("other",))


def _bad_rows_table():
    good = embeddings(6, 768, 3, np.float32)
    nan_row = good[0].copy()
    nan_row[5] = np.nan
    rows = [good[0].tolist(), None, good[1][:500].tolist(), nan_row.tolist(), good[2].tolist(), good[3].tolist()]
    return pa.table(metadata(6, 0) | {"embedding": pa.array(rows, pa.list_(pa.float32()))}), good


@needs_models
def test_rows_that_cannot_be_scored_are_never_dropped(tmp_path, spark_runner):
    table, _ = _bad_rows_table()
    (tmp_path / "in").mkdir()
    pq.write_table(table, tmp_path / "in" / "x.parquet")
    report = run(tmp_path / "in", tmp_path / "ann", spark_runner)
    out = pq.read_table(tmp_path / "ann" / "x.parquet")
    assert out.num_rows == 6
    assert out.column("punsafe").null_count == 3
    assert out.column("nsfw_reject_reason").to_pylist() == [
        None, "null embedding", "wrong length: expected 768, found 500", "NaN or Inf in embedding", None, None]
    assert report["rows"]["rejected_by_reason"] == {"null embedding": 1, "wrong length": 1, "NaN or Inf in embedding": 1}

    run(tmp_path / "in", tmp_path / "filt", spark_runner, mode="filter")
    kept = pq.read_table(tmp_path / "filt" / "x.parquet")
    rejected = pq.read_table(tmp_path / "filt" / "_rejected" / "x.parquet")
    assert kept.num_rows + rejected.num_rows == 6 and rejected.num_rows == 3
    assert rejected.column("key").to_pylist() == ["000000001", "000000002", "000000003"]


@needs_models
def test_filter_and_split_agree_with_annotate(tmp_path, spark_runner):
    source = tmp_path / "in"
    write_parquet_sample(str(source), rows=4000, files=2)
    run(source, tmp_path / "ann", spark_runner)
    annotated = read_dir(tmp_path / "ann")
    scores = annotated.column("punsafe").to_numpy()
    threshold = float(np.quantile(scores, 0.9))  # a cut that puts ~10% on the unsafe side
    run(source, tmp_path / "safe", spark_runner, mode="filter", threshold=threshold)
    run(source, tmp_path / "unsafe", spark_runner, mode="filter", threshold=threshold, keep="unsafe")
    report = run(source, tmp_path / "split", spark_runner, mode="split", threshold=threshold)
    safe, unsafe = read_dir(tmp_path / "safe"), read_dir(tmp_path / "unsafe")
    assert safe.num_rows == int((scores < threshold).sum()) and unsafe.num_rows == int((scores >= threshold).sum())
    assert np.all(safe.column("punsafe").to_numpy() < threshold)
    assert np.all(unsafe.column("punsafe").to_numpy() >= threshold)
    assert read_dir(tmp_path / "split" / "safe").equals(safe)
    assert read_dir(tmp_path / "split" / "unsafe").equals(unsafe)
    assert report["rows"]["unsafe"] == unsafe.num_rows and report["rows"]["safe"] == safe.num_rows
    assert "nsfw_reject_reason" not in safe.column_names


@needs_models
def test_hive_partitions_keep_their_folders(tmp_path, spark_runner):
    source = tmp_path / "in"
    for year in (2021, 2022):
        write_parquet_sample(str(source / f"year={year}"), rows=300, files=2, seed=year)
    run(source, tmp_path / "out", spark_runner)
    produced = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.parquet")
                      if not p.relative_to(tmp_path / "out").parts[0].startswith("_"))
    assert produced == ["year=2021/part-00000.parquet", "year=2021/part-00001.parquet",
                        "year=2022/part-00000.parquet", "year=2022/part-00001.parquet"]
    assert pq.read_table(str(tmp_path / "out")).column("year").to_pylist().count(2021) == 300


@needs_models
def test_laion_npy_layout(tmp_path, spark_runner, scorers):
    source = tmp_path / "laion"
    write_laion_sample(str(source), rows=2500, files=2)
    report = run(source, tmp_path / "out", spark_runner, rows_per_task=700)
    assert report["input"]["layout"] == "laion-npy" and report["rows"]["read"] == 2500
    for index in range(2):
        x = np.load(source / "img_emb" / f"img_emb_{index}.npy")
        meta = pq.read_table(source / "metadata" / f"metadata_{index}.parquet")
        parts = sorted((tmp_path / "out").glob(f"metadata_{index}.slice-*.parquet"))
        out = pa.concat_tables([pq.read_table(p) for p in parts])
        assert out.drop_columns(["punsafe", "nsfw_reject_reason"]).equals(meta)
        assert np.max(np.abs(out.column("punsafe").to_numpy() - scorers["vit-l-14"](x))) <= 1e-6
    os.remove(source / "metadata" / "metadata_1.parquet")
    with pytest.raises(InputError, match="img_emb_1.npy has no partner file number 1 in metadata/"):
        run(source, tmp_path / "out2")


@needs_models
def test_reruns_refuse_overwrite_and_resume_equals_clean_run(tmp_path, spark_runner):
    source = tmp_path / "in"
    write_parquet_sample(str(source), rows=2000, files=4)
    clean = run(source, tmp_path / "clean", spark_runner)
    with pytest.raises(OutputError, match="not empty. Use --overwrite .* --resume"):
        run(source, tmp_path / "clean")
    with pytest.raises(OutputError, match="inside the input"):
        run(source, source / "out")
    # An interrupted run: two tasks never finished (no state file, one left a stray temp file).
    out = tmp_path / "partial"
    run(source, out)
    states = sorted((out / "_clip_nsfw_tasks").glob("[0-9a-f]*.json"))
    for state in states[:2]:
        rel = json.loads(state.read_text())["rel"]
        (out / rel).unlink()
        state.unlink()
    (out / SUCCESS_NAME).unlink()
    (out / "_clip_nsfw_tmp" / "dead").mkdir(parents=True)
    resumed = run(source, out, spark_runner, resume=True)
    assert resumed["tasks_resumed"] == 2
    assert read_dir(out).equals(read_dir(tmp_path / "clean"))
    assert resumed["rows"] == clean["rows"]
    assert not (out / "_clip_nsfw_tmp").exists() and (out / SUCCESS_NAME).exists()
    with pytest.raises(OutputError, match="threshold: 0.5 then, 0.2 now"):
        run(source, out, resume=True, threshold=0.2)
    with pytest.raises(OutputError, match="histogram_bins: 20 then, 7 now"):  # the report sums histograms
        run(source, out, resume=True, histogram_bins=7)
    assert (out / SUCCESS_NAME).exists()  # a refused resume leaves the complete output as it was
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["model"]["sha256"].startswith("905520bb")


def test_config_errors_are_clear(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("input: a\noutput: b\ntreshold: 0.3\n")
    with pytest.raises(ConfigError, match="unknown key.*'treshold' \\(did you mean 'threshold'\\?\\)"):
        JobConfig.load(str(config))
    with pytest.raises(ConfigError, match="threshold must be a number in \\[0, 1\\]"):
        JobConfig(input="a", output="b", threshold=1.5)
    with pytest.raises(ConfigError, match="mode must be one of annotate, filter, split"):
        JobConfig(input="a", output="b", mode="drop")
    secret = JobConfig(input="s3://b/x", output="s3://b/y", storage_options={"secret": "S3CR3T", "key": "AKIA"})
    assert "S3CR3T" not in json.dumps(secret.redacted()) and "AKIA" not in json.dumps(secret.redacted())


@needs_models
def test_cli_run_and_spark_submit_entry_point(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = ROOT
    source = tmp_path / "in"
    write_parquet_sample(str(source), rows=1000, files=2)
    conf = root / "conf" / "score_embeddings.yaml"
    result = subprocess.run([sys.executable, "-m", "clip_nsfw_spark.cli", "run", "--config", str(conf),
                             "--input", str(source), "--output", str(tmp_path / "cli"), "--master", "local[2]",
                             "--mode", "split", "--threshold", "0.1"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "split done" in result.stdout and "read 1,000" in result.stdout
    spark_submit = Path(sys.executable).parent / "spark-submit"
    result = subprocess.run([str(spark_submit), "--master", "local[2]", str(root / "jobs" / "score_embeddings.py"),
                             "--config", str(conf), "--input", str(source), "--output", str(tmp_path / "submit"),
                             "--mode", "split", "--threshold", "0.1"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_dir(tmp_path / "submit" / "safe").equals(read_dir(tmp_path / "cli" / "safe"))
    bad = subprocess.run([sys.executable, "-m", "clip_nsfw_spark.cli", "run", "--input", str(tmp_path / "nope"),
                          "--output", str(tmp_path / "o"), "--local-runner"], capture_output=True, text=True)
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr


@needs_models
def test_spark_starts_only_when_there_is_work_for_it(tmp_path):
    """A resume of a finished output runs no task: the command line starts no Spark for it (a master URL
    Spark cannot parse proves it: starting a session with it fails). With a task to run, Spark is started
    and its failure to start is one clear line; the output stays resumable."""
    import subprocess
    import sys

    source, out = tmp_path / "in", tmp_path / "out"
    write_parquet_sample(str(source), rows=300, files=3)
    run_job(JobConfig(input=str(source), output=str(out)))
    cli = [sys.executable, "-m", "clip_nsfw_spark.cli", "run", "--input", str(source), "--output", str(out),
           "--resume", "--master", "no-such-master://x"]
    done = subprocess.run(cli, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "3 resumed" in done.stdout and (out / SUCCESS_NAME).exists()
    assert "(nothing left to score)" in done.stdout  # not the earlier run's rows over a task phase of no tasks
    assert json.loads((out / REPORT_NAME).read_text())["throughput_rows_per_second"] is None
    states = sorted((out / "_clip_nsfw_tasks").glob("[0-9a-f]*.json"))
    states[0].unlink()  # one task to run again: now Spark is needed
    failed = subprocess.run(cli, capture_output=True, text=True, timeout=600)
    assert failed.returncode == 2 and "Spark did not start (master 'no-such-master://x')" in failed.stderr \
        and "rerun with --resume" in failed.stderr and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    again = run_job(JobConfig(input=str(source), output=str(out), resume=True))
    assert again["tasks_resumed"] == 2 and again["rows"]["read"] == 300
    # A new run starts Spark first: a master it cannot start with is refused before the output is touched.
    fresh = subprocess.run(cli[:cli.index("--output") + 1] + [str(tmp_path / "new"), "--master", "no-such-master://x"],
                           capture_output=True, text=True, timeout=600)
    assert fresh.returncode == 2 and "nothing was written: run again" in fresh.stderr, fresh.stderr[-3000:]
    assert not (tmp_path / "new").exists()
    # This run's 100 rows over its task phase (the report rounds seconds to the millisecond).
    assert 100 / again["throughput_rows_per_second"] == pytest.approx(again["durations_seconds"]["run"], abs=0.001)


def test_schema_that_differs_between_files_is_named(tmp_path):
    source = tmp_path / "in"
    write_parquet_sample(str(source), rows=200, files=2)
    other = pq.read_table(source / "part-00001.parquet").drop_columns(["caption"])
    pq.write_table(other, source / "part-00001.parquet")
    with pytest.raises(InputError, match=r"schema of .*part-00001.parquet differs from .*part-00000.parquet "
                                         r"\(caption: string vs missing\)"):
        run(source, tmp_path / "out")


@needs_models
def test_executors_never_import_tensorflow(tmp_path, spark, spark_runner, prepared_models):
    # A model no other test uses: vit-l-14's weights saved with this test's own metadata. Its sha256 (the key
    # of the executors' scorer cache) is new, so a cached scorer can only come from the run below.
    weights = PortableWeights.load(prepared_models["vit-l-14"].portable)
    own = tmp_path / "own.nsfw.npz"
    dataclasses.replace(weights, metadata=weights.metadata | {"test": str(tmp_path)}).save(own)
    sha256 = hashlib.sha256(own.read_bytes()).hexdigest()

    def modules(parts):
        import sys

        from clip_nsfw_spark.scoring import scorer

        for _ in parts:
            heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras"))
            yield json.dumps({"heavy": ",".join(heavy), "scorers": ",".join(scorer._SCORERS)}).encode()

    def probe():  # the way the job's tasks run (map_parts), so in the Python workers that ran them
        from types import SimpleNamespace

        from clip_nsfw_spark.spark.runner import map_parts

        return [SimpleNamespace(**json.loads(data)) for data in map_parts(spark, [[0], [1]], modules)]

    assert not any(sha256 in r.scorers.split(",") for r in probe())
    source = tmp_path / "in"
    write_parquet_sample(str(source), rows=400, files=2)
    run(source, tmp_path / "out", spark_runner, model=str(own))
    rows = probe()
    assert [r.heavy for r in rows] == ["", ""]
    assert any(sha256 in r.scorers.split(",") for r in rows)  # the workers that ran tasks kept this scorer


@needs_models
def test_glob_input_and_large_list_float64(tmp_path, scorers):
    x = embeddings(300, 768, 8, np.float64)
    offsets = pa.array(np.arange(0, x.size + 1, 768, dtype=np.int64))
    column = pa.LargeListArray.from_arrays(offsets, pa.array(x.reshape(-1)))
    (tmp_path / "in").mkdir()
    for name, part in (("a.parquet", slice(0, 100)), ("b.parquet", slice(100, 300)), ("skip.txt", None)):
        if part is None:
            (tmp_path / "in" / name).write_text("not data")
            continue
        pq.write_table(pa.table(metadata(300, 0) | {"emb": column}).slice(part.start, part.stop - part.start),
                       tmp_path / "in" / name)
    report = run(str(tmp_path / "in" / "*.parquet"), tmp_path / "out")
    assert report["input"]["tasks"] == 2 and report["rows"]["read"] == 300
    out = pa.concat_tables([pq.read_table(tmp_path / "out" / n) for n in ("a.parquet", "b.parquet")])
    assert out.schema.field("emb").type == pa.large_list(pa.float64())
    assert np.max(np.abs(out.column("punsafe").to_numpy() - scorers["vit-l-14"](x))) <= 1e-6


@needs_models
def test_laion_embeddings_are_written_only_if_asked(tmp_path):
    write_laion_sample(str(tmp_path / "l"), rows=200, files=1)
    run(tmp_path / "l", tmp_path / "plain")
    run(tmp_path / "l", tmp_path / "with", write_embeddings=True)
    plain = pq.read_table(tmp_path / "plain" / "metadata_0.parquet")
    with_embeddings = pq.read_table(tmp_path / "with" / "metadata_0.parquet")
    assert "embedding" not in plain.column_names
    assert with_embeddings.schema.field("embedding").type == pa.list_(pa.float16(), 768)
    stored = np.stack(with_embeddings.column("embedding").to_numpy(zero_copy_only=False))
    assert np.array_equal(stored, np.load(tmp_path / "l" / "img_emb" / "img_emb_0.npy"))
    assert with_embeddings.column("punsafe").equals(plain.column("punsafe"))


@needs_models
def test_parquet_codec_pyarrow_turns_the_own_page_codec_off_with_the_same_values(tmp_path, monkeypatch):
    """The way out of a codec problem: with parquet_codec pyarrow no page is decoded or written by this
    package, and every output holds the same values as with the own codec."""
    source = tmp_path / "in"
    write_parquet_sample(str(source), rows=3000, files=2, dim=768)
    own = run(source, tmp_path / "own")
    from clip_nsfw_spark.executor import reader, writer

    def refuse(*args, **kwargs):
        raise AssertionError("the own parquet codec was used")

    monkeypatch.setattr(reader, "read_float_list_column", refuse)
    monkeypatch.setattr(reader, "open_float_list_stream", refuse)
    monkeypatch.setattr(writer, "SplicedParquetWriter", refuse)
    with pytest.raises(Exception, match="the own parquet codec was used"):
        run(source, tmp_path / "refused")
    other = run(source, tmp_path / "pyarrow", parquet_codec="pyarrow")
    assert other["rows"] == own["rows"]
    assert read_dir(tmp_path / "pyarrow").equals(read_dir(tmp_path / "own"))


@needs_models
def test_float16_embeddings_kept_as_float32_for_spark_readers(tmp_path, spark, caplog):
    """Spark (3.5 to 4.x) cannot read FLOAT16 parquet: a run keeping float16 embeddings says so, and
    embedding_type float32 writes them widened (exactly: float32 holds every float16), which Spark reads."""
    source = tmp_path / "in"
    write_parquet_sample(str(source), rows=600, files=2, dim=768)  # fixed_size_list<halffloat>[768]
    with caplog.at_level("WARNING", logger="clip_nsfw_spark.driver.job"):
        kept = run(source, tmp_path / "half")
    assert "keep embedding as float16 parquet, which Spark (3.5 to 4.x) cannot read" in caplog.text
    assert "--embedding-type float32" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="clip_nsfw_spark.driver.job"):
        wide = run(source, tmp_path / "wide", mode="filter", embedding_type="float32")
    assert "float16 parquet" not in caplog.text
    original = read_dir(source)
    widened = read_dir(tmp_path / "wide")
    assert widened.schema.field("embedding").type == pa.list_(pa.float32(), 768)
    half = read_dir(tmp_path / "half")
    safe = half.filter(pa.compute.less(half.column("punsafe"), 0.5))
    assert widened.num_rows == safe.num_rows == wide["rows"]["written"]["kept"]
    assert np.array_equal(np.stack(widened.column("embedding").to_numpy(zero_copy_only=False)),
                          np.stack(safe.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32))
    assert widened.column("punsafe").equals(safe.column("punsafe"))  # scores come from the float16 values
    assert kept["rows"]["read"] == 600 and original.num_rows == 600
    rows = spark.read.parquet(str(tmp_path / "wide")).orderBy("key").collect()
    by_key = {k: i for i, k in enumerate(widened.column("key").to_pylist())}
    assert len(rows) == widened.num_rows
    stored = np.stack(widened.column("embedding").to_numpy(zero_copy_only=False))
    for row in rows[:50]:
        assert np.array_equal(np.array(row["embedding"], np.float32), stored[by_key[row["key"]]])
    # and a resume keeps to the type the output was written with
    with pytest.raises(OutputError, match="embedding_type"):
        run(source, tmp_path / "wide", mode="filter", resume=True)


@needs_models
def test_laion_embeddings_are_written_as_the_npy_holds_them(tmp_path, caplog):
    """write_embeddings writes the npy values in the npy's own type (float32, float64; the widest when files
    differ: exact for all), never narrowed to float16: a hostile user found a float32 npy written as float16,
    70000 as inf beside a valid score, and the scores (from the float32 values) not those of the written rows."""
    import json

    root = tmp_path / "l"
    write_laion_sample(str(root), rows=300, files=2)
    values = np.random.default_rng(5).normal(size=(150, 768)).astype(np.float32)
    values /= np.linalg.norm(values, axis=1, keepdims=True)
    values[0, 0] = 70000  # beyond float16
    np.save(root / "img_emb" / "img_emb_0.npy", values)
    halves = np.load(root / "img_emb" / "img_emb_1.npy")
    assert halves.dtype == np.float16
    with caplog.at_level("WARNING", logger="clip_nsfw_spark.driver.job"):
        report = run(root, tmp_path / "as-read", write_embeddings=True)
    assert "write_embeddings: false" not in caplog.text  # no float16 column written: nothing Spark cannot read
    written = {n: pq.read_table(tmp_path / "as-read" / f"metadata_{n}.parquet") for n in (0, 1)}
    for table in written.values():
        assert table.schema.field("embedding").type == pa.list_(pa.float32(), 768)
    assert np.array_equal(np.stack(written[0].column("embedding").to_numpy(zero_copy_only=False)), values)
    assert np.array_equal(np.stack(written[1].column("embedding").to_numpy(zero_copy_only=False)),
                          halves.astype(np.float32))  # the float16 file widened exactly to the common type
    assert report["rows"]["read"] == 300
    run(root, tmp_path / "wide", write_embeddings=True, embedding_type="float32")  # the same: nothing to widen
    assert pq.read_table(tmp_path / "wide").equals(pq.read_table(tmp_path / "as-read"))
    as_written = os.stat(root / "img_emb" / "img_emb_0.npy")
    np.save(root / "img_emb" / "img_emb_0.npy", values.astype(np.float64))
    run(root, tmp_path / "double", write_embeddings=True, embedding_type="float32")
    double = pq.read_table(tmp_path / "double" / "metadata_0.parquet")
    assert double.schema.field("embedding").type == pa.list_(pa.float64(), 768)
    assert np.array_equal(np.stack(double.column("embedding").to_numpy(zero_copy_only=False)), values)
    # an unfinished output of an older version wrote these as float16: a resume would mix the two types
    state = tmp_path / "double" / "_clip_nsfw_tasks" / "_job.json"
    job = json.loads(state.read_text())
    del job["npy_value_type"]
    state.write_text(json.dumps(job))
    (tmp_path / "double" / "_SUCCESS").unlink()
    with pytest.raises(Exception, match="npy_value_type: 'float16' then, 'float64' now"):
        run(root, tmp_path / "double", write_embeddings=True, embedding_type="float32", resume=True)
    # … but one that wrote float32 (embedding_type float32 widened its float16 rows) resumes: the same output
    np.save(root / "img_emb" / "img_emb_0.npy", values)  # as it was (its identity too)
    os.utime(root / "img_emb" / "img_emb_0.npy", ns=(as_written.st_atime_ns, as_written.st_mtime_ns))
    state = tmp_path / "wide" / "_clip_nsfw_tasks" / "_job.json"
    job = json.loads(state.read_text())
    assert job["npy_value_type"] == "float32" and job["embedding_type"] == "input"  # nothing widened now
    del job["npy_value_type"]
    job["embedding_type"] = "float32"  # as that version recorded it
    state.write_text(json.dumps(job))
    (tmp_path / "wide" / "_SUCCESS").unlink()
    (tmp_path / "wide" / "metadata_1.parquet").unlink()
    report = run(root, tmp_path / "wide", write_embeddings=True, embedding_type="float32", resume=True)
    assert report["tasks_resumed"] == 1 and pq.read_table(tmp_path / "wide").equals(pq.read_table(tmp_path / "as-read"))
    # asking for float32 where nothing is float16 changes no output: a resume without it is the same job
    run(root, tmp_path / "plain", embedding_type="float32")
    run(root, tmp_path / "plain", resume=True)


@needs_models
@pytest.mark.parametrize("resume", [False, True])
def test_the_driver_turns_each_url_into_a_filesystem_once_per_run(tmp_path, monkeypatch, resume):
    """storage.open_run_stores opens the input and the output once; validation, planning, the fingerprint
    and the state all use those (executors open their own)."""
    import collections

    import clip_nsfw_spark.storage.filesystem as storage
    from clip_nsfw_spark.driver import job, output, planner

    write_parquet_sample(str(tmp_path / "in"), rows=200, files=4)
    config = JobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    if resume:
        run_job(config)
        config = dataclasses.replace(config, resume=True)
    opened, real = collections.Counter(), storage.filesystem

    def counting(url, storage_options=None):
        opened[url] += 1
        return real(url, storage_options)

    for module in (storage, job, planner, output):
        if hasattr(module, "filesystem"):
            monkeypatch.setattr(module, "filesystem", counting)
    run_job(config)
    assert opened == {str(tmp_path / "in"): 1, str(tmp_path / "out"): 1}


def _data_files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.parquet"))
            if not any(part.startswith("_") for part in p.relative_to(root).parts)}


@needs_models
@pytest.mark.parametrize("mode", ["annotate", "split"])
def test_overlapped_stages_write_the_same_bytes_as_stages_in_turn(tmp_path, spark_runner, mode):
    """Read-ahead and write-behind threads (overlap: on) change when a batch is read, scored and written,
    never what is written: every output file is byte-identical to one written with the stages in turn,
    on Spark and in process, with batches much smaller than row groups (many batches in flight)."""
    source = tmp_path / "in"
    write_parquet_sample(str(source), rows=5000, files=2, row_group_rows=700)
    runs = {(overlap, where): run(source, tmp_path / f"{overlap}-{where}", spark_runner if where == "spark" else None,
                                  mode=mode, overlap=overlap, batch_rows=333)
            for overlap in ("on", "off") for where in ("spark", "local")}
    first = _data_files(tmp_path / "off-local")
    assert len(first) == (2 if mode == "annotate" else 4)
    for overlap, where in runs:
        assert _data_files(tmp_path / f"{overlap}-{where}") == first, (overlap, where)
        assert runs[overlap, where]["rows"] == runs["off", "local"]["rows"]


def test_overlap_auto_is_on_where_tasks_would_wait_for_storage_or_leave_cores_idle(tmp_path):
    from clip_nsfw_spark.driver.job import overlap_wanted
    from clip_nsfw_spark.storage.filesystem import open_run_stores

    local = open_run_stores(str(tmp_path / "in"), str(tmp_path / "out"))
    import fsspec

    remote_input = dataclasses.replace(local, in_fs=fsspec.filesystem("memory"))  # any store but a local disk
    assert overlap_wanted(JobConfig(input="in", output="out"), remote_input, in_process=False)
    assert not overlap_wanted(JobConfig(input="in", output="out"), local, in_process=False)  # Spark, local disk
    assert overlap_wanted(JobConfig(input="in", output="out"), local, in_process=True)  # one task at a time here
    assert overlap_wanted(JobConfig(input="in", output="out", overlap="on"), local, in_process=False)
    assert not overlap_wanted(JobConfig(input="in", output="out", overlap="off"), local, in_process=True)
    with pytest.raises(ConfigError, match="overlap"):
        JobConfig(input="in", output="out", overlap="sometimes")


@needs_models
def test_the_report_accounts_for_every_core_second_of_the_task_phase(tmp_path, spark_runner):
    """task_phase_core_seconds: cores × the phase's wall seconds = the CPU seconds of every stage + idle; on
    Spark the Python workers' own start and imports are counted (once per worker process)."""
    from clip_nsfw_spark.executor.stages import PROCESS_STAGES, TASK_STAGES
    from clip_nsfw_spark.spark.runner import _cpu_quota

    source = tmp_path / "in"
    write_parquet_sample(str(source), rows=4000, files=4)
    for runner, name in ((spark_runner, "spark"), (None, "local")):
        report = run(source, tmp_path / name, runner)
        account = report["task_phase_core_seconds"]
        assert account["cores"] == (spark_runner.cores if runner else len(os.sched_getaffinity(0)))
        assert account["wall_seconds"] == report["durations_seconds"]["run"]
        stages = account["by_stage"]
        assert list(stages)[:len(PROCESS_STAGES) + len(TASK_STAGES)] == \
            ["worker_start", "imports", "model", *TASK_STAGES, "transfer"]
        assert sum(stages.values()) == pytest.approx(account["core_seconds"], abs=0.01)
        assert stages["score"] > 0 and stages["decode"] > 0 and stages["encode"] > 0
        assert min(stages.values()) >= 0  # nothing counted twice: idle is what no stage used
        assert account["rows_per_core_second"] == pytest.approx(4000 / account["core_seconds"], rel=0.01)
        assert set(report["task_stage_seconds"]) >= set(TASK_STAGES)
        # idle by source: measured on Spark with a local master on every CPU of the machine (the test session
        # is local[2]: CI's machines have 2; tests/spark/test_runner.py checks when it is measured); never for
        # the in-process runner, whose driver is the worker
        whole_machine = runner and spark_runner.cores == os.cpu_count() == len(os.sched_getaffinity(0)) \
            and not _cpu_quota()
        assert ("idle_by_source" in account) == bool(whole_machine)
        if whole_machine:
            sources = account["idle_by_source"]
            assert list(sources) == ["machine_idle", "stolen", "driver", "jvm", "unmeasured", "other"]
            assert sum(sources.values()) == pytest.approx(stages["idle"], abs=0.01)
            assert sources["jvm"] > 0 and sources["driver"] > 0  # Spark scheduled the tasks; the driver waited
            # each a CPU counter's difference; other, the rest, is CPU too (to the counters' 10 ms ticks)
            assert min(sources.values()) >= -0.1
