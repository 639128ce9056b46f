"""Train a new NSFW head on labelled embeddings (autokeras search, or a plain deterministic Keras MLP).

Stack: autokeras 3.0 / Keras 3 / TensorFlow 2.21 (``pip install 'clip-nsfw-spark[train]'``). The
exported folder holds ``model.keras`` (Keras), ``<name>.nsfw.npz`` (portable weights: what
``load_scorer``, the job and ``evaluate`` use) and ``training.json``. Before exporting, the numpy
scores are checked against Keras's own predictions (≤ 1e-5).

The split is seeded: the same data and seed give the same train/validation rows.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from clip_nsfw_spark.errors import ConfigError, ModelError
from clip_nsfw_spark.scoring.weights import PortableWeights

log = logging.getLogger(__name__)
PORTABLE_NAME = "model.nsfw.npz"


def split(n: int, validation_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, validation), deterministic for (n, fraction, seed)."""
    order = np.random.default_rng(seed).permutation(n)
    cut = int(round(n * (1 - validation_fraction)))
    return np.sort(order[:cut]), np.sort(order[cut:])


def keras_to_portable(model, name: str) -> PortableWeights:
    """A Keras 3 model made of [Input] → Normalization → (Dense [+ReLU] [Dropout])* → Dense → sigmoid."""
    kernels, biases, activations = [], [], []
    mean = variance = None
    epsilon = 1e-7
    for layer in model.layers:
        kind = type(layer).__name__
        if kind in ("InputLayer", "Dropout"):
            continue
        if kind == "Normalization":
            mean, variance = (np.asarray(w, np.float32).reshape(-1) for w in layer.get_weights()[:2])
        elif kind == "Dense":
            kernel, bias = layer.get_weights()
            kernels.append(kernel)
            biases.append(bias)
            activations.append({"linear": "linear", "relu": "relu", "sigmoid": "sigmoid"}.get(layer.activation.__name__))
            if activations[-1] is None:
                raise ModelError(f"unsupported activation {layer.activation.__name__} in {layer.name}")
        elif kind == "ReLU":
            activations[-1] = "relu"
        elif kind == "Activation" and layer.activation.__name__ == "sigmoid":
            activations[-1] = "sigmoid"
        else:
            raise ModelError(f"unsupported layer {kind} ({layer.name}); expected Normalization, Dense, ReLU, Dropout")
    dim = kernels[0].shape[0]
    if mean is None:  # no Normalization layer: the identity
        mean, variance, epsilon = np.zeros(dim, np.float32), np.ones(dim, np.float32), 0.0
    return PortableWeights.build(name=name, dim=dim, mean=mean, variance=variance, epsilon=epsilon,
                                 vocabularies={}, kernels=kernels, biases=biases, activations=activations,
                                 metadata={"source": "clip-nsfw-spark train", "keras_layers": len(model.layers)})


def _patch_autokeras_shapes() -> None:
    """autokeras 3.0.0 stores layer sizes as numpy integers, which Keras ≥ 3.13 refuses
    ("Received an invalid value for `units` … units=1"). Convert them to Python ints."""
    from autokeras import graph as ak_graph

    if getattr(ak_graph.Graph.set_io_shapes, "_clip_nsfw_patched", False):
        return
    original = ak_graph.Graph.set_io_shapes

    def set_io_shapes(self, shapes):
        original(self, shapes)
        for node in self.inputs:
            node.shape = tuple(int(d) for d in node.shape)
        for node in self.outputs:
            node.in_blocks[0].shape = tuple(int(d) for d in node.in_blocks[0].shape)

    set_io_shapes._clip_nsfw_patched = True
    ak_graph.Graph.set_io_shapes = set_io_shapes


