"""Chainer optimizer hooks backed by the lars_numba kernels.

This is the only module of the package that imports chainer.
"""

from __future__ import annotations

import warnings

import chainer
import chainer.optimizer_hooks

from . import _api

__all__ = ["FallbackWarning", "GradientLARS"]


class FallbackWarning(UserWarning):
    """A hook met arrays the kernels do not take and used Chainer's arithmetic instead."""


class GradientLARS:
    """Optimizer/UpdateRule hook for layer-wise adaptive rate scaling (LARS).

    A drop-in for :class:`chainer.optimizer_hooks.GradientLARS`, with the same
    constructor, attributes and results, computed by lars_numba's compiled
    kernels: two passes over each parameter instead of Chainer's half-dozen
    NumPy operations. For each parameter :math:`w` with gradient :math:`g`:

    .. math::

        r = \\begin{cases}
              \\dfrac{\\|w\\|}{\\epsilon + \\|g\\| + \\lambda \\|w\\|} & \\|w\\| > \\tau \\\\
              1 & \\text{otherwise}
            \\end{cases}
        \\qquad g \\leftarrow r\\,(g + \\lambda w)

    with :math:`\\tau` = ``threshold``, :math:`\\lambda` = ``weight_decay`` and
    :math:`\\epsilon` = ``eps``. The optimizer's learning rate then plays the
    part of the global rate times the LARS coefficient, as in Chainer (see
    `Large Batch Training of Convolutional Networks
    <https://arxiv.org/abs/1708.03888>`_).

    The norms are accumulated in float64 and the update is rounded once to the
    gradient's dtype, so where Chainer's hook overflows to NaN on a float16
    parameter whose sum of squares exceeds 65504, this one stays finite.

    Arrays the kernels take (NumPy arrays, CUDA arrays such as CuPy's) are
    scaled by :func:`lars_numba.scale`'s kernels. Any other array (ChainerX,
    iDeep) is handed to Chainer's own hook, so training goes on, and the first
    such parameter raises a :class:`FallbackWarning` once per hook.

    Parameters
    ----------
    threshold : float, optional
        Weights whose norm is at most this keep rate 1.
    weight_decay : float, optional
        The L2 coefficient added to the gradient before scaling.
    eps : float, optional
        Added to the denominator of the rate.
    parallel : bool, optional
        Run large parameters on all of Numba's threads. Off by default: in a
        training loop NumPy's BLAS threads stay busy on the cores between
        matrix products, and a parallel kernel called right after one waited
        6 to 11 ms for a core on 2 cores, against 0.15 ms when idle. An
        addition to Chainer's constructor.

    Attributes
    ----------
    threshold, weight_decay, eps : float
        As above; they are read at every call, so they may be changed
        between updates.
    name : str
        ``'GradientLARS'``, the default name of the registration.
    timing : str
        ``'pre'``: the hook runs before the update rule.
    call_for_each_param : bool
        ``True``: the optimizer calls the hook once per parameter.

    Raises
    ------
    TypeError
        If a hyperparameter is not a real number, here or at a call.
    ValueError
        If a hyperparameter is negative or not finite, here or at a call.

    Examples
    --------
    >>> import chainer
    >>> import numpy as np
    >>> from lars_numba.chainer import GradientLARS
    >>> model = chainer.links.Linear(2, 1, initialW=np.array([[3.0, 4.0]], np.float32))
    >>> optimizer = chainer.optimizers.SGD(lr=0.1).setup(model)
    >>> optimizer.add_hook(GradientLARS(eps=0.0))
    >>> model.W.grad = np.array([[0.6, 0.8]], np.float32)  # rate = 5 / 1
    >>> model.b.grad = np.zeros(1, np.float32)  # ||b|| = 0 <= threshold: rate 1
    >>> optimizer.update()
    >>> model.W.array
    array([[2.7, 3.6]], dtype=float32)
    """

    name = "GradientLARS"
    call_for_each_param = True
    timing = "pre"

    def __init__(
        self,
        threshold: float = 1e-2,
        weight_decay: float = 0.0,
        eps: float = 1e-9,
        parallel: bool = False,
    ):
        # Checked here to fail at construction rather than at the first update.
        _api.hyperparameters(threshold, weight_decay, eps)
        self.threshold = threshold
        self.weight_decay = weight_decay
        self.eps = eps
        self.parallel = parallel
        self._warned = False

    def __call__(self, rule: chainer.UpdateRule | None, param: chainer.Parameter) -> None:
        w, g = param.array, param.grad
        if w is None or g is None:
            return
        if not (_api.accepts(w) and _api.accepts(g)):
            self._fall_back(rule, param)
            return
        hyper = _api.hyperparameters(self.threshold, self.weight_decay, self.eps)
        # Optimizer.add_hook calls the hook outside the update rule's device
        # scope; the CUDA kernels run on the current device, which must be w's.
        with chainer.using_device(param.device):
            _api.scale(w, g, hyper, self.parallel)

    def _fall_back(self, rule: chainer.UpdateRule | None, param: chainer.Parameter) -> None:
        """Chainer's own hook, which computes through ``param.device.xp``."""
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"lars_numba's kernels do not take parameter {param.name!r}, a "
                f"{type(param.array).__name__} with a {type(param.grad).__name__} gradient; "
                "GradientLARS uses Chainer's slower arithmetic for such parameters",
                FallbackWarning,
                stacklevel=3,
            )
        # Both paths refuse the same hyperparameters, which Chainer's hook does not check.
        _api.hyperparameters(self.threshold, self.weight_decay, self.eps)
        chainer.optimizer_hooks.GradientLARS(self.threshold, self.weight_decay, self.eps)(
            rule, param
        )
