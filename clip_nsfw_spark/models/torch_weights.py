"""PyTorch state dicts → ``PortableWeights``, read without executing pickle code and without torch.

Three file formats are read:

* **torch.save's zip** (PyTorch ≥ 1.6, what ``torch.save`` writes by default): ``<folder>/data.pkl`` is a
  pickle of the state dict whose tensors point, by *persistent id*, at raw storages
  ``<folder>/data/<key>`` (little-endian unless ``<folder>/byteorder`` says ``big``). The pickle is read
  by a restricted unpickler: ``find_class`` resolves exactly ``collections.OrderedDict``,
  ``torch._utils._rebuild_tensor_v2`` and the ``torch.FloatStorage`` / ``HalfStorage`` /
  ``BFloat16Storage`` markers, each to a function or marker of *this* module (torch itself is never
  imported); anything else raises UnsafeModelFileError before it could run. Tensor views are
  bounds-checked against their storage before numpy builds them.
* **safetensors**: an 8-byte little-endian header length, a JSON header (dtype, shape, data offsets),
  raw little-endian tensors. Parsed here; the ``safetensors`` package is not needed.
* **torch's legacy pickle format** (before PyTorch 1.6): only through ``torch.load(weights_only=True)``,
  which needs the optional ``torch`` extra (``pip install 'clip-nsfw-spark[torch]'``).

Dtypes: float32, float16 and bfloat16 tensors are accepted (each is exact in float32); others are refused.

The MLP: Linear layers found by Sequential-style keys ``<prefix>.<index>.weight`` / ``.bias`` (one common
prefix, e.g. ``layers.``, or none: ``0.weight``), or a single ``weight``/``bias`` pair. A ReLU follows a
Linear exactly when the Sequential index skips to the next Linear (``Linear, ReLU, Dropout, Linear``
is ``0 → 3``; consecutive indices mean no activation between them); the last Linear's output is the
score as it is (no sigmoid). Dropout is the identity at inference. In ``PortableWeights`` terms: mean 0,
variance 1 (the normalisation is then exactly the identity), no categorical columns, kernel = weight.T.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import re
import struct
import zipfile
from pathlib import Path

import numpy as np

from clip_nsfw_spark.errors import MissingDependencyError, ModelError, UnsafeModelFileError
from clip_nsfw_spark.scoring.weights import PortableWeights

# clip-retrieval's H14_NSFW_Detector (LAION's h14_nsfw.pth): nn.Sequential "layers" of
# Linear(1024,1024) ReLU Dropout Linear(1024,2048) ReLU Dropout Linear(2048,1024) ReLU Dropout
# Linear(1024,256) ReLU Dropout Linear(256,128) ReLU Dropout Linear(128,16) Linear(16,1).
H14_LAYERS = ((0, 1024, 1024), (3, 1024, 2048), (6, 2048, 1024), (9, 1024, 256), (12, 256, 128),
              (15, 128, 16), (16, 16, 1))  # (Sequential index, in, out)
H14_KEYS = tuple(f"layers.{i}.{p}" for i, _, _ in H14_LAYERS for p in ("weight", "bias"))
H14_ACTIVATIONS = ("relu",) * 5 + ("linear", "linear")

_STORAGE_DTYPES = {"FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16"}
_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


# ------------------------------------------------------------------------------------------ read tensors


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a state dict file as float32 numpy arrays, in file order. Never runs pickle code."""
    path = Path(path)
    with open(path, "rb") as handle:
        head = handle.read(9)
    if zipfile.is_zipfile(path):
        return _read_torch_zip(path)
    if len(head) == 9 and head[8:9] == b"{":
        return _read_safetensors(path)
    if head[:1] == b"\x80":  # a bare pickle: torch's legacy format
        return _read_legacy_with_torch(path)
    raise ModelError(f"{path} is neither a torch.save zip, a safetensors file nor a legacy torch pickle "
                     f"(it starts with {head!r}). Save the model's state_dict() with torch.save.")


