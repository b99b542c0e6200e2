"""lars_numba.chainer.FusedGradientLARS against Chainer's per-parameter hook."""

import copy
import fnmatch
import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

chainer = pytest.importorskip("chainer")

from test_chainer import (  # noqa: E402
    OPTIMIZERS,
    assert_trajectories_close,
    masked,
    params_link,
    train,
)

import lars_numba  # noqa: E402
from lars_numba.chainer import FallbackWarning, FusedGradientLARS, GradientLARS  # noqa: E402

ChainerLARS = chainer.optimizer_hooks.GradientLARS


def test_attributes():
    hook = FusedGradientLARS(0.5, 0.25, 1e-3)
    assert (hook.name, hook.timing, hook.call_for_each_param) == (
        "FusedGradientLARS",
        "pre",
        False,
    )
    assert (hook.threshold, hook.weight_decay, hook.eps, hook.report) == (0.5, 0.25, 1e-3, False)


@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
def test_training_follows_the_per_parameter_hooks(optimizer_name):
    fused = train(FusedGradientLARS(weight_decay=1e-3), optimizer_name)
    ours = train(GradientLARS(weight_decay=1e-3), optimizer_name)
    theirs = train(ChainerLARS(weight_decay=1e-3), optimizer_name)
    assert_trajectories_close(fused, ours, rtol=1e-6, atol=1e-7)
    assert_trajectories_close(fused, theirs, rtol=1e-5, atol=1e-6)


def test_chainers_scenario_and_params_without_grads():
    rng = np.random.default_rng(0)
    link1 = params_link(((2, 3), (2, 0, 1), (0,)), rng)
    link2 = params_link(((5, 0, 1), (0,), (7, 3)), rng)
    for param in link2.params():
        param.array[...] *= 1e-4
    link2.p2.grad = None
    with link2.init_scope():
        link2.uninitialized = chainer.Parameter()
    ours = chainer.ChainList(link1, link2)
    theirs = copy.deepcopy(ours)

    hook = FusedGradientLARS(threshold=1e-2, weight_decay=0.2, eps=1e-9)
    hook(chainer.optimizers.SGD().setup(ours))
    reference = ChainerLARS(threshold=1e-2, weight_decay=0.2, eps=1e-9)
    for param in theirs.params():
        if param.array is not None and param.grad is not None:
            reference(None, param)
    for (path, mine), (_, want) in zip(
        sorted(ours.namedparams()), sorted(theirs.namedparams()), strict=True
    ):
        if want.array is None:
            assert mine.array is None, path
        elif want.grad is None:
            assert mine.grad is None, path
        else:
            np.testing.assert_allclose(mine.grad, want.grad, rtol=1e-6, err_msg=path)


# -- random models: shapes, dtypes, exclusions -----------------------------------

PATTERNS = ["*/b", "/l0/*", "*gamma", "/l1/W"]


