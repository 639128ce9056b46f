"""The fixed summation order: the kernel computes exactly the documented order, and the same bits whatever
the batch size, thread, process, or CPU target the kernel was compiled for."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import numpy as np
import pytest

from clip_nsfw_spark.errors import ModelError
from clip_nsfw_spark.scoring.kernels import K_BLOCK, dense, dense_reference, sigmoid
from clip_nsfw_spark.scoring.weights import FORMAT, ORDER, PortableWeights
from conftest import ROOT, needs_models


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


@pytest.mark.parametrize("n", [1, 5, 11, 12, 13, 25, 40])
@pytest.mark.parametrize("k,m", [(0, 3), (1, 1), (5, 2), (255, 17), (256, 33), (257, 64), (768, 64), (64, 512),
                                 (512, 256), (256, 1), (32, 1)])
def test_dense_is_the_documented_order(n, k, m):
    """The register-tiled kernel against a plain scalar loop written straight from the documented order."""
    rng = np.random.default_rng(n * 1000 + k + m)
    x = rng.normal(size=(n, k)).astype(np.float32)
    kernel = rng.normal(size=(k, m)).astype(np.float32)
    bias = rng.normal(size=m).astype(np.float32)
    for relu in (False, True):
        found = dense(x, kernel, bias, relu)
        assert found.shape == (n, m) and found.dtype == np.float32
        assert np.array_equal(_bits(found), _bits(dense_reference(x, kernel, bias, relu)))


def test_dense_default_call_shape_and_special_values():
    """dense(x, kernel, bias) works without ``relu``; NaN propagates, ±inf behave as in IEEE."""
    x = np.array([[1.0, 2.0], [np.nan, 1.0], [np.inf, 1.0], [-0.0, -0.0]], np.float32)
    kernel = np.array([[1.0, -1.0], [0.5, 2.0]], np.float32)
    out = dense(x, kernel, np.zeros(2, np.float32))
    assert out.shape == (4, 2)
    assert out[0].tolist() == [2.0, 3.0]
    assert np.isnan(out[1]).all()
    assert out[2].tolist() == [np.inf, -np.inf]
    assert out[3].tolist() == [0.0, 0.0]
    assert np.array_equal(dense(x, kernel, np.zeros(2, np.float32), relu=True)[2], [np.inf, 0.0])


def _round_float32(q: Fraction) -> Fraction:
    """Round an exact rational to the nearest float32 (ties to even); normal range only."""
    if q == 0:
        return Fraction(0)
    sign, q = (-1 if q < 0 else 1), abs(q)
    e = q.numerator.bit_length() - q.denominator.bit_length()
    if Fraction(2) ** e > q:
        e -= 1
    assert -126 <= e <= 127
    ulp = Fraction(2) ** (e - 23)
    whole, rest = divmod(q, ulp)
    if rest > ulp / 2 or (rest == ulp / 2 and whole % 2 == 1):
        whole += 1
    return sign * whole * ulp


def test_order_checked_in_exact_rational_arithmetic():
    """Independent of LLVM: each FMA and addition re-done exactly with fractions and rounded once to float32."""
    rng = np.random.default_rng(7)
    k, m = 2 * K_BLOCK + 37, 3
    x = rng.normal(size=(2, k)).astype(np.float32)
    kernel = rng.normal(size=(k, m)).astype(np.float32)
    bias = rng.normal(size=m).astype(np.float32)
    found = dense(x, kernel, bias)
    for i in range(2):
        for j in range(m):
            total = None
            for start in range(0, k, K_BLOCK):
                block = Fraction(0)
                for kk in range(start, min(start + K_BLOCK, k)):
                    block = _round_float32(Fraction(float(x[i, kk])) * Fraction(float(kernel[kk, j])) + block)
                total = block if total is None else _round_float32(total + block)
            expected = _round_float32(total + Fraction(float(bias[j])))
            assert Fraction(float(found[i, j])) == expected, (i, j)


def test_sigmoid_rule():
    """float32(1 / (1 + exp(-z))) from float64: within one float32 step of numpy's float64 formula, NaN kept."""
    z = np.concatenate([np.linspace(-110, 30, 200_001), [0.0, -0.0, 88.5, -88.5, 1e30, -1e30]]).astype(np.float32)
    found = sigmoid(z[:, None])
    with np.errstate(over="ignore"):
        expected = (1.0 / (1.0 + np.exp(-z.astype(np.float64)))).astype(np.float32)
    steps = np.abs(found.view(np.int32).astype(np.int64) - expected.view(np.int32).astype(np.int64))
    assert steps.max() <= 1 and np.mean(steps == 0) > 0.999
    assert found[-2] == 1.0 and found[-1] == 0.0
    assert np.isnan(sigmoid(np.array([[np.nan]], np.float32)))[0]
    assert sigmoid(np.array([[0.5]], np.float32), np.array([-0.5], np.float32))[0] == 0.5


