"""What the benchmark modules share: optional parts of the package and arrays."""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import numpy as np
from asv_runner.benchmarks.mark import SkipNotImplemented, skip_for_params

#: The weight decay every benchmark uses: nonzero, so the decay term is timed too.
WEIGHT_DECAY = 1e-4

__all__ = [
    "WEIGHT_DECAY",
    "SkipNotImplemented",
    "bandwidth",
    "load_harness",
    "optional",
    "random_arrays",
    "require",
    "scale_call",
    "skip_for_params",
]


def optional(module: str) -> ModuleType | None:
    """``module`` imported, or None where this commit or environment lacks it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def require(owner: object, name: str, *, method: bool = False) -> object:
    """``owner.name``; skip the benchmark where the commit under test lacks it.

    From ``setup`` (``method=False``) the whole parameter set is skipped; from a
    benchmark method, only that method, so that its peers still run.
    """
    found = getattr(owner, name, None) if owner is not None else None
    if found is None:
        raise (SkipNotImplemented if method else NotImplementedError)(f"no {name} here")
    return found


def random_arrays(shapes, dtype: str, seed: int = 0) -> list[np.ndarray]:
    """One array of standard normal values per shape, the same for a given seed."""
    rng = np.random.default_rng(seed)
    return [
        rng.standard_normal(shape, dtype=np.float32).astype(dtype, copy=False) for shape in shapes
    ]


def load_harness() -> ModuleType | None:
    """The package's benchmark harness: ``lars_numba.harness``, or ``lars_numba.bench``
    in the commits before it had one."""
    return optional("lars_numba.harness") or optional("lars_numba.bench")


@functools.cache
def bandwidth(parallel: bool) -> float:
    """The package's measured memory bandwidth in bytes per second, once per process."""
    return require(load_harness(), "stream_bandwidth", method=True)(parallel)


def scale_call(size: int, dtype: str):
    """A pair of ``size`` elements of ``dtype`` and a call of ``lars_numba.scale`` on it.

    The call has been made once: the kernels are compiled, or loaded from
    Numba's cache, and the thread pool started, outside what is measured.
    """
    import lars_numba

    w, g = random_arrays([size, size], dtype, seed=size)
    call = functools.partial(lars_numba.scale, w, g, weight_decay=WEIGHT_DECAY)
    call()
    return w, g, call