class _Storage:
    """Marker for a torch storage class named in the pickle (the dtype of a persistent storage)."""

    def __init__(self, dtype: str):
        self.dtype = dtype


def _to_float32(raw: bytes | memoryview, dtype: str, big_endian: bool = False) -> np.ndarray:
    if dtype == "bfloat16":  # the top 16 bits of a float32
        half = np.frombuffer(raw, dtype=">u2" if big_endian else "<u2").astype(np.uint32)
        return (half << np.uint32(16)).view(np.float32)
    order = ">" if big_endian else "<"
    return np.frombuffer(raw, dtype=order + {"float32": "f4", "float16": "f2"}[dtype]).astype(np.float32)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    """What torch._utils._rebuild_tensor_v2 does, for a numpy storage: a bounds-checked strided view, copied."""
    if not isinstance(storage, np.ndarray) or not all(isinstance(v, int) for v in (storage_offset, *size, *stride)):
        raise UnsafeModelFileError("a tensor in the pickle is not (storage, offset, size, stride) of integers")
    if len(size) != len(stride) or storage_offset < 0 or any(v < 0 for v in (*size, *stride)):
        raise UnsafeModelFileError(f"tensor size {size} / stride {stride} / offset {storage_offset} are invalid")
    if any(v == 0 for v in size):
        return np.zeros(size, np.float32)
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    # A state dict's tensors never hold more elements than their storage (no broadcast views): this also
    # bounds the copy below by the bytes actually in the file.
    if last >= storage.size or int(np.prod(size, dtype=object)) > storage.size:
        raise UnsafeModelFileError(f"a tensor of size {tuple(size)} at offset {storage_offset} reaches element "
                                   f"{last} of a storage of {storage.size} elements")
    view = np.lib.stride_tricks.as_strided(storage[storage_offset:], shape=tuple(size),
                                           strides=tuple(s * storage.itemsize for s in stride), writeable=False)
    return np.array(view, dtype=np.float32, copy=True)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a torch state dict; resolves only the names in ``_ALLOWED``, to this module's own objects."""

    _ALLOWED = {("collections", "OrderedDict"): collections.OrderedDict,
                ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
                **{("torch", name): _Storage(dtype) for name, dtype in _STORAGE_DTYPES.items()}}

    def __init__(self, data: bytes, load_storage, where: str):
        super().__init__(io.BytesIO(data))
        self._load_storage, self._where = load_storage, where

    def find_class(self, module, name):
        found = self._ALLOWED.get((module, name))
        if found is None:
            raise UnsafeModelFileError(
                f"{self._where}: the pickle references {module}.{name}, which a state dict of float tensors "
                f"never needs; refusing to load it (nothing was executed). Allowed: "
                f"{', '.join(m + '.' + n for m, n in self._ALLOWED)}. Re-save the model with "
                "torch.save(model.state_dict(), path) or as safetensors."
            )
        return found

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _Storage)
                and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise UnsafeModelFileError(f"{self._where}: unexpected persistent id {pid!r} (expected a float storage)")
        return self._load_storage(pid[2], pid[1].dtype, pid[4])


def _read_torch_zip(path: Path) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise ModelError(f"{path} is a zip but not a torch.save file: expected one <folder>/data.pkl, "
                             f"found {len(pickles)}")
        folder = pickles[0][: -len("/data.pkl")]
        big_endian = f"{folder}/byteorder" in names and zf.read(f"{folder}/byteorder").strip() == b"big"
        storages: dict[str, np.ndarray] = {}

        def load_storage(key: str, dtype: str, numel: int) -> np.ndarray:
            member = f"{folder}/data/{key}"
            if not re.fullmatch(r"[0-9A-Za-z_]+", key) or member not in names:
                raise UnsafeModelFileError(f"{path}: storage {key!r} is not a member of the archive")
            if key not in storages:
                raw = zf.read(member)
                size = numel * _ITEMSIZE[dtype]
                if numel < 0 or len(raw) < size:
                    raise ModelError(f"{path}: storage {key} holds {len(raw)} bytes, expected {size}")
                storages[key] = _to_float32(raw[:size], dtype, big_endian)
            return storages[key]

        try:
            state = _RestrictedUnpickler(zf.read(pickles[0]), load_storage, str(path)).load()
        except ModelError:
            raise
        except Exception as err:  # a malformed pickle: any error of the unpickler or of the rebuild
            raise ModelError(f"{path}: could not read the state dict's pickle: {err!r}") from err
    return _tensors_of(state, path)


