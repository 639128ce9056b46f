"""evaluate: hand-computable metrics, reports and plots; train: a tiny run whose model the job uses."""

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_nsfw_spark.tools.evaluate import Labelled, evaluate, load_labelled, metrics_at, summarize, threshold_for
from clip_nsfw_spark.tools.sample import separable, write_labelled_sample
from conftest import needs_models

PNG = b"\x89PNG\r\n\x1a\n"


def test_metrics_match_hand_computed_values():
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    labels = np.array([0, 0, 1, 1])
    at_half = metrics_at(scores, labels, 0.5)  # only 0.8 is flagged: TP=1, FP=0, FN=1, TN=2
    assert at_half["confusion"] == {"tn": 2, "fp": 0, "fn": 1, "tp": 1}
    assert at_half["precision"] == 1.0 and at_half["recall"] == 0.5 and at_half["accuracy"] == 0.75
    assert at_half["f1"] == pytest.approx(2 / 3)
    at_035 = metrics_at(scores, labels, 0.35)  # score ≥ threshold is unsafe: 0.35, 0.4, 0.8 flagged
    assert at_035["confusion"] == {"tn": 1, "fp": 1, "fn": 0, "tp": 2}
    data = Labelled(scores, labels, np.array(["a", "a", "b", "b"], dtype=object))
    summary = summarize(scores, data, (0.5,), recall=1.0, precision=1.0)
    assert summary["roc_auc"] == pytest.approx(0.75)  # 3 of the 4 (neg, pos) pairs are ordered right
    assert summary["pr_auc"] == pytest.approx((1.0 * 0.5) + (2 / 3) * 0.5)
    assert summary["for_recall"]["threshold"] == pytest.approx(0.35)
    assert threshold_for(scores, labels, precision=1.0) == pytest.approx(0.8)
    assert summary["per_class"]["b"]["flagged"]["0.5"] == 0.5 and summary["per_class"]["a"]["flagged"]["0.5"] == 0.0


def write_class_folders(root: Path, rows: int, dim: int = 768, seed: int = 0) -> None:
    write_labelled_sample(str(root), rows, dim, seed)


# The second head of the two-model test: LAION's violence prompts, 768-d like vit-l-14 but another model.
VIOLENCE_FILE = Path(os.environ.get("CLIP_NSFW_CACHE", "")) / "violence_detection_vit_l_14.npy"
needs_violence = pytest.mark.skipif(
    not VIOLENCE_FILE.is_file(),
    reason="!!! LAION's violence_detection_vit_l_14.npy is missing from ../shared/models; CI must run this !!!")


@needs_models
@needs_violence
def test_evaluate_class_folders_with_compare_and_two_models(tmp_path):
    from sklearn.metrics import roc_auc_score

    from clip_nsfw_spark import load_scorer

    write_class_folders(tmp_path / "data", 400)
    models = ["vit-l-14", "violence-l-14"]
    report = evaluate(models, str(tmp_path / "data"), tmp_path / "out", thresholds=(0.1, 0.5),
                      compare=True, recall=0.9)
    assert report["rows"] == 400 and report["positives"] == 200
    assert list(report["models"]) == [f"{m}{suffix}" for m in models
                                      for suffix in ("", " (float16-quantised input)", " (as-is input)")]
    data = load_labelled(tmp_path / "data")
    saved = json.loads((tmp_path / "out" / "report.json").read_text())["models"]
    md = (tmp_path / "out" / "report.md").read_text()
    for model in models:  # each result is that model's own scores, under its own name
        expected = load_scorer(model)(data.embeddings)
        result = report["models"][model]
        assert set(result["per_class"]) == {"porn", "sexy", "neutral", "drawings"}
        assert result["per_class"]["porn"]["label"] == 1 and result["per_class"]["drawings"]["rows"] == 100
        for name, info in result["per_class"].items():
            assert info["mean_score"] == float(expected[data.classes == name].mean()), (model, name)
            assert info["flagged"]["0.5"] == float((expected[data.classes == name] >= 0.5).mean()), (model, name)
        assert result["roc_auc"] == float(roc_auc_score(data.labels, expected))
        assert len(result["sweep"]) == 19 and "for_recall" in result
        # The data is float16 already: quantising it again changes nothing.
        assert report["models"][f"{model} (float16-quantised input)"]["roc_auc"] == result["roc_auc"]
        assert saved[model]["roc_auc"] == result["roc_auc"]
        assert f"## {model}\n" in md
    nsfw, violence = report["models"]["vit-l-14"], report["models"]["violence-l-14"]
    assert nsfw["per_class"]["porn"]["mean_score"] != violence["per_class"]["porn"]["mean_score"]
    assert nsfw["roc_auc"] != violence["roc_auc"]
    for name in report["plots"].values():
        data_bytes = (tmp_path / "out" / name).read_bytes()
        assert data_bytes.startswith(PNG) and len(data_bytes) > 5000
    assert "![roc](roc.png)" in md and "| porn | 1 | 100 |" in md


