"""The CPU kernels' pieces: the float16 codec and the choice of kernel."""

import numpy as np
import pytest

from lars_numba import _cpu

ALL_HALF_BITS = np.arange(1 << 16, dtype=np.uint16)


def test_every_float16_bit_pattern_decodes_like_numpy():
    expected = ALL_HALF_BITS.view(np.float16).astype(np.float64)
    decoded = np.array([_cpu.half_bits_to_float(bits) for bits in ALL_HALF_BITS])
    np.testing.assert_array_equal(decoded, expected)


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
            [np.inf, -np.inf, np.nan, -0.0, 0.0],
        ]
    )
    encoded = np.array([_cpu.float_to_half_bits(value) for value in values], dtype=np.uint16)
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
    views = _cpu.flat_views(w, g)
    assert (views is not None) == flat
    if flat:
        for view, array in zip(views, (w, g), strict=True):
            assert np.shares_memory(view, array)
        np.testing.assert_array_equal(views[1] - views[0], np.full(views[0].shape, 100.0))
