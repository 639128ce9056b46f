"""The heads beside the Keras models: ViT-H/14 (torch state dict), the violence prompt heads, user state dicts,
several heads at once. torch is used here only as the reference (and to write .pth files); the package
reads them without it.
"""

import dataclasses
import hashlib
import http.server
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

from clip_nsfw_spark import load_scorer
from clip_nsfw_spark.cli.main import main
from clip_nsfw_spark.errors import ChecksumError, ConfigError, DimensionError, ModelError, UnsafeModelFileError
from clip_nsfw_spark.models.heads import HeadSpec, MultiScorer, describe_head, load_head, load_heads
from clip_nsfw_spark.models.cache import file_digests, prepare_model
from clip_nsfw_spark.models.registry import REGISTRY
from clip_nsfw_spark.scoring.prompts import BELOW_HALF, PromptScorer, argmax_rule, score_from_similarities
from clip_nsfw_spark.scoring.scorer import NumpyScorer
from clip_nsfw_spark.models.torch_weights import H14_KEYS, read_state_dict
from conftest import ROOT, SHARED_MODELS, needs_models
from helpers import h14_module

torch = pytest.importorskip("torch", reason="!!! torch (the 'test' extra) is needed as the reference here !!!")
nn = torch.nn

PROMPT_FILES = {"violence-l-14": "violence_detection_vit_l_14.npy", "violence-b-32": "violence_detection_vit_b_32.npy"}
needs_prompts = pytest.mark.skipif(
    not all((SHARED_MODELS / f).is_file() for f in PROMPT_FILES.values()),
    reason="!!! LAION's violence_detection_vit_*.npy are missing from ../shared/models; CI must run these !!!")


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def unit_rows(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def h14(tmp_path_factory):
    """(torch model, path of its state dict saved by torch.save as h14_nsfw.pth)."""
    torch.manual_seed(0)
    model = h14_module().eval()
    with torch.no_grad():  # He-normal weights: scores spread over ~0.35..0.65 on unit-norm rows, not ~1e-4
        for layer in model.layers:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, 0, (2 / layer.in_features) ** 0.5)
                nn.init.normal_(layer.bias, 0, 0.01)
        model.layers[16].bias += 0.5
    path = tmp_path_factory.mktemp("h14") / "h14_nsfw.pth"
    torch.save(model.state_dict(), path)
    return model, path


def torch_scores(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(x, np.float32))).numpy()[:, 0]


@pytest.fixture
def h14_cache(h14, tmp_path, monkeypatch):
    """Caches holding the synthetic h14_nsfw.pth, vit-h-14 pinned to its git blob id.

    CLIP_NSFW_CACHE is a private folder of links to the shared real models (so nothing here can touch the
    shared folder, even a refused file), plus the synthetic file. The writable cache stays the test run's
    (derived files are keyed by content, and the Keras models are converted there once per run).
    Returns (that folder, the blob id).
    """
    _, path = h14
    cache = tmp_path / "cache"
    cache.mkdir()
    for shared in SHARED_MODELS.glob("*"):
        # (not a lock file some other process left there: filelock refuses a linked one)
        if shared.name != "h14_nsfw.pth" and not shared.name.endswith(".lock"):
            (cache / shared.name).symlink_to(shared)
    shutil.copy(path, cache / "h14_nsfw.pth")
    monkeypatch.setenv("CLIP_NSFW_CACHE", str(cache))
    blob = git_blob_id(path.read_bytes())
    monkeypatch.setitem(REGISTRY, "vit-h-14", dataclasses.replace(REGISTRY["vit-h-14"], git_blob=blob))
    return cache, blob


# ------------------------------------------------------------------------------------------------ ViT-H/14


def test_h14_keys_are_clip_retrievals(h14):
    model, path = h14
    assert tuple(model.state_dict()) == H14_KEYS
    assert H14_KEYS[:4] == ("layers.0.weight", "layers.0.bias", "layers.3.weight", "layers.3.bias")
    assert H14_KEYS[-4:] == ("layers.15.weight", "layers.15.bias", "layers.16.weight", "layers.16.bias")
    state = read_state_dict(path)
    assert list(state) == list(H14_KEYS)
    for key, tensor in model.state_dict().items():
        assert state[key].dtype == np.float32 and np.array_equal(state[key], tensor.numpy())


