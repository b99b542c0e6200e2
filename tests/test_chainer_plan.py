"""The plan that lars_numba.chainer.LARS keeps from one update to the next, against the walk.

After an update in which every parameter took one fused step with the optimizer's own
hyperparameters, ``LARS`` keeps a ``_StepPlan`` (``optimizer._plan``) that later updates
check cheaply and step with, reading only the gradients; whatever changed sends the
update back to the full walk over ``namedparams()``. The promise tested here: an update
with the plan gives bit for bit what the walk gives, and every change made to the model
between updates is honoured exactly as the walk honours it.

Most tests run *twins*: two models and optimizers built alike from one seed. One updates
as a user's would, keeping its plan; the other drops its plan before every update, so
that it always takes the walk. The same change is made to both between updates, both
update, and every weight, gradient, velocity, float32 master and ``rule.t`` of the two
must be equal bit for bit. Each test also checks that the plan was in use before the
change (the same plan object survived an update), so that the comparison is not of the
walk with itself, and that the change mattered (a stale plan would not give the walk's
result): an old array left untouched, a control run without the change that differs.
"""

import copy
import pickle

import numpy as np
import pytest

chainer = pytest.importorskip("chainer")

import chainer.functions as F  # noqa: E402
import chainer.links as L  # noqa: E402

from lars_numba.chainer import LARS  # noqa: E402

# -- models --------------------------------------------------------------------------------


def flat_link(dtype=np.float32, seed=0):
    """A flat Link of awkward parameters: 0-d, zero-size, two (3, 4) (so that one's
    gradient may alias the other's weights), Fortran-order, one under the threshold."""
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=1.0):
        return np.asarray(scale * rng.standard_normal(shape)).astype(dtype)

    link = chainer.Link()
    with link.init_scope():
        link.scalar = chainer.Parameter(np.asarray(1.5, dtype))
        link.empty = chainer.Parameter(np.zeros((0,), dtype))
        link.mat = chainer.Parameter(normal(3, 4))
        link.other = chainer.Parameter(normal(3, 4))
        link.fortran = chainer.Parameter(np.asfortranarray(normal(4, 3)))
        link.vec = chainer.Parameter(normal(5))
        link.tiny = chainer.Parameter(normal(6, scale=1e-4))  # norm <= threshold: rate 1
    return link


def mixed_link(dtype=np.float32, seed=0):
    """:func:`flat_link` with a float64 parameter among the float32 ones (one fused step)."""
    link = flat_link(np.float32, seed)
    link.vec.array = link.vec.array.astype(np.float64)
    return link


