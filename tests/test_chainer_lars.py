"""lars_numba.chainer.LARS, the optimizer, against a float64 oracle and Chainer's MomentumSGD.

Most tests take one ``update()`` at a time and compare every parameter and its
velocity with :func:`oracle_step` run from the state the optimizer had just
before (lockstep), so that a difference is caught at the step that makes it
and rounding does not accumulate into the tolerance.
"""

import copy
import fnmatch
import math
import warnings
from typing import NamedTuple

import numpy as np
import pytest

chainer = pytest.importorskip("chainer")

import chainer.links as L  # noqa: E402
from conftest import momentum_oracle  # noqa: E402
from test_chainer import BATCH, IN, batches, mlp  # noqa: E402

from lars_numba.chainer import LARS, GradientLARS, ndim_at_most  # noqa: E402

ChainerLARS = chainer.optimizer_hooks.GradientLARS


# -- the oracle ----------------------------------------------------------------


class Step(NamedTuple):
    rate: float
    w: np.ndarray  # float64
    v: np.ndarray  # float64
    clipped: bool  # clip=True and the clip bound: rate = unclipped rate / lr < 1


def oracle_step(w, g, v, *, lr, momentum, clip=False, loss_scale=None, **rule):
    """One LARS momentum step in float64 (Chainer's MomentumSGD convention), by the
    oracle of conftest.py, with whether the clip bound."""
    grad_scale = 1.0 if loss_scale is None else 1.0 / loss_scale
    rate, v_new, w_new, _, _ = momentum_oracle(
        w, g, v, lr=lr, momentum=momentum, clip=clip, grad_scale=grad_scale, **rule
    )
    # min(rate / lr, 1) < 1 only where the clip bound.
    return Step(rate, w_new, v_new, clip and lr > 0 and rate < 1)


def assert_rounded_from(result, expected, dtype, ulps=4, err_msg="", atol_eps=None):
    """``result`` is a ``dtype`` array within a few ulps of the float64 ``expected``.

    The absolute part covers float64 parameters, where the sums' order differs
    from the oracle's and ``momentum * v - lr * step`` may cancel; ``atol_eps``
    (in ``dtype``'s eps times the largest element) widens it where an input may
    have been rounded to ``dtype`` first.
    """
    result = np.asarray(result)
    assert result.dtype == dtype, err_msg
    expected = np.asarray(expected, dtype=np.float64)
    scale = float(np.abs(expected).max(initial=0.0))
    np.testing.assert_allclose(
        result.astype(np.float64),
        expected,
        rtol=ulps * float(np.finfo(dtype).eps),
        atol=(
            16 * float(np.finfo(np.float64).eps)
            if atol_eps is None
            else atol_eps * float(np.finfo(dtype).eps)
        )
        * scale,
        err_msg=err_msg,
    )


class Before(NamedTuple):
    w: np.ndarray  # the weights the step starts from: the float32 master under fp32 update
    g: np.ndarray
    v: np.ndarray


def weights_of(param, fp32=False):
    master = getattr(param.update_rule, "_fp32_param", None)
    if master is not None and master.array is not None:
        return master.array
    if fp32 and param.dtype == np.float16:
        return param.array.astype(np.float32)
    return param.array


def velocity_of(param, fp32=False):
    state = param.update_rule.state
    if state and state.get("v") is not None:
        return state["v"]
    return np.zeros_like(weights_of(param, fp32))  # Chainer creates the state at the first update


def snapshot(model, fp32=False):
    """Every parameter's weights, gradient and velocity, copied, by path."""
    return {
        path: Before(
            weights_of(param, fp32).copy(),
            None if param.grad is None else param.grad.copy(),
            velocity_of(param, fp32).copy(),
        )
        for path, param in model.namedparams()
    }


def check_step(model, before, hyper_of, *, fp32=False, ulps=4, atol_eps=None):
    """Check every parameter of ``model`` against :func:`oracle_step` from ``before``.

    ``hyper_of(path, param)`` gives the oracle's keyword arguments for a
    parameter, ``None`` for one the step must leave alone. A gradient that was
    ``None`` is a zero gradient. Returns the oracle's steps by path.
    """
    steps = {}
    for path, param in model.namedparams():
        kwargs = hyper_of(path, param)
        was = before[path]
        if kwargs is None:
            np.testing.assert_array_equal(param.array, was.w, err_msg=path)
            continue
        g = np.zeros_like(was.w) if was.g is None else was.g
        step = steps[path] = oracle_step(was.w, g, was.v, **kwargs)
        dtype = was.w.dtype
        v = param.update_rule.state["v"]
        # A float16 parameter's velocity may be kept in float32 (MomentumSGD's is float16).
        v_dtype = v.dtype if dtype == np.float16 and v.dtype == np.float32 else dtype
        for name, got, want, want_dtype in (
            ("w", weights_of(param), step.w, dtype),
            ("v", v, step.v, v_dtype),
        ):
            assert_rounded_from(got, want, want_dtype, ulps, f"{path}: {name}", atol_eps)
        if fp32 and param.dtype == np.float16:
            np.testing.assert_array_equal(
                param.array, weights_of(param).astype(np.float16), err_msg=path
            )
    return steps


# -- models ----------------------------------------------------------------------


