"""``lars_numba.scale_all`` over ResNet-50's 161 parameters, beside one ``scale`` per array."""

from __future__ import annotations

import functools

import lars_numba

from ._support import (
    WEIGHT_DECAY,
    SkipNotImplemented,
    bandwidth,
    load_harness,
    optional,
    random_arrays,
    require,
)

# The package's harness under the name the benchmarks' code has always used
# (asv versions a benchmark by its source, so the name keeps their history).
bench = load_harness()
shapes = optional("lars_numba._shapes")


class ScaleAllResNet50:
    """Seconds to scale every gradient of ResNet-50 once."""

    params = (["float32"],)
    param_names = ("dtype",)

    def setup(self, dtype):
        resnet50 = require(shapes, "RESNET50_SHAPES")
        arrays = random_arrays(resnet50 + resnet50, dtype)
        self.ws, self.gs = arrays[: len(resnet50)], arrays[len(resnet50) :]
        self.scale_all = getattr(lars_numba, "scale_all", None)
        # Compiles, or loads from Numba's cache, outside the timed calls.
        self.time_scale_each(dtype)
        if self.scale_all is not None:
            self.scale_all(self.ws, self.gs, weight_decay=WEIGHT_DECAY)

    def time_scale_all(self, dtype):
        if self.scale_all is None:
            raise SkipNotImplemented("no lars_numba.scale_all here")
        self.scale_all(self.ws, self.gs, weight_decay=WEIGHT_DECAY)

    def time_scale_each(self, dtype):
        for w, g in zip(self.ws, self.gs, strict=True):
            lars_numba.scale(w, g, weight_decay=WEIGHT_DECAY)

    def time_numpy_each(self, dtype):
        numpy_lars = require(bench, "numpy_lars", method=True)
        for w, g in zip(self.ws, self.gs, strict=True):
            numpy_lars(w, g, weight_decay=WEIGHT_DECAY)

    def track_scale_all_over_bandwidth_floor(self, dtype):
        """scale_all's time over five passes of the model's bytes at the best bandwidth."""
        if self.scale_all is None:
            raise SkipNotImplemented("no lars_numba.scale_all here")
        interleaved = require(bench, "interleaved", method=True)
        call = functools.partial(self.scale_all, self.ws, self.gs, weight_decay=WEIGHT_DECAY)
        seconds = interleaved({"scale_all": call}, rounds=5)["scale_all"]
        floor = 5 * sum(w.nbytes for w in self.ws) / bandwidth(True)
        return seconds / floor

    track_scale_all_over_bandwidth_floor.unit = "times the floor"
