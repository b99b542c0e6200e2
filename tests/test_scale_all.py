"""``scale_all`` on NumPy arrays: equal to ``scale`` on each pair, and its input checks."""

import numpy as np
import pytest
from conftest import assert_matches_oracle, update_terms
from hypothesis import given, settings
from hypothesis import strategies as st
from test_api import DTYPES, hyperparameters, laid_pairs, run_on_layer

import lars_numba
from lars_numba import _cpu, tunables


def masked_hyper(hyper, decays, adapts):
    """The arguments of ``scale`` that give a pair its masked rule."""
    return {
        **hyper,
        "weight_decay": hyper["weight_decay"] if decays else 0.0,
        "threshold": hyper["threshold"] if adapts else np.inf,
    }


@settings(max_examples=150, deadline=None)
@given(
    pairs=st.lists(laid_pairs(), max_size=8),
    hyper=hyperparameters,
    data=st.data(),
)
def test_equals_scale_on_each_pair(pairs, hyper, data, oracle):
    ws = [laid[0].array for laid in pairs]
    gs = [laid[1].array for laid in pairs]
    decays = data.draw(st.lists(st.booleans(), min_size=len(pairs), max_size=len(pairs)))
    adapts = data.draw(st.lists(st.booleans(), min_size=len(pairs), max_size=len(pairs)))
    outside_before = [laid[1].outside() for laid in pairs]
    ws_before = [w.copy() for w in ws]
    expected = []
    for w, g, decay, adapt in zip(ws, gs, decays, adapts, strict=True):
        rule = masked_hyper(hyper, decay, adapt)
        rate, scaled = oracle(w, g, **rule)
        terms = update_terms(w, g, rate, rule["weight_decay"])
        if adapt:  # scale refuses an infinite threshold; the oracle takes it
            reference = g.copy()
            lars_numba.scale(w, reference, **rule)
        else:
            reference = None
        expected.append((rate, scaled, terms, reference))
    rates = np.full(len(pairs), -1.0)

    lars_numba.scale_all(
        ws, gs, **hyper, weight_decay_mask=decays, trust_ratio_mask=adapts, rates=rates
    )

    for i, (rate, scaled, terms, reference) in enumerate(expected):
        assert rates[i] == pytest.approx(rate, rel=1e-12, nan_ok=True)
        assert_matches_oracle(gs[i], scaled, gs[i].dtype, terms)
        if reference is not None:  # the same loops, maybe summed in another order
            assert_matches_oracle(gs[i], reference, gs[i].dtype)
        np.testing.assert_array_equal(ws[i], ws_before[i])
        np.testing.assert_array_equal(pairs[i][1].outside(), outside_before[i])


