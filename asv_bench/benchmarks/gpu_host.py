"""The host's share of a GPU call on ResNet-50's arrays, timed without a GPU.

The stages of :mod:`lars_numba.bench_host` (``python -m lars_numba bench
--host``): the checks, the pairs' layout and addresses and the two launches,
and the whole public call with what runs between them, on stand-in device
arrays and a device that numba-cuda is made to believe in, whose driver's
calls are recorded or do nothing. Skipped under the
simulator, whose device arrays are host arrays.
"""

from __future__ import annotations

import os

from ._support import optional, require


class GpuHost:
    """Seconds of host work per call, before the driver's calls (its stages, and
    the whole call), and per pair of launches through numba-cuda's dispatcher,
    for comparison."""

    params = (["scale", "scale_all", "momentum_step"],)
    param_names = ("call",)
    timeout = 300  # the first launch of each kernel compiles it

    def setup(self, call):
        if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") != "0":
            raise NotImplementedError("the simulator's device arrays are host arrays")
        bench_host = optional("lars_numba.bench_host")
        made_up_device = require(bench_host, "made_up_device")
        resnet50 = require(optional("lars_numba._shapes"), "RESNET50_SHAPES")
        self.device = made_up_device()
        self.device.__enter__()
        stages = bench_host.stages(resnet50)[call]
        # The whole call, where this commit times it, apart from its stages, on
        # Numba's device arrays and on arrays known by their interface (CuPy's).
        self.whole = stages.pop(getattr(bench_host, "WHOLE", None), None)
        self.on_interfaces = stages.pop(getattr(bench_host, "WHOLE_ON_INTERFACES", None), None)
        self.ours = [stage for name, stage in stages.items() if bench_host.DISPATCHED not in name]
        self.dispatched = [stage for name, stage in stages.items() if bench_host.DISPATCHED in name]
        for stage in (*stages.values(), self.whole, self.on_interfaces):
            if stage is not None:
                stage()  # the first launch of each kernel compiles it; the first call plans

    def teardown(self, call):
        self.device.__exit__(None, None, None)

    def time_host_before_the_driver(self, call):
        for stage in self.ours:
            stage()

    def time_launches_through_the_dispatcher(self, call):
        for stage in self.dispatched:
            stage()

    def time_whole_call_before_the_driver(self, call):
        require(self, "whole", method=True)()

    def time_whole_call_on_interface_arrays(self, call):
        require(self, "on_interfaces", method=True)()
