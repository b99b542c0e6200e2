"""``momentum_step`` on CUDA arrays against the float64 oracle of ``test_momentum``.

Runs on Numba's CUDA simulator when there is no GPU (see conftest.py) and
unchanged on a GPU: every dtype and layout, masters, masks, several groups
of pairs, the skip decided on the device, the launches, and the refusals.
"""

import math

import numpy as np
import pytest
from numba import cuda
from test_cuda import StreamLog, set_grid, spy_on_kernels
from test_momentum import Step, assert_stepped, new_step

import lars_numba
from lars_numba import tunables
from lars_numba._shapes import RESNET50_SHAPES

pytestmark = pytest.mark.filterwarnings("ignore:Grid size .* under-utilization")

KEYWORDS = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3, "trust_coefficient": 0.5}


@pytest.fixture(autouse=True)
def small_grid(monkeypatch):
    set_grid(monkeypatch, threads=4, min_blocks=1, max_blocks=3)
    monkeypatch.setattr(tunables, "GPU_CHUNK", 16)


#: name: how a host array reaches the kernels as a device array. Numba's device
#: arrays take no negative steps and are copied contiguous, so the strided
#: view is taken on the device, of a parent twice as long on each axis.
DEVICE_LAYOUTS = {
    "C": lambda a: cuda.to_device(np.array(a, order="C")),
    "F": lambda a: cuda.to_device(np.array(a, order="F")),
    "strided": lambda a: strided_on_device(a),
    "offset": lambda a: offset_on_device(a),
}


def offset_on_device(array):
    """``array`` on the device as a contiguous view that starts past its parent's
    first element: a group's address table holds the view's own address."""
    parent = cuda.to_device(np.concatenate([np.zeros(3, array.dtype), array.ravel()]))
    return parent[3:].reshape(array.shape)


def strided_on_device(array):
    if array.ndim == 0:  # no axis to stride along
        return cuda.to_device(array.copy())
    parent = np.zeros(tuple(2 * n for n in array.shape), array.dtype)
    every_other = tuple(slice(None, None, 2) for _ in array.shape)
    parent[every_other] = array
    return cuda.to_device(parent)[every_other]


def to_device(step, layout="C"):
    return Step(*(None if a is None else DEVICE_LAYOUTS[layout](a) for a in step.arrays()))


def to_host(step):
    return Step(*(None if a is None else a.copy_to_host() for a in step.arrays()))


def run(steps, **keywords):
    masters = [s.master for s in steps]
    return lars_numba.momentum_step(
        [s.w for s in steps],
        [s.g for s in steps],
        [s.v for s in steps],
        masters=None if all(m is None for m in masters) else masters,
        **keywords,
    )


@pytest.mark.parametrize("layout", list(DEVICE_LAYOUTS))
@pytest.mark.parametrize("shape", [(), (0,), (37,), (5, 6)])
@pytest.mark.parametrize(
    ("dtype", "master"),
    [(np.float16, False), (np.float16, True), (np.float32, False), (np.float64, False)],
)
def test_a_step_matches_the_oracle_on_every_dtype_and_layout(dtype, master, shape, layout):
    befores = [new_step(np.random.default_rng(3), shape, dtype, master=master)]
    steps = [to_device(s, layout) for s in befores]
    rates = cuda.to_device(np.full(1, -1.0))

    assert run(steps, **KEYWORDS, rates=rates) is None

    assert_stepped(befores, [to_host(s) for s in steps], rates.copy_to_host(), KEYWORDS)


def mixed_steps(seed=5):
    """Pairs of every dtype, with and without a master, several chunks, n-d and 0-d."""
    rng = np.random.default_rng(seed)
    return [
        new_step(rng, (40,), np.float32),
        new_step(rng, (6, 7), np.float64),
        new_step(rng, (9,), np.float16),
        new_step(rng, (70,), np.float16, master=True),
        new_step(rng, (3,), np.float32),
        new_step(rng, (), np.float32),
        new_step(rng, (33,), np.float16, master=True),
        new_step(rng, (5,), np.float32),
    ]


MASKS = {
    "weight_decay_mask": [True, False, True, True, False, True, True, True],
    "trust_ratio_mask": [True, True, False, True, True, True, False, True],
}


