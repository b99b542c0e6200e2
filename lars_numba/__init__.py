"""Layer-wise adaptive rate scaling (LARS) as fused Numba kernels.

``scale(w, g)`` scales the gradient ``g`` of the weights ``w`` in place by the
LARS trust ratio, exactly as Chainer's ``GradientLARS`` hook does for one
parameter; ``trust_ratio(w, g)`` returns the ratio without touching ``g``;
``scale_all(ws, gs)`` scales the gradients of a whole model in one call;
``momentum_step(ws, gs, vs, lr=...)`` takes a whole LARS momentum-SGD step.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import version

import numpy as np

from . import _api

__all__ = ["__version__", "momentum_step", "scale", "scale_all", "trust_ratio"]

__version__ = version("lars_numba")


def scale(
    w: np.ndarray,
    g: np.ndarray,
    *,
    threshold: float = 1e-2,
    weight_decay: float = 0.0,
    eps: float = 1e-9,
    trust_coefficient: float = 1.0,
    denominator: str = "sum",
    clip_lr: float | None = None,
    parallel: bool = True,
) -> np.ndarray:
    """Scale the gradient ``g`` of the weights ``w`` in place by the LARS rule.

    .. math::

        r = \\begin{cases}
              \\dfrac{\\eta \\|w\\|}{\\epsilon + \\|g\\| + \\lambda \\|w\\|} & \\|w\\| > \\tau \\\\
              1 & \\text{otherwise}
            \\end{cases}
        \\qquad g \\leftarrow r\\,(g + \\lambda w)

    with :math:`\\tau` = ``threshold``, :math:`\\lambda` = ``weight_decay``,
    :math:`\\epsilon` = ``eps`` and :math:`\\eta` = ``trust_coefficient``: by
    default the rule of Chainer's ``GradientLARS``; the other frameworks'
    variants are arguments (:doc:`/variants`). Weight decay is added even where
    the rate is 1. Norms are accumulated in float64, and the update is
    computed in float64 and rounded once to ``g``'s dtype.

    Parameters
    ----------
    w : numpy.ndarray
        The weights: float16, float32 or float64, any shape and strides.
    g : numpy.ndarray
        The gradient: writeable, with the dtype and shape of ``w``. It may be
        ``w`` itself or overlap it.
    threshold : float, optional
        Weights whose norm is at most this keep rate 1.
    weight_decay : float, optional
        The L2 coefficient added to the gradient before scaling.
    eps : float, optional
        Added to the denominator of the rate.
    trust_coefficient : float, optional
        The paper's :math:`\\eta`, a factor of the rate where ``||w|| >
        threshold``; 1 folds it into the learning rate, as Chainer does.
    denominator : {"sum", "update"}, optional
        ``"sum"``: ``eps + ||g|| + weight_decay * ||w||`` (Chainer, the paper,
        apex, timm); ``"update"``: ``eps + ||g + weight_decay * w||``, the norm
        of the decayed gradient (optax, TensorFlow), where a zero norm gives
        rate 1. Both take their norms in the same single pass.
    clip_lr : float, optional
        LARC's clipping with this learning rate: the rate becomes
        ``min(rate / clip_lr, 1)``, so that the step is the smaller of the
        local and the global learning rate.
    parallel : bool, optional
        Let NumPy arrays of at least ``lars_numba.tunables.PARALLEL_MIN_SIZE``
        elements run on all of Numba's threads. Pass ``False`` inside a loop
        whose other work keeps threads of its own busy on the same cores, such
        as NumPy's BLAS between matrix products: a parallel kernel then waits
        for a core (milliseconds, measured on 2 cores).

    Returns
    -------
    numpy.ndarray
        ``g``, scaled in place.

    Raises
    ------
    TypeError
        If ``w`` or ``g`` is not an array, their dtypes differ or are not
        float16, float32 or float64, or a hyperparameter is not a real number.
    ValueError
        If the shapes differ, ``g`` is read-only, a hyperparameter is
        negative or not finite, ``denominator`` is not one of its values or
        ``clip_lr`` is not positive. Nothing is written when an error is raised.

    Examples
    --------
    >>> import numpy as np
    >>> import lars_numba
    >>> w = np.array([3.0, 4.0], dtype=np.float32)
    >>> g = np.array([0.6, 0.8], dtype=np.float32)
    >>> lars_numba.scale(w, g, eps=0.0)  # rate = 5 / 1
    array([3., 4.], dtype=float32)
    >>> g
    array([3., 4.], dtype=float32)
    """
    _api.scale(
        w,
        g,
        _api.hyperparameters(threshold, weight_decay, eps, trust_coefficient, denominator, clip_lr),
        parallel,
    )
    return g


def trust_ratio(
    w: np.ndarray,
    g: np.ndarray,
    *,
    threshold: float = 1e-2,
    weight_decay: float = 0.0,
    eps: float = 1e-9,
    trust_coefficient: float = 1.0,
    denominator: str = "sum",
    clip_lr: float | None = None,
    parallel: bool = True,
) -> float:
    """The rate :func:`scale` would apply to ``g``, leaving ``g`` untouched.

    Parameters
    ----------
    w, g : numpy.ndarray
        As for :func:`scale`, except that ``g`` may be read-only.
    threshold, weight_decay, eps, trust_coefficient, denominator, clip_lr, parallel : optional
        As for :func:`scale`.

    Returns
    -------
    float
        ``trust_coefficient * ||w|| / (eps + ||g|| + weight_decay * ||w||)``
        (or the other ``denominator``, clipped with ``clip_lr``) if
        ``||w|| > threshold``, else 1.0.

    Raises
    ------
    TypeError, ValueError
        As for :func:`scale`.

    Examples
    --------
    >>> import numpy as np
    >>> import lars_numba
    >>> w = np.array([3.0, 4.0])
    >>> lars_numba.trust_ratio(w, np.array([0.0, 1.0]), weight_decay=0.1, eps=0.0)
    3.3333333333333335
    >>> lars_numba.trust_ratio(w, np.array([0.0, 1.0]), threshold=5.0)
    1.0
    """
    return _api.trust_ratio(
        w,
        g,
        _api.hyperparameters(threshold, weight_decay, eps, trust_coefficient, denominator, clip_lr),
        parallel,
    )


def scale_all(
    ws: Sequence[np.ndarray],
    gs: Sequence[np.ndarray],
    *,
    threshold: float = 1e-2,
    weight_decay: float = 0.0,
    eps: float = 1e-9,
    trust_coefficient: float = 1.0,
    denominator: str = "sum",
    clip_lr: float | None = None,
    weight_decay_mask: Sequence[bool] | None = None,
    trust_ratio_mask: Sequence[bool] | None = None,
    rates: np.ndarray | None = None,
    parallel: bool = True,
) -> None:
    """Scale every gradient ``gs[i]`` of the weights ``ws[i]`` in place, in one call.

    The result is that of :func:`scale` on each pair, but the contiguous NumPy
    pairs of each dtype are scaled by one compiled call with no Python loop
    over them, cut into chunks that all of Numba's threads share, and a pair
    small enough to stay in cache is scaled right after its norms are taken.
    Each rate is computed from float64 sums added in a fixed order, so it does
    not depend on the thread count. CUDA arrays share a few kernel launches
    (see :doc:`/gpu`).

    Parameters
    ----------
    ws : sequence of numpy.ndarray
        The weights, as for :func:`scale`; the pairs may differ in shape and
        dtype.
    gs : sequence of numpy.ndarray
        The gradients, ``gs[i]`` of the dtype and shape of ``ws[i]``. A
        gradient may be its own weights or overlap them, but its address
        range must not overlap any other pair's arrays (interleaved strided
        views are refused, though they share no element). This is checked
        for NumPy arrays; on a GPU it is the caller's to ensure.
    threshold, weight_decay, eps, trust_coefficient, denominator, clip_lr : optional
        As for :func:`scale`, for every pair.
    weight_decay_mask : sequence of bool, optional
        One per pair: ``False`` where the pair gets no weight decay (biases and
        normalization parameters, say). All ``True`` by default.
    trust_ratio_mask : sequence of bool, optional
        One per pair: ``False`` where the pair keeps rate 1, its gradient only
        gaining the weight decay. All ``True`` by default. The masks follow
        the naming of optax's ``lars``; TensorFlow calls the same choices
        ``exclude_from_weight_decay`` and ``exclude_from_layer_adaptation``.
    rates : numpy.ndarray, optional
        A float64 array of one entry per pair, on the arrays' device, that
        receives each pair's rate. On a GPU it is written on the stream,
        without waiting for it.
    parallel : bool, optional
        As for :func:`scale`, over the elements of all pairs together.

    Raises
    ------
    TypeError
        If ``ws`` or ``gs`` is not a sequence of arrays, a pair is refused as
        by :func:`scale`, NumPy and CUDA arrays are mixed, a mask does not
        hold booleans or ``rates`` is not a float64 array.
    ValueError
        If ``ws`` and ``gs`` differ in length, a pair or a hyperparameter is
        refused as by :func:`scale`, a mask or ``rates`` does not have one
        entry per pair, ``rates`` is read-only, or a written array's address
        range overlaps another pair's arrays. Nothing is written when an error
        is raised.

    Examples
    --------
    >>> import numpy as np
    >>> import lars_numba
    >>> ws = [np.array([3.0, 4.0]), np.array([0.5])]
    >>> gs = [np.array([0.6, 0.8]), np.array([1.0])]
    >>> rates = np.empty(2)
    >>> lars_numba.scale_all(ws, gs, eps=0.0, weight_decay=0.5,
    ...                      weight_decay_mask=[True, False], rates=rates)
    >>> rates  # 5 / (1 + 0.5 * 5); 0.5 / 1
    array([1.42857143, 0.5       ])
    >>> gs[0]  # (g + 0.5 * w) * rate
    array([3., 4.])
    """
    _api.scale_all(
        ws,
        gs,
        _api.hyperparameters(threshold, weight_decay, eps, trust_coefficient, denominator, clip_lr),
        weight_decay_mask,
        trust_ratio_mask,
        rates,
        parallel,
    )


def momentum_step(
    ws: Sequence[np.ndarray],
    gs: Sequence[np.ndarray],
    vs: Sequence[np.ndarray],
    *,
    lr: float,
    momentum: float = 0.9,
    threshold: float = 1e-2,
    weight_decay: float = 0.0,
    eps: float = 1e-9,
    trust_coefficient: float = 1.0,
    denominator: str = "sum",
    clip: bool = False,
    weight_decay_mask: Sequence[bool] | None = None,
    trust_ratio_mask: Sequence[bool] | None = None,
    grad_scale: float = 1.0,
    skip_nonfinite: bool = False,
    masters: Sequence[np.ndarray | None] | None = None,
    rates: np.ndarray | None = None,
    parallel: bool = True,
    nonfinite: object | None = None,
) -> bool | None:
    """One LARS momentum-SGD step of every pair, fused: two passes over memory.

    For each pair, with ``G = grad_scale * gs[i]`` and ``W`` the weights
    (``masters[i]`` where given, else ``ws[i]``)::

        rate = the rate of scale_all for W and G, with the same arguments
        v   <- momentum * v - lr * rate * (G + weight_decay * W)
        W   <- W + v

    in Chainer's ``MomentumSGD`` convention (with ``v = 0`` at the start the
    same steps as timm's and optax's momentum). Every value is computed in
    float64 from the arrays' values and rounded once to the dtype of the
    array it is written to, but for ``ws[i]`` of a pair with a master, which
    is the new master as stored, rounded to ``ws[i]``'s dtype (as Chainer's
    ``use_fp32_update`` copies it); ``gs[i]`` is only read. The rates are those of
    :func:`scale_all` on ``W`` and ``G``, bit for bit, whatever the thread
    count and the other pairs of the call.

    The arrays may be NumPy arrays or CUDA arrays (CuPy's, Numba's, any
    ``__cuda_array_interface__``), all of one kind. On CUDA arrays the step is
    two launches per group of up to ``tunables.GROUP_PAIRS`` pairs of the same
    dtypes, enqueued on the caller's stream without synchronization (as for
    :func:`scale_all`); the call returns ``None`` and, with
    ``skip_nonfinite``, the decision to skip is made on the device.

    Parameters
    ----------
    ws : sequence of numpy.ndarray or CUDA arrays
        The weights, updated in place; float16, float32 or float64, any shape
        and layout.
    gs : sequence of numpy.ndarray or CUDA arrays
        The gradients, ``gs[i]`` of the dtype and shape of ``ws[i]``; they may
        be read-only.
    vs : sequence of numpy.ndarray or CUDA arrays
        The velocities, updated in place: ``vs[i]`` of the shape of ``ws[i]``
        and of its dtype, or float32 where ``ws[i]`` is float16 or has a master.
    lr : float
        The learning rate, finite and >= 0.
    momentum : float, optional
        Finite and >= 0.
    threshold, weight_decay, eps, trust_coefficient, denominator : optional
        As for :func:`scale`.
    clip : bool, optional
        LARC's clipping with this ``lr``: the rate becomes ``min(rate / lr, 1)``,
        1 at ``lr=0`` (the limit from above, as at the start of a warm-up).
    weight_decay_mask, trust_ratio_mask : sequence of bool, optional
        As for :func:`scale_all`.
    grad_scale : float, optional
        A factor applied to every gradient inside both passes, for the norms
        and the step: the inverse of a loss scale (MXNet's ``rescale_grad``).
        Finite and > 0.
    skip_nonfinite : bool, optional
        If true and some gradient holds NaN or Inf (seen as a sum of squares
        that is not finite, in the pass that takes the norms), nothing is
        written and the call returns ``False``. A float64 gradient beyond
        1e154 in magnitude, whose square overflows, counts as non-finite.
    masters : sequence of numpy.ndarray or None, optional
        One entry per pair, ``None`` or float32 weights of the shape of
        ``ws[i]`` (the master copy of float16 weights) that the rule reads and
        the step updates; ``ws[i]`` is then written as the new master's
        rounding, ``masters[i].astype(ws[i].dtype)``, in the same pass.
    rates : numpy.ndarray, optional
        A float64 array of one entry per pair that receives each pair's rate
        (left as it was when the step is skipped).
    parallel : bool, optional
        As for :func:`scale_all`.
    nonfinite : CUDA array, optional
        With CUDA arrays only: a bool array of shape ``(1,)`` that receives,
        on the device, whether some gradient held NaN or Inf (so that the
        step was skipped, with ``skip_nonfinite``). The call reads and writes
        it on its stream; read it after that stream's work.

    Returns
    -------
    bool or None
        Whether the step was taken: ``False`` only when ``skip_nonfinite``
        found a non-finite gradient. ``None`` for CUDA arrays, whose step is
        enqueued (see ``nonfinite``).

    Raises
    ------
    TypeError
        If an argument is not a sequence of NumPy arrays or of CUDA arrays,
        the arrays are of both kinds, a dtype is not one described above, a
        mask does not hold booleans, or ``nonfinite`` is given with NumPy
        arrays or is not a bool CUDA array of shape ``(1,)``.
    ValueError
        If the sequences differ in length, a shape differs from that of
        ``ws[i]``, a hyperparameter is out of range, a written array (``ws``,
        ``vs``, ``masters``, ``rates``, ``nonfinite``) is read-only or its
        address range overlaps any other array of the call. Nothing is
        written when an error is raised.

    Examples
    --------
    >>> import numpy as np
    >>> import lars_numba
    >>> ws, gs, vs = [np.array([3.0, 4.0])], [np.array([0.6, 0.8])], [np.zeros(2)]
    >>> lars_numba.momentum_step(ws, gs, vs, lr=0.1, eps=0.0)  # rate 5 / 1
    True
    >>> vs[0]  # -0.1 * 5 * g
    array([-0.3, -0.4])
    >>> ws[0]
    array([2.7, 3.6])
    """
    return _api.momentum_step(
        ws,
        gs,
        vs,
        masters,
        _api.hyperparameters(
            threshold,
            weight_decay,
            eps,
            trust_coefficient,
            denominator,
            grad_scale=grad_scale,
            lr=lr,
            momentum=momentum,
        ),
        clip,
        weight_decay_mask,
        trust_ratio_mask,
        rates,
        skip_nonfinite,
        parallel,
        nonfinite,
    )
