"""Shared test fixtures: the float64 oracle and the CUDA simulator switch."""

import os
import shutil
import sys

import numpy as np
import pytest

# The GPU tests run on Numba's CUDA simulator unless a GPU is present. The
# switch has to be set before numba.cuda is first imported, hence here.
if shutil.which("nvidia-smi") is None and not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")


# -- CUDA arrays that are not Numba's, and the GPU engine's scratch ------------------


def _simulator() -> bool:
    from numba.cuda.core import config

    return bool(config.ENABLE_CUDASIM)


class Foreign:
    """A non-Numba CUDA array: only ``__cuda_array_interface__`` (version 3).

    It wraps a Numba device array, as numba-cuda's own tests fake a foreign
    array. The simulator's arrays have no interface, so there it describes the
    wrapped array with a null pointer and ``from_interface`` is patched to
    unwrap it.
    """

    def __init__(self, array, stream=None, readonly=False):
        self.array, self.stream, self.readonly = array, stream, readonly

    @property
    def __cuda_array_interface__(self):
        if _simulator():
            interface = {
                "shape": self.array.shape,
                "typestr": self.array.dtype.str,
                "data": (0, False),
                "strides": None,
                "version": 3,
            }
        else:
            interface = dict(self.array.__cuda_array_interface__)
        interface["data"] = (interface["data"][0], self.readonly)
        interface["stream"] = self.stream
        return interface


@pytest.fixture
def foreign(monkeypatch):
    """Make Foreign arrays, with their conversion faked on the simulator."""
    from lars_numba import _cuda

    if _simulator():
        original = _cuda.from_interface
        monkeypatch.setattr(
            _cuda,
            "from_interface",
            lambda interface, owner: (
                owner.array if isinstance(owner, Foreign) else original(interface, owner)
            ),
        )
    return Foreign


@pytest.fixture
def scratch_handles(monkeypatch):
    """A fresh scratch cache and no CuPy; returns the handles that have scratch."""
    from lars_numba import _cuda

    monkeypatch.setattr(_cuda, "_scratch", _cuda.OrderedDict())
    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    return lambda: sorted(handle for _, handle, _ in _cuda._scratch)


# -- the oracles ---------------------------------------------------------------------


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


