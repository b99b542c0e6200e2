"""The CUDA kernels on a GPU; skipped where there is none (Numba's simulator is none)."""

from __future__ import annotations

import os

import lars_numba

from ._support import WEIGHT_DECAY, SkipNotImplemented, optional, random_arrays, require


def _cuda():
    """``numba.cuda`` where a GPU and this commit's CUDA kernels are present; else skip."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") != "0":
        raise NotImplementedError("the CUDA simulator is no GPU to time")
    require(optional("lars_numba._cuda"), "scale")
    cuda = optional("numba.cuda")
    if cuda is None or not cuda.is_available():
        raise NotImplementedError("no GPU")
    return cuda


class GpuScale:
    """Seconds per ``scale`` (to the end of its kernels) and ``trust_ratio`` on the GPU."""

    params = ([1_000, 1_000_000, 50_000_000], ["float16", "float32"])
    param_names = ("size", "dtype")

    def setup(self, size, dtype):
        self.cuda = _cuda()
        self.w, self.g = (
            self.cuda.to_device(array) for array in random_arrays([size, size], dtype, seed=size)
        )
        self.time_scale(size, dtype)

    def time_scale(self, size, dtype):
        lars_numba.scale(self.w, self.g, weight_decay=WEIGHT_DECAY)
        # scale only queues the kernels.
        self.cuda.synchronize()

    def time_trust_ratio(self, size, dtype):
        lars_numba.trust_ratio(self.w, self.g, weight_decay=WEIGHT_DECAY)


class GpuResNet50:
    """Seconds to scale every gradient of ResNet-50 once on the GPU."""

    params = (["float16", "float32"],)
    param_names = ("dtype",)

    def setup(self, dtype):
        self.cuda = _cuda()
        resnet50 = require(optional("lars_numba._shapes"), "RESNET50_SHAPES")
        arrays = [self.cuda.to_device(a) for a in random_arrays(resnet50 + resnet50, dtype)]
        self.ws, self.gs = arrays[: len(resnet50)], arrays[len(resnet50) :]
        self.scale_all = getattr(lars_numba, "scale_all", None)
        self.time_scale_each(dtype)
        if self.scale_all is not None:
            self.time_scale_all(dtype)

    def time_scale_each(self, dtype):
        for w, g in zip(self.ws, self.gs, strict=True):
            lars_numba.scale(w, g, weight_decay=WEIGHT_DECAY)
        self.cuda.synchronize()

    def time_scale_all(self, dtype):
        if self.scale_all is None:
            raise SkipNotImplemented("no lars_numba.scale_all here")
        self.scale_all(self.ws, self.gs, weight_decay=WEIGHT_DECAY)
        self.cuda.synchronize()
