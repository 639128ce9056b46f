"""Read an Autokeras/Keras SavedModel with TensorFlow and turn it into ``PortableWeights``.

This is the only module that imports TensorFlow for conversion. It does not trust layer names: it walks
the ``serving_default`` graph op by op, checks that it is exactly the structure the numpy scorer
implements (Cast → SplitV → NaN-to-zero / AsString + LookupTableFindV2 → ConcatV2 → normalisation →
MatMul/BiasAdd/ReLU … → Sigmoid), and refuses anything else with an error that names the op.
Vocabularies live in hash tables restored from ``saved_model.pb`` (not in ``variables/``); they are
exported with ``LookupTableExportV2``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from clip_nsfw_spark.errors import MissingDependencyError, ModelError
from clip_nsfw_spark.scoring.weights import PortableWeights

log = logging.getLogger(__name__)

# Ops that pass a tensor through unchanged at inference (Dropout is an Identity there).
_PASS_THROUGH = {"Identity", "StopGradient"}


def import_tensorflow():
    """Import TensorFlow quietly, or explain how to install it."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf  # noqa: PLC0415
    except ImportError as err:
        raise MissingDependencyError(
            "TensorFlow is needed to read the original SavedModel (once per model) and for the "
            "'tensorflow' backend: pip install 'clip-nsfw-spark[tensorflow]'"
        ) from err
    return tf


def _ref_node(ref: str) -> str:
    """'model/x/Cast:y:0' → 'model/x/Cast'; '^dep' → 'dep'."""
    return ref.lstrip("^").split(":")[0]


