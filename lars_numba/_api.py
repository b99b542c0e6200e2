"""Argument checks and device dispatch: the only module that knows devices.

Every public entry point checks all of its arguments here, before any kernel
runs, so that a bad call raises and leaves the caller's arrays untouched.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from . import _cpu

_FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


#: The hyperparameters of one LARS rule, in the order of the plain tuple every
#: kernel receives. A LARS variant is a new entry here and in the kernels' rate
#: rule, not a new signature through every kernel. The tuple is a plain one
#: because Numba takes a named tuple argument about 0.5 us slower per call.
HYPERPARAMETERS = ("threshold", "weight_decay", "eps")

Hyperparameters = tuple[float, float, float]


def hyperparameters(threshold: float, weight_decay: float, eps: float) -> Hyperparameters:
    """Check the hyperparameters and return them as a tuple of floats."""
    values = (threshold, weight_decay, eps)
    # The common case, plain finite non-negative floats, is decided without a
    # loop: it is on the path of every call.
    if (
        type(threshold) is float
        and type(weight_decay) is float
        and type(eps) is float
        and 0.0 <= threshold < math.inf
        and 0.0 <= weight_decay < math.inf
        and 0.0 <= eps < math.inf
    ):
        return values
    for name, value in zip(HYPERPARAMETERS, values, strict=True):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a real number; got {type(value).__name__}")
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be finite and >= 0; got {value!r}")
    return tuple(float(value) for value in values)


def _check_array(name: str, array: object) -> None:
    if not accepts(array):
        raise TypeError(f"{name} must be a NumPy array; got {type(array).__name__}")
    if array.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have dtype float16, float32 or float64 in native byte order; "
            f"got {array.dtype}"
        )


def check_pair(w: object, g: object, *, writes_g: bool) -> None:
    """Raise unless ``w`` and ``g`` are float arrays of one dtype and shape."""
    _check_array("w", w)
    _check_array("g", g)
    if g.dtype != w.dtype:
        raise TypeError(f"g must have the dtype of w, {w.dtype}; got {g.dtype}")
    if g.shape != w.shape:
        raise ValueError(f"g must have the shape of w, {w.shape}; got {g.shape}")
    if writes_g and not g.flags.writeable:
        raise ValueError("g must be writeable; got a read-only array")


def accepts(array: object) -> bool:
    """Whether ``array`` is of a kind the kernels can take (its dtype aside)."""
    return isinstance(array, np.ndarray) and not isinstance(array, np.ma.MaskedArray)


def kernel_view(array: np.ndarray) -> np.ndarray:
    """``array`` as the kernels take it: float16 as its uint16 bit patterns."""
    return array.view(np.uint16) if array.dtype == np.float16 else array


def scale(w, g, hyper: Hyperparameters) -> float:
    """Scale ``g`` in place after checking both arrays; returns the rate."""
    check_pair(w, g, writes_g=True)
    if w is not g and np.may_share_memory(w, g):
        # The update reads w while writing g: an overlap other than w being g
        # itself would read elements that were already scaled.
        w = w.copy()
    return _cpu.scale(kernel_view(w), kernel_view(g), hyper)


def trust_ratio(w, g, hyper: Hyperparameters) -> float:
    """The rate ``scale`` would apply, after checking both arrays."""
    check_pair(w, g, writes_g=False)
    return _cpu.trust_ratio(kernel_view(w), kernel_view(g), hyper)
