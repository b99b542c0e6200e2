"""Chainer optimizer hooks backed by the lars_numba kernels.

This is the only module of the package that imports chainer.
"""

from __future__ import annotations

import fnmatch
import functools
import math
import numbers
import warnings
from collections.abc import Callable, Iterable
from itertools import repeat
from operator import attrgetter, is_, itemgetter

import chainer
import chainer.optimizer_hooks
import numpy as np

from . import _api, _rule

__all__ = ["LARS", "FallbackWarning", "FusedGradientLARS", "GradientLARS", "ndim_at_most"]

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

    def _hyper(self, lr: Callable[[], float], grad_scale: float = 1.0) -> _api.Hyperparameters:
        """The hyperparameters; with ``clip``, LARC's clipping at ``lr()``; for
        gradients multiplied by a loss scale, its inverse ``grad_scale``."""
        return _api.hyperparameters(
            self.threshold,
            self.weight_decay,
            self.eps,
            self.trust_coefficient,
            self.denominator,
            lr() if self.clip else None,
            grad_scale=grad_scale,
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
        g = param.grad
        g[...] = _by_arithmetic(_rule.masked(hyper, decays, adapts), "scale", (param.array, g))[1]


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
        matrix products, and a parallel kernel called right after one waits
        for a core (:doc:`/threads`). An addition to Chainer's constructor.
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
    Under the optimizer's ``loss_scaling()`` it sees the gradients before the
    update rules unscale them: it takes the rate of the unscaled gradient and
    leaves the gradient scaled (see :doc:`/chainer`).

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
        self._masks = _Masks(exclude, exclude_from_weight_decay, exclude_from_adaptation)

    def __call__(self, optimizer: chainer.Optimizer, *args: object) -> None:
        if args:
            raise TypeError(
                "FusedGradientLARS is called once per update with the optimizer: register it "
                "with optimizer.add_hook, or use GradientLARS with update_rule.add_hook"
            )
        lr = functools.cache(lambda: _learning_rate(optimizer))
        hypers = {None: self._hyper(lr)}
        groups: dict[tuple, _Group] = {}
        for path, param in optimizer.target.namedparams():
            # An uninitialized parameter refuses to give its gradient: ask in order.
            w = param.array
            g = None if w is None else param.grad
            if g is None:
                continue
            rule = self._masks.get(path) or self._masks.decide(path, param)
            if rule == (False, False):
                continue
            # The update rules unscale a loss-scaled gradient after the optimizer's
            # hooks have run: the rate is taken of the unscaled gradient, which
            # is left scaled.
            loss_scale = param._loss_scale
            hyper = hypers.get(loss_scale)
            if hyper is None:
                hyper = hypers[loss_scale] = self._hyper(lr, 1.0 / loss_scale)
            if type(w) is np.ndarray and type(g) is np.ndarray:
                device = "@numpy"
            elif _api.accepts(w) and _api.accepts(g):
                device = param.device.name
            else:
                self._fall_back(param, hyper, decays=rule[0], adapts=rule[1])
                continue
            group = groups.get((device, loss_scale))
            if group is None:
                group = groups[device, loss_scale] = _Group(param.device, hyper)
            group.add(path, w, g, rule)
        for group in groups.values():
            self._scale(group)

    def _scale(self, group: _Group) -> None:
        masks = [None, None]
        if not all(decays and adapts for decays, adapts in group.rules):
            masks = [[rule[column] for rule in group.rules] for column in (0, 1)]
        rates = group.device.xp.empty(len(group.ws)) if self.report else None
        # The CUDA kernels run on the current device, which must be the arrays'.
        with chainer.using_device(group.device):
            _api.scale_all(group.ws, group.gs, group.hyper, *masks, rates, self.parallel)
        if rates is not None:
            # Python floats from the CPU; on a GPU, device scalars that the
            # reporter's summaries read only when they log.
            values = rates.tolist() if isinstance(rates, np.ndarray) else rates
            chainer.report(
                {"lars" + path: rate for path, rate in zip(group.paths, values, strict=True)}
            )


class _Masks(dict):
    """Whether each parameter path gets weight decay and its trust ratio, by path:
    decided at a path's first update from the exclusions, and kept."""

    def __init__(
        self,
        exclude: Exclusion,
        exclude_from_weight_decay: Exclusion,
        exclude_from_adaptation: Exclusion,
    ):
        super().__init__()
        self._exclusions = tuple(
            _exclusion(name, value)
            for name, value in (
                ("exclude", exclude),
                ("exclude_from_weight_decay", exclude_from_weight_decay),
                ("exclude_from_adaptation", exclude_from_adaptation),
            )
        )

    def decide(self, path: str, param: chainer.Parameter) -> tuple[bool, bool]:
        """The masks of ``path``, decided now and kept."""
        both, decay, adaptation = (matches(path, param) for matches in self._exclusions)
        masks = self[path] = (not (both or decay), not (both or adaptation))
        return masks


class _Group:
    """The parameters of one device and loss scale that :class:`FusedGradientLARS`
    scales in one call."""

    def __init__(self, device: chainer.backend.Device, hyper: _api.Hyperparameters):
        self.device = device
        self.hyper = hyper
        self.paths: list[str] = []
        self.ws: list = []
        self.gs: list = []
        self.rules: list[tuple[bool, bool]] = []

    def add(self, path: str, w, g, rule: tuple[bool, bool]) -> None:
        self.paths.append(path)
        self.ws.append(w)
        self.gs.append(g)
        self.rules.append(rule)


class _LARSRule(chainer.optimizer.UpdateRule):
    """The update rule of :class:`LARS` for one parameter, which the optimizer's fused
    step stands in for; it runs itself only for the parameters that step leaves
    out (those with update-rule hooks, say) and when called directly.

    Its hyperparameters are :class:`LARS`'s, through Chainer's inheritance of
    hyperparameters, and its state is ``state['v']``, the velocity, as for
    Chainer's ``MomentumSGD``.
    """

    is_elementwise = True

    def __init__(self, parent_hyperparam: chainer.optimizer.Hyperparameter, parallel: bool):
        super().__init__(parent_hyperparam)
        self.parallel = parallel
        #: Whether the parameter gets weight decay and its trust ratio, set by
        #: the optimizer from its exclusions.
        self.masks = (True, True)

    def init_state(self, param: chainer.Parameter) -> None:
        # A float16 parameter's velocity is float32, as momentum_step takes it:
        # float16 would round away the small steps that the velocity adds up.
        array = param.array
        dtype = np.float32 if array.dtype == np.float16 else array.dtype
        with chainer.using_device(param.device):
            self.state["v"] = param.device.xp.zeros_like(array, dtype=dtype)

    def update_core(self, param: chainer.Parameter) -> None:
        # Chainer has divided the gradient by the loss scale and made the
        # float32 copy already: ``param`` is what the step updates.
        g = param.grad
        if g is None:
            return
        w, v = param.array, self.state["v"]
        hyper = _step_hyperparameters(self.hyperparam, 1.0)
        if all(type(array) is np.ndarray for array in (w, g, v)):
            _api.momentum_step(
                [w], [g], [v], None, hyper, False, *self._mask_lists(), None, False, self.parallel
            )
            return
        new_w, _, new_v = _by_arithmetic(_rule.masked(hyper, *self.masks), "momentum", (w, g, v))
        w[...] = new_w
        v[...] = new_v

    def _mask_lists(self) -> tuple:
        return tuple(None if mask else [False] for mask in self.masks)

    def serialize(self, serializer: chainer.serializer.AbstractSerializer) -> None:
        """Chainer's serialization of the state, and the float32 master of a float16
        parameter under ``use_fp32_update``, so that a resumed run continues exactly."""
        super().serialize(serializer)
        if isinstance(serializer, chainer.serializer.Deserializer):
            try:
                master = serializer("master", None)
            except KeyError:  # saved without one
                return
            if master is not None:
                self._fp32_param = chainer.Parameter(np.asarray(master, np.float32))
        elif self._fp32_param is not None and self._fp32_param.array is not None:
            serializer("master", self._fp32_param.array)


class LARS(chainer.optimizer.GradientMethod):
    r"""Momentum SGD with layer-wise adaptive rate scaling, one fused step per update.

    For each parameter :math:`w` with gradient :math:`g`, its velocity
    :math:`v` and the rate :math:`r` of :class:`GradientLARS` (with the same
    ``threshold``, ``weight_decay``, ``eps``, ``trust_coefficient``,
    ``denominator`` and ``clip``):

    .. math::

        v \leftarrow \mu v - \eta\, r\,(g + \lambda w), \qquad w \leftarrow w + v

    with :math:`\eta` = ``lr``, :math:`\mu` = ``momentum`` and :math:`\lambda`
    = ``weight_decay``: the results of ``MomentumSGD(lr, momentum)`` with
    this package's :class:`GradientLARS`, within one rounding per step (the
    fused step rounds once, from float64), in two passes over the parameters
    of each dtype by :func:`lars_numba.momentum_step` instead of a hook call
    and an update per parameter.

    It is a :class:`chainer.optimizer.GradientMethod`: hooks, per-parameter
    hyperparameters (``param.update_rule.hyperparam.lr = ...``), disabled
    rules, learning-rate extensions, serialization and ChainerMN's
    multi-node optimizer work as for Chainer's optimizers. Under
    :meth:`~chainer.optimizer.GradientMethod.use_fp32_update`, a float16
    parameter keeps a float32 master and a float32 velocity; the step reads
    its float16 gradient, updates the master and writes the parameter, the
    master's rounding as Chainer copies it, in the same pass. Under
    :meth:`~chainer.optimizer.GradientMethod.loss_scaling`, the gradients
    are unscaled inside the step, and under dynamic loss scaling the pass
    that takes the norms also finds non-finite gradients: the whole step is
    then skipped and the scale lowered, as Chainer does, without Chainer's
    separate pass over the gradients.

    Parameters that a fused step cannot take (arrays other than NumPy's,
    parameters with update-rule hooks) take their update rule, which computes
    the same step for that parameter alone.

    Parameters
    ----------
    lr, momentum : float, optional
        The learning rate and the momentum, finite and >= 0.
    threshold, weight_decay, eps, trust_coefficient, denominator, clip : optional
        As for :class:`FusedGradientLARS`; ``clip`` clips at this ``lr``.
    exclude, exclude_from_weight_decay, exclude_from_adaptation : optional
        As for :class:`FusedGradientLARS`.
    report : bool, optional
        Report each fused parameter's trust ratio to :func:`chainer.report` as
        ``'lars' + path``, as :class:`FusedGradientLARS` does.
    parallel : bool, optional
        Let the step run on all of Numba's threads.

    Raises
    ------
    TypeError, ValueError
        If a hyperparameter or an exclusion is refused, as by
        :func:`lars_numba.momentum_step` and :class:`FusedGradientLARS`.

    Examples
    --------
    >>> import chainer
    >>> import numpy as np
    >>> from lars_numba.chainer import LARS
    >>> model = chainer.links.Linear(2, 1, initialW=np.array([[3.0, 4.0]], np.float32))
    >>> optimizer = LARS(lr=0.1, eps=0.0, exclude="*/b").setup(model)
    >>> model.W.grad = np.array([[0.75, 1.0]], np.float32)  # rate = 5 / 1.25
    >>> model.b.grad = np.ones(1, np.float32)  # excluded: rate 1
    >>> optimizer.update()
    >>> model.W.array, model.b.array
    (array([[2.7, 3.6]], dtype=float32), array([-0.1], dtype=float32))
    """

    lr = chainer.optimizer.HyperparameterProxy("lr")
    momentum = chainer.optimizer.HyperparameterProxy("momentum")
    threshold = chainer.optimizer.HyperparameterProxy("threshold")
    weight_decay = chainer.optimizer.HyperparameterProxy("weight_decay")
    eps = chainer.optimizer.HyperparameterProxy("eps")
    trust_coefficient = chainer.optimizer.HyperparameterProxy("trust_coefficient")
    denominator = chainer.optimizer.HyperparameterProxy("denominator")
    clip = chainer.optimizer.HyperparameterProxy("clip")

    def __init__(
        self,
        lr: float = 0.1,
        momentum: float = 0.9,
        threshold: float = 1e-2,
        weight_decay: float = 0.0,
        eps: float = 1e-9,
        trust_coefficient: float = 1.0,
        denominator: str = "sum",
        clip: bool = False,
        exclude: Exclusion = None,
        *,
        exclude_from_weight_decay: Exclusion = None,
        exclude_from_adaptation: Exclusion = None,
        report: bool = False,
        parallel: bool = False,
    ):
        super().__init__()
        if not isinstance(clip, bool):
            raise TypeError(f"clip must be a bool; got {type(clip).__name__}")
        hyperparam = self.hyperparam
        hyperparam.lr = lr
        hyperparam.momentum = momentum
        hyperparam.threshold = threshold
        hyperparam.weight_decay = weight_decay
        hyperparam.eps = eps
        hyperparam.trust_coefficient = trust_coefficient
        hyperparam.denominator = denominator
        hyperparam.clip = clip
        # Checked here to fail at construction rather than at the first update.
        _step_hyperparameters(hyperparam, 1.0)
        self.report = report
        self.parallel = parallel
        self._masks = _Masks(exclude, exclude_from_weight_decay, exclude_from_adaptation)
        self._plan: _StepPlan | None = None

    def setup(self, link: chainer.Link) -> LARS:
        self._masks.clear()  # the exclusions decide anew for the paths of this link
        self._plan = None
        return super().setup(link)

    def __getstate__(self) -> dict:
        # A copy or a pickle walks its own model at its first update: the plan
        # holds the addresses of this model's arrays.
        return {**self.__dict__, "_plan": None}

    def create_update_rule(self) -> _LARSRule:
        return _LARSRule(self.hyperparam, self.parallel)

    def check_nan_in_grads(self) -> None:
        """Nothing: the step's pass over the norms finds non-finite gradients."""
        self._loss_scaling_isnan = False

    def update(self, lossfun: Callable | None = None, *args: object, **kwds: object) -> None:
        """Chainer's :meth:`~chainer.optimizer.GradientMethod.update`, with the
        parameters' updates replaced by the fused step."""
        if lossfun is not None:
            use_cleargrads = getattr(self, "_use_cleargrads", True)
            loss = lossfun(*args, **kwds)
            if use_cleargrads:
                self.target.cleargrads()
            else:
                self.target.zerograds()
            loss.backward(loss_scale=self._loss_scale)
            del loss
        # Chainer gives the parameters without a gradient a zero one before the
        # hooks, after each hook and after the update; here the step gives them
        # theirs, so it is needed only before hooks (a pass over the parameters
        # that costs an update of small ones half its time).
        if self._hookable._pre_update_hooks:
            self.reallocate_cleared_grads()
        self.check_nan_in_grads()
        self.call_hooks("pre")
        self.t += 1
        self._step()
        self.call_hooks("post")
        self.update_loss_scale()

    def _step(self) -> None:
        skip_nonfinite = bool(self._loss_scaling_is_dynamic)
        if self._plan is not None:
            taken = self._plan.step(self, skip_nonfinite)
            if taken is not None:
                if not taken:
                    self._skip()
                return
            self._plan = None
        # By the rule's own hyperparameters (None: the optimizer's) and the loss
        # scale its gradient was computed with, which the step unscales.
        hypers: dict[tuple, _api.Hyperparameters] = {}
        groups: dict[tuple, _StepGroup] = {}
        alone = []  # the parameters that take their update rule
        unstepped = []  # the gradients of the parameters that take no step
        for path, param in self.target.namedparams():
            w = param.array
            g = None if w is None else param.grad
            if g is None and w is not None:
                with chainer.using_device(param.device):
                    g = param.grad = param.device.xp.zeros_like(w)
            rule = param.update_rule
            if rule is None or not rule.enabled:
                if g is not None:
                    unstepped.append(g)  # checked all the same, as Chainer does
                continue
            masks = self._masks.get(path) or self._masks.decide(path, param)
            hooks = rule._hookable
            if (
                type(rule) is not _LARSRule
                or type(w) is not np.ndarray
                or type(g) is not np.ndarray
                or hooks._pre_update_hooks
                or hooks._post_update_hooks
            ):
                if isinstance(rule, _LARSRule):
                    rule.masks = masks
                alone.append(param)
                continue
            # A rule's own hyperparameters are attributes of its Hyperparameter
            # besides the parent's reference.
            own = rule.hyperparam if len(rule.hyperparam.__dict__) > 1 else None
            key = (own, param._loss_scale)
            hyper = hypers.get(key)
            if hyper is None:
                hyper = hypers[key] = _step_hyperparameters(
                    own or self.hyperparam, 1.0 if key[1] is None else 1.0 / key[1]
                )
            group = groups.get(hyper)
            if group is None:
                group = groups[hyper] = _StepGroup(hyper)
            group.add(path, param, w, g, rule, masks)
        if not alone and not unstepped and len(hypers) == 1 and next(iter(hypers))[0] is None:
            (group,) = groups.values()
            self._plan = _StepPlan.of(self.target, group)
        if skip_nonfinite and not self._finite(alone, unstepped, list(groups.values())[1:]):
            self._skip()
            return
        for group in groups.values():
            if not group.step(skip_nonfinite, self.report, self.parallel):
                # Only the first group can find it: the others were checked.
                self._skip()
                return
        for param in alone:
            param.update()

    @staticmethod
    def _finite(params: list, grads: list, groups: list) -> bool:
        """Whether the gradients of ``params``, ``grads`` and of ``groups`` are finite:
        a pass of their own, for a call with more than one fused step or parameters
        outside them, so that a step is skipped for every parameter or none."""
        grads = grads + [param.grad for param in params if param.array is not None]
        grads += [g for group in groups for g in group.gs]
        return all(
            bool(chainer.backend.get_array_module(g).isfinite(g).all())
            for g in grads
            if g is not None
        )

    def _skip(self) -> None:
        """What Chainer does with a non-finite gradient under dynamic loss scaling."""
        self._loss_scaling_isnan = True
        self._loss_scaling_isnan_ever = True
        warnings.warn(
            f"Non finite number found in the gradients (iteration: {self.t}, "
            f"loss_scale: {self._loss_scale}); the step is skipped",
            stacklevel=4,
        )


class _StepGroup:
    """The parameters of :class:`LARS` that share one :func:`lars_numba.momentum_step`."""

    def __init__(self, hyper: _api.Hyperparameters):
        self.hyper = hyper
        #: A tuple per parameter: path, parameter, rule, array, gradient, velocity,
        #: master (or None) and masks; one append per parameter.
        self.members: list[tuple] = []
        self._plan: _api.MomentumPlan | None = None
        self._gs: list | None = None  # the checked gradients, until the step
        self._g_rows: np.ndarray | None = None

    def add(
        self,
        path: str,
        param: chainer.Parameter,
        w: np.ndarray,
        g: np.ndarray,
        rule: _LARSRule,
        masks: tuple[bool, bool],
    ) -> None:
        """Add ``param``, whose array is ``w`` and gradient ``g``, with its state."""
        master = None
        updated = param
        if rule._use_fp32_update and w.dtype == np.float16:
            # Chainer's own attribute, so that its use_fp32_update sees the same master.
            if rule._fp32_param is None:
                rule._fp32_param = chainer.Parameter(w.astype(np.float32), name=param.name)
            updated = rule._fp32_param
            master = updated.array
        state = rule.state
        if state is None or type(state["v"]) is not np.ndarray:
            rule._init_states(updated)  # creates the velocity, or brings it to the CPU
            state = rule.state
        self.members.append((path, param, rule, w, g, state["v"], master, masks))

    @property
    def gs(self) -> list[np.ndarray]:
        """The gradients of the group."""
        return [member[4] for member in self.members]

    @property
    def plan(self) -> _api.MomentumPlan:
        """The checked arrays of the group's step (raises as momentum_step does)."""
        if self._plan is None:
            ws, gs, vs, masters, masks = list(zip(*self.members, strict=True))[3:]
            mask_lists = [None, None]
            if not all(decays and adapts for decays, adapts in masks):
                mask_lists = [[mask[column] for mask in masks] for column in (0, 1)]
            if all(master is None for master in masters):
                masters = None
            self._plan, self._gs, self._g_rows = _api.momentum_plan(
                ws, gs, vs, masters, *mask_lists
            )
        return self._plan

    def step(self, skip_nonfinite: bool, report: bool, parallel: bool) -> bool:
        """The fused step; whether it was taken."""
        plan = self.plan
        taken = plan.run(self._gs, self._g_rows, self.hyper, skip_nonfinite, parallel)
        self._gs = None  # not kept beyond the step
        if taken:
            paths, _, rules = list(zip(*self.members, strict=True))[:3]
            _stepped(rules, paths, plan.rates if report else None)
        return taken


class _StepPlan:
    """The fused step of a model whose parameters all take one :class:`_StepGroup`
    with the optimizer's hyperparameters, kept from one update to the next.

    On a model of many small parameters the walk over the model and the checks
    of every array cost more than the step. The plan finds, in a pass per
    comparison over its parameters, that the model holds the same links,
    parameters, arrays, rules and states, and that nothing sends a parameter
    down another path (a rule disabled or given hooks or hyperparameters of its
    own, ``use_fp32_update``, another loss scale); it reads the gradients and
    leaves the checks of the arrays to :meth:`lars_numba._api.MomentumPlan.restep`.
    Anything else drops it, and the update takes the walk.
    """

    def __init__(self, target: chainer.Link, links: list[tuple], group: _StepGroup):
        self.target, self.links, self.plan = target, links, group.plan
        self.paths, self.params, self.rules, self.ws, _, self.vs, masters, _ = zip(
            *group.members, strict=True
        )
        self.loss_scale = self.params[0]._loss_scale
        # Compared as a list of tuples, in one pass: of each parameter its rule,
        # the rule's flag and Hyperparameter (objects compared by identity:
        # Chainer defines no __eq__ on them) and its loss scale (one for all,
        # the plan's hyperparameters' key), by value.
        self.param_fields = list(map(_PARAM_FIELDS, self.params))
        self.own_hyperparams = [vars(rule.hyperparam) for rule in self.rules]
        hookables = [rule._hookable for rule in self.rules]
        self.hooks = [hooks._pre_update_hooks for hooks in hookables]
        self.hooks += [hooks._post_update_hooks for hooks in hookables]
        self.halves = [
            (rule, master)
            for rule, w, master in zip(self.rules, self.ws, masters, strict=True)
            if w.dtype == np.float16
        ]

    @classmethod
    def of(cls, target: chainer.Link, group: _StepGroup) -> _StepPlan | None:
        """The plan of ``group``, all of ``target``'s parameters; ``None`` if a link
        of ``target`` finds its parameters its own way."""
        links = _link_tree(target)
        return None if links is None else cls(target, links, group)

    def step(self, optimizer: LARS, skip_nonfinite: bool) -> bool | None:
        """The step of ``optimizer``'s update; whether it was taken, or ``None``
        (before anything is written) if the plan no longer holds."""
        gs = self._gradients(optimizer)
        if gs is None:
            return None
        grad_scale = 1.0 if self.loss_scale is None else 1.0 / self.loss_scale
        hyper = _step_hyperparameters(optimizer.hyperparam, grad_scale)
        taken = self.plan.restep(gs, hyper, skip_nonfinite, optimizer.parallel)
        if taken:
            _stepped(self.rules, self.paths, self.plan.rates if optimizer.report else None)
        return taken

    def _gradients(self, optimizer: LARS) -> list | None:
        """The parameters' gradients, if the model is as the plan found it."""
        if optimizer.target is not self.target or not all(map(_same_link, self.links)):
            return None
        params = self.params
        try:
            holds = (
                list(map(_PARAM_FIELDS, params)) == self.param_fields
                and all(map(is_, map(_FIRST, map(_DATA, params)), self.ws))
                and set(map(len, self.own_hyperparams)) == {1}  # the parent's reference alone
                and all(map(is_, map(_VELOCITY, map(_STATE, self.rules)), self.vs))
                and not any(self.hooks)  # every dict of hooks empty
                and all(_same_master(rule, master) for rule, master in self.halves)
            )
        except (AttributeError, TypeError, KeyError):  # no rule, no state, no "v"
            return None
        if not holds:
            return None
        # What Chainer's grad property returns, read from the fields it reads
        # (in half its time): the array of the gradient's variable if there is
        # one (backward leaves them), else the array set as the gradient. Its
        # checks passed at the walk that made the plan, for good: Chainer
        # never makes a parameter's gradient invalid again, nor changes its
        # layout, and the arrays are still NumPy's, not ChainerX's.
        grad_vars = list(map(_GRAD_VAR, params))
        if all(map(is_, grad_vars, repeat(None))):
            return list(map(_GRAD_ARRAY, params))
        if not any(map(is_, grad_vars, repeat(None))):
            return list(map(_FIRST, map(_DATA, grad_vars)))
        return list(map(_GRAD, params))


#: What :class:`_StepPlan` compares of each parameter, in one pass.
_PARAM_FIELDS = attrgetter(
    "update_rule", "update_rule.enabled", "update_rule.hyperparam", "_loss_scale"
)
_DATA, _STATE, _GRAD = attrgetter("_data"), attrgetter("_state"), attrgetter("grad")
_GRAD_VAR, _GRAD_ARRAY = attrgetter("_grad_var"), attrgetter("_grad")
_FIRST, _VELOCITY = itemgetter(0), itemgetter("v")
#: The ways of Chainer's links to find their parameters that _link_tree knows.
_NAMEDPARAMS = (chainer.Link.namedparams, chainer.Chain.namedparams, chainer.ChainList.namedparams)


def _link_tree(target: chainer.Link) -> list[tuple] | None:
    """What Chainer's ``namedparams`` reads of each link under ``target``, for
    :func:`_same_link`; ``None`` if a link has a ``namedparams`` of its own."""
    tree = []
    for link in target.links():
        if type(link).namedparams not in _NAMEDPARAMS:
            return None
        names = sorted(link._params)
        children = listed = None
        if isinstance(link, chainer.ChainList):
            listed = tuple(link._children)
        elif isinstance(link, chainer.Chain):
            children = set(link._children)
            names += sorted(children)
        values = tuple(link.__dict__[name] for name in names)
        tree.append((link, set(link._params), children, names, values, listed))
    return tree


def _same_link(entry: tuple) -> bool:
    """Whether the link of an entry of :func:`_link_tree` still holds what it held."""
    link, params, children, names, values, listed = entry
    return (
        link._params == params
        and (children is None or link._children == children)
        and (
            listed is None
            or (len(link._children) == len(listed) and all(map(is_, link._children, listed)))
        )
        and all(map(is_, map(link.__dict__.__getitem__, names), values))
    )


def _same_master(rule: _LARSRule, master: np.ndarray | None) -> bool:
    """Whether a float16 parameter's rule still has the float32 master ``master``
    (or, for ``None``, none)."""
    if master is None:
        return not rule._use_fp32_update
    copy = rule._fp32_param
    return rule._use_fp32_update and copy is not None and copy._data[0] is master


def _stepped(rules: list, paths: list, rates: np.ndarray | None) -> None:
    """What follows a fused step that was taken: each rule counts it, and the trust
    ratios go to :func:`chainer.report` if ``rates`` holds them."""
    for rule in rules:
        rule.t += 1
    if rates is not None:
        values = rates.tolist()
        chainer.report({"lars" + path: rate for path, rate in zip(paths, values, strict=True)})


def _step_hyperparameters(
    hyperparam: chainer.optimizer.Hyperparameter, grad_scale: float
) -> _api.Hyperparameters:
    """The kernels' hyperparameters of :class:`LARS` from Chainer's ``hyperparam``."""
    hyper = _api.hyperparameters(
        hyperparam.threshold,
        hyperparam.weight_decay,
        hyperparam.eps,
        hyperparam.trust_coefficient,
        hyperparam.denominator,
        grad_scale=grad_scale,
        lr=hyperparam.lr,
        momentum=hyperparam.momentum,
    )
    return _rule.clipped_at_lr(hyper) if hyperparam.clip else hyper


def _by_arithmetic(hyper: _api.Hyperparameters, update: str, arrays: tuple) -> tuple:
    """The new values of ``arrays`` under ``update`` of :mod:`lars_numba._rule`, computed
    with the arrays' own arithmetic on float64 copies, as the kernels compute."""
    copies = tuple(array.astype(np.float64) for array in arrays)
    sums = tuple(float(term.sum()) for term in _rule.norm_terms(hyper, *copies[:2]))
    return _rule.UPDATES[update].function(_rule.rate_from_sums(sums, hyper), hyper, *copies)


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
    # Module-level functions, not lambdas, so that the hooks and the optimizer pickle.
    if value is None:
        return _excludes_nothing
    if callable(value):
        return functools.partial(_as_bool, value)
    patterns = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(pattern, str) for pattern in patterns):
        raise TypeError(
            f"{name} must be a pattern, a sequence of patterns or a predicate; got {value!r}"
        )
    return functools.partial(_matches_any, patterns)


def _excludes_nothing(path: str, param: chainer.Parameter) -> bool:
    return False


def _as_bool(predicate: Callable, path: str, param: chainer.Parameter) -> bool:
    return bool(predicate(path, param))


def _matches_any(patterns: tuple[str, ...], path: str, param: chainer.Parameter) -> bool:
    return any(fnmatch.fnmatchcase(path, pattern) for pattern in patterns)
