"""Several heads in one pass through the job (issue #14): NSFW + violence on local Spark, per-head thresholds
and columns, any-head-unsafe routing, reasons kept, per-head report; the ViT-H/14 head's raw scores."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from clip_nsfw_spark import load_scorer
from clip_nsfw_spark.driver.config import JobConfig
from clip_nsfw_spark.models.registry import HeadSpec
from clip_nsfw_spark.errors import ConfigError, DimensionError
from clip_nsfw_spark.driver.job import run_job
from clip_nsfw_spark.tools.sample import embedding_array, embeddings, metadata, write_parquet_sample
from conftest import needs_models


def read_dir(path):
    return pq.read_table(str(path), partitioning=None)


@pytest.fixture
def spark_runner(spark):
    from clip_nsfw_spark.spark.runner import spark_runner as make

    return make(spark)


@pytest.fixture
def dataset(tmp_path):
    """2000 LAION-like rows in 2 files, with one null and one short embedding."""
    source = tmp_path / "in"
    write_parquet_sample(str(source), rows=2000, files=2, fixed=False)
    table = pq.read_table(source / "part-00001.parquet")
    rows = table.column("embedding").to_pylist()
    rows[3], rows[5] = None, rows[5][:100]
    bad = table.set_column(3, "embedding", pa.array(rows, pa.list_(pa.float16())))
    pq.write_table(bad, source / "part-00001.parquet")
    return source


@needs_models
def test_nsfw_and_violence_in_one_pass_on_spark(dataset, tmp_path, spark_runner):
    report = run_job(JobConfig(input=str(dataset), output=str(tmp_path / "ann"),
                               models=("vit-l-14", "violence-l-14")), runner=spark_runner)
    out = read_dir(tmp_path / "ann")
    assert out.column_names[-3:] == ["punsafe", "pviolence", "nsfw_reject_reason"]
    scorable = np.array([r is None for r in out.column("nsfw_reject_reason").to_pylist()])
    x = np.stack([np.asarray(v, np.float16) for v, ok in zip(out.column("embedding").to_pylist(), scorable) if ok])
    for column, model in (("punsafe", "vit-l-14"), ("pviolence", "violence-l-14")):
        scores = out.column(column).to_numpy(zero_copy_only=False)
        assert np.array_equal(scores[scorable], load_scorer(model)(x))  # same bits as the scorer alone
        assert np.isnan(scores[~scorable]).all()
    assert out.column("nsfw_reject_reason").to_pylist().count("null embedding") == 1
    heads = {h["name"]: h for h in report["heads"]}
    assert set(heads) == {"vit-l-14", "violence-l-14"} and heads["violence-l-14"]["threshold"] == 0.5
    violent = heads["violence-l-14"]["score_columns"]["pviolence"]
    assert violent["unsafe"] == int((out.column("pviolence").to_numpy(zero_copy_only=False) >= 0.5).sum())
    assert sum(violent["histogram"]) == 1998 and report["rows"]["rejected"] == 2
    assert report["model"]["name"] == "vit-l-14"


@needs_models
def test_filter_and_split_flag_a_row_when_any_head_is_at_or_over_its_threshold(dataset, tmp_path, spark_runner):
    run_job(JobConfig(input=str(dataset), output=str(tmp_path / "ann"), models=("vit-l-14", "violence-l-14")))
    annotated = read_dir(tmp_path / "ann")
    nsfw, violence = (annotated.column(c).to_numpy(zero_copy_only=False) for c in ("punsafe", "pviolence"))
    ok = ~np.isnan(nsfw)
    nsfw_cut = float(np.quantile(nsfw[ok], 0.9))
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "input": str(dataset), "output": str(tmp_path / "split"), "mode": "split",
        "models": ["vit-l-14", {"model": "violence-l-14", "threshold": 0.8, "score_column": "violent"}],
        "threshold": nsfw_cut}))
    report = run_job(JobConfig.load(str(config)), runner=spark_runner)
    unsafe_expected = ok & ((nsfw >= nsfw_cut) | (violence >= 0.8))
    safe, unsafe = read_dir(tmp_path / "split" / "safe"), read_dir(tmp_path / "split" / "unsafe")
    rejected = read_dir(tmp_path / "split" / "_rejected")
    assert unsafe.num_rows == int(unsafe_expected.sum()) and safe.num_rows == int((ok & ~unsafe_expected).sum())
    assert rejected.num_rows == 2 and sorted(rejected.column("nsfw_reject_reason").to_pylist()) == [
        "null embedding", "wrong length: expected 768, found 100"]
    assert np.all(safe.column("punsafe").to_numpy() < nsfw_cut) and np.all(safe.column("violent").to_numpy() < 0.8)
    both = (unsafe.column("punsafe").to_numpy() >= nsfw_cut) | (unsafe.column("violent").to_numpy() >= 0.8)
    assert both.all()
    assert {h["name"]: h["threshold"] for h in report["heads"]} == {"vit-l-14": nsfw_cut, "violence-l-14": 0.8}
    assert report["rows"]["unsafe"] == unsafe.num_rows

    run_job(JobConfig(input=str(dataset), output=str(tmp_path / "filter"), mode="filter", threshold=nsfw_cut,
                      models=(HeadSpec("vit-l-14"), HeadSpec("violence-l-14", "violent", 0.8))),
            runner=spark_runner)
    assert read_dir(tmp_path / "filter").equals(safe)


@needs_models
def test_heads_must_fit_the_width_and_not_share_a_column(dataset, tmp_path):
    with pytest.raises(DimensionError, match=r"'embedding' holds 768-d embeddings but model 'violence-b-32' "
                                             r"expects 512-d.*--model vit-l-14"):
        run_job(JobConfig(input=str(dataset), output=str(tmp_path / "o1"), models=("vit-l-14", "violence-b-32")))
    with pytest.raises(ConfigError, match="two columns named 'punsafe'"):
        run_job(JobConfig(input=str(dataset), output=str(tmp_path / "o2"), models=("vit-l-14", "vit-l-14")))
    with pytest.raises(ConfigError, match="either as model .* or as models"):
        JobConfig(input="i", output="o", model="vit-b-32", models=("violence-b-32",))
    with pytest.raises(ConfigError, match="must have 'model'"):
        JobConfig.from_mapping({"input": "i", "output": "o", "models": [{"name": "vit-l-14"}]})
    with pytest.raises(ConfigError, match="threshold of violence-l-14 in models must be a number; found the string .hi."):
        JobConfig.from_mapping({"input": "i", "output": "o", "models": [{"model": "violence-l-14", "threshold": "hi"}]})


@needs_models
def test_cli_repeats_model(dataset, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    result = subprocess.run([sys.executable, "-m", "clip_nsfw_spark.cli", "run", "--input", str(dataset),
                             "--output", str(tmp_path / "cli"), "--model", "vit-l-14", "--model", "violence-l-14",
                             "--local-runner"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "violence-l-14" in result.stdout and "pviolence ≥ 0.5 on" in result.stdout
    assert "pviolence" in read_dir(tmp_path / "cli").column_names


def test_a_raw_output_head_in_the_job(tmp_path):
    """A ViT-H/14-architecture state dict (random weights) as a user head: raw scores, not clipped."""
    torch = pytest.importorskip("torch", reason="!!! torch (the 'test' extra) writes the .pth here !!!")
    from helpers import h14_module

    torch.manual_seed(1)
    model = h14_module().eval()
    with torch.no_grad():
        model.layers[16].bias += 3.0  # raw outputs well above 1: a probability would be clipped or squashed
    path = tmp_path / "h14_like.pth"
    torch.save(model.state_dict(), path)
    x = embeddings(300, 1024, 5)
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table(metadata(300, 0) | {"embedding": embedding_array(x, True)}), tmp_path / "in" / "a.parquet")
    report = run_job(JobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=str(path),
                               mode="split", threshold=1.0))
    scores = load_scorer(path)(x)
    with torch.no_grad():
        reference = model(torch.from_numpy(x.astype(np.float32))).numpy()[:, 0]
    assert np.max(np.abs(scores - reference)) <= 1e-5 and scores.max() > 1.0
    unsafe = read_dir(tmp_path / "out" / "unsafe")
    assert unsafe.num_rows == int((scores >= 1.0).sum()) > 0
    column = report["heads"][0]["score_columns"]["punsafe"]
    assert column["above_1"] == int((scores > 1).sum()) and column["below_0"] == int((scores < 0).sum())
    assert sum(column["histogram"]) + column["above_1"] + column["below_0"] >= 300 - int((scores == 1).sum())


@needs_models
def test_dataframe_api_runs_the_violence_head(spark, tmp_path):
    from clip_nsfw_spark.spark.dataframe import nsfw_score

    x = embeddings(50, 768, 9, np.float32)
    frame = spark.createDataFrame([(i, [float(v) for v in row]) for i, row in enumerate(x)],
                                  "id long, embedding array<float>")
    found = [r.s for r in frame.select("id", nsfw_score("embedding", "violence-l-14").alias("s")).orderBy("id").collect()]
    assert np.array_equal(np.array(found, np.float32), load_scorer("violence-l-14")(x))
