"""Chainer optimizer hooks backed by the lars_numba kernels.

This is the only module of the package that imports chainer.
"""

from __future__ import annotations

import fnmatch
import math
import numbers
import warnings
from collections.abc import Callable, Iterable

import chainer
import chainer.optimizer_hooks
import numpy as np

from . import _api, _rule

__all__ = ["FallbackWarning", "FusedGradientLARS", "GradientLARS", "ndim_at_most"]

#: What ``exclude`` and its finer variants take: patterns over parameter paths
#: such as ``'/conv1/b'`` (:func:`fnmatch.fnmatchcase`, so ``'*/b'`` is every
#: bias), or a predicate called with the path and the parameter.
Exclusion = str | Iterable[str] | Callable[[str, chainer.Parameter], bool] | None


class FallbackWarning(UserWarning):
    """A hook met arrays the kernels do not take and used Chainer's arithmetic instead."""


class _Hyperparameters:
    """The hyperparameters and the fallback that both hooks share."""

    def __init__(
        self,
        threshold: float,
        weight_decay: float,
        eps: float,
        parallel: bool,
        trust_coefficient: float,
        denominator: str,
        clip: bool,
    ):
        # Checked here to fail at construction rather than at the first update.
        _api.hyperparameters(threshold, weight_decay, eps, trust_coefficient, denominator)
        if not isinstance(clip, bool):
            raise TypeError(f"clip must be a bool; got {type(clip).__name__}")
        self.threshold = threshold
        self.weight_decay = weight_decay
        self.eps = eps
        self.trust_coefficient = trust_coefficient
        self.denominator = denominator
        self.clip = clip
        self.parallel = parallel
        self._warned = False

    def _hyper(self, lr: Callable[[], float]) -> _api.Hyperparameters:
        """The hyperparameters; with ``clip``, LARC's clipping at ``lr()``."""
        return _api.hyperparameters(
            self.threshold,
            self.weight_decay,
            self.eps,
            self.trust_coefficient,
            self.denominator,
            lr() if self.clip else None,
        )

    def _fall_back(
        self,
        param: chainer.Parameter,
        hyper: _api.Hyperparameters,
        *,
        decays: bool = True,
        adapts: bool = True,
    ) -> None:
        """The rule of :mod:`lars_numba._rule` through ``param``'s own array arithmetic.

        ``decays`` and ``adapts`` say whether ``param`` gets weight decay and
        its trust ratio. The sums and the update are computed in float64, as
        the kernels compute them, through float64 copies of the arrays.
        """
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"lars_numba's kernels do not take parameter {param.name!r}, a "
                f"{type(param.array).__name__} with a {type(param.grad).__name__} gradient; "
                f"{type(self).__name__} computes the rule with the arrays' own, slower "
                "arithmetic for such parameters",
                FallbackWarning,
                stacklevel=3,
            )
        hyper = _rule.masked(hyper, decays, adapts)
        g = param.grad
        w64, g64 = (array.astype(np.float64) for array in (param.array, g))
        sums = tuple(float(term.sum()) for term in _rule.norm_terms(hyper, w64, g64))
        _, scaled = _rule.scaled_gradient(_rule.rate_from_sums(sums, hyper), hyper, w64, g64)
        g[...] = scaled


class GradientLARS(_Hyperparameters):
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
    iDeep) gets the same rule through its own array arithmetic, in float64
    copies, so training goes on, and the first such parameter raises a
    :class:`FallbackWarning` once per hook.

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
    trust_coefficient, denominator : optional
        As for :func:`lars_numba.scale`: the paper's :math:`\\eta`, and
        ``"update"`` for the norm of the decayed gradient (:doc:`/variants`).
        Additions to Chainer's constructor, keyword-only.
    clip : bool, optional
        LARC's clipping, ``min(rate / lr, 1)``, with the learning rate of the
        update rule (``rule.hyperparam.lr``) read at every call, so that
        learning-rate schedules apply.

    Attributes
    ----------
    threshold, weight_decay, eps, trust_coefficient, denominator, clip
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
        *,
        trust_coefficient: float = 1.0,
        denominator: str = "sum",
        clip: bool = False,
    ):
        super().__init__(
            threshold, weight_decay, eps, parallel, trust_coefficient, denominator, clip
        )

    def __call__(self, rule: chainer.UpdateRule | None, param: chainer.Parameter) -> None:
        w, g = param.array, param.grad
        if w is None or g is None:
            return
        hyper = self._hyper(lambda: _learning_rate(rule))
        if not (_api.accepts(w) and _api.accepts(g)):
            self._fall_back(param, hyper)
            return
        if isinstance(w, np.ndarray):
            _api.scale(w, g, hyper, self.parallel)
            return
        # Optimizer.add_hook calls the hook outside the update rule's device
        # scope; the CUDA kernels run on the current device, which must be w's.
        with chainer.using_device(param.device):
            _api.scale(w, g, hyper, self.parallel)


