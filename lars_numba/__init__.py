"""Layer-wise adaptive rate scaling (LARS) as fused Numba kernels.

``scale(w, g)`` scales the gradient ``g`` of the weights ``w`` in place by the
LARS trust ratio, exactly as Chainer's ``GradientLARS`` hook does for one
parameter; ``trust_ratio(w, g)`` returns the ratio without touching ``g``.
"""

from __future__ import annotations

from importlib.metadata import version

import numpy as np

from . import _api

__all__ = ["__version__", "scale", "trust_ratio"]

__version__ = version("lars_numba")


def scale(
    w: np.ndarray,
    g: np.ndarray,
    *,
    threshold: float = 1e-2,
    weight_decay: float = 0.0,
    eps: float = 1e-9,
    parallel: bool = True,
) -> np.ndarray:
    """Scale the gradient ``g`` of the weights ``w`` in place by the LARS rule.

    .. math::

        r = \\begin{cases}
              \\dfrac{\\|w\\|}{\\epsilon + \\|g\\| + \\lambda \\|w\\|} & \\|w\\| > \\tau \\\\
              1 & \\text{otherwise}
            \\end{cases}
        \\qquad g \\leftarrow r\\,(g + \\lambda w)

    with :math:`\\tau` = ``threshold``, :math:`\\lambda` = ``weight_decay`` and
    :math:`\\epsilon` = ``eps``: the rule of Chainer's ``GradientLARS``. Weight
    decay is added even where the rate is 1. Norms are accumulated in float64,
    and the update is computed in float64 and rounded once to ``g``'s dtype.

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
    parallel : bool, optional
        Let NumPy arrays of at least ``lars_numba._cpu.PARALLEL_MIN_SIZE``
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
        If the shapes differ, ``g`` is read-only, or a hyperparameter is
        negative or not finite. Nothing is written when an error is raised.

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
    _api.scale(w, g, _api.hyperparameters(threshold, weight_decay, eps), parallel)
    return g


def trust_ratio(
    w: np.ndarray,
    g: np.ndarray,
    *,
    threshold: float = 1e-2,
    weight_decay: float = 0.0,
    eps: float = 1e-9,
    parallel: bool = True,
) -> float:
    """The rate :func:`scale` would apply to ``g``, leaving ``g`` untouched.

    Parameters
    ----------
    w, g : numpy.ndarray
        As for :func:`scale`, except that ``g`` may be read-only.
    threshold, weight_decay, eps, parallel : optional
        As for :func:`scale`.

    Returns
    -------
    float
        ``||w|| / (eps + ||g|| + weight_decay * ||w||)`` if
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
    return _api.trust_ratio(w, g, _api.hyperparameters(threshold, weight_decay, eps), parallel)
