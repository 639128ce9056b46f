"""weights.py: the portable ``.npz`` round trip, refused files, and the helpers the vocabulary lookup rests on
(sortable int32 keys, ``"%f"`` printing, the float32 interval each vocabulary key covers).

Small hand-built weights, no TensorFlow, no Spark, no model download.
"""

import json
import os
import stat

import numpy as np
import pytest

from clip_nsfw_spark.errors import ModelError
from clip_nsfw_spark.scoring.weights import (
    FORMAT,
    ORDER,
    PortableWeights,
    float32_from_sortable,
    format_f,
    sortable_int32,
    vocabulary_intervals,
)

KEYS = ["0.000000", "0.500000", "-1.250000", "0.007812", "123.456001"]


def tiny(**changes) -> PortableWeights:
    """A 3-d, two-layer model with a vocabulary on column 1 (codes 1..5, unknown 0)."""
    rng = np.random.default_rng(0)
    values = dict(name="tiny", dim=3, mean=[0.1, 0.2, 0.3], variance=[1.0, 2.0, 0.5], epsilon=1e-7,
                  vocabularies={1: (KEYS, [1, 2, 3, 4, 5], 0)},
                  kernels=[rng.normal(size=(3, 4)), rng.normal(size=(4, 1))], biases=[np.zeros(4), [0.25]],
                  activations=["relu", "sigmoid"], metadata={"source": "test", "rows": 3})
    return PortableWeights.build(**(values | changes))


def assert_same(a: PortableWeights, b: PortableWeights) -> None:
    assert (a.name, a.dim, a.epsilon, a.activations, a.order, a.metadata) == \
           (b.name, b.dim, b.epsilon, b.activations, b.order, b.metadata)
    for x, y in [(a.mean, b.mean), (a.variance, b.variance), *zip(a.kernels, b.kernels), *zip(a.biases, b.biases)]:
        assert x.dtype == y.dtype == np.float32 and np.array_equal(x, y)
    assert len(a.categorical) == len(b.categorical)
    for c, d in zip(a.categorical, b.categorical):
        assert (c.column, c.keys, c.default) == (d.column, d.keys, d.default)
        for name in ("codes", "lo", "hi", "interval_codes"):
            assert getattr(c, name).dtype == getattr(d, name).dtype
            assert np.array_equal(getattr(c, name), getattr(d, name)), name


def test_save_and_load_round_trip_every_field(tmp_path):
    weights = tiny()
    path = tmp_path / "sub" / "tiny.nsfw.npz"
    weights.save(path)
    assert_same(PortableWeights.load(path), weights)
    assert_same(PortableWeights.load(path.read_bytes()), weights)  # executors get the bytes
    assert PortableWeights.load(path).order == ORDER
    assert os.listdir(path.parent) == ["tiny.nsfw.npz"]  # written under a temporary name, then renamed
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    with np.load(path, allow_pickle=False) as npz:  # the documented layout: plain arrays and a JSON header
        assert str(npz["format"]) == FORMAT
        header = json.loads(str(npz["header"]))
        assert header["layers"] == 2 and header["categorical_columns"] == [1] and header["order"] == ORDER


def test_saving_again_replaces_the_file_whole(tmp_path):
    path = tmp_path / "w.nsfw.npz"
    tiny().save(path)
    other = tiny(name="other", vocabularies={})
    other.save(path)
    assert_same(PortableWeights.load(path), other)


def test_refused_files_say_what_was_found_and_expected(tmp_path):
    path = tmp_path / "w.nsfw.npz"
    tiny().save(path)
    with np.load(path, allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.files}
    old = tmp_path / "v1.npz"
    np.savez(old, **(arrays | {"format": np.array("clip-nsfw-spark/portable-weights/v1")}))
    with pytest.raises(ModelError, match=r"unsupported portable weights format "
                                         r"'clip-nsfw-spark/portable-weights/v1'; expected "
                                         r"'clip-nsfw-spark/portable-weights/v2'.*Convert the model again"):
        PortableWeights.load(old)
    unnamed = tmp_path / "unnamed.npz"
    np.savez(unnamed, **{k: v for k, v in arrays.items() if k != "format"})
    with pytest.raises(ModelError, match=r"format 'None'; expected"):
        PortableWeights.load(unnamed)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip at all")
    with pytest.raises(ModelError, match=r"garbage.npz is not a portable weights file"):
        PortableWeights.load(garbage)
    with pytest.raises(ModelError, match=r"weights bytes is not a portable weights file"):
        PortableWeights.load(b"not a zip at all")