def awkward_model(seed=0):
    """A Linear layer and a link of awkward params: 0-d, 3-d, zero-size, under the
    threshold; float32 and float64."""
    rng = np.random.default_rng(seed)
    model = chainer.Chain()
    with model.init_scope():
        model.dense = L.Linear(
            5,
            4,
            initialW=rng.standard_normal((4, 5)).astype(np.float32),
            initial_bias=(0.5 * rng.standard_normal(4)).astype(np.float32),
        )
        model.odd = chainer.Link()
    with model.odd.init_scope():
        model.odd.scalar = chainer.Parameter(np.array(1.5, np.float32))
        model.odd.cube = chainer.Parameter(rng.standard_normal((2, 3, 4)))
        model.odd.empty = chainer.Parameter(np.zeros((0, 3), np.float32))
        model.odd.tiny = chainer.Parameter(1e-4 * rng.standard_normal(6))
        model.odd.gamma = chainer.Parameter((1 + 0.1 * rng.standard_normal(3)).astype(np.float32))
    return model


#: How large each parameter's random gradients are: the Linear weights' large
#: enough that their rate, about 0.05, is clipped at lr = 0.1 and not at 0.02;
#: /odd/tiny's small enough that its norm stays under the threshold.
GRAD_SCALE = {"/dense/W": 20.0, "/odd/scalar": 0.1, "/odd/tiny": 1e-3}


def set_grads(model, rng):
    for path, param in model.namedparams():
        scale = GRAD_SCALE.get(path, 1.0)
        param.grad = np.asarray(scale * rng.standard_normal(param.shape), dtype=param.dtype)


def hyper_for(kwargs, no_decay=(), no_adaptation=()):
    """``hyper_of`` for :func:`check_step`: the optimizer's rule, the exclusions by path."""
    rule = {
        key: value
        for key, value in kwargs.items()
        if key in ("threshold", "weight_decay", "eps", "trust_coefficient", "denominator", "clip")
    }
    lr, momentum = kwargs.get("lr", 0.1), kwargs.get("momentum", 0.9)

    def hyper_of(path, param):
        return dict(
            rule,
            lr=param.update_rule.hyperparam.lr if lr is None else lr,
            momentum=momentum,
            decays=path not in no_decay,
            adapts=path not in no_adaptation,
        )

    return hyper_of


ALL_PATHS = ["/dense/W", "/dense/b", "/odd/scalar", "/odd/cube", "/odd/empty", "/odd/tiny"]
AT_MOST_1D = ["/dense/b", "/odd/scalar", "/odd/tiny", "/odd/gamma"]

#: (the optimizer's keyword arguments, the paths without weight decay, without adaptation)
CASES = {
    "plain": ({}, (), ()),
    "weight decay": ({"weight_decay": 0.05}, (), ()),
    "update denominator": ({"weight_decay": 0.05, "denominator": "update"}, (), ()),
    "clip": ({"weight_decay": 0.01, "clip": True}, (), ()),
    "trust coefficient": (
        {"trust_coefficient": 0.02, "weight_decay": 0.01, "threshold": 0.5, "eps": 1e-3},
        (),
        (),
    ),
    "patterns": (
        {
            "weight_decay": 0.05,
            "exclude": "*/b",
            "exclude_from_weight_decay": ["/odd/gamma", "/odd/scalar"],
            "exclude_from_adaptation": "/odd/c*",
        },
        ("/dense/b", "/odd/gamma", "/odd/scalar"),
        ("/dense/b", "/odd/cube"),
    ),
    "ndim_at_most(1)": (
        {"weight_decay": 0.05, "exclude": ndim_at_most(1)},
        AT_MOST_1D,
        AT_MOST_1D,
    ),
    "ndim_at_most(1) from adaptation, update, clip": (
        {
            "weight_decay": 0.05,
            "exclude_from_adaptation": ndim_at_most(1),
            "denominator": "update",
            "clip": True,
            "momentum": 0.5,
        },
        (),
        AT_MOST_1D,
    ),
}


# -- 1. the oracle, step by step ----------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_steps_match_the_oracle(case):
    kwargs, no_decay, no_adaptation = CASES[case]
    model = awkward_model()
    opt = LARS(**kwargs).setup(model)
    hyper_of = hyper_for(kwargs, no_decay, no_adaptation)
    rng = np.random.default_rng(1)
    rates = {}
    for _ in range(4):
        set_grads(model, rng)
        before = snapshot(model)
        opt.update()
        for path, step in check_step(model, before, hyper_of).items():
            rates.setdefault(path, []).append(step)
    # The case exercises what it names: adapted and unadapted params, clipping.
    assert all(step.rate == 1.0 for step in rates["/odd/tiny"])
    assert any(step.rate != 1.0 for path in ALL_PATHS for step in rates[path])
    if kwargs.get("clip"):
        assert any(step.clipped for step in rates["/dense/W"])
        assert not all(step.clipped for path in rates for step in rates[path])
    for path in no_adaptation:
        assert all(step.rate == 1.0 for step in rates[path])


def test_a_free_run_stays_near_the_float64_trajectory():
    """Not only one step from the optimizer's state: the oracle's own trajectory."""
    kwargs = {"lr": 0.05, "weight_decay": 0.05, "clip": True}
    model = awkward_model()
    opt = LARS(**kwargs).setup(model)
    hyper_of = hyper_for(kwargs)
    state = {
        path: (param.array.astype(np.float64), np.zeros(param.shape))
        for path, param in model.namedparams()
    }
    rng = np.random.default_rng(2)
    steps = 6
    for _ in range(steps):
        set_grads(model, rng)
        for path, param in model.namedparams():
            w, v = state[path]
            step = oracle_step(w, param.grad, v, **hyper_of(path, param))
            state[path] = (step.w, step.v)
        opt.update()
    for path, param in model.namedparams():
        w, v = state[path]
        assert_rounded_from(param.array, w, param.dtype, ulps=4 * steps, err_msg=path)
        assert_rounded_from(
            param.update_rule.state["v"], v, param.dtype, ulps=8 * steps, err_msg=path
        )