def test_vit_h_14_matches_torch_on_unit_rows(h14, h14_cache):
    model, _ = h14
    scorer = load_scorer("open_clip:ViT-H-14")
    assert isinstance(scorer, NumpyScorer) and scorer.name == "vit-h-14" and scorer.dim == 1024
    assert scorer.weights.activations == ("relu",) * 5 + ("linear", "linear")
    assert np.array_equal(scorer.weights.mean, np.zeros(1024)) and np.array_equal(scorer.weights.variance, np.ones(1024))
    x = unit_rows(2000, 1024, 1)
    for rows in (x, x.astype(np.float16)):
        expected, found = torch_scores(model, rows), scorer(rows)
        assert found.dtype == np.float32
        assert expected.std() > 0.02  # the scores vary: a wrong layer would show far above 1e-6
        assert np.max(np.abs(found - expected)) <= 1e-6
    # A row's score does not depend on its batch.
    assert np.array_equal(scorer(x[:7]), scorer(x)[:7]) and np.array_equal(scorer(x[5:6]), scorer(x)[5:6])


def test_final_linear_layer_gives_the_raw_output_not_a_probability(tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 1)).eval()
    with torch.no_grad():
        model[2].weight.mul_(40)
    path = tmp_path / "wide.pth"
    torch.save(model.state_dict(), path)
    x = np.random.default_rng(2).normal(size=(500, 8)).astype(np.float32)
    expected, found = torch_scores(model, x), load_scorer(path)(x)
    assert found.min() < -1 and found.max() > 2  # not squashed to [0, 1], not clipped
    assert np.max(np.abs(found - expected)) <= 1e-6 * max(1.0, np.abs(expected).max())


def test_git_blob_id_is_gits(h14):
    _, path = h14
    assert file_digests(path)["git blob id"] == git_blob_id(path.read_bytes())
    if shutil.which("git"):
        out = subprocess.run(["git", "hash-object", str(path)], capture_output=True, text=True, check=True)
        assert out.stdout.strip() == git_blob_id(path.read_bytes())


def test_real_pin_refuses_another_file(h14, tmp_path, monkeypatch):
    """The registry's own pin (LAION's blob 5c5d8ec…): our synthetic file is not it, and is removed."""
    _, path = h14
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(path, cache / "h14_nsfw.pth")
    monkeypatch.setenv("CLIP_NSFW_CACHE", str(cache))
    monkeypatch.setenv("CLIP_NSFW_HOME", str(tmp_path / "home"))
    assert REGISTRY["vit-h-14"].git_blob == "5c5d8ecea5da82f9e6f1201692691f9f8874759d"
    with pytest.raises(ChecksumError, match=r"has git blob id [0-9a-f]{40}, but vit-h-14 is pinned to "
                                            r"5c5d8ecea5da82f9e6f1201692691f9f8874759d \(git blob id\)\. It was removed"):
        prepare_model("vit-h-14")
    assert not (cache / "h14_nsfw.pth").exists()
    assert not list((tmp_path / "home").glob("derived/*/*.npz"))  # nothing converted


def test_pin_is_checked_on_every_cached_use(h14_cache):
    cache, blob = h14_cache
    first = prepare_model("vit-h-14")
    assert first.sha256 == file_digests(cache / "h14_nsfw.pth")["sha256"]
    data = bytearray((cache / "h14_nsfw.pth").read_bytes())
    data[-100] ^= 1
    (cache / "h14_nsfw.pth").write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=f"pinned to {blob}"):
        prepare_model("vit-h-14")  # the converted file exists, but the source no longer matches
    assert not (cache / "h14_nsfw.pth").exists()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def mirror(tmp_path):
    """A flat HTTP mirror on loopback: (folder it serves, base URL)."""
    served = tmp_path / "served"
    served.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: _Quiet(*a, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield served, f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()


def test_download_from_a_flat_mirror_verifies_the_blob_id(h14, h14_cache, mirror, monkeypatch):
    cache, blob = h14_cache
    (cache / "h14_nsfw.pth").unlink()
    served, base = mirror
    monkeypatch.setenv("CLIP_NSFW_BASE_URL", base)
    data = h14[1].read_bytes()
    (served / "h14_nsfw.pth").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # a tampered copy
    with pytest.raises(ChecksumError, match=f"downloaded .*h14_nsfw.pth has git blob id .* expected {blob}"):
        prepare_model("vit-h-14")
    assert not [p.name for p in cache.iterdir() if p.name.startswith("h14") and not p.name.endswith(".lock")]
    (served / "h14_nsfw.pth").write_bytes(data)
    assert prepare_model("vit-h-14").source == cache / "h14_nsfw.pth"
    assert (cache / "h14_nsfw.pth").read_bytes() == data


# ------------------------------------------------------------------------------------- the safe reader


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _torch_zip_with_pickle(path: Path, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/version", "3\n")
    return path


def test_pickle_calling_os_system_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"0.weight": _Evil(marker)}, protocol=2)
    # The payload is live: plain pickle (in another process) runs it.
    probe = tmp_path / "probe"
    subprocess.run([sys.executable, "-c", f"import pickle; pickle.loads({pickle.dumps(_Evil(probe), protocol=2)!r})"],
                   check=True)
    assert probe.exists()
    evil = _torch_zip_with_pickle(tmp_path / "evil.pth", payload)
    with pytest.raises(UnsafeModelFileError, match=r"references (posix|os)\.system.*nothing was executed"):
        read_state_dict(evil)
    with pytest.raises(UnsafeModelFileError):
        load_scorer(evil)
    assert not marker.exists()


