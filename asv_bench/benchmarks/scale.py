"""``lars_numba.scale`` on one parameter, beside plain NumPy and Chainer's hook."""

from __future__ import annotations

import functools

from ._support import (
    WEIGHT_DECAY,
    SkipNotImplemented,
    bandwidth,
    load_harness,
    optional,
    require,
    scale_call,
    skip_for_params,
)

# The package's harness under the name the benchmarks' code has always used
# (asv versions a benchmark by its source, so the name keeps their history).
bench = load_harness()
# Where the parallel cut-off lives: lars_numba.tunables, or _cpu in older commits.
tunables = optional("lars_numba.tunables") or optional("lars_numba._cpu")

# NumPy's float16 arithmetic is in software (and so was lars_numba's before it
# used the hardware's conversions): seconds a call at 5e7 elements here, too
# long for the peers and the repeated calls of the ratios; lars_numba's own
# time is kept.
_SLOW_FLOAT16 = skip_for_params([(50_000_000, "float16")])


class ScaleOneParameter:
    """Seconds per call on ``size`` elements of ``dtype``, and the ratios that matter."""

    params = (
        [64, 10_000, 1_000_000, 50_000_000],
        ["float16", "float32", "float64"],
    )
    param_names = ("size", "dtype")

    def setup(self, size, dtype):
        self.w, self.g, self.lars_numba = scale_call(size, dtype)
        # The peers come from lars_numba.bench, where the commit under test has it.
        numpy_lars = getattr(bench, "numpy_lars", None)
        self.numpy = numpy_lars and functools.partial(
            numpy_lars, self.w, self.g, weight_decay=WEIGHT_DECAY
        )
        chainer_hook_call = getattr(bench, "chainer_hook_call", None)
        self.chainer_hook = chainer_hook_call and chainer_hook_call(self.w, self.g)

    def time_lars_numba(self, size, dtype):
        self.lars_numba()

    @_SLOW_FLOAT16
    def time_numpy(self, size, dtype):
        _peer(self.numpy, "lars_numba.bench.numpy_lars")()

    @_SLOW_FLOAT16
    def time_chainer_hook(self, size, dtype):
        _peer(self.chainer_hook, "chainer")()

    @_SLOW_FLOAT16
    def track_speedup_over_chainer_hook(self, size, dtype):
        """Chainer's time over lars_numba's, timed in turn in one process."""
        chainer_hook = _peer(self.chainer_hook, "chainer")
        times = _interleaved({"chainer": chainer_hook, "lars_numba": self.lars_numba})
        return times["chainer"] / times["lars_numba"]

    track_speedup_over_chainer_hook.unit = "times faster"

    @_SLOW_FLOAT16
    def track_time_over_bandwidth_floor(self, size, dtype):
        """lars_numba's time over the time its five passes take at the measured bandwidth.

        From 10 000 elements only: below, the call itself, not memory, sets the time.
        """
        if size < 10_000:
            raise SkipNotImplemented("the call, not memory, sets the time at this size")
        floor = 5 * self.w.nbytes / bandwidth(size >= tunables.PARALLEL_MIN_SIZE)
        return _interleaved({"lars_numba": self.lars_numba})["lars_numba"] / floor

    track_time_over_bandwidth_floor.unit = "times the floor"


def _peer(call, what: str):
    if not call:
        raise SkipNotImplemented(f"no {what} here")
    return call


def _interleaved(candidates):
    # Medians over rounds of calls timed in turn, so that a noisy neighbour slows all alike.
    return require(bench, "interleaved", method=True)(candidates, rounds=5)
