"""``momentum_step`` on NumPy arrays: one LARS step with momentum against a float64 oracle.

:func:`conftest.momentum_oracle` is the specification written plainly in float64: the
weights ``W`` (the float32 master copy where there is one) and the scaled
gradient ``G = grad_scale * g`` give the rate, then ``v <- momentum * v - lr *
rate * (G + weight_decay * W)`` and ``W <- W + v``, every written array rounded
once from the float64 result. The engine sums the norms in another order and
may fuse multiply-adds, hence :func:`assert_written`'s few ulps; where the
specification fixes the bits (the thread count, a pair alone or among others,
the rate of ``trust_ratio``, a single rounding), the tests compare bits.
"""

import math

import numba
import numpy as np
import pytest
from conftest import momentum_oracle
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from test_api import DTYPES, Laid

import lars_numba
from lars_numba import tunables


def assert_written(result, expected, dtype, terms=0.0):
    """``result`` is the float64 ``expected`` rounded once to ``dtype``, to a few ulps.

    The tolerance of ``conftest.assert_matches_oracle`` (2 ulps of ``dtype``,
    1e-12 for float64), plus 1e-12 of ``terms``, the magnitudes ``expected``
    was summed from: where they cancel (``w + v`` near 0), a relative error of
    the rate of 1e-15 is no longer small beside ``expected`` itself. NaN and
    Inf must be where the oracle has them.
    """
    info = np.finfo(dtype)
    assert np.asarray(result).dtype == np.dtype(dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        want = np.asarray(expected, np.float64).astype(dtype).astype(np.float64)
    got = np.asarray(result, np.float64)
    assert got.shape == want.shape
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg="NaN elements")
    finite = np.isfinite(want)
    np.testing.assert_array_equal(got[~finite], want[~finite], err_msg="Inf elements")
    with np.errstate(invalid="ignore", over="ignore"):
        tolerance = (
            max(2 * float(info.eps), 1e-12) * np.abs(want)
            + 1e-12 * np.broadcast_to(np.asarray(terms, np.float64), want.shape)
            + float(info.smallest_subnormal)
        )
        wrong = finite & ~(np.abs(got - want) <= tolerance)
    if wrong.any():
        where = np.argwhere(wrong)[:5] if want.ndim else [()]
        details = [(tuple(i), got[tuple(i)], want[tuple(i)]) for i in where]
        raise AssertionError(f"{wrong.sum()} elements differ (index, got, want): {details}")


def assert_masters_rounding(w, master):
    """The weights of a master are the master as stored, rounded to their dtype (as
    Chainer's ``use_fp32_update`` copies a float16 parameter's), bit for bit."""
    np.testing.assert_array_equal(w, master.astype(w.dtype), strict=True)


# -- pairs of arrays ----------------------------------------------------------------


class Step:
    """The arrays of one pair: weights, gradient, velocity and the master copy or None."""

    def __init__(self, w, g, v, master=None):
        self.w, self.g, self.v, self.master = w, g, v, master

    def copy(self):
        """A copy in the same layouts: the order of a sum may depend on the strides."""
        return Step(*(None if a is None else same_layout(a) for a in self.arrays()))

    def arrays(self):
        return self.w, self.g, self.v, self.master

    def tobytes(self):
        return tuple(None if a is None else a.tobytes() for a in self.arrays())


def same_layout(array):
    """A copy of ``array`` with its strides, in a buffer of its own."""
    if array.flags.c_contiguous or array.flags.f_contiguous:
        return array.copy(order="K")
    # A non-contiguous array has elements: its bytes span from its lowest to its highest.
    spans = [(n - 1) * stride for n, stride in zip(array.shape, array.strides, strict=True)]
    low = sum(min(0, span) for span in spans)
    buffer = np.zeros(sum(max(0, span) for span in spans) - low + array.itemsize, np.uint8)
    offset = -low
    copy = np.ndarray(array.shape, array.dtype, buffer, offset, array.strides)
    copy[...] = array
    return copy


def new_step(rng, shape, dtype, *, master=False, layout="C", magnitude=1.0):
    """A pair of ``shape`` in ``layout`` ("C", "F", "transposed", "strided"):
    weights of ``magnitude``, a gradient and a velocity about 1e-2 of it."""

    def laid(values, dtype):
        values = np.asarray(values, dtype)
        if layout == "F":
            return np.asfortranarray(values)
        if layout == "transposed":
            return np.ascontiguousarray(values.T).T
        if layout == "strided":  # every other element of a larger array
            base = np.full(tuple(2 * n for n in values.shape), 7, dtype)
            view = base[tuple(slice(None, None, 2) for _ in values.shape)]
            view[...] = values
            return view
        return values.copy()

    w64 = magnitude * rng.standard_normal(shape)
    v_dtype = np.float32 if master or dtype == np.float16 else dtype
    return Step(
        laid(w64, dtype),
        laid(1e-2 * magnitude * rng.standard_normal(shape), dtype),
        laid(1e-2 * magnitude * rng.standard_normal(shape), v_dtype),
        laid(w64, np.float32) if master else None,
    )


def run(steps, **keywords):
    """``momentum_step`` on the pairs ``steps``, masters passed only where one has one."""
    masters = [s.master for s in steps]
    if all(m is None for m in masters):
        masters = None
    return lars_numba.momentum_step(
        [s.w for s in steps],
        [s.g for s in steps],
        [s.v for s in steps],
        masters=masters,
        **keywords,
    )


def rule(keywords):
    """The oracle's keywords among ``momentum_step``'s."""
    names = (
        "lr momentum threshold weight_decay eps trust_coefficient denominator clip grad_scale"
    ).split()
    return {name: keywords[name] for name in names if name in keywords}