def convert_saved_model(saved_model: Path, name: str | None = None) -> PortableWeights:
    """Convert the SavedModel at ``saved_model`` into portable weights (and self-check the result)."""
    tf = import_tensorflow()
    loaded = tf.saved_model.load(str(saved_model))
    try:
        signature = loaded.signatures["serving_default"]
    except KeyError as err:
        raise ModelError(f"{saved_model} has no 'serving_default' signature") from err
    (input_spec,) = signature.structured_input_signature[1].values()
    dim = int(input_spec.shape[-1])

    graph_def = signature.graph.as_graph_def()
    calls = [n for n in graph_def.node if n.op in ("StatefulPartitionedCall", "PartitionedCall")]
    if len(calls) != 1:
        raise ModelError(f"{saved_model}: expected one call in serving_default, found {len(calls)}")
    library = {f.signature.name: f for f in graph_def.library.function}
    function = library[calls[0].attr["f"].func.name]
    captured = {inner.name.split(":")[0]: outer for outer, inner in signature.graph.captures}
    # Function argument name → the eager tensor (resource handle or constant) bound to it.
    bound = {arg.name: captured.get(_ref_node(ref))
             for arg, ref in zip(function.signature.input_arg, calls[0].input)}
    nodes = {n.name: n for n in function.node_def}

    def value_of(ref: str):
        node_name = _ref_node(ref)
        if node_name in bound:
            return bound[node_name]
        node = nodes[node_name]
        if node.op == "Const":
            return tf.make_ndarray(node.attr["value"].tensor)
        if node.op == "ReadVariableOp":
            handle = bound[_ref_node(node.input[0])]
            return tf.raw_ops.ReadVariableOp(resource=handle, dtype=node.attr["dtype"].type).numpy()
        raise ModelError(f"{saved_model}: cannot evaluate {node.op} node {node_name} statically")

    def source_column(ref: str) -> tuple[int, str]:
        """Follow a ConcatV2 input back to its SplitV column; say whether it is numeric or categorical."""
        kind = None
        while True:
            node = nodes[_ref_node(ref)]
            if node.op == "SplitV":
                return int(ref.split(":")[-1]), kind or "raw"
            if node.op == "SelectV2":  # select(isnan(x), 0, x)
                kind, ref = "numeric", node.input[2]
            elif node.op == "LookupTableFindV2":
                kind, ref = "categorical", node.input[1]
            elif node.op in _PASS_THROUGH or node.op in ("Cast", "AsString"):
                ref = node.input[0]
            else:
                raise ModelError(f"{saved_model}: unsupported op {node.op} ({node.name}) in the input encoding")

    ops = [n.op for n in function.node_def]
    for op in set(ops) - {"Cast", "Const", "SplitV", "IsNan", "ZerosLike", "SelectV2", "AsString",
                          "LookupTableFindV2", "Identity", "ConcatV2", "Sub", "Sqrt", "Maximum", "RealDiv",
                          "ReadVariableOp", "MatMul", "BiasAdd", "Relu", "Sigmoid", "NoOp", "StopGradient"}:
        raise ModelError(f"{saved_model}: unsupported op {op}; this converter handles Autokeras "
                         "structured-data MLP classifiers like LAION's NSFW detector.")

    (concat,) = [n for n in function.node_def if n.op == "ConcatV2"]
    vocabularies = {}
    for position, ref in enumerate(concat.input[:-1]):
        column, kind = source_column(ref)
        if column != position:
            raise ModelError(f"{saved_model}: column {column} is concatenated at position {position}")
        if kind != "categorical":
            continue
        lookup = _walk_back(nodes, ref, "LookupTableFindV2")
        as_string = nodes[_ref_node(lookup.input[1])]
        attrs = {k: as_string.attr[k] for k in ("precision", "scientific", "shortest", "width", "fill")}
        if (attrs["precision"].i, attrs["scientific"].b, attrs["shortest"].b, attrs["width"].i,
                attrs["fill"].s) != (-1, False, False, -1, b""):
            raise ModelError(f"{saved_model}: AsString with non-default formatting is unsupported")
        keys, codes = tf.raw_ops.LookupTableExportV2(
            table_handle=bound[_ref_node(lookup.input[0])], Tkeys=tf.string, Tvalues=tf.int64)
        default = int(np.asarray(value_of(lookup.input[2])))
        vocabularies[column] = ([k.decode() for k in keys.numpy().tolist()], codes.numpy(), default)

    (sub,) = [n for n in function.node_def if n.op == "Sub"]
    (sqrt,) = [n for n in function.node_def if n.op == "Sqrt"]
    (maximum,) = [n for n in function.node_def if n.op == "Maximum"]
    mean = np.asarray(value_of(sub.input[1]), np.float32).reshape(-1)
    variance = np.asarray(value_of(sqrt.input[0]), np.float32).reshape(-1)
    epsilon = float(np.asarray(value_of(maximum.input[1])))

    kernels, biases, activations = [], [], []
    current = [n for n in function.node_def if n.op == "RealDiv"][0].name
    while True:
        consumers = [n for n in function.node_def if any(_ref_node(i) == current for i in n.input
                                                         if not i.startswith("^"))]
        if len(consumers) != 1:
            break
        node = consumers[0]
        if node.op == "MatMul":
            if node.attr["transpose_a"].b or node.attr["transpose_b"].b:
                raise ModelError(f"{saved_model}: transposed MatMul is unsupported")
            kernels.append(np.asarray(value_of(node.input[1]), np.float32))
            activations.append("linear")
        elif node.op == "BiasAdd":
            biases.append(np.asarray(value_of(node.input[1]), np.float32))
        elif node.op == "Relu":
            activations[-1] = "relu"
        elif node.op == "Sigmoid":
            activations[-1] = "sigmoid"
        elif node.op not in _PASS_THROUGH:
            raise ModelError(f"{saved_model}: unsupported op {node.op} in the dense layers")
        current = node.name
    if not activations or activations[-1] != "sigmoid" or len(biases) != len(kernels):
        raise ModelError(f"{saved_model}: expected Dense layers ending in a sigmoid, found {activations}")

    weights = PortableWeights.build(
        name=name or saved_model.name, dim=dim, mean=mean, variance=variance, epsilon=epsilon,
        vocabularies=vocabularies, kernels=kernels, biases=biases, activations=activations,
        metadata={"source": "tensorflow-savedmodel", "tensorflow": tf.__version__},
    )
    _self_check(weights, signature, tf, saved_model)
    return weights


