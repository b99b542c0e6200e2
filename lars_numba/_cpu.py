"""CPU kernels for LARS, compiled with ``numba.njit``.

Every kernel accumulates in float64: a float16 sum of squares overflows past
65504 (300 squared is already 90000) and a float32 sum loses digits over
millions of terms, while a float64 accumulator costs nothing on a memory-bound
loop. The update is computed in float64 and rounded once to the array's dtype.

Numba has no float16 arithmetic on the CPU, so float16 arrays arrive here as
their ``uint16`` bit patterns and ``load``/``encode`` convert them exactly
(round half to even, like NumPy's ``astype``).

Compile options, chosen once here for every kernel:

- ``fastmath={'reassoc', 'contract'}`` lets LLVM vectorize the reductions and
  fuse multiply-adds, but, unlike ``fastmath=True``, does not assume the
  absence of NaN and Inf, which must propagate as they do in Chainer.
- ``error_model='numpy'``: a division by zero gives Inf or NaN, not an
  exception, again as in NumPy.
- ``nogil=True`` so that several Python threads can run kernels at once.
- ``cache=True`` so that a process pays the compile cost only once per machine.
"""

import math
import threading

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

_OPTIONS = {
    "cache": True,
    "nogil": True,
    "error_model": "numpy",
    "fastmath": {"reassoc", "contract"},
}

#: Arrays with fewer elements than this run serially: below it, waking the
#: thread pool costs more than it saves (measured by ``python -m lars_numba.bench
#: --cutoff``; see the README).
PARALLEL_MIN_SIZE = 1 << 16

# Numba's default ``workqueue`` threading layer aborts the process when two
# threads enter parallel kernels at once, so only one thread at a time may
# run them; the others take the serial kernels, which release the GIL too.
_parallel_slot = threading.Lock()


# -- float16 as uint16 bit patterns --------------------------------------------


@njit(**_OPTIONS)
def half_bits_to_float(bits):
    """The float64 value of the IEEE binary16 number whose bits are ``bits``."""
    exponent = (bits >> 10) & 0x1F
    mantissa = bits & 0x3FF
    if exponent == 0x1F:
        value = np.inf if mantissa == 0 else np.nan
    elif exponent == 0:
        value = math.ldexp(float(mantissa), -24)
    else:
        value = math.ldexp(float(mantissa | 0x400), int(exponent) - 25)
    return -value if bits & 0x8000 else value


@njit(**_OPTIONS)
def float_to_half_bits(value):
    """The bits of ``value`` rounded to the nearest binary16, ties to even."""
    sign = 0x8000 if math.copysign(1.0, value) < 0 else 0
    magnitude = abs(value)
    if magnitude != magnitude:
        return np.uint16(sign | 0x7E00)
    # Quantize on the binary16 grid around ``magnitude``: 10 fraction bits in
    # the normal range, a fixed step of 2**-24 in the subnormal range. Scaling
    # by a power of two is exact, so ``rint`` rounds exactly once, ties to even.
    if magnitude >= 2.0**-14:
        step_exponent = math.frexp(magnitude)[1] - 11
    else:
        step_exponent = -24
    if step_exponent > 5:  # 65536 and above, Inf included
        return np.uint16(sign | 0x7C00)
    steps = np.rint(math.ldexp(magnitude, -step_exponent))
    rounded = math.ldexp(steps, step_exponent)
    if rounded >= 65536.0:  # rounded up past the largest finite binary16
        return np.uint16(sign | 0x7C00)
    if rounded < 2.0**-14:
        return np.uint16(sign | int(steps))
    fraction, exponent = math.frexp(rounded)  # rounded = fraction * 2**exponent
    mantissa = int(math.ldexp(fraction, 11)) - 0x400
    return np.uint16(sign | ((exponent + 14) << 10) | mantissa)


def load(x):
    """An element of an input array, as float64."""


def encode(value, array):
    """The float64 ``value`` rounded to what ``array`` holds, ready to assign."""


@overload(load, inline="always")
def _load(x):
    if x == types.uint16:
        return lambda x: half_bits_to_float(x)
    return lambda x: np.float64(x)


@overload(encode, inline="always")
def _encode(value, array):
    if array.dtype == types.uint16:
        return lambda value, array: float_to_half_bits(value)
    return lambda value, array: value


# -- the scalar rule -----------------------------------------------------------
#
# ``hyper`` is the tuple ``_api.HYPERPARAMETERS`` describes: a LARS variant
# adds an entry there and a branch here, and every kernel carries it unchanged.