@pytest.mark.parametrize("change,message", [
    ({"mean": [0.0, 0.0]}, r"normalisation vectors must have shape \(3,\)"),
    ({"kernels": [np.ones((2, 4)), np.ones((4, 1))]}, r"layer shapes do not chain: \(2, 4\) after width 3"),
    ({"kernels": [np.ones((3, 4)), np.ones((4, 2))], "biases": [np.zeros(4), np.zeros(2)]},
     r"the last layer must have one output, found 2"),
    ({"activations": ["relu", "softmax"]}, r"unsupported activations \('relu', 'softmax'\)"),
    ({"activations": ["sigmoid"]}, r"unsupported activations \('sigmoid',\)"),
])
def test_inconsistent_weights_are_refused(change, message):
    with pytest.raises(ModelError, match=message):
        tiny(**change)


def special_floats() -> np.ndarray:
    f32 = np.finfo(np.float32)
    values = [-np.inf, -f32.max, -1.5, -f32.tiny, -1e-45, -0.0, 0.0, 1e-45, f32.tiny, 1.0, 1.5, f32.max, np.inf]
    rng = np.random.default_rng(1)
    return np.concatenate([np.array(values, np.float32), rng.normal(scale=1e3, size=2000).astype(np.float32),
                           rng.normal(scale=1e-3, size=2000).astype(np.float32)])


def test_sortable_keys_order_like_the_floats_with_minus_zero_first():
    x = special_floats()
    keys = sortable_int32(x)
    assert keys.dtype == np.int32
    order = np.argsort(keys, kind="stable")
    assert np.all(np.diff(x[order].astype(np.float64)) >= 0)  # integer order is float order
    minus_zero, plus_zero = sortable_int32(np.array([-0.0, 0.0], np.float32))
    assert minus_zero < plus_zero and plus_zero - minus_zero == 1  # adjacent, -0.0 below +0.0
    # Neighbouring floats are neighbouring keys: a run of keys is a run of floats.
    one = sortable_int32(np.array([1.0], np.float32))[0]
    assert float32_from_sortable(np.array([one + 1]))[0] == np.nextafter(np.float32(1), np.float32(2))
    assert float32_from_sortable(np.array([one - 1]))[0] == np.nextafter(np.float32(1), np.float32(0))


def test_sortable_keys_round_trip_bit_for_bit():
    x = special_floats()
    back = float32_from_sortable(sortable_int32(x))
    assert back.dtype == np.float32 and np.array_equal(back.view(np.int32), x.view(np.int32))


def test_nan_keys_lie_beyond_the_infinities():
    nan, minus_nan = np.float32(np.nan), -np.float32(np.nan)
    keys = sortable_int32(np.array([minus_nan, -np.inf, np.inf, nan], np.float32))
    assert keys[0] < keys[1] < keys[2] < keys[3]


def test_format_f_prints_like_c_printf():
    values = np.array([0.1, 0.5, -0.0, 1e-7, 0.0078125, 0.0234375, 123.456, -1.25, 1e10], np.float32)
    # 0.0078125 and 0.0234375 sit exactly halfway at the 6th decimal: round half to even, as glibc printf.
    assert format_f(values) == ["0.100000", "0.500000", "-0.000000", "0.000000", "0.007812", "0.023438",
                                "123.456001", "-1.250000", "10000000000.000000"]


def test_each_vocabulary_interval_is_exactly_the_floats_that_print_as_its_key():
    lo, hi, index = vocabulary_intervals(KEYS)
    assert lo.dtype == hi.dtype == np.int32 and index.dtype == np.int64
    assert sorted(index.tolist()) == list(range(len(KEYS)))
    assert np.all(lo[1:] > hi[:-1])  # sorted, disjoint
    for low, high, position in zip(lo, hi, index):
        key = KEYS[position]
        inside = float32_from_sortable(np.array([low, (int(low) + int(high)) // 2, high]))
        assert format_f(inside) == [key] * 3
        outside = float32_from_sortable(np.array([low - 1, high + 1]))
        assert key not in format_f(outside)  # the interval cannot grow on either side
    # printf writes -0.0 and tiny negative values as "-0.000000", another key: "0.000000" starts at +0.0.
    zero = KEYS.index("0.000000")
    low = lo[index.tolist().index(zero)]
    assert float32_from_sortable(np.array([low]))[0] == 0 and format_f(float32_from_sortable(np.array([low - 1]))) == ["-0.000000"]


def test_keys_no_float32_prints_are_left_out_and_bad_keys_refused():
    lo, hi, index = vocabulary_intervals(["0.100000", "0.1", "1e-3", "0.5000000"])  # printf never gives the others
    assert index.tolist() == [0]
    for bad in ("nan", "inf", "-inf", "abc"):
        with pytest.raises(ModelError, match=f"vocabulary key '{bad}' is not a finite decimal"):
            vocabulary_intervals(["0.500000", bad])
    with pytest.raises(ModelError, match="vocabulary intervals overlap"):
        vocabulary_intervals(["0.500000", "0.500000"])