@pytest.mark.parametrize("parallel", [False, True])
def test_large_pairs_and_batches_give_the_same_bits_on_any_thread_count(parallel, oracle):
    rng = np.random.default_rng(3)
    # Pairs of many chunks, of one, and (float32: 8 bytes per element of a
    # pair) one pair of a batch of its own between two batches of several.
    sizes = [3 * tunables.CPU_CHUNK + 11, 5, tunables.CPU_CHUNK, 2 * tunables.PARALLEL_MIN_SIZE]
    sizes += [tunables.CPU_BATCH_BYTES // 8 + 5, 7, 2 * tunables.CPU_CHUNK]
    assert len(_cpu.pair_batches(np.array(sizes), 4, tunables.CPU_BATCH_BYTES)) - 1 == 3
    ws = [rng.standard_normal(size).astype(np.float32) for size in sizes]
    gs = [rng.standard_normal(size).astype(np.float32) * 1e-2 for size in sizes]
    serial = [g.copy() for g in gs]
    expected = [oracle(w, g, weight_decay=1e-4) for w, g in zip(ws, gs, strict=True)]
    rates = np.empty(len(sizes))

    lars_numba.scale_all(ws, gs, weight_decay=1e-4, rates=rates, parallel=parallel)
    lars_numba.scale_all(ws, serial, weight_decay=1e-4, parallel=False)

    for g, same, (rate, scaled), got in zip(gs, serial, expected, rates, strict=True):
        assert got == pytest.approx(rate, rel=1e-12)
        assert_matches_oracle(g, scaled, np.float32)
        np.testing.assert_array_equal(g, same)


def test_parallel_false_keeps_to_the_serial_kernel(monkeypatch, oracle):
    def refuse(*args):
        raise AssertionError("the parallel kernel ran")

    kernels = _cpu._KERNELS["scale"]
    monkeypatch.setitem(kernels, True, (*kernels[True][:2], refuse))
    w = np.linspace(-1, 1, 2 * tunables.PARALLEL_MIN_SIZE)
    g = w[::-1].copy()
    _, expected = oracle(w, g, weight_decay=1e-4)
    lars_numba.scale_all([w], [g], weight_decay=1e-4, parallel=False)
    assert_matches_oracle(g, expected, w.dtype)
    with pytest.raises(AssertionError, match="the parallel kernel ran"):
        lars_numba.scale_all([w], [g])


def test_thousands_of_tiny_pairs_of_mixed_dtypes(oracle):
    rng = np.random.default_rng(4)
    dtypes = [DTYPES[i % 3] for i in range(3000)]
    ws = [rng.standard_normal(rng.integers(0, 20)).astype(dtype) for dtype in dtypes]
    gs = [rng.standard_normal(w.shape).astype(w.dtype) for w in ws]
    expected = [oracle(w, g, weight_decay=1e-3) for w, g in zip(ws, gs, strict=True)]
    rates = np.empty(len(ws))
    lars_numba.scale_all(ws, gs, weight_decay=1e-3, rates=rates)
    for g, (rate, scaled), got in zip(gs, expected, rates, strict=True):
        assert got == pytest.approx(rate, rel=1e-12)
        assert_matches_oracle(g, scaled, g.dtype)


def test_float16_sums_that_overflow_float16_and_nan_stay_in_their_pair(oracle):
    ws = [np.full(100_000, 300, np.float16), np.array([1.0, np.nan], np.float16)]
    gs = [np.full(100_000, 0.5, np.float16), np.array([1.0, 2.0], np.float16)]
    expected = [oracle(w, g, weight_decay=1e-4) for w, g in zip(ws, gs, strict=True)]
    lars_numba.scale_all(ws, gs, weight_decay=1e-4)
    for g, (_, scaled) in zip(gs, expected, strict=True):
        assert_matches_oracle(g, scaled, np.float16)
    assert np.isfinite(gs[0]).all()
    assert np.isnan(gs[1]).tolist() == [False, True]  # NaN norm: rate 1, as in Chainer


def test_no_pairs_and_zero_size_pairs():
    lars_numba.scale_all([], [], rates=np.empty(0))
    rates = np.zeros(2)
    lars_numba.scale_all(
        [np.empty((2, 0, 1)), np.empty(0)], [np.empty((2, 0, 1)), np.empty(0)], rates=rates
    )
    np.testing.assert_array_equal(rates, [1.0, 1.0])


def test_g_may_be_w_or_overlap_its_own_w(oracle):
    w = np.linspace(-1, 1, 101)
    buffer = np.linspace(-2, 3, 60)
    ws, gs = [w, buffer[1:]], [w, buffer[:-1]]
    expected = [oracle(a.copy(), b.copy(), weight_decay=0.1) for a, b in zip(ws, gs, strict=True)]
    lars_numba.scale_all(ws, gs, weight_decay=0.1)
    for g, (_, scaled) in zip(gs, expected, strict=True):
        assert_matches_oracle(g, scaled, g.dtype)


def test_weights_may_be_shared_between_pairs(oracle):
    w = np.linspace(1, 2, 30)
    gs = [np.linspace(-1, 1, 30), np.linspace(0, 1, 30)]
    expected = [oracle(w, g, weight_decay=0.1) for g in gs]
    lars_numba.scale_all([w, w[:]], gs, weight_decay=0.1)
    for g, (_, scaled) in zip(gs, expected, strict=True):
        assert_matches_oracle(g, scaled, g.dtype)


# -- bad input: a clear error and nothing written ------------------------------


def fresh():
    """Two valid pairs of float32 arrays."""
    return [np.linspace(1, 2, 6, dtype=np.float32), np.ones(3, np.float32)], [
        np.linspace(-1, 1, 6, dtype=np.float32),
        np.full(3, 2, np.float32),
    ]


# Interleaved views share no element, but their address ranges overlap:
# refused, as the check compares ranges.
BUFFER = np.arange(20, dtype=np.float32)


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (lambda ws, gs: (np.stack(ws[:1]), gs, {}), TypeError, "ws must be a sequence of arrays"),
        (lambda ws, gs: (ws, 3, {}), TypeError, "gs must be a sequence of arrays; got int"),
        (lambda ws, gs: (ws, gs[:1], {}), ValueError, "gs must hold one array per array of ws"),
        (
            lambda ws, gs: ([ws[0], ws[1].astype(np.float64)], gs, {}),
            TypeError,
            r"gs\[1\] must have the dtype of ws\[1\], float64; got float32",
        ),
        (
            lambda ws, gs: (ws, [gs[0], np.ones(4, np.float32)], {}),
            ValueError,
            r"gs\[1\] must have the shape of ws\[1\], \(3,\); got \(4,\)",
        ),
        (
            lambda ws, gs: ([ws[0], [1.0]], gs, {}),
            TypeError,
            r"ws\[1\] must be a NumPy or CUDA array",
        ),
        (
            lambda ws, gs: (ws, [gs[0], np.ones(3, int)], {}),
            TypeError,
            r"gs\[1\] must have dtype float16, float32 or float64",
        ),
        (
            lambda ws, gs: (ws, gs, {"weight_decay_mask": [1, 0]}),
            TypeError,
            "weight_decay_mask must hold booleans, one per pair; got dtype int",
        ),
        (
            lambda ws, gs: (ws, gs, {"trust_ratio_mask": [True]}),
            ValueError,
            r"trust_ratio_mask must hold one boolean per pair, \(2,\); got \(1,\)",
        ),
        (
            lambda ws, gs: (ws, gs, {"rates": np.empty(2, np.float32)}),
            TypeError,
            "rates must be a float64 array; got float32",
        ),
        (
            lambda ws, gs: (ws, gs, {"rates": np.empty(3)}),
            ValueError,
            r"rates must have one entry per pair, \(2,\); got \(3,\)",
        ),
        (
            lambda ws, gs: (ws, gs, {"eps": -1.0}),
            ValueError,
            "eps must be finite and >= 0; got -1.0",
        ),
        (
            lambda ws, gs: (ws, [gs[0], gs[0][:3]], {}),
            ValueError,
            r"gs\[0\] and gs\[1\] overlap",
        ),
        (
            lambda ws, gs: ([ws[0], gs[0][:3]], gs, {}),
            ValueError,
            r"ws\[1\] and gs\[0\] overlap",
        ),
        (
            lambda ws, gs: ([ws[0], BUFFER[1:7:2]], [BUFFER[:12:2], gs[1]], {}),
            ValueError,
            r"ws\[1\] and gs\[0\] overlap",
        ),
    ],
)
def test_bad_input_raises_naming_the_argument_and_writes_nothing(change, error, message):
    ws, gs = fresh()
    ws, gs, keywords = change(ws, gs)
    arrays = [a for a in (*ws, *gs) if isinstance(a, np.ndarray)] if isinstance(gs, list) else []
    before = [a.copy() for a in arrays]
    with pytest.raises(error, match=message):
        lars_numba.scale_all(ws, gs, weight_decay=0.1, **keywords)
    for array, copy in zip(arrays, before, strict=True):
        np.testing.assert_array_equal(array, copy)