def test_parquet_labels_as_strings_and_unknown_classes(tmp_path):
    x, labels = separable(40, 16, 1)
    names = np.where(labels == 1, "nsfw", "safe")
    table = pa.table({"emb": pa.array([r.tolist() for r in x.astype(np.float32)], pa.list_(pa.float32())),
                      "label": pa.array(names.tolist())})
    pq.write_table(table, tmp_path / "l.parquet")
    data = load_labelled(tmp_path / "l.parquet", {"nsfw": 1, "safe": 0})
    assert data.embeddings.shape == (40, 16) and data.labels.tolist() == labels.tolist()
    from clip_nsfw_spark.errors import InputError

    with pytest.raises(InputError, match="label 'safe' .* neither 0/1 nor a mapped class"):
        load_labelled(tmp_path / "l.parquet", {})


@pytest.mark.parametrize("method", ["mlp", "autokeras"])
def test_train_exports_a_model_the_job_and_evaluate_use(tmp_path, method):
    from clip_nsfw_spark import load_scorer
    from clip_nsfw_spark.driver.config import JobConfig
    from clip_nsfw_spark.driver.job import run_job
    from clip_nsfw_spark.tools.sample import embedding_array, metadata
    from clip_nsfw_spark.tools.train import train

    write_class_folders(tmp_path / "data", 1200, dim=64, seed=3)
    summary = train(str(tmp_path / "data"), tmp_path / "model", method=method, max_trials=1, epochs=8, seed=7)
    assert summary["numpy_vs_keras_max_abs_diff"] <= 1e-5
    assert summary["validation"]["roc_auc"] > 0.95, summary
    assert summary["rows"] == {"train": 960, "validation": 240}
    assert (tmp_path / "model" / "model.keras").exists() and (tmp_path / "model" / "validation" / "report.md").exists()

    scorer = load_scorer(tmp_path / "model")
    assert scorer.dim == 64
    x, labels = separable(300, 64, 11)
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table(metadata(300, 0) | {"embedding": embedding_array(x, True)}), tmp_path / "in" / "a.parquet")
    run_job(JobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "scored"), model=str(tmp_path / "model")))
    scored = pq.read_table(tmp_path / "scored" / "a.parquet").column("punsafe").to_numpy()
    assert np.array_equal(scored, scorer(x))
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(labels, scored) > 0.95
    again = evaluate([str(tmp_path / "model")], str(tmp_path / "data"), tmp_path / "eval")
    assert again["models"][str(tmp_path / "model")]["roc_auc"] > 0.95


