"""``lars_numba.trust_ratio``: the rate alone, the gradient untouched, beside NumPy."""

from __future__ import annotations

import numpy as np

import lars_numba

from ._support import WEIGHT_DECAY, random_arrays


class TrustRatio:
    """Seconds per call on ``size`` elements of ``dtype``."""

    params = ([1_000, 1_000_000, 50_000_000], ["float32", "float64"])
    param_names = ("size", "dtype")

    def setup(self, size, dtype):
        self.w, self.g = random_arrays([size, size], dtype, seed=size)
        lars_numba.trust_ratio(self.w, self.g, weight_decay=WEIGHT_DECAY)

    def time_lars_numba(self, size, dtype):
        lars_numba.trust_ratio(self.w, self.g, weight_decay=WEIGHT_DECAY)

    def time_numpy(self, size, dtype):
        w_norm = np.linalg.norm(self.w)
        g_norm = np.linalg.norm(self.g)
        return w_norm / (1e-9 + g_norm + WEIGHT_DECAY * w_norm) if w_norm > 1e-2 else 1.0