@pytest.mark.parametrize("skip_nonfinite", [False, True])
@pytest.mark.parametrize("width", [1, 2, 24])
def test_many_pairs_in_groups_match_the_oracle_and_the_cpu_rates(
    width, skip_nonfinite, monkeypatch
):
    monkeypatch.setattr(tunables, "GROUP_PAIRS", width)
    befores = mixed_steps()
    steps = [to_device(s) for s in befores]
    rates = cuda.to_device(np.full(len(steps), -1.0))
    keywords = {**KEYWORDS, "denominator": "update", "grad_scale": 0.5}

    assert run(steps, **keywords, **MASKS, rates=rates, skip_nonfinite=skip_nonfinite) is None

    host_rates = np.full(len(steps), -1.0)
    assert run([s.copy() for s in befores], **keywords, **MASKS, rates=host_rates) is True
    np.testing.assert_allclose(rates.copy_to_host(), host_rates, rtol=1e-12)
    masks = MASKS["weight_decay_mask"], MASKS["trust_ratio_mask"]
    assert_stepped(befores, [to_host(s) for s in steps], host_rates, keywords, *masks)


def spoiled(steps, pair, value=math.nan):
    """``steps`` with element 0 of pair ``pair``'s gradient set to ``value``."""
    g = steps[pair].g.copy()
    g.reshape(-1)[0] = value
    steps[pair].g = g
    return steps


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("pair", [0, 3, 5, 7])
def test_skip_nonfinite_writes_nothing_in_any_group(pair, value, monkeypatch):
    # Width 2: the spoilt pair's group is not the first nor, for most, the last.
    monkeypatch.setattr(tunables, "GROUP_PAIRS", 2)
    steps = [to_device(s) for s in spoiled(mixed_steps(), pair, value)]
    before = [to_host(s).tobytes() for s in steps]
    rates = cuda.to_device(np.full(len(steps), -1.0))
    flag = cuda.to_device(np.zeros(1, np.bool_))

    assert run(steps, **KEYWORDS, skip_nonfinite=True, rates=rates, nonfinite=flag) is None

    assert flag.copy_to_host().tolist() == [True]
    assert [to_host(s).tobytes() for s in steps] == before
    assert rates.copy_to_host().tolist() == [-1.0] * len(steps)


def test_the_flag_is_reset_by_each_call_and_set_without_a_skip_too(monkeypatch):
    monkeypatch.setattr(tunables, "GROUP_PAIRS", 2)
    flag = cuda.to_device(np.ones(1, np.bool_))
    befores = mixed_steps()
    steps = [to_device(s) for s in befores]
    run(steps, **KEYWORDS, skip_nonfinite=True, nonfinite=flag)
    assert flag.copy_to_host().tolist() == [False]
    assert_stepped(befores, [to_host(s) for s in steps], None, KEYWORDS)

    # Without the skip the step is taken, NaN and all, and the flag says so.
    steps = [to_device(s) for s in spoiled(mixed_steps(), 4)]
    run(steps, **KEYWORDS, nonfinite=flag)
    assert flag.copy_to_host().tolist() == [True]
    assert np.isnan(to_host(steps[4]).w).all()
    assert np.isfinite(to_host(steps[2]).w).all()


def test_the_scratch_flag_decides_the_skip_when_the_call_has_none(monkeypatch):
    monkeypatch.setattr(tunables, "GROUP_PAIRS", 2)
    steps = [to_device(s) for s in spoiled(mixed_steps(), 6)]
    before = [to_host(s).tobytes() for s in steps]
    run(steps, **KEYWORDS, skip_nonfinite=True)
    assert [to_host(s).tobytes() for s in steps] == before
    # The flag left set by that call does not stop the next one.
    befores = mixed_steps()
    steps = [to_device(s) for s in befores]
    run(steps, **KEYWORDS, skip_nonfinite=True)
    assert_stepped(befores, [to_host(s) for s in steps], None, KEYWORDS)


@pytest.mark.parametrize("skip_nonfinite", [False, True])
def test_two_launches_per_group(skip_nonfinite, monkeypatch):
    monkeypatch.setattr(tunables, "GROUP_PAIRS", 3)
    # The sums kernel is the one of seven arguments (the step's has eight).
    seen = []
    spy_on_kernels(monkeypatch, lambda _, args: seen.append(len(args) == 7))
    steps = [to_device(s) for s in mixed_steps()]
    run(steps, **KEYWORDS, skip_nonfinite=skip_nonfinite)
    # float32 (4 pairs: 2 groups), float64, float16, float16 with masters (2).
    groups = 5
    sums = seen
    assert len(seen) == 2 * groups
    # With the skip every group's sums come first; without it each group's
    # update follows its sums.
    assert sums == (
        [True] * groups + [False] * groups if skip_nonfinite else [True, False] * groups
    )