def _tensors_of(state, path) -> dict[str, np.ndarray]:
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # a checkpoint wrapping one
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, np.ndarray)
                                              for k, v in state.items()):
        raise ModelError(f"{path} does not hold a state dict (a mapping of names to tensors); save "
                         "model.state_dict(), not the model object")
    return dict(state)


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    if 8 + length > len(data):
        raise ModelError(f"{path}: safetensors header of {length} bytes is longer than the file")
    try:
        header = json.loads(data[8:8 + length])
    except ValueError as err:
        raise ModelError(f"{path}: the safetensors header is not JSON: {err}") from err
    body = memoryview(data)[8 + length:]
    if not isinstance(header, dict) or not all(isinstance(v, dict) for v in header.values()):
        raise ModelError(f"{path}: the safetensors header is not a mapping of tensor names to descriptions")
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise ModelError(f"{path}: tensor {name!r} has dtype {info.get('dtype')!r}; supported: "
                             f"{', '.join(_SAFETENSORS_DTYPES)}")
        try:
            shape = tuple(int(v) for v in info["shape"])
            begin, end = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise ModelError(f"{path}: tensor {name!r} has no valid shape/data_offsets: {err!r}") from err
        if not 0 <= begin <= end <= len(body) or end - begin != int(np.prod(shape)) * _ITEMSIZE[dtype]:
            raise ModelError(f"{path}: tensor {name!r} offsets {begin}..{end} do not fit shape {shape} "
                             f"({dtype}) in a body of {len(body)} bytes")
        tensors[name] = _to_float32(body[begin:end], dtype).reshape(shape)
    return tensors


def _read_legacy_with_torch(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as err:
        raise MissingDependencyError(
            f"{path} is in torch's legacy (pre-1.6) pickle format, which only torch can read safely: "
            "pip install 'clip-nsfw-spark[torch]' (used once, for the conversion), or re-save it with a "
            "recent torch.save or as safetensors."
        ) from err
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError/RuntimeError for refused content
        raise UnsafeModelFileError(f"{path}: torch.load(weights_only=True) refused it: {err}") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"{path} does not hold a state dict")
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or value.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ModelError(f"{path}: {key!r} is not a float32/float16/bfloat16 tensor")
        out[key] = value.detach().to(torch.float32).contiguous().numpy().copy()
    return out


# ------------------------------------------------------------------------------------------- the MLP