# -- 2. MomentumSGD with the hooks ----------------------------------------------------

TRAJECTORY_STEPS = 8
MLP_BIASES = ("/predictor/0/b", "/predictor/1/b", "/predictor/2/b")


def trajectory(optimizer, dtype=np.float32, steps=TRAJECTORY_STEPS, seed=0):
    """Parameters and velocities after every step of training ``mlp`` with ``optimizer``."""
    return trajectory_of(mlp(dtype, seed), optimizer, dtype, steps)


def trajectory_of(model, optimizer, dtype=np.float32, steps=TRAJECTORY_STEPS):
    optimizer = optimizer.setup(model)
    x, t = batches(dtype)
    history = []
    for step in range(steps):
        optimizer.update(model, x[step], t[step])
        history.append(
            [
                (p.array.astype(np.float64), p.update_rule.state["v"].astype(np.float64))
                for _, p in sorted(model.namedparams())
            ]
        )
    return history


def momentum_sgd_with(hook, lr, momentum):
    optimizer = chainer.optimizers.MomentumSGD(lr=lr, momentum=momentum)

    class Setup:  # add the hook once the optimizer is set up
        def setup(self, model):
            optimizer.setup(model)
            optimizer.add_hook(hook)
            return optimizer

    return Setup()


def assert_histories_close(ours, theirs, rtol, atol):
    for step, (mine, reference) in enumerate(zip(ours, theirs, strict=True)):
        for (w, v), (w_ref, v_ref) in zip(mine, reference, strict=True):
            np.testing.assert_allclose(w, w_ref, rtol=rtol, atol=atol, err_msg=f"step {step}: w")
            np.testing.assert_allclose(v, v_ref, rtol=rtol, atol=atol, err_msg=f"step {step}: v")


HOOK_CASES = [
    {"weight_decay": 1e-3},
    {"weight_decay": 1e-2, "trust_coefficient": 0.001, "denominator": "update", "clip": True},
]


@pytest.mark.parametrize("rule", HOOK_CASES, ids=["sum", "update+clip"])
def test_momentum_sgd_with_our_hook_follows_the_same_trajectory(rule):
    lr, momentum = 0.02, 0.9
    ours = trajectory(LARS(lr=lr, momentum=momentum, **rule))
    theirs = trajectory(momentum_sgd_with(GradientLARS(**rule), lr, momentum))
    # MomentumSGD rounds the scaled gradient, lr * g, momentum * v and their
    # difference to float32 where LARS rounds v and w once each.
    assert_histories_close(ours, theirs, rtol=1e-6, atol=1e-7)
    plain = trajectory(chainer.optimizers.MomentumSGD(lr=lr, momentum=momentum))
    assert max(np.abs(a[0] - b[0]).max() for a, b in zip(ours[-1], plain[-1], strict=True)) > 1e-3


def test_momentum_sgd_with_chainers_hook_stays_close():
    lr, momentum = 0.02, 0.9
    ours = trajectory(LARS(lr=lr, momentum=momentum, weight_decay=1e-3))
    theirs = trajectory(momentum_sgd_with(ChainerLARS(weight_decay=1e-3), lr, momentum))
    assert_histories_close(ours, theirs, rtol=1e-5, atol=1e-6)


# -- 3. the GradientMethod machinery ----------------------------------------------------


def test_defaults_attributes_and_setup():
    opt = LARS()
    assert isinstance(opt, chainer.optimizer.GradientMethod)
    expected = {
        "lr": 0.1,
        "momentum": 0.9,
        "threshold": 1e-2,
        "weight_decay": 0.0,
        "eps": 1e-9,
        "trust_coefficient": 1.0,
        "denominator": "sum",
        "clip": False,
    }
    for name, value in expected.items():
        assert getattr(opt, name) == value, name
    opt = LARS(0.5, 0.25, 0.5, 1e-3, 1e-6, 0.02, "update", True)
    assert (opt.lr, opt.momentum, opt.threshold, opt.weight_decay, opt.eps) == (
        0.5,
        0.25,
        0.5,
        1e-3,
        1e-6,
    )
    assert (opt.trust_coefficient, opt.denominator, opt.clip) == (0.02, "update", True)
    model = awkward_model()
    assert opt.setup(model) is opt
    assert opt.target is model
    for param in model.params():
        assert param.update_rule.hyperparam.lr == 0.5
    opt.lr = 0.125  # the update rules' hyperparameters inherit the optimizer's
    assert all(param.update_rule.hyperparam.lr == 0.125 for param in model.params())


def test_update_with_a_loss_function_computes_the_gradients_itself():
    kwargs = {"lr": 0.05, "weight_decay": 1e-2}
    model = mlp(np.float32)
    opt = LARS(**kwargs).setup(model)
    x, t = batches(np.float32)
    hyper_of = hyper_for(kwargs)
    rng = np.random.default_rng(3)
    for step in range(3):
        reference = copy.deepcopy(model)
        reference.cleargrads()
        reference(x[step], t[step]).backward()
        expected_grads = {path: p.grad.copy() for path, p in reference.namedparams()}
        for param in model.params():  # stale gradients, which update(lossfun) must clear
            param.grad = rng.standard_normal(param.shape).astype(param.dtype)
        before = snapshot(model)
        for path, was in before.items():
            before[path] = was._replace(g=expected_grads[path])
        opt.update(model, x[step], t[step])
        check_step(model, before, hyper_of)
        for path, param in model.namedparams():
            np.testing.assert_array_equal(param.grad, expected_grads[path], err_msg=path)
    assert opt.t == 3


