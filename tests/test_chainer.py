"""lars_numba.chainer.GradientLARS against Chainer's own hook and the float64 oracle."""

import doctest
import warnings

import numpy as np
import pytest
from conftest import assert_matches_oracle
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

chainer = pytest.importorskip("chainer")

import chainer.functions as F  # noqa: E402
import chainer.links as L  # noqa: E402
import chainerx  # noqa: E402

import lars_numba.chainer  # noqa: E402
from lars_numba.chainer import FallbackWarning, GradientLARS  # noqa: E402

ChainerLARS = chainer.optimizer_hooks.GradientLARS


def parameter(w, g):
    param = chainer.Parameter(w)
    param.grad = g
    return param


def random_pair(shape, dtype, seed=0, w_scale=1.0):
    rng = np.random.default_rng(seed)
    w = (w_scale * rng.standard_normal(shape)).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    return w, g


# -- the drop-in: constructor and attributes ----------------------------------


def test_defaults_and_attributes_are_chainers():
    ours, theirs = GradientLARS(), ChainerLARS()
    for attribute in ("name", "timing", "call_for_each_param", "threshold", "weight_decay", "eps"):
        assert getattr(ours, attribute) == getattr(theirs, attribute), attribute
    ours = GradientLARS(0.5, 0.25, 1e-3)
    assert (ours.threshold, ours.weight_decay, ours.eps) == (0.5, 0.25, 1e-3)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"weight_decay": -0.1}, ValueError),
        ({"threshold": float("nan")}, ValueError),
        ({"eps": "1e-9"}, TypeError),
    ],
)
def test_bad_hyperparameters_raise_at_construction(kwargs, error):
    with pytest.raises(error):
        GradientLARS(**kwargs)


