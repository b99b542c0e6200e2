"""Shared test fixtures: the float64 oracle and the CUDA simulator switch."""

import os
import shutil

import numpy as np
import pytest

# The GPU tests run on Numba's CUDA simulator unless a GPU is present. The
# switch has to be set before numba.cuda is first imported, hence here.
if shutil.which("nvidia-smi") is None and not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")


def lars_oracle(w, g, threshold=1e-2, weight_decay=0.0, eps=1e-9):
    """Chainer's GradientLARS rule written plainly in float64.

    Returns the rate and the scaled gradient, both float64.
    """
    w64 = np.asarray(w, dtype=np.float64)
    g64 = np.asarray(g, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        w_norm = np.sqrt(np.sum(w64 * w64))
        g_norm = np.sqrt(np.sum(g64 * g64))
        if w_norm > threshold:
            rate = float(w_norm / (eps + g_norm + weight_decay * w_norm))
        else:
            rate = 1.0
        return rate, rate * (g64 + weight_decay * w64)


def assert_matches_oracle(result, expected, dtype):
    """``result`` equals the float64 ``expected`` rounded to ``dtype``, to a few ulps."""
    info = np.finfo(dtype)
    with np.errstate(over="ignore"):
        expected = np.asarray(expected).astype(dtype)
    np.testing.assert_allclose(
        np.asarray(result, dtype=np.float64),
        expected.astype(np.float64),
        rtol=max(2 * float(info.eps), 1e-12),  # float64: the summation order differs
        atol=float(info.smallest_subnormal),
    )


@pytest.fixture(scope="session")
def oracle():
    return lars_oracle