class GradientSpy:
    """A hook that copies every gradient when the optimizer calls it."""

    call_for_each_param = False

    def __init__(self, name, timing):
        self.name, self.timing = name, timing
        self.seen = []

    def __call__(self, optimizer):
        self.seen.append(
            {
                path: (p.array.copy(), None if p.grad is None else p.grad.copy())
                for path, p in optimizer.target.namedparams()
            }
        )


def test_other_optimizer_hooks_still_run_before_and_after():
    kwargs = {"weight_decay": 0.02, "clip": True}
    model = awkward_model()
    opt = LARS(**kwargs).setup(model)
    opt.add_hook(chainer.optimizer_hooks.WeightDecay(0.1))
    opt.add_hook(chainer.optimizer_hooks.GradientClipping(5.0))
    last_pre = GradientSpy("last_pre", "pre")  # the gradients the step must take
    opt.add_hook(last_pre)
    post = GradientSpy("post", "post")
    opt.add_hook(post)
    hyper_of = hyper_for(kwargs)
    rng = np.random.default_rng(4)
    for step in range(3):
        set_grads(model, rng)
        before = snapshot(model)
        opt.update()
        assert len(last_pre.seen) == len(post.seen) == step + 1
        # WeightDecay added 0.1 w, then GradientClipping scaled all to norm 5.
        decayed = {path: was.g.astype(np.float64) + 0.1 * was.w for path, was in before.items()}
        norm = math.sqrt(sum(float(np.sum(g * g)) for g in decayed.values()))
        assert norm > 5.0
        for path, (_, g) in last_pre.seen[-1].items():
            np.testing.assert_allclose(g, decayed[path] * 5.0 / norm, rtol=1e-5, err_msg=path)
            before[path] = before[path]._replace(g=g)
        check_step(model, before, hyper_of)
        for path, param in model.namedparams():  # the post hook saw the updated weights
            np.testing.assert_array_equal(post.seen[-1][path][0], param.array, err_msg=path)


@pytest.mark.parametrize("clip", [False, True])
def test_a_parameters_own_hyperparameters_apply_to_it_alone(clip):
    kwargs = {"clip": clip, "lr": None}  # lr: each rule's own
    model = awkward_model()
    opt = LARS(lr=0.1, weight_decay=0.01, clip=clip).setup(model)
    model.dense.W.update_rule.hyperparam.lr = 0.3
    model.odd.cube.update_rule.hyperparam.lr = 0.01
    model.odd.gamma.update_rule.hyperparam.weight_decay = 0.5
    hyper = hyper_for(kwargs)

    def hyper_of(path, param):
        return dict(hyper(path, param), weight_decay=param.update_rule.hyperparam.weight_decay)

    rng = np.random.default_rng(5)
    lrs = {}
    for _ in range(3):
        set_grads(model, rng)
        before = snapshot(model)
        opt.update()
        check_step(model, before, hyper_of)
        lrs = {path: p.update_rule.hyperparam.lr for path, p in model.namedparams()}
    assert lrs == {
        "/dense/W": 0.3,
        "/dense/b": 0.1,
        "/odd/scalar": 0.1,
        "/odd/cube": 0.01,
        "/odd/empty": 0.1,
        "/odd/tiny": 0.1,
        "/odd/gamma": 0.1,
    }


def test_a_disabled_rule_leaves_its_parameter_untouched():
    kwargs = {"weight_decay": 0.05}
    model = awkward_model()
    opt = LARS(**kwargs).setup(model)
    model.odd.cube.update_rule.enabled = False
    cube = model.odd.cube.array.copy()
    hyper = hyper_for(kwargs)
    rng = np.random.default_rng(6)
    for _ in range(3):
        set_grads(model, rng)
        before = snapshot(model)
        opt.update()
        check_step(model, before, lambda path, p: None if path == "/odd/cube" else hyper(path, p))
    np.testing.assert_array_equal(model.odd.cube.array, cube)
    state = model.odd.cube.update_rule.state
    assert not state or not np.any(state.get("v", 0))


def test_a_cleared_gradient_is_a_zero_gradient():
    kwargs = {"weight_decay": 0.05, "clip": True}
    model = awkward_model()
    opt = LARS(**kwargs).setup(model)
    hyper_of = hyper_for(kwargs)
    rng = np.random.default_rng(7)
    for step in range(3):
        set_grads(model, rng)
        if step > 0:  # after a first step, so that the velocities are not zero
            model.odd.gamma.cleargrad()
            model.dense.W.cleargrad()
        before = snapshot(model)
        opt.update()
        check_step(model, before, hyper_of)
    # As GradientMethod.reallocate_cleared_grads leaves them.
    np.testing.assert_array_equal(model.dense.W.grad, np.zeros((4, 5), np.float32))
    np.testing.assert_array_equal(model.odd.gamma.grad, np.zeros(3, np.float32))


def test_update_rule_hooks_are_called_for_their_parameter_and_respected():
    kwargs = {"weight_decay": 0.05}
    model = awkward_model()
    opt = LARS(**kwargs).setup(model)
    calls = []

    def double(rule, param):
        calls.append(("pre", rule, param.array.copy()))
        param.grad *= 2

    def after(rule, param):
        calls.append(("post", rule, param.array.copy()))

    rule = model.odd.cube.update_rule
    rule.add_hook(double, name="double", timing="pre")
    rule.add_hook(after, name="after", timing="post")
    hyper_of = hyper_for(kwargs)
    rng = np.random.default_rng(8)
    for step in range(3):
        set_grads(model, rng)
        before = snapshot(model)
        before["/odd/cube"] = before["/odd/cube"]._replace(g=2 * before["/odd/cube"].g)
        opt.update()
        check_step(model, before, hyper_of)
        assert [(when, hook_rule) for when, hook_rule, _ in calls[2 * step :]] == [
            ("pre", rule),
            ("post", rule),
        ]
        np.testing.assert_array_equal(calls[-2][2], before["/odd/cube"].w)
        np.testing.assert_array_equal(calls[-1][2], model.odd.cube.array)