def test_docstring_example_runs():
    results = doctest.testmod(lars_numba.chainer, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert results.attempted > 0
    assert results.failed == 0


# -- one call ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_attributes_are_read_at_every_call(dtype, oracle):
    hook = GradientLARS()
    hook.weight_decay, hook.threshold, hook.eps = 0.3, 0.5, 1e-6
    w, g = random_pair((4, 5), dtype)
    param = parameter(w, g.copy())
    hook(None, param)
    rate, expected = oracle(w, g, threshold=0.5, weight_decay=0.3, eps=1e-6)
    assert rate != 1.0
    np.testing.assert_allclose(param.grad, expected, rtol=4 * np.finfo(dtype).eps)


def test_a_bad_attribute_raises_at_the_call_and_writes_nothing():
    hook = GradientLARS()
    hook.weight_decay = -1.0
    w, g = random_pair((3,), np.float32)
    param = parameter(w, g.copy())
    with pytest.raises(ValueError, match="weight_decay"):
        hook(None, param)
    np.testing.assert_array_equal(param.grad, g)


def test_a_param_without_array_or_grad_is_left_alone():
    hook = GradientLARS(weight_decay=0.1)
    uninitialized = chainer.Parameter()
    uninitialized.cleargrad()
    hook(None, uninitialized)
    assert uninitialized.array is None
    assert uninitialized.grad is None
    w = np.ones(3, np.float32)
    no_grad = chainer.Parameter(w.copy())
    hook(None, no_grad)
    assert no_grad.grad is None
    np.testing.assert_array_equal(no_grad.array, w)


def test_an_uninitialized_param_in_a_model_is_skipped_and_the_others_updated():
    def model_and_optimizer(hook):
        rng = np.random.default_rng(1)
        link = chainer.Link()
        with link.init_scope():
            link.a = chainer.Parameter(rng.standard_normal((3, 4)).astype(np.float32))
            link.u = chainer.Parameter()  # shape unknown until a first forward pass
        link.cleargrads()
        link.a.grad = rng.standard_normal((3, 4)).astype(np.float32)
        optimizer = chainer.optimizers.SGD(lr=0.5).setup(link)
        optimizer.add_hook(hook)
        return link, optimizer

    ours, ours_optimizer = model_and_optimizer(GradientLARS(weight_decay=0.1))
    theirs, theirs_optimizer = model_and_optimizer(ChainerLARS(weight_decay=0.1))
    a = ours.a.array.copy()
    ours_optimizer.update()
    theirs_optimizer.update()
    assert ours.u.array is None
    np.testing.assert_allclose(ours.a.array, theirs.a.array, rtol=1e-6)
    assert not np.allclose(ours.a.array, a)


# -- Chainer's own scenario ----------------------------------------------------


def params_link(shapes, rng):
    link = chainer.Link()
    with link.init_scope():
        for i, shape in enumerate(shapes):
            param = chainer.Parameter(rng.uniform(-3, 3, shape).astype(np.float32))
            param.grad = rng.uniform(-3, 3, shape).astype(np.float32)
            setattr(link, f"p{i}", param)
    return link


def test_chainers_scenario_equals_the_formula(oracle):
    """Chainer's test_gradient_lars.py: zero-size params, and norms under the threshold."""
    rng = np.random.default_rng(0)
    link1 = params_link(((2, 3), (2, 0, 1), (0,)), rng)
    link2 = params_link(((5, 0, 1), (0,), (7, 3)), rng)
    for param in link2.params():
        param.array[...] *= 1e-4
    target = chainer.ChainList(link1, link2)
    threshold, weight_decay, eps = 1e-2, 0.2, 1e-9
    expected, rates = [], []
    for param in target.params():
        rate, step = oracle(param.array, param.grad, threshold, weight_decay, eps)
        rates.append(rate)
        expected.append(param.array.astype(np.float64) - step)
    # link1's (2, 3) is scaled; zero-size params and link2's small (7, 3) keep rate 1.
    assert rates[0] != 1.0
    assert rates[1:] == [1.0] * 5

    optimizer = chainer.optimizers.SGD(lr=1).setup(target)
    optimizer.add_hook(GradientLARS(threshold=threshold, weight_decay=weight_decay, eps=eps))
    optimizer.update()
    for want, param in zip(expected, target.params(), strict=True):
        assert param.array.shape == want.shape
        np.testing.assert_allclose(param.array, want, rtol=1e-6, atol=1e-6)


# -- training trajectories -------------------------------------------------------

STEPS = 30
BATCH = 32
IN, HIDDEN, OUT = 6, 16, 4


def mlp(dtype, seed=0):
    """A 3-layer MLP whose initial weights depend on ``seed`` alone."""
    rng = np.random.default_rng(seed)

    def linear(n_in, n_out):
        weights = rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)
        bias = 0.1 * rng.standard_normal(n_out)
        return L.Linear(
            n_in, n_out, initialW=weights.astype(dtype), initial_bias=bias.astype(dtype)
        )

    with chainer.using_config("dtype", dtype):
        return L.Classifier(
            chainer.Sequential(
                linear(IN, HIDDEN), F.relu, linear(HIDDEN, HIDDEN), F.relu, linear(HIDDEN, OUT)
            )
        )


def batches(dtype, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((STEPS, BATCH, IN)).astype(dtype)
    t = rng.integers(0, OUT, (STEPS, BATCH)).astype(np.int32)
    return x, t


OPTIMIZERS = {
    "SGD": lambda: chainer.optimizers.SGD(lr=0.1),
    "MomentumSGD": lambda: chainer.optimizers.MomentumSGD(lr=0.02, momentum=0.9),
}


def register(optimizer, hook, how):
    if how == "optimizer.add_hook":
        optimizer.add_hook(hook)
    else:
        for param in optimizer.target.params():
            param.update_rule.add_hook(hook)


def train(
    hook, optimizer_name="SGD", how="optimizer.add_hook", dtype=np.float32, fp32=False, steps=STEPS
):
    """Parameters after every step of training ``mlp`` with ``hook``, as float64 arrays."""
    model = mlp(dtype)
    optimizer = OPTIMIZERS[optimizer_name]().setup(model)
    if fp32:
        optimizer.use_fp32_update()
    if hook is not None:
        register(optimizer, hook, how)
    x, t = batches(dtype)
    history = []
    for step in range(steps):
        optimizer.update(model, x[step], t[step])
        history.append([p.array.astype(np.float64) for _, p in sorted(model.namedparams())])
    return history


def assert_trajectories_close(ours, theirs, rtol, atol):
    for step, (mine, reference) in enumerate(zip(ours, theirs, strict=True)):
        for a, b in zip(mine, reference, strict=True):
            np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=f"step {step}")


