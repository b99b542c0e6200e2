"""The public NumPy API against the float64 oracle, and its input checks."""

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import assert_matches_oracle, update_terms
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import lars_numba
from lars_numba import _cpu, tunables

DTYPES = [np.float16, np.float32, np.float64]

hyperparameters = st.fixed_dictionaries(
    {
        "threshold": st.sampled_from([0.0, 1e-6, 1e-2, 1.0, 1e3]),
        "weight_decay": st.sampled_from([0.0, 1e-5, 1e-4, 1e-2, 1.0]),
        "eps": st.sampled_from([0.0, 1e-12, 1e-9, 1e-3]),
    }
)


class Laid:
    """An array in a chosen layout, remembering the parent it is a view of."""

    def __init__(self, values, layout, flip_axis):
        self.parent = None
        if layout == "C" or values.ndim == 0:
            self.array = values.copy()
        elif layout == "F":
            self.array = np.asfortranarray(values)
        elif layout == "transposed":
            self.array = np.ascontiguousarray(values.T).T
        else:  # every other element along each axis, one axis reversed
            self.parent = np.full(tuple(2 * n for n in values.shape), 7, values.dtype)
            self.index = tuple(
                slice(None, None, -2 if axis == flip_axis else 2) for axis in range(values.ndim)
            )
            self.array = self.parent[self.index]
            self.array[...] = values

    def outside(self):
        """The parent's elements that are not in the view (empty if no parent)."""
        if self.parent is None:
            return np.empty(0)
        inside = np.zeros(self.parent.shape, dtype=bool)
        inside[self.index] = True
        return self.parent[~inside]