# -- 4. changing hyperparameters between updates --------------------------------------


@pytest.mark.parametrize("clip", [False, True])
def test_hyperparameters_changed_between_updates_apply_at_the_next(clip):
    model = awkward_model()
    opt = LARS(lr=0.1, weight_decay=0.01, clip=clip).setup(model)
    schedule = [
        {"lr": 0.1},
        {"lr": 0.3},
        {"lr": 0.02},
        {"lr": 0.1, "momentum": 0.5, "weight_decay": 0.2},
    ]
    rng = np.random.default_rng(9)
    clipped = []
    for change in schedule:
        for name, value in change.items():
            setattr(opt, name, value)
        set_grads(model, rng)
        before = snapshot(model)
        opt.update()
        kwargs = {"lr": opt.lr, "momentum": opt.momentum, "weight_decay": opt.weight_decay}
        steps = check_step(model, before, hyper_for({**kwargs, "clip": clip}))
        clipped.append(steps["/dense/W"].clipped)
    if clip:  # the clip at lr 0.3 and not at lr 0.02
        assert clipped[1] and not clipped[2]


def test_a_zero_learning_rate_with_clip_is_a_step_of_the_momentum_alone():
    """A warmup from lr = 0 (LinearShift('lr', (0, ...), ...)) with LARC's clipping:
    rate / lr is infinite and clipped to 1, and the step adds nothing."""
    model = awkward_model()
    opt = LARS(lr=0.0, weight_decay=0.01, clip=True).setup(model)
    rng = np.random.default_rng(15)
    for lr in (0.0, 0.1, 0.0):
        opt.lr = lr
        set_grads(model, rng)
        before = snapshot(model)
        opt.update()
        check_step(model, before, hyper_for({"lr": lr, "weight_decay": 0.01, "clip": True}))


def test_a_bad_value_set_later_raises_at_the_update_and_writes_nothing():
    model = awkward_model()
    opt = LARS().setup(model)
    set_grads(model, np.random.default_rng(16))
    before = snapshot(model)
    opt.lr = -0.1
    with pytest.raises(ValueError, match=r"\blr\b"):
        opt.update()
    check_step(model, before, lambda path, param: None)


def test_setup_on_another_model_decides_the_exclusions_afresh():
    """Chainer's setup discards the optimizer's states; a predicate is asked again
    about the new model's parameters, whatever their paths."""
    opt = LARS(weight_decay=0.5, exclude=ndim_at_most(1))
    for shape in ((3,), (3, 3)):
        model = chainer.Link()
        with model.init_scope():
            model.p = chainer.Parameter(np.ones(shape, np.float32))
        opt.setup(model)
        model.p.grad = np.zeros(shape, np.float32)
        before = snapshot(model)
        opt.update()
        excluded = ("/p",) if len(shape) == 1 else ()
        check_step(model, before, hyper_for({"weight_decay": 0.5}, excluded, excluded))


def test_a_lazily_initialized_model_follows_momentum_sgd_with_the_hook():
    """Linear(None, n) gets its weights at the first forward pass, inside update(lossfun)."""
    rng = np.random.default_rng(17)
    w1, w2 = rng.standard_normal((8, IN)) / 3, rng.standard_normal((4, 8)) / 3

    def lazy_model():
        return L.Classifier(
            chainer.Sequential(
                L.Linear(None, 8, initialW=w1.astype(np.float32)),
                chainer.functions.relu,
                L.Linear(None, 4, initialW=w2.astype(np.float32)),
            )
        )

    rule = {"weight_decay": 1e-3}
    ours = trajectory_of(lazy_model(), LARS(lr=0.05, **rule))
    theirs = trajectory_of(lazy_model(), momentum_sgd_with(GradientLARS(**rule), 0.05, 0.9))
    assert_histories_close(ours, theirs, rtol=1e-6, atol=1e-7)


