"""The side-by-side benchmark table: ``python -m lars_numba.bench``.

Every row is measured in one run, the candidates interleaved round by round,
so that a noisy neighbour slows them all alike; the table shows the median
time per call and the ratios between candidates. Chainer's hook is a
candidate only where chainer is installed.

The floor is the time to move the bytes the update must move, five passes
of ``N * itemsize`` (read ``w`` and ``g`` for the norms, read them again and
write ``g``), at the best bandwidth of a STREAM triad and of an in-place add
with the thread count that ``scale`` uses at that size, timed in the same
rounds as the candidates.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import numba
import numpy as np
from numba import njit, prange

import lars_numba

from . import tunables

SIZES = (64, 1_000, 10_000, 100_000, 1_000_000, 10_000_000, 50_000_000)
WEIGHT_DECAY = 1e-4


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
    """A triad and an in-place add over arrays far larger than the cache.

    Timed among the candidates, in the same rounds, they give the bandwidth
    of the moments the candidates ran in: this machine's bandwidth on two
    threads moves between about 55 and 85 GB/s from one minute to the next.
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
        {name: min(_seconds(call) for _ in range(repeats)) for name, call in calls.items()}
    )


def single_threaded_blas() -> bool:
    """Keep NumPy's BLAS to one thread for the rest of the process, where threadpoolctl is.

    OpenBLAS's threads spin on the cores for a while after each call, so in
    interleaved rounds a parallel kernel that follows NumPy's or Chainer's
    norms waits for them (``scale`` at 1e6 elements here: 323 us against 175
    us). The peers lose nothing: their norms are bound by memory, not threads.
    Returns whether the limit is in place.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return False
    threadpool_limits(1, user_api="blas")
    return True


def _seconds(call: Callable[[], object], calls: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - start) / calls


def _calls_per_sample(call: Callable[[], object], target: float = 0.02) -> int:
    """How many calls fill about ``target`` seconds, so timer resolution does not matter."""
    call()  # the first call may compile, or load from Numba's cache
    calls = 1
    while (total := _seconds(call, calls) * calls) < target / 10 and calls < 100_000:
        calls *= 10
    return max(1, round(calls * target / total))


def interleaved(candidates: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each candidate, timed in turn each round."""
    calls = {name: _calls_per_sample(call) for name, call in candidates.items()}
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, call in candidates.items():
            samples[name].append(_seconds(call, calls[name]))
    return {name: statistics.median(times) for name, times in samples.items()}


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


def scale_rows(sizes, rounds: int) -> list[dict[str, float]]:
    """One row per size: seconds per call of each candidate, the bandwidth and the floor.

    The stream kernels run in the same rounds as the candidates, with the
    thread count ``scale`` uses at that size.
    """
    rows = []
    for size in sizes:
        w, g = random_pair(size)
        threads = size >= tunables.PARALLEL_MIN_SIZE
        candidates = {**scale_candidates(w, g), **stream_candidates(threads)}
        times = interleaved(candidates, rounds if size < 10_000_000 else 3)
        bandwidth = pop_bandwidth(times)
        times["floor"] = 5 * w.nbytes / bandwidth
        rows.append(
            {
                "N": size,
                "threads": numba.get_num_threads() if threads else 1,
                "bandwidth": bandwidth,
                **times,
            }
        )
    return rows


def bandwidth_range(rows, threads: int) -> str:
    """The bandwidths measured beside the rows run on ``threads`` threads, as text."""
    found = [row["bandwidth"] / 1e9 for row in rows if row["threads"] == threads]
    if not found:
        return "not measured"
    return f"{min(found):.1f} to {max(found):.1f} GB/s"


