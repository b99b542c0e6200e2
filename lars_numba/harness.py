"""The benchmark harness: what ``python -m lars_numba bench``, its GPU and peer
tables and the asv suite in ``asv_bench/`` share.

- Timing in turns: every round times each candidate once, so that a noisy
  neighbour slows them all alike (:func:`take_turns`, :func:`interleaved`).
- The bandwidth floor: a STREAM triad and an in-place add, timed among the
  candidates in the same rounds, give the bandwidth of the moments the
  candidates ran in (:func:`stream_candidates`, :func:`pop_bandwidth`).
- The peers: the rule in plain NumPy, Chainer's hook, and the ways Chainer
  users take a LARS step, built on the same arrays as lars_numba's calls.
- One table formatter, :func:`format_table`.

Chainer is imported only inside the functions that build its candidates.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
from numba import njit, prange

import lars_numba

#: The weight decay every benchmark uses: nonzero, so the decay term is timed too.
WEIGHT_DECAY = 1e-4

#: The learning rate of the timed steps: small enough that hundreds of steps on
#: the same gradients leave float16 weights far from overflowing.
STEP_LR = 1e-3

Sample = TypeVar("Sample")


# -- timing in turns --------------------------------------------------------------


def seconds(call: Callable[[], object], calls: int = 1) -> float:
    """Seconds per call of ``calls`` calls of ``call`` in a row."""
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - start) / calls


def calls_per_sample(call: Callable[[], object], target: float = 0.02) -> int:
    """How many calls fill about ``target`` seconds, so timer resolution does not matter."""
    call()  # the first call may compile, or load from Numba's cache
    calls = 1
    while (total := seconds(call, calls) * calls) < target / 10 and calls < 100_000:
        calls *= 10
    return max(1, round(calls * target / total))


def take_turns(
    candidates: dict[str, Callable[[], object]],
    rounds: int,
    sample: Callable[[Callable[[], object]], Sample],
) -> dict[str, list[Sample]]:
    """``sample(call)`` of each candidate, in turn, ``rounds`` times: the samples by name."""
    samples: dict[str, list[Sample]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, call in candidates.items():
            samples[name].append(sample(call))
    return samples


def interleaved(candidates: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each candidate, timed in turn each round."""
    calls = {call: calls_per_sample(call) for call in candidates.values()}
    samples = take_turns(candidates, rounds, lambda call: seconds(call, calls[call]))
    return {name: statistics.median(times) for name, times in samples.items()}


def median_and_p90(samples: Sequence[float]) -> tuple[float, float]:
    """The median and the 90th percentile of ``samples``."""
    return statistics.median(samples), float(np.percentile(samples, 90))


# -- the bandwidth floor ------------------------------------------------------------


def _triad(a, b, c, s):
    for i in prange(a.shape[0]):
        a[i] = b[i] + s * c[i]


def _add_scaled(a, b, c, s):
    # Reads a and b and writes a back, the update's own pattern: unlike the
    # triad's store to a, this one needs no read-for-ownership of a.
    for i in prange(a.shape[0]):
        a[i] += s * b[i]


# prange is range in the serial compilations.
_STREAM_KERNELS = {
    parallel: [njit(parallel=parallel, nogil=True)(kernel) for kernel in (_triad, _add_scaled)]
    for parallel in (False, True)
}

#: Elements of the stream kernels' arrays: 128 MiB each, far past any cache.
STREAM_SIZE = 1 << 25


@functools.cache
def _stream_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tuple(np.full(STREAM_SIZE, value, dtype=np.float32) for value in (0.0, 1.0, 2.0))


def stream_candidates(parallel: bool) -> dict[str, Callable[[], object]]:
    """A triad and an in-place add over arrays far larger than the cache, serial or
    on all of Numba's threads.

    Timed among the candidates, in the same rounds, they give the bandwidth
    of the moments the candidates ran in, which on a shared machine moves
    from one minute to the next.
    """
    a, b, c = _stream_arrays()
    return {
        f"stream {kernel.__name__}": functools.partial(kernel, a, b, c, 3.0)
        for kernel in _STREAM_KERNELS[parallel]
    }