def test_weights_name_their_order_and_older_formats_are_refused(tmp_path):
    weights = PortableWeights.build(name="tiny", dim=2, mean=np.zeros(2), variance=np.ones(2), epsilon=1e-7,
                                    vocabularies={}, kernels=[np.ones((2, 1))], biases=[np.zeros(1)],
                                    activations=["sigmoid"])
    path = tmp_path / "tiny.nsfw.npz"
    weights.save(path)
    assert PortableWeights.load(path).order == ORDER
    with np.load(path, allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.files}
    arrays["format"] = np.array(FORMAT.replace("/v2", "/v1"))
    old = tmp_path / "old.nsfw.npz"
    np.savez(old, **arrays)
    with pytest.raises(ModelError, match="v1 files used a machine-dependent summation order"):
        PortableWeights.load(old)
    from clip_nsfw_spark.scoring.scorer import NumpyScorer

    assert NumpyScorer(weights)(np.ones((3, 2), np.float16)).tolist() == [sigmoid(np.full((1, 1), 2.0))[0]] * 3
    with pytest.raises(ModelError, match="made for summation order 'another'"):
        NumpyScorer(dataclasses.replace(weights, order="another"))


def test_the_model_cache_key_names_the_weights_format():
    from clip_nsfw_spark.models import cache as models
    from clip_nsfw_spark.scoring.weights import FORMAT_VERSION

    name = models.derived_dir("ab" * 32).name
    assert name.startswith(f"{'ab' * 8}-w{FORMAT_VERSION}-")
    models.ORDER = "another order"
    try:
        assert models.derived_dir("ab" * 32).name != name
    finally:
        models.ORDER = ORDER


# ----------------------------------------------------------------------------------- real models

@needs_models
@pytest.mark.parametrize("model", ["vit-l-14", "vit-b-32"])
def test_same_bits_for_any_batch_size_and_thread(model, scorers):
    scorer = scorers[model]
    rng = np.random.default_rng(6)
    x = rng.normal(size=(100_003, scorer.dim))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    whole = _bits(scorer(x))
    assert np.array_equal(_bits(scorer(x[:1])), whole[:1])
    assert np.array_equal(_bits(np.concatenate([scorer(x[s:s + 7]) for s in range(0, 2996, 7)])), whole[:2996])
    assert np.array_equal(_bits(np.concatenate([scorer(x[s:s + 1024]) for s in range(0, 10240, 1024)])),
                          whole[:10240])
    cuts = np.sort(rng.choice(np.arange(1, len(x)), size=40, replace=False))
    parts = np.split(np.arange(len(x)), cuts)
    with ThreadPoolExecutor(4) as pool:
        scored = list(pool.map(lambda rows: scorer(x[rows]), parts))
    assert np.array_equal(_bits(np.concatenate(scored)), whole)