def run_with_trainer(model, opt, steps, extension=None, out="."):
    x, t = batches(np.float32)
    dataset = chainer.datasets.TupleDataset(x[:steps].reshape(-1, IN), t[:steps].reshape(-1))
    iterator = chainer.iterators.SerialIterator(dataset, BATCH, shuffle=False)
    updater = chainer.training.updaters.StandardUpdater(iterator, opt)
    trainer = chainer.training.Trainer(updater, (steps, "iteration"), out=out)
    if extension is not None:
        trainer.extend(extension, trigger=(1, "iteration"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        trainer.run()


@pytest.mark.parametrize("clip", [False, True])
def test_exponential_shift_on_a_trainer_sets_the_rate_of_each_update(clip, tmp_path):
    steps = 5
    kwargs = {"lr": 0.2, "weight_decay": 1e-3, "clip": clip, "trust_coefficient": 0.01}
    model = mlp(np.float32)
    opt = LARS(**kwargs).setup(model)
    shift = chainer.training.extensions.ExponentialShift("lr", 0.5, optimizer=opt)
    run_with_trainer(model, opt, steps, shift, out=str(tmp_path))
    assert opt.lr == pytest.approx(0.2 * 0.5**steps)

    by_hand = mlp(np.float32)
    by_hand_opt = LARS(**kwargs).setup(by_hand)
    x, t = batches(np.float32)
    for step in range(steps):
        by_hand_opt.lr = 0.2 * 0.5**step
        by_hand_opt.update(by_hand, x[step], t[step])
    for (path, mine), (_, want) in zip(
        sorted(model.namedparams()), sorted(by_hand.namedparams()), strict=True
    ):
        np.testing.assert_array_equal(mine.array, want.array, err_msg=path)

    constant = mlp(np.float32)
    run_with_trainer(constant, LARS(**kwargs).setup(constant), steps, out=str(tmp_path))
    assert not all(
        np.allclose(a.array, b.array)
        for a, b in zip(model.params(), constant.params(), strict=True)
    )


# -- 5. serialization -----------------------------------------------------------------


def train_steps(model, opt, first, last):
    x, t = batches(model.predictor[0].W.dtype)
    for step in range(first, last):
        opt.update(model, x[step], t[step])


def state_of(model):
    return {
        path: (
            p.array.copy(),
            p.update_rule.state["v"].copy(),
            None if p.update_rule._fp32_param is None else p.update_rule._fp32_param.array.copy(),
        )
        for path, p in model.namedparams()
    }


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_a_run_resumed_from_npz_files_is_bit_identical(dtype, tmp_path):
    fp32 = dtype == np.float16
    kwargs = {"lr": 0.05, "weight_decay": 1e-3, "clip": True, "exclude": "*/b"}
    k, n = 3, 6

    def optimizer_for(model):
        opt = LARS(**kwargs).setup(model)
        if fp32:
            opt.use_fp32_update()
        return opt

    uninterrupted = mlp(dtype)
    uninterrupted_opt = optimizer_for(uninterrupted)
    train_steps(uninterrupted, uninterrupted_opt, 0, n)

    model = mlp(dtype)
    opt = optimizer_for(model)
    train_steps(model, opt, 0, k)
    if fp32:  # so that the master has to come back from the file
        assert any(
            not np.array_equal(p.update_rule._fp32_param.array, p.array.astype(np.float32))
            for p in model.params()
        )
    chainer.serializers.save_npz(tmp_path / "model.npz", model)
    chainer.serializers.save_npz(tmp_path / "optimizer.npz", opt)
    train_steps(model, opt, k, n)

    resumed = mlp(dtype, seed=7)  # other weights, which the file replaces
    chainer.serializers.load_npz(tmp_path / "model.npz", resumed)
    resumed_opt = optimizer_for(resumed)
    chainer.serializers.load_npz(tmp_path / "optimizer.npz", resumed_opt)
    assert resumed_opt.t == k
    train_steps(resumed, resumed_opt, k, n)
    assert resumed_opt.t == opt.t == n

    expected = state_of(uninterrupted)
    for got in (state_of(model), state_of(resumed)):
        for path, arrays in expected.items():
            for name, a, b in zip(("w", "v", "master"), arrays, got[path], strict=True):
                if a is None:
                    assert b is None, f"{path}: {name}"
                else:
                    np.testing.assert_array_equal(b, a, err_msg=f"{path}: {name}")


# -- 6. float16 parameters with a float32 master ----------------------------------------


def float16_model(seed=0):
    rng = np.random.default_rng(seed)
    model = chainer.Chain()
    with model.init_scope(), chainer.using_config("dtype", np.float16):
        model.dense = L.Linear(
            7,
            5,
            initialW=rng.standard_normal((5, 7)).astype(np.float16),
            initial_bias=(0.5 * rng.standard_normal(5)).astype(np.float16),
        )
        model.cube = chainer.Parameter(rng.standard_normal((2, 3, 2)).astype(np.float16))
    return model


def test_float16_params_without_fp32_update_are_rounded_once_from_the_oracle():
    kwargs = {"lr": 0.05, "weight_decay": 0.01, "clip": True}
    model = float16_model()
    opt = LARS(**kwargs).setup(model)
    rng = np.random.default_rng(12)
    for _ in range(3):
        for param in model.params():
            param.grad = (3 * rng.standard_normal(param.shape)).astype(np.float16)
        before = snapshot(model)
        opt.update()
        for param in model.params():
            assert param.update_rule._fp32_param is None
            assert param.dtype == np.float16
        check_step(model, before, hyper_for(kwargs))


@pytest.mark.parametrize("denominator", ["sum", "update"])
def test_fp32_update_keeps_a_float32_master_that_follows_the_oracle(denominator):
    kwargs = {"lr": 0.05, "weight_decay": 0.01, "denominator": denominator, "clip": True}
    model = float16_model()
    opt = LARS(**kwargs).setup(model)
    opt.use_fp32_update()
    hyper_of = hyper_for(kwargs)
    rng = np.random.default_rng(10)
    for _ in range(4):
        for param in model.params():
            param.grad = (3 * rng.standard_normal(param.shape)).astype(np.float16)
        before = snapshot(model, fp32=True)
        opt.update()
        for param in model.params():
            assert param.dtype == np.float16
            assert param.update_rule._fp32_param.array.dtype == np.float32
            assert param.update_rule.state["v"].dtype == np.float32
        # The oracle: float32 weights and velocity, float16 gradients, in float64.
        check_step(model, before, hyper_of, fp32=True)
    # The master holds what float16 cannot.
    master = model.dense.W.update_rule._fp32_param.array
    assert not np.array_equal(master, master.astype(np.float16).astype(np.float32))


def test_fp32_update_writes_the_masters_rounding_as_chainer_does():
    # The new master 1 + 2**-11 (v = lr = 2**-11 + 2**-40 rounded to float32) is
    # half-way between two float16s: its rounding is 1 (to even), which Chainer's
    # use_fp32_update writes; the float64 value 1 + 2**-11 + 2**-40 would round
    # to 1 + 2**-10, a parameter that is not its master's rounding.
    lr = 2.0**-11 + 2.0**-40
    runs = []
    chainers_sgd = chainer.optimizers.MomentumSGD(lr=lr, momentum=0.0)
    for opt in (LARS(lr=lr, momentum=0.0, exclude="*"), chainers_sgd):
        model = chainer.Chain()
        with model.init_scope():
            model.w = chainer.Parameter(np.ones(3, np.float16))
        opt.setup(model)
        opt.use_fp32_update()
        model.w.grad = np.full(3, -1.0, np.float16)
        opt.update()
        runs.append((model.w.array, model.w.update_rule._fp32_param.array))
    (w, master), (chainer_w, chainer_master) = runs
    np.testing.assert_array_equal(master, np.full(3, 1 + 2.0**-11, np.float32), strict=True)
    np.testing.assert_array_equal(w, np.ones(3, np.float16), strict=True)
    np.testing.assert_array_equal(master, chainer_master, strict=True)
    np.testing.assert_array_equal(w, chainer_w, strict=True)


# -- 7. loss scaling --------------------------------------------------------------------


def test_static_power_of_two_loss_scaling_gives_the_unscaled_run():
    # With a power-of-two scale the backward pass computes exactly 128 times
    # the gradients, and dividing by 128 gives them back: the same bits.
    kwargs = {"lr": 0.05, "weight_decay": 1e-2, "exclude_from_adaptation": "*/b"}
    x, t = batches(np.float32)
    unscaled, scaled = mlp(np.float32), mlp(np.float32)
    unscaled_opt = LARS(**kwargs).setup(unscaled)
    scaled_opt = LARS(**kwargs).setup(scaled)
    scaled_opt.loss_scaling(scale=128.0)
    spies = GradientSpy("spy", "pre"), GradientSpy("spy", "pre")
    unscaled_opt.add_hook(spies[0])
    scaled_opt.add_hook(spies[1])
    for step in range(4):
        unscaled_opt.update(unscaled, x[step], t[step])
        scaled_opt.update(scaled, x[step], t[step])
        for (path, a), (_, b) in zip(
            sorted(unscaled.namedparams()), sorted(scaled.namedparams()), strict=True
        ):
            # The optimizer's hooks see the gradients of the scaled loss.
            np.testing.assert_array_equal(
                spies[1].seen[-1][path][1], 128 * spies[0].seen[-1][path][1], err_msg=path
            )
            np.testing.assert_array_equal(b.array, a.array, err_msg=path)
            np.testing.assert_array_equal(
                b.update_rule.state["v"], a.update_rule.state["v"], err_msg=path
            )


INJECT_AT = (3, 5)  # after a first step, so that the velocities are not zero


def loss_scaled_steps(model, opt, check=None, dtype=np.float32):
    """Steps of backward with the optimizer's loss scale and ``opt.update()``, with an
    infinite gradient at the steps of ``INJECT_AT``; the loss scale after each."""
    x, t = batches(dtype)
    fp32 = dtype == np.float16
    scales = []
    for step in range(7):
        model.cleargrads()
        model(x[step], t[step]).backward(loss_scale=opt._loss_scale)
        injected = step in INJECT_AT
        if injected:
            model.predictor[2].W.grad[1, 2] = np.inf
        before, scale = snapshot(model, fp32), opt._loss_scale
        arrays = {path: p.array.copy() for path, p in model.namedparams()}
        if injected:
            with pytest.warns(UserWarning, match="Non finite number"):
                opt.update()
        else:
            opt.update()
        if check is not None:
            check(model, before, arrays, scale, injected)
        scales.append(opt._loss_scale)
    return scales


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["float32", "float16+fp32"])
def test_dynamic_loss_scaling_skips_a_non_finite_step_and_halves_the_scale(dtype):
    kwargs = {"lr": 0.05, "weight_decay": 1e-2, "exclude_from_adaptation": "*/b"}
    fp32 = dtype == np.float16
    model = mlp(dtype)
    opt = LARS(**kwargs).setup(model)
    if fp32:
        opt.use_fp32_update()
    opt.loss_scaling()
    hyper = hyper_for(kwargs, no_adaptation=MLP_BIASES)

    def check(model, before, arrays, scale, injected):
        if injected:
            for path, param in model.namedparams():
                np.testing.assert_array_equal(param.array, arrays[path], err_msg=path)
                np.testing.assert_array_equal(weights_of(param, fp32), before[path].w, err_msg=path)
                np.testing.assert_array_equal(
                    velocity_of(param, fp32), before[path].v, err_msg=path
                )
            assert opt._loss_scale == scale / 2
        else:
            # After the first halving the scale is no power of two, and the
            # gradient may be divided by it in float32, as Chainer's update
            # rules do: half an ulp of G, absolute in v where v cancels.
            check_step(
                model,
                before,
                lambda path, p: dict(hyper(path, p), loss_scale=scale),
                fp32=fp32,
                atol_eps=2,
            )
            assert np.isfinite(model.predictor[2].W.array).all()

    scales = loss_scaled_steps(model, opt, check, dtype)

    reference = mlp(dtype)
    reference_opt = chainer.optimizers.MomentumSGD(lr=0.05).setup(reference)
    if fp32:
        reference_opt.use_fp32_update()
    reference_opt.loss_scaling()
    assert loss_scaled_steps(reference, reference_opt, dtype=dtype) == scales
    assert scales[:3] == [2.0, 4.0, 8.0]


def lone_and_grouped_model():
    """``awkward_model`` under LARS with dynamic loss scaling, where /dense/W has a
    learning rate of its own and /odd/gamma an update-rule hook (two fused steps and a
    parameter that takes its update rule), and the calls of that hook."""
    model = awkward_model()
    opt = LARS(weight_decay=0.05).setup(model)
    opt.loss_scaling()
    model.dense.W.update_rule.hyperparam.lr = 0.3
    calls = []
    model.odd.gamma.update_rule.add_hook(
        lambda rule, param: calls.append(rule), name="count", timing="post"
    )
    return model, opt, calls


@pytest.mark.parametrize("where", ["/dense/W", "/odd/cube", "/odd/scalar", "/odd/gamma"])
def test_a_non_finite_gradient_anywhere_skips_every_parameter(where):
    model, opt, calls = lone_and_grouped_model()
    rng = np.random.default_rng(13)
    set_grads(model, rng)
    opt.update()  # a first step, so that the velocities are not zero
    assert len(calls) == 1
    set_grads(model, rng)
    dict(model.namedparams())[where].grad[...] = np.nan if where == "/odd/scalar" else 0
    dict(model.namedparams())[where].grad.flat[-1] = np.inf
    before = snapshot(model)
    with pytest.warns(UserWarning, match="Non finite number"):
        opt.update()
    check_step(model, before, lambda path, param: None)  # no weight changed
    for path, param in model.namedparams():
        np.testing.assert_array_equal(param.update_rule.state["v"], before[path].v, err_msg=path)
    assert opt._loss_scale == 1.0  # 2, halved
    assert len(calls) == 1  # the update rule was not run
    set_grads(model, rng)
    before = snapshot(model)
    opt.update()
    hyper = hyper_for({"weight_decay": 0.05, "lr": None})
    check_step(model, before, hyper)
    assert len(calls) == 2


def test_a_disabled_parameters_non_finite_gradient_skips_the_step_as_chainer_does():
    """Chainer's check_nan_in_grads reads every parameter's gradient, enabled or not."""
    results = {}
    for name, optimizer in (
        ("LARS", LARS()),
        ("MomentumSGD", chainer.optimizers.MomentumSGD(lr=0.1)),
    ):
        model = awkward_model()
        optimizer.setup(model)
        optimizer.loss_scaling()
        model.odd.cube.update_rule.enabled = False
        set_grads(model, np.random.default_rng(14))
        model.odd.cube.grad[0, 0, 0] = np.inf
        before = snapshot(model)
        with pytest.warns(UserWarning, match="Non finite number"):
            optimizer.update()
        changed = [
            path
            for path, param in model.namedparams()
            if not np.array_equal(param.array, before[path].w)
        ]
        results[name] = (optimizer._loss_scale, changed)
    assert results["LARS"] == results["MomentumSGD"] == (1, [])


# -- 8. reporting ------------------------------------------------------------------------


def test_report_gives_each_params_trust_ratio_under_its_path():
    rng = np.random.default_rng(11)
    model = chainer.Sequential(L.Linear(3, 4), L.Linear(4, 2))
    for param in model.params():
        param.grad = rng.standard_normal(param.shape).astype(np.float32)
    kwargs = {"weight_decay": 0.01, "exclude_from_adaptation": "/1/b"}
    hyper_of = hyper_for(kwargs, no_adaptation=("/1/b",))
    expected = {
        "lars" + path: oracle_step(
            param.array, param.grad, np.zeros(param.shape), **hyper_of(path, param)
        ).rate
        for path, param in model.namedparams()
    }
    assert expected["lars/1/b"] == 1.0
    assert expected["lars/0/W"] != 1.0
    opt = LARS(report=True, **kwargs).setup(model)
    reporter = chainer.Reporter()
    observation = {}
    with reporter.scope(observation):
        opt.update()
    assert observation.keys() == expected.keys()
    for key, rate in expected.items():
        assert float(observation[key]) == pytest.approx(rate, rel=1e-12), key

    quiet = LARS(**kwargs).setup(copy.deepcopy(model))
    observation = {}
    with reporter.scope(observation):
        quiet.update()
    assert observation == {}


def test_log_report_averages_the_trust_ratios(tmp_path):
    model = L.Classifier(L.Linear(IN, 4))
    opt = LARS(lr=0.05, report=True).setup(model)
    log = chainer.training.extensions.LogReport(trigger=(2, "iteration"))
    run_with_trainer(model, opt, 4, log, out=str(tmp_path))
    assert len(log.log) == 2
    for entry in log.log:
        assert {"lars/predictor/W", "lars/predictor/b"} <= entry.keys()
        assert math.isfinite(entry["lars/predictor/W"]) and entry["lars/predictor/W"] != 1.0


# -- 9. bad hyperparameters ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"lr": -0.1}, r"\blr\b"),
        ({"denominator": "max"}, "denominator"),
        ({"trust_coefficient": -1.0}, "trust_coefficient"),
        ({"weight_decay": -1e-3}, "weight_decay"),
    ],
)
def test_bad_hyperparameters_raise_at_construction(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LARS(**kwargs)


def test_exclusion_patterns_are_matched_against_the_paths():
    """The tests' expected exclusions are the paths' (a check of the test's own cases)."""
    model = awkward_model()
    paths = [path for path, _ in model.namedparams()]
    assert sorted(paths) == sorted([*ALL_PATHS, "/odd/gamma"])
    assert [p for p in paths if fnmatch.fnmatchcase(p, "/odd/c*")] == ["/odd/cube"]
    assert sorted(p for p, param in model.namedparams() if param.ndim <= 1) == sorted(AT_MOST_1D)
