"""Portable weights: everything the numpy scorer needs, in one ``.npz`` file that loads without pickle.

The model this describes (the Autokeras inference graph, in order):

1. ``x32 = float32(x)`` (round to nearest, as TensorFlow's Cast).
2. Numeric columns: NaN → 0 (±Inf stay). Categorical columns: the float32 value is printed with ``"%f"``
   and looked up in a vocabulary (known string → its code, unknown → the default code, 0 for LAION's
   models); the code replaces the value.
3. ``z = (x - mean) / max(sqrt(variance), epsilon)`` in float32.
4. Dense layers ``z = act(z @ kernel + bias)``, activations ``relu`` … and ``sigmoid`` last, summed in the
   fixed order named by ``ORDER`` (documented in kernels.py) and recorded in the file.

Vocabulary lookups are precomputed as intervals: the float32 values that print as one key form one
contiguous run in float32 order, so a lookup becomes a binary search over ``(lo, hi)`` bounds expressed
as *sortable int32* keys (see ``sortable_int32``): exact, and thousands of times faster than printing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from clip_nsfw_spark.errors import ModelError

# v2: the file names the summation order its scores are defined by (v1 files carried TensorFlow block
# sizes probed on the converting machine; they are refused, and the model cache re-derives them).
FORMAT = "clip-nsfw-spark/portable-weights/v2"
FORMAT_VERSION = 2
# Each Dense output: FMA chains over k-blocks of K_BLOCK, the block sums added in order, then + bias, then the
# activation; the sigmoid in float64 with kernels._exp64. See kernels.py. Never derived from the machine.
K_BLOCK = 256
ORDER = f"fma32-kblock{K_BLOCK}-sequential/v1"
ACTIVATIONS = ("relu", "sigmoid", "linear")


def save_npz(path: str | os.PathLike, arrays: dict) -> None:
    """Write ``arrays`` as an ``.npz`` atomically (temporary name, then rename), readable by all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def sortable_int32(values: np.ndarray) -> np.ndarray:
    """Map float32 values to int32 keys whose integer order is the float order, with -0.0 < +0.0.

    Positive floats keep their bit pattern; negative ones get their magnitude bits flipped so that
    larger magnitudes sort lower. NaNs land beyond ±Inf, outside every vocabulary interval.
    """
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.int32)
    return np.where(bits < 0, bits ^ np.int32(0x7FFFFFFF), bits)


def float32_from_sortable(keys: np.ndarray) -> np.ndarray:
    """Inverse of ``sortable_int32``."""
    keys = np.asarray(keys, dtype=np.int32)
    return np.where(keys < 0, keys ^ np.int32(0x7FFFFFFF), keys).astype(np.int32).view(np.float32)


def format_f(values: np.ndarray) -> list[str]:
    """``"%f"`` of each float32 value, as TensorFlow's AsString (C printf, correctly rounded) prints it."""
    return ["%f" % v for v in np.asarray(values, dtype=np.float32).astype(np.float64).tolist()]


_FLOAT32_MAX_KEY = int(sortable_int32(np.array([np.finfo(np.float32).max]))[0])
_FLOAT32_MIN_KEY = int(sortable_int32(np.array([-np.finfo(np.float32).max]))[0])


