"""Peak memory of ``scale`` on a large parameter: no temporaries, unlike NumPy's rule."""

from __future__ import annotations

from ._support import WEIGHT_DECAY, SkipNotImplemented, load_harness, require, scale_call

# The package's harness under the name the benchmarks' code has always used
# (asv versions a benchmark by its source, so the name keeps their history).
bench = load_harness()


class ScaleMemory:
    """Peak memory of the process and its growth above the inputs, in one call."""

    params = ([50_000_000], ["float32"])
    param_names = ("size", "dtype")

    def setup(self, size, dtype):
        self.w, self.g, self.lars_numba = scale_call(size, dtype)

    def peakmem_lars_numba(self, size, dtype):
        self.lars_numba()

    def peakmem_numpy(self, size, dtype):
        self._numpy()

    def track_megabytes_above_inputs_lars_numba(self, size, dtype):
        return _megabytes_above_current(self.lars_numba)

    track_megabytes_above_inputs_lars_numba.unit = "MB"

    def track_megabytes_above_inputs_numpy(self, size, dtype):
        return _megabytes_above_current(self._numpy)

    track_megabytes_above_inputs_numpy.unit = "MB"

    def _numpy(self):
        require(bench, "numpy_lars", method=True)(self.w, self.g, weight_decay=WEIGHT_DECAY)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise SkipNotImplemented(f"no {field} in /proc/self/status")


def _megabytes_above_current(call) -> float:
    """How far the process's resident memory rises above its present size during ``call``.

    Writing 5 to /proc/self/clear_refs resets the peak (VmHWM) to the present
    size (Linux), so the peak after the call is the call's own.
    """
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError as error:
        raise SkipNotImplemented(f"cannot reset the peak resident size: {error}") from None
    before = _status_kib("VmRSS")
    call()
    return (_status_kib("VmHWM") - before) * 1024 / 1e6