def test_rates_sharing_memory_with_a_gradient_are_refused():
    ws, gs = fresh()
    storage = np.zeros(8)
    gs = [storage[:6], storage[6:7]]
    ws = [np.ones(6), np.ones(1)]
    with pytest.raises(ValueError, match=r"gs\[0\] and rates overlap"):
        lars_numba.scale_all(ws, gs, rates=storage[4:6])
    np.testing.assert_array_equal(storage, 0.0)


def test_read_only_gradient_or_rates_are_refused():
    ws, gs = fresh()
    gs[1].flags.writeable = False
    with pytest.raises(ValueError, match=r"gs\[1\] must be writeable"):
        lars_numba.scale_all(ws, gs)
    ws, gs = fresh()
    rates = np.empty(2)
    rates.flags.writeable = False
    with pytest.raises(ValueError, match="rates must be writeable"):
        lars_numba.scale_all(ws, gs, rates=rates)


CONCURRENT_CALLS = """
import threading
import numpy as np
import lars_numba
from lars_numba import _cpu, tunables

rng = np.random.default_rng(1)
sizes = [3 * tunables.PARALLEL_MIN_SIZE, 100, 2 * tunables.CPU_CHUNK]
models = [[rng.standard_normal((2, size)).astype(np.float32) for size in sizes] for _ in range(4)]
expected = [[g.copy() for _, g in model] for model in models]
for model, want in zip(models, expected):
    for (w, _), g in zip(model, want):
        lars_numba.scale(w, g, weight_decay=1e-4, parallel=False)
barrier = threading.Barrier(len(models))

def work(model):
    barrier.wait()
    lars_numba.scale_all([w for w, _ in model], [g for _, g in model], weight_decay=1e-4)

threads = [threading.Thread(target=work, args=(model,)) for model in models]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
for model, want in zip(models, expected):
    for (_, g), g_want in zip(model, want):
        np.testing.assert_array_equal(g, g_want)
"""


def test_concurrent_calls_from_threads_are_safe_on_the_workqueue_layer():
    done = run_on_layer(CONCURRENT_CALLS, "workqueue")
    assert done.returncode == 0, done.stderr