def linear(rng, n_in, n_out, dtype):
    weights = (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(dtype)
    bias = (0.1 * rng.standard_normal(n_out)).astype(dtype)
    with chainer.using_config("dtype", dtype):
        return L.Linear(n_in, n_out, initialW=weights, initial_bias=bias)


def chain_model(dtype=np.float32, seed=0):
    """A Chain with a Linear child, a flat Link child and a Chain grandparent of a Linear."""
    rng = np.random.default_rng(seed)
    model = chainer.Chain()
    with model.init_scope():
        model.dense = linear(rng, 4, 3, dtype)
        model.odd = flat_link(dtype, seed + 1)
        model.inner = chainer.Chain()
    with model.inner.init_scope():
        model.inner.head = linear(rng, 3, 2, dtype)
    return model


def list_model(dtype=np.float32, seed=0):
    """A ChainList of two Linear links and a flat Link."""
    rng = np.random.default_rng(seed)
    return chainer.ChainList(
        linear(rng, 3, 4, dtype), linear(rng, 4, 2, dtype), flat_link(dtype, seed + 1)
    )


MODELS = {"link": flat_link, "chain": chain_model, "chainlist": list_model}
#: A (3, 4) float parameter of each model.
MATRIX = {"link": "/mat", "chain": "/odd/mat", "chainlist": "/2/mat"}

#: Gradient scales by the parameter's name: "tiny" stays under the threshold.
GRAD_SCALE = {"tiny": 1e-3, "scalar": 0.1}


def gradients(model, step):
    """Gradients for every parameter of ``model``, by path, the same for twins."""
    rng = np.random.default_rng(1000 + step)
    grads = {}
    for path, param in sorted(model.namedparams(), key=lambda item: item[0]):
        scale = GRAD_SCALE.get(path.rsplit("/", 1)[-1], 1.0)
        g = np.asarray(scale * rng.standard_normal(param.shape)).astype(param.dtype)
        grads[path] = (
            np.array(g, order="F") if param.ndim > 1 and param.array.flags.f_contiguous else g
        )
    return grads


def set_grads(model, step):
    for path, g in gradients(model, step).items():
        dict(model.namedparams())[path].grad = g


def param_at(model, path):
    return dict(model.namedparams())[path]


# -- runs and their comparison -------------------------------------------------------------


class Run:
    """A model and its LARS optimizer; with ``walks``, the plan is dropped before every
    update, so that each update takes the walk over the model."""

    def __init__(self, model, walks, fp32=False, **kwargs):
        self.model, self.walks = model, walks
        self.opt = LARS(**kwargs).setup(model)
        if fp32:
            self.opt.use_fp32_update()

    @property
    def plan(self):
        return self.opt._plan

    def update(self, step=None):
        """``step``'s gradients (unless None) and an update."""
        if step is not None:
            set_grads(self.model, step)
        if self.walks:
            self.opt._plan = None
        self.opt.update()


def twins(factory=flat_link, dtype=np.float32, fp32=False, **kwargs):
    """The kept-plan run and the walking run of two models built alike."""
    return (
        Run(factory(dtype), walks=False, fp32=fp32, **kwargs),
        Run(factory(dtype), walks=True, fp32=fp32, **kwargs),
    )


def update_both(runs, step):
    for run in runs:
        run.update(step)


def state(model):
    """Everything a step writes or reads, by path, copied: weights, gradient, velocity,
    float32 master and the rule's step count."""
    out = {}
    for path, param in model.namedparams():
        rule = param.update_rule
        master = getattr(rule, "_fp32_param", None)
        v = None if rule is None or rule.state is None else rule.state.get("v")
        out[path] = {
            "w": param.array,
            "g": param.grad,
            "v": v,
            "master": None if master is None else master.array,
            "t": None if rule is None else rule.t,
        }
        for key, value in out[path].items():
            if isinstance(value, np.ndarray):
                out[path][key] = value.copy(order="K")
    return out


def assert_bits_equal(got, want, err_msg=""):
    """Equal arrays bit for bit (NaNs included), of one dtype and shape; or both None."""
    if want is None or got is None:
        assert got is None and want is None, err_msg
        return
    assert got.dtype == want.dtype, err_msg
    assert got.shape == want.shape, err_msg
    np.testing.assert_array_equal(
        np.array(got, order="C").view(f"u{got.itemsize}"),
        np.array(want, order="C").view(f"u{want.itemsize}"),
        err_msg=err_msg,
    )


def assert_same_state(got, want):
    assert got.keys() == want.keys()
    for path, arrays in want.items():
        for key, value in arrays.items():
            if key == "t":
                assert got[path][key] == value, f"{path}: t"
            else:
                assert_bits_equal(got[path][key], value, f"{path}: {key}")


def assert_twins_equal(planned, walked):
    assert_same_state(state(planned.model), state(walked.model))
    assert planned.opt.t == walked.opt.t
    assert planned.opt._loss_scale == walked.opt._loss_scale


def assert_moved(before, after, paths):
    """The weights at ``paths`` (non-empty ones) changed from ``before`` to ``after``."""
    for path in paths:
        w0, w1 = before[path]["w"], after[path]["w"]
        assert w0.size == 0 or not np.array_equal(w0, w1), f"{path} did not move"


def warmed_twins(factory=flat_link, dtype=np.float32, steps=2, **kwargs):
    """Twins after ``steps`` updates, with the plan in use on the first: the plan built
    at the first update was the one that took the last."""
    runs = twins(factory, dtype, **kwargs)
    update_both(runs, 0)
    plan = runs[0].plan
    assert plan is not None
    for step in range(1, steps):
        update_both(runs, step)
    assert runs[0].plan is plan, "the plan was not in use"
    assert_twins_equal(*runs)
    return runs


# -- 1. nothing changes --------------------------------------------------------------------

HYPERPARAMETERS = {
    "defaults": {},
    "lr-momentum": {"lr": 0.05, "momentum": 0.5},
    "weight_decay": {"weight_decay": 1e-2},
    "trust_coefficient": {"trust_coefficient": 0.02, "weight_decay": 1e-3},
    "denominator-update": {"denominator": "update", "weight_decay": 1e-2},
    "clip": {"clip": True, "lr": 0.5, "trust_coefficient": 0.02},
    "exclusions": {"weight_decay": 1e-2, "exclude": "*/b", "exclude_from_adaptation": "*/vec"},
    "parallel": {"parallel": True, "weight_decay": 1e-3},
}


def run_unchanged(factory, dtype, fp32=False, **kwargs):
    planned, walked = twins(factory, dtype, fp32=fp32, **kwargs)
    update_both((planned, walked), 0)
    plan = planned.plan
    assert plan is not None
    first = state(planned.model)
    for step in range(1, 5):
        update_both((planned, walked), step)
        assert planned.plan is plan, f"the plan was dropped at update {step + 1}"
        assert_twins_equal(planned, walked)
    paths = [path for path, _ in planned.model.namedparams()]
    assert_moved(first, state(planned.model), paths)


@pytest.mark.parametrize("kwargs", HYPERPARAMETERS.values(), ids=HYPERPARAMETERS.keys())
def test_five_unchanged_updates_equal_the_walk(kwargs):
    run_unchanged(chain_model, np.float32, **kwargs)


@pytest.mark.parametrize(
    ("factory", "dtype", "fp32"),
    [
        (flat_link, np.float32, False),
        (flat_link, np.float64, False),
        (mixed_link, np.float32, False),
        (list_model, np.float32, False),
        (flat_link, np.float16, False),
        (chain_model, np.float16, True),
    ],
    ids=["link32", "link64", "mixed", "chainlist", "float16", "float16-fp32"],
)
def test_five_unchanged_updates_of_each_model_equal_the_walk(factory, dtype, fp32):
    run_unchanged(factory, dtype, fp32=fp32, weight_decay=1e-3)


# -- 2. a parameter's array replaced -------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("order", ["C", "F"])
def test_a_replaced_array_is_updated_and_the_old_one_left_alone(model, order):
    runs = warmed_twins(MODELS[model])
    plan = runs[0].plan
    path = MATRIX[model]
    olds, news = [], []
    for run in runs:
        param = param_at(run.model, path)
        olds.append((param.array, param.array.copy()))
        param.array = np.array(param.array[::-1] * 2, order=order)
        news.append((param.array, param.array.copy()))
    update_both(runs, 2)
    assert_twins_equal(*runs)
    for run, (old, old_copy), (new, new_copy) in zip(runs, olds, news, strict=True):
        assert_bits_equal(old, old_copy, "the old array was written")
        assert param_at(run.model, path).array is new
        assert not np.array_equal(new, new_copy), "the new array was not updated"
    assert runs[0].plan is not plan
    rebuilt = runs[0].plan
    update_both(runs, 3)
    assert runs[0].plan is rebuilt is not None
    assert_twins_equal(*runs)


# -- 3. a rule disabled, then enabled again ------------------------------------------------


@pytest.mark.parametrize("how", ["rule", "link"])
def test_a_disabled_parameter_stays_and_moves_again_when_enabled(how):
    runs = warmed_twins(chain_model)
    frozen = ["/dense/W", "/dense/b"] if how == "link" else ["/odd/mat"]
    for run in runs:
        if how == "link":
            run.model.dense.disable_update()
        else:
            run.model.odd.mat.update_rule.enabled = False
    before = state(runs[0].model)
    update_both(runs, 2)
    update_both(runs, 3)
    assert runs[0].plan is None  # a parameter takes no step: the walk keeps no plan
    assert_twins_equal(*runs)
    after = state(runs[0].model)
    for path in frozen:
        for key in ("w", "v", "t"):
            assert_bits_equal(np.asarray(after[path][key]), np.asarray(before[path][key]), path)
    assert_moved(before, after, [path for path in before if path not in frozen])
    for run in runs:
        if how == "link":
            run.model.dense.enable_update()
        else:
            run.model.odd.mat.update_rule.enabled = True
    update_both(runs, 4)
    plan = runs[0].plan
    assert plan is not None
    update_both(runs, 5)
    assert runs[0].plan is plan
    assert_twins_equal(*runs)
    assert_moved(after, state(runs[0].model), frozen)


# -- 4. an update-rule hook ----------------------------------------------------------------


@pytest.mark.parametrize("timing", ["pre", "post"])
def test_an_update_rule_hook_is_called_with_its_parameter(timing):
    runs = warmed_twins(flat_link)
    calls = []
    for run in runs:
        seen = []
        calls.append(seen)

        def hook(rule, param, seen=seen):
            seen.append((rule, param))
            if timing == "pre":
                param.grad += 1  # a gradient the step must see

        run.model.mat.update_rule.add_hook(hook, name="spy", timing=timing)
    for step in (2, 3):
        update_both(runs, step)
        assert runs[0].plan is None  # /mat takes its update rule
        assert_twins_equal(*runs)
    for run, seen in zip(runs, calls, strict=True):
        param = run.model.mat
        assert len(seen) == 2
        assert all(rule is param.update_rule and p is param for rule, p in seen)
    if timing == "pre":  # the changed gradient took the step
        control = Run(flat_link(), walks=True)
        for step in range(4):
            control.update(step)
        assert not np.array_equal(control.model.mat.array, runs[0].model.mat.array)
        assert_bits_equal(control.model.vec.array, runs[0].model.vec.array)
    for run in runs:
        run.model.mat.update_rule.remove_hook("spy")
    update_both(runs, 4)
    plan = runs[0].plan
    update_both(runs, 5)
    assert plan is not None and runs[0].plan is plan
    assert [len(seen) for seen in calls] == [2, 2]
    assert_twins_equal(*runs)


# -- 5. a parameter's own hyperparameter ---------------------------------------------------


def test_a_parameters_own_learning_rate_applies_to_it():
    runs = warmed_twins(flat_link)
    # Controls: the whole model at lr 0.1 (the others) and at lr 0.5 (/mat).
    controls = {lr: Run(flat_link(), walks=True, lr=lr) for lr in (0.1, 0.5)}
    for step in range(2):
        controls[0.1].update(step)
        controls[0.5].opt.lr = 0.1
        controls[0.5].update(step)
    controls[0.5].opt.lr = 0.5
    for run in runs:
        run.model.mat.update_rule.hyperparam.lr = 0.5
    for step in (2, 3):
        update_both(runs, step)
        for control in controls.values():
            control.update(step)
        assert runs[0].plan is None  # two fused steps: the walk keeps no plan
        assert_twins_equal(*runs)
    got = state(runs[0].model)
    for path, arrays in state(controls[0.1].model).items():
        want = state(controls[0.5].model)[path] if path == "/mat" else arrays
        for key in ("w", "v"):
            assert_bits_equal(got[path][key], want[key], f"{path}: {key}")
    for run in runs:
        del run.model.mat.update_rule.hyperparam.lr
    update_both(runs, 4)
    plan = runs[0].plan
    update_both(runs, 5)
    assert plan is not None and runs[0].plan is plan
    assert_twins_equal(*runs)


def test_a_replaced_hyperparameter_object_with_its_own_learning_rate_applies():
    runs = warmed_twins(flat_link)
    plan = runs[0].plan
    control = Run(flat_link(), walks=True)
    for step in range(3):
        control.update(step)
    for run in runs:
        rule = run.model.mat.update_rule
        rule.hyperparam = chainer.optimizer.Hyperparameter(run.opt.hyperparam)
        rule.hyperparam.lr = 0.5
    update_both(runs, 2)
    assert runs[0].plan is not plan
    assert_twins_equal(*runs)
    assert not np.array_equal(control.model.mat.array, runs[0].model.mat.array)
    assert_bits_equal(control.model.vec.array, runs[0].model.vec.array)


# -- 6. a velocity replaced ----------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_a_replaced_velocity_is_the_one_used(model):
    runs = warmed_twins(MODELS[model])
    plan = runs[0].plan
    path = MATRIX[model]
    olds = []
    for run in runs:
        rule = param_at(run.model, path).update_rule
        olds.append((rule.state["v"], rule.state["v"].copy()))
        rule.state["v"] = np.full((3, 4), 0.25, np.float32)
    update_both(runs, 2)
    assert_twins_equal(*runs)
    assert runs[0].plan is not plan
    for run, (old, old_copy) in zip(runs, olds, strict=True):
        assert_bits_equal(old, old_copy, "the old velocity was written")
        v = param_at(run.model, path).update_rule.state["v"]
        assert not np.array_equal(v, np.full((3, 4), 0.25, np.float32))
    # What a velocity of 0.25 gives: not what the old one gives.
    control = Run(MODELS[model](), walks=True)
    for step in range(3):
        control.update(step)
    assert not np.array_equal(
        param_at(control.model, path).array, param_at(runs[0].model, path).array
    )


@pytest.mark.parametrize("rule", ["fresh", "momentum_sgd", "none"])
def test_a_replaced_update_rule_is_the_one_that_steps(rule):
    """A fresh LARS rule starts from a zero velocity and t = 0; Chainer's MomentumSGD rule
    steps its parameter alone; without a rule, the parameter is left alone."""
    runs = warmed_twins(flat_link)
    plan = runs[0].plan
    olds = []
    for run in runs:
        param = run.model.mat
        olds.append((param.update_rule, param.update_rule.state["v"].copy(), param.array.copy()))
        if rule == "fresh":
            param.update_rule = run.opt.create_update_rule()
        elif rule == "momentum_sgd":
            sgd = chainer.optimizers.MomentumSGD(lr=0.3, momentum=0.5)
            sgd.setup(chainer.Link())
            param.update_rule = sgd.create_update_rule()
        else:
            param.update_rule = None
    update_both(runs, 2)
    assert runs[0].plan is not plan
    assert_twins_equal(*runs)
    for run, (old_rule, old_v, old_w) in zip(runs, olds, strict=True):
        param = run.model.mat
        assert_bits_equal(old_rule.state["v"], old_v, "the old rule's velocity was written")
        assert old_rule.t == 2
        if rule == "none":
            assert_bits_equal(param.array, old_w)
            continue
        assert param.update_rule.t == 1
        assert not np.array_equal(param.array, old_w)
    if rule != "none":
        control = Run(flat_link(), walks=True)  # the old rule's step: not the one taken
        for step in range(3):
            control.update(step)
        assert not np.array_equal(control.model.mat.array, runs[0].model.mat.array)


def test_a_target_assigned_without_setup_is_the_one_updated():
    """``optimizer.target`` replaced directly: the new model's parameters have no update
    rules, so nothing is updated, and the old model must not be either."""
    runs = warmed_twins(flat_link)
    plan = runs[0].plan
    firsts = []
    for run in runs:
        firsts.append((run.model, state(run.model)))
        set_grads(run.model, 2)
        run.model = run.opt.target = flat_link(seed=4)
    update_both(runs, 2)
    assert runs[0].plan is not plan
    assert_twins_equal(*runs)
    assert_left_alone(firsts)
    assert_same_state(
        {path: dict(arrays, g=None) for path, arrays in state(runs[0].model).items()},
        {path: dict(arrays, g=None) for path, arrays in state(flat_link(seed=4)).items()},
    )


# -- 7. parameters and links added, deleted, replaced --------------------------------------


def new_param(shape, seed):
    return chainer.Parameter(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def add_param(model):
    target = model.odd if isinstance(model, chainer.Chain) else model
    with target.init_scope():
        target.extra = new_param((2, 3), 7)
    return []


def delete_param(model):
    target = model.odd if isinstance(model, chainer.Chain) else model
    removed = target.other
    delattr(target, "other")
    return [removed]


def replace_param(model):
    removed = model.mat
    with model.init_scope():
        model.mat = new_param((3, 4), 8)
    return [removed]


def add_child(model):
    with model.init_scope():
        model.child2 = linear(np.random.default_rng(9), 3, 5, np.float32)
    return []


def add_grandchild_param(model):
    with model.inner.head.init_scope():
        model.inner.head.gain = new_param((2,), 10)
    return []


def delete_child(model):
    removed = list(model.dense.params())
    delattr(model, "dense")
    return removed


def replace_child(model):
    removed = list(model.inner.head.params())
    delattr(model.inner, "head")
    with model.inner.init_scope():
        model.inner.head = linear(np.random.default_rng(11), 3, 2, np.float32)
    return removed


def add_link(model):
    model.add_link(linear(np.random.default_rng(12), 2, 3, np.float32))
    return []


def set_item(model):
    removed = list(model[0].params())
    model[0] = linear(np.random.default_rng(13), 3, 4, np.float32)
    return removed


def delete_item(model):
    removed = list(model[1].params())
    del model[1]
    return removed


def swap_items(model):
    model[0], model[1] = model[1], model[0]
    return []


def given_rules(run):
    """Update rules for the parameters added since ``setup``, as Chainer's ``setup`` gives
    them: without one, a parameter is left alone (see the test below)."""
    for param in run.model.params():
        if param.update_rule is None:
            param.update_rule = run.opt.create_update_rule()


STRUCTURE_CHANGES = [
    ("link", add_param),
    ("link", delete_param),
    ("link", replace_param),
    ("chain", add_param),
    ("chain", delete_param),
    ("chain", add_child),
    ("chain", add_grandchild_param),
    ("chain", delete_child),
    ("chain", replace_child),
    ("chainlist", add_param),
    ("chainlist", add_link),
    ("chainlist", set_item),
    ("chainlist", delete_item),
    ("chainlist", swap_items),
]


@pytest.mark.parametrize(
    ("model", "change"),
    STRUCTURE_CHANGES,
    ids=[f"{model}-{change.__name__}" for model, change in STRUCTURE_CHANGES],
)
def test_a_changed_model_is_updated_as_it_now_is(model, change):
    runs = warmed_twins(MODELS[model])
    plan = runs[0].plan
    removed = []
    for run in runs:
        params = change(run.model)
        removed.append([(param, param.array.copy(), param.update_rule.t) for param in params])
        given_rules(run)
    before = state(runs[0].model)  # the new parameters as they start
    update_both(runs, 2)
    assert_twins_equal(*runs)
    assert runs[0].plan is not plan
    rebuilt = runs[0].plan
    assert rebuilt is not None
    paths = [path for path, _ in runs[0].model.namedparams()]
    assert_moved(before, state(runs[0].model), paths)
    for params in removed:
        for param, array, t in params:
            assert_bits_equal(param.array, array, f"a removed {param.name!r} was written")
            assert param.update_rule.t == t
    update_both(runs, 3)
    assert runs[0].plan is rebuilt
    assert_twins_equal(*runs)


def test_a_parameter_added_without_an_update_rule_is_left_alone():
    runs = warmed_twins(chain_model)
    added = []
    for run in runs:
        add_param(run.model)
        added.append(run.model.odd.extra.array.copy())
    update_both(runs, 2)
    assert_twins_equal(*runs)
    for run, array in zip(runs, added, strict=True):
        assert run.model.odd.extra.update_rule is None
        assert_bits_equal(run.model.odd.extra.array, array)
    # Chainer's parameters without a rule take no step, but the others do.
    assert_moved(state(chain_model()), state(runs[0].model), ["/dense/W", "/odd/mat"])


# -- 8. gradients cleared ------------------------------------------------------------------


def test_a_gradient_set_to_none_is_a_zero_gradient():
    runs = warmed_twins(chain_model)
    plan = runs[0].plan
    for run in runs:
        set_grads(run.model, 2)
        run.model.odd.mat.grad = None
    before = state(runs[0].model)
    for run in runs:
        run.update()
    assert_twins_equal(*runs)
    assert runs[0].plan is not plan and runs[0].plan is not None
    for run in runs:
        assert_bits_equal(run.model.odd.mat.grad, np.zeros((3, 4), np.float32))
    assert_moved(before, state(runs[0].model), ["/odd/mat"])  # by its velocity
    # cleargrads and fresh gradients: the plan holds.
    plan = runs[0].plan
    for run in runs:
        run.model.cleargrads()
    update_both(runs, 3)
    assert runs[0].plan is plan
    assert_twins_equal(*runs)
    # cleargrads alone: every gradient is zero.
    for run in runs:
        run.model.cleargrads()
        run.update()
    assert_twins_equal(*runs)
    for path, param in runs[0].model.namedparams():
        assert not param.grad.any(), path


@pytest.mark.parametrize("replaced", [False, True], ids=["as set", "array replaced"])
@pytest.mark.parametrize("held", ["every one", "one"])
def test_gradients_held_by_variables_are_read_as_chainer_reads_them(held, replaced):
    """Gradients held by variables (as backward leaves them), of every parameter or
    of one; with ``replaced``, the array of one of the variables was replaced after
    it was set: the kept plan steps with what Chainer's ``grad`` property returns,
    as the walk does."""
    runs = warmed_twins(flat_link)
    plan = runs[0].plan
    for run in runs:
        set_grads(run.model, 2)
        params = dict(run.model.namedparams())
        for path in params if held == "every one" else ["/mat"]:
            params[path].grad_var = chainer.Variable(params[path].grad.copy())
        if replaced:
            params["/mat"].grad_var.array = np.full((3, 4), -3.0, np.float32)
            assert params["/mat"]._grad is not params["/mat"].grad  # the trap
    before = state(runs[0].model)
    update_both(runs, None)
    assert runs[0].plan is plan
    assert_twins_equal(*runs)
    assert_moved(before, state(runs[0].model), ["/mat", "/other", "/vec"])


def test_gradients_of_other_layouts_give_the_same_step():
    """Fortran-order, strided and reversed gradients: the values of C-order ones."""
    runs = warmed_twins(flat_link)
    control = Run(flat_link(), walks=True)
    for step in range(2):
        control.update(step)
    plan = runs[0].plan
    layouts = {
        "mat": lambda g: np.array(g, order="F"),
        "other": lambda g: np.repeat(g, 2, axis=1)[:, ::2],
        "fortran": lambda g: np.ascontiguousarray(g),
        "vec": lambda g: g[::-1].copy()[::-1],
    }
    for step in (2, 3):
        for run in runs:
            set_grads(run.model, step)
            for name, layout in layouts.items():
                param = getattr(run.model, name)
                param.grad = layout(param.grad)
        control.update(step)
        update_both(runs, None)
        assert runs[0].plan is plan
        assert_twins_equal(*runs)
        # Compared as values in C order: the same gradients, weights and velocities.
        assert_same_state(state(runs[0].model), state(control.model))


# -- 9. bad arrays after the plan exists ---------------------------------------------------


def wrong_dtype(model):
    model.mat._set_grad_without_check(model.mat.grad.astype(np.float64))


def int_view(model):
    model.mat.grad.dtype = np.int32


def swapped_bytes(model):
    g = model.vec.grad
    g.dtype = g.dtype.newbyteorder()


def grad_reshaped(model):
    model.mat.grad.shape = (4, 3)


def grad_flattened(model):
    model.mat.grad.shape = (12,)


def grad_is_own_weights(model):
    model.mat.grad = model.mat.array


def grad_is_other_weights(model):
    model.mat.grad = model.other.array


def grad_is_velocity(model):
    model.other.grad = model.other.update_rule.state["v"]


def grad_is_other_velocity(model):
    model.mat.grad = model.other.update_rule.state["v"]


def read_only_weights(model):
    model.vec.array.flags.writeable = False


def read_only_velocity(model):
    model.mat.update_rule.state["v"].flags.writeable = False


def weights_reshaped(model):
    model.mat.array.shape = (4, 3)


def velocity_reshaped(model):
    model.mat.update_rule.state["v"].shape = (2, 6)


def velocity_of_wrong_dtype(model):
    model.mat.update_rule.state["v"] = np.zeros((3, 4), np.float64)


def velocity_is_other_weights(model):
    model.mat.update_rule.state["v"] = model.other.array


BAD_CHANGES = [
    (wrong_dtype, TypeError),
    (int_view, TypeError),
    (swapped_bytes, TypeError),
    (grad_reshaped, ValueError),
    (grad_flattened, ValueError),
    (grad_is_own_weights, ValueError),
    (grad_is_other_weights, ValueError),
    (grad_is_velocity, ValueError),
    (grad_is_other_velocity, ValueError),
    (read_only_weights, ValueError),
    (read_only_velocity, ValueError),
    (weights_reshaped, ValueError),
    (velocity_reshaped, ValueError),
    (velocity_of_wrong_dtype, TypeError),
    (velocity_is_other_weights, ValueError),
]


@pytest.mark.parametrize(
    ("change", "error"), BAD_CHANGES, ids=[change.__name__ for change, _ in BAD_CHANGES]
)
def test_bad_arrays_raise_as_the_walk_does_and_nothing_is_written(change, error):
    runs = warmed_twins(flat_link)
    errors = messages_raised(runs, change, error)
    assert errors[0] == errors[1]
    assert runs[0].plan is None


def messages_raised(runs, change, error):
    """The messages of the ``error`` each run's update raises after ``change`` to its
    model, having written nothing."""
    errors = []
    for run in runs:
        set_grads(run.model, 2)
        change(run.model)
        before = state(run.model)
        with pytest.raises(error) as caught:
            run.update()
        errors.append(str(caught.value))
        assert_same_state(state(run.model), before)
    return errors


# -- 10. hyperparameters changed between updates -------------------------------------------


HYPERPARAMETER_CHANGES = {
    "lr": 0.02,
    "momentum": 0.5,
    "weight_decay": 0.05,
    "trust_coefficient": 0.3,
    "threshold": 1.9,  # above /vec's norm: its rate becomes 1
    "eps": 0.5,
    "denominator": "update",
    "clip": True,
}


@pytest.mark.parametrize(("name", "value"), HYPERPARAMETER_CHANGES.items())
def test_a_hyperparameter_changed_between_updates_is_used(name, value):
    kwargs = {"weight_decay": 1e-2, "lr": 0.2}
    runs = warmed_twins(flat_link, **kwargs)
    plan = runs[0].plan
    control = Run(flat_link(), walks=False, **kwargs)
    for step in range(3):
        control.update(step)
    for run in runs:
        setattr(run.opt, name, value)
    update_both(runs, 2)
    assert runs[0].plan is plan
    assert_twins_equal(*runs)
    assert not all(
        np.array_equal(a.array, b.array)
        for a, b in zip(control.model.params(), runs[0].model.params(), strict=True)
    ), "the change made no difference"


def test_an_exponential_shift_sets_the_learning_rate_of_the_plan():
    runs = warmed_twins(chain_model)
    plan = runs[0].plan
    shifts = []
    for run in runs:
        shift = chainer.training.extensions.ExponentialShift("lr", 0.5, optimizer=run.opt)
        shift.initialize(None)
        shifts.append(shift)
    for step in range(2, 5):
        for shift in shifts:
            shift(None)
        update_both(runs, step)
        assert_twins_equal(*runs)
    assert runs[0].plan is plan
    assert runs[0].opt.lr == pytest.approx(0.1 * 0.5**3)


# -- 11. loss scaling ----------------------------------------------------------------------


def backward(run, step, nan_at=None):
    """The gradients of a loss linear in each parameter, under the optimizer's loss scale."""
    model = run.model
    rng = np.random.default_rng(2000 + step)
    model.cleargrads()
    loss = 0
    for _, param in sorted(model.namedparams(), key=lambda item: item[0]):
        weights = np.asarray(rng.standard_normal(param.shape)).astype(param.dtype)
        loss = loss + F.sum(param * weights)
    loss.backward(loss_scale=run.opt._loss_scale)
    if nan_at is not None:
        param_at(model, nan_at).grad[0, 1] = np.nan


def skipped_update(runs):
    """The update of each run, skipped: nothing written, the loss scale halved."""
    for run in runs:
        before, scale = state(run.model), run.opt._loss_scale
        with pytest.warns(UserWarning, match="Non finite number"):
            run.update()
        assert_same_state(state(run.model), before)
        assert run.opt._loss_scale == max(1.0, scale / 2)


def test_static_loss_scaling_with_a_nan_writes_it_as_the_walk_does():
    runs = twins(chain_model)
    for run in runs:
        run.opt.loss_scaling(scale=128.0)
    for step in range(3):
        for run in runs:
            backward(run, step)
            run.update()
    plan = runs[0].plan
    assert plan is not None and plan.loss_scale == 128.0
    for run in runs:
        backward(run, 3, nan_at="/odd/mat")
        run.update()
    assert runs[0].plan is plan  # static: no skip, the NaN is written
    assert_twins_equal(*runs)
    assert np.isnan(runs[0].model.odd.mat.array).any()


def test_dynamic_loss_scaling_skips_a_step_with_a_nan_under_the_plan():
    # Gradients set by hand have no loss scale of their own: the plan holds.
    runs = warmed_twins(chain_model)
    for run in runs:
        run.opt.loss_scaling()
    update_both(runs, 2)
    plan = runs[0].plan
    for run in runs:
        set_grads(run.model, 3)
        run.model.odd.vec.grad[2] = np.inf
    skipped_update(runs)
    assert runs[0].plan is plan
    assert_twins_equal(*runs)
    update_both(runs, 4)  # the next finite step is taken
    assert runs[0].plan is plan
    assert_twins_equal(*runs)
    assert runs[0].model.odd.mat.update_rule.t == 4


def test_dynamic_loss_scaling_from_backward_skips_a_step_and_rescales():
    runs = twins(chain_model)
    for run in runs:
        run.opt.loss_scaling()
        run.opt._loss_scale_max = 64.0  # the scale stops doubling: the plan then holds
    for step in range(9):
        for run in runs:
            backward(run, step)
            run.update()
    plan = runs[0].plan
    assert runs[0].opt._loss_scale == 64.0
    for run in runs:
        backward(run, 9)
        run.update()
    assert runs[0].plan is plan is not None and plan.loss_scale == 64.0
    assert_twins_equal(*runs)
    for run in runs:
        backward(run, 10, nan_at="/dense/W")
    skipped_update(runs)
    assert_twins_equal(*runs)
    for step in (11, 12):  # at the halved scale, which the plan must notice
        for run in runs:
            backward(run, step)
            run.update()
        assert_twins_equal(*runs)
    assert runs[0].plan is not plan and runs[0].plan.loss_scale != 64.0


# -- 12. float16 with masters, reporting ---------------------------------------------------


@pytest.mark.parametrize("model", ["link", "chain"])
def test_fp32_update_switched_on_after_the_plan_makes_masters(model):
    runs = warmed_twins(MODELS[model], np.float16)
    plan = runs[0].plan
    for run in runs:
        for param in run.model.params():
            assert param.update_rule._fp32_param is None
        run.opt.use_fp32_update()
    update_both(runs, 2)
    assert_twins_equal(*runs)
    assert runs[0].plan is not plan
    for param in runs[0].model.params():
        master = param.update_rule._fp32_param
        assert master is not None and master.array.dtype == np.float32
        assert_bits_equal(param.array, master.array.astype(np.float16))
    plan = runs[0].plan
    for step in (3, 4):
        update_both(runs, step)
        assert runs[0].plan is plan
        assert_twins_equal(*runs)
    # The masters hold what float16 cannot: a stale plan without them would not.
    master = param_at(runs[0].model, MATRIX[model]).update_rule._fp32_param.array
    assert not np.array_equal(master, master.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("late", [False, True], ids=["from-the-start", "switched-on"])
def test_report_gives_the_walks_trust_ratios(late):
    runs = twins(chain_model, report=not late, weight_decay=1e-2)
    reporter = chainer.Reporter()
    reporter.add_observer("main", runs[0].model)
    observations = []
    for step in range(4):
        if late and step == 2:
            for run in runs:
                run.opt.report = True
        seen = []
        for run in runs:
            observation = {}
            with reporter.scope(observation):
                run.update(step)
            seen.append(observation)
        assert seen[0] == seen[1]
        observations.append(seen[0])
        if step == 1:
            plan = runs[0].plan
    assert runs[0].plan is plan is not None
    assert_twins_equal(*runs)
    keys = {"lars" + path for path, _ in runs[0].model.namedparams()}
    for step, observation in enumerate(observations):
        assert observation.keys() == (set() if late and step < 2 else keys)
    assert observations[-1] != observations[-2]  # the rates of this step, not the last
    assert observations[-1]["lars/odd/tiny"] == 1.0


# -- 13. another model ---------------------------------------------------------------------


def assert_left_alone(firsts):
    """Each ``(model, state before)`` of ``firsts`` has its weights, velocities and step
    counts as before."""
    for model, before in firsts:
        after = state(model)
        for path in before:
            for key in ("w", "v", "t"):
                assert_bits_equal(np.asarray(after[path][key]), np.asarray(before[path][key]))


def test_setup_on_another_model_updates_it_and_leaves_the_first():
    runs = warmed_twins(flat_link)
    plan = runs[0].plan
    firsts = []
    for run in runs:
        firsts.append((run.model, state(run.model)))
        run.model = chain_model(seed=3)
        run.opt.setup(run.model)
        set_grads(firsts[-1][0], 2)
    update_both(runs, 2)
    update_both(runs, 3)
    assert runs[0].plan is not plan and runs[0].plan.target is runs[0].model
    assert_twins_equal(*runs)
    assert_left_alone(firsts)
    assert_moved(state(chain_model(seed=3)), state(runs[0].model), ["/dense/W", "/odd/mat"])


# -- 14. serialization ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["float32", "float16-fp32"])
def test_a_run_resumed_from_npz_files_equals_the_uninterrupted_one(dtype, tmp_path):
    fp32 = dtype == np.float16
    kwargs = {"lr": 0.05, "weight_decay": 1e-3, "clip": True, "exclude": "*/b"}
    k, n = 3, 6
    uninterrupted = Run(chain_model(dtype), walks=False, fp32=fp32, **kwargs)
    interrupted = Run(chain_model(dtype), walks=False, fp32=fp32, **kwargs)
    for step in range(k):
        uninterrupted.update(step)
        interrupted.update(step)
    chainer.serializers.save_npz(tmp_path / "model.npz", interrupted.model)
    chainer.serializers.save_npz(tmp_path / "optimizer.npz", interrupted.opt)
    resumed = Run(chain_model(dtype, seed=5), walks=False, fp32=fp32, **kwargs)
    chainer.serializers.load_npz(tmp_path / "model.npz", resumed.model)
    chainer.serializers.load_npz(tmp_path / "optimizer.npz", resumed.opt)
    assert resumed.opt.t == k
    plans = []
    for step in range(k, n):
        uninterrupted.update(step)
        resumed.update(step)
        plans.append((uninterrupted.plan, resumed.plan))
    for plan_pair in plans[1:]:  # the plans built at the first update after the resume
        assert plan_pair == plans[0] and None not in plan_pair
    assert_same_state(state(resumed.model), state(uninterrupted.model))
    assert resumed.opt.t == uninterrupted.opt.t == n


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["float32", "float16-fp32"])
def test_loading_npz_files_into_the_live_run_is_honoured(dtype, tmp_path):
    """Rewound into the same model and optimizer: the arrays the files fill, and the
    masters they replace, are those the next update must step."""
    fp32 = dtype == np.float16
    runs = twins(chain_model, dtype, fp32=fp32, weight_decay=1e-3)
    for step in range(2):
        update_both(runs, step)
    for index, run in enumerate(runs):
        chainer.serializers.save_npz(tmp_path / f"model{index}.npz", run.model)
        chainer.serializers.save_npz(tmp_path / f"optimizer{index}.npz", run.opt)
    saved = state(runs[0].model)
    for step in (2, 3):
        update_both(runs, step)
    plan = runs[0].plan
    assert plan is not None
    for index, run in enumerate(runs):
        chainer.serializers.load_npz(tmp_path / f"model{index}.npz", run.model)
        chainer.serializers.load_npz(tmp_path / f"optimizer{index}.npz", run.opt)
    assert_same_state(
        {path: dict(arrays, g=None) for path, arrays in state(runs[0].model).items()},
        {path: dict(arrays, g=None) for path, arrays in saved.items()},
    )
    for step in (2, 3):
        update_both(runs, step)
        assert_twins_equal(*runs)
    # The rewound run repeats the steps it took from the same state.
    rerun = Run(chain_model(dtype), walks=True, fp32=fp32, weight_decay=1e-3)
    for step in range(4):
        rerun.update(step)
    assert_same_state(state(runs[0].model), state(rerun.model))


# -- beyond the model: the optimizer copied ------------------------------------------------


def deep_copies(runs):
    """Deep copies of the twins (the originals kept alive by ``runs``)."""
    copies = []
    for run in runs:
        opt = copy.deepcopy(run.opt)
        twin = Run.__new__(Run)
        twin.model, twin.walks, twin.opt = opt.target, run.walks, opt
        copies.append(twin)
    return copies


def test_a_deep_copied_optimizer_steps_its_own_arrays():
    runs = warmed_twins(flat_link)
    copies = deep_copies(runs)
    assert runs[0].plan is not None
    assert copies[0].plan is None  # the plan holds the originals' addresses: not copied
    originals = [state(run.model) for run in runs]
    for step in (2, 3):
        update_both(copies, step)
        assert_twins_equal(*copies)
    assert copies[0].plan is not None  # the copy's own
    for run, before in zip(runs, originals, strict=True):
        assert_same_state(state(run.model), before)


@pytest.mark.parametrize("change", [read_only_weights, grad_is_own_weights])
def test_a_deep_copied_optimizer_checks_its_own_arrays(change):
    runs = warmed_twins(flat_link)
    errors = messages_raised(deep_copies(runs), change, ValueError)
    assert errors[0] == errors[1]
    del runs  # kept alive until here: the copies' plans must not read the originals


def test_a_pickled_optimizer_steps_its_own_arrays():
    runs = warmed_twins(flat_link)
    copies = [pickle.loads(pickle.dumps(run.opt)) for run in runs]
    twins_of_copies = deep_copies(runs)  # the same comparison, through pickle instead
    for twin, opt in zip(twins_of_copies, copies, strict=True):
        twin.opt, twin.model = opt, opt.target
    assert twins_of_copies[0].plan is None
    originals = [state(run.model) for run in runs]
    update_both(twins_of_copies, 2)
    assert_twins_equal(*twins_of_copies)
    for run, before in zip(runs, originals, strict=True):
        assert_same_state(state(run.model), before)


@pytest.mark.parametrize("duplicate", [copy.copy, copy.deepcopy, pickle.dumps])
def test_a_momentum_plan_refuses_to_be_copied(duplicate):
    runs = warmed_twins(flat_link)
    with pytest.raises(TypeError, match="holds the addresses of its arrays"):
        duplicate(runs[0].plan.plan)