def train(data_path: str, out: str | Path, method: str = "autokeras", max_trials: int = 1, epochs: int = 10,
          seed: int = 0, validation_fraction: float = 0.2, class_labels: dict | None = None,
          embedding_column: str | None = None, label_column: str = "label") -> dict:
    """Train, export and validate a model; return the training summary (also in ``training.json``)."""
    from clip_nsfw_spark.models.convert import import_tensorflow
    from clip_nsfw_spark.tools.evaluate import load_labelled

    import_tensorflow()
    import keras

    if not 0 < validation_fraction < 1:  # checked before anything is loaded or trained
        raise ConfigError(f"validation_fraction must be between 0 and 1 (exclusive), found {validation_fraction!r}: "
                          "the model is trained on the other rows and checked on these (0.2 is usual)")
    data = load_labelled(data_path, class_labels, embedding_column, label_column)
    x = data.embeddings.astype(np.float32)
    y = data.labels.astype(np.float32)
    train_rows, val_rows = split(len(y), validation_fraction, seed)
    if not len(train_rows) or not len(val_rows):
        raise ConfigError(f"validation_fraction {validation_fraction} leaves {len(train_rows)} training and "
                          f"{len(val_rows)} validation rows of {len(y)}: both need rows; use more data or "
                          "another fraction")
    keras.utils.set_random_seed(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    exported = ("model.keras", PORTABLE_NAME, "training.json")
    before = {name: _stamp(out / name) for name in exported}
    try:
        return _fit_and_export(method, x, y, data, data_path, train_rows, val_rows, out, max_trials, epochs, seed)
    except BaseException:
        # Never a model that looks exported without its check and summary (training.json is written last):
        # what this call wrote goes, and with a replaced model the earlier summary that described the old one;
        # an earlier model this call did not touch stays whole.
        if any(_stamp(out / name) != before[name] for name in exported):
            for name in exported:
                (out / name).unlink(missing_ok=True)
        raise


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def _fit_and_export(method, x, y, data, data_path, train_rows, val_rows, out: Path, max_trials, epochs,
                    seed) -> dict:
    """``train``'s fitting, export, numpy-vs-Keras check and validation report (``out`` exists; TensorFlow
    imported)."""
    import keras

    from clip_nsfw_spark.tools.evaluate import Labelled, evaluate
    if method == "mlp":
        normalization = keras.layers.Normalization()
        normalization.adapt(x[train_rows])
        model = keras.Sequential([keras.Input((x.shape[1],)), normalization,
                                  keras.layers.Dense(64, activation="relu"), keras.layers.Dense(32, activation="relu"),
                                  keras.layers.Dense(1, activation="sigmoid")])
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
        model.fit(x[train_rows], y[train_rows], epochs=epochs, batch_size=256, shuffle=True, verbose=0,
                  validation_data=(x[val_rows], y[val_rows]))
    elif method == "autokeras":
        import autokeras as ak

        _patch_autokeras_shapes()
        classifier = ak.StructuredDataClassifier(max_trials=max_trials, overwrite=True, seed=seed,
                                                 directory=str(out / "autokeras"), project_name="search")
        classifier.fit(x[train_rows], y[train_rows].astype(int), epochs=epochs, verbose=0,
                       validation_data=(x[val_rows], y[val_rows].astype(int)))
        model = classifier.export_model()
    else:
        raise ModelError(f"unknown training method {method!r}: choose 'autokeras' or 'mlp'")
    model.save(out / "model.keras")
    weights = keras_to_portable(model, name=out.name)
    weights.save(out / PORTABLE_NAME)

    from clip_nsfw_spark.scoring.scorer import NumpyScorer

    check = x[val_rows][:4096]
    expected = model.predict(check, verbose=0).reshape(-1)
    worst = float(np.max(np.abs(NumpyScorer(weights)(check) - expected))) if len(check) else 0.0
    if worst > 1e-5:
        raise ModelError(f"the exported numpy model differs from Keras by {worst:.3g} (> 1e-5); not exported")
    validation_dir = out / "validation"
    held_out = Labelled(data.embeddings[val_rows], data.labels[val_rows], data.classes[val_rows])
    report = evaluate([str(out / PORTABLE_NAME)], f"{data_path} (validation rows, seed {seed})", validation_dir,
                      scores_fn=lambda m, emb: NumpyScorer(weights)(emb), labelled=held_out)
    summary = {"method": method, "seed": seed, "epochs": epochs, "max_trials": max_trials if method == "autokeras" else None,
               "rows": {"train": int(len(train_rows)), "validation": int(len(val_rows))},
               "numpy_vs_keras_max_abs_diff": worst,
               "validation": {"roc_auc": report["models"][str(out / PORTABLE_NAME)]["roc_auc"],
                              "pr_auc": report["models"][str(out / PORTABLE_NAME)]["pr_auc"],
                              "report": str(validation_dir / "report.md")}}
    (out / "training.json").write_text(json.dumps(summary, indent=2))
    return summary
