"""The LARS hook's cost as Chainer pays it: ``optimizer.update()`` over many small params.

Kept apart from :mod:`lars_numba.bench` because it needs chainer, which
:mod:`lars_numba.chainer` imports.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

WEIGHT_DECAY = 1e-4


def _update(n_params: int, size: int, hook: object | None) -> Callable[[], None]:
    """``optimizer.update`` of SGD over ``n_params`` float32 params of ``size`` elements."""
    import chainer

    rng = np.random.default_rng(0)
    model = chainer.Link()
    with model.init_scope():
        for i in range(n_params):
            param = chainer.Parameter(rng.standard_normal(size, dtype=np.float32))
            param.grad = rng.standard_normal(size, dtype=np.float32)
            setattr(model, f"p{i}", param)
    # lr = 0 keeps the weights, hence the work per update, the same across calls;
    # the hooks rescale the same gradients to a fixed point, whose norm they keep.
    optimizer = chainer.optimizers.SGD(lr=0.0).setup(model)
    if hook is not None:
        optimizer.add_hook(hook)
    return optimizer.update


def measure_hook_overhead(n_params: int, size: int, repeats: int) -> dict[str, float]:
    """Median seconds per ``optimizer.update()`` with no hook, Chainer's and ours.

    The three optimizers own identical models and are timed in turn, round by
    round, ``repeats`` rounds, so that a noisy neighbour slows them all alike.
    The hooks' cost per parameter is ``(t[hook] - t['no hook']) / n_params``.

    Parameters
    ----------
    n_params : int
        How many parameters the model holds.
    size : int
        Elements per parameter (float32).
    repeats : int
        Rounds of timing; the median is taken over them.

    Returns
    -------
    dict[str, float]
        Seconds per update under ``'no hook'``, ``'chainer'`` and ``'lars_numba'``.
    """
    import chainer.optimizer_hooks

    from . import chainer as lars_chainer
    from .bench import interleaved

    return interleaved(
        {
            "no hook": _update(n_params, size, None),
            "chainer": _update(
                n_params, size, chainer.optimizer_hooks.GradientLARS(weight_decay=WEIGHT_DECAY)
            ),
            "lars_numba": _update(
                n_params, size, lars_chainer.GradientLARS(weight_decay=WEIGHT_DECAY)
            ),
        },
        repeats,
    )
