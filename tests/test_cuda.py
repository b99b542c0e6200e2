"""The CUDA path against the float64 oracle: scale, trust_ratio and the launches of
scale_all, input checks, streams and scratch.

Runs on Numba's CUDA simulator when there is no GPU (see conftest.py) and
unchanged on a GPU. The simulator runs a Python thread per GPU thread, so the
tests shrink the grid (``small_grid``) and keep arrays to a few thousand
elements.
"""

import math
import os
import subprocess
import sys
import threading
import types

import numpy as np
import pytest
from conftest import assert_matches_oracle, lars_oracle
from numba import cuda
from numba.cuda.core import config

import lars_numba
from lars_numba import _api, _cuda, tunables
from lars_numba._shapes import RESNET50_SHAPES

SIMULATOR = bool(config.ENABLE_CUDASIM)
DTYPES = [np.float16, np.float32, np.float64]
HYPER = {"threshold": 1e-2, "weight_decay": 1e-4, "eps": 1e-9}

# The tests' grids are small on purpose; on a GPU numba-cuda warns about them,
# and pyproject.toml turns warnings into errors.
pytestmark = pytest.mark.filterwarnings("ignore:Grid size .* under-utilization")


def set_grid(monkeypatch, threads, min_blocks, max_blocks):
    monkeypatch.setattr(tunables, "THREADS_PER_BLOCK", threads)
    monkeypatch.setattr(tunables, "MIN_BLOCKS", min_blocks)
    monkeypatch.setattr(tunables, "MAX_BLOCKS", max_blocks)


@pytest.fixture(autouse=True)
def small_grid(monkeypatch):
    set_grid(monkeypatch, threads=8, min_blocks=1, max_blocks=3)


def values(shape, dtype, seed, magnitude=1.0):
    rng = np.random.default_rng(seed)
    return np.asarray(rng.standard_normal(shape) * magnitude, dtype=dtype)


#: name: (shape of a contiguous parent array, the view of it the kernels get).
#: Numba's device arrays do not take negative steps, so no view has one.
LAYOUTS = {
    "0-d": ((), lambda a: a),
    "1-d": ((300,), lambda a: a),
    "1-d strided": ((600,), lambda a: a[1::2]),
    # A view that starts past its parent's first element, and one element of
    # stride 7: a group's table holds the address of the view's first element.
    "1-d offset": ((310,), lambda a: a[10:]),
    "one of stride 7": ((9,), lambda a: a[4::7]),
    "C": ((15, 20), lambda a: a),
    "F": ((20, 15), lambda a: a.T),
    "strided": ((15, 40), lambda a: a[:, ::2]),
    "3-d strided": ((6, 5, 8), lambda a: a[::2, 1:, ::3]),
}


def run_on_device(w_parent, w_view, g_parent, g_view, **hyper):
    """``trust_ratio`` and ``scale`` on views of device copies of the parents.

    Returns the rate and host copies of both parents afterwards.
    """
    d_w_parent, d_g_parent = cuda.to_device(w_parent), cuda.to_device(g_parent)
    d_w, d_g = w_view(d_w_parent), g_view(d_g_parent)
    rate = lars_numba.trust_ratio(d_w, d_g, **hyper)
    assert lars_numba.scale(d_w, d_g, **hyper) is d_g
    return rate, d_w_parent.copy_to_host(), d_g_parent.copy_to_host()


def check_against_oracle(oracle, w_layout, g_layout, dtype, hyper=HYPER, magnitude=1.0):
    (w_shape, w_view), (g_shape, g_view) = LAYOUTS[w_layout], LAYOUTS[g_layout]
    w_parent = values(w_shape, dtype, 1, magnitude)
    g_parent = values(g_shape, dtype, 2, magnitude)
    expected_rate, expected_g = oracle(w_view(w_parent), g_view(g_parent), **hyper)
    # The elements of g's parent outside the view must keep their values.
    expected = g_parent.astype(np.float64)
    g_view(expected)[...] = expected_g

    rate, w_after, g_after = run_on_device(w_parent, w_view, g_parent, g_view, **hyper)

    assert type(rate) is float
    assert rate == pytest.approx(expected_rate, rel=1e-12, nan_ok=True)
    assert_matches_oracle(g_after, expected, dtype)
    np.testing.assert_array_equal(w_after, w_parent)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_layout_matches_the_oracle(layout, dtype, oracle):
    check_against_oracle(oracle, layout, layout, dtype)


@pytest.mark.parametrize(("w_layout", "g_layout"), [("C", "F"), ("F", "strided"), ("strided", "C")])
def test_w_and_g_in_different_layouts_match_the_oracle(w_layout, g_layout, oracle):
    check_against_oracle(oracle, w_layout, g_layout, np.float32)


@pytest.mark.parametrize(
    ("threads", "min_blocks", "max_blocks", "size"),
    [
        (8, 1, 1, 1000),  # a single block, many grid-stride steps
        (8, 7, 7, 20),  # more blocks than the data needs: most have nothing
        (1, 1, 5, 37),  # one thread per block
        (4, 1, 8, 30),  # at most one element per thread
    ],
)
def test_grid_sizes_do_not_change_the_result(threads, min_blocks, max_blocks, size, monkeypatch):
    set_grid(monkeypatch, threads, min_blocks, max_blocks)
    w, g = values(size, np.float64, 3), values(size, np.float64, 4)
    rate = lars_numba.trust_ratio(w, g, **HYPER)  # the CPU path as the reference
    expected = lars_numba.scale(w, g.copy(), **HYPER)
    rate_on_device, _, g_after = run_on_device(w, lambda a: a, g, lambda a: a, **HYPER)
    assert rate_on_device == pytest.approx(rate, rel=1e-13)
    np.testing.assert_allclose(g_after, expected, rtol=1e-13)


def test_the_shipped_grid_sums_in_a_fixed_order(monkeypatch, oracle):
    # On the simulator the shipped grid is its own, the smallest: a user's
    # call on a few thousand elements needs no patching to be quick.
    monkeypatch.undo()
    w, g = values(3000, np.float32, 5), values(3000, np.float32, 6)
    d_w, d_g = cuda.to_device(w), cuda.to_device(g)
    rates = {lars_numba.trust_ratio(d_w, d_g, **HYPER) for _ in range(2)}
    assert len(rates) == 1  # bitwise equal: no floating-point atomics
    assert rates.pop() == pytest.approx(oracle(w, g, **HYPER)[0], rel=1e-12)