def vocabulary_intervals(keys: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each vocabulary key, the run of float32 values that ``"%f"`` prints as that key.

    Returns ``(lo, hi, index)``: int32 sortable bounds (inclusive) sorted by ``lo``, and for each the
    position of its key in ``keys``. Keys that no float32 prints as (none in LAION's models) are
    left out. Raises ModelError for keys that are not plain decimals, which this scorer cannot match.
    """
    lows, highs, index = [], [], []
    for position, key in enumerate(keys):
        try:
            value = float(key)
        except ValueError:
            value = float("nan")
        if not np.isfinite(value):
            # "nan"/"inf" keys would match through printf details (the sign of a NaN) we do not model.
            raise ModelError(f"vocabulary key {key!r} is not a finite decimal; this model is unsupported")
        start = int(sortable_int32(np.array([value], dtype=np.float32))[0])
        if format_f(float32_from_sortable(np.array([start])))[0] != key:
            # The nearest float32 prints differently: try its neighbours before giving up.
            for step in (-1, 1, -2, 2):
                if format_f(float32_from_sortable(np.array([start + step])))[0] == key:
                    start += step
                    break
            else:
                continue
        lows.append(_edge(key, start, -1))
        highs.append(_edge(key, start, +1))
        index.append(position)
    order = np.argsort(lows, kind="stable")
    lo = np.asarray(lows, dtype=np.int32)[order]
    hi = np.asarray(highs, dtype=np.int32)[order]
    if len(lo) > 1 and np.any(lo[1:] <= hi[:-1]):
        raise ModelError("vocabulary intervals overlap: two keys print the same float32 value")
    return lo, hi, np.asarray(index, dtype=np.int64)[order]


def _edge(key: str, inside: int, direction: int) -> int:
    """The last sortable key from ``inside`` towards ``direction`` that still prints as ``key``.

    Printing is monotonic in the value, so the run is contiguous and a galloping + binary search finds
    its end in about 2·log2(run length) prints.
    """
    limit = _FLOAT32_MAX_KEY if direction > 0 else _FLOAT32_MIN_KEY
    good, step = inside, 1
    while True:  # gallop until we leave the run (or reach the end of the finite floats)
        probe = good + direction * step
        if (probe - limit) * direction > 0:
            probe = limit
        if format_f(float32_from_sortable(np.array([probe])))[0] != key:
            bad = probe
            break
        good = probe
        if probe == limit:
            return good
        step *= 2
    while abs(bad - good) > 1:  # binary search between the last good and first bad key
        middle = (good + bad) // 2
        if format_f(float32_from_sortable(np.array([middle])))[0] == key:
            good = middle
        else:
            bad = middle
    return good


@dataclasses.dataclass(frozen=True)
class CategoricalColumn:
    """One categorical input column and its vocabulary (LAION: StringLookup codes 1..V, unknown 0)."""

    column: int
    keys: tuple[str, ...]
    codes: np.ndarray  # int64 (V,): the code of each key
    default: int
    lo: np.ndarray  # int32 (m,) sortable bounds, sorted
    hi: np.ndarray  # int32 (m,)
    interval_codes: np.ndarray  # float32 (m,): code of each interval


@dataclasses.dataclass(frozen=True)
class PortableWeights:
    """The whole model as arrays. Shapes: mean/variance (d,), kernels (in, out), biases (out,)."""

    name: str
    dim: int
    mean: np.ndarray
    variance: np.ndarray
    epsilon: float
    categorical: tuple[CategoricalColumn, ...]
    kernels: tuple[np.ndarray, ...]
    biases: tuple[np.ndarray, ...]
    activations: tuple[str, ...]
    # The summation order the scores are defined by (see kernels.py); only ``ORDER`` is computed here.
    order: str = ORDER
    metadata: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.mean.shape != (self.dim,) or self.variance.shape != (self.dim,):
            raise ModelError(f"normalisation vectors must have shape ({self.dim},)")
        width = self.dim
        for kernel, bias in zip(self.kernels, self.biases):
            if kernel.shape[0] != width or bias.shape != (kernel.shape[1],):
                raise ModelError(f"layer shapes do not chain: {kernel.shape} after width {width}")
            width = kernel.shape[1]
        if width != 1:
            raise ModelError(f"the last layer must have one output, found {width}")
        if any(a not in ACTIVATIONS for a in self.activations) or len(self.activations) != len(self.kernels):
            raise ModelError(f"unsupported activations {self.activations}")

    @classmethod
    def build(cls, *, name, dim, mean, variance, epsilon, vocabularies, kernels, biases, activations,
              metadata=None) -> "PortableWeights":
        """Assemble weights, computing the vocabulary intervals.

        ``vocabularies`` maps column index → (keys, codes, default code).
        """
        columns = []
        for column, (keys, codes, default) in sorted(vocabularies.items()):
            codes = np.asarray(codes, dtype=np.int64)
            lo, hi, index = vocabulary_intervals(list(keys))
            columns.append(CategoricalColumn(int(column), tuple(keys), codes, int(default), lo, hi,
                                             codes[index].astype(np.float32)))
        return cls(name=name, dim=int(dim), mean=np.asarray(mean, np.float32).reshape(-1),
                   variance=np.asarray(variance, np.float32).reshape(-1), epsilon=float(epsilon),
                   categorical=tuple(columns), kernels=tuple(np.asarray(k, np.float32) for k in kernels),
                   biases=tuple(np.asarray(b, np.float32).reshape(-1) for b in biases),
                   activations=tuple(activations),
                   metadata=dict(metadata or {}))

    # ------------------------------------------------------------------------------------------ file

    def save(self, path: str | os.PathLike) -> None:
        """Write the ``.npz`` atomically (temporary name, then rename)."""
        arrays: dict[str, np.ndarray] = {
            "format": np.array(FORMAT),
            "header": np.array(json.dumps({
                "name": self.name, "dim": self.dim, "epsilon": self.epsilon,
                "activations": list(self.activations), "layers": len(self.kernels),
                "order": self.order,
                "categorical_columns": [c.column for c in self.categorical], "metadata": self.metadata,
            })),
            "mean": self.mean, "variance": self.variance,
        }
        for i, (kernel, bias) in enumerate(zip(self.kernels, self.biases)):
            arrays[f"kernel_{i}"], arrays[f"bias_{i}"] = kernel, bias
        for c in self.categorical:
            arrays[f"vocab_{c.column}_keys"] = np.array(c.keys, dtype=np.str_)
            arrays[f"vocab_{c.column}_codes"] = c.codes
            arrays[f"vocab_{c.column}_default"] = np.array(c.default, dtype=np.int64)
            arrays[f"vocab_{c.column}_lo"], arrays[f"vocab_{c.column}_hi"] = c.lo, c.hi
            arrays[f"vocab_{c.column}_interval_codes"] = c.interval_codes
        save_npz(path, arrays)

    @classmethod
    def load(cls, source: str | os.PathLike | bytes) -> "PortableWeights":
        """Read a portable weights file (a path or its bytes). Never unpickles."""
        import io

        handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
        try:
            with np.load(handle, allow_pickle=False) as npz:
                data = {key: npz[key] for key in npz.files}
        except (OSError, ValueError) as err:
            raise ModelError(f"{source if not isinstance(source, bytes) else 'weights bytes'} is not a "
                             f"portable weights file: {err}") from err
        if str(data.get("format", "")) != FORMAT:
            raise ModelError(f"unsupported portable weights format {str(data.get('format'))!r}; expected "
                             f"{FORMAT!r} (v1 files used a machine-dependent summation order). Convert the "
                             "model again: registry models re-derive themselves in the cache (`clip-nsfw-spark "
                             "model fetch`); otherwise pass the SavedModel directory or zip instead of the .npz.")
        header = json.loads(str(data["header"]))
        columns = tuple(
            CategoricalColumn(
                column=col, keys=tuple(data[f"vocab_{col}_keys"].tolist()),
                codes=data[f"vocab_{col}_codes"], default=int(data[f"vocab_{col}_default"]),
                lo=data[f"vocab_{col}_lo"], hi=data[f"vocab_{col}_hi"],
                interval_codes=data[f"vocab_{col}_interval_codes"],
            )
            for col in header["categorical_columns"]
        )
        layers = range(header["layers"])
        return cls(name=header["name"], dim=header["dim"], mean=data["mean"], variance=data["variance"],
                   epsilon=header["epsilon"], categorical=columns,
                   kernels=tuple(data[f"kernel_{i}"] for i in layers),
                   biases=tuple(data[f"bias_{i}"] for i in layers),
                   activations=tuple(header["activations"]),
                   order=header.get("order", "missing"),
                   metadata=header.get("metadata", {}))