class FusedGradientLARS(_Hyperparameters):
    """LARS for a whole model in one call per update, with exclusions and reporting.

    The rule of :class:`GradientLARS`, with results identical to registering
    it, but Chainer calls this hook once per update with the optimizer
    (``call_for_each_param = False``), and it scales the gradients of every
    parameter that has an array and a gradient with one
    :func:`lars_numba.scale_all` per device: one compiled call on the CPU, a
    few shared kernel launches on a GPU, instead of a call and its overhead
    per parameter. Register it with ``optimizer.add_hook``; an update rule
    calls its hooks per parameter, so use :class:`GradientLARS` there.

    Parameters
    ----------
    threshold, weight_decay, eps : float, optional
        As for :class:`GradientLARS`.
    exclude : str, iterable of str or callable, optional
        The parameters that get neither weight decay nor scaling: their
        gradients are left as they are, as if the hook did not see them.
        Patterns over parameter paths such as ``'/conv1/b'``, matched with
        :func:`fnmatch.fnmatchcase` (``'*/b'`` is every bias,
        ``('*/gamma', '*/beta')`` every batch normalization), or a predicate
        ``exclude(path, param) -> bool``. Each path is decided at its first
        update and the decision kept.
    exclude_from_weight_decay, exclude_from_adaptation : optional
        The finer split, in the same forms as ``exclude``: parameters that get
        no weight decay, or keep rate 1 (the weight decay is still added), as
        TensorFlow's LARS options of these names. A parameter matched by
        ``exclude`` or by both is excluded from both.
    report : bool, optional
        Report each parameter's trust ratio to :func:`chainer.report` as
        ``'lars' + path``, such as ``'lars/conv1/W'``, so that
        :class:`~chainer.training.extensions.LogReport` and
        :class:`~chainer.training.extensions.PlotReport` can log and plot
        them. Parameters that take the fallback arithmetic are not
        reported. Off by default, and then it costs nothing.
    parallel, trust_coefficient, denominator : optional
        As for :class:`GradientLARS`.
    clip : bool, optional
        LARC's clipping, ``min(rate / lr, 1)``, with the optimizer's learning
        rate (``optimizer.lr``) read at every call.

    Attributes
    ----------
    threshold, weight_decay, eps, trust_coefficient, denominator, clip, report
        As above; read at every call.
    name : str
        ``'FusedGradientLARS'``, the default name of the registration.
    timing : str
        ``'pre'``: the hook runs before the update rules.
    call_for_each_param : bool
        ``False``: the optimizer calls the hook once per update.

    Raises
    ------
    TypeError
        If a hyperparameter is not a real number or an exclusion is not of
        the forms above, here or at a call.
    ValueError
        If a hyperparameter is negative or not finite, here or at a call.

    Examples
    --------
    >>> import chainer
    >>> import numpy as np
    >>> from lars_numba.chainer import FusedGradientLARS
    >>> model = chainer.links.Linear(2, 1, initialW=np.array([[3.0, 4.0]], np.float32))
    >>> optimizer = chainer.optimizers.SGD(lr=0.1).setup(model)
    >>> optimizer.add_hook(FusedGradientLARS(eps=0.0, exclude="*/b", report=True))
    >>> model.W.grad = np.array([[0.75, 1.0]], np.float32)  # rate = 5 / 1.25
    >>> model.b.grad = np.ones(1, np.float32)  # excluded: left as it is
    >>> reporter = chainer.Reporter()
    >>> with reporter.scope(observation := {}):
    ...     optimizer.update()
    >>> observation
    {'lars/W': 4.0}
    >>> model.W.array, model.b.array
    (array([[2.7, 3.6]], dtype=float32), array([-0.1], dtype=float32))
    """

    name = "FusedGradientLARS"
    call_for_each_param = False
    timing = "pre"

    def __init__(
        self,
        threshold: float = 1e-2,
        weight_decay: float = 0.0,
        eps: float = 1e-9,
        exclude: Exclusion = None,
        *,
        exclude_from_weight_decay: Exclusion = None,
        exclude_from_adaptation: Exclusion = None,
        report: bool = False,
        parallel: bool = False,
        trust_coefficient: float = 1.0,
        denominator: str = "sum",
        clip: bool = False,
    ):
        super().__init__(
            threshold, weight_decay, eps, parallel, trust_coefficient, denominator, clip
        )
        self.report = report
        self._exclusions = tuple(
            _exclusion(name, value)
            for name, value in (
                ("exclude", exclude),
                ("exclude_from_weight_decay", exclude_from_weight_decay),
                ("exclude_from_adaptation", exclude_from_adaptation),
            )
        )
        self._rules: dict[str, tuple[bool, bool]] = {}

    def __call__(self, optimizer: chainer.Optimizer, *args: object) -> None:
        if args:
            raise TypeError(
                "FusedGradientLARS is called once per update with the optimizer: register it "
                "with optimizer.add_hook, or use GradientLARS with update_rule.add_hook"
            )
        hyper = self._hyper(lambda: _learning_rate(optimizer))
        groups: dict[str, _Group] = {}
        for path, param in optimizer.target.namedparams():
            # An uninitialized parameter refuses to give its gradient: ask in order.
            w = param.array
            g = None if w is None else param.grad
            if g is None:
                continue
            rule = self._rules.get(path) or self._rule_for(path, param)
            if rule == (False, False):
                continue
            if type(w) is np.ndarray and type(g) is np.ndarray:
                device = "@numpy"
            elif _api.accepts(w) and _api.accepts(g):
                device = param.device.name
            else:
                self._fall_back(param, hyper, decays=rule[0], adapts=rule[1])
                continue
            group = groups.get(device)
            if group is None:
                group = groups[device] = _Group(param.device)
            group.add(path, w, g, rule)
        for group in groups.values():
            self._scale(group, hyper)

    def _rule_for(self, path: str, param: chainer.Parameter) -> tuple[bool, bool]:
        """Whether ``param`` gets weight decay, and its trust ratio: decided once per path."""
        both, decay, adaptation = (matches(path, param) for matches in self._exclusions)
        rule = self._rules[path] = (not (both or decay), not (both or adaptation))
        return rule

    def _scale(self, group: _Group, hyper: _api.Hyperparameters) -> None:
        masks = [None, None]
        if not all(decays and adapts for decays, adapts in group.rules):
            masks = [[rule[column] for rule in group.rules] for column in (0, 1)]
        rates = group.device.xp.empty(len(group.ws)) if self.report else None
        # The CUDA kernels run on the current device, which must be the arrays'.
        with chainer.using_device(group.device):
            _api.scale_all(group.ws, group.gs, hyper, *masks, rates, self.parallel)
        if rates is not None:
            # Python floats from the CPU; on a GPU, device scalars that the
            # reporter's summaries read only when they log.
            values = rates.tolist() if isinstance(rates, np.ndarray) else rates
            chainer.report(
                {"lars" + path: rate for path, rate in zip(group.paths, values, strict=True)}
            )