@st.composite
def laid_pairs(draw):
    """(w, g) of one dtype and shape, 0-d to 4-d, in independent layouts."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6))
    magnitude = draw(st.sampled_from([1e-4, 1e-1, 1.0, 30.0]))
    values = hnp.arrays(np.float64, shape, elements=st.floats(-1, 1, width=32))
    laid = []
    for _ in "wg":
        layout = draw(st.sampled_from(["C", "F", "transposed", "strided"]))
        flip_axis = draw(st.integers(0, max(len(shape) - 1, 0)))
        laid.append(Laid(np.asarray(draw(values) * magnitude, dtype), layout, flip_axis))
    return laid


@settings(max_examples=300, deadline=None)
@given(pair=laid_pairs(), hyper=hyperparameters)
def test_scale_and_trust_ratio_match_the_oracle_on_any_layout(pair, hyper, oracle):
    w, g = (laid.array for laid in pair)
    w_before, g_before, outside_before = w.copy(), g.copy(), pair[1].outside()
    rate, expected = oracle(w, g, **hyper)

    assert lars_numba.trust_ratio(w, g, **hyper) == pytest.approx(rate, rel=1e-12, nan_ok=True)
    assert lars_numba.scale(w, g, **hyper) is g

    terms = update_terms(w, g_before, rate, hyper["weight_decay"])
    assert_matches_oracle(g, expected, w.dtype, terms)
    np.testing.assert_array_equal(w, w_before)
    np.testing.assert_array_equal(pair[1].outside(), outside_before)


def test_an_update_that_cancels_matches_the_oracle_to_ulps_of_its_terms(oracle):
    # g is weight_decay * w rounded, negated: the oracle, which rounds the
    # product, gives 0; a fused multiply-add (the kernels' 'contract') gives the
    # product's rounding error, 6.8e-17 after the rate. Both are within an ulp
    # of the terms, which is all that a float64 oracle can tell.
    w, g = np.array(3.0), np.array(-(1e-4 * 3.0))
    rate, expected = oracle(w, g, threshold=0.0, weight_decay=1e-4, eps=0.0)
    assert rate == pytest.approx(5000.0) and expected == 0.0
    terms = update_terms(w, g, rate, 1e-4)
    lars_numba.scale(w, g, threshold=0.0, weight_decay=1e-4, eps=0.0)
    assert abs(float(g)) <= 1e-16
    assert_matches_oracle(g, expected, w.dtype, terms)
    with pytest.raises(AssertionError):  # the tolerance is that of the terms
        assert_matches_oracle(np.array(1e-14), expected, w.dtype, terms)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [1, 31, 1000, 2 * tunables.PARALLEL_MIN_SIZE + 7])
def test_contiguous_sizes_match_the_oracle(dtype, size, oracle):
    rng = np.random.default_rng(size)
    w = rng.standard_normal(size).astype(dtype)
    g = rng.standard_normal(size).astype(dtype) * dtype(1e-2)
    rate, expected = oracle(w, g, weight_decay=1e-4)
    assert lars_numba.trust_ratio(w, g, weight_decay=1e-4) == pytest.approx(rate, rel=1e-12)
    assert_matches_oracle(lars_numba.scale(w, g, weight_decay=1e-4), expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_equal_to_threshold_keeps_rate_one_but_adds_weight_decay(dtype):
    w = np.array([3, 4], dtype=dtype)  # ||w|| == 5 exactly
    g = np.array([1, 2], dtype=dtype)
    assert lars_numba.trust_ratio(w, g, threshold=5.0, weight_decay=0.5) == 1.0
    lars_numba.scale(w, g, threshold=5.0, weight_decay=0.5)
    np.testing.assert_array_equal(g, np.array([2.5, 4], dtype=dtype))
    assert lars_numba.trust_ratio(w, g, threshold=np.nextafter(5.0, 0)) != 1.0


def test_zero_size_arrays_have_rate_one():
    for shape in [(0,), (2, 0, 1)]:
        w, g = np.empty(shape, np.float32), np.empty(shape, np.float32)
        assert lars_numba.trust_ratio(w, g) == 1.0
        assert lars_numba.scale(w, g).shape == shape


def test_float16_sums_that_overflow_float16_stay_finite(oracle):
    w = np.full(100_000, 300, dtype=np.float16)  # sum of squares 9e9 > 65504
    g = np.full(100_000, 0.5, dtype=np.float16)
    rate, expected = oracle(w, g, weight_decay=1e-4)
    with np.errstate(over="ignore"):
        assert np.isinf(np.linalg.norm(w))  # what Chainer's float16 norm gives
    assert lars_numba.trust_ratio(w, g, weight_decay=1e-4) == pytest.approx(rate, rel=1e-12)
    assert_matches_oracle(lars_numba.scale(w, g, weight_decay=1e-4), expected, np.float16)
    assert np.isfinite(g).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("w_value", "g_value"),
    [(np.nan, 1.0), (1.0, np.nan), (np.inf, 1.0), (1.0, np.inf), (-np.inf, np.nan)],
)
def test_nan_and_inf_propagate_like_the_reference(dtype, w_value, g_value, oracle):
    w = np.linspace(1, 2, 50).astype(dtype)
    g = np.linspace(-1, 1, 50).astype(dtype)
    w[7], g[7] = w_value, g_value
    rate, expected = oracle(w, g, weight_decay=1e-2)
    assert lars_numba.trust_ratio(w, g, weight_decay=1e-2) == pytest.approx(rate, nan_ok=True)
    assert_matches_oracle(lars_numba.scale(w, g, weight_decay=1e-2), expected, dtype)


def test_g_may_be_w_itself(oracle):
    w = np.linspace(-1, 1, 101)
    _, expected = oracle(w, w.copy(), weight_decay=0.1)
    assert_matches_oracle(lars_numba.scale(w, w, weight_decay=0.1), expected, w.dtype)


@pytest.mark.parametrize("shift", [1, -1])
def test_partially_overlapping_w_and_g_read_w_before_it_is_scaled(shift, oracle):
    buffer = np.linspace(-1, 1, 101)
    w, g = (buffer[1:], buffer[:-1]) if shift == 1 else (buffer[:-1], buffer[1:])
    _, expected = oracle(w.copy(), g.copy(), weight_decay=0.1)
    assert_matches_oracle(lars_numba.scale(w, g, weight_decay=0.1), expected, w.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_parallel_kernels_match_the_oracle_and_the_serial_ones_bit_for_bit(dtype, oracle):
    rng = np.random.default_rng(0)
    size = 2 * tunables.PARALLEL_MIN_SIZE + 3
    w = rng.standard_normal(size).astype(dtype)
    g = rng.standard_normal(size).astype(dtype)
    rate, expected = oracle(w, g, weight_decay=1e-4)
    serial, parallel = g.copy(), g.copy()
    rates = set()
    for result, threads in [(serial, False), (parallel, True)]:
        rates.add(lars_numba.trust_ratio(w, result, weight_decay=1e-4, parallel=threads))
        lars_numba.scale(w, result, weight_decay=1e-4, parallel=threads)
    assert len(rates) == 1
    assert rates.pop() == pytest.approx(rate, rel=1e-12)
    assert_matches_oracle(parallel, expected, dtype)
    np.testing.assert_array_equal(parallel, serial)


CONCURRENT_CALLS = """
import threading
import numpy as np
import lars_numba
from lars_numba import tunables