@njit(**_OPTIONS)
def rate_from_sums(w_sq, g_sq, hyper):
    """``||w|| / (eps + ||g|| + weight_decay * ||w||)`` if ``||w|| > threshold`` else 1."""
    threshold, weight_decay, eps = hyper
    w_norm = math.sqrt(w_sq)
    if w_norm > threshold:
        return w_norm / (eps + math.sqrt(g_sq) + weight_decay * w_norm)
    return 1.0


@njit(inline="always", **_OPTIONS)
def weight_decay_of(hyper):
    """The weight decay in ``hyper``."""
    return hyper[1]


# -- kernels over 1-d views ----------------------------------------------------


def _flat_kernels(parallel: bool):
    """The 1-d kernels, serial or on all threads: one source, two compilations.

    ``prange`` is ``range`` when ``parallel`` is off, but Numba's cache keys a
    function by its bytecode and closure, not by its compile options, so the
    loop function is a closure variable to keep the two variants apart.
    """
    loop = prange if parallel else range
    jit = njit(parallel=parallel, **_OPTIONS)

    @jit
    def trust_ratio_flat(w, g, hyper):
        """The rate for 1-d ``w`` and ``g``: both sums of squares in one pass."""
        w_sq = 0.0
        g_sq = 0.0
        for i in loop(w.shape[0]):
            w_value = load(w[i])
            g_value = load(g[i])
            w_sq += w_value * w_value
            g_sq += g_value * g_value
        return rate_from_sums(w_sq, g_sq, hyper)

    @jit
    def apply_rate_flat(w, g, rate, hyper):
        """``g <- rate * (g + weight_decay * w)`` for 1-d ``w`` and ``g``."""
        weight_decay = weight_decay_of(hyper)
        for i in loop(w.shape[0]):
            g[i] = encode(rate * (load(g[i]) + weight_decay * load(w[i])), g)

    return trust_ratio_flat, apply_rate_flat


trust_ratio_flat, apply_rate_flat = _flat_kernels(parallel=False)
trust_ratio_flat_parallel, apply_rate_flat_parallel = _flat_kernels(parallel=True)


# -- kernels over n-d arrays whose layouts do not flatten alike ----------------


@njit(**_OPTIONS)
def trust_ratio_nd(w, g, hyper):
    """:func:`trust_ratio_flat` for n-d arrays of any strides."""
    w_sq = 0.0
    g_sq = 0.0
    for wi, gi in np.nditer((w, g)):
        w_value = load(wi.item())
        g_value = load(gi.item())
        w_sq += w_value * w_value
        g_sq += g_value * g_value
    return rate_from_sums(w_sq, g_sq, hyper)


@njit(**_OPTIONS)
def apply_rate_nd(w, g, rate, hyper):
    """:func:`apply_rate_flat` for n-d arrays of any strides."""
    weight_decay = weight_decay_of(hyper)
    for wi, gi in np.nditer((w, g)):
        gi[()] = encode(rate * (load(gi.item()) + weight_decay * load(wi.item())), gi)


# -- drivers: pick the kernel for the arrays' size and layout ------------------


def flat_views(w, g):
    """1-d views of ``w`` and ``g`` that pair the same elements, or ``None``."""
    if w.ndim <= 1:
        return w.reshape(-1), g.reshape(-1)
    for order, flag in (("C", "C_CONTIGUOUS"), ("F", "F_CONTIGUOUS")):
        if w.flags[flag] and g.flags[flag]:
            return w.ravel(order), g.ravel(order)
    return None


_SERIAL = (trust_ratio_flat, apply_rate_flat)
_PARALLEL = (trust_ratio_flat_parallel, apply_rate_flat_parallel)
_ND = (trust_ratio_nd, apply_rate_nd)


def _run(kernels, w, g, hyper, update):
    trust_ratio_kernel, apply_rate_kernel = kernels
    rate = trust_ratio_kernel(w, g, hyper)
    if update:
        apply_rate_kernel(w, g, rate, hyper)
    return rate


def _pick_and_run(w, g, hyper, update, parallel):
    flat = flat_views(w, g)
    if flat is None:
        return _run(_ND, w, g, hyper, update)
    if (
        parallel
        and flat[0].shape[0] >= PARALLEL_MIN_SIZE
        and _parallel_slot.acquire(blocking=False)
    ):
        try:
            return _run(_PARALLEL, *flat, hyper, update)
        finally:
            _parallel_slot.release()
    return _run(_SERIAL, *flat, hyper, update)


def trust_ratio(w, g, hyper, parallel: bool = True) -> float:
    """The rate for two validated arrays of one shape and dtype."""
    return _pick_and_run(w, g, hyper, False, parallel)


def scale(w, g, hyper, parallel: bool = True) -> float:
    """Scale ``g`` in place for two validated arrays; returns the rate."""
    return _pick_and_run(w, g, hyper, True, parallel)
