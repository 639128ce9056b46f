"""The numpy scorer against TensorFlow running the original SavedModel, judged by TensorFlow's own spread.

TensorFlow is not reproducible to the last bit: its MatMul order depends on the CPU, the batch size and
oneDNN. So for every kind of realistic row the test measures how far TensorFlow's scores move when the same
rows go in other batch sizes, and requires max |numpy − TensorFlow| ≤ max(2e-6, 2 × that spread)
(``convert.agreement_bound``, the rule the conversion self-check uses too). Raw unnormalised gaussian rows
(norm ≈ 28, far from CLIP embeddings) get that bound scaled by each row's L2 norm: rounding errors grow with
the size of the terms summed. Nothing here depends on this machine's caches, BLAS or TensorFlow's order.

A committed fixture of TensorFlow scores made once (tests/golden/, see ``golden_rows``) makes the same check
against a TensorFlow run from another machine.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from clip_nsfw_spark.models.convert import AGREEMENT_FLOOR, agreement_bound, tf_spread
from conftest import ROOT, needs_models

SHARED_GOLDEN = ROOT.parent / "shared" / "golden"
FIXTURES = ROOT / "tests" / "golden"
REALISTIC = ("l2-normalised float32", "float16", "vocabulary hits", "rounding ties", "-0.0 and NaN")


def parity_rows(weights, rng, per_kind=25_000):
    """Rows of every kind the contract covers, labelled: {kind: float32 (n, d)} (float16 for "float16").

    ``weights`` is the model's PortableWeights (for its width and vocabularies).
    """
    d = weights.dim
    columns = [c.column for c in weights.categorical]
    gaussian = rng.normal(size=(per_kind, d)).astype(np.float32)
    normalised = rng.normal(size=(per_kind, d))
    normalised = (normalised / np.sqrt(np.sum(normalised ** 2, axis=1, keepdims=True))).astype(np.float32)
    float16 = (normalised / 1.0001).astype(np.float16)

    hits = float16.astype(np.float32)[: per_kind // 2].copy()
    for column in weights.categorical:
        keys = np.sort(np.array(column.keys, dtype=np.float32))  # sorted: TF exports its tables in any order
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


def golden_rows(weights) -> dict:
    """The rows of the committed TensorFlow fixture, regenerated from their seed (400 per realistic kind)."""
    rows = parity_rows(weights, np.random.default_rng(11), per_kind=1600)
    return {kind: rows[kind][:400] for kind in REALISTIC}


def _within_spread(found, expected, spread, scale=None):
    """(worst |found − expected|, True if every row is within agreement_bound(spread) × scale)."""
    difference = np.abs(found.astype(np.float64) - expected)
    bound = agreement_bound(spread) * (1.0 if scale is None else np.maximum(1.0, scale))
    return float(np.max(difference)), bool(np.all(difference <= bound))


@needs_models
@pytest.mark.parametrize("model", ["vit-l-14", "vit-b-32"])
def test_numpy_within_tensorflows_own_spread_on_100k_rows(model, scorers, tf_scorers):
    scorer, reference = scorers[model], tf_scorers[model]
    rows = parity_rows(scorer.weights, np.random.default_rng(2024))
    assert sum(len(x) for x in rows.values()) >= 100_000
    table, failures = {}, []
    for kind, x in rows.items():
        # TensorFlow's spread: the same rows in 64-row batches, and (first 1,500 rows) in batches of 1…7.
        expected, spread = tf_spread(reference, x, batch=64, small=7, small_rows=1500)
        assert np.all(np.isfinite(expected)), kind
        found = scorer(x)
        assert found.dtype == np.float32 and found.shape == (len(x),)
        scale = np.linalg.norm(x.astype(np.float64), axis=1) if kind == "gaussian" else None
        worst, ok = _within_spread(found, expected, spread, scale)
        table[kind] = (worst, spread)
        if not ok:
            failures.append(kind)
    print(f"\n{model}: kind, max|numpy-TF|, TF spread, bound")
    for kind, (worst, spread) in table.items():
        print(f"  {kind:24s} {worst:.2e} {spread:.2e} {agreement_bound(spread):.2e}"
              + (" x row norm" if kind == "gaussian" else ""))
    assert not failures, {kind: table[kind] for kind in failures}


@needs_models
@pytest.mark.parametrize("model", ["vit-l-14", "vit-b-32"])
def test_committed_tensorflow_scores(model, scorers):
    """Scores TensorFlow gave on one machine (tests/golden, see make_golden below): within 2e-6 here."""
    path = FIXTURES / f"tf_scores_{model}.json"
    fixture = json.loads(path.read_text())
    rows = golden_rows(scorers[model].weights)
    assert list(rows) == list(fixture["kinds"]), "the golden row generator changed: re-make the fixture"
    for kind, x in rows.items():
        # The rows are regenerated from a seed: check they are still the rows the fixture was made from.
        assert np.nansum(x.astype(np.float64)) == pytest.approx(fixture["kinds"][kind]["row_sum"], abs=1e-6)
        expected = np.array(fixture["kinds"][kind]["scores"], np.float64)
        worst = float(np.max(np.abs(scorers[model](x) - expected)))
        print(f"{model} {kind}: max |numpy - committed TF| {worst:.2e}")
        assert worst <= AGREEMENT_FLOOR, (kind, worst)


def make_golden(model: str, tf_scorer, weights) -> dict:
    """The fixture: TensorFlow's scores of ``golden_rows`` (run by hand, see tests/golden/README.md)."""
    import platform

    kinds = {}
    for kind, x in golden_rows(weights).items():
        kinds[kind] = {"row_sum": float(np.nansum(x.astype(np.float64))),
                       "scores": [float(v) for v in tf_scorer(x)]}
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    import tensorflow as tf

    return {"model": model, "made_with": f"tensorflow {tf.__version__}, {cpu}", "rows": "tests/models/test_convert.py "
            "golden_rows", "kinds": kinds}


@needs_models
@pytest.mark.parametrize("model,fixture", [("vit-l-14", "real_l14.npz"), ("vit-b-32", "real_b32.npz")])
def test_golden_real_embeddings(model, fixture, scorers, tf_scorers):
    path = SHARED_GOLDEN / fixture
    if not path.is_file():
        pytest.skip(f"!!! golden fixture {path} missing !!!")
    with np.load(path, allow_pickle=False) as data:
        x, y = data["x"], data["y"]
    assert np.max(np.abs(scorers[model](x) - y)) <= AGREEMENT_FLOOR
    assert np.max(np.abs(tf_scorers[model](x) - y)) <= AGREEMENT_FLOOR


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
