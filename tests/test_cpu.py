"""The CPU engine's pieces: the float16 conversions and the flat views."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit
from test_api import laid_pairs

import lars_numba
from lars_numba import _api, _cpu, _layout, _rule, tunables

ALL_HALF_BITS = np.arange(1 << 16, dtype=np.uint16)


@njit
def decode_all(bits, out):
    for i in range(bits.shape[0]):
        out[i] = _cpu.load(bits[i])


@njit
def encode_all(values, out):
    for i in range(values.shape[0]):
        out[i] = _cpu.store(values[i], out)


def sums_in_the_documented_order(values, chunk, lanes):
    """The sum of ``values`` (float64) in the CPU engine's order, in plain Python:
    each chunk's elements go to ``i % lanes`` in turn (the tail to lane 0), the
    lanes are added up pairwise, and the chunks' sums in chunk order."""
    total = 0.0
    for start in range(0, len(values), chunk):
        part = values[start : start + chunk].tolist()
        whole = len(part) - len(part) % lanes
        accumulators = [0.0] * lanes
        for i in range(whole):
            accumulators[i % lanes] += part[i]
        for value in part[whole:]:
            accumulators[0] += value
        while len(accumulators) > 1:
            pairs = zip(accumulators[::2], accumulators[1::2], strict=True)
            accumulators = [a + b for a, b in pairs]
        total += accumulators[0]
    return total


@pytest.mark.parametrize("size", [0, 5, 1000, 3 * tunables.CPU_CHUNK + 13])
@pytest.mark.parametrize("denominator", ["sum", "update"])
def test_the_sums_are_added_in_the_documented_order_on_every_path(size, denominator):
    rng = np.random.default_rng(size)
    w, g = rng.standard_normal(size), rng.standard_normal(size)
    # No weight decay in "sum"'s denominator: the kernels may fuse its
    # multiply-add, which the plain rate below would not.
    weight_decay = 0.5 if denominator == "update" else 0.0
    sums = [
        sums_in_the_documented_order(terms, tunables.CPU_CHUNK, _cpu.LANES)
        for terms in (w * w, g * g, (g + weight_decay * w) ** 2)
    ]
    hyper = _api.hyperparameters(0.0, weight_decay, 0.0, 1.0, denominator)
    if denominator == "sum":
        sums[2] = 0.0
    expected = _rule.rate_from_sums(tuple(sums), hyper)
    arguments = {"threshold": 0.0, "weight_decay": weight_decay, "eps": 0.0}
    arguments["denominator"] = denominator
    others = [np.ones(7), np.ones(tunables.CPU_CHUNK + 1)]
    for parallel in (False, True):
        assert lars_numba.trust_ratio(w, g, **arguments, parallel=parallel) == expected
        rates = np.empty(3)
        lars_numba.scale_all(
            [others[0], w, others[1]],
            [others[0].copy(), g.copy(), others[1].copy()],
            **arguments,
            rates=rates,
            parallel=parallel,
        )
        assert rates[1] == expected


def test_every_float16_bit_pattern_decodes_like_numpy():
    expected = ALL_HALF_BITS.view(np.float16).astype(np.float64)
    decoded = np.empty(ALL_HALF_BITS.size)
    decode_all(ALL_HALF_BITS, decoded)
    np.testing.assert_array_equal(decoded, expected)
    # assert_array_equal treats all NaNs alike and 0.0 == -0.0: check the signs
    np.testing.assert_array_equal(np.signbit(decoded), np.signbit(expected))


def test_float64_rounds_to_float16_like_numpy():
    halves = ALL_HALF_BITS.view(np.float16)
    finite = np.sort(halves[np.isfinite(halves)].astype(np.float64))
    midpoints = (finite[1:] + finite[:-1]) / 2  # ties: round half to even
    values = np.concatenate(
        [
            finite,
            midpoints,
            np.nextafter(midpoints, np.inf),
            np.nextafter(midpoints, -np.inf),
            [65504.0, 65519.99, 65520.0, 1e6, -1e300, 2.0**-25, 2.0**-26, 5e-324],
            # float32 values between binary16 neighbours, where one rounding to
            # float32 and another to binary16 would round twice
            np.nextafter(midpoints.astype(np.float32), np.float32(np.inf)).astype(np.float64),
            midpoints + np.ldexp(midpoints, -30),
            midpoints - np.ldexp(midpoints, -30),
            [3.5e38, -3.5e38, 1e-300, -1e-300, 2.0**-24, 2.0**-14, np.nextafter(2.0**-14, 0)],
            [np.inf, -np.inf, np.nan, -0.0, 0.0],
        ]
    )
    encoded = np.empty(values.size, np.uint16)
    encode_all(values, encoded)
    with np.errstate(over="ignore"):
        expected = values.astype(np.float16)
    np.testing.assert_array_equal(encoded.view(np.float16), expected)
    # assert_array_equal treats all NaNs alike and 0.0 == -0.0: check the bits
    same_bits = encoded == expected.view(np.uint16)
    assert same_bits[~np.isnan(values)].all()
    assert np.isnan(encoded[np.isnan(values)].view(np.float16)).all()