class _Group:
    """The parameters of one device that :class:`FusedGradientLARS` scales in one call."""

    def __init__(self, device: chainer.backend.Device):
        self.device = device
        self.paths: list[str] = []
        self.ws: list = []
        self.gs: list = []
        self.rules: list[tuple[bool, bool]] = []

    def add(self, path: str, w, g, rule: tuple[bool, bool]) -> None:
        self.paths.append(path)
        self.ws.append(w)
        self.gs.append(g)
        self.rules.append(rule)


def _learning_rate(owner: object) -> float:
    """The learning rate that ``clip=True`` clips at: ``owner.hyperparam.lr`` of an
    update rule, or ``owner.lr`` of an optimizer, read at every call so that
    learning-rate schedules apply."""
    lr = getattr(getattr(owner, "hyperparam", owner), "lr", None)
    if lr is None:
        raise TypeError(
            "clip=True needs the learning rate, the update rule's hyperparam.lr or the "
            f"optimizer's lr; got {type(owner).__name__} without one"
        )
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise TypeError(f"clip=True needs a real learning rate; got {type(lr).__name__}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"clip=True needs a finite learning rate > 0; got {lr!r}")
    return lr


def ndim_at_most(n: int) -> Callable[[str, chainer.Parameter], bool]:
    """A predicate for ``exclude`` and its finer variants: parameters of at most ``n`` dimensions.

    ``ndim_at_most(1)`` is the rule of MoCo v3 and BYOL: biases and the
    scales and shifts of normalization layers get neither weight decay nor
    adaptation. The pattern form names them instead, ``("*/b", "*/gamma",
    "*/beta")`` for Chainer's links.

    Examples
    --------
    >>> import chainer
    >>> from lars_numba.chainer import FusedGradientLARS, ndim_at_most
    >>> model = chainer.links.Linear(3, 2)
    >>> hook = FusedGradientLARS(exclude=ndim_at_most(1))
    >>> [path for path, param in model.namedparams() if ndim_at_most(1)(path, param)]
    ['/b']
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int; got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"n must be >= 0; got {n}")

    def at_most(path: str, param: chainer.Parameter) -> bool:
        return param.ndim <= n

    at_most.__qualname__ = f"ndim_at_most({n})"
    return at_most


def _exclusion(name: str, value: Exclusion) -> Callable[[str, chainer.Parameter], bool]:
    """``value`` of ``exclude`` or its finer variants as a predicate."""
    if value is None:
        return lambda path, param: False
    if callable(value):
        return lambda path, param: bool(value(path, param))
    patterns = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(pattern, str) for pattern in patterns):
        raise TypeError(
            f"{name} must be a pattern, a sequence of patterns or a predicate; got {value!r}"
        )
    return lambda path, param: any(fnmatch.fnmatchcase(path, pattern) for pattern in patterns)