@pytest.mark.parametrize("how", ["optimizer.add_hook", "update_rule.add_hook"])
@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
def test_training_follows_chainers_trajectory(optimizer_name, how):
    ours = train(GradientLARS(weight_decay=1e-3), optimizer_name, how)
    theirs = train(ChainerLARS(weight_decay=1e-3), optimizer_name, how)
    assert_trajectories_close(ours, theirs, rtol=1e-5, atol=1e-6)
    # The hook changes the trajectory by far more than the tolerance.
    plain = train(None, optimizer_name)
    assert max(np.abs(a - b).max() for a, b in zip(ours[-1], plain[-1], strict=True)) > 1e-2


def test_float16_training_with_fp32_update_follows_chainer():
    # A float16 forward pass turns a one-ulp difference in the weights into a
    # different gradient, so float16 trajectories part after some ten steps
    # whatever the hook; over the first steps they agree to a few float16 ulps
    # of the largest weights, two orders of magnitude below the hook's effect.
    ours = train(GradientLARS(weight_decay=1e-3), dtype=np.float16, fp32=True, steps=6)
    theirs = train(ChainerLARS(weight_decay=1e-3), dtype=np.float16, fp32=True, steps=6)
    assert_trajectories_close(ours, theirs, rtol=2.0**-9, atol=1e-3)
    plain = train(None, dtype=np.float16, fp32=True, steps=6)
    assert max(np.abs(a - b).max() for a, b in zip(ours[-1], plain[-1], strict=True)) > 1e-2


def test_the_hook_sees_the_float32_master_copy_under_fp32_update():
    seen = []

    class Spy(GradientLARS):
        def __call__(self, rule, param):
            seen.append(param.dtype)
            super().__call__(rule, param)

    model = mlp(np.float16)
    optimizer = chainer.optimizers.SGD(lr=0.1).setup(model)
    optimizer.use_fp32_update()
    register(optimizer, Spy(), "update_rule.add_hook")
    x, t = batches(np.float16)
    optimizer.update(model, x[0], t[0])
    assert seen == [np.float32] * len(list(model.params()))


# -- float16 -----------------------------------------------------------------------


def test_float16_matches_the_oracle_and_chainer(oracle):
    w, g = random_pair((40, 30), np.float16, seed=3)
    ours = parameter(w, g.copy())
    GradientLARS(weight_decay=0.01)(None, ours)
    _, expected = oracle(w, g, weight_decay=0.01)
    # Rounded once from float64: within half a float16 ulp of the oracle.
    np.testing.assert_allclose(ours.grad, expected, rtol=2.0**-11, atol=2.0**-25)
    theirs = parameter(w, g.copy())
    ChainerLARS(weight_decay=0.01)(None, theirs)
    np.testing.assert_allclose(ours.grad, theirs.grad, rtol=1e-2, atol=1e-4)


def test_large_float16_stays_finite_where_chainer_overflows(oracle):
    # ||w||^2 = 1000 * 300^2 = 9e7: past float16's 65504.
    w = np.full(1000, 300.0, dtype=np.float16)
    g = np.linspace(-2, 2, 1000).astype(np.float16)
    theirs = parameter(w, g.copy())
    with np.errstate(over="ignore", invalid="ignore"):
        ChainerLARS(weight_decay=1e-2)(None, theirs)
    assert not np.isfinite(theirs.grad).all()

    ours = parameter(w, g.copy())
    GradientLARS(weight_decay=1e-2)(None, ours)
    rate, expected = oracle(w, g, weight_decay=1e-2)
    assert np.isfinite(expected.astype(np.float16)).all()
    assert rate != 1.0
    np.testing.assert_allclose(ours.grad, expected, rtol=2.0**-11, atol=2.0**-25)


# -- arrays the kernels do not take ------------------------------------------------


def masked(array):
    """A NumPy array of a subclass that the kernels refuse, unmasked."""
    return np.ma.MaskedArray(array.copy())