def assert_pair_stepped(before, after, rate, keywords, decays=True, adapts=True):
    """``after`` is ``before`` after one step of the oracle; ``rate`` its rate."""
    want_rate, v_new, w_new, v_terms, w_terms = momentum_oracle(
        before.w,
        before.g,
        before.v,
        master=before.master,
        decays=decays,
        adapts=adapts,
        **rule(keywords),
    )
    if rate is not None:
        assert rate == pytest.approx(want_rate, rel=1e-12, nan_ok=True)
    assert_written(after.v, v_new, after.v.dtype, v_terms)
    if before.master is None:
        assert_written(after.w, w_new, after.w.dtype, w_terms)
    else:
        assert_written(after.master, w_new, np.float32, w_terms)
        assert_masters_rounding(after.w, after.master)
    assert after.g.tobytes() == before.g.tobytes()  # never written


def assert_stepped(befores, afters, rates, keywords, decays=None, adapts=None):
    decays = decays or [True] * len(befores)
    adapts = adapts or [True] * len(befores)
    for i, (before, after) in enumerate(zip(befores, afters, strict=True)):
        rate = None if rates is None else rates[i]
        assert_pair_stepped(before, after, rate, keywords, decays[i], adapts[i])


# -- one step, against the oracle -------------------------------------------------------