def _every_float16(dim: int) -> np.ndarray:
    """Every float16 bit pattern (NaN payloads, ±Inf, subnormals, -0.0 included), as rows of width dim."""
    patterns = np.arange(1 << 16, dtype=np.uint16)
    return np.resize(patterns, (-(-len(patterns) // dim), dim)).view(np.float16)


@needs_models
@pytest.mark.parametrize("model", ["vit-l-14", "vit-b-32"])
def test_float16_rows_encode_and_score_as_their_float32_values(model, scorers):
    """float16 input is converted in the kernel (by the CPU's instruction where it has one, else a table):
    the features and the scores are those of the same values given as float32 (numpy's exact widening), for
    every float16 bit pattern, in the categorical columns too (the LAION heads have five)."""
    scorer = scorers[model]
    assert len(scorer.weights.categorical) > 0
    x16 = _every_float16(scorer.dim)
    x32 = x16.astype(np.float32)
    assert np.array_equal(_bits(scorer.encode(x16)), _bits(scorer.encode(x32)))
    assert np.array_equal(_bits(scorer(x16)), _bits(scorer(x32)))
    # every pattern in the categorical columns too, where a value in a vocabulary interval takes its code
    columns = [c.column for c in scorer.weights.categorical]
    patterns = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    hits = 0
    for start in range(0, len(patterns), 8192):
        rows = np.zeros((8192, scorer.dim), np.float16)
        rows[:, columns] = patterns[start:start + 8192, None]
        features = scorer.encode(rows)
        assert np.array_equal(_bits(features), _bits(scorer.encode(rows.astype(np.float32))))
        unknown = (np.float32(0) - scorer._mean[columns]) / scorer._scale[columns]  # code 0: not in a vocabulary
        hits += int(np.count_nonzero(features[:, columns] != unknown))
    assert hits > 100  # the lookups really ran on these values


@needs_models
def test_the_float16_code_table_is_built_once_never_pickled_and_optional(scorers, monkeypatch):
    """Each categorical column's code of every float16 is tabled on the first float16 call (256 KB a column),
    left out of a pickled scorer, and past MAX_TABLED_COLUMNS the kernel searches instead: the same bits."""
    import pickle

    from clip_nsfw_spark.scoring import scorer as scorer_module

    model = scorers["vit-l-14"]
    x16 = _every_float16(model.dim)
    expected = _bits(model(x16))
    assert model._codes16.shape == (len(model.weights.categorical), 1 << 16)
    copy = pickle.loads(pickle.dumps(model))
    assert copy._codes16 is None and len(pickle.dumps(model)) < len(pickle.dumps(model.__dict__)) - 1_000_000
    assert np.array_equal(_bits(copy(x16)), expected) and copy._codes16.shape == model._codes16.shape
    monkeypatch.setattr(scorer_module, "MAX_TABLED_COLUMNS", 0)
    searched = pickle.loads(pickle.dumps(model))
    assert np.array_equal(_bits(searched(x16)), expected) and searched._codes16.shape == (len(model._columns), 0)
    rows = np.zeros((1 << 16, model.dim), np.float16)
    rows[:, model._columns] = np.arange(1 << 16, dtype=np.uint16).view(np.float16)[:, None]
    assert np.array_equal(_bits(searched.encode(rows)), _bits(model.encode(rows)))


_FREED_CHILD = textwrap.dedent("""
    import numpy as np
    from clip_nsfw_spark.scoring.kernels import _MR, dense, dense_reference
    rng = np.random.default_rng(0)
    for rows in (1, _MR - 1, _MR + 1, 3 * _MR + 5):  # each with padded last rows
        x = rng.normal(size=(rows, 300)).astype(np.float32)
        kernel, bias = rng.normal(size=(300, 40)).astype(np.float32), rng.normal(size=40).astype(np.float32)
        assert np.array_equal(dense(x, kernel, bias).view(np.uint32),
                              dense_reference(x, kernel, bias, False).view(np.uint32)), rows
    print("same")
""")


def test_no_kernel_reads_a_buffer_numba_has_freed(tmp_path):
    """With NUMBA_DEBUG_NRT=1 numba fills every block it frees with 0xDE bytes: a kernel that reads memory after
    numba freed it gets those bytes, deterministically, in one thread. The padded last rows of a call were
    read that way (the padding buffer freed before the tiles read it through its address): this failed
    then on every row count that is not a multiple of the register tile's height."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")} | {
        "NUMBA_DEBUG_NRT": "1", "NUMBA_CACHE_DIR": str(tmp_path / "numba"), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", _FREED_CHILD], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "same", done.stderr[-3000:]


_THREADS_CHILD = textwrap.dedent("""
    import sys, threading
    from concurrent.futures import ThreadPoolExecutor
    import numpy as np
    from clip_nsfw_spark import load_scorer
    from clip_nsfw_spark.scoring import kernels
    scorer = load_scorer(sys.argv[1])
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4000, scorer.dim))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    whole = scorer(x).view(np.uint32)
    stop = threading.Event()

    def churn():  # another thread allocating (and filling) blocks the size of a padded tile
        while not stop.is_set():
            block = np.empty((kernels._MR, scorer.dim), np.float32)
            block.fill(np.nan)

    for thread in [threading.Thread(target=churn, daemon=True) for _ in range(2)]:
        thread.start()
    wrong = 0
    with ThreadPoolExecutor(4) as pool:
        for _ in range(int(sys.argv[2])):
            slices = list(zip(rng.integers(0, 3000, size=16), rng.integers(1, 30, size=16)))
            for (start, size), got in zip(slices, pool.map(lambda a: scorer(x[a[0]:a[0] + a[1]]), slices)):
                wrong += not np.array_equal(got.view(np.uint32), whole[start:start + size])
    stop.set()
    print(wrong)
""")


@needs_models
def test_threads_scoring_at_once_while_others_allocate_get_the_same_bits(prepared_models):
    """Calls whose last rows are padded to a whole register tile, from 4 threads at once, while 2 more threads
    allocate and fill blocks of that tile's size, all in one malloc arena (MALLOC_ARENA_MAX=1: a block one
    thread frees is the next another takes). The kernel once freed its padding buffer before its tiles read
    it (numba does not count a read through an address as a use): here half the calls came back wrong."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")} | {
        "MALLOC_ARENA_MAX": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", _THREADS_CHILD, str(prepared_models["vit-l-14"].portable), "100"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "0"


_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    from clip_nsfw_spark import load_scorer
    from clip_nsfw_spark.scoring import kernels
    out, rows = sys.argv[1], int(sys.argv[2])
    scores = {}
    for name, path in json.loads(sys.argv[3]).items():
        scorer = load_scorer(path)
        x = np.random.default_rng(5).normal(size=(rows, scorer.dim))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        scores[name] = np.concatenate([scorer(x.astype(np.float16)), scorer(x.astype(np.float32)),
                                       scorer(x * 30)]).view(np.uint32)
        patterns = np.resize(np.arange(1 << 16, dtype=np.uint16), (-(-65536 // scorer.dim), scorer.dim))
        scores[name + "/every float16"] = scorer(patterns.view(np.float16)).view(np.uint32)
    asm = "\\n".join(kernels.gemm_panels.inspect_asm().values())
    encode_asm = "\\n".join(kernels.encode_rows.inspect_asm().values())
    fmas = [line.split()[-1] for line in asm.splitlines() if line.strip().startswith("vfmadd")]
    np.savez(out, **scores)
    print(json.dumps({"tile": [kernels._MR, kernels._NV, kernels._L],
                      "fma_registers": sorted({r.strip("%")[:3] for r in fmas}),
                      "fmaf_calls": asm.count("fmaf"),
                      "half_in_hardware": kernels._HALF_IN_HARDWARE,
                      "half_conversions": encode_asm.count("vcvtph2ps")}))
""")


def _child(tmp_path, label, env_extra, portables, rows):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env.update(env_extra, NUMBA_CACHE_DIR=str(tmp_path / f"numba-{label}"), PYTHONPATH=str(ROOT))
    out = tmp_path / f"{label}.npz"
    done = subprocess.run([sys.executable, "-c", _CHILD, str(out), str(rows), json.dumps(portables)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(out) as npz:
        return json.loads(done.stdout.strip().splitlines()[-1]), {k: npz[k] for k in npz.files}


@needs_models
def test_same_bits_across_processes_and_cpu_targets(tmp_path, prepared_models, scorers):
    """The kernel compiled for the host (AVX-512 here), for x86-64-v3 (AVX2 + FMA) and for baseline x86-64
    (no FMA unit: llvm.fma becomes a correctly rounded libm call), each in its own process and numba cache."""
    portables = {name: str(p.portable) for name, p in prepared_models.items()}
    host_info, host = _child(tmp_path, "host", {}, portables, 3000)
    v3_info, v3 = _child(tmp_path, "v3", {"NUMBA_CPU_NAME": "x86-64-v3", "NUMBA_CPU_FEATURES": ""}, portables, 3000)
    base_info, base = _child(tmp_path, "base", {"NUMBA_CPU_NAME": "x86-64", "NUMBA_CPU_FEATURES": ""},
                             portables, 300)
    print("\nhost", host_info, "\nx86-64-v3", v3_info, "\nx86-64", base_info)
    assert v3_info["fma_registers"] == ["ymm"], v3_info  # really another code path than the host's …
    assert base_info["fmaf_calls"] > 0 and not base_info["fma_registers"], base_info  # … and no FMA unit
    # float16 converted by the CPU (x86-64-v3 has F16C) and through the table (baseline x86-64): same bits
    assert v3_info["half_in_hardware"] and v3_info["half_conversions"] > 0, v3_info
    assert not base_info["half_in_hardware"] and base_info["half_conversions"] == 0, base_info
    # x86-64-v3 with F16C taken away (NUMBA_CPU_FEATURES applies on top of the name, as numba passes it to LLVM):
    # the table, not a conversion the JIT cannot link (a review found the process aborting)
    no_f16c_info, no_f16c = _child(tmp_path, "v3-no-f16c",
                                   {"NUMBA_CPU_NAME": "x86-64-v3", "NUMBA_CPU_FEATURES": "-f16c"}, portables, 30)
    assert not no_f16c_info["half_in_hardware"] and no_f16c_info["half_conversions"] == 0, no_f16c_info
    for name, scorer in scorers.items():
        assert np.array_equal(host[name], v3[name]), name
        every = name + "/every float16"
        assert np.array_equal(host[every], v3[every]) and np.array_equal(host[every], base[every]), name
        assert np.array_equal(host[every], no_f16c[every]), name
        assert np.array_equal(host[every], _bits(scorer(_every_float16(scorer.dim)))), name
        three = host[name].reshape(3, -1)
        assert np.array_equal(no_f16c[name].reshape(3, -1), three[:, :30]), name
        assert np.array_equal(base[name].reshape(3, -1), three[:, :300]), name
        x = np.random.default_rng(5).normal(size=(3000, scorer.dim))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        assert np.array_equal(three[0], _bits(scorer(x.astype(np.float16)))), name  # and this process