@needs_models
def test_large_sets_are_scored_by_the_spark_job(tmp_path, spark):
    from clip_nsfw_spark.tools.sample import embedding_array
    from clip_nsfw_spark.spark.runner import spark_runner

    x, labels = separable(600, 768, 4)
    (tmp_path / "data").mkdir()
    for i in range(3):
        part = slice(i * 200, (i + 1) * 200)
        # LAION's metadata carries its own punsafe: the job's scores replace it (hostile review 18: --spark
        # refused, naming --score-column and --replace-scores, options evaluate does not have)
        pq.write_table(pa.table({"embedding": embedding_array(x[part], True), "label": labels[part],
                                 "punsafe": np.full(200, 0.5, np.float32)}),
                       tmp_path / "data" / f"p{i}.parquet")
    with_spark = evaluate(["vit-l-14"], str(tmp_path / "data"), tmp_path / "spark", runner=spark_runner(spark))
    in_process = evaluate(["vit-l-14"], str(tmp_path / "data"), tmp_path / "local")
    assert with_spark["models"]["vit-l-14"]["roc_auc"] == in_process["models"]["vit-l-14"]["roc_auc"]
    assert with_spark["models"]["vit-l-14"]["at_thresholds"] == in_process["models"]["vit-l-14"]["at_thresholds"]


@pytest.mark.parametrize("fraction", [0, 1, -0.5, 1.5])
def test_train_refuses_a_validation_fraction_leaving_no_rows_before_training(tmp_path, fraction):
    """Hostile review 18: 1 trained on no rows (a NaN model, exported), 0 crashed after exporting."""
    from clip_nsfw_spark.errors import ConfigError
    from clip_nsfw_spark.tools.train import train

    write_class_folders(tmp_path / "data", 100, dim=8, seed=3)
    with pytest.raises(ConfigError, match=r"validation_fraction must be between 0 and 1 \(exclusive\)"):
        train(str(tmp_path / "data"), tmp_path / "model", method="mlp", epochs=1, validation_fraction=fraction)
    assert not (tmp_path / "model").exists()


def test_a_training_that_fails_after_exporting_leaves_no_model_but_keeps_an_earlier_one(tmp_path, monkeypatch):
    """A model must never look exported without its check and training.json: what the failed call wrote is
    removed; a model an earlier call exported into the folder and this one did not reach stays."""
    from clip_nsfw_spark.tools import evaluate as evaluate_module
    from clip_nsfw_spark.tools.train import PORTABLE_NAME, train

    write_class_folders(tmp_path / "data", 200, dim=8, seed=3)
    model = tmp_path / "model"

    def failing(*args, **kwargs):
        raise RuntimeError("the validation report failed")

    monkeypatch.setattr(evaluate_module, "evaluate", failing)  # the last step, after model.keras and the npz
    with pytest.raises(RuntimeError, match="validation report failed"):
        train(str(tmp_path / "data"), model, method="mlp", epochs=1)
    assert not (model / "model.keras").exists() and not (model / PORTABLE_NAME).exists()
    monkeypatch.undo()
    train(str(tmp_path / "data"), model, method="mlp", epochs=1)
    kept = {name: (model / name).read_bytes() for name in ("model.keras", PORTABLE_NAME, "training.json")}
    monkeypatch.setattr("clip_nsfw_spark.tools.train.split", lambda *a: (_ for _ in ()).throw(RuntimeError("early")))
    with pytest.raises(RuntimeError, match="early"):
        train(str(tmp_path / "data"), model, method="mlp", epochs=1)
    assert {name: (model / name).read_bytes() for name in kept} == kept
    monkeypatch.undo()
    monkeypatch.setattr(evaluate_module, "evaluate", failing)  # a retrain that replaced the model, then failed:
    with pytest.raises(RuntimeError, match="validation report failed"):  # the old summary goes with the old model
        train(str(tmp_path / "data"), model, method="mlp", epochs=1, seed=5)
    assert not any((model / name).exists() for name in kept)


@pytest.mark.parametrize("options", [{"thresholds": (0.5, 7)}, {"recall": 1.5}, {"precision": 0}, {"thresholds": (-0.1,)}])
def test_evaluate_refuses_thresholds_recall_and_precision_out_of_range(tmp_path, options):
    """Hostile review 18: --recall 1.5 and --threshold 7 were accepted ("Threshold reaching recall ≥ 1.5: None")."""
    from clip_nsfw_spark.errors import ConfigError

    with pytest.raises(ConfigError, match="out of range"):
        evaluate(["vit-b-32"], str(tmp_path / "nowhere"), tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()
