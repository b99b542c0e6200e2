"""Every framework's LARS as lars_numba's arguments, against that framework's rule.

Each variant is a set of keyword arguments of ``scale`` and the float64 oracle
of the framework it reproduces (``conftest``, each citing its source). They
are compared on every way to scale (``test_ways``), on every dtype and layout,
with the masks of ``scale_all`` and the hooks' exclusions, in short training
runs, and every bad value of a new parameter is refused before anything is
written.
"""

import functools
import math

import numpy as np
import pytest
from conftest import (
    apex_larc_oracle,
    lars_oracle,
    mxnet_lars_oracle,
    optax_lars_oracle,
    timm_lars_oracle,
)
from test_ways import (
    CPU_WAYS,
    GPU_WAYS,
    assert_way_matches,
    gpu_scale,
    gpu_scale_all,
    hook_arguments,
    small_gpu_grid,
)

import lars_numba
from lars_numba import tunables

chainer = pytest.importorskip("chainer")
from lars_numba.chainer import FusedGradientLARS, GradientLARS, ndim_at_most  # noqa: E402

#: name: (the arguments of ``scale``, the oracle of the framework as ``(w, g) -> (rate, g')``)
VARIANTS = {
    "Chainer GradientLARS": (
        {"threshold": 1e-2, "weight_decay": 1e-3, "eps": 1e-9},
        functools.partial(lars_oracle, threshold=1e-2, weight_decay=1e-3, eps=1e-9),
    ),
    "apex LARC, scale mode": (
        {"threshold": 0.0, "weight_decay": 5e-4, "eps": 1e-8, "trust_coefficient": 0.02},
        functools.partial(apex_larc_oracle, lr=0.1, weight_decay=5e-4, clip=False),
    ),
    # With lr 0.1 the rate, about 2, is clipped to 1: the step is lr.
    "apex LARC, clip mode": (
        {
            "threshold": 0.0,
            "weight_decay": 5e-4,
            "eps": 1e-8,
            "trust_coefficient": 0.02,
            "clip_lr": 0.1,
        },
        functools.partial(apex_larc_oracle, lr=0.1, weight_decay=5e-4, clip=True),
    ),
    # With lr 0.5 the rate, about 0.1, is divided by lr and not clipped.
    "timm Lars, trust_clip": (
        {
            "threshold": 0.0,
            "weight_decay": 1e-4,
            "eps": 1e-8,
            "trust_coefficient": 1e-3,
            "clip_lr": 0.5,
        },
        functools.partial(
            timm_lars_oracle, lr=0.5, weight_decay=1e-4, trust_clip=True, always_adapt=True
        ),
    ),
    "optax lars": (
        {
            "threshold": 0.0,
            "weight_decay": 1e-4,
            "eps": 0.0,
            "trust_coefficient": 1e-3,
            "denominator": "update",
        },
        functools.partial(optax_lars_oracle, weight_decay=1e-4),
    ),
    "MXNet LARS": (
        {"threshold": 0.0, "weight_decay": 1e-4, "eps": 1e-8, "trust_coefficient": 1e-3},
        functools.partial(mxnet_lars_oracle, weight_decay=1e-4, eta=1e-3, epsilon=1e-8),
    ),
}


@pytest.fixture(params=list(VARIANTS))
def variant(request):
    return VARIANTS[request.param]


#: name: (shape of a C-ordered base array, or an F-ordered one, the view of it).
LAYOUTS = {
    "1-d": ((300,), "C", lambda a: a),
    "0-d": ((), "C", lambda a: a),
    "zero-size": ((0, 4), "C", lambda a: a),
    "Fortran order": ((7, 9), "F", lambda a: a),
    "strided": ((900,), "C", lambda a: a[::3]),
    "n-d strided": ((6, 8, 10), "C", lambda a: a[:, ::2, 1:9]),
}