def mlp_layers(state: dict[str, np.ndarray], where: str = "state dict") -> list[tuple[int, str, np.ndarray, np.ndarray]]:
    """The Linear layers of a Sequential-style state dict, in order: ``(index, prefix, weight (out, in),
    bias (out,))``. Raises ModelError naming the keys it cannot place."""
    if set(state) == {"weight", "bias"}:
        return [(0, "", state["weight"], state["bias"])]
    found: dict[int, dict[str, np.ndarray]] = {}
    prefixes = set()
    for key, value in state.items():
        # The index must be a whole dotted component ("layers.3.weight", "3.weight"): named layers such as
        # "fc1.weight" say nothing about the activations between them.
        match = re.fullmatch(r"((?:.*\.)?)(\d+)\.(weight|bias)", key)
        if match is None:
            raise ModelError(f"{where}: key {key!r} is not '<prefix><index>.weight|bias'; only Sequential "
                             "MLPs of Linear/ReLU/Dropout layers are supported")
        prefixes.add(match.group(1))
        found.setdefault(int(match.group(2)), {})[match.group(3)] = value
    if len(prefixes) != 1:
        raise ModelError(f"{where}: keys have several prefixes {sorted(prefixes)}; expected one Sequential")
    prefix = prefixes.pop()
    layers = []
    for index in sorted(found):
        pair = found[index]
        if set(pair) != {"weight", "bias"}:
            raise ModelError(f"{where}: layer {prefix}{index} has {sorted(pair)}; a Linear has weight and bias")
        weight, bias = pair["weight"], pair["bias"]
        if weight.ndim != 2 or bias.shape != (weight.shape[0],):
            raise ModelError(f"{where}: {prefix}{index} has weight {weight.shape} and bias {bias.shape}; a "
                             "Linear has weight (out, in) and bias (out,)")
        layers.append((index, prefix, weight, bias))
    return layers


def state_dict_to_weights(state: dict[str, np.ndarray], name: str, dim: int | None = None,
                          where: str = "state dict") -> PortableWeights:
    """Portable weights of a Linear/ReLU MLP state dict (see the module docstring for the ReLU rule)."""
    layers = mlp_layers(state, where)
    width = layers[0][2].shape[1]
    if dim is not None and width != dim:
        raise ModelError(f"{where}: the first Linear takes {width}-d input; {name} expects {dim}-d")
    for (index, prefix, weight, _), (_, _, following, _) in zip(layers, layers[1:]):
        if following.shape[1] != weight.shape[0]:
            raise ModelError(f"{where}: {prefix}{index} outputs {weight.shape[0]} values but the next Linear "
                             f"takes {following.shape[1]}")
    if layers[-1][2].shape[0] != 1:
        raise ModelError(f"{where}: the last Linear has {layers[-1][2].shape[0]} outputs; a head gives one "
                         "score per row (one output)")
    activations = tuple("relu" if following - index > 1 else "linear"
                        for (index, *_), (following, *_) in zip(layers, layers[1:])) + ("linear",)
    for kernel in (w for _, _, w, b in layers):
        if not np.isfinite(kernel).all():
            raise ModelError(f"{where}: a weight holds NaN or Inf")
    return PortableWeights.build(
        name=name, dim=width, mean=np.zeros(width, np.float32), variance=np.ones(width, np.float32),
        epsilon=1e-7, vocabularies={}, kernels=[np.ascontiguousarray(w.T) for _, _, w, _ in layers],
        biases=[b for *_, b in layers], activations=activations,
        metadata={"source_format": "torch state dict", "keys": sorted(state),
                  "score": "raw output of the last Linear (no sigmoid)"},
    )


def convert_state_dict_file(path: str | os.PathLike, name: str, registry: bool = False,
                            dim: int | None = None) -> PortableWeights:
    """Read ``path`` safely and convert it. ``registry=True`` (LAION's h14_nsfw.pth) also requires exactly
    clip-retrieval's H14_NSFW_Detector keys and shapes (``H14_KEYS``, ``H14_LAYERS``)."""
    state = read_state_dict(path)
    if registry:
        shapes = {f"layers.{i}.weight": (o, k) for i, k, o in H14_LAYERS} | {f"layers.{i}.bias": (o,) for i, _, o in H14_LAYERS}
        found = {k: v.shape for k, v in state.items()}
        if found != shapes:
            raise ModelError(f"{path} is not clip-retrieval's H14_NSFW_Detector: expected keys/shapes {shapes}, "
                             f"found {found}")
    weights = state_dict_to_weights(state, name, dim, str(path))
    if registry and weights.activations != H14_ACTIVATIONS:  # pragma: no cover - implied by the key check
        raise ModelError(f"{path}: activations {weights.activations} differ from {H14_ACTIVATIONS}")
    return weights