def random_pair(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Weights and a gradient of ``size`` float32 values, the same for a given size."""
    rng = np.random.default_rng(size)
    return rng.standard_normal(size, dtype=np.float32), rng.standard_normal(size, dtype=np.float32)


def scale_candidates(w: np.ndarray, g: np.ndarray) -> dict[str, Callable[[], object]]:
    """The implementations compared on one parameter, Chainer's hook first if it imports."""
    candidates = {
        "numpy": functools.partial(numpy_lars, w, g, weight_decay=WEIGHT_DECAY),
        "lars_numba": functools.partial(lars_numba.scale, w, g, weight_decay=WEIGHT_DECAY),
    }
    chainer_call = chainer_hook_call(w, g)
    return candidates if chainer_call is None else {"chainer": chainer_call, **candidates}


def _format_table(rows: list[dict[str, float]]) -> str:
    has_chainer = "chainer" in rows[0]
    header = f"{'N':>10} {'thr':>3}"
    if has_chainer:
        header += f" {'chainer us':>11}"
    header += f" {'numpy us':>10} {'lars us':>9} {'floor us':>9}"
    if has_chainer:
        header += f" {'chainer/lars':>12}"
    header += f" {'numpy/lars':>10} {'lars/floor':>10}"
    lines = [header]
    for row in rows:
        line = f"{row['N']:>10} {row['threads']:>3}"
        if has_chainer:
            line += f" {row['chainer'] * 1e6:>11.2f}"
        line += (
            f" {row['numpy'] * 1e6:>10.2f} {row['lars_numba'] * 1e6:>9.2f}"
            f" {row['floor'] * 1e6:>9.2f}"
        )
        if has_chainer:
            line += f" {row['chainer'] / row['lars_numba']:>12.2f}"
        line += (
            f" {row['numpy'] / row['lars_numba']:>10.2f} {row['lars_numba'] / row['floor']:>10.2f}"
        )
        lines.append(line)
    return "\n".join(lines)


def cutoff_rows(sizes, rounds: int) -> list[tuple[int, float, float]]:
    """Seconds per call of the serial and the parallel ``scale`` kernel at each size.

    The cut-off is lowered to 0 meanwhile, so that ``parallel=True`` runs the
    parallel kernel at every size.
    """
    rows = []
    cutoff = tunables.PARALLEL_MIN_SIZE
    tunables.PARALLEL_MIN_SIZE = 0
    try:
        for size in sizes:
            w, g = random_pair(size)
            times = interleaved(
                {
                    name: functools.partial(
                        lars_numba.scale, w, g, weight_decay=WEIGHT_DECAY, parallel=parallel
                    )
                    for name, parallel in (("serial", False), ("parallel", True))
                },
                rounds,
            )
            rows.append((size, times["serial"], times["parallel"]))
    finally:
        tunables.PARALLEL_MIN_SIZE = cutoff
    return rows


# -- the hook as Chainer calls it ---------------------------------------------


def _update(n_params: int, size: int, hook: object | None) -> Callable[[], None]:
    """``optimizer.update`` of SGD over ``n_params`` float32 params of ``size`` elements."""
    import chainer

    rng = np.random.default_rng(0)
    model = chainer.Link()
    with model.init_scope():
        for i in range(n_params):
            param = chainer.Parameter(rng.standard_normal(size, dtype=np.float32))
            param.grad = rng.standard_normal(size, dtype=np.float32)
            setattr(model, f"p{i}", param)
    # lr = 0 keeps the weights, hence the work per update, the same across calls;
    # the hooks rescale the same gradients to a fixed point, whose norm they keep.
    optimizer = chainer.optimizers.SGD(lr=0.0).setup(model)
    if hook is not None:
        optimizer.add_hook(hook)
    return optimizer.update


def measure_hook_overhead(n_params: int, size: int, repeats: int) -> dict[str, float]:
    """Median seconds per ``optimizer.update()`` with no hook, Chainer's and ours.

    The three optimizers own identical models and are timed in turn, round by
    round, ``repeats`` rounds, so that a noisy neighbour slows them all alike.
    The hooks' cost per parameter is ``(t[hook] - t['no hook']) / n_params``.

    Parameters
    ----------
    n_params : int
        How many parameters the model holds.
    size : int
        Elements per parameter (float32).
    repeats : int
        Rounds of timing; the median is taken over them.

    Returns
    -------
    dict[str, float]
        Seconds per update under ``'no hook'``, ``'chainer'`` and ``'lars_numba'``.
    """
    import chainer.optimizer_hooks

    from . import chainer as lars_chainer

    return interleaved(
        {
            "no hook": _update(n_params, size, None),
            "chainer": _update(
                n_params, size, chainer.optimizer_hooks.GradientLARS(weight_decay=WEIGHT_DECAY)
            ),
            "lars_numba": _update(
                n_params, size, lars_chainer.GradientLARS(weight_decay=WEIGHT_DECAY)
            ),
        },
        repeats,
    )


HOOK_MODELS = ((100, 16), (100, 1_000), (20, 100_000))


def hook_rows(rounds: int) -> list[tuple[int, int, dict[str, float]]]:
    """:func:`measure_hook_overhead` for each of :data:`HOOK_MODELS`; ``[]`` without chainer."""
    try:
        import chainer  # noqa: F401
    except ImportError:
        return []
    return [(n, size, measure_hook_overhead(n, size, rounds)) for n, size in HOOK_MODELS]


# -- a whole model per update ---------------------------------------------------


def whole_models() -> dict[str, tuple[tuple[int, ...], ...]]:
    """The parameter shapes of the models timed whole, by name."""
    from ._shapes import RESNET50_SHAPES

    return {
        f"ResNet-50 ({len(RESNET50_SHAPES)} arrays)": RESNET50_SHAPES,
        "1000 x 16": ((16,),) * 1000,
        "1000 x 1000": ((1000,),) * 1000,
    }


def model_candidates(shapes) -> tuple[dict[str, Callable[[], object]], int]:
    """Ways to scale every gradient of a float32 model once, and its element count.

    All of them work on the same arrays: rescaling the same gradients again
    and again converges to a fixed point, so the work per call stays the same.
    """
    rng = np.random.default_rng(0)
    ws = [rng.standard_normal(shape, dtype=np.float32) for shape in shapes]
    gs = [rng.standard_normal(shape, dtype=np.float32) for shape in shapes]
    candidates = {
        "scale_loop": lambda: [
            lars_numba.scale(w, g, weight_decay=WEIGHT_DECAY) for w, g in zip(ws, gs, strict=True)
        ],
        "scale_all": lambda: lars_numba.scale_all(ws, gs, weight_decay=WEIGHT_DECAY),
    }
    try:
        import chainer  # noqa: F401
    except ImportError:
        return candidates, sum(w.size for w in ws)
    return {**hook_candidates(ws, gs, parallel=True), **candidates}, sum(w.size for w in ws)


def _model_with_grads(ws, gs):
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

    model = _model_with_grads(ws, gs)
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


def model_rows(names, rounds: int) -> list[tuple[str, int, dict[str, float], float]]:
    """Seconds per whole-model call of each candidate, the floors, and the bandwidth.

    The floor of five passes counts what the two kernels move from memory;
    the floor of three, what they would move if the second pass were served
    from cache, as it is for pairs small enough to stay there. Both are at
    the bandwidth of the stream kernels run in the same rounds.
    """
    rows = []
    for name in names:
        candidates, size = model_candidates(whole_models()[name])
        times = interleaved({**candidates, **stream_candidates(True)}, rounds)
        bandwidth = pop_bandwidth(times)
        times["floor5"] = 5 * 4 * size / bandwidth
        times["floor3"] = 3 * 4 * size / bandwidth
        rows.append((name, size, times, bandwidth))
    return rows


def _format_model_table(rows) -> str:
    names = list(rows[0][2])
    width = max(len(row[0]) for row in rows)
    lines = [
        f"{'model':<{width}} {'elements':>9} "
        + " ".join(f"{n:>12}" for n in names)
        + f" {'GB/s':>6}"
    ]
    for name, size, times, bandwidth in rows:
        lines.append(
            f"{name:<{width}} {size:>9} "
            + " ".join(f"{times[n] * 1e3:>12.4g}" for n in names)
            + f" {bandwidth / 1e9:>6.1f}"
        )
    lines.append("ratios to scale_all:")
    for name, _, times, _ in rows:
        lines.append(
            f"{name:<{width}} {'':>9} "
            + " ".join(f"{times[n] / times['scale_all']:>12.3g}" for n in names)
        )
    return "\n".join(lines)


# -- the whole optimizer step ---------------------------------------------------

#: The learning rate of the timed steps: small enough that hundreds of steps on
#: the same gradients leave float16 weights far from overflowing.
STEP_LR = 1e-3


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
        model = _model_with_grads([w.copy() for w in ws], [g.copy() for g in gs])
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


def step_rows(names, rounds: int) -> list[tuple[str, str, dict[str, float], float]]:
    """Seconds per ``optimizer.update()`` of each step of :func:`step_candidates` on
    the models ``names`` of :func:`whole_models` in float32 (ResNet-50 in float16
    too), and the floor of its passes at the bandwidth measured in the same
    rounds; ``[]`` without chainer."""
    try:
        import chainer  # noqa: F401
    except ImportError:
        return []
    rows = []
    for name in names:
        dtypes = (np.float32, np.float16) if name.startswith("ResNet-50") else (np.float32,)
        for dtype in dtypes:
            candidates, moved = step_candidates(whole_models()[name], dtype)
            times = interleaved({**candidates, **stream_candidates(False)}, rounds)
            bandwidth = pop_bandwidth(times)
            times["floor"] = moved / bandwidth
            rows.append((name, np.dtype(dtype).name, times, bandwidth))
    return rows


# -- float16 against float32 ---------------------------------------------------


def half_rows(rounds: int) -> list[tuple[str, float, float]]:
    """Seconds per call of ``scale`` at 1e7 elements and of ``scale_all`` on ResNet-50,
    in float32 and float16, timed in the same rounds."""
    from ._shapes import RESNET50_SHAPES

    rng = np.random.default_rng(0)
    candidates = {}
    for dtype in ("float32", "float16"):
        w, g = (rng.standard_normal(10_000_000, dtype=np.float32).astype(dtype) for _ in "wg")
        candidates[f"scale {dtype}"] = functools.partial(
            lars_numba.scale, w, g, weight_decay=WEIGHT_DECAY
        )
        ws = [
            rng.standard_normal(shape, dtype=np.float32).astype(dtype) for shape in RESNET50_SHAPES
        ]
        gs = [
            rng.standard_normal(shape, dtype=np.float32).astype(dtype) for shape in RESNET50_SHAPES
        ]
        candidates[f"scale_all {dtype}"] = functools.partial(
            lars_numba.scale_all, ws, gs, weight_decay=WEIGHT_DECAY
        )
    times = interleaved(candidates, rounds)
    return [
        (name, times[f"{name} float32"], times[f"{name} float16"])
        for name in ("scale", "scale_all")
    ]


# -- the variants against the default -------------------------------------------

#: The variants timed against the default rule: name, arguments of ``scale``.
#: Each keeps the rate of a random pair near 1 (``||w||`` near ``||g||``), so
#: that the gradient, scaled in place call after call, stays clear of subnormals.
VARIANT_ARGUMENTS = {
    "default": {},
    "trust_coefficient": {"trust_coefficient": 1.0 + WEIGHT_DECAY},
    'denominator="update"': {"denominator": "update"},
    "clip_lr": {"clip_lr": 0.1},
}


def variant_rows(rounds: int, size: int = 10_000_000) -> list[tuple[str, float]]:
    """Seconds per ``scale`` call of each variant at ``size`` float32 elements,
    timed in the same rounds."""
    w, g = random_pair(size)
    candidates = {
        name: functools.partial(lars_numba.scale, w, g, weight_decay=WEIGHT_DECAY, **arguments)
        for name, arguments in VARIANT_ARGUMENTS.items()
    }
    times = interleaved(candidates, rounds)
    return [(name, times[name]) for name in VARIANT_ARGUMENTS]


# -- parallel beside a busy core ----------------------------------------------


def _percentiles(samples: list[float]) -> tuple[float, float]:
    return statistics.median(samples), float(np.percentile(samples, 90))


def contention_rows(sizes=(1_000_000, 10_000_000), calls: int = 40) -> list[tuple]:
    """Median and 90th percentile of single ``scale`` calls, threaded and serial,
    quiet and beside a process that keeps one core busy, taken in turn.

    Rows of (size, "quiet" or "busy", (parallel median, p90), (serial median, p90)).
    """
    rows = []
    for size in sizes:
        w, g = random_pair(size)
        calls_of = {
            parallel: functools.partial(
                lars_numba.scale, w, g, weight_decay=WEIGHT_DECAY, parallel=parallel
            )
            for parallel in (True, False)
        }
        for call in calls_of.values():
            call()
        for load in ("quiet", "busy"):
            spinner = None
            if load == "busy":
                spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                time.sleep(0.2)
            try:
                samples = {parallel: [] for parallel in calls_of}
                for _ in range(calls):
                    for parallel, call in calls_of.items():
                        samples[parallel].append(_seconds(call))
            finally:
                if spinner is not None:
                    spinner.kill()
                    spinner.wait()
            rows.append((size, load, _percentiles(samples[True]), _percentiles(samples[False])))
    return rows


# -- Python's share of scale_all, per pair ---------------------------------------


def per_pair_rows(rounds: int, counts=(1000, 3000), size: int = 16) -> list[tuple[int, float]]:
    """Seconds per ``scale_all`` call on ``count`` float32 pairs of ``size`` elements.

    The difference between two counts over the difference of pairs is what one
    more pair costs: Python's work on it, its checks, and its few elements.
    """
    candidates = {}
    for count in counts:
        ws = [np.ones(size, np.float32) for _ in range(count)]
        gs = [np.ones(size, np.float32) for _ in range(count)]
        candidates[count] = functools.partial(
            lars_numba.scale_all, ws, gs, weight_decay=WEIGHT_DECAY, parallel=False
        )
    times = interleaved(candidates, rounds)
    return [(count, times[count]) for count in counts]


_FIRST_CALL = (
    "import time; start = time.perf_counter()\n"
    "import numpy as np, lars_numba\n"
    "lars_numba.scale(np.ones(64, np.float32), np.ones(64, np.float32))\n"
    "print(time.perf_counter() - start)\n"
)


def first_call_seconds(cache_dir: str) -> float:
    """Import and first ``scale`` call in a new process, with ``cache_dir`` as Numba's cache."""
    env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir}
    done = subprocess.run(
        [sys.executable, "-c", _FIRST_CALL], env=env, capture_output=True, text=True, check=True
    )
    return float(done.stdout)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lars_numba bench", description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES)
    parser.add_argument("--rounds", type=int, default=7, help="samples per candidate")
    models = list(whole_models())
    parser.add_argument(
        "--models", nargs="+", choices=models, default=models, help="whole models to time"
    )
    parser.add_argument(
        "--cutoff", action="store_true", help="time the serial and parallel kernels instead"
    )
    args = parser.parse_args(argv)

    blas = "1 thread" if single_threaded_blas() else "its own threads (no threadpoolctl)"
    print(
        f"lars_numba {lars_numba.__version__}, numba {numba.__version__}, "
        f"numpy {np.__version__}, {os.cpu_count()} cores, "
        f"{numba.get_num_threads()} numba threads ({numba.config.THREADING_LAYER} layer), "
        f"NumPy's BLAS on {blas}"
    )
    if args.cutoff:
        cutoff = tunables.PARALLEL_MIN_SIZE
        print(f"{'N':>10} {'serial us':>10} {'parallel us':>12} {'serial/parallel':>16}")
        for size, serial, parallel in cutoff_rows(args.sizes, args.rounds):
            print(
                f"{size:>10} {serial * 1e6:>10.2f} {parallel * 1e6:>12.2f}"
                f" {serial / parallel:>16.2f}"
            )
        print(f"current cut-off: tunables.PARALLEL_MIN_SIZE = {cutoff}")
        return

    with tempfile.TemporaryDirectory() as cache_dir:
        cold = first_call_seconds(cache_dir)
        warm = first_call_seconds(cache_dir)
    print(f"import + first scale() call: {cold:.2f} s with a cold cache, {warm:.2f} s warm")

    rows = scale_rows(args.sizes, args.rounds)
    threads = numba.get_num_threads()
    print(
        f"scale(w, g, weight_decay={WEIGHT_DECAY}), float32; times are medians per call; "
        f"bandwidth, measured in the rounds of each row: {bandwidth_range(rows, 1)} on 1 thread, "
        f"{bandwidth_range(rows, threads)} on {threads}"
    )
    print(_format_table(rows))

    print(
        f"\nwhole model per update, float32, weight_decay={WEIGHT_DECAY}: milliseconds "
        f"(medians); floors at the bandwidth measured in each row's rounds, on {threads} threads"
    )
    print(_format_model_table(model_rows(args.models, args.rounds)))

    print("\nfloat16 against float32 (medians, ms, timed in turn)")
    print(f"{'call':>10} {'float32':>9} {'float16':>9} {'f16/f32':>8}")
    for name, single, half in half_rows(args.rounds):
        print(f"{name:>10} {single * 1e3:>9.3f} {half * 1e3:>9.3f} {half / single:>8.2f}")

    print("\nthe variants of the rule, scale at 1e7 float32 (medians, ms, timed in turn)")
    variants = variant_rows(args.rounds)
    default = variants[0][1]
    print(f"{'variant':>22} {'ms':>9} {'/default':>9}")
    for name, seconds in variants:
        print(f"{name:>22} {seconds * 1e3:>9.3f} {seconds / default:>9.2f}")

    print("\nscale(parallel=True) and (parallel=False) quiet and beside a busy process, float32:")
    print("single calls in turn, median / 90th percentile in ms")
    print(
        f"{'N':>10} {'load':>6} {'parallel':>15} {'serial':>15}"
        f" {'par/ser med':>12} {'par/ser p90':>12}"
    )
    for size, load, threaded, serial in contention_rows():
        print(
            f"{size:>10} {load:>6} {threaded[0] * 1e3:>7.3f}/{threaded[1] * 1e3:<7.3f}"
            f" {serial[0] * 1e3:>7.3f}/{serial[1] * 1e3:<7.3f}"
            f" {threaded[0] / serial[0]:>12.2f} {threaded[1] / serial[1]:>12.2f}"
        )

    (few, few_time), (many, many_time) = per_pair_rows(args.rounds)
    print(
        f"\nscale_all on {few} and {many} float32 pairs of 16 elements: "
        f"{few_time * 1e3:.3f} and {many_time * 1e3:.3f} ms; one more pair costs "
        f"{(many_time - few_time) / (many - few) * 1e6:.3f} us"
    )

    steps = step_rows(args.models, args.rounds)
    if steps:
        print(
            f"\nthe whole step, optimizer.update() with gradients, lr={STEP_LR}, "
            f"weight_decay={WEIGHT_DECAY}, on 1 thread (LARS_parallel: on "
            f"{numba.get_num_threads()}): milliseconds (medians), and ratios to the floor of a "
            "fused step's 7 passes at the bandwidth of 1 thread in the same rounds"
        )
        for name, dtype, times, bandwidth in steps:
            names = [n for n in times if n != "floor"]
            floor = times["floor"]
            print(f"{dtype} {name} (floor {floor * 1e3:.3f} ms at {bandwidth / 1e9:.1f} GB/s)")
            for n in names:
                print(
                    f"  {n:>14} {times[n] * 1e3:>9.3f} ms {times[n] / floor:>7.2f}x floor"
                    f" {times[n] / times['LARS']:>7.2f}x LARS"
                )

    hooks = hook_rows(args.rounds)
    if hooks:
        print("\nthe hook inside SGD's optimizer.update(), float32: microseconds per parameter")
        print(f"{'params':>7} {'size':>8} {'chainer':>9} {'lars_numba':>11} {'chainer/lars':>13}")
        for n, size, times in hooks:
            chainer_cost, lars_cost = (
                (times[name] - times["no hook"]) / n * 1e6 for name in ("chainer", "lars_numba")
            )
            print(
                f"{n:>7} {size:>8} {chainer_cost:>9.2f} {lars_cost:>11.2f}"
                f" {chainer_cost / lars_cost:>13.2f}"
            )


if __name__ == "__main__":
    main()