def _walk_back(nodes, ref: str, op: str):
    while True:
        node = nodes[_ref_node(ref)]
        if node.op == op:
            return node
        ref = node.input[0]


# The agreement rule (docs/exactness.md, tests/models/test_convert.py): TensorFlow itself is not reproducible to
# the last bit (its MatMul order depends on the CPU, the batch size and oneDNN), so the numpy scores must be
# within twice TensorFlow's own spread on the same rows, and never need to be closer than 2e-6.
AGREEMENT_FLOOR = 2e-6


def agreement_bound(tf_spread: float) -> float:
    """The largest |numpy − TensorFlow| accepted on rows where TensorFlow disagrees with itself by ``tf_spread``."""
    return max(AGREEMENT_FLOOR, 2.0 * tf_spread)


def tf_spread(score, x: np.ndarray, batch: int = 64, small: int = 7, small_rows: int = 1500
              ) -> tuple[np.ndarray, float]:
    """TensorFlow's scores of ``x`` in one batch, and how far they move when the same rows go in other batches.

    ``score`` maps an (m, d) array to (m,) scores. Tried: batches of ``batch`` rows, and the first
    ``small_rows`` rows in batches of 1, 2, …, ``small``, 1, 2, … (TensorFlow picks kernels by shape).
    Returns (full-batch scores float64 (n,), max |difference| from them).
    """
    full = np.asarray(score(x), np.float64)
    parts = np.concatenate([score(x[i:i + batch]) for i in range(0, len(x), batch)] or [np.zeros(0)])
    spread = float(np.max(np.abs(parts - full), initial=0.0))
    pieces, start, size = [], 0, 1
    head = x[:small_rows]
    while start < len(head):
        pieces.append(score(head[start:start + size]))
        start, size = start + size, size % small + 1
    if pieces:
        spread = max(spread, float(np.max(np.abs(np.concatenate(pieces) - full[:len(head)]), initial=0.0)))
    return full, spread


def _self_check(weights: PortableWeights, signature, tf, saved_model: Path) -> None:
    """Score realistic probe rows with TensorFlow and numpy; refuse the conversion if they disagree by more
    than ``agreement_bound`` of TensorFlow's own spread on those rows."""
    from clip_nsfw_spark.scoring.scorer import NumpyScorer

    rng = np.random.default_rng(0)
    probe = rng.normal(size=(512, weights.dim)).astype(np.float32)
    probe /= np.linalg.norm(probe, axis=1, keepdims=True)
    probe[256:] = probe[256:].astype(np.float16)  # half of them as LAION ships them: float16 values
    for i, column in enumerate(weights.categorical):  # make every categorical column hit its vocabulary
        probe[::2, column.column] = np.float32(column.keys[i % len(column.keys)])
    name = _input_name(signature)

    def score(rows):
        result = signature(**{name: tf.constant(rows.astype(np.float64))})
        return next(iter(result.values())).numpy().reshape(-1)

    expected, spread = tf_spread(score, probe)
    found = NumpyScorer(weights)(probe)
    worst = float(np.max(np.abs(found - expected)))
    bound = agreement_bound(spread)
    if not worst <= bound:
        raise ModelError(f"{saved_model}: the converted model differs from TensorFlow by {worst:.3g} on a probe "
                         f"batch, more than {bound:.3g} (2 × TensorFlow's own spread {spread:.3g} across batch "
                         "sizes, at least 2e-6); refusing the conversion.")
    log.info("converted %s: numpy vs TensorFlow max |diff| %.3g (TensorFlow's own spread %.3g) on %d probe rows",
             saved_model, worst, spread, len(probe))


def _input_name(signature) -> str:
    (name,) = signature.structured_input_signature[1].keys()
    return name