def bases(layout, dtype, seed=0):
    shape, order, _ = LAYOUTS[layout]
    rng = np.random.default_rng(seed)
    w = np.asarray(rng.standard_normal(shape), order=order).astype(dtype, order=order)
    g = np.asarray(rng.standard_normal(shape) * 1e-2, order=order).astype(dtype, order=order)
    return w, g


def assert_matches(scaled, rate, expected, dtype):
    assert_way_matches(scaled, rate, expected, dtype, rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", list(CPU_WAYS))
def test_every_variant_matches_its_framework_on_the_cpu(variant, name, layout, dtype):
    hyper, framework = variant
    w_base, g_base = bases(layout, dtype)
    view = LAYOUTS[layout][2]
    w, g = view(w_base), view(g_base)
    expected = framework(w, g)
    scaled, rate = CPU_WAYS[name](w, g, True, hyper)
    assert_matches(scaled, rate, expected, dtype)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("scale_with", [gpu_scale, gpu_scale_all], ids=list(GPU_WAYS))
def test_every_variant_matches_its_framework_on_the_gpu(
    variant, scale_with, layout, dtype, monkeypatch
):
    from numba import cuda

    small_gpu_grid(monkeypatch)
    hyper, framework = variant
    w_base, g_base = bases(layout, dtype)
    view = LAYOUTS[layout][2]
    expected = framework(view(w_base), view(g_base))
    d_g_base = cuda.to_device(g_base)
    rate = scale_with(view(cuda.to_device(w_base)), view(d_g_base), hyper)
    assert_matches(view(d_g_base.copy_to_host()), rate, expected, dtype)


#: (decays, adapts) of four pairs: every combination of the two masks.
MASKS = [(True, True), (True, False), (False, True), (False, False)]


def masked_oracle(framework, w, g, decays, adapts):
    """The framework's rule with the weight decay of a pair outside the
    weight-decay mask set to 0; outside the trust-ratio mask, rate 1 and the
    gradient (with its weight decay) unscaled."""
    weight_decay = framework.keywords.get("weight_decay", 0.0) if decays else 0.0
    if not adapts:
        w64, g64 = (np.asarray(a, dtype=np.float64) for a in (w, g))
        return 1.0, g64 + weight_decay * w64
    return framework.func(w, g, **{**framework.keywords, "weight_decay": weight_decay})


def masked_pairs(dtype):
    rng = np.random.default_rng(3)
    ws = [rng.standard_normal(size).astype(dtype) for size in (5, 40, 3 * tunables.CPU_CHUNK, 7)]
    gs = [(rng.standard_normal(w.size) * 1e-2).astype(dtype) for w in ws]
    return ws, gs


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_variant_keeps_the_masks_of_scale_all(variant, dtype):
    hyper, framework = variant
    ws, gs = masked_pairs(dtype)
    expected = [
        masked_oracle(framework, w, g, *mask) for w, g, mask in zip(ws, gs, MASKS, strict=True)
    ]
    rates = np.empty(len(ws))
    lars_numba.scale_all(
        ws,
        gs,
        **hyper,
        weight_decay_mask=[decays for decays, _ in MASKS],
        trust_ratio_mask=[adapts for _, adapts in MASKS],
        rates=rates,
    )
    for g, rate, oracle_result in zip(gs, rates, expected, strict=True):
        assert_matches(g, rate, oracle_result, dtype)


def test_every_variant_keeps_the_exclusions_of_the_fused_hook(variant):
    hyper, framework = variant
    ws, gs = masked_pairs(np.float32)
    expected = [
        masked_oracle(framework, w, g, *mask) for w, g, mask in zip(ws, gs, MASKS, strict=True)
    ]
    model = chainer.Link()
    with model.init_scope():
        for index, (w, g) in enumerate(zip(ws, gs, strict=True)):
            setattr(model, f"p{index}", chainer.Parameter(w))
            getattr(model, f"p{index}").grad = g
    arguments, lr = hook_arguments(hyper)
    optimizer = chainer.optimizers.SGD(lr=lr).setup(model)
    FusedGradientLARS(
        **arguments,
        exclude_from_weight_decay=("/p2", "/p3"),
        exclude_from_adaptation=("/p1", "/p3"),
    )(optimizer)
    for index, oracle_result in enumerate(expected):
        assert_matches(getattr(model, f"p{index}").grad, None, oracle_result, np.float32)


# -- zero norms -----------------------------------------------------------------


def zero_norm_cases():
    w = np.array([3.0, 4.0])
    zero = np.zeros(2)
    g = np.array([0.6, 0.8])
    return {"w = 0": (zero, g), "g = 0": (w, zero), "both 0": (zero, zero)}


@pytest.mark.parametrize("weight_decay", [0.0, 0.5])
@pytest.mark.parametrize("case", ["w = 0", "g = 0", "both 0"])
def test_zero_norms_give_what_each_rule_states(case, weight_decay):
    """The rates of the docs' table of zero norms ("Which LARS is this?")."""
    w, g = zero_norm_cases()[case]
    w_norm, g_norm = float(np.linalg.norm(w)), float(np.linalg.norm(g))
    eps = 1e-9

    def rate(**arguments):
        return lars_numba.trust_ratio(w, g, weight_decay=weight_decay, eps=eps, **arguments)

    # Chainer's rule looks at ||w|| > threshold only: with ||g|| = 0 the rate
    # is ||w|| / (eps + weight_decay ||w||), large without weight decay.
    chainer_rate = w_norm / (eps + g_norm + weight_decay * w_norm) if w_norm > 1e-2 else 1.0
    assert rate() == pytest.approx(chainer_rate, rel=1e-15)
    assert rate(threshold=0.0, trust_coefficient=0.5) == pytest.approx(
        0.5 * w_norm / (eps + g_norm + weight_decay * w_norm) if w_norm > 0 else 1.0, rel=1e-15
    )
    # "update": a zero norm of g + weight_decay w gives 1, as optax does.
    update_norm = float(np.linalg.norm(g + weight_decay * w))
    assert rate(threshold=0.0, denominator="update") == pytest.approx(
        w_norm / (eps + update_norm) if w_norm > 0 and update_norm > 0 else 1.0, rel=1e-15
    )
    # apex and timm give 1 whenever either norm is 0; lars_numba does so
    # where ||w|| is 0 (threshold 0), and differs from them at ||g|| = 0 only.
    apex_rate, _ = apex_larc_oracle(w, g, lr=1.0, weight_decay=weight_decay, eps=eps, clip=False)
    ours = rate(threshold=0.0, trust_coefficient=0.02)
    assert (ours == pytest.approx(apex_rate, rel=1e-15)) == (w_norm == 0)


def test_a_nan_rate_stays_nan_when_clipped():
    w, g = np.array([1.0, 1.0]), np.array([0.5, np.nan])
    assert math.isnan(lars_numba.trust_ratio(w, g))
    assert math.isnan(lars_numba.trust_ratio(w, g, clip_lr=0.1))


def test_an_explicit_trust_coefficient_leaves_small_weights_at_rate_1():
    # chainer/chainer#8244: with eta folded into the learning rate the
    # parameters below the threshold train at lr * eta; with eta here at lr.
    w, g = np.full(4, 1e-3), np.full(4, 1e-2)
    assert lars_numba.trust_ratio(w, g, trust_coefficient=1e-3) == 1.0
    w = np.full(4, 1.0)
    assert lars_numba.trust_ratio(w, g, trust_coefficient=1e-3, eps=0.0) == pytest.approx(
        1e-3 * 2.0 / 0.02, rel=1e-15
    )


def test_defaults_give_the_bits_of_the_explicit_defaults():
    rng = np.random.default_rng(5)
    w, g = rng.standard_normal(1000), rng.standard_normal(1000)
    explicit = {"trust_coefficient": 1.0, "denominator": "sum", "clip_lr": None}
    plain = lars_numba.scale(w, g.copy(), weight_decay=1e-3)
    assert plain.tobytes() == lars_numba.scale(w, g.copy(), weight_decay=1e-3, **explicit).tobytes()


# -- the hooks read the learning rate at every call ------------------------------


def test_the_hooks_clip_at_the_learning_rate_of_each_call():
    w, g = np.full(4, 1.0), np.full(4, 1e-2)
    model = chainer.Link()
    with model.init_scope():
        model.p = chainer.Parameter(w.copy())
    optimizer = chainer.optimizers.SGD(lr=0.5).setup(model)
    fused = FusedGradientLARS(trust_coefficient=1e-3, eps=0.0, clip=True)
    single = GradientLARS(trust_coefficient=1e-3, eps=0.0, clip=True)
    rate = 1e-3 * 2.0 / 0.02  # 0.1
    for lr in (0.5, 0.2, 0.05):
        optimizer.lr = lr
        model.p.grad = g.copy()
        fused(optimizer)
        np.testing.assert_allclose(model.p.grad, min(rate / lr, 1.0) * g, rtol=1e-15)
        # The update rule's own learning rate, a per-parameter override.
        model.p.update_rule.hyperparam.lr = lr / 2
        model.p.grad = g.copy()
        single(model.p.update_rule, model.p)
        np.testing.assert_allclose(model.p.grad, min(2 * rate / lr, 1.0) * g, rtol=1e-15)


@pytest.mark.parametrize("lr", [0.0, -1.0, math.nan, math.inf, None])
def test_the_hooks_refuse_a_learning_rate_they_cannot_clip_at(lr):
    model = chainer.Link()
    with model.init_scope():
        model.p = chainer.Parameter(np.ones(3))
    model.p.grad = np.full(3, 0.5)
    optimizer = chainer.optimizers.SGD().setup(model)
    optimizer.lr = lr
    model.p.update_rule.hyperparam.lr = lr
    for call in (
        lambda: FusedGradientLARS(clip=True)(optimizer),
        lambda: GradientLARS(clip=True)(model.p.update_rule, model.p),
    ):
        with pytest.raises((ValueError, TypeError), match="learning rate"):
            call()
        np.testing.assert_array_equal(model.p.grad, np.full(3, 0.5))


def test_ndim_at_most_picks_biases_and_normalization_parameters():
    class Block(chainer.Chain):
        def __init__(self):
            super().__init__()
            with self.init_scope():
                self.conv = chainer.links.Convolution2D(3, 4, 3)
                self.bn = chainer.links.BatchNormalization(4)
                self.fc = chainer.links.Linear(4, 2)

    model = Block()
    chosen = sorted(path for path, param in model.namedparams() if ndim_at_most(1)(path, param))
    assert chosen == ["/bn/beta", "/bn/gamma", "/conv/b", "/fc/b"]
    assert [path for path, p in model.namedparams() if ndim_at_most(0)(path, p)] == []
    with pytest.raises(TypeError, match="n must be an int"):
        ndim_at_most(1.0)
    with pytest.raises(ValueError, match="n must be >= 0"):
        ndim_at_most(-1)


# -- bad values -------------------------------------------------------------------

BAD_VALUES = [
    ("trust_coefficient", -1.0, ValueError),
    ("trust_coefficient", math.nan, ValueError),
    ("trust_coefficient", math.inf, ValueError),
    ("trust_coefficient", "1", TypeError),
    ("trust_coefficient", True, TypeError),
    ("denominator", "norm", ValueError),
    ("denominator", None, ValueError),
    ("denominator", 1.0, ValueError),
    ("clip_lr", 0.0, ValueError),
    ("clip_lr", -0.1, ValueError),
    ("clip_lr", math.nan, ValueError),
    ("clip_lr", math.inf, ValueError),
    ("clip_lr", "0.1", TypeError),
]


def _calls(name, value):
    """Every entry point given ``name=value``, on fresh arrays."""
    w, g = np.ones(5), np.full(5, 0.5)
    yield "scale", lambda: lars_numba.scale(w, g, **{name: value}), g
    yield "trust_ratio", lambda: lars_numba.trust_ratio(w, g, **{name: value}), g
    yield "scale_all", lambda: lars_numba.scale_all([w], [g], **{name: value}), g
    if name == "clip_lr":
        return
    for hook in (GradientLARS, FusedGradientLARS):
        yield hook.__name__, lambda hook=hook: hook(**{name: value}), g


@pytest.mark.parametrize(("name", "value", "error"), BAD_VALUES)
def test_every_bad_value_is_refused_before_anything_is_written(name, value, error):
    for entry, call, g in _calls(name, value):
        with pytest.raises(error, match=name):
            call()
        np.testing.assert_array_equal(g, np.full(5, 0.5), err_msg=entry)


@pytest.mark.parametrize("clip", [1, "yes", None])
def test_the_hooks_refuse_a_clip_that_is_not_a_bool(clip):
    for hook in (GradientLARS, FusedGradientLARS):
        with pytest.raises(TypeError, match="clip must be a bool"):
            hook(clip=clip)


# -- recipes: short training runs against the framework's trajectory ------------------


def regression(seed=11):
    """A small least-squares problem: ``x @ W.T + b`` fitted to noisy targets."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((64, 8))
    y = x @ rng.standard_normal((3, 8)).T + 0.5 + 0.1 * rng.standard_normal((64, 3))
    params = {"W": rng.standard_normal((3, 8)), "b": np.zeros(3)}

    def gradients(params):
        error = 2 * (x @ params["W"].T + params["b"] - y) / y.size
        return {"W": error.T @ x, "b": error.sum(axis=0)}

    return params, gradients


STEPS = 30


def test_a_timm_larc_recipe_follows_timm_on_chainer():
    """timm's ``Lars(trust_clip=True)`` with its usual parameter groups (no weight
    decay, hence no adaptation, for parameters of one dimension) against
    ``MomentumSGD`` with :class:`FusedGradientLARS`."""
    lr, momentum, weight_decay, trust_coeff, eps = 0.05, 0.9, 1e-4, 1e-2, 1e-8
    params, gradients = regression()

    oracle = {name: value.copy() for name, value in params.items()}
    buffers = {}
    clipped = []
    for _ in range(STEPS):
        for name, grad in gradients(oracle).items():
            decay = weight_decay if oracle[name].ndim > 1 else 0.0
            rate, grad = timm_lars_oracle(
                oracle[name], grad, lr, decay, trust_coeff, eps, trust_clip=True
            )
            clipped.append(rate == 1.0 and decay != 0)
            buffers[name] = momentum * buffers[name] + grad if name in buffers else grad
            oracle[name] = oracle[name] - lr * buffers[name]
    assert any(clipped) and not all(clipped)  # the clip both acted and did not

    model = chainer.Link()
    with model.init_scope():
        for name, value in params.items():
            setattr(model, name, chainer.Parameter(value.copy()))
    optimizer = chainer.optimizers.MomentumSGD(lr=lr, momentum=momentum).setup(model)
    optimizer.add_hook(
        FusedGradientLARS(
            threshold=0.0,
            weight_decay=weight_decay,
            eps=eps,
            trust_coefficient=trust_coeff,
            clip=True,
            exclude=ndim_at_most(1),
        )
    )
    for _ in range(STEPS):
        current = {name: getattr(model, name).array for name in params}
        for name, grad in gradients(current).items():
            getattr(model, name).grad = grad
        optimizer.update()
    for name in params:
        np.testing.assert_allclose(getattr(model, name).array, oracle[name], rtol=1e-10)
    assert not np.allclose(oracle["W"], params["W"], rtol=0.1)  # it trained


def test_an_optax_lars_recipe_follows_optax_with_scale_all():
    """optax's ``lars`` (``add_decayed_weights``, ``scale_by_trust_ratio``, the
    learning rate, ``trace``) with masks that exclude the bias, against
    :func:`lars_numba.scale_all` and the same momentum."""
    lr, momentum, weight_decay, trust_coefficient = 0.5, 0.9, 1e-3, 0.02
    params, gradients = regression()
    mask = {name: value.ndim > 1 for name, value in params.items()}

    oracle = {name: value.copy() for name, value in params.items()}
    traces = {name: np.zeros_like(value) for name, value in params.items()}
    for _ in range(STEPS):
        for name, grad in gradients(oracle).items():
            if mask[name]:
                _, update = optax_lars_oracle(oracle[name], grad, weight_decay, trust_coefficient)
            else:
                update = grad
            traces[name] = momentum * traces[name] - lr * update
            oracle[name] = oracle[name] + traces[name]

    ours = {name: value.copy() for name, value in params.items()}
    velocities = {name: np.zeros_like(value) for name, value in params.items()}
    for _ in range(STEPS):
        grads = gradients(ours)
        lars_numba.scale_all(
            list(ours.values()),
            list(grads.values()),
            threshold=0.0,
            weight_decay=weight_decay,
            eps=0.0,
            trust_coefficient=trust_coefficient,
            denominator="update",
            weight_decay_mask=list(mask.values()),
            trust_ratio_mask=list(mask.values()),
        )
        for name, grad in grads.items():
            velocities[name] = momentum * velocities[name] - lr * grad
            ours[name] = ours[name] + velocities[name]
    for name in params:
        np.testing.assert_allclose(ours[name], oracle[name], rtol=1e-10)
    assert not np.allclose(oracle["W"], params["W"], rtol=0.1)


def test_an_mxnet_lars_recipe_follows_mxnet_with_momentum_step():
    """MXNet's ``LARS`` (``step``: the rate of the rescaled gradient, biases, gammas and
    betas not adapted but decayed, then ``mom = momentum * mom - lr * rate * grad``,
    ``weight += mom``) against :func:`lars_numba.momentum_step` with ``grad_scale``
    as MXNet's ``rescale_grad``: the gradients are sums over a batch of 64."""
    lr, momentum, weight_decay, eta, epsilon, batch = 0.5, 0.9, 1e-3, 0.05, 1e-8, 64
    params, gradients = regression()
    params = {"weight": params["W"], "bias": params["b"]}

    def summed_gradients(values):
        grads = gradients({"W": values["weight"], "b": values["bias"]})
        return {"weight": grads["W"] * batch, "bias": grads["b"] * batch}

    adapts = {name: not name.endswith(("gamma", "beta", "bias")) for name in params}
    oracle = {name: value.copy() for name, value in params.items()}
    moms = {name: np.zeros_like(value) for name, value in params.items()}
    oracle_rates = []
    for _ in range(STEPS):
        for name, grad in summed_gradients(oracle).items():
            if adapts[name]:
                rate, update = mxnet_lars_oracle(
                    oracle[name], grad, weight_decay, eta, epsilon, rescale_grad=1 / batch
                )
                oracle_rates.append(rate)
            else:
                update = grad / batch + weight_decay * oracle[name]
            moms[name] = momentum * moms[name] - lr * update
            oracle[name] = oracle[name] + moms[name]
    assert len(set(oracle_rates)) > 1 and all(0 < rate < 1 for rate in oracle_rates)

    ours = {name: value.copy() for name, value in params.items()}
    velocities = {name: np.zeros_like(value) for name, value in params.items()}
    for _ in range(STEPS):
        stepped = lars_numba.momentum_step(
            list(ours.values()),
            list(summed_gradients(ours).values()),
            list(velocities.values()),
            lr=lr,
            momentum=momentum,
            threshold=0.0,
            weight_decay=weight_decay,
            eps=epsilon,
            trust_coefficient=eta,
            grad_scale=1 / batch,
            trust_ratio_mask=list(adapts.values()),
        )
        assert stepped
    for name in params:
        np.testing.assert_allclose(ours[name], oracle[name], rtol=1e-10)
    assert not np.allclose(oracle["weight"], params["weight"], rtol=0.1)
