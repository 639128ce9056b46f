"""The numpy scorer against TensorFlow running the original SavedModel: max |difference| ≤ 1e-6."""

from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, needs_models

TOLERANCE = 1e-6
GOLDEN = ROOT.parent / "shared" / "golden"


def parity_rows(scorer, rng, per_kind=25_000):
    """Rows of every kind the contract covers, labelled. Returns {kind: float32 (n, d)} (float16 for f16)."""
    d = scorer.dim
    columns = [c.column for c in scorer.weights.categorical]
    gaussian = rng.normal(size=(per_kind, d)).astype(np.float32)
    normalised = rng.normal(size=(per_kind, d)).astype(np.float32)
    normalised /= np.linalg.norm(normalised, axis=1, keepdims=True)
    float16 = (normalised / 1.0001).astype(np.float16)

    hits = float16.astype(np.float32)[: per_kind // 2].copy()
    for column in scorer.weights.categorical:
        keys = np.array(column.keys, dtype=np.float32)
        hits[:, column.column] = keys[rng.integers(0, len(keys), len(hits))]

    # Exact printf ties at the 6th decimal are odd multiples of 1/128 (e.g. 0.0078125 → "0.007812").
    ties = float16.astype(np.float32)[: per_kind // 4].copy()
    odd = (2 * rng.integers(-20, 20, size=(len(ties), d)) + 1).astype(np.float32) / 128
    ties[:, columns] = odd[:, columns]
    ties[:, ::7] = odd[:, ::7]

    special = float16.astype(np.float32)[: per_kind // 4].copy()
    quarter = len(special) // 4
    special[:quarter, columns] = -0.0
    special[quarter:2 * quarter, ::5] = -0.0
    special[2 * quarter:3 * quarter, columns] = np.nan
    nan_mask = rng.random(special[3 * quarter:].shape) < 0.01
    special[3 * quarter:][nan_mask] = np.nan
    return {"gaussian": gaussian, "l2-normalised float32": normalised, "float16": float16,
            "vocabulary hits": hits, "rounding ties": ties, "-0.0 and NaN": special}


@needs_models
@pytest.mark.parametrize("model", ["vit-l-14", "vit-b-32"])
def test_numpy_matches_tensorflow_on_100k_rows(model, scorers, tf_scorers):
    scorer, reference = scorers[model], tf_scorers[model]
    rows = parity_rows(scorer, np.random.default_rng(2024))
    assert sum(len(x) for x in rows.values()) >= 100_000
    worst = {}
    for kind, x in rows.items():
        found, expected = scorer(x), reference(x)
        assert found.dtype == np.float32 and found.shape == (len(x),)
        assert np.all(np.isfinite(expected)), kind
        worst[kind] = float(np.max(np.abs(found.astype(np.float64) - expected)))
    print(model, {k: f"{v:.2e}" for k, v in worst.items()})
    assert max(worst.values()) <= TOLERANCE, worst


@needs_models
@pytest.mark.parametrize("model", ["vit-l-14", "vit-b-32"])
def test_vocabulary_hits_really_change_the_features(model, scorers):
    """Guard against a silent no-op lookup: a vocabulary key must encode to its code, not its value."""
    scorer = scorers[model]
    column = scorer.weights.categorical[0]
    x = np.zeros((2, scorer.dim), np.float32)
    x[0, column.column] = np.float32(column.keys[0])  # the most frequent key: code 1 in LAION's models
    x[1, column.column] = np.float32(7.25)  # not a key: code 0
    encoded = scorer.encode(x) * scorer._scale + scorer._mean
    assert encoded[0, column.column] == pytest.approx(float(column.codes[0]))
    assert encoded[1, column.column] == pytest.approx(0.0, abs=1e-3)


@needs_models
@pytest.mark.parametrize("model,fixture", [("vit-l-14", "real_l14.npz"), ("vit-b-32", "real_b32.npz")])
def test_golden_real_embeddings(model, fixture, scorers, tf_scorers):
    path = GOLDEN / fixture
    if not path.is_file():
        pytest.skip(f"!!! golden fixture {path} missing !!!")
    with np.load(path, allow_pickle=False) as data:
        x, y = data["x"], data["y"]
    assert np.max(np.abs(scorers[model](x) - y)) <= TOLERANCE
    assert np.max(np.abs(tf_scorers[model](x) - y)) <= TOLERANCE


@needs_models
def test_dtypes_and_empty_input(scorers):
    scorer = scorers["vit-l-14"]
    x16 = (np.random.default_rng(3).normal(size=(50, 768)) / 27.7).astype(np.float16)
    reference = scorer(x16)
    assert np.array_equal(scorer(x16.astype(np.float32)), reference)
    assert np.array_equal(scorer(x16.astype(np.float64)), reference)
    assert scorer(np.zeros((0, 768), np.float16)).shape == (0,)
    assert np.all((reference >= 0) & (reference <= 1))


@needs_models
def test_float16_and_float32_versions_can_score_differently(scorers):
    """The categorical columns were trained on float16 values: quantising an embedding can change them."""
    scorer = scorers["vit-l-14"]
    x = np.random.default_rng(4).normal(size=(2000, 768)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    as_is, quantised = scorer(x), scorer(x.astype(np.float16))
    assert np.max(np.abs(as_is - quantised)) > 1e-4


@needs_models
@pytest.mark.parametrize("model", ["vit-l-14", "vit-b-32"])
def test_a_rows_score_does_not_depend_on_its_batch(model, scorers):
    """Reruns and retries must reproduce outputs bit for bit, whatever the batch sizes."""
    scorer = scorers[model]
    x = np.random.default_rng(6).normal(size=(3000, scorer.dim)).astype(np.float16)
    whole = scorer(x)
    assert np.array_equal(scorer(x[:1]), whole[:1])
    assert np.array_equal(np.concatenate([scorer(x[s:s + 7]) for s in range(0, 3000, 7)]), whole)