def pop_bandwidth(times: dict[str, float]) -> float:
    """The best bandwidth of the stream kernels in ``times``, which are removed from it.

    Both count three passes over the arrays, as STREAM does.
    """
    names = [name for name in times if name.startswith("stream ")]
    fastest = min(times.pop(name) for name in names)
    return 3 * STREAM_SIZE * np.dtype(np.float32).itemsize / fastest


def stream_bandwidth(parallel: bool, repeats: int = 10) -> float:
    """The best bandwidth in bytes per second of the stream kernels, on their own."""
    calls = stream_candidates(parallel)
    for call in calls.values():
        call()
    return pop_bandwidth(
        {name: min(seconds(call) for _ in range(repeats)) for name, call in calls.items()}
    )


def single_threaded_blas() -> bool:
    """Keep NumPy's BLAS to one thread for the rest of the process, where threadpoolctl is.

    OpenBLAS's threads spin on the cores for a while after each call, so in
    interleaved rounds a parallel kernel that follows NumPy's or Chainer's
    norms waits for them. The peers lose nothing: their norms are bound by
    memory, not threads. Returns whether the limit is in place.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return False
    threadpool_limits(1, user_api="blas")
    return True


# -- the peers ----------------------------------------------------------------------


def numpy_lars(w: np.ndarray, g: np.ndarray, threshold=1e-2, weight_decay=0.0, eps=1e-9) -> None:
    """The rule in plain NumPy, as Chainer computes it without its own overhead."""
    w_norm = np.linalg.norm(w)
    g_norm = np.linalg.norm(g)
    local_rate = w_norm / (eps + g_norm + weight_decay * w_norm)
    rate = np.where(w_norm > threshold, local_rate, 1.0)
    g += weight_decay * w
    g *= rate


def chainer_hook_call(w: np.ndarray, g: np.ndarray) -> Callable[[], object] | None:
    """A call of Chainer's own hook on a parameter holding ``w`` and ``g``, if chainer imports."""
    try:
        import chainer
    except ImportError:
        return None
    param = chainer.Parameter(w)
    param.grad = g
    hook = chainer.optimizer_hooks.GradientLARS(weight_decay=WEIGHT_DECAY)
    return lambda: hook(None, param)


def model_with_grads(ws, gs):
    """A Chainer link whose parameters are ``ws``, with gradients ``gs``."""
    import chainer

    model = chainer.Link()
    with model.init_scope():
        for i, (w, g) in enumerate(zip(ws, gs, strict=True)):
            param = chainer.Parameter(w)
            param.grad = g
            setattr(model, f"p{i}", param)
    return model


def hook_candidates(ws, gs, parallel: bool) -> dict[str, Callable[[], object]]:
    """Chainer's hook and both of lars_numba's over a model of parameters ``ws`` with
    gradients ``gs``, each called as Chainer's optimizer calls it."""
    import chainer

    from . import chainer as lars_chainer

    model = model_with_grads(ws, gs)
    optimizer = chainer.optimizers.SGD().setup(model)
    params = list(model.params())

    def per_parameter(hook):
        return lambda: [hook(param.update_rule, param) for param in params]

    return {
        "chainer_hook": per_parameter(
            chainer.optimizer_hooks.GradientLARS(weight_decay=WEIGHT_DECAY)
        ),
        "lars_hook": per_parameter(lars_chainer.GradientLARS(weight_decay=WEIGHT_DECAY)),
        "fused_hook": functools.partial(
            lars_chainer.FusedGradientLARS(weight_decay=WEIGHT_DECAY, parallel=parallel),
            optimizer,
        ),
    }


