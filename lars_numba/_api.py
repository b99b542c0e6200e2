"""Argument checks and device dispatch: the only module that knows devices.

Every public entry point checks all of its arguments here, before any kernel
runs, so that a bad call raises and leaves the caller's arrays untouched.

NumPy arrays go to :mod:`lars_numba._cpu`. CUDA arrays (CuPy arrays, Numba
device arrays, the CUDA simulator's included, and any object with a
``__cuda_array_interface__``) go to :mod:`lars_numba._cuda`, which is imported
on the first such call so that ``import lars_numba`` does not load
``numba.cuda``.
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
    if isinstance(array, np.ndarray):
        return not isinstance(array, np.ma.MaskedArray)
    return on_gpu(array)


def on_gpu(array: object) -> bool:
    """Whether ``array`` is a CUDA array, decided without importing ``numba.cuda``.

    It is if it exposes ``__cuda_array_interface__`` or is one of Numba's own
    device arrays, which the CUDA simulator's are without the interface.
    """
    return bool(getattr(array, "__cuda_ndarray__", False)) or hasattr(
        array, "__cuda_array_interface__"
    )


def kernel_view(array: np.ndarray) -> np.ndarray:
    """``array`` as the kernels take it: float16 as its uint16 bit patterns."""
    return array.view(np.uint16) if array.dtype == np.float16 else array


def _device_pair(w, g, *, writes_g: bool):
    """``w`` and ``g`` as Numba device arrays, after the checks of :func:`check_pair`.

    Also returns the handle of the stream to run on, chosen by
    :func:`lars_numba._cuda.caller_stream`.
    """
    if accepts(w) and accepts(g) and not (on_gpu(w) and on_gpu(g)):
        raise TypeError(
            "w and g must both be NumPy arrays or both CUDA arrays; got "
            f"w on the {_device_name(w)} ({type(w).__name__}) and "
            f"g on the {_device_name(g)} ({type(g).__name__})"
        )
    gpu = _gpu_module()
    # An object that is no array at all is left for check_pair to name.
    w_device, g_device = (gpu.as_device_array(a) if on_gpu(a) else a for a in (w, g))
    check_pair(w_device, g_device, writes_g=False)
    # A device array has no writeable flag; the interface says read-only.
    interface = getattr(g, "__cuda_array_interface__", None)
    if writes_g and interface is not None and interface["data"][1]:
        raise ValueError("g must be writeable; got a read-only array")
    return w_device, g_device, gpu.caller_stream(w, g)


def _device_name(array: object) -> str:
    return "GPU" if on_gpu(array) else "CPU"


def _gpu_module():
    """:mod:`lars_numba._cuda`, imported when the first CUDA array is seen."""
    from . import _cuda

    return _cuda


def scale(w, g, hyper: Hyperparameters, parallel: bool = True) -> float | None:
    """Scale ``g`` in place after checking both arrays; returns the rate.

    ``parallel`` lets large NumPy arrays run on all of Numba's threads.

    For CUDA arrays it returns ``None`` instead: the scaling is enqueued on
    the caller's stream and the rate stays on the device, as the call does not
    wait for the GPU.
    """
    # Two NumPy arrays, the hot path, are told apart by two isinstance calls
    # inline: a function call here would cost the NumPy path 5 %.
    if not (isinstance(w, np.ndarray) and isinstance(g, np.ndarray)) and (on_gpu(w) or on_gpu(g)):
        w, g, stream = _device_pair(w, g, writes_g=True)
        _gpu_module().scale(w, g, hyper, stream)
        return None
    check_pair(w, g, writes_g=True)
    if w is not g and np.may_share_memory(w, g):
        # The update reads w while writing g: an overlap other than w being g
        # itself would read elements that were already scaled.
        w = w.copy()
    return _cpu.scale(kernel_view(w), kernel_view(g), hyper, parallel)


def trust_ratio(w, g, hyper: Hyperparameters, parallel: bool = True) -> float:
    """The rate ``scale`` would apply, after checking both arrays.

    For CUDA arrays it waits for the caller's stream to finish the sums.
    """
    if not (isinstance(w, np.ndarray) and isinstance(g, np.ndarray)) and (on_gpu(w) or on_gpu(g)):
        w, g, stream = _device_pair(w, g, writes_g=False)
        return _gpu_module().trust_ratio(w, g, hyper, stream)
    check_pair(w, g, writes_g=False)
    return _cpu.trust_ratio(kernel_view(w), kernel_view(g), hyper, parallel)
