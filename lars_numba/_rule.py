"""The LARS rule, written once as plain Python and compiled for every device.

Nothing here imports Numba: :mod:`lars_numba._cpu` compiles these functions
with ``numba.njit`` and :mod:`lars_numba._cuda` with
``numba.cuda.jit(device=True)``, from this one source, so that both devices
compute the same thing. Element values arrive as float64 and the results are
float64; the engines load and round them.

A variant of the rate is a hyperparameter in :data:`HYPERPARAMETERS` and a
line in :func:`rate_from_sums` (and, if it needs another sum, a term in
:func:`norm_terms`); a new update is a function like :func:`scaled_gradient`
and an entry in :data:`UPDATES`. The engines are compiled for each entry.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from pathlib import Path
from typing import NamedTuple

#: The hyperparameters of the rule, in the order of the plain tuple every
#: kernel receives (a plain tuple: Numba takes a named tuple argument about
#: 0.5 us slower per call).
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


# -- compiled for both devices -------------------------------------------------


def masked(hyper, decays, adapts):
    """``hyper`` for a pair outside the weight-decay mask (``decays`` false) or the
    trust-ratio mask (``adapts`` false): weight decay 0, or an infinite threshold,
    which no norm exceeds, so that the rate is 1."""
    threshold, weight_decay, eps = hyper
    return (threshold if adapts else math.inf, weight_decay if decays else 0.0, eps)


#: How many sums of a pair :func:`norm_terms` adds to, hence how many the
#: engines keep per pair and per chunk.
SUMS = 2


def norm_terms(w, g):
    """One element's terms of the sums the rate depends on: ``(w**2, g**2)``."""
    return w * w, g * g


def rate_from_sums(sums, hyper):
    """``||w|| / (eps + ||g|| + weight_decay * ||w||)`` if ``||w|| > threshold``, else 1."""
    threshold, weight_decay, eps = hyper
    w_norm = math.sqrt(sums[0])
    if w_norm > threshold:
        return w_norm / (eps + math.sqrt(sums[1]) + weight_decay * w_norm)
    return 1.0


def scaled_gradient(rate, hyper, w, g):
    """``(w, g)`` after ``g <- rate * (g + weight_decay * w)``."""
    return w, rate * (g + hyper[1] * w)


class Update(NamedTuple):
    """An update the engines apply to the arrays of each pair, after the rate."""

    function: object  #: ``function(rate, hyper, *values) -> values``, one value per array
    written: tuple[bool, ...]  #: which of the pair's arrays it writes, in order


#: Every update, by name. The first two arrays of a pair are always ``w`` and
#: ``g``, the arrays the sums are taken over.
UPDATES = {"scale": Update(scaled_gradient, written=(False, True))}

#: A digest of this file, which the engines compile into their kernels so that
#: Numba's on-disk cache, which checks only a kernel's own file, recompiles
#: them when the rule changes.
SOURCE_DIGEST = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
