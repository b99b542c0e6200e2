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
#: more slowly). ``denominator`` is 0.0 for ``"sum"`` and 1.0
#: for ``"update"``; ``clip_lr`` is 0.0 for no clipping. The last three are
#: the momentum step's (:func:`momentum_step`): the factor every gradient is
#: multiplied by first (the inverse of a loss scale), the learning rate and
#: the momentum.
HYPERPARAMETERS = (
    "threshold",
    "weight_decay",
    "eps",
    "trust_coefficient",
    "denominator",
    "clip_lr",
    "grad_scale",
    "lr",
    "momentum",
)

Hyperparameters = tuple[float, float, float, float, float, float, float, float, float]

#: The values ``denominator`` takes, and their codes in the tuple.
DENOMINATORS = {"sum": 0.0, "update": 1.0}

#: Where some of the hyperparameters are in the tuple, for the rule's lines.
WEIGHT_DECAY, DENOMINATOR, CLIP_LR, GRAD_SCALE, LR, MOMENTUM = (
    HYPERPARAMETERS.index(name)
    for name in ("weight_decay", "denominator", "clip_lr", "grad_scale", "lr", "momentum")
)


def hyperparameters(
    threshold: float,
    weight_decay: float,
    eps: float,
    trust_coefficient: float = 1.0,
    denominator: str = "sum",
    clip_lr: float | None = None,
    *,
    grad_scale: float = 1.0,
    lr: float = 0.0,
    momentum: float = 0.0,
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
        and grad_scale == 1.0
        and lr == 0.0
        and momentum == 0.0
    ):
        return (threshold, weight_decay, eps, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0)
    values = (threshold, weight_decay, eps, trust_coefficient)
    for name, value in zip(HYPERPARAMETERS[: len(values)], values, strict=True):
        _check_finite_at_least_zero(name, value)
    if not isinstance(denominator, str) or denominator not in DENOMINATORS:
        raise ValueError(
            f"denominator must be one of {', '.join(map(repr, DENOMINATORS))}; got {denominator!r}"
        )
    if clip_lr is not None:
        _check_real("clip_lr", clip_lr)
        if not (math.isfinite(clip_lr) and clip_lr > 0):
            raise ValueError(f"clip_lr must be None or finite and > 0; got {clip_lr!r}")
    _check_real("grad_scale", grad_scale)
    if not (math.isfinite(grad_scale) and grad_scale > 0):
        raise ValueError(f"grad_scale must be finite and > 0; got {grad_scale!r}")
    _check_finite_at_least_zero("lr", lr)
    _check_finite_at_least_zero("momentum", momentum)
    return (
        *(float(value) for value in values),
        DENOMINATORS[denominator],
        0.0 if clip_lr is None else float(clip_lr),
        float(grad_scale),
        float(lr),
        float(momentum),
    )


#: The ``clip_lr`` of a learning rate of 0, for which ``min(rate / lr, 1)`` is 1
#: (``clip_lr`` 0 means no clipping): the smallest positive float64, by which
#: any positive rate divides to more than 1.
_CLIP_AT_ZERO = 5e-324


def clipped_at_lr(hyper: Hyperparameters) -> Hyperparameters:
    """``hyper`` with LARC's clipping at its own learning rate, ``min(rate / lr, 1)``:
    1 at a learning rate of 0 (a warm-up's first step), the limit from above."""
    clip_lr = hyper[LR] or _CLIP_AT_ZERO
    return (*hyper[:CLIP_LR], clip_lr, *hyper[CLIP_LR + 1 :])