@pytest.mark.parametrize("which", ["both", "grad"])
def test_other_arrays_fall_back_to_the_rule_in_their_arithmetic_with_one_warning(which, oracle):
    hook = GradientLARS(weight_decay=0.1)
    results = []
    with pytest.warns(FallbackWarning, match="MaskedArray gradient") as record:
        for seed in (0, 1):
            w, g = random_pair((6, 7), np.float32, seed=seed)
            param = parameter(masked(w) if which == "both" else w.copy(), masked(g))
            hook(None, param)
            reference = parameter(w.copy(), g.copy())
            ChainerLARS(weight_decay=0.1)(None, reference)
            results.append((np.asarray(param.grad), reference.grad, w, g))
    assert len(record) == 1
    for ours, theirs, w, g in results:
        # The fallback computes the rule in float64 as the kernels do: the
        # oracle's result, and Chainer's to its float32 rounding.
        assert_matches_oracle(ours, oracle(w, g, weight_decay=0.1)[1], np.float32)
        np.testing.assert_allclose(ours, theirs, rtol=1e-6)
        assert not np.allclose(ours, g)


def test_the_fallback_checks_the_hyperparameters_too():
    hook = GradientLARS()
    hook.eps = -1.0
    w, g = random_pair((3,), np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        with pytest.raises(ValueError, match="eps"):
            hook(None, parameter(masked(w), masked(g)))


@pytest.mark.skipif(not chainerx.is_available(), reason="this Chainer is built without ChainerX")
def test_chainerx_arrays_fall_back(oracle):
    w, g = random_pair((5, 4), np.float32)
    param = parameter(chainerx.array(w), chainerx.array(g))
    with pytest.warns(FallbackWarning):
        GradientLARS(weight_decay=0.1)(None, param)
    _, expected = oracle(w, g, weight_decay=0.1)
    np.testing.assert_allclose(chainerx.to_numpy(param.grad), expected, rtol=1e-5)


# -- many random cases against Chainer's hook --------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    dtype=st.sampled_from([np.float32, np.float64]),
    shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=12),
    w_scale=st.sampled_from([1e-4, 1e-2, 1.0, 1e3]),
    threshold=st.sampled_from([0.0, 1e-2, 1.0]),
    weight_decay=st.sampled_from([0.0, 1e-4, 0.1, 2.0]),
    eps=st.sampled_from([0.0, 1e-9, 1e-3]),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_cases_match_chainers_hook(
    dtype, shape, w_scale, threshold, weight_decay, eps, seed
):
    w, g = random_pair(shape, dtype, seed, w_scale)
    w_norm = np.linalg.norm(w.astype(np.float64))
    # At the threshold itself the two hooks' rounding may pick different branches.
    assume(abs(w_norm - threshold) > 1e-4 * max(threshold, 1e-30))
    # Both would divide 0 by 0; that NaN is the oracle tests' business.
    assume(w_norm > 0 or threshold > 0 or eps > 0 or np.any(g))
    hyper = {"threshold": threshold, "weight_decay": weight_decay, "eps": eps}
    ours = parameter(w, g.copy())
    GradientLARS(**hyper)(None, ours)
    theirs = parameter(w, g.copy())
    with np.errstate(divide="ignore", invalid="ignore"):  # Chainer's unused 0 / 0
        ChainerLARS(**hyper)(None, theirs)
    # Chainer rounds the norms and the update to the dtype at every operation.
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(
        ours.grad, theirs.grad, rtol=rtol, atol=rtol * np.abs(theirs.grad).max(initial=0)
    )


# -- the demo ------------------------------------------------------------------------


def test_demo_trains_with_lars_where_plain_sgd_diverges(capsys):
    pytest.importorskip("sklearn")
    from lars_numba import demo

    demo.main(["--epochs", "12", "--hidden", "64"])
    out = capsys.readouterr().out
    table = out.split("test accuracy")[1].split("\n\n")[0].splitlines()[1:]
    accuracy = {
        title: float(value.rstrip("%")) / 100
        for value, _, _, title in (line.split(maxsplit=3) for line in table)
    }
    plain, ours, theirs, optimizer = accuracy.values()
    assert plain < 0.5
    assert ours > 0.85
    assert abs(ours - theirs) < 0.05
    assert abs(optimizer - ours) < 0.05
    assert "time inside the LARS hook" in out