def test_whole_model_objects_and_other_globals_are_refused(tmp_path):
    torch.save(nn.Sequential(nn.Linear(4, 1)), tmp_path / "module.pth")  # the module, not its state dict
    with pytest.raises(UnsafeModelFileError, match=r"references torch\.nn\.modules"):
        read_state_dict(tmp_path / "module.pth")
    payload = pickle.dumps({"0.weight": eval}, protocol=2)
    with pytest.raises(UnsafeModelFileError, match=r"references (__builtin__|builtins)\.eval"):
        read_state_dict(_torch_zip_with_pickle(tmp_path / "eval.pth", payload))


def test_out_of_bounds_tensor_views_are_refused(tmp_path):
    torch.save({"0.weight": torch.ones(2, 3), "0.bias": torch.ones(2)}, tmp_path / "ok.pth")
    with zipfile.ZipFile(tmp_path / "ok.pth") as zf:
        members = {info.filename: zf.read(info) for info in zf.infolist()}
    data_pkl = next(n for n in members if n.endswith("/data.pkl"))
    storage = next(n for n in members if n.endswith("/data/0"))
    members[storage] = members[storage][:8]  # 2 floats where the pickle says 6
    with zipfile.ZipFile(tmp_path / "short.pth", "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    with pytest.raises(ModelError, match="storage 0 holds 8 bytes, expected 24"):
        read_state_dict(tmp_path / "short.pth")
    assert data_pkl.startswith("ok/")  # torch names the folder after the file; any folder name is read

    original = members[data_pkl]
    size, stride = b"K\x02K\x03\x86", b"K\x03K\x01\x86"  # BININT1 2, BININT1 3, TUPLE2: (2, 3) and (3, 1)
    assert original.count(size) == 1 and original.count(stride) == 1
    for patched, why in ((original.replace(size, b"K\xc8K\x03\x86"), "reaches element 599"),  # 200 rows
                         (original.replace(size, b"K\xc8K\x03\x86").replace(stride, b"K\x00K\x01\x86"),
                          "reaches element 2 of a storage of 6")):  # 600 elements read from 6 (stride 0)
        with zipfile.ZipFile(tmp_path / "view.pth", "w") as zf:
            for name, data in members.items():
                zf.writestr(name, {data_pkl: patched, storage: b"\0" * 24}.get(name, data))
        with pytest.raises(UnsafeModelFileError, match=why):
            read_state_dict(tmp_path / "view.pth")


def test_legacy_format_needs_torch_and_gives_the_same_tensors(h14, tmp_path):
    model, path = h14
    legacy = tmp_path / "legacy.pth"
    torch.save(model.state_dict(), legacy, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(legacy)
    new, old = read_state_dict(path), read_state_dict(legacy)
    assert list(new) == list(old) and all(np.array_equal(new[k], old[k]) for k in new)


def _write_safetensors(path: Path, tensors: dict) -> None:
    """The safetensors layout (u64 header length, JSON header, raw little-endian data), written by hand."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, array in tensors.items():
        raw = array.astype(array.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": {"float32": "F32", "float16": "F16"}[array.dtype.name], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def test_user_heads_of_other_sizes_pth_half_and_safetensors(tmp_path):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(512, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 32), nn.Linear(32, 1)).eval()
    x = unit_rows(300, 512, 4)
    expected = torch_scores(model, x)
    torch.save(model.state_dict(), tmp_path / "mine.pth")
    scorer = load_scorer(tmp_path / "mine.pth")
    assert scorer.name == "mine" and scorer.dim == 512
    assert scorer.weights.activations == ("relu", "linear", "linear")  # 0 → 3: ReLU; 3 → 4: none
    assert np.max(np.abs(scorer(x) - expected)) <= 1e-6

    tensors = {k: v.numpy() for k, v in model.state_dict().items()}
    tensors["0.weight"] = tensors["0.weight"].astype(np.float16)  # exact in float32 once read
    _write_safetensors(tmp_path / "mine.safetensors", tensors)
    from_st = load_scorer(tmp_path / "mine.safetensors")
    assert np.array_equal(from_st.weights.kernels[0], tensors["0.weight"].astype(np.float32).T)

    torch.save(model.half().state_dict(), tmp_path / "half.pth")  # HalfStorage
    half = read_state_dict(tmp_path / "half.pth")
    assert np.array_equal(half["0.weight"], model.state_dict()["0.weight"].float().numpy())

    torch.save({"weight": torch.ones(1, 4), "bias": torch.zeros(1)}, tmp_path / "linear.pth")  # one nn.Linear
    assert np.array_equal(load_scorer(tmp_path / "linear.pth")(np.eye(4, dtype=np.float32)), np.ones(4, np.float32))


def test_user_heads_that_are_not_one_output_mlps_are_refused(tmp_path):
    torch.save(nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2)).state_dict(), tmp_path / "two.pth")
    with pytest.raises(ModelError, match="the last Linear has 2 outputs"):
        load_scorer(tmp_path / "two.pth")
    torch.save({"conv.weight": torch.ones(3, 3), "conv.bias": torch.ones(3)}, tmp_path / "conv.pth")
    with pytest.raises(ModelError, match=r"key 'conv.weight' is not '<prefix><index>.weight\|bias'"):
        load_scorer(tmp_path / "conv.pth")
    torch.save({"fc1.weight": torch.ones(4, 8), "fc1.bias": torch.ones(4), "fc2.weight": torch.ones(1, 4),
                "fc2.bias": torch.ones(1)}, tmp_path / "named.pth")  # activations unknowable from the keys
    with pytest.raises(ModelError, match="key 'fc1.weight' is not"):
        load_scorer(tmp_path / "named.pth")
    torch.save(nn.Sequential(nn.Linear(8, 4), nn.Linear(5, 1)).state_dict(), tmp_path / "gap.pth")
    with pytest.raises(ModelError, match="0 outputs 4 values but the next Linear takes 5"):
        load_scorer(tmp_path / "gap.pth")


def test_executors_never_import_torch(h14, tmp_path):
    """A fresh interpreter converts a .pth (empty cache) and scores it, and scores a portable file's bytes."""
    _, path = h14
    code = ("import sys, numpy as np; from clip_nsfw_spark import load_scorer; "
            "from clip_nsfw_spark.scoring.scorer import scorer_from_portable; from clip_nsfw_spark.models.cache import prepare_model; "
            f"s = load_scorer({str(path)!r}); x = np.ones((3, 1024), np.float16) / 32; a = s(x); "
            f"b = scorer_from_portable(open(prepare_model({str(path)!r}).portable, 'rb').read())(x); "
            "assert (a == b).all(); "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'tensorflow', 'pyspark', 'safetensors')]; "
            "assert not bad, bad; print('ok')")
    env = dict(os.environ, CLIP_NSFW_HOME=str(tmp_path / "home"))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"
    assert len(list((tmp_path / "home").glob("derived/*/h14_nsfw.nsfw.npz"))) == 1