def fresh_device():
    """A valid call on device arrays: float32, float16 with a master, float64."""
    return {
        "ws": [
            cuda.to_device(np.linspace(1, 2, 6, dtype=np.float32)),
            cuda.to_device(np.ones(3, np.float16)),
            cuda.to_device(np.full((2, 2), 3.0)),
        ],
        "gs": [
            cuda.to_device(np.linspace(-1, 1, 6, dtype=np.float32)),
            cuda.to_device(np.full(3, 0.5, np.float16)),
            cuda.to_device(np.full((2, 2), 0.25)),
        ],
        "vs": [
            cuda.to_device(np.full(6, 0.1, np.float32)),
            cuda.to_device(np.full(3, 0.2, np.float32)),
            cuda.to_device(np.full((2, 2), 0.3)),
        ],
        "masters": [None, cuda.to_device(np.ones(3, np.float32)), None],
        "rates": cuda.to_device(np.full(3, -1.0)),
        "lr": 0.1,
    }


def _set(key, index, value):
    def change(args):
        args[key][index] = value(args) if callable(value) else value

    return change


BAD_DEVICE_INPUTS = [
    (
        _set("gs", 0, np.zeros(6, np.float32)),
        TypeError,
        r"gs\[0\] on the CPU and ws\[0\] on the GPU",
    ),
    (_set("vs", 2, [0.0] * 4), TypeError, r"vs\[2\]"),
    (
        _set("gs", 0, cuda.to_device(np.zeros(6))),
        TypeError,
        r"gs\[0\] must have the dtype of ws\[0\]",
    ),
    (
        _set("vs", 1, cuda.to_device(np.zeros(3, np.float16))),
        TypeError,
        r"vs\[1\] must have dtype float32",
    ),
    (_set("vs", 2, cuda.to_device(np.zeros((2, 2), np.float32))), TypeError, r"vs\[2\]"),
    (
        _set("masters", 1, cuda.to_device(np.ones(3))),
        TypeError,
        r"masters\[1\] must have dtype float32",
    ),
    (_set("ws", 0, cuda.to_device(np.ones(6, np.int32))), TypeError, r"ws\[0\]"),
    (
        _set("vs", 0, cuda.to_device(np.zeros(5, np.float32))),
        ValueError,
        r"vs\[0\] must have the shape",
    ),
    (_set("masters", 1, cuda.to_device(np.ones((3, 1), np.float32))), ValueError, r"masters\[1\]"),
    (lambda a: a["vs"].pop(), ValueError, "vs must hold one array per array of ws"),
    (lambda a: a["masters"].pop(), ValueError, "masters"),
    (lambda a: a.update(rates=cuda.to_device(np.zeros(3, np.float32))), TypeError, "rates"),
    (lambda a: a.update(rates=cuda.to_device(np.zeros(2))), ValueError, "rates"),
    (lambda a: a.update(rates=np.zeros(3)), TypeError, "rates on the CPU"),
    (lambda a: a.update(nonfinite=cuda.to_device(np.zeros(1, np.int32))), TypeError, "nonfinite"),
    (lambda a: a.update(nonfinite=cuda.to_device(np.zeros(2, np.bool_))), TypeError, "nonfinite"),
    (lambda a: a.update(weight_decay_mask=[True]), ValueError, "weight_decay_mask"),
    (lambda a: a.update(lr=-1.0), ValueError, "lr"),
    (_set("vs", 0, lambda a: a["ws"][0]), ValueError, r"ws\[0\] and vs\[0\] overlap"),
    (_set("gs", 2, lambda a: a["ws"][2]), ValueError, "overlap"),
    (_set("masters", 1, lambda a: a["vs"][1]), ValueError, "overlap"),
    (lambda a: a["vs"].__setitem__(0, a["ws"][0][::1]), ValueError, "overlap"),
    (lambda a: a.update(nonfinite=a["ws"][1][:1].view(np.uint16)), TypeError, "nonfinite"),
]


@pytest.mark.parametrize(("change", "error", "message"), BAD_DEVICE_INPUTS)
def test_bad_input_raises_naming_the_argument_and_writes_nothing(change, error, message):
    args = fresh_device()
    change(args)
    arrays = {id(a): a for key in ("ws", "gs", "vs", "masters") for a in args[key] if a is not None}
    arrays[id(args["rates"])] = args["rates"]
    host = lambda a: a.copy() if isinstance(a, (np.ndarray, list)) else a.copy_to_host()  # noqa: E731
    before = {key: host(a) for key, a in arrays.items()}
    with pytest.raises(error, match=message):
        lars_numba.momentum_step(args.pop("ws"), args.pop("gs"), args.pop("vs"), **args)
    for key, array in arrays.items():
        np.testing.assert_array_equal(host(array), before[key])