@st.composite
def laid_steps(draw):
    """A pair of 0-d to 3-d arrays, each in its own layout, a master copy or not."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))
    magnitude = draw(st.sampled_from([1e-3, 1.0, 30.0]))
    master = draw(st.booleans())
    values = hnp.arrays(np.float64, shape, elements=st.floats(-1, 1, width=32))
    laids = []
    for kind in "wgvm":
        layout = draw(st.sampled_from(["C", "F", "transposed", "strided"]))
        flip_axis = draw(st.integers(0, max(len(shape) - 1, 0)))
        scale = magnitude if kind in "wm" else magnitude * draw(st.sampled_from([1e-2, 1.0]))
        array_dtype = {"w": dtype, "g": dtype, "m": np.float32}.get(
            kind, np.float32 if master or dtype == np.float16 else dtype
        )
        laids.append(Laid(np.asarray(draw(values) * scale, array_dtype), layout, flip_axis))
    if not master:
        laids[3] = None
    return laids


@st.composite
def step_keywords(draw):
    clip = draw(st.booleans())
    # lr <= 1 with clip: min(1 / lr, 1) is then 1, so the test does not
    # depend on whether a rate of 1 (||W|| <= threshold) is clipped too.
    lrs = [1e-3, 0.1, 1.0] if clip else [0.0, 1e-3, 0.1, 1.0, 2.5]
    return {
        "lr": draw(st.sampled_from(lrs)),
        "momentum": draw(st.sampled_from([0.0, 0.5, 0.9])),
        "threshold": draw(st.sampled_from([0.0, 1e-2, 1.0, 1e3])),
        "weight_decay": draw(st.sampled_from([0.0, 1e-4, 1e-2, 1.0])),
        "eps": draw(st.sampled_from([0.0, 1e-9, 1e-3])),
        "trust_coefficient": draw(st.sampled_from([1.0, 0.02, 1e-3])),
        "denominator": draw(st.sampled_from(["sum", "update"])),
        "clip": clip,
        "grad_scale": draw(st.sampled_from([1.0, 2.0**-10, 1 / 3, 8.0])),
        "skip_nonfinite": draw(st.booleans()),
        "parallel": draw(st.booleans()),
    }


# derandomize: the same examples every run, so that Numba compiles their
# signatures (dtypes, layouts, dimensions of three or four arrays) only once.
@settings(max_examples=80, deadline=None, derandomize=True)
@given(pairs=st.lists(laid_steps(), max_size=5), keywords=step_keywords(), data=st.data())
def test_one_step_matches_the_oracle_on_any_layout(pairs, keywords, data):
    steps = [Step(*(None if laid is None else laid.array for laid in pair)) for pair in pairs]
    n = len(steps)
    decays = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    adapts = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    outside = [[laid.outside() for laid in pair if laid is not None] for pair in pairs]
    befores = [s.copy() for s in steps]
    rates = np.full(n, -1.0)

    done = run(steps, **keywords, weight_decay_mask=decays, trust_ratio_mask=adapts, rates=rates)

    assert done is True
    assert_stepped(befores, steps, rates, keywords, decays, adapts)
    for pair, before in zip(pairs, outside, strict=True):  # nothing written outside a view
        after = [laid.outside() for laid in pair if laid is not None]
        for a, b in zip(after, before, strict=True):
            np.testing.assert_array_equal(a, b)


def mixed_steps(seed=0):
    """Pairs of every dtype, size and layout: several chunks, a batch of its own,
    0-d, zero-size, Fortran, transposed, strided, 3-d, float16 with and without a
    master copy."""
    rng = np.random.default_rng(seed)
    chunk = tunables.CPU_CHUNK
    return [
        new_step(rng, (3 * chunk + 11,), np.float32),
        new_step(rng, (5,), np.float64),
        new_step(rng, (2 * chunk + 3,), np.float16, master=True),
        new_step(rng, (), np.float32),
        new_step(rng, (0, 3), np.float16),
        new_step(rng, (tunables.CPU_BATCH_BYTES // 8 + 5,), np.float32),
        new_step(rng, (300, 250), np.float64, layout="F"),
        new_step(rng, (40, 3000), np.float16, layout="transposed"),
        new_step(rng, (6, 70, 400), np.float32, layout="strided"),
        new_step(rng, (chunk + 1,), np.float16),
        new_step(rng, (7, 9, 11), np.float16, master=True, layout="strided"),
        new_step(rng, (), np.float64),
        new_step(rng, (chunk,), np.float64),
        new_step(rng, (0,), np.float64),
        new_step(rng, (33,), np.float16, master=True, layout="F"),
    ]


MIXED_KEYWORDS = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "trust_coefficient": 0.02}


def test_mixed_pairs_give_the_same_bits_on_any_path_and_thread_count():
    steps = mixed_steps()
    befores = [s.copy() for s in steps]
    rates = np.full(len(steps), -1.0)

    assert run(steps, **MIXED_KEYWORDS, rates=rates) is True
    assert_stepped(befores, steps, rates, MIXED_KEYWORDS)
    expected = [s.tobytes() for s in steps]

    def again(**keywords):
        copies = [s.copy() for s in befores]
        again_rates = np.full(len(copies), -1.0)
        assert run(copies, **MIXED_KEYWORDS, rates=again_rates, **keywords) is True
        assert [s.tobytes() for s in copies] == expected
        assert again_rates.tobytes() == rates.tobytes()

    again(parallel=False)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        again()
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        again()
    finally:
        numba.set_num_threads(threads)
    # Each pair alone in a call.
    for i, before in enumerate(befores):
        alone = before.copy()
        rate = np.full(1, -1.0)
        assert run([alone], **MIXED_KEYWORDS, rates=rate) is True
        assert alone.tobytes() == expected[i], i
        assert rate[0] == rates[i], i


@pytest.mark.parametrize("denominator", ["sum", "update"])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-3])
def test_the_rate_is_the_bits_of_trust_ratio(denominator, weight_decay):
    rng = np.random.default_rng(1)
    hyper = {
        "threshold": 1e-2,
        "weight_decay": weight_decay,
        "eps": 1e-9,
        "trust_coefficient": 0.02,
        "denominator": denominator,
    }
    sizes = [(3 * tunables.CPU_CHUNK + 5,), (17,), (), (30, 40), (tunables.CPU_CHUNK,)]
    # Powers of two above 1: halving a float16 subnormal would lose its last bit.
    for grad_scale in [1.0, 2.0**7, 4.0]:
        steps = [new_step(rng, size, DTYPES[i % 3]) for i, size in enumerate(sizes)]
        steps.append(new_step(rng, (25, 4), np.float32, layout="strided"))
        # trust_ratio on the gradient the step scales: exact, grad_scale a power of two.
        want = [
            lars_numba.trust_ratio(s.w, np.asarray(s.g * s.g.dtype.type(grad_scale)), **hyper)
            for s in steps
        ]
        befores = [s.copy() for s in steps]
        rates = np.full(len(steps), -1.0)
        keywords = {**hyper, "lr": 0.1, "grad_scale": grad_scale}
        assert run(steps, **keywords, rates=rates) is True
        assert rates.tolist() == want, grad_scale
        assert_stepped(befores, steps, rates, keywords)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("denominator", ["sum", "update"])
def test_a_grad_scale_of_one_third_scales_the_gradient_in_float64(dtype, denominator):
    rng = np.random.default_rng(2)
    steps = [new_step(rng, (1000,), dtype), new_step(rng, (2 * tunables.CPU_CHUNK + 1,), dtype)]
    if dtype == np.float16:
        steps.append(new_step(rng, (50,), dtype, master=True))
    befores = [s.copy() for s in steps]
    rates = np.empty(len(steps))
    keywords = {"lr": 0.05, "grad_scale": 1 / 3, "weight_decay": 1e-3, "denominator": denominator}
    assert run(steps, **keywords, rates=rates) is True
    assert_stepped(befores, steps, rates, keywords)
    # The rate is not that of the unscaled gradient.
    assert rates[0] != pytest.approx(lars_numba.trust_ratio(befores[0].w, befores[0].g), rel=1e-3)


# -- the rate's cases -------------------------------------------------------------------


def small_step(w, g, v=None, dtype=np.float64):
    """A pair of the given values, the velocity float32 for float16 weights."""
    w = np.asarray(w, dtype)
    v_dtype = np.float32 if dtype == np.float16 else dtype
    return Step(
        w, np.asarray(g, dtype), np.zeros(w.shape, v_dtype) if v is None else np.asarray(v, v_dtype)
    )


@pytest.mark.parametrize("lr", [0.05, 0.5, 4.0])
def test_clip_divides_the_rate_by_lr_and_caps_it_at_1(lr):
    # Rates of 0.02 * ||w|| / ||g|| = 2 / f: about 0.1, 1 and 10 before the clip.
    steps = [small_step(np.full(4, 1.0), np.full(4, 1e-2 * f)) for f in (20.0, 2.0, 0.2)]
    befores = [s.copy() for s in steps]
    rates = np.empty(3)
    hyper = {"trust_coefficient": 0.02, "eps": 0.0, "weight_decay": 1e-5}
    keywords = {**hyper, "lr": lr, "clip": True, "momentum": 0.5}
    assert run(steps, **keywords, rates=rates) is True
    for rate, before in zip(rates, befores, strict=True):
        unclipped = lars_numba.trust_ratio(before.w, before.g, **hyper)
        assert rate == pytest.approx(min(unclipped / lr, 1.0), rel=1e-14)
        assert rate == lars_numba.trust_ratio(before.w, before.g, **hyper, clip_lr=lr)
    assert_stepped(befores, steps, rates, keywords)


def test_clip_at_a_learning_rate_of_0_gives_rate_1_and_a_step_of_the_momentum_alone():
    # min(rate / lr, 1) tends to 1 as lr falls to 0, as at the start of a warm-up.
    steps = [small_step([3.0, 4.0], [0.6, 0.8], v=[0.5, -0.25])]
    rates = np.empty(1)
    assert run(steps, lr=0.0, clip=True, momentum=0.5, rates=rates) is True
    assert rates[0] == 1.0
    np.testing.assert_array_equal(steps[0].v, [0.25, -0.125])
    np.testing.assert_array_equal(steps[0].w, [3.25, 3.875])


def test_a_nan_rate_stays_nan_when_clipped():
    steps = [small_step([1.0, 1.0], [0.5, np.nan]), small_step([1.0, 1.0], [0.5, 0.5])]
    rates = np.empty(2)
    assert run(steps, lr=0.1, clip=True, rates=rates) is True
    assert math.isnan(rates[0])
    assert np.isnan(steps[0].w).all() and np.isnan(steps[0].v).all()
    assert rates[1] == 1.0  # 1.414 / 0.707 = 2, over lr, capped


def test_the_masks_give_no_weight_decay_and_rate_1():
    rng = np.random.default_rng(3)
    masks = [(True, True), (True, False), (False, True), (False, False)]
    steps = [new_step(rng, (200,), np.float32) for _ in masks]
    steps.append(new_step(rng, (2 * tunables.CPU_CHUNK,), np.float16, master=True))
    masks.append((False, True))
    befores = [s.copy() for s in steps]
    decays, adapts = [m[0] for m in masks], [m[1] for m in masks]
    rates = np.empty(len(steps))
    keywords = {"lr": 0.1, "weight_decay": 0.1, "trust_coefficient": 0.02}
    assert (
        run(steps, **keywords, weight_decay_mask=decays, trust_ratio_mask=adapts, rates=rates)
        is True
    )
    assert_stepped(befores, steps, rates, keywords, decays, adapts)
    assert rates[1] == rates[3] == 1.0
    hyper = {"trust_coefficient": 0.02}
    assert rates[0] == lars_numba.trust_ratio(befores[0].w, befores[0].g, **hyper, weight_decay=0.1)
    assert rates[2] == lars_numba.trust_ratio(befores[2].w, befores[2].g, **hyper)
    assert rates[0] != rates[2]
    # Outside both masks: the plain momentum step.
    g, v, w = (a.astype(np.float64) for a in (befores[3].g, befores[3].v, befores[3].w))
    np.testing.assert_allclose(steps[3].w, (w + (0.9 * v - 0.1 * g)).astype(np.float32))


def test_weights_at_or_below_the_threshold_keep_rate_1():
    w = [3.0, 4.0]  # ||w|| == 5 exactly
    for dtype in DTYPES:
        steps = [small_step(w, [1.0, 2.0], dtype=dtype) for _ in range(3)]
        rates = np.empty(1)
        run(steps[:1], lr=1.0, momentum=0.0, threshold=5.0, weight_decay=0.5, rates=rates)
        assert rates[0] == 1.0
        # v = -(g + 0.5 w) = [-2.5, -4]; w + v = [0.5, 0]
        np.testing.assert_array_equal(steps[0].v, np.array([-2.5, -4.0], dtype))
        np.testing.assert_array_equal(steps[0].w, np.array([0.5, 0.0], dtype))
        run(steps[1:2], lr=1.0, threshold=float(np.nextafter(5.0, 0)), rates=rates)
        assert rates[0] != 1.0
        run(steps[2:], lr=1.0, threshold=1e3, trust_coefficient=0.5, rates=rates)
        assert rates[0] == 1.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_gradients(dtype):
    w, v = [3.0, 4.0], [0.25, -0.5]
    sums = [small_step(w, [0.0, 0.0], v, dtype) for _ in range(2)]
    befores = [s.copy() for s in sums]
    rates = np.empty(2)
    keywords = {"lr": 0.1, "momentum": 0.5, "eps": 0.0, "denominator": "sum"}
    masks = [True, False]
    run(sums, **keywords, weight_decay_mask=masks, weight_decay=0.5, rates=rates)
    assert rates.tolist() == [5.0 / (0.5 * 5.0), math.inf]  # ||w|| / (eps + wd ||w||)
    assert_stepped(befores, sums, rates, {**keywords, "weight_decay": 0.5}, decays=masks)
    # rate 2: v = 0.5 v - 0.1 * 2 * 0.5 w; rate inf times a zero step: NaN
    assert_written(sums[0].v, [-0.175, -0.65], sums[0].v.dtype)
    assert_written(sums[0].w, [3 - 0.175, 4 - 0.65], dtype)
    assert np.isnan(sums[1].v).all() and np.isnan(sums[1].w).all()
    updates = [small_step(w, [0.0, 0.0], v, dtype)]
    before = updates[0].copy()
    keywords = {"lr": 0.1, "momentum": 0.5, "denominator": "update"}
    run(updates, **keywords, rates=rates[:1])
    assert rates[0] == 1.0  # ||g + wd w|| == 0
    np.testing.assert_array_equal(updates[0].v, np.array([0.125, -0.25], dtype))
    assert_pair_stepped(before, updates[0], rates[0], keywords)


def test_zero_size_and_0_d_pairs():
    steps = [
        small_step(np.empty((2, 0, 1)), np.empty((2, 0, 1))),
        small_step(np.float32(2.0), np.float32(0.5), np.float32(0.25), dtype=np.float32),
        small_step(np.empty(0), np.empty(0), dtype=np.float16),
        Step(
            np.ones((), np.float16),
            np.ones((), np.float16),
            np.zeros((), np.float32),
            np.full((), 1.5, np.float32),
        ),
    ]
    befores = [s.copy() for s in steps]
    rates = np.full(4, -1.0)
    assert run(steps, lr=0.5, momentum=0.5, eps=0.0, rates=rates) is True
    assert rates.tolist() == [1.0, 2.0 / 0.5, 1.0, 1.5 / 1.0]
    assert steps[1].v.shape == () and steps[1].v == np.float32(0.125 - 0.5 * 4.0 * 0.5)
    assert steps[3].master == np.float32(1.5 - 0.5 * 1.5) and steps[3].w == np.float16(0.75)
    assert_stepped(befores, steps, rates, {"lr": 0.5, "momentum": 0.5, "eps": 0.0})
    assert lars_numba.momentum_step([], [], [], lr=0.1, rates=np.empty(0)) is True
    assert lars_numba.momentum_step([], [], [], lr=0.1, skip_nonfinite=True) is True


# -- masters --------------------------------------------------------------------------


def test_float16_weights_are_the_masters_rounding_as_chainer_copies_them():
    # w_new = 1 + 2**-11 + 2**-40: float32 rounds it to 1 + 2**-11, half-way
    # between two float16s, which the master's rounding takes to 1 (to even),
    # as Chainer's use_fp32_update does; rounded once from float64, float16
    # would give 1 + 2**-10, a weight that is not its master's rounding.
    lr = 2.0**-11 + 2.0**-40
    step = Step(
        np.ones(3, np.float16),
        np.full(3, -1.0, np.float16),
        np.zeros(3, np.float32),
        np.ones(3, np.float32),
    )
    assert run([step], lr=lr, momentum=0.0, trust_ratio_mask=[False]) is True
    np.testing.assert_array_equal(step.master, np.float32(1 + 2.0**-11))
    np.testing.assert_array_equal(step.w, np.float16(1))
    np.testing.assert_array_equal(step.v, np.float32(lr))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_the_weights_add_the_float64_velocity_not_its_rounding(dtype):
    # v_new = 2**-24 + 2**-50 rounds to 2**-24 in float32; 1 + 2**-24 is half-way
    # between two float32s (to even: 1), 1 + v_new in float64 rounds up.
    lr = 2.0**-24 + 2.0**-50
    w32 = np.ones(2, np.float32)
    step = Step(
        w32 if dtype == np.float32 else np.ones(2, np.float16),
        np.full(2, -1.0, dtype),
        np.zeros(2, np.float32),
        None if dtype == np.float32 else w32,
    )
    assert run([step], lr=lr, momentum=0.0, trust_ratio_mask=[False]) is True
    np.testing.assert_array_equal(w32, np.float32(1 + 2.0**-23))
    np.testing.assert_array_equal(step.v, np.float32(2.0**-24))


@pytest.mark.parametrize("dtype", DTYPES)
def test_masters_of_any_weights_dtype_and_pairs_without_one(dtype):
    rng = np.random.default_rng(4)
    steps = [
        new_step(rng, (300,), dtype, master=True),
        new_step(rng, (20, 30), np.float16),
        new_step(rng, (tunables.CPU_CHUNK + 9,), dtype, master=True, layout="strided"),
        new_step(rng, (40,), np.float32),
    ]
    for s in steps:  # masters that differ from their weights: W is the master's
        if s.master is not None:
            s.master += np.float32(0.125)
    befores = [s.copy() for s in steps]
    rates = np.empty(4)
    keywords = {"lr": 0.2, "weight_decay": 1e-2, "grad_scale": 0.5}
    assert run(steps, **keywords, rates=rates) is True
    assert_stepped(befores, steps, rates, keywords)
    for i in (0, 2):  # the rate of the master's norm, in a dtype that holds both
        common = np.promote_types(np.float32, dtype)
        w, g = befores[i].master.astype(common), befores[i].g.astype(common) * common.type(0.5)
        assert rates[i] == pytest.approx(lars_numba.trust_ratio(w, g, weight_decay=1e-2), rel=1e-12)


# -- non-finite gradients ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("denominator", ["sum", "update"])
@pytest.mark.parametrize("threshold", [1e-2, 1e3])
def test_nan_and_inf_gradients_propagate_as_the_formulas_say(dtype, value, denominator, threshold):
    rng = np.random.default_rng(5)
    steps = [new_step(rng, (50,), dtype), new_step(rng, (30,), dtype)]
    if dtype == np.float16:
        steps.append(new_step(rng, (20,), dtype, master=True))
        steps[2].g[3] = value
    steps[0].g[7] = value
    befores = [s.copy() for s in steps]
    rates = np.empty(len(steps))
    keywords = {"lr": 0.1, "weight_decay": 1e-2, "denominator": denominator}
    keywords["threshold"] = threshold
    assert run(steps, **keywords, rates=rates) is True
    assert_stepped(befores, steps, rates, keywords)
    assert np.isfinite(steps[1].w).all()
    assert not np.isfinite(steps[0].v[7])


def nonfinite_cases():
    yield "NaN", lambda steps: steps[0].g.flat.__setitem__(3, np.nan)
    yield "+Inf", lambda steps: steps[1].g.__setitem__((2, 5), np.inf)
    yield "-Inf", lambda steps: steps[2].g.__setitem__(-1, -np.inf)
    yield "last of a large pair", lambda steps: steps[3].g.__setitem__(-1, np.nan)
    yield "in a strided view", lambda steps: steps[4].g.__setitem__((1, 0, 2), np.inf)
    yield "in a masked pair", lambda steps: steps[5].g.__setitem__(0, np.nan)
    yield "in a float16 pair with a master", lambda steps: steps[6].g.__setitem__(4, -np.inf)
    yield "0-d", lambda steps: steps[7].g.__setitem__((), np.nan)


def skip_steps():
    rng = np.random.default_rng(6)
    return [
        new_step(rng, (40,), np.float32),
        new_step(rng, (6, 7), np.float64, layout="F"),
        new_step(rng, (9,), np.float16),
        new_step(rng, (3 * tunables.CPU_CHUNK + 1,), np.float32),
        new_step(rng, (3, 4, 5), np.float64, layout="strided"),
        new_step(rng, (5,), np.float32),
        new_step(rng, (2 * tunables.CPU_CHUNK,), np.float16, master=True),
        new_step(rng, (), np.float16),
    ]


SKIP_MASKS = {
    "weight_decay_mask": [True] * 5 + [False] * 3,
    "trust_ratio_mask": [True] * 5 + [False] * 3,
}


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize(
    ("case", "spoil"), list(nonfinite_cases()), ids=[c for c, _ in nonfinite_cases()]
)
def test_skip_nonfinite_writes_nothing_when_a_gradient_is_not_finite(case, spoil, parallel):
    steps = skip_steps()
    spoil(steps)
    before = [s.tobytes() for s in steps]
    rates = np.full(len(steps), -1.0)
    done = run(
        steps,
        lr=0.1,
        weight_decay=1e-3,
        skip_nonfinite=True,
        rates=rates,
        parallel=parallel,
        **SKIP_MASKS,
    )
    assert done is False
    assert [s.tobytes() for s in steps] == before
    assert rates.tolist() == [-1.0] * len(steps)


def test_skip_nonfinite_on_finite_gradients_steps_as_without_it():
    steps, same = skip_steps(), skip_steps()
    befores = [s.copy() for s in steps]
    # Outside the strided view, not the gradient's.
    steps[4].g.base[0, 1, 0] = np.nan
    same[4].g.base[0, 1, 0] = np.nan
    rates, same_rates = np.empty(len(steps)), np.empty(len(steps))
    keywords = {"lr": 0.1, "weight_decay": 1e-3}
    assert run(steps, **keywords, skip_nonfinite=True, rates=rates, **SKIP_MASKS) is True
    assert run(same, **keywords, rates=same_rates, **SKIP_MASKS) is True
    assert [s.tobytes() for s in steps] == [s.tobytes() for s in same]
    assert rates.tobytes() == same_rates.tobytes()
    masks = SKIP_MASKS["weight_decay_mask"], SKIP_MASKS["trust_ratio_mask"]
    assert_stepped(befores, steps, rates, keywords, *masks)


def test_skip_nonfinite_looks_at_the_gradients_only():
    steps = [small_step([1.0, np.nan], [0.5, 0.5]), small_step([1.0, 2.0], [0.5, 0.5])]
    assert run(steps, lr=0.1, skip_nonfinite=True) is True
    # ||W|| is NaN, not above the threshold: rate 1, the NaN stays in its element.
    assert np.isnan(steps[0].w).tolist() == [False, True]
    assert np.isfinite(steps[1].w).all()


def test_skip_nonfinite_takes_a_step_on_a_huge_gradient_that_its_scale_brings_down():
    """The check sees the scaled gradient: 1e200 times 1e-190 is finite, and so is
    its square."""
    steps = [small_step([1.0, 2.0], [1e200, 0.5]), small_step([1.0, 2.0], [0.5, 0.5])]
    befores = [s.copy() for s in steps]
    rates = np.empty(2)
    keywords = {"lr": 1e-3, "threshold": 1e3, "grad_scale": 1e-190}
    assert run(steps, **keywords, skip_nonfinite=True, rates=rates) is True
    assert_stepped(befores, steps, rates, keywords)
    assert np.isfinite(steps[0].w).all()


def test_skip_nonfinite_counts_a_gradient_whose_square_overflows_as_not_finite():
    """As documented: the check is the norms' pass's sum of squares, so a float64
    gradient beyond 1e154 skips the step (its rate would be 0 from an infinite
    norm); nothing is written."""
    steps = [small_step([1.0, 2.0], [1e160, 0.5]), small_step([1.0, 2.0], [0.5, 0.5])]
    befores = [s.copy() for s in steps]
    rates = np.full(2, 7.0)
    keywords = {"lr": 1e-3, "threshold": 1e3}
    assert run(steps, **keywords, skip_nonfinite=True, rates=rates) is False
    for before, after in zip(befores, steps, strict=True):
        np.testing.assert_array_equal(after.w, before.w)
        np.testing.assert_array_equal(after.v, before.v)
    np.testing.assert_array_equal(rates, [7.0, 7.0])


# -- a short run -------------------------------------------------------------------------


STEPS = 8


@pytest.mark.parametrize(
    ("dtype", "master"),
    [(np.float64, False), (np.float32, False), (np.float16, False), (np.float16, True)],
    ids=["float64", "float32", "float16", "float16 with float32 master"],
)
def test_a_short_run_follows_the_oracle_iterated_from_the_same_start(dtype, master):
    """Gradients of ``||W - target||^2 / 2``, times a loss scale that ``grad_scale``
    undoes; the oracle keeps its own state, rounded to the arrays' dtypes as
    the arrays are."""
    rng = np.random.default_rng(7)
    shapes = [(30, 40), (40,), (2 * tunables.CPU_CHUNK + 5,)]
    layouts = ["F", "C", "C"]
    steps = [
        new_step(rng, shape, dtype, master=master, layout=layout)
        for shape, layout in zip(shapes, layouts, strict=True)
    ]
    for s in steps:
        s.v[...] = 0
    targets = [rng.standard_normal(shape) for shape in shapes]
    starts = [(s.w if s.master is None else s.master).astype(np.float64) for s in steps]
    masks = {"weight_decay_mask": [True, False, True], "trust_ratio_mask": [True, False, True]}
    keywords = {
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "trust_coefficient": 0.02,
        "grad_scale": 2.0**-8,
    }
    oracle = [s.copy() for s in steps]
    for _ in range(STEPS):
        for s, ours, target in zip(steps, oracle, targets, strict=True):
            for state in (s, ours):
                W = state.w if state.master is None else state.master
                state.g[...] = 2.0**8 * (W.astype(np.float64) - target)
        rates = np.empty(len(steps))
        assert run(steps, **keywords, **masks, rates=rates) is True
        for i, ours in enumerate(oracle):
            rate, v_new, w_new, v_terms, w_terms = momentum_oracle(
                ours.w,
                ours.g,
                ours.v,
                master=ours.master,
                decays=masks["weight_decay_mask"][i],
                adapts=masks["trust_ratio_mask"][i],
                **keywords,
            )
            assert rates[i] == pytest.approx(rate, rel=1e-12)
            assert_written(steps[i].v, v_new, steps[i].v.dtype, v_terms)
            if ours.master is None:
                assert_written(steps[i].w, w_new, dtype, w_terms)
            else:
                assert_written(steps[i].master, w_new, np.float32, w_terms)
                assert_masters_rounding(steps[i].w, steps[i].master)
                ours.master[...] = w_new
            ours.v[...], ours.w[...] = v_new, w_new
    for s, target, start in zip(steps, targets, starts, strict=True):  # it trained
        W = (s.w if s.master is None else s.master).astype(np.float64)
        assert np.linalg.norm(W - target) < 0.99 * np.linalg.norm(start - target)


# -- inputs: accepted and refused -------------------------------------------------------------


def test_a_read_only_gradient_is_accepted():
    rng = np.random.default_rng(8)
    steps = [new_step(rng, (100,), np.float32), new_step(rng, (10,), np.float16, master=True)]
    for s in steps:
        s.g.flags.writeable = False
    befores = [s.copy() for s in steps]
    assert run(steps, lr=0.1) is True
    assert_stepped(befores, steps, None, {"lr": 0.1})


def fresh():
    """The arguments of a valid call on four pairs: float32, float16 with a master,
    float64, float32."""
    return {
        "ws": [
            np.linspace(1, 2, 6, dtype=np.float32),
            np.ones(3, np.float16),
            np.full((2, 2), 3.0),
            np.full(3, 0.5, np.float32),
        ],
        "gs": [
            np.linspace(-1, 1, 6, dtype=np.float32),
            np.full(3, 0.5, np.float16),
            np.full((2, 2), 0.25),
            np.ones(3, np.float32),
        ],
        "vs": [
            np.full(6, 0.1, np.float32),
            np.full(3, 0.2, np.float32),
            np.full((2, 2), 0.3),
            np.full(3, 0.4, np.float32),
        ],
        "masters": [None, np.ones(3, np.float32), None, None],
        "rates": np.full(4, -1.0),
        "lr": 0.1,
    }


def _set(key, index, value):
    def change(args):
        args[key][index] = value(args) if callable(value) else value

    return change


def _keyword(**values):
    def change(args):
        args.update(values)

    return change


BAD_INPUTS = [
    # -- kinds and dtypes
    (_set("vs", 0, np.zeros(6)), TypeError, r"vs\[0\]"),
    (_set("vs", 1, np.zeros(3, np.float16)), TypeError, r"vs\[1\]"),
    (_set("vs", 2, np.zeros((2, 2), np.float32)), TypeError, r"vs\[2\]"),
    (_set("vs", 3, [0.0, 0.0, 0.0]), TypeError, r"vs\[3\]"),
    (_set("ws", 3, [0.0, 0.0, 0.0]), TypeError, r"ws\[3\]"),
    (_set("gs", 2, [[0.0, 0.0], [0.0, 0.0]]), TypeError, r"gs\[2\]"),
    (_set("ws", 3, np.ones(3, np.int32)), TypeError, r"ws\[3\]"),
    (_set("gs", 1, np.ones(3, np.float32)), TypeError, r"gs\[1\]"),
    (_set("masters", 1, np.ones(3)), TypeError, r"masters\[1\]"),
    (_set("masters", 1, np.ones(3, np.float16)), TypeError, r"masters\[1\]"),
    (_set("masters", 1, [1.0, 1.0, 1.0]), TypeError, r"masters\[1\]"),
    # a master makes vs[i] float32, whatever ws[i]
    (_set("masters", 2, np.ones((2, 2), np.float32)), TypeError, r"vs\[2\]"),
    (_keyword(masters=3), TypeError, "masters"),
    (_keyword(ws=np.ones((4, 3))), TypeError, "ws"),
    (_keyword(rates=np.zeros(4, np.float32)), TypeError, "rates"),
    (_keyword(lr="0.1"), TypeError, "lr"),
    # -- shapes
    (
        _set("vs", 1, np.zeros(4, np.float32)),
        ValueError,
        r"vs\[1\] must have the shape of ws\[1\], \(3,\); got \(4,\)",
    ),
    (_set("gs", 2, np.zeros(4)), ValueError, r"gs\[2\]"),
    (_set("masters", 1, np.ones((3, 1), np.float32)), ValueError, r"masters\[1\]"),
    (lambda args: args["vs"].pop(), ValueError, "vs"),
    (lambda args: args["gs"].pop(), ValueError, "gs"),
    (lambda args: args["masters"].pop(), ValueError, "masters"),
    (_keyword(rates=np.zeros(3)), ValueError, "rates"),
    (_keyword(weight_decay_mask=[True, False]), ValueError, "weight_decay_mask"),
    (_keyword(trust_ratio_mask=[True] * 5), ValueError, "trust_ratio_mask"),
    # -- values
    (_keyword(lr=-0.1), ValueError, "lr"),
    (_keyword(lr=math.nan), ValueError, "lr"),
    (_keyword(lr=math.inf), ValueError, "lr"),
    (_keyword(momentum=-0.5), ValueError, "momentum"),
    (_keyword(momentum=math.nan), ValueError, "momentum"),
    (_keyword(momentum=math.inf), ValueError, "momentum"),
    (_keyword(grad_scale=0.0), ValueError, "grad_scale"),
    (_keyword(grad_scale=-1.0), ValueError, "grad_scale"),
    (_keyword(grad_scale=math.nan), ValueError, "grad_scale"),
    (_keyword(grad_scale=math.inf), ValueError, "grad_scale"),
    (_keyword(threshold=-1.0), ValueError, "threshold"),
    (_keyword(weight_decay=math.nan), ValueError, "weight_decay"),
    (_keyword(eps=-1e-9), ValueError, "eps"),
    (_keyword(eps=math.inf), ValueError, "eps"),
    (_keyword(trust_coefficient=-1.0), ValueError, "trust_coefficient"),
    (_keyword(trust_coefficient=math.inf), ValueError, "trust_coefficient"),
    (_keyword(denominator="norm"), ValueError, "denominator"),
    # -- read-only written arrays
    (_set("ws", 1, lambda a: read_only(a["ws"][1])), ValueError, r"ws\[1\] must be writeable"),
    (_set("vs", 2, lambda a: read_only(a["vs"][2])), ValueError, r"vs\[2\] must be writeable"),
    (
        _set("masters", 1, lambda a: read_only(a["masters"][1])),
        ValueError,
        r"masters\[1\] must be writeable",
    ),
    (lambda a: a.update(rates=read_only(a["rates"])), ValueError, "rates must be writeable"),
    # -- overlaps of a written array with any other
    (_set("gs", 0, lambda a: a["ws"][0]), ValueError, "overlap"),
    (_set("vs", 0, lambda a: a["ws"][0]), ValueError, "overlap"),
    (_set("vs", 0, lambda a: a["gs"][0][::-1]), ValueError, "overlap"),
    (_set("ws", 3, lambda a: a["ws"][0][:3]), ValueError, "overlap"),
    (_set("gs", 3, lambda a: a["vs"][0][1:4]), ValueError, "overlap"),
    (_set("masters", 1, lambda a: a["vs"][1]), ValueError, "overlap"),
    (_set("masters", 1, lambda a: a["gs"][0][2:5]), ValueError, "overlap"),
    (_set("masters", 1, lambda a: a["vs"][3]), ValueError, "overlap"),
    (lambda a: a.update(rates=a["vs"][2].reshape(-1)), ValueError, "overlap"),
    (lambda a: masters_on_weights(a), ValueError, "overlap"),
    (lambda a: weights_on_rates(a), ValueError, "overlap"),
]


def read_only(array):
    array = array.copy()
    array.flags.writeable = False
    return array


def masters_on_weights(args):
    """masters[1] on the bytes of ws[1] (float16) and beyond."""
    storage = np.zeros(6, np.float16)
    args["ws"][1] = storage[:3]
    args["masters"][1] = storage.view(np.float32)


def weights_on_rates(args):
    storage = np.zeros(8)
    args["ws"][2] = storage[:4].reshape(2, 2)
    args["rates"] = storage[3:7]


def _arrays(args):
    found = []
    for key in ("ws", "gs", "vs", "masters"):
        value = args.get(key)
        if isinstance(value, list):
            found += [a for a in value if isinstance(a, np.ndarray)]
    if isinstance(args.get("rates"), np.ndarray):
        found.append(args["rates"])
    return found


@pytest.mark.parametrize(("change", "error", "message"), BAD_INPUTS)
def test_bad_input_raises_naming_the_argument_and_writes_nothing(change, error, message):
    args = fresh()
    change(args)
    arrays = _arrays(args)
    before = [a.copy() for a in arrays]
    with pytest.raises(error, match=message):
        lars_numba.momentum_step(args.pop("ws"), args.pop("gs"), args.pop("vs"), **args)
    for array, copy in zip(arrays, before, strict=True):
        np.testing.assert_array_equal(array, copy)


def test_the_mask_dtypes_are_checked():
    for name in ("weight_decay_mask", "trust_ratio_mask"):
        args = fresh()
        arrays = _arrays(args)
        before = [a.copy() for a in arrays]
        with pytest.raises((TypeError, ValueError), match=name):
            lars_numba.momentum_step(
                args.pop("ws"), args.pop("gs"), args.pop("vs"), **args, **{name: [1, 0, 1, 1]}
            )
        for array, copy in zip(arrays, before, strict=True):
            np.testing.assert_array_equal(array, copy)


def test_the_valid_call_of_the_bad_input_cases_steps():
    """``fresh`` itself is accepted: the refusals above are the changes'."""
    args = fresh()
    steps = [
        Step(*a) for a in zip(args["ws"], args["gs"], args["vs"], args["masters"], strict=True)
    ]
    befores = [s.copy() for s in steps]
    assert run(steps, lr=0.1, rates=args["rates"]) is True
    assert_stepped(befores, steps, args["rates"], {"lr": 0.1})