@st.composite
def models(draw):
    """A Chain of links /l0, /l1, ... with params of random shapes and float32/float64 dtypes."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    target = chainer.Chain()
    for layer in range(draw(st.integers(1, 4))):
        link = chainer.Link()
        with link.init_scope():
            for name in draw(st.lists(st.sampled_from(["W", "b", "gamma"]), unique=True)):
                shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))
                dtype = draw(st.sampled_from([np.float32, np.float64]))
                scale = draw(st.sampled_from([1e-4, 1.0, 10.0]))
                param = chainer.Parameter((scale * rng.standard_normal(shape)).astype(dtype))
                if draw(st.booleans()) or name == "W":
                    param.grad = rng.standard_normal(shape).astype(dtype)
                else:
                    param.cleargrad()
                setattr(link, name, param)
        with target.init_scope():
            setattr(target, f"l{layer}", link)
    return target


def excluded(path, patterns):
    return any(fnmatch.fnmatchcase(path, pattern) for pattern in patterns)


@settings(max_examples=60, deadline=None)
@given(
    model=models(),
    both=st.lists(st.sampled_from(PATTERNS), max_size=2),
    decay=st.lists(st.sampled_from(PATTERNS), max_size=2),
    adaptation=st.lists(st.sampled_from(PATTERNS), max_size=2),
    weight_decay=st.sampled_from([0.0, 1e-3, 0.5]),
)
def test_random_models_with_exclusions_match_chainers_hook(
    model, both, decay, adaptation, weight_decay
):
    theirs = copy.deepcopy(model)

    hook = FusedGradientLARS(
        weight_decay=weight_decay,
        exclude=both,
        exclude_from_weight_decay=decay,
        exclude_from_adaptation=adaptation,
    )
    hook(chainer.optimizers.SGD().setup(model))

    for (path, mine), (_, want) in zip(
        sorted(model.namedparams()), sorted(theirs.namedparams()), strict=True
    ):
        if want.grad is None:
            assert mine.grad is None
            continue
        decays = not excluded(path, both + decay)
        adapts = not excluded(path, both + adaptation)
        if decays or adapts:
            ChainerLARS(
                threshold=1e-2 if adapts else math.inf,
                weight_decay=weight_decay if decays else 0.0,
            )(None, want)
        np.testing.assert_allclose(mine.grad, want.grad, rtol=1e-5, atol=1e-12, err_msg=path)


def test_a_predicate_decides_each_path_once():
    rng = np.random.default_rng(1)
    model = params_link(((3, 4), (4,), (2, 2)), rng)
    asked = []

    def biases(path, param):
        asked.append(path)
        return param.ndim == 1

    hook = FusedGradientLARS(weight_decay=0.1, exclude=biases)
    optimizer = chainer.optimizers.SGD().setup(model)
    bias_grad = model.p1.grad.copy()
    hook(optimizer)
    hook(optimizer)
    assert sorted(asked) == ["/p0", "/p1", "/p2"]
    np.testing.assert_array_equal(model.p1.grad, bias_grad)


def test_bad_exclusions_and_registration_per_parameter_raise():
    with pytest.raises(TypeError, match=r"exclude_from_adaptation must be a pattern.*got \[1\]"):
        FusedGradientLARS(exclude_from_adaptation=[1])
    with pytest.raises(ValueError, match="weight_decay must be finite"):
        FusedGradientLARS(weight_decay=-1.0)
    model = params_link(((3,),), np.random.default_rng(0))
    optimizer = chainer.optimizers.SGD().setup(model)
    model.p0.update_rule.add_hook(FusedGradientLARS())
    with pytest.raises(TypeError, match=r"register it with optimizer\.add_hook"):
        optimizer.update()


# -- many params, mixed dtypes, fallback ---------------------------------------------


def test_a_thousand_tiny_params_of_mixed_dtypes_match_chainers_hook():
    rng = np.random.default_rng(2)
    model = chainer.Link()
    with model.init_scope():
        for i in range(1200):
            dtype = (np.float32, np.float64)[i % 2]
            param = chainer.Parameter(rng.standard_normal(rng.integers(0, 9)).astype(dtype))
            param.grad = rng.standard_normal(param.shape).astype(dtype)
            setattr(model, f"p{i}", param)
    theirs = copy.deepcopy(model)
    FusedGradientLARS(weight_decay=1e-3)(chainer.optimizers.SGD().setup(model))
    for param in theirs.params():
        ChainerLARS(weight_decay=1e-3)(None, param)
    for mine, want in zip(model.params(), theirs.params(), strict=True):
        np.testing.assert_allclose(mine.grad, want.grad, rtol=1e-6)


def test_float16_params_stay_finite_where_chainer_overflows(oracle):
    model = params_link((), np.random.default_rng(0))
    with model.init_scope():
        model.big = chainer.Parameter(np.full(100_000, 300, np.float16))
    model.big.grad = np.full(100_000, 0.5, np.float16)
    _, expected = oracle(model.big.array, model.big.grad, weight_decay=1e-2)
    FusedGradientLARS(weight_decay=1e-2)(chainer.optimizers.SGD().setup(model))
    np.testing.assert_allclose(model.big.grad, expected, rtol=2.0**-11)


def test_other_arrays_fall_back_with_one_warning_and_keep_their_exclusions():
    rng = np.random.default_rng(3)
    model = params_link(((4, 3), (5,), (6,)), rng)
    model.p1.array = masked(model.p1.array)
    model.p1.grad = masked(model.p1.grad)
    model.p2.array = masked(model.p2.array)
    model.p2.grad = masked(model.p2.grad)
    theirs = copy.deepcopy(model)
    hook = FusedGradientLARS(weight_decay=0.1, exclude_from_weight_decay="/p2")
    with pytest.warns(
        FallbackWarning, match="FusedGradientLARS computes the rule with the arrays' own"
    ) as record:
        hook(chainer.optimizers.SGD().setup(model))
        hook_again = copy.deepcopy(model)  # the warning is given once per hook
        hook(chainer.optimizers.SGD().setup(hook_again))
    assert len(record) == 1
    ChainerLARS(weight_decay=0.1)(None, theirs.p0)
    ChainerLARS(weight_decay=0.1)(None, theirs.p1)
    ChainerLARS(weight_decay=0.0)(None, theirs.p2)
    for mine, want in zip(model.params(), theirs.params(), strict=True):
        np.testing.assert_allclose(np.asarray(mine.grad), np.asarray(want.grad), rtol=1e-6)


# -- reporting -----------------------------------------------------------------------


def test_report_gives_each_params_trust_ratio_under_its_path():
    rng = np.random.default_rng(4)
    model = chainer.Sequential(chainer.links.Linear(3, 4), chainer.links.Linear(4, 2))
    for param in model.params():
        param.grad = rng.standard_normal(param.shape).astype(np.float32)
    expected = {
        "lars" + path: lars_numba.trust_ratio(param.array, param.grad, weight_decay=0.01)
        for path, param in model.namedparams()
    }
    expected["lars/1/b"] = 1.0  # excluded from adaptation: rate 1
    hook = FusedGradientLARS(weight_decay=0.01, exclude_from_adaptation="/1/b", report=True)
    reporter = chainer.Reporter()
    observation = {}
    with reporter.scope(observation):
        hook(chainer.optimizers.SGD().setup(model))
    assert observation.keys() == expected.keys()
    for key, rate in expected.items():
        assert observation[key] == pytest.approx(rate, rel=1e-12), key


def test_no_report_when_off_and_log_report_averages_when_on(tmp_path):
    rng = np.random.default_rng(5)
    model = chainer.links.Classifier(chainer.links.Linear(3, 2))
    x = rng.standard_normal((40, 3)).astype(np.float32)
    t = rng.integers(0, 2, 40).astype(np.int32)
    logs = {}
    for report in (False, True):
        optimizer = chainer.optimizers.SGD(lr=0.1).setup(copy.deepcopy(model))
        optimizer.add_hook(FusedGradientLARS(report=report))
        iterator = chainer.iterators.SerialIterator(
            chainer.datasets.TupleDataset(x, t), 10, shuffle=False
        )
        updater = chainer.training.updaters.StandardUpdater(iterator, optimizer)
        trainer = chainer.training.Trainer(updater, (2, "epoch"), out=str(tmp_path / str(report)))
        log = chainer.training.extensions.LogReport(trigger=(1, "epoch"))
        trainer.extend(log)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            trainer.run()
        logs[report] = log.log
    assert not any(key.startswith("lars") for key in logs[False][-1])
    assert {"lars/predictor/W", "lars/predictor/b"} <= logs[True][-1].keys()
    assert all(math.isfinite(entry["lars/predictor/W"]) for entry in logs[True])


@pytest.mark.parametrize("scale", [128.0, 3.0])
def test_a_loss_scaled_gradient_gets_the_rate_of_the_unscaled_one(scale):
    # The optimizer's hooks run before the update rules unscale the gradients:
    # the hook must take the rate of the true gradient and leave it scaled.
    rng = np.random.default_rng(5)
    shapes = ((3, 4), (5,), (2, 2, 2))
    slopes = [rng.standard_normal(shape).astype(np.float32) for shape in shapes]
    models = [params_link(shapes, np.random.default_rng(6)) for _ in range(2)]
    for model, loss_scale in zip(models, (None, scale), strict=True):
        optimizer = chainer.optimizers.MomentumSGD(lr=0.1).setup(model)
        optimizer.add_hook(FusedGradientLARS(weight_decay=1e-2))
        if loss_scale is not None:
            optimizer.loss_scaling(scale=loss_scale)
        params = [model.p0, model.p1, model.p2]
        for _ in range(3):
            optimizer.update(
                lambda params=params: sum(
                    chainer.functions.sum(p * c) for p, c in zip(params, slopes, strict=True)
                )
            )
    for plain, scaled in zip(models[0].params(), models[1].params(), strict=True):
        np.testing.assert_allclose(scaled.array, plain.array, rtol=1e-6, atol=1e-7)
