"""Every way to scale, through one fixture: a property is tested once for all of them.

The ways are ``scale``, ``scale_all`` (the pair alone, and among others), the
hook ``GradientLARS`` and the hook ``FusedGradientLARS`` on the CPU, and
``scale`` and ``scale_all`` on the CUDA simulator (or a GPU). Each takes host
arrays and returns the scaled gradient and the rate as host values (``None``
where the way does not tell its rate: ``GradientLARS``).
"""

import numba
import numpy as np
import pytest
from conftest import assert_matches_oracle

import lars_numba
from lars_numba import tunables

chainer = pytest.importorskip("chainer")
from lars_numba.chainer import FusedGradientLARS, GradientLARS  # noqa: E402

HYPER = {"threshold": 1e-2, "weight_decay": 1e-3, "eps": 1e-9}


def by_scale(w, g, parallel, hyper=HYPER):
    rate = lars_numba.trust_ratio(w, g, **hyper, parallel=parallel)
    lars_numba.scale(w, g, **hyper, parallel=parallel)
    return g, rate


def by_scale_all(w, g, parallel, hyper=HYPER):
    rates = np.empty(1)
    lars_numba.scale_all([w], [g], **hyper, rates=rates, parallel=parallel)
    return g, rates[0]


def by_scale_all_among_others(w, g, parallel, hyper=HYPER):
    # Other pairs of the same dtype before and after, large and small.
    rng = np.random.default_rng(7)
    others = [rng.standard_normal(size).astype(w.dtype) for size in (3, 2 * tunables.CPU_CHUNK + 1)]
    ws = [others[0], w, others[1]]
    gs = [others[0].copy(), g, others[1].copy()]
    rates = np.empty(3)
    lars_numba.scale_all(ws, gs, **hyper, rates=rates, parallel=parallel)
    return g, rates[1]


def _model(w, g):
    model = chainer.Link()
    with model.init_scope():
        model.p = chainer.Parameter(w)
    model.p.grad = g
    return model


def hook_arguments(hyper):
    """``scale``'s keyword arguments as a hook's, and the learning rate its
    optimizer needs: ``clip_lr`` is ``clip=True`` at the optimizer's rate."""
    arguments = {name: value for name, value in hyper.items() if name != "clip_lr"}
    clip_lr = hyper.get("clip_lr")
    return {**arguments, "clip": clip_lr is not None}, 1.0 if clip_lr is None else clip_lr


def by_gradient_lars(w, g, parallel, hyper=HYPER):
    model = _model(w, g)
    arguments, lr = hook_arguments(hyper)
    chainer.optimizers.SGD(lr=lr).setup(model)
    GradientLARS(**arguments, parallel=parallel)(model.p.update_rule, model.p)
    return model.p.grad, None


def by_fused_gradient_lars(w, g, parallel, hyper=HYPER):
    model = _model(w, g)
    arguments, lr = hook_arguments(hyper)
    optimizer = chainer.optimizers.SGD(lr=lr).setup(model)
    reporter = chainer.Reporter()
    observation = {}
    with reporter.scope(observation):
        FusedGradientLARS(**arguments, report=True, parallel=parallel)(optimizer)
    return model.p.grad, observation["lars/p"]


def on_device(scale_with):
    """A way to scale on the GPU: host arrays copied there and the result back."""

    def run(w, g, parallel, hyper=HYPER):
        from numba import cuda

        d_w, d_g = cuda.to_device(w), cuda.to_device(g)
        rate = scale_with(d_w, d_g, hyper)
        return d_g.copy_to_host(), rate

    return run


def gpu_scale(d_w, d_g, hyper):
    rate = lars_numba.trust_ratio(d_w, d_g, **hyper)
    lars_numba.scale(d_w, d_g, **hyper)
    return rate


def gpu_scale_all(d_w, d_g, hyper):
    from numba import cuda

    rates = cuda.to_device(np.zeros(1))
    lars_numba.scale_all([d_w], [d_g], **hyper, rates=rates)
    return rates.copy_to_host()[0]


CPU_WAYS = {
    "scale": by_scale,
    "scale_all": by_scale_all,
    "scale_all among others": by_scale_all_among_others,
    "GradientLARS": by_gradient_lars,
    "FusedGradientLARS": by_fused_gradient_lars,
}


GPU_WAYS = {
    "scale on the GPU": on_device(gpu_scale),
    "scale_all on the GPU": on_device(gpu_scale_all),
}


@pytest.fixture(params=list(CPU_WAYS))
def way(request):
    """A way to scale on the CPU: ``way(w, g, parallel) -> (scaled g, rate)``."""
    return CPU_WAYS[request.param]


SIZES = [0, 1, 100, tunables.CPU_CHUNK, 3 * tunables.CPU_CHUNK + 17]


def pair(size, dtype, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(size).astype(dtype)
    g = (rng.standard_normal(size) * 1e-2).astype(dtype)
    return w, g


# The simulator runs a Python thread per GPU thread: small sizes only there.
WAYS_AND_SIZES = [(name, size) for name in CPU_WAYS for size in SIZES]
WAYS_AND_SIZES += [(name, size) for name in GPU_WAYS for size in SIZES[:3]]


def small_gpu_grid(monkeypatch):
    """The smallest grid, for the simulator's thread per GPU thread."""
    for tunable, value in (("THREADS_PER_BLOCK", 8), ("MIN_BLOCKS", 1), ("MAX_BLOCKS", 3)):
        monkeypatch.setattr(tunables, tunable, value)
    monkeypatch.setattr(tunables, "GPU_CHUNK", 64)


def assert_way_matches(scaled, rate, expected, dtype, rtol):
    """A way's scaled gradient and rate (``None``: not told) against an oracle's
    ``(rate, g')``: to a few ulps of ``dtype``, and to ``rtol`` in float64, where
    the sums are added in another order than the oracle's."""
    expected_rate, expected_g = expected
    if dtype == np.float64:
        np.testing.assert_allclose(scaled, expected_g, rtol=rtol)
    else:
        assert_matches_oracle(scaled, expected_g, dtype)
    if rate is not None:
        assert rate == pytest.approx(expected_rate, rel=rtol)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize(("name", "size"), WAYS_AND_SIZES)
def test_every_way_matches_the_oracle(name, size, dtype, oracle, monkeypatch):
    if name in GPU_WAYS:
        small_gpu_grid(monkeypatch)
    w, g = pair(size, dtype)
    scaled, got = {**CPU_WAYS, **GPU_WAYS}[name](w, g.copy(), True)
    # Float64 sums of 2e5 terms: 1e-11.
    assert_way_matches(scaled, got, oracle(w, g, **HYPER), dtype, rtol=1e-11)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("size", SIZES[1:])
def test_every_way_gives_the_same_bits_on_any_thread_count(way, size, dtype):
    w, g = pair(size, dtype, seed=size)
    reference, reference_rate = by_scale(w, g.copy(), parallel=False)
    results = []
    for threads in range(1, numba.config.NUMBA_NUM_THREADS + 1):
        numba.set_num_threads(threads)
        try:
            results.append(way(w, g.copy(), parallel=True))
        finally:
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    results.append(way(w, g.copy(), parallel=False))
    for scaled, rate in results:
        assert rate in (None, reference_rate)  # bit for bit, not approximately
        np.testing.assert_array_equal(scaled, reference)
        assert scaled.tobytes() == reference.tobytes()