@pytest.mark.parametrize(
    ("make_w", "make_g", "flat"),
    [
        (lambda a: a, lambda a: a.copy(), True),
        (np.asfortranarray, np.asfortranarray, True),
        (lambda a: a, np.asfortranarray, False),
        (lambda a: a[:, ::2], lambda a: a[:, ::2].copy(), False),
        (lambda a: a[1, ::-3], lambda a: a[1, ::-3], True),
        (lambda a: a[1, 2, ...], lambda a: a[1, 2, ...], True),
    ],
)
def test_flat_views_pair_the_same_elements_without_copying(make_w, make_g, flat):
    base = np.arange(24.0).reshape(4, 6)
    w, g = make_w(base), make_g(base + 100)
    views = _layout.flat_views(w, g)
    assert (views is not None) == flat
    if flat:
        for view, array in zip(views, (w, g), strict=True):
            assert np.shares_memory(view, array)
        np.testing.assert_array_equal(views[1] - views[0], np.full(views[0].shape, 100.0))


@pytest.mark.parametrize(
    "count", [0, 1, tunables.IDS_FROM_OBJECTS - 1, tunables.IDS_FROM_OBJECTS, 1000]
)
@pytest.mark.parametrize("container", [list, tuple])
def test_the_ids_read_at_once_are_the_objects_ids(count, container):
    # Arrays, and arrays among other objects: an array of them holds each
    # object itself, not its elements.
    objects = container(np.zeros(i % 3 + 1) if i % 4 else [i] for i in range(count))
    assert _layout.ids_of(objects).tolist() == [id(o) for o in objects]


@settings(max_examples=200, deadline=None)
@given(pairs=st.lists(laid_pairs(), min_size=1, max_size=6))
def test_the_layouts_read_from_the_array_objects_are_the_attributes(pairs):
    ws = [laid[0].array for laid in pairs]
    gs = [laid[1].array for laid in pairs]
    read = _layout.plain_layouts(ws, gs)
    assert read is not None
    np.testing.assert_array_equal(read, _layout.attribute_layouts(ws, gs))


@pytest.mark.parametrize(
    "make_g",
    [
        lambda g: g.astype(np.float64),  # another dtype
        lambda g: g.reshape(1, -1),  # another shape
        lambda g: g.astype(">f4"),  # not native
        lambda g: np.ma.MaskedArray(g),  # a subclass
        lambda g: np.frombuffer(g.tobytes(), np.float32),  # read-only
    ],
)
def test_pairs_that_are_not_plain_are_left_to_the_checks(make_g):
    w = np.arange(6, dtype=np.float32)
    assert _layout.plain_layouts([w, w], [w.copy(), make_g(w.copy())]) is None


RULE_CHANGE = """
import numpy as np
import lars_numba
g = np.ones(4)
lars_numba.scale(np.ones(4), g, eps=0.0)
print(lars_numba.__file__)
print(g[0])
"""


def test_a_change_of_the_rule_alone_recompiles_the_cached_kernels(tmp_path):
    # A copy of the package whose rule file is changed after a first run
    # filled Numba's cache: the kernels live in _cpu.py, which is unchanged.
    package = tmp_path / "lars_numba"
    shutil.copytree(Path(lars_numba.__file__).parent, package)
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(tmp_path)}

    def run():
        done = subprocess.run(
            [sys.executable, "-c", RULE_CHANGE],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        where, value = done.stdout.split()
        assert where.startswith(str(package))
        return float(value)

    assert run() == 1.0  # rate ||w|| / ||g|| = 1
    rule = package / "_rule.py"
    rule.write_text(
        rule.read_text().replace(
            "return w, rate * (g + hyper[WEIGHT_DECAY] / hyper[GRAD_SCALE] * w)",
            "return w, 3 * rate * g",
        )
    )
    assert run() == 3.0