def test_the_valid_call_of_the_bad_input_cases_steps():
    """``fresh_device`` itself is accepted: the refusals above are the changes'."""
    args = fresh_device()
    steps = [
        Step(*arrays)
        for arrays in zip(args["ws"], args["gs"], args["vs"], args["masters"], strict=True)
    ]
    befores = [to_host(s) for s in steps]
    assert run(steps, lr=0.1, rates=args["rates"]) is None
    assert_stepped(befores, [to_host(s) for s in steps], args["rates"].copy_to_host(), {"lr": 0.1})


def test_nonfinite_is_refused_with_numpy_arrays():
    w, g, v = (np.ones(3, np.float32) for _ in range(3))
    with pytest.raises(TypeError, match="nonfinite must be None with NumPy arrays"):
        lars_numba.momentum_step([w], [g], [v], lr=0.1, nonfinite=np.zeros(1, np.bool_))
    np.testing.assert_array_equal(w, np.ones(3, np.float32))


def test_a_resnet50_step_takes_two_launches(monkeypatch):
    # ResNet-50's 161 float32 pairs, each cut to 2 elements: the grouping
    # depends on the number of pairs and their dtypes, not their sizes.
    ws, gs, vs = ([cuda.to_device(np.ones(2, np.float32)) for _ in RESNET50_SHAPES] for _ in "wgv")
    seen = []
    spy_on_kernels(monkeypatch, lambda configuration, _: seen.append(configuration))
    lars_numba.momentum_step(ws, gs, vs, lr=0.1)
    # One group: its pairs travel as one address table, not tuples of arrays
    # whose parameters would pass 4 KiB past 16 pairs.
    assert tunables.GROUP_PAIRS >= 161
    assert len(seen) == 2 * math.ceil(161 / tunables.GROUP_PAIRS) == 2


def test_the_step_waits_for_the_stream_of_every_array_and_runs_on_the_gradients(
    foreign, scratch_handles, monkeypatch
):
    log = StreamLog(monkeypatch)
    arrays = [cuda.to_device(np.full(4, float(i < 4), np.float32)) for i in range(6)]
    ws = [foreign(arrays[0], 7), foreign(arrays[1])]
    gs = [foreign(arrays[2], 9), foreign(arrays[3], 7)]
    vs = [foreign(arrays[4], 5), foreign(arrays[5])]
    rates = foreign(cuda.to_device(np.zeros(2)), 11)
    flag = foreign(cuda.to_device(np.zeros(1, np.bool_)), 13)
    lars_numba.momentum_step(ws, gs, vs, lr=0.1, rates=rates, nonfinite=flag, skip_nonfinite=True)
    first = next(i for i, entry in enumerate(log.entries) if entry[0] == "launch")
    # gs[0]'s stream, 9, is the launch stream; it waits once for each other one.
    assert log.entries[:first] == [
        ("record", 7),
        ("wait", 9),
        ("record", 5),
        ("wait", 9),
        ("record", 11),
        ("wait", 9),
        ("record", 13),
        ("wait", 9),
    ]
    assert {entry for entry in log.entries[first:] if entry[0] == "launch"} == {("launch", 9)}
    np.testing.assert_array_less(arrays[0].copy_to_host(), 1.0)  # stepped


@pytest.mark.parametrize("name", ["ws", "vs", "rates", "nonfinite"])
def test_a_read_only_written_array_is_refused(name, foreign):
    arrays = {
        key: [foreign(cuda.to_device(np.ones(3, np.float32)), readonly=key == name)]
        for key in ("ws", "gs", "vs")
    }
    rates = foreign(cuda.to_device(np.zeros(1)), readonly=name == "rates")
    flag = foreign(cuda.to_device(np.zeros(1, np.bool_)), readonly=name == "nonfinite")
    with pytest.raises(ValueError, match=rf"{name}(\[0\])? must be writeable"):
        lars_numba.momentum_step(
            arrays["ws"], arrays["gs"], arrays["vs"], lr=0.1, rates=rates, nonfinite=flag
        )
    np.testing.assert_array_equal(arrays["ws"][0].array.copy_to_host(), np.ones(3))


def test_a_read_only_gradient_is_accepted(foreign):
    w, g, v = (cuda.to_device(np.full(3, value, np.float32)) for value in (1.0, 1.0, 0.0))
    lars_numba.momentum_step([w], [foreign(g, readonly=True)], [v], lr=0.1)
    np.testing.assert_array_less(w.copy_to_host(), 1.0)
