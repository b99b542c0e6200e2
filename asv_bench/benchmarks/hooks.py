"""The Chainer hooks on ResNet-50's 161 parameters: per parameter, fused, and Chainer's own."""

from __future__ import annotations

import functools

from ._support import (
    WEIGHT_DECAY,
    SkipNotImplemented,
    load_harness,
    optional,
    random_arrays,
    require,
)

chainer = optional("chainer")
# The package's harness under the name the benchmarks' code has always used
# (asv versions a benchmark by its source, so the name keeps their history).
bench = load_harness()
lars_chainer = optional("lars_numba.chainer")
shapes = optional("lars_numba._shapes")


class ResNet50Hooks:
    """Seconds per ``optimizer.call_hooks('pre')``: the hook's work in one update.

    Each hook has a model of its own over the same weights, so that no hook
    times gradients another has rescaled (or, in float16, turned to NaN as
    Chainer's hook does when a sum of squares overflows).
    """

    params = (["float32"],)
    param_names = ("dtype",)

    def setup(self, dtype):
        if chainer is None:
            raise NotImplementedError("chainer is not installed")
        gradient_lars = require(lars_chainer, "GradientLARS")
        resnet50 = require(shapes, "RESNET50_SHAPES")
        arrays = random_arrays(resnet50 + resnet50, dtype)
        weights, grads = arrays[: len(resnet50)], arrays[len(resnet50) :]
        hooks = {
            "chainer": chainer.optimizer_hooks.GradientLARS(weight_decay=WEIGHT_DECAY),
            "lars_numba": gradient_lars(weight_decay=WEIGHT_DECAY),
        }
        fused = getattr(lars_chainer, "FusedGradientLARS", None)
        if fused is not None:
            hooks["fused"] = fused(weight_decay=WEIGHT_DECAY)
        self.calls = {name: _hook_call(hook, weights, grads) for name, hook in hooks.items()}
        for call in self.calls.values():
            call()  # compiles, or loads from Numba's cache

    def time_chainer_hook(self, dtype):
        self.calls["chainer"]()

    def time_lars_numba_hook(self, dtype):
        self.calls["lars_numba"]()

    def time_fused_lars_numba_hook(self, dtype):
        self._fused()()

    def track_speedup_over_chainer_hook(self, dtype):
        return self._speedup(self.calls["lars_numba"])

    track_speedup_over_chainer_hook.unit = "times faster"

    def track_fused_speedup_over_chainer_hook(self, dtype):
        return self._speedup(self._fused())

    track_fused_speedup_over_chainer_hook.unit = "times faster"

    def _fused(self):
        if "fused" not in self.calls:
            raise SkipNotImplemented("no lars_numba.chainer.FusedGradientLARS here")
        return self.calls["fused"]

    def _speedup(self, call) -> float:
        """Chainer's time over ``call``'s, timed in turn in one process."""
        interleaved = require(bench, "interleaved", method=True)
        times = interleaved({"chainer": self.calls["chainer"], "lars_numba": call}, rounds=5)
        return times["chainer"] / times["lars_numba"]


def _hook_call(hook, weights, grads):
    """``call_hooks('pre')`` of an optimizer with ``hook`` over a model of its own."""
    model = chainer.Link()
    with model.init_scope():
        for i, (w, g) in enumerate(zip(weights, grads, strict=True)):
            param = chainer.Parameter(w)
            param.grad = g.copy()
            setattr(model, f"p{i}", param)
    # SGD's rule is never run: only the hooks are timed, the update itself
    # being the same whichever hook rescaled the gradients. Repeated calls
    # rescale the same gradients towards a fixed point whose norm they keep.
    optimizer = chainer.optimizers.SGD(lr=0.0).setup(model)
    optimizer.add_hook(hook)
    return functools.partial(optimizer.call_hooks, "pre")