rng = np.random.default_rng(1)
size = 4 * tunables.PARALLEL_MIN_SIZE
cases = [rng.standard_normal((2, size)).astype(np.float32) for _ in range(4)]
expected = [g.copy() for _, g in cases]
for (w, _), want in zip(cases, expected):
    lars_numba.scale(w, want, weight_decay=1e-4, parallel=False)
barrier = threading.Barrier(len(cases))

def work(w, g):
    barrier.wait()
    for _ in range(10):
        lars_numba.trust_ratio(w, g, weight_decay=1e-4)
    lars_numba.scale(w, g, weight_decay=1e-4)

threads = [threading.Thread(target=work, args=case) for case in cases]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
for (_, g), want in zip(cases, expected):
    np.testing.assert_array_equal(g, want)
import numba
print("threading layer:", numba.threading_layer())
"""


def run_on_layer(code: str, layer: str) -> subprocess.CompletedProcess:
    """``code`` run by a new Python on Numba's threading layer ``layer``.

    The workqueue layer aborts the whole process when two threads enter
    parallel kernels at once, hence a process of its own.
    """
    env = {**os.environ, "NUMBA_THREADING_LAYER": layer}
    call = [sys.executable, "-c", code]
    return subprocess.run(call, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("layer", ["workqueue", "default"])
def test_concurrent_calls_from_threads_are_safe(layer):
    done = run_on_layer(CONCURRENT_CALLS, layer)
    assert done.returncode == 0, done.stderr
    if layer == "workqueue":
        assert "threading layer: workqueue" in done.stdout


# -- bad input: a clear error and nothing written ------------------------------

GOOD = np.linspace(1, 2, 6, dtype=np.float32)


def read_only(array):
    array = array.copy()
    array.flags.writeable = False
    return array


@pytest.mark.parametrize(
    ("w", "g", "error", "message"),
    [
        ([1.0, 2.0], GOOD[:2], TypeError, "w must be a NumPy or CUDA array; got list"),
        (GOOD, list(GOOD), TypeError, "g must be a NumPy or CUDA array; got list"),
        (GOOD, np.float32(1.0), TypeError, "g must be a NumPy or CUDA array; got float32"),
        (
            GOOD,
            np.ma.masked_array(GOOD),
            TypeError,
            "g must be a NumPy or CUDA array; got MaskedArray",
        ),
        (np.arange(6), GOOD, TypeError, "w must have dtype float16, float32 or float64"),
        (GOOD, np.ones(6, bool), TypeError, "g must have dtype .* got bool"),
        (GOOD, np.ones(6, np.complex64), TypeError, "g must have dtype .* got complex64"),
        (GOOD, GOOD.astype(">f4"), TypeError, "g must have dtype .* native byte order; got >f4"),
        (
            GOOD,
            GOOD.astype(np.float64),
            TypeError,
            "g must have the dtype of w, float32; got float64",
        ),
        (
            GOOD,
            np.ones(5, np.float32),
            ValueError,
            r"g must have the shape of w, \(6,\); got \(5,\)",
        ),
        (GOOD, np.ones((6, 1), np.float32), ValueError, "g must have the shape of w"),
    ],
)
def test_bad_arrays_raise_naming_the_argument(w, g, error, message):
    w_before, g_before = np.array(w, copy=True), np.array(g, copy=True)
    with pytest.raises(error, match=message):
        lars_numba.scale(w, g)
    with pytest.raises(error, match=message):
        lars_numba.trust_ratio(w, g)
    np.testing.assert_array_equal(np.asarray(w), w_before)
    np.testing.assert_array_equal(np.asarray(g), g_before)


def test_read_only_g_is_refused_by_scale_only():
    w, g = GOOD.copy(), read_only(GOOD * 2)
    with pytest.raises(ValueError, match="g must be writeable; got a read-only array"):
        lars_numba.scale(w, g)
    np.testing.assert_array_equal(g, GOOD * 2)
    assert lars_numba.trust_ratio(read_only(w), g) == pytest.approx(0.5, rel=1e-6)


@pytest.mark.parametrize("name", ["threshold", "weight_decay", "eps"])
@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (-1e-3, ValueError, "must be finite and >= 0; got -0.001"),
        (float("nan"), ValueError, "must be finite and >= 0; got nan"),
        (float("inf"), ValueError, "must be finite and >= 0; got inf"),
        ("0.1", TypeError, "must be a real number; got str"),
        (None, TypeError, "must be a real number; got NoneType"),
        (True, TypeError, "must be a real number; got bool"),
    ],
)
def test_bad_hyperparameters_raise_naming_the_argument(name, value, error, message):
    w, g = GOOD.copy(), GOOD.copy() * 3
    with pytest.raises(error, match=f"^{name} {message}"):
        lars_numba.scale(w, g, **{name: value})
    with pytest.raises(error, match=f"^{name} {message}"):
        lars_numba.trust_ratio(w, g, **{name: value})
    np.testing.assert_array_equal(g, GOOD * 3)


def test_numpy_scalars_are_accepted_as_hyperparameters(oracle):
    w, g = GOOD.copy(), GOOD[::-1].copy()
    _, expected = oracle(w, g, threshold=0.5, weight_decay=0.25, eps=0.0)
    lars_numba.scale(w, g, threshold=np.float32(0.5), weight_decay=np.float64(0.25), eps=0)
    assert_matches_oracle(g, expected, np.float32)


def test_import_loads_neither_chainer_cupy_nor_numba_cuda():
    code = (
        "import sys, numpy as np, lars_numba\n"
        "lars_numba.scale(np.ones(3), np.ones(3)); lars_numba.trust_ratio(np.ones(3), np.ones(3))\n"
        "loaded = [m for m in ('chainer', 'cupy', 'numba.cuda') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_parallel_false_keeps_large_arrays_on_the_serial_kernels(monkeypatch, oracle):
    def refuse(*args):
        raise AssertionError("the parallel kernels ran")

    for key, (serial, _) in list(_cpu._PAIR_KERNELS.items()):
        monkeypatch.setitem(_cpu._PAIR_KERNELS, key, (serial, (refuse, refuse)))
    w = np.linspace(-1, 1, 2 * tunables.PARALLEL_MIN_SIZE)
    g = w[::-1].copy()
    _, expected = oracle(w, g, weight_decay=1e-4)
    lars_numba.trust_ratio(w, g, weight_decay=1e-4, parallel=False)
    assert_matches_oracle(
        lars_numba.scale(w, g, weight_decay=1e-4, parallel=False), expected, w.dtype
    )
    with pytest.raises(AssertionError, match="the parallel kernels ran"):
        lars_numba.scale(w, g)
