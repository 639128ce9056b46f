"""Re-make the committed TensorFlow scores: python tests/golden/make_tf_scores.py (needs TensorFlow and the
real models; run from the checkout root). Only the scores are stored; the rows come from
tests/models/test_convert.py ``golden_rows`` (seeded)."""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "models")]

import conftest  # noqa: E402,F401  (sets up the model cache like the tests)
from test_convert import make_golden  # noqa: E402

from clip_nsfw_spark import load_scorer  # noqa: E402

for model in ("vit-l-14", "vit-b-32"):
    fixture = make_golden(model, load_scorer(model, backend="tensorflow"), load_scorer(model).weights)
    text = json.dumps({**fixture, "kinds": {kind: {**entry, "scores": "@" + kind}
                                            for kind, entry in fixture["kinds"].items()}}, indent=1)
    for kind, entry in fixture["kinds"].items():  # one line of scores per kind
        text = text.replace(json.dumps("@" + kind), json.dumps(entry["scores"]))
    (HERE / f"tf_scores_{model}.json").write_text(text + "\n")
    print(model, fixture["made_with"], sum(len(k["scores"]) for k in fixture["kinds"].values()), "rows")