# ------------------------------------------------------------------------------------------ violence


@pytest.fixture(scope="module")
def violence():
    return {name: load_scorer(name) for name in PROMPT_FILES}


def realistic_rows(prompts: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Unit-norm rows near the prompts' span: cosine similarities ≈ 0.1–0.4, as CLIP image/text pairs have."""
    rng = np.random.default_rng(seed)
    mix = rng.uniform(0, 1, size=(n, 1))
    x = mix * prompts[0] + (1 - mix) * prompts[1]
    x = 0.25 * x / np.linalg.norm(x, axis=1, keepdims=True) + rng.normal(size=(n, prompts.shape[1])) / np.sqrt(prompts.shape[1])
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@needs_prompts
@pytest.mark.parametrize("name", list(PROMPT_FILES))
def test_violence_score_equals_the_argmax_rule(violence, name):
    scorer = violence[name]
    prompts = np.load(SHARED_MODELS / PROMPT_FILES[name])
    assert isinstance(scorer, PromptScorer) and scorer.dim == prompts.shape[1]
    assert np.array_equal(scorer.head.prompts, prompts)
    x = realistic_rows(prompts, 20000, 5)
    p0, p1 = prompts.astype(np.float32)
    crafted = [np.zeros_like(p0), p0, -p0, p1, -p1, p0 + p1, p0 - p1, np.full_like(p0, np.nan)]
    # Rows at the decision boundary: bisect along p0 → p1 until the float32 similarities cross.
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        row = ((1 - mid) * p0 + mid * p1).astype(np.float32)[None]
        s = scorer.similarities(row)[0]
        lo, hi = (mid, hi) if s[1] <= s[0] else (lo, mid)
    for t in np.linspace(lo - 1e-6, hi + 1e-6, 41):
        crafted.append(((1 - t) * p0 + t * p1).astype(np.float32))
    # Exact ties away from 0: one component c·e_k whose two products round to the same subnormal float32.
    ties = [np.where(np.arange(len(p0)) == k, c, np.float32(0)).astype(np.float32)
            for c in (np.float32(2.0 ** -e) for e in range(125, 150))
            for k in np.flatnonzero((c * p0 == c * p1) & (c * p0 != 0))[:1]]
    assert len(ties) >= 3
    tie_sims = scorer.similarities(np.array(ties))
    assert np.all(tie_sims[:, 0] == tie_sims[:, 1]) and np.all(tie_sims[:, 0] != 0)
    assert np.all(scorer(np.array(ties)) == BELOW_HALF)
    basis = np.eye(len(p0), dtype=np.float32)  # b-32's prompts share component 465: an exact tie at 1.0 scale
    rows = np.concatenate([x, np.array(crafted, np.float32), np.array(ties), basis,
                           x[:500].astype(np.float16).astype(np.float32)])
    sims = scorer.similarities(rows)
    scores = scorer(rows)
    assert np.array_equal(scores >= 0.5, np.argmax(sims, axis=1) == 1)
    assert np.array_equal(argmax_rule(sims), np.argmax(sims, axis=1) == 1)
    assert 0.2 < np.mean(scores >= 0.5) < 0.8 and scores.min() >= 0 and scores.max() <= 1
    boundary = scores[len(x) + 8: len(x) + 8 + 41]
    assert set(np.unique(boundary >= 0.5)) == {False, True}  # the bisection rows straddle the boundary
    assert scores[len(x)] == BELOW_HALF and scores[len(x) + 7] == BELOW_HALF  # x = 0 and the NaN row: a tie
    assert scores[len(x) + 1] < 0.5 < scores[len(x) + 3]  # p0 is not violent, p1 is
    # The same scores one row at a time, and from float16 input.
    assert np.array_equal(np.concatenate([scorer(r[None]) for r in rows[-600:]]), scores[-600:])
    assert np.array_equal(scorer(x[:500].astype(np.float16)), scores[-500:])
    # BLAS (clip-retrieval's own x @ prompts.T) disagrees only where the similarities nearly tie.
    blas = x @ prompts.T
    differ = (np.argmax(blas, axis=1) == 1) != (scores[:len(x)] >= 0.5)
    assert np.all(np.abs(blas[differ, 1] - blas[differ, 0]) < 1e-5)


def test_score_from_similarities_on_ties_near_ties_and_non_finite():
    up = lambda v: np.nextafter(np.float32(v), np.float32(np.inf))  # noqa: E731
    sims = np.array([[0.25, 0.25], [0.25, up(0.25)], [up(0.25), 0.25], [0.0, 0.0], [-0.0, 0.0], [0.0, -0.0],
                     [1e-45, 0.0], [0.0, 1e-45], [0.2, 0.3], [0.3, 0.2], [np.inf, np.inf], [-np.inf, np.inf],
                     [np.inf, -np.inf], [np.nan, 0.3], [0.3, np.nan], [np.nan, np.nan], [-5.0, 5.0]], np.float32)
    rule = np.argmax(sims, axis=1) == 1
    scores = score_from_similarities(sims)
    assert np.array_equal(scores >= 0.5, rule)
    assert scores.dtype == np.float32 and not np.isnan(scores).any()
    assert scores[0] == BELOW_HALF and scores[3] == BELOW_HALF and scores[4] == BELOW_HALF  # exact ties
    assert 0.5 < scores[1] < 0.500001 and 0.499999 < scores[2] < 0.5  # one ulp apart: softmax still decides
    assert scores[6] == BELOW_HALF and scores[7] == 0.5  # exp rounds to 1: moved to the rule's side
    assert scores[10] == BELOW_HALF and scores[11] == 1.0 and scores[12] == 0.0  # inf - inf is a tie
    assert scores[13] == BELOW_HALF and scores[14] == 0.5 and scores[15] == BELOW_HALF  # NaN: where argmax puts it
    assert scores[8] == pytest.approx(1 / (1 + np.exp(-10)), abs=1e-7) and scores[16] == 1.0


@needs_prompts
def test_prompt_head_portable_bytes_anddescribe_head(violence):
    for name, file in PROMPT_FILES.items():
        info = describe_head(name)
        assert info["kind"] == "prompts" and info["score_column"] == "pviolence" and info["threshold"] == 0.5
        assert info["pin"] == {"sha256": REGISTRY[name].sha256} and info["dim"] == violence[name].dim
        assert info["url"] == f"https://github.com/LAION-AI/CLIP-based-NSFW-Detector/raw/main/{file}"


# ------------------------------------------------------------------------------------ several heads


@needs_models
@needs_prompts
def test_multi_scorer_vit_l_14_and_violence(violence, scorers):
    multi = load_heads(["vit-l-14", "violence-l-14"])
    assert multi.columns == ("punsafe", "pviolence") and multi.dim == 768
    x = realistic_rows(violence["violence-l-14"].head.prompts, 600, 6).astype(np.float16)
    matrix = multi.scores(x)
    assert matrix.shape == (600, 2) and matrix.dtype == np.float32
    assert np.array_equal(matrix[:, 0], scorers["vit-l-14"](x)) and np.array_equal(matrix[:, 1], violence["violence-l-14"](x))
    assert np.array_equal(pickle.loads(pickle.dumps(multi)).scores(x), matrix)  # ships to executors as is
    by_column = multi(x)
    assert list(by_column) == ["punsafe", "pviolence"] and np.array_equal(by_column["pviolence"], matrix[:, 1])
    strict = MultiScorer([load_head("vit-l-14", threshold=0.1), load_head(HeadSpec("violence-l-14", "violent", 0.9))])
    assert strict.columns == ("punsafe", "violent")
    assert np.array_equal(strict.unsafe(matrix), (matrix[:, 0] >= 0.1) | (matrix[:, 1] >= 0.9))
    assert np.array_equal(multi.flagged(np.array([[0.5, BELOW_HALF]], np.float32)), [[True, False]])
    # exactly, as the job compares: a float32 score just below a threshold that rounds to it is not flagged
    score = np.float32(0.22037065)
    above = float(np.nextafter(float(score), 1.0))
    edge = MultiScorer([load_head("vit-l-14", threshold=above), load_head("violence-l-14", threshold=float(score))])
    assert np.array_equal(edge.flagged(np.array([[score, score]], np.float32)), [[False, True]])


@needs_models
@needs_prompts
def test_multi_scorer_errors_name_heads_and_widths(h14_cache):
    with pytest.raises(DimensionError, match="must share the embedding width; vit-l-14 expects 768-d, "
                                             "violence-b-32 expects 512-d"):
        load_heads(["vit-l-14", "violence-b-32"])
    multi = load_heads(["vit-h-14", HeadSpec("vit-h-14", score_column="punsafe_again")])
    with pytest.raises(DimensionError, match=r"heads vit-h-14, vit-h-14 expect 1024-d embeddings, found 768-d"
                                             r".*'vit-l-14'"):
        multi(np.zeros((2, 768), np.float32))
    with pytest.raises(ConfigError, match=r"same score column \(vit-l-14 → punsafe, vit-l-14 → punsafe\)"):
        load_heads(["vit-l-14", "vit-l-14"])
    with pytest.raises(DimensionError, match="violence-l-14 expects 768-d .* found 1024-d"):
        load_scorer("violence-l-14")(np.zeros((1, 1024), np.float32))


@needs_models
@needs_prompts
def test_model_info_and_cli_for_each_head(h14_cache, capsys):
    info = describe_head("ViT-H/14")
    assert info["name"] == "vit-h-14" and info["kind"] == "torch-state-dict" and info["dim"] == 1024
    assert info["pin"] == {"git blob id": h14_cache[1]} and info["score_column"] == "punsafe"
    assert info["layers"] == [[1024, 1024], [1024, 2048], [2048, 1024], [1024, 256], [256, 128], [128, 16], [16, 1]]
    assert main(["model", "info", "vit-b-32", "violence-b-32", "--json"]) == 0
    infos = json.loads(capsys.readouterr().out)
    assert [(i["name"], i["kind"], i["dim"]) for i in infos] == [("vit-b-32", "keras-zip", 512),
                                                                 ("violence-b-32", "prompts", 512)]
    assert main(["model", "fetch", "violence-l-14"]) == 0
    assert capsys.readouterr().out.startswith("violence-l-14: ready (768-d, sha256 cc08f81e")
    with pytest.raises(Exception, match="no TensorFlow graph"):
        load_scorer("violence-l-14", backend="tensorflow")


@needs_models
@needs_prompts
def test_evaluate_violence_next_to_vit_l_14(tmp_path, violence):
    from clip_nsfw_spark.tools.evaluate import evaluate, load_labelled
    from clip_nsfw_spark.tools.sample import write_labelled_sample

    write_labelled_sample(str(tmp_path / "data"), 200, 768, 0)
    report = evaluate(["vit-l-14", "violence-l-14"], str(tmp_path / "data"), tmp_path / "out", thresholds=(0.5,))
    assert list(report["models"]) == ["vit-l-14", "violence-l-14"]
    data = load_labelled(tmp_path / "data")
    expected = violence["violence-l-14"](data.embeddings)
    porn = report["models"]["violence-l-14"]["per_class"]["porn"]
    assert porn["mean_score"] == pytest.approx(float(expected[data.classes == "porn"].mean()), abs=1e-6)
    assert porn["flagged"]["0.5"] == pytest.approx(float(np.mean(expected[data.classes == "porn"] >= 0.5)))
    assert "| violence-l-14 |" in (tmp_path / "out" / "report.md").read_text()


@needs_models
def test_one_head_type_and_one_threshold_rule_from_registry_to_executor(monkeypatch):
    """The head's own threshold, else the run's, else the registry's; the job, load_head and the DataFrame
    functions all get the same contract.Head, whose bytes alone rebuild the scorer on an executor."""
    from clip_nsfw_spark.contract import Head
    from clip_nsfw_spark.driver.config import JobConfig
    from clip_nsfw_spark.driver.job import resolve_heads
    from clip_nsfw_spark.models.heads import resolve_head
    from clip_nsfw_spark.scoring.scorer import scorer_from_portable

    monkeypatch.setitem(REGISTRY, "vit-l-14", dataclasses.replace(REGISTRY["vit-l-14"], threshold=0.7))
    assert resolve_head("vit-l-14").threshold == 0.7  # the registry's
    assert resolve_head("vit-l-14", run_threshold=0.3).threshold == 0.3  # the run's over the registry's
    assert resolve_head(HeadSpec("vit-l-14", threshold=0.9), run_threshold=0.3).threshold == 0.9  # its own
    assert load_head("vit-l-14").threshold == 0.7 and load_head("vit-l-14", threshold=0.2).threshold == 0.2
    (job_head,) = resolve_heads(JobConfig(input="in", output="out", threshold=0.4))
    assert isinstance(job_head, Head) and job_head == resolve_head("vit-l-14", 0.4)
    assert (job_head.name, job_head.score_column, job_head.dim) == ("vit-l-14", "punsafe", 768)
    assert scorer_from_portable(job_head.data).dim == job_head.dim  # the width read without packing agrees
    restored = pickle.loads(pickle.dumps(job_head))
    assert restored == job_head and restored.data == job_head.data
