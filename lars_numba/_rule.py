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
#: kernel receives (a plain tuple of floats: Numba takes a named tuple argument
#: about 0.5 us slower per call). ``denominator`` is 0.0 for ``"sum"`` and 1.0
#: for ``"update"``; ``clip_lr`` is 0.0 for no clipping.
HYPERPARAMETERS = (
    "threshold",
    "weight_decay",
    "eps",
    "trust_coefficient",
    "denominator",
    "clip_lr",
)

Hyperparameters = tuple[float, float, float, float, float, float]

#: The values ``denominator`` takes, and their codes in the tuple.
DENOMINATORS = {"sum": 0.0, "update": 1.0}

#: Where the code of ``denominator`` is in the tuple.
DENOMINATOR = HYPERPARAMETERS.index("denominator")


def hyperparameters(
    threshold: float,
    weight_decay: float,
    eps: float,
    trust_coefficient: float = 1.0,
    denominator: str = "sum",
    clip_lr: float | None = None,
) -> Hyperparameters:
    """Check the hyperparameters and return them as the kernels' tuple of floats."""
    # The common case, plain finite non-negative floats and the defaults, is
    # decided without a loop: it is on the path of every call.
    if (
        type(threshold) is float
        and type(weight_decay) is float
        and type(eps) is float
        and 0.0 <= threshold < math.inf
        and 0.0 <= weight_decay < math.inf
        and 0.0 <= eps < math.inf
        and type(trust_coefficient) is float
        and trust_coefficient == 1.0
        and denominator == "sum"
        and clip_lr is None
    ):
        return (threshold, weight_decay, eps, 1.0, 0.0, 0.0)
    values = (threshold, weight_decay, eps, trust_coefficient)
    for name, value in zip(HYPERPARAMETERS[: len(values)], values, strict=True):
        _check_real(name, value)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be finite and >= 0; got {value!r}")
    if not isinstance(denominator, str) or denominator not in DENOMINATORS:
        raise ValueError(
            f"denominator must be one of {', '.join(map(repr, DENOMINATORS))}; got {denominator!r}"
        )
    if clip_lr is not None:
        _check_real("clip_lr", clip_lr)
        if not (math.isfinite(clip_lr) and clip_lr > 0):
            raise ValueError(f"clip_lr must be None or finite and > 0; got {clip_lr!r}")
    return (
        *(float(value) for value in values),
        DENOMINATORS[denominator],
        0.0 if clip_lr is None else float(clip_lr),
    )


def _check_real(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__}")


# -- compiled for both devices -------------------------------------------------


def masked(hyper, decays, adapts):
    """``hyper`` for a pair outside the weight-decay mask (``decays`` false) or the
    trust-ratio mask (``adapts`` false): weight decay 0, or an infinite threshold,
    which no norm exceeds, so that the rate is 1."""
    threshold, weight_decay, eps, trust_coefficient, denominator, clip_lr = hyper
    return (
        threshold if adapts else math.inf,
        weight_decay if decays else 0.0,
        eps,
        trust_coefficient,
        denominator,
        clip_lr,
    )


#: How many sums of a pair :func:`norm_terms` adds to, hence how many the
#: engines keep per pair and per chunk.
SUMS = 3


def norm_terms(hyper, w, g):
    """One element's terms of the sums the rate depends on:
    ``(w**2, g**2, (g + weight_decay * w)**2)``, the last for ``denominator="update"``."""
    update = g + hyper[1] * w
    return w * w, g * g, update * update


def rate_from_sums(sums, hyper):
    """``trust_coefficient * ||w|| / denominator`` if ``||w|| > threshold``, else 1.

    The denominator is ``eps + ||g|| + weight_decay * ||w||`` (``"sum"``:
    Chainer, the paper, apex, timm) or ``eps + ||g + weight_decay * w||``
    (``"update"``: optax, TensorFlow), where a zero norm of the update gives
    rate 1, as in optax. With ``clip_lr``, LARC's clipping: ``min(rate /
    clip_lr, 1)``.
    """
    threshold, weight_decay, eps, trust_coefficient, denominator, clip_lr = hyper
    w_norm = math.sqrt(sums[0])
    if not w_norm > threshold:
        return 1.0
    if denominator:
        update_norm = math.sqrt(sums[2])
        if update_norm == 0.0:
            return 1.0
        rate = trust_coefficient * w_norm / (eps + update_norm)
    else:
        rate = trust_coefficient * w_norm / (eps + math.sqrt(sums[1]) + weight_decay * w_norm)
    if clip_lr > 0.0:
        clipped = rate / clip_lr
        # Written so that a NaN rate stays NaN, as it would without clipping.
        rate = 1.0 if clipped > 1.0 else clipped
    return rate


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