def _check_finite_at_least_zero(name: str, value: object) -> None:
    _check_real(name, value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be finite and >= 0; got {value!r}")


def _check_real(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__}")


# -- compiled for both devices -------------------------------------------------


def masked(hyper, decays, adapts):
    """``hyper`` for a pair outside the weight-decay mask (``decays`` false) or the
    trust-ratio mask (``adapts`` false): weight decay 0, or an infinite threshold,
    which no norm exceeds, so that the rate is 1."""
    # A sum of tuples, which both of Numba's compilers type, not an unpacking.
    return (hyper[0] if adapts else math.inf, hyper[1] if decays else 0.0) + hyper[2:]  # noqa: RUF005


#: How many sums of a pair :func:`norm_terms` adds to, hence how many the
#: engines keep per pair and per chunk.
SUMS = 3


def norm_terms(hyper, w, g):
    """One element's terms of the sums the rate depends on, ``g`` multiplied by
    ``grad_scale`` first: ``(w**2, g**2, (g + weight_decay * w)**2)``, the last for
    ``denominator="update"``."""
    g = hyper[GRAD_SCALE] * g
    update = g + hyper[WEIGHT_DECAY] * w
    return w * w, g * g, update * update


def rate_from_sums(sums, hyper):
    """``trust_coefficient * ||w|| / denominator`` if ``||w|| > threshold``, else 1.

    The denominator is ``eps + ||g|| + weight_decay * ||w||`` (``"sum"``:
    Chainer, the paper, apex, timm) or ``eps + ||g + weight_decay * w||``
    (``"update"``: optax, TensorFlow), where a zero norm of the update gives
    rate 1, as in optax. With ``clip_lr``, LARC's clipping: ``min(rate /
    clip_lr, 1)``.
    """
    threshold, weight_decay, eps, trust_coefficient = hyper[:4]
    w_norm = math.sqrt(sums[0])
    if not w_norm > threshold:
        return 1.0
    if hyper[DENOMINATOR]:
        update_norm = math.sqrt(sums[2])
        if update_norm == 0.0:
            return 1.0
        rate = trust_coefficient * w_norm / (eps + update_norm)
    else:
        rate = trust_coefficient * w_norm / (eps + math.sqrt(sums[1]) + weight_decay * w_norm)
    if hyper[CLIP_LR] > 0.0:
        clipped = rate / hyper[CLIP_LR]
        # Written so that a NaN rate stays NaN, as it would without clipping.
        rate = 1.0 if clipped > 1.0 else clipped
    return rate


def scaled_gradient(rate, hyper, w, g):
    """``(w, g)`` after ``g <- rate * (g + weight_decay / grad_scale * w)``: a gradient
    that is loss-scaled (by ``1 / grad_scale``) stays so, for the optimizer to unscale."""
    # With grad_scale 1, weight_decay exactly, as the loop hoists the division.
    return w, rate * (g + hyper[WEIGHT_DECAY] / hyper[GRAD_SCALE] * w)


def momentum_step(rate, hyper, w, g, v):
    """``(w, g, v)`` after one step of momentum SGD on the scaled gradient, in
    Chainer's ``MomentumSGD`` convention:
    ``v <- momentum * v - lr * rate * (grad_scale * g + weight_decay * w)``, ``w <- w + v``."""
    step = rate * (hyper[GRAD_SCALE] * g + hyper[WEIGHT_DECAY] * w)
    velocity = hyper[MOMENTUM] * v - hyper[LR] * step
    return w + velocity, g, velocity


class Update(NamedTuple):
    """An update the engines apply to the arrays of each pair, after the rate."""

    function: object  #: ``function(rate, hyper, *values) -> values``, one value per array
    written: tuple[bool, ...]  #: which of the arrays it writes, in order
    #: Whether the pair has one array more, after the function's, which receives
    #: the first array's new value as stored, rounded to its own dtype: a float16
    #: parameter of a float32 master, as Chainer's ``use_fp32_update`` copies it.
    rounded_copy: bool = False

    @property
    def arrays(self) -> int:
        """The number of arrays of a pair."""
        return len(self.written) + self.rounded_copy


#: Every update, by name. The first two arrays of a pair are always the
#: weights and the gradient, the arrays the sums are taken over.
UPDATES = {
    "scale": Update(scaled_gradient, written=(False, True)),
    "momentum": Update(momentum_step, written=(True, False, True)),
    "momentum_master": Update(momentum_step, written=(True, False, True), rounded_copy=True),
}

#: A digest of this file, which the engines compile into their kernels so that
#: Numba's on-disk cache, which checks only a kernel's own file, recompiles
#: them when the rule changes.
SOURCE_DIGEST = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