def assert_matches_oracle(result, expected, dtype, terms=0.0):
    """``result`` equals the float64 ``expected`` rounded to ``dtype``, to a few ulps.

    ``terms``, where given, are the magnitudes each element of ``expected`` was
    summed from (see :func:`update_terms`): where they cancel, two float64 ulps
    of them are allowed besides.
    """
    info = np.finfo(dtype)
    with np.errstate(over="ignore"):
        expected = np.asarray(expected).astype(dtype).astype(np.float64)
    result = np.asarray(result, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        within_terms = np.abs(result - expected) <= 2 * float(np.finfo(np.float64).eps) * terms
    np.testing.assert_allclose(
        np.where(within_terms, expected, result),
        expected,
        rtol=max(2 * float(info.eps), 1e-12),  # float64: the summation order differs
        atol=float(info.smallest_subnormal),
    )


def update_terms(w, g, rate, weight_decay):
    """The magnitudes that ``rate * (g + weight_decay * w)`` is summed from, for
    :func:`assert_matches_oracle`.

    Where ``g`` cancels ``weight_decay * w``, the oracle, which rounds their
    product before the sum, and the kernels, whose fused multiply-add rounds
    once, differ by up to an ulp of the product, however small the result.
    """
    with np.errstate(invalid="ignore", over="ignore"):
        terms = abs(rate) * (
            np.abs(np.asarray(g, np.float64)) + weight_decay * np.abs(np.asarray(w, np.float64))
        )
    return np.where(np.isfinite(terms), terms, 0.0)


@pytest.fixture(scope="session")
def oracle():
    return lars_oracle


# -- the other frameworks' rules, each written plainly from its published code --
#
# Each returns ``(rate, update)``: the factor applied to the gradient and the
# gradient the optimizer's learning rate then multiplies, both float64.


def _norms(w, g):
    w64 = np.asarray(w, dtype=np.float64)
    g64 = np.asarray(g, dtype=np.float64)
    return w64, g64, np.sqrt(np.sum(w64 * w64)), np.sqrt(np.sum(g64 * g64))


def apex_larc_oracle(w, g, lr, weight_decay=0.0, trust_coefficient=0.02, eps=1e-8, clip=True):
    """NVIDIA apex, ``apex/parallel/LARC.py``, ``LARC.step``: the rate and the
    weight decay apply only where both norms are non-zero; in clip mode the rate
    is ``min(rate / lr, 1)``."""
    w64, g64, w_norm, g_norm = _norms(w, g)
    if w_norm == 0 or g_norm == 0:
        return 1.0, g64
    rate = trust_coefficient * w_norm / (g_norm + w_norm * weight_decay + eps)
    if clip:
        rate = min(rate / lr, 1.0)
    return float(rate), rate * (g64 + weight_decay * w64)


def timm_lars_oracle(
    w, g, lr, weight_decay=0.0, trust_coeff=0.001, eps=1e-8, trust_clip=False, always_adapt=False
):
    """timm, ``timm/optim/lars.py``, ``Lars.step``: adapted only where weight decay is
    non-zero or ``always_adapt``; rate 1 where either norm is zero; weight decay
    added wherever it adapts; with ``trust_clip``, ``min(rate / lr, 1)``."""
    w64, g64, w_norm, g_norm = _norms(w, g)
    if not (weight_decay != 0 or always_adapt):
        return 1.0, g64
    rate = trust_coeff * w_norm / (g_norm + w_norm * weight_decay + eps)
    rate = rate if w_norm > 0 and g_norm > 0 else 1.0
    if trust_clip:
        rate = min(rate / lr, 1.0)
    return float(rate), rate * (g64 + weight_decay * w64)


def optax_lars_oracle(w, g, weight_decay=0.0, trust_coefficient=0.001, eps=0.0):
    """optax, ``optax/_src/alias.py``, ``lars``: ``add_decayed_weights`` then
    ``scale_by_trust_ratio`` (``optax/_src/transform.py``): the ratio of the norm
    of the weights to the norm of the decayed gradient, 1 where either is zero
    (the learning rate and ``trace``, the momentum, follow)."""
    w64, g64, w_norm, _ = _norms(w, g)
    update = g64 + weight_decay * w64
    update_norm = np.sqrt(np.sum(update * update))
    if w_norm == 0 or update_norm == 0:
        return 1.0, update
    rate = trust_coefficient * w_norm / (update_norm + eps)
    return float(rate), rate * update


def mxnet_lars_oracle(w, g, weight_decay=0.0, eta=0.001, epsilon=1e-8, rescale_grad=1.0):
    """Apache MXNet, ``python/mxnet/optimizer/lars.py``, ``LARS._get_lars`` and
    ``LARS.step`` (the sums of ``multi_lars`` in ``src/operator/contrib/multi_lars-inl.h``
    are the same): the norm of the gradient times ``rescale_grad``, rate 1 where
    either norm is zero, and weight decay added wherever the rate applies."""
    w64, g64, w_norm, g_norm = _norms(w, g)
    g_norm = g_norm * rescale_grad
    update = rescale_grad * g64 + weight_decay * w64
    if w_norm == 0 or g_norm == 0:
        return 1.0, update
    rate = eta * w_norm / (g_norm + weight_decay * w_norm + epsilon)
    return float(rate), rate * update


# -- the momentum step ------------------------------------------------------------


def momentum_oracle(
    w,
    g,
    v,
    *,
    lr,
    momentum=0.9,
    threshold=1e-2,
    weight_decay=0.0,
    eps=1e-9,
    trust_coefficient=1.0,
    denominator="sum",
    clip=False,
    grad_scale=1.0,
    decays=True,
    adapts=True,
    master=None,
):
    """One step of LARS with momentum on one pair, in float64.

    Returns ``(rate, v_new, w_new, v_terms, w_terms)``: the rate, the new
    velocity and weights (float64, not rounded), and for each of the two the
    sum of the magnitudes of the terms it was added from, the scale of the
    float64 error of a sum taken in another order (see :func:`assert_written`).
    """
    W = np.asarray(w if master is None else master, dtype=np.float64)
    G = grad_scale * np.asarray(g, dtype=np.float64)
    V = np.asarray(v, dtype=np.float64)
    wd = weight_decay if decays else 0.0
    with np.errstate(all="ignore"):
        w_norm = np.sqrt(np.sum(W * W))
        U = G + wd * W
        u_norm = np.sqrt(np.sum(U * U))
        if not adapts or not w_norm > threshold:
            rate = np.float64(1.0)
        elif denominator == "update" and u_norm == 0:
            rate = np.float64(1.0)
        else:
            if denominator == "sum":
                rate = trust_coefficient * w_norm / (eps + np.sqrt(np.sum(G * G)) + wd * w_norm)
            else:
                rate = trust_coefficient * w_norm / (eps + u_norm)
            if clip:
                clipped = rate / lr
                rate = np.float64(1.0) if clipped > 1.0 else clipped  # NaN stays NaN
        step = rate * (G + wd * W)
        v_new = momentum * V - lr * step
        w_new = W + v_new
        v_terms = np.abs(momentum * V) + lr * np.abs(rate) * (np.abs(G) + wd * np.abs(W))
        w_terms = np.abs(W) + v_terms
    return float(rate), v_new, w_new, v_terms, w_terms