def step_candidates(shapes, dtype=np.float32) -> tuple[dict[str, Callable[[], object]], int]:
    """Ways to take one LARS momentum step of a whole model, each ``optimizer.update()``
    with the gradients present, and the bytes the 7 passes of one fused step move.

    Each candidate has a model of its own over copies of the same weights and
    gradients. For float16 only lars_numba's ``LARS`` under ``use_fp32_update``
    is timed, against Chainer's ``MomentumSGD`` under the same.
    """
    import chainer

    from . import chainer as lars_chainer

    rng = np.random.default_rng(0)
    ws = [rng.standard_normal(shape, dtype=np.float32).astype(dtype) for shape in shapes]
    gs = [rng.standard_normal(shape, dtype=np.float32).astype(dtype) for shape in shapes]

    def update_of(optimizer, hook=None):
        model = model_with_grads([w.copy() for w in ws], [g.copy() for g in gs])
        optimizer.setup(model)
        if dtype == np.float16:
            optimizer.use_fp32_update()
        if hook is not None:
            optimizer.add_hook(hook)
        optimizer.update()  # compiles, creates the states
        return optimizer.update

    def momentum_sgd():
        return chainer.optimizers.MomentumSGD(lr=STEP_LR)

    candidates = {
        "LARS": update_of(lars_chainer.LARS(lr=STEP_LR, weight_decay=WEIGHT_DECAY)),
        # What a user gets by asking for Numba's threads; Chainer's steps have none.
        "LARS_parallel": update_of(
            lars_chainer.LARS(lr=STEP_LR, weight_decay=WEIGHT_DECAY, parallel=True)
        ),
        "MomentumSGD": update_of(momentum_sgd()),
    }
    if dtype == np.float32:
        candidates["+chainer_hook"] = update_of(
            momentum_sgd(), chainer.optimizer_hooks.GradientLARS(weight_decay=WEIGHT_DECAY)
        )
        candidates["+fused_hook"] = update_of(
            momentum_sgd(), lars_chainer.FusedGradientLARS(weight_decay=WEIGHT_DECAY)
        )
    size = sum(w.size for w in ws)
    # Norms: read w, g; step: read w, g, v, write v, w. Under float32 masters
    # the master and the velocity are float32, w and g float16, and w is
    # written besides the master.
    bytes_per_element = 7 * 4 if dtype == np.float32 else 4 + 2 + 4 + 2 + 4 + 4 + 4 + 2
    return candidates, bytes_per_element * size


def scale_of(w: np.ndarray, g: np.ndarray, **arguments: object) -> Callable[[], object]:
    """A call of :func:`lars_numba.scale` on ``w`` and ``g`` with the benchmarks' weight
    decay and ``arguments``."""
    return functools.partial(lars_numba.scale, w, g, weight_decay=WEIGHT_DECAY, **arguments)


# -- tables ---------------------------------------------------------------------------


def format_table(
    header: Sequence[str],
    rows: Sequence[Sequence[object] | str],
    formats: Sequence[str | None] = (),
    indent: str = "",
) -> str:
    """``rows`` under ``header``, a column per cell, as text.

    A number is shown in its column's format spec from ``formats`` (past
    their end, or where it is ``None``: an integer in full, a float to 4
    significant digits), ``None`` as ``-``. A column of text only is aligned
    left, any other right. A row that is a string is a title within the
    table, printed as it is; the header and the other rows start with
    ``indent``.
    """
    specs = [*formats, *[None] * (len(header) - len(formats))]

    def text(cell: object, spec: str | None) -> str:
        if cell is None:
            return "-"
        if isinstance(cell, str):
            return cell
        if spec is None:
            return f"{cell:.4g}" if isinstance(cell, float) else str(cell)
        return format(cell, spec)

    table = [row for row in rows if not isinstance(row, str)]
    left = [all(isinstance(row[k], str) for row in table) for k in range(len(header))]
    texts = [
        row if isinstance(row, str) else [text(*pair) for pair in zip(row, specs, strict=True)]
        for row in rows
    ]
    widths = [len(name) for name in header]
    for row in texts:
        if not isinstance(row, str):
            widths = [max(width, len(cell)) for width, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        aligned = (
            cell.ljust(width) if is_left else cell.rjust(width)
            for cell, width, is_left in zip(cells, widths, left, strict=True)
        )
        return (indent + " ".join(aligned)).rstrip()

    return "\n".join([line(header), *(row if isinstance(row, str) else line(row) for row in texts)])
