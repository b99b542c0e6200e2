"""The whole optimizer step: lars_numba's LARS against momentum SGD with each LARS hook."""

from __future__ import annotations

from ._support import SkipNotImplemented, load_harness, optional, require

# The package's harness under the name the benchmarks' code has always used
# (asv versions a benchmark by its source, so the name keeps their history).
bench = load_harness()
lars_chainer = optional("lars_numba.chainer")
shapes = optional("lars_numba._shapes")
chainer = optional("chainer")


class OptimizerStep:
    """Seconds per ``optimizer.update()`` with the gradients present, on ResNet-50's
    161 parameters and on 1000 of 16 elements, float32, and on ResNet-50 in float16
    under ``use_fp32_update``."""

    params = (["resnet50 float32", "1000 x 16 float32", "resnet50 float16"],)
    param_names = ("model",)
    timeout = 300

    def setup(self, model):
        if chainer is None:
            raise NotImplementedError("chainer is not installed")
        require(lars_chainer, "LARS")
        step_candidates = require(bench, "step_candidates")
        name, dtype = model.rsplit(" ", 1)
        resnet50 = name == "resnet50"
        model_shapes = require(shapes, "RESNET50_SHAPES") if resnet50 else ((16,),) * 1000
        self.calls, self.bytes = step_candidates(model_shapes, dtype)

    def time_lars(self, model):
        self.calls["LARS"]()

    def time_lars_parallel(self, model):
        self._candidate("LARS_parallel")()

    def time_momentum_sgd(self, model):
        self.calls["MomentumSGD"]()

    def time_momentum_sgd_with_chainer_hook(self, model):
        self._candidate("+chainer_hook")()

    def time_momentum_sgd_with_fused_hook(self, model):
        self._candidate("+fused_hook")()

    def track_speedup_over_momentum_sgd_with_chainer_hook(self, model):
        interleaved = require(bench, "interleaved", method=True)
        theirs = self._candidate("+chainer_hook")
        times = interleaved({"LARS": self.calls["LARS"], "theirs": theirs}, rounds=5)
        return times["theirs"] / times["LARS"]

    track_speedup_over_momentum_sgd_with_chainer_hook.unit = "times faster"

    def track_ratio_to_the_7_pass_floor(self, model):
        """LARS's time over its passes' bytes at the bandwidth of the same rounds."""
        interleaved = require(bench, "interleaved", method=True)
        candidates = {"LARS": self.calls["LARS"], **bench.stream_candidates(False)}
        times = interleaved(candidates, rounds=5)
        return times["LARS"] * bench.pop_bandwidth(times) / self.bytes

    track_ratio_to_the_7_pass_floor.unit = "times the floor"

    def _candidate(self, name):
        if name not in self.calls:
            raise SkipNotImplemented(f"{name} is timed on float32 only")
        return self.calls[name]