def test_numpy_and_cuda_arrays_together_are_refused():
    # CUDA arrays alone take the GPU engine (tests/test_cuda_momentum.py).
    from numba import cuda

    w, v = np.ones(4, np.float32), np.ones(4, np.float32)
    g = cuda.to_device(np.ones(4, np.float32))
    with pytest.raises(TypeError, match=r"ws\[0\] on the CPU and gs\[0\] on the GPU"):
        lars_numba.momentum_step([w], [g], [v], lr=0.1)
    np.testing.assert_array_equal(w, np.ones(4, np.float32))


@pytest.mark.parametrize("retyped", ["unpickled", "dtype with metadata"])
def test_arrays_of_a_float_dtype_other_than_numpys_own_object_step_alike(retyped):
    """An unpickled array's dtype equals float32 but is another object than NumPy's
    own: its arrays step as any others (once refused, as of a dtype unlike ws')."""
    import pickle

    def other_object(array):
        if retyped == "unpickled":
            return pickle.loads(pickle.dumps(array))
        return array.view(np.dtype(array.dtype.str, metadata={"note": "ours"}))

    rng = np.random.default_rng(5)
    shapes_dtypes = [((3, 4), np.float32, False), ((7,), np.float16, True), ((), np.float64, False)]
    steps = [new_step(rng, shape, dtype, master=m) for shape, dtype, m in shapes_dtypes]
    others = [
        Step(*(None if a is None else other_object(a) for a in step.arrays())) for step in steps
    ]
    assert all(o.w.dtype is not s.w.dtype for o, s in zip(others, steps, strict=True))
    assert run(steps, lr=0.1, weight_decay=1e-2) is True
    assert run(others, lr=0.1, weight_decay=1e-2) is True
    for step, other in zip(steps, others, strict=True):
        for array, retyped_array in zip(step.arrays(), other.arrays(), strict=True):
            if array is not None:
                np.testing.assert_array_equal(retyped_array.view(array.dtype), array)