@pytest.mark.parametrize(
    ("simulator", "grid"), [("1", (1, 1, 1)), ("0", (256, 128, 1024)), (None, (256, 128, 1024))]
)
def test_the_grid_is_the_smallest_on_the_simulator_and_the_shipped_one_on_a_gpu(simulator, grid):
    # Read in a fresh process, as the switch is read once, at import; no GPU
    # is needed to import the tunables.
    env = {key: value for key, value in os.environ.items() if key != "NUMBA_ENABLE_CUDASIM"}
    if simulator is not None:
        env["NUMBA_ENABLE_CUDASIM"] = simulator
    script = (
        "from lars_numba import tunables as t; "
        "print(t.THREADS_PER_BLOCK, t.MIN_BLOCKS, t.MAX_BLOCKS)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    assert tuple(map(int, result.stdout.split())) == grid


@pytest.mark.parametrize("shape", [(0,), (2, 0, 3)])
def test_zero_size_arrays_have_rate_one(shape):
    d_w, d_g = cuda.device_array(shape, np.float32), cuda.device_array(shape, np.float32)
    assert lars_numba.trust_ratio(d_w, d_g) == 1.0
    assert lars_numba.scale(d_w, d_g).shape == shape


@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_equal_to_threshold_keeps_rate_one_but_adds_weight_decay(dtype):
    w = np.array([3, 4], dtype=dtype)  # ||w|| == 5 exactly
    g = np.array([1, 2], dtype=dtype)
    rate, _, g_after = run_on_device(
        w, lambda a: a, g, lambda a: a, threshold=5.0, weight_decay=0.5
    )
    assert rate == 1.0
    np.testing.assert_array_equal(g_after, np.array([2.5, 4], dtype=dtype))


def test_float16_sums_that_overflow_float16_stay_finite(oracle):
    w = np.full(2000, 300, dtype=np.float16)  # sum of squares 1.8e8 > 65504
    g = np.full(2000, 0.5, dtype=np.float16)
    expected_rate, expected = oracle(w, g, weight_decay=1e-4)
    rate, _, g_after = run_on_device(w, lambda a: a, g, lambda a: a, weight_decay=1e-4)
    assert rate == pytest.approx(expected_rate, rel=1e-12)
    assert np.isfinite(g_after).all()
    assert_matches_oracle(g_after, expected, np.float16)


# The simulator computes with NumPy scalars, which warn where a GPU does not.
@pytest.mark.filterwarnings("ignore:.*(invalid value|overflow) encountered:RuntimeWarning")
@pytest.mark.parametrize(("w_value", "g_value"), [(np.nan, 1.0), (1.0, np.inf), (np.inf, np.nan)])
def test_nan_and_inf_propagate_like_the_reference(w_value, g_value, oracle):
    w = np.linspace(1, 2, 50, dtype=np.float32)
    g = np.linspace(-1, 1, 50, dtype=np.float32)
    w[7], g[7] = w_value, g_value
    expected_rate, expected = oracle(w, g, weight_decay=1e-2)
    rate, _, g_after = run_on_device(w, lambda a: a, g, lambda a: a, weight_decay=1e-2)
    assert rate == pytest.approx(expected_rate, nan_ok=True)
    assert_matches_oracle(g_after, expected, np.float32)


# -- bad input: a clear error and nothing written ------------------------------

GOOD = np.linspace(1, 2, 6, dtype=np.float32)


@pytest.mark.parametrize(
    ("make_w", "make_g", "error", "message"),
    [
        (
            lambda: GOOD.copy(),
            lambda: cuda.to_device(GOOD),
            TypeError,
            r"w and g must both be NumPy arrays or both CUDA arrays; "
            r"got w on the CPU \(ndarray\) and g on the GPU \(\w+\)",
        ),
        (
            lambda: cuda.to_device(GOOD),
            lambda: GOOD.copy(),
            TypeError,
            r"got w on the GPU \(\w+\) and g on the CPU \(ndarray\)",
        ),
        (
            lambda: [1.0] * 6,
            lambda: cuda.to_device(GOOD),
            TypeError,
            "w must be a NumPy or CUDA array",
        ),
        (
            lambda: cuda.to_device(GOOD),
            lambda: cuda.to_device(GOOD.astype(np.float64)),
            TypeError,
            "g must have the dtype of w, float32; got float64",
        ),
        (
            lambda: cuda.to_device(np.arange(6)),
            lambda: cuda.to_device(GOOD),
            TypeError,
            "w must have dtype float16, float32 or float64",
        ),
        (
            lambda: cuda.to_device(GOOD),
            lambda: cuda.to_device(GOOD[:5]),
            ValueError,
            r"g must have the shape of w, \(6,\); got \(5,\)",
        ),
    ],
)
def test_bad_arrays_raise_naming_the_argument(make_w, make_g, error, message):
    w, g = make_w(), make_g()
    before = [np.array(a.copy_to_host() if hasattr(a, "copy_to_host") else a) for a in (w, g)]
    with pytest.raises(error, match=message):
        lars_numba.scale(w, g)
    with pytest.raises(error, match=message):
        lars_numba.trust_ratio(w, g)
    for array, old in zip((w, g), before, strict=True):
        now = array.copy_to_host() if hasattr(array, "copy_to_host") else array
        np.testing.assert_array_equal(now, old)


def test_device_arrays_are_accepted_by_the_hook_s_test():
    assert _api.accepts(cuda.to_device(GOOD))
    assert _api.on_gpu(cuda.to_device(GOOD))
    assert not _api.on_gpu(GOOD)


# -- foreign arrays, streams and scratch ---------------------------------------


@pytest.fixture
def caller_stream(monkeypatch):
    """A stream of the caller's and its handle, as an interface would give it."""
    stream = cuda.stream()
    if not SIMULATOR:
        return stream, int(stream)
    # The simulator has no external streams: one stands in for a made-up handle.
    handle = 0x5EED
    numba_stream = _cuda._numba_stream
    monkeypatch.setattr(
        _cuda, "_numba_stream", lambda h: stream if h == handle else numba_stream(h)
    )
    return stream, handle


def test_foreign_arrays_run_on_the_stream_of_their_interface(
    foreign, caller_stream, scratch_handles, oracle
):
    stream, handle = caller_stream
    w, g = values(100, np.float32, 7), values(100, np.float32, 8)
    d_w, d_g = cuda.to_device(w), cuda.to_device(g)
    expected_rate, expected = oracle(w, g, **HYPER)

    rate = lars_numba.trust_ratio(foreign(d_w), foreign(d_g, handle), **HYPER)
    lars_numba.scale(foreign(d_w), foreign(d_g, handle), **HYPER)
    stream.synchronize()

    assert scratch_handles() == [handle]
    assert rate == pytest.approx(expected_rate, rel=1e-12)
    assert_matches_oracle(d_g.copy_to_host(), expected, np.float32)


def test_each_call_reads_each_foreign_interface_once(foreign):
    # CuPy makes its interface's dictionary at every read: a call reads it once
    # per array, deciding by the array's type that it is a CUDA array.
    reads = []

    class Counted(foreign):
        @property
        def __cuda_array_interface__(self):
            reads.append(self)
            return super().__cuda_array_interface__

    ws, gs, vs = ([Counted(cuda.to_device(GOOD)) for _ in range(3)] for _ in "wgv")
    calls = {
        "scale": lambda: lars_numba.scale(ws[0], gs[0]),
        "trust_ratio": lambda: lars_numba.trust_ratio(ws[0], gs[0]),
        "scale_all": lambda: lars_numba.scale_all(ws, gs),
        "momentum_step": lambda: lars_numba.momentum_step(ws, gs, vs, lr=0.1),
    }
    for name, call in calls.items():
        del reads[:]
        call()
        arrays = [ws[0], gs[0]] if name in ("scale", "trust_ratio") else ws + gs
        if name == "momentum_step":
            arrays += vs
        assert sorted(map(id, reads)) == sorted(map(id, arrays)), name


def test_a_read_only_foreign_g_is_refused_by_scale_only(foreign):
    d_w, d_g = cuda.to_device(GOOD), cuda.to_device(GOOD * 2)
    with pytest.raises(ValueError, match="g must be writeable; got a read-only array"):
        lars_numba.scale(foreign(d_w), foreign(d_g, readonly=True))
    np.testing.assert_array_equal(d_g.copy_to_host(), GOOD * 2)
    rate = lars_numba.trust_ratio(foreign(d_w), foreign(d_g, readonly=True))
    assert rate == pytest.approx(0.5, rel=1e-6)


def interface_with_stream(stream):
    return types.SimpleNamespace(__cuda_array_interface__={"version": 3, "stream": stream})


def stream_of(array):
    """The stream ``as_device_array`` reads from an interface, ``None`` if it has none."""
    interface = getattr(array, "__cuda_array_interface__", None)
    return None if interface is None else interface.get("stream")


@pytest.mark.parametrize(
    ("w", "g", "handle"),
    [
        (types.SimpleNamespace(), types.SimpleNamespace(), 0),  # the default stream
        (interface_with_stream(None), interface_with_stream(None), 0),
        (interface_with_stream(9), interface_with_stream(7), 7),  # g's first
        (interface_with_stream(9), interface_with_stream(None), 9),
        (interface_with_stream(9), types.SimpleNamespace(), 9),
        (interface_with_stream(2), interface_with_stream(2), 2),  # per-thread default
    ],
)
def test_the_stream_is_the_interface_s_without_cupy(w, g, handle, monkeypatch):
    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    assert _cuda.caller_streams([stream_of(g), stream_of(w)]).launch == handle


def test_the_stream_is_cupy_s_current_stream_once_cupy_is_imported(monkeypatch):
    current = types.SimpleNamespace(ptr=42)
    fake_cupy = types.SimpleNamespace(
        cuda=types.SimpleNamespace(get_current_stream=lambda: current)
    )
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    assert _cuda.caller_streams([7, 7]).launch == 42


def test_calls_reuse_the_scratch_and_scale_neither_allocates_nor_waits(
    scratch_handles, monkeypatch, oracle
):
    w, g = values(200, np.float32, 9), values(200, np.float32, 10)
    d_w, d_g = cuda.to_device(w), cuda.to_device(g)
    lars_numba.scale(d_w, d_g, **HYPER)
    (scratch,) = _cuda._scratch.values()

    def forbidden(*args, **kwargs):
        raise AssertionError("called by scale")

    monkeypatch.setattr(cuda, "device_array", forbidden)
    monkeypatch.setattr(cuda, "to_device", forbidden)
    monkeypatch.setattr(cuda, "synchronize", forbidden)
    with monkeypatch.context() as patch:
        patch.setattr(type(scratch.stream), "synchronize", forbidden)
        lars_numba.scale(d_w, d_g, **HYPER)
    lars_numba.trust_ratio(d_w, d_g, **HYPER)

    assert scratch_handles() == [0]
    assert next(iter(_cuda._scratch.values())) is scratch
    assert scratch.ticket.copy_to_host()[0] == 0  # wrapped back by the last block
    _, once = oracle(w, g, **HYPER)
    _, twice = oracle(w, once, **HYPER)
    assert_matches_oracle(d_g.copy_to_host(), twice, np.float32)


def test_resnet50_shapes_are_torchvision_s_parameters():
    # The parameter list docs/gpu.rst and the benchmarks are computed for.
    assert len(RESNET50_SHAPES) == 161
    assert sum(math.prod(shape) for shape in RESNET50_SHAPES) == 25_557_032


# -- many pairs in one call: scale_all -----------------------------------------

TABLE_ROW = (HYPER["threshold"], HYPER["weight_decay"], HYPER["eps"])
#: HYPER as the engine takes it, with the variants' defaults.
ENGINE_HYPER = _api.hyperparameters(*TABLE_ROW)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 32 elements, so that a few hundred make many chunks and blocks."""
    monkeypatch.setattr(tunables, "GPU_CHUNK", 32)


def make_pairs(specs, seed=0):
    """Host parents and device views for ``specs``, a list of (dtype, w layout, g layout)."""
    pairs = []
    for i, (dtype, w_layout, g_layout) in enumerate(specs):
        (w_shape, w_view), (g_shape, g_view) = LAYOUTS[w_layout], LAYOUTS[g_layout]
        w_parent = values(w_shape, dtype, 2 * i + seed)
        g_parent = values(g_shape, dtype, 2 * i + seed + 1)
        d_w_parent, d_g_parent = cuda.to_device(w_parent), cuda.to_device(g_parent)
        pairs.append((w_parent, w_view, g_parent, g_view, d_w_parent, d_g_parent))
    return pairs


def run_scale_all(
    oracle,
    pairs,
    *,
    with_rates=True,
    handle=None,
    weight_decay_mask=None,
    trust_ratio_mask=None,
):
    """``lars_numba.scale_all`` on the pairs' device views, checked against the oracle.

    Given a stream ``handle``, ``_cuda.scale_all`` is called on it instead.
    Returns the rates, if asked for.
    """
    d_ws = [w_view(d_w) for _, w_view, _, _, d_w, _ in pairs]
    d_gs = [g_view(d_g) for _, _, _, g_view, _, d_g in pairs]
    rates = cuda.to_device(np.full(len(pairs), -1.0)) if with_rates else None
    if handle is None:
        lars_numba.scale_all(
            d_ws,
            d_gs,
            rates=rates,
            weight_decay_mask=weight_decay_mask,
            trust_ratio_mask=trust_ratio_mask,
            **HYPER,
        )
    else:
        masks = _api.pair_masks(len(pairs), weight_decay_mask, trust_ratio_mask)
        _cuda.scale_all(d_ws, d_gs, ENGINE_HYPER, masks, rates, _cuda.Streams(handle, ()))
    table = masked_table(len(pairs), weight_decay_mask, trust_ratio_mask)

    expected_rates = []
    for (w_parent, w_view, g_parent, g_view, d_w, d_g), row in zip(pairs, table, strict=True):
        expected_rate, expected_g = oracle(w_view(w_parent), g_view(g_parent), *row)
        expected_rates.append(expected_rate)
        expected = g_parent.astype(np.float64)
        g_view(expected)[...] = expected_g  # g's parent outside the view is kept
        assert_matches_oracle(d_g.copy_to_host(), expected, g_parent.dtype)
        np.testing.assert_array_equal(d_w.copy_to_host(), w_parent)
    if not with_rates:
        return None
    np.testing.assert_allclose(rates.copy_to_host(), expected_rates, rtol=1e-12)
    return rates.copy_to_host()


def uniform_table(n):
    return np.tile(TABLE_ROW, (n, 1))


def masked_table(n, weight_decay_mask=None, trust_ratio_mask=None):
    """HYPER for each pair, as the oracle takes it: a pair outside a mask gets
    weight decay 0, or an infinite threshold, which no norm exceeds."""
    table = uniform_table(n)
    if weight_decay_mask is not None:
        table[~np.asarray(weight_decay_mask), 1] = 0.0
    if trust_ratio_mask is not None:
        table[~np.asarray(trust_ratio_mask), 0] = np.inf
    return table


CONTIGUOUS = ["0-d", "1-d", "C", "F"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_all_matches_the_oracle_for_each_dtype(dtype, small_chunks, oracle):
    specs = [(dtype, layout, layout) for layout in CONTIGUOUS]
    run_scale_all(oracle, make_pairs(specs))


def test_scale_all_mixes_dtypes_in_one_call(small_chunks, launches, oracle):
    specs = [(DTYPES[i % 3], CONTIGUOUS[i % 4], CONTIGUOUS[i % 4]) for i in range(9)]
    run_scale_all(oracle, make_pairs(specs, seed=10))
    assert launches() == 2 * 3  # a group per dtype


@pytest.mark.parametrize("with_rates", [True, False])
def test_scale_all_takes_strided_pairs_one_by_one(with_rates, small_chunks, launches, oracle):
    # Among contiguous pairs, so that both paths run in one call.
    specs = [
        (np.float32, "strided", "strided"),
        (np.float32, "1-d", "1-d"),
        (np.float64, "3-d strided", "3-d strided"),
        (np.float32, "1-d strided", "1-d"),
        (np.float16, "C", "F"),  # both contiguous, but not in the same order
        (np.float32, "C", "C"),
        (np.float32, "1-d offset", "1-d offset"),
        (np.float32, "one of stride 7", "one of stride 7"),
    ]
    run_scale_all(oracle, make_pairs(specs, seed=20), with_rates=with_rates)
    # One group for the four float32 pairs; two launches for each other pair,
    # which store its rate too.
    assert launches() == 2 + 4 * 2


def test_scale_all_gives_zero_size_pairs_rate_one(small_chunks, oracle):
    w = values((4, 6), np.float32, 30)
    g = values((4, 6), np.float32, 31)
    pairs = make_pairs([(np.float64, "1-d", "1-d")], seed=32)
    empty = [
        cuda.device_array((0,), np.float32),
        cuda.device_array((2, 0, 3), np.float16),
        cuda.to_device(w)[:, 6:],  # a strided view of nothing
    ]
    ws = [*empty, pairs[0][1](pairs[0][4])]
    gs = [*empty[:2], cuda.to_device(g)[:, 6:], pairs[0][3](pairs[0][5])]
    rates = cuda.to_device(np.full(4, -1.0))
    lars_numba.scale_all(ws, gs, rates=rates, **HYPER)
    expected_rate, expected = oracle(pairs[0][0], pairs[0][2], *TABLE_ROW)
    np.testing.assert_allclose(rates.copy_to_host(), [1, 1, 1, expected_rate], rtol=1e-12)
    assert_matches_oracle(pairs[0][5].copy_to_host(), expected, np.float64)


def test_scale_all_with_only_zero_size_pairs_writes_rates_of_one():
    pairs = [cuda.device_array((0,), np.float32) for _ in range(3)]
    rates = cuda.to_device(np.zeros(3))
    lars_numba.scale_all(pairs, pairs, rates=rates)
    np.testing.assert_array_equal(rates.copy_to_host(), [1, 1, 1])


def test_the_masks_give_each_pair_its_own_hyperparameters(small_chunks, oracle):
    # An infinite threshold keeps rate 1 (outside the trust-ratio mask) and a
    # weight decay of 0 adds none (outside the weight-decay mask), on both paths.
    specs = [
        (np.float32, layout, layout) for layout in ("1-d", "C", "strided", "1-d", "3-d strided")
    ]
    rates = run_scale_all(
        oracle,
        make_pairs(specs, seed=40),
        handle=0,
        weight_decay_mask=[True, False, False, True, True],
        trust_ratio_mask=[False, True, False, True, True],
    )
    assert rates[0] == 1.0 and rates[2] == 1.0
    assert rates[1] != 1.0 and rates[3] != 1.0


@pytest.mark.parametrize(
    ("weight_decay_mask", "trust_ratio_mask"),
    [
        ([True, False, True, False, True], None),
        (None, [False, True, False, True, True]),
        ([False, False, True, True, False], [True, False, False, True, False]),
    ],
)
def test_scale_all_masks_match_the_oracle(
    weight_decay_mask, trust_ratio_mask, small_chunks, oracle
):
    # Masked pairs on both paths: contiguous ones in the groups, strided alone.
    layouts = ("1-d", "strided", "C", "3-d strided", "F")
    specs = [(np.float32, layout, layout) for layout in layouts]
    rates = run_scale_all(
        oracle,
        make_pairs(specs, seed=45),
        weight_decay_mask=weight_decay_mask,
        trust_ratio_mask=trust_ratio_mask,
    )
    if trust_ratio_mask is not None:
        assert all(rate == 1.0 for rate, on in zip(rates, trust_ratio_mask, strict=True) if not on)


def flat_pairs(sizes, dtypes, seed):
    """Pairs as ``make_pairs`` makes them, of 1-d arrays of the given sizes."""
    pairs = []
    for i, (size, dtype) in enumerate(zip(sizes, dtypes, strict=True)):
        w, g = values(size, dtype, seed + 2 * i), values(size, dtype, seed + 2 * i + 1)
        pairs.append((w, lambda a: a, g, lambda a: a, cuda.to_device(w), cuda.to_device(g)))
    return pairs


def test_scale_all_handles_many_small_arrays(monkeypatch, oracle):
    # 40 pairs of 1 to 100 elements in three dtypes, two float32 groups at the
    # shipped tuple width, and pairs that span several chunks.
    monkeypatch.setattr(tunables, "GPU_CHUNK", 32)
    sizes = np.random.default_rng(50).integers(1, 100, size=40)
    dtypes = [
        DTYPES[0] if i % 7 == 0 else DTYPES[2] if i % 5 == 0 else DTYPES[1] for i in range(40)
    ]
    run_scale_all(oracle, flat_pairs(sizes, dtypes, seed=100))


class Spied:
    """A kernel that, after each launch, calls ``seen(configuration, args)``."""

    def __init__(self, kernel, seen):
        self.kernel, self.seen = kernel, seen

    def __getitem__(self, configuration):
        launch = self.kernel[configuration]

        def spied(*args):
            launch(*args)
            self.seen(configuration, args)

        return spied


def spy_on_kernels(monkeypatch, seen, updates=True):
    """Make ``_cuda``'s sums kernel, and its update kernels if ``updates``, :class:`Spied`."""
    monkeypatch.setattr(_cuda, "sums_of_chunks", Spied(_cuda.sums_of_chunks, seen))
    if updates:
        for name, kernel in _cuda.UPDATE_KERNELS.items():
            monkeypatch.setitem(_cuda.UPDATE_KERNELS, name, Spied(kernel, seen))


@pytest.fixture
def launches(monkeypatch):
    """The number of kernel launches so far, all of ``_cuda``'s kernels counted."""
    seen = []
    spy_on_kernels(monkeypatch, lambda configuration, args: seen.append(configuration))
    return lambda: len(seen)


@pytest.mark.parametrize("width", [1, 3, 7])
def test_more_pairs_than_a_group_holds_take_more_groups(width, launches, monkeypatch, oracle):
    # The simulator's barriers cost time per thread: few threads, few elements.
    set_grid(monkeypatch, threads=2, min_blocks=1, max_blocks=2)
    monkeypatch.setattr(tunables, "GROUP_PAIRS", width)
    monkeypatch.setattr(tunables, "GPU_CHUNK", 4)
    sizes = [1, 5, 9, 2, 4, 3, 8, 1, 6, 7, 3, 0, 5, 2]
    dtypes = [np.float32] * 10 + [np.float64] * 4
    run_scale_all(oracle, flat_pairs(sizes, dtypes, seed=60))
    assert launches() == 2 * (math.ceil(10 / width) + math.ceil(4 / width))


@pytest.mark.parametrize(("pairs", "groups"), [(1, [1]), (3, [3]), (24, [24]), (27, [24, 3])])
def test_a_group_travels_as_one_table_of_its_arrays_addresses(pairs, groups, monkeypatch, oracle):
    # numba-cuda types and packs every array of a tuple at every launch, and
    # a kernel's parameters may not pass 4 KiB: whatever its number of pairs,
    # a group is one table of addresses, a row per pair, and a like per dtype.
    set_grid(monkeypatch, threads=2, min_blocks=1, max_blocks=2)
    monkeypatch.setattr(tunables, "GPU_CHUNK", 4)
    monkeypatch.setattr(tunables, "GROUP_PAIRS", 24)
    seen = []
    spy_on_kernels(monkeypatch, lambda _, args: seen.append(args[0]), False)
    made = flat_pairs([3] * pairs, [np.float32] * pairs, seed=40)
    run_scale_all(oracle, made)
    assert [len(addresses) for addresses, _ in seen] == groups
    rows = np.concatenate([addresses.copy_to_host() for addresses, _ in seen])
    expected = [_cuda.device_addresses([pair[4], pair[5]]) for pair in made]
    np.testing.assert_array_equal(rows, expected)
    for _, likes in seen:
        assert [(like.size, like.dtype) for like in likes] == [(0, np.float32)] * 2


def test_a_kept_plan_takes_the_addresses_of_each_call_s_arrays(monkeypatch, oracle):
    # Chainer allocates gradients afresh at every step: the plan, kept under
    # the layout, serves them, and each call's table holds its own arrays.
    set_grid(monkeypatch, threads=2, min_blocks=1, max_blocks=2)
    monkeypatch.setattr(tunables, "GPU_CHUNK", 4)
    monkeypatch.setattr(_cuda, "_plans", _cuda.OrderedDict())
    for seed in (70, 80, 90):
        run_scale_all(oracle, flat_pairs([5, 3, 9], [np.float32] * 3, seed=seed))
    assert len(_cuda._plans) == 1


def test_resnet50_takes_two_launches(launches, monkeypatch):
    # ResNet-50's 161 float32 pairs, each cut to 2 elements: the grouping
    # depends on the number of pairs and their dtypes, not their sizes.
    set_grid(monkeypatch, threads=2, min_blocks=1, max_blocks=2)
    arrays = [cuda.to_device(np.ones(2, np.float32)) for _ in RESNET50_SHAPES]
    lars_numba.scale_all(arrays, arrays)
    assert launches() == 2 * math.ceil(161 / tunables.GROUP_PAIRS) == 2
    assert launches() <= 16


def test_resnet50_plan_cuts_every_array_into_chunks():
    # The shipped chunk size on ResNet-50's real sizes, without running a kernel.
    layout = [((np.dtype(np.float32),) * 2, math.prod(shape), True) for shape in RESNET50_SHAPES]
    plan = _cuda._make_plan(
        layout, np.ones((len(layout), 2), np.uint8), 0, cuda.get_current_device()
    )
    assert len(plan.groups) == math.ceil(161 / tunables.GROUP_PAIRS)
    chunks = np.concatenate([group.chunks.copy_to_host() for group in plan.groups])
    sizes = np.array([size for _, size, _ in layout])
    assert sorted({pair for group in plan.groups for pair in group.pairs}) == list(range(161))
    assert chunks.shape[0] == np.sum(np.maximum(1, -(-sizes // tunables.GPU_CHUNK)))
    covered = np.zeros(161, np.int64)
    np.add.at(covered, chunks[:, 5], chunks[:, 2] - chunks[:, 1])
    np.testing.assert_array_equal(covered, sizes)
    assert np.all(chunks[:, 2] - chunks[:, 1] <= tunables.GPU_CHUNK)


@pytest.mark.parametrize(
    ("threads", "min_blocks", "max_blocks", "chunk"),
    [
        (8, 1, 1, 16),  # one block walks every chunk
        (8, 7, 7, 256),  # more blocks than chunks: most have nothing
        (1, 1, 5, 8),  # one thread per block
        (4, 1, 8, 4),  # one element per thread
    ],
)
def test_scale_all_grid_sizes_do_not_change_the_result(
    threads, min_blocks, max_blocks, chunk, monkeypatch, oracle
):
    set_grid(monkeypatch, threads, min_blocks, max_blocks)
    monkeypatch.setattr(tunables, "GPU_CHUNK", chunk)
    sizes, dtypes = [70, 37, 1], [np.float64, np.float32, np.float64]
    run_scale_all(oracle, flat_pairs(sizes, dtypes, seed=70))


def test_every_chunk_of_a_pair_is_scaled_by_the_same_rate(small_chunks):
    # Equal elements must stay equal to the last bit: a rate that differed
    # between the blocks of a pair would show in the chunks they scale.
    w = np.full(1000, 0.7)
    g = np.full(1000, 0.3)
    d_w, d_g = cuda.to_device(w), cuda.to_device(g)
    rates = cuda.to_device(np.zeros(1))
    lars_numba.scale_all([d_w], [d_g], rates=rates, **HYPER)
    after = d_g.copy_to_host()
    assert np.unique(after).size == 1
    rate = rates.copy_to_host()[0]
    # A GPU may fuse the multiply-add: equal to within an ulp or two.
    assert after[0] == pytest.approx(rate * (0.3 + HYPER["weight_decay"] * 0.7), rel=1e-15)


def test_scale_all_reuses_its_tables_and_neither_allocates_nor_waits(
    small_chunks, scratch_handles, monkeypatch, oracle
):
    monkeypatch.setattr(_cuda, "_plans", _cuda.OrderedDict())
    shapes_and_dtypes = [(300, np.float32), ((3, 4), np.float64)]
    rates = cuda.to_device(np.zeros(2))
    first = [cuda.to_device(values(shape, dtype, 80)) for shape, dtype in shapes_and_dtypes]
    lars_numba.scale_all(first, first, rates=rates, **HYPER)
    (plan,) = _cuda._plans.values()
    (scratch,) = _cuda._scratch.values()

    # Other arrays of the same dtypes and sizes, as gradients allocated afresh
    # at every step are: the tables on the device serve them unchanged.
    ws = [values(shape, dtype, 81) for shape, dtype in shapes_and_dtypes]
    gs = [values(shape, dtype, 82) for shape, dtype in shapes_and_dtypes]
    d_ws, d_gs = [cuda.to_device(w) for w in ws], [cuda.to_device(g) for g in gs]

    def forbidden(*args, **kwargs):
        raise AssertionError("called by scale_all")

    with monkeypatch.context() as patch:
        for name in ("device_array", "to_device", "synchronize"):
            patch.setattr(cuda, name, forbidden)
        patch.setattr(type(d_ws[0]), "copy_to_host", forbidden)
        patch.setattr(type(scratch.stream), "synchronize", forbidden)
        lars_numba.scale_all(d_ws, d_gs, rates=rates, **HYPER)
    assert next(iter(_cuda._plans.values())) is plan
    for w, g, d_g in zip(ws, gs, d_gs, strict=True):
        assert_matches_oracle(d_g.copy_to_host(), oracle(w, g, **HYPER)[1], g.dtype)

    # A new weight decay reuses the plan, and so do a learning rate to clip at
    # (a schedule's, changing every step) and the other variants, uploading
    # nothing; new masks make another.
    lars_numba.scale_all(d_ws, d_gs, rates=rates, weight_decay=0.5)
    with monkeypatch.context() as patch:
        for name in ("device_array", "to_device", "synchronize"):
            patch.setattr(cuda, name, forbidden)
        for lr in (0.3, 0.2):
            lars_numba.scale_all(
                d_ws, d_gs, rates=rates, clip_lr=lr, trust_coefficient=0.1, denominator="update"
            )
    assert len(_cuda._plans) == 1
    lars_numba.scale_all(d_ws, d_gs, rates=rates, weight_decay_mask=[True, False])
    assert len(_cuda._plans) == 2
    assert scratch_handles() == [0]


def test_the_plan_cache_keeps_the_most_recent_plans(monkeypatch):
    monkeypatch.setattr(_cuda, "_plans", _cuda.OrderedDict())
    arrays = [cuda.to_device(np.ones(n, np.float32)) for n in range(1, tunables.PLANS_KEPT + 3)]
    for array in arrays:
        _cuda.scale_all(
            [array], [array], ENGINE_HYPER, np.ones((1, 2), np.uint8), None, _cuda.Streams(0, ())
        )
    assert len(_cuda._plans) == tunables.PLANS_KEPT
    assert [key[4][0][1] for key in _cuda._plans] == list(range(3, tunables.PLANS_KEPT + 3))
    # A plan used again becomes the newest; the newest, used again, stays so
    # (found without a lookup), and each call takes its own plan.
    newest = tunables.PLANS_KEPT + 2
    for size in (4, 4, newest, 4):
        _cuda.scale_all(
            [arrays[size - 1]],
            [arrays[size - 1]],
            ENGINE_HYPER,
            np.ones((1, 2), np.uint8),
            None,
            _cuda.Streams(0, ()),
        )
        key, plan = next(reversed(_cuda._plans.items()))
        assert key[4][0][1] == size
        assert plan.groups[0].chunks.copy_to_host()[-1, 2] == size  # its last chunk's end
    assert [key[4][0][1] for key in _cuda._plans] == [3, *range(5, newest + 1), 4]


def test_scale_all_runs_on_the_stream_it_is_given(caller_stream, scratch_handles, oracle):
    stream, handle = caller_stream
    specs = [(np.float32, "1-d", "1-d"), (np.float32, "strided", "strided")]
    run_scale_all(oracle, make_pairs(specs, seed=90), handle=handle)
    stream.synchronize()
    assert scratch_handles() == [handle]


def test_scale_all_takes_the_stream_of_the_arrays_as_given(foreign, monkeypatch):
    seen = []
    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    monkeypatch.setattr(_cuda, "scale", lambda w, g, hyper, streams: seen.append(streams.launch))
    monkeypatch.setattr(
        _cuda,
        "scale_all",
        lambda ws, gs, hyper, masks, rates, streams: seen.append(streams.launch),
    )
    d_w, d_g = (cuda.to_device(np.ones(4, np.float32)) for _ in "wg")
    lars_numba.scale(foreign(d_w), foreign(d_g, stream=7))
    lars_numba.scale_all([foreign(d_w)], [foreign(d_g, stream=7)])
    assert seen == [7, 7]


def test_scale_all_refuses_a_read_only_gradient_or_rates(foreign):
    d_w, d_g = (cuda.to_device(np.ones(4, np.float32)) for _ in "wg")
    with pytest.raises(ValueError, match=r"gs\[0\] must be writeable"):
        lars_numba.scale_all([foreign(d_w)], [foreign(d_g, readonly=True)])
    rates = foreign(cuda.to_device(np.zeros(1)), readonly=True)
    with pytest.raises(ValueError, match="rates must be writeable"):
        lars_numba.scale_all([d_w], [d_g], rates=rates)
    np.testing.assert_array_equal(d_g.copy_to_host(), 1.0)


def test_scale_all_names_a_non_array_among_gpu_arrays():
    d_w, d_g = (cuda.to_device(np.ones(4, np.float32)) for _ in "wg")
    with pytest.raises(TypeError, match=r"gs\[1\] must be a NumPy or CUDA array; got list"):
        lars_numba.scale_all([d_w, d_w], [d_g, [1.0, 2.0]])
    with pytest.raises(TypeError, match=r"the arrays must all be NumPy arrays or all CUDA"):
        lars_numba.scale_all([d_w], [d_g], rates=np.empty(1))
    np.testing.assert_array_equal(d_g.copy_to_host(), 1.0)


# -- concurrency: host threads, foreign streams, buffers still in use ----------


def test_two_host_threads_on_one_stream_each_get_their_own_rate(scratch_handles, monkeypatch):
    # Thread A pauses between its sums and its update for as long as it takes
    # B to enqueue its sums on the same stream and scratch, if B can: then A
    # would be scaled with B's totals. A call's launches must not interleave.
    pairs = {
        name: (values(500, np.float64, seed), values(500, np.float64, seed + 1) * seed)
        for name, seed in (("A", 1), ("B", 5))
    }
    devices = {name: [cuda.to_device(a) for a in pair] for name, pair in pairs.items()}
    a_summed, b_summed = threading.Event(), threading.Event()

    def pause_after_a_s_sums(configuration, args):
        if threading.current_thread().name == "A":
            a_summed.set()
            b_summed.wait(timeout=2)
        else:
            b_summed.set()

    spy_on_kernels(monkeypatch, pause_after_a_s_sums, updates=False)

    def call(name):
        if name == "B":
            a_summed.wait(timeout=10)
        lars_numba.scale(*devices[name], **HYPER)

    threads = [threading.Thread(target=call, args=(name,), name=name) for name in "AB"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert scratch_handles() == [0]
    for name, (w, g) in pairs.items():
        _, expected = lars_oracle(w, g, **HYPER)
        assert_matches_oracle(devices[name][1].copy_to_host(), expected, np.float64)


def test_host_threads_on_the_per_thread_default_stream_get_scratch_of_their_own(
    foreign, scratch_handles, oracle
):
    # Handle 2 is a different stream in each thread: kernels of two threads
    # may run at once, so sharing the scratch would mix their sums.
    w, g = values(100, np.float32, 3), values(100, np.float32, 4)
    results = {}

    def call(name):
        d_w, d_g = cuda.to_device(w), cuda.to_device(g)
        lars_numba.scale(foreign(d_w, 2), foreign(d_g, 2), **HYPER)
        results[name] = d_g.copy_to_host()

    threads = [threading.Thread(target=call, args=(name,)) for name in "AB"]
    for thread in threads:
        thread.start()
        thread.join(timeout=60)
    assert scratch_handles() == [2, 2]
    assert len({thread for _, _, thread in _cuda._scratch}) == 2
    _, expected = oracle(w, g, **HYPER)
    for result in results.values():
        assert_matches_oracle(result, expected, np.float32)
    assert len(results) == 2


class StreamLog:
    """Numba streams and events standing in for real ones, writing down what is done.

    ``_numba_stream(handle)`` gives a simulator stream that the log knows by
    its handle; events record ``("record", handle)`` and ``("wait", handle)``;
    the kernels' launches are logged as ``"launch"`` and host waits refused.
    """

    def __init__(self, monkeypatch):
        self.entries, self.streams = [], {}
        log = self

        class Event:
            def record(self, stream):
                log.entries.append(("record", log.handle(stream)))

            def wait(self, stream):
                log.entries.append(("wait", log.handle(stream)))

            def synchronize(self):
                raise AssertionError("a host wait")

        def numba_stream(handle):
            return self.streams.setdefault(_cuda._same_stream(handle), cuda.stream())

        monkeypatch.setattr(_cuda, "_new_event", Event)
        monkeypatch.setattr(_cuda, "_numba_stream", numba_stream)
        monkeypatch.setattr(cuda, "synchronize", Event.synchronize)
        spy_on_kernels(
            monkeypatch,
            lambda configuration, args: self.entries.append(
                ("launch", self.handle(configuration[2]))
            ),
        )

    def handle(self, stream):
        return next(handle for handle, known in self.streams.items() if known is stream)


@pytest.mark.parametrize(
    ("w_stream", "g_stream", "cupy_stream", "expected"),
    [
        # The launch stream waits for every other stream an interface names.
        (5, 3, None, [("record", 5), ("wait", 3)]),
        (5, None, None, []),
        (None, None, None, []),
        (5, 5, None, []),
        (1, None, 0, []),  # 0 and 1 both name the legacy default stream
        (9, 7, 42, [("record", 7), ("wait", 42), ("record", 9), ("wait", 42)]),
    ],
)
def test_scale_waits_on_the_device_for_the_streams_of_w_and_g(
    w_stream, g_stream, cupy_stream, expected, foreign, scratch_handles, monkeypatch, oracle
):
    if cupy_stream is not None:
        current = types.SimpleNamespace(ptr=cupy_stream)
        fake_cupy = types.SimpleNamespace(
            cuda=types.SimpleNamespace(get_current_stream=lambda: current)
        )
        monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    log = StreamLog(monkeypatch)
    w, g = values(50, np.float32, 11), values(50, np.float32, 12)
    d_w, d_g = cuda.to_device(w), cuda.to_device(g)
    lars_numba.scale(foreign(d_w, w_stream), foreign(d_g, g_stream), **HYPER)

    launches = [entry for entry in log.entries if entry[0] == "launch"]
    first = log.entries.index(launches[0])
    assert log.entries[:first] == expected
    # Then the kernels, and the event that marks the end of the call's work.
    assert log.entries[-1][0] == "record"
    assert {handle for _, handle in log.entries[first:]} == {launches[0][1]}
    _, expected_g = oracle(w, g, **HYPER)
    assert_matches_oracle(d_g.copy_to_host(), expected_g, np.float32)


def test_scale_all_waits_for_the_stream_of_every_array_and_of_rates(
    foreign, scratch_handles, monkeypatch
):
    log = StreamLog(monkeypatch)
    arrays = [cuda.to_device(np.ones(4, np.float32)) for _ in range(4)]
    ws = [foreign(arrays[0], 7), foreign(arrays[1])]
    gs = [foreign(arrays[2], 9), foreign(arrays[3], 7)]
    rates = foreign(cuda.to_device(np.zeros(2)), 11)
    lars_numba.scale_all(ws, gs, rates=rates)
    first = next(i for i, entry in enumerate(log.entries) if entry[0] == "launch")
    # g's stream before w's, pair by pair: gs[0]'s, 9, is the launch stream.
    assert log.entries[:first] == [("record", 7), ("wait", 9), ("record", 11), ("wait", 9)]


@pytest.mark.parametrize(
    ("handles", "launch", "waits"),
    [
        ([], 0, ()),
        ([None, None], 0, ()),
        ([None, 4, 6, 4, 2], 4, (6, 2)),
        ([1, 0, None], 1, ()),
        ([2, 1], 2, (1,)),
    ],
)
def test_the_launch_stream_is_the_first_named_and_waits_for_the_others_once(
    handles, launch, waits, monkeypatch
):
    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    assert _cuda.caller_streams(handles) == _cuda.Streams(launch, waits)


@pytest.fixture
def completed(monkeypatch):
    """The events the GPU has passed, as the test says: none until it adds them.

    The caches of plans and of buffers retiring start empty.
    """
    passed = []
    monkeypatch.setattr(_cuda, "_completed", lambda event: any(event is e for e in passed))
    monkeypatch.setattr(_cuda, "_retiring", [])
    monkeypatch.setattr(_cuda, "_plans", _cuda.OrderedDict())
    return passed


def retiring():
    return [buffers for buffers, _ in _cuda._retiring]


def test_an_evicted_plan_is_kept_until_its_last_call_is_done(completed, monkeypatch):
    monkeypatch.setattr(tunables, "PLANS_KEPT", 1)
    small, large = (cuda.to_device(np.ones(n, np.float32)) for n in (3, 5))
    lars_numba.scale(small, small)
    (plan,) = _cuda._plans.values()
    (scratch,) = _cuda._scratch.values()
    assert plan.last_use == [scratch.event]

    lars_numba.scale(large, large)  # evicts the first plan
    assert len(_cuda._plans) == 1
    assert any(buffers is plan for buffers in retiring())
    completed.append(scratch.event)
    # Evicts the second plan, whose last call is marked by the same event of
    # the stream's: the GPU has passed it, so neither plan is kept.
    lars_numba.scale(small, small)
    assert retiring() == []


def test_scratch_that_grows_is_kept_until_its_last_call_is_done(
    completed, scratch_handles, small_chunks
):
    one_chunk, many = (cuda.to_device(np.ones(n, np.float32)) for n in (8, 400))
    lars_numba.scale(one_chunk, one_chunk)
    (old,) = _cuda._scratch.values()
    lars_numba.scale(many, many)
    (new,) = _cuda._scratch.values()
    assert new is not old and new.sums.shape[0] > old.sums.shape[0]
    assert _cuda._retiring == [(old, (old.event,))]
    _, expected = lars_oracle(np.ones(400, np.float32), np.ones(400, np.float32))
    assert_matches_oracle(many.copy_to_host(), expected, np.float32)


def test_scratch_is_kept_for_a_bounded_number_of_streams(completed, scratch_handles, monkeypatch):
    monkeypatch.setattr(tunables, "STREAMS_KEPT", 2)
    streams = {handle: cuda.stream() for handle in (101, 102, 103)}
    monkeypatch.setattr(_cuda, "_numba_stream", streams.__getitem__)
    d_w = cuda.to_device(np.ones(4))
    for handle in streams:
        _cuda.scale(d_w, cuda.to_device(np.ones(4)), ENGINE_HYPER, _cuda.Streams(handle, ()))
    assert scratch_handles() == [102, 103]
    ((evicted, events),) = _cuda._retiring
    assert evicted.stream is streams[101] and events == (evicted.event,)


def test_past_the_bound_the_oldest_retiring_buffers_are_waited_for(completed, monkeypatch):
    monkeypatch.setattr(tunables, "BUFFERS_RETIRING", 2)
    waited = []
    events = [types.SimpleNamespace(synchronize=lambda n=n: waited.append(n)) for n in range(4)]
    for number, event in enumerate(events):
        _cuda._retire(f"buffers {number}", (event,))
    assert waited == [0, 1]
    assert retiring() == ["buffers 2", "buffers 3"]
    completed.extend(events)
    _cuda._retire("buffers 4", ())
    assert retiring() == []
