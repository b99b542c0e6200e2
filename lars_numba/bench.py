"""The side-by-side benchmark table: ``python -m lars_numba bench``.

Every row is measured in one run, the candidates interleaved round by round,
so that a noisy neighbour slows them all alike; the table shows the median
time per call and the ratios between candidates. Chainer's hook is a
candidate only where chainer is installed. The timing, the bandwidth floor,
the peers and the table's layout are :mod:`lars_numba.harness`'s, which the
asv suite shares.

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
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from operator import truediv

import numba
import numpy as np

import lars_numba

from . import tunables
from .harness import (
    STEP_LR,
    WEIGHT_DECAY,
    chainer_hook_call,
    format_table,
    hook_candidates,
    interleaved,
    median_and_p90,
    model_with_grads,
    numpy_lars,
    pop_bandwidth,
    scale_of,
    seconds,
    single_threaded_blas,
    step_candidates,
    stream_candidates,
    take_turns,
)

SIZES = (64, 1_000, 10_000, 100_000, 1_000_000, 10_000_000, 50_000_000)


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
        "numpy": lambda: numpy_lars(w, g, weight_decay=WEIGHT_DECAY),
        "lars_numba": scale_of(w, g),
    }
    chainer_call = chainer_hook_call(w, g)
    return candidates if chainer_call is None else {"chainer": chainer_call, **candidates}


def scale_table(rows: list[dict[str, float]]) -> str:
    """The table of :func:`scale_rows`: microseconds per call and ratios."""
    peers = ["chainer", "numpy"] if "chainer" in rows[0] else ["numpy"]
    header = ["N", "thr", *(f"{peer} us" for peer in peers), "lars us", "floor us"]
    header += [*(f"{peer}/lars" for peer in peers), "lars/floor"]
    table = [
        [
            row["N"],
            row["threads"],
            *(row[name] * 1e6 for name in [*peers, "lars_numba", "floor"]),
            *(row[peer] / row["lars_numba"] for peer in peers),
            row["lars_numba"] / row["floor"],
        ]
        for row in rows
    ]
    return format_table(header, table, formats=[None, None, *[".2f"] * (len(header) - 2)])


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
                    name: scale_of(w, g, parallel=parallel)
                    for name, parallel in (("serial", False), ("parallel", True))
                },
                rounds,
            )
            rows.append((size, times["serial"], times["parallel"]))
    finally:
        tunables.PARALLEL_MIN_SIZE = cutoff
    return rows


def cutoff_table(rows: list[tuple[int, float, float]]) -> str:
    """The table of :func:`cutoff_rows`."""
    return format_table(
        ["N", "serial us", "parallel us", "serial/parallel"],
        [
            [size, serial * 1e6, parallel * 1e6, serial / parallel]
            for size, serial, parallel in rows
        ],
        formats=[None, ".2f", ".2f", ".2f"],
    )


# -- the hook as Chainer calls it ---------------------------------------------


def _update(n_params: int, size: int, hook: object | None) -> Callable[[], None]:
    """``optimizer.update`` of SGD over ``n_params`` float32 params of ``size`` elements."""
    import chainer

    rng = np.random.default_rng(0)
    ws, gs = ([rng.standard_normal(size, dtype=np.float32) for _ in range(n_params)] for _ in "wg")
    model = model_with_grads(ws, gs)
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


def hook_table(rows: list[tuple[int, int, dict[str, float]]]) -> str:
    """The table of :func:`hook_rows`: each hook's microseconds per parameter."""
    table = []
    for n, size, times in rows:
        chainer_cost, lars_cost = (
            (times[name] - times["no hook"]) / n * 1e6 for name in ("chainer", "lars_numba")
        )
        table.append([n, size, chainer_cost, lars_cost, chainer_cost / lars_cost])
    return format_table(
        ["params", "size", "chainer", "lars_numba", "chainer/lars"],
        table,
        formats=[None, None, ".2f", ".2f", ".2f"],
    )


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


def model_table(rows) -> str:
    """The tables of :func:`model_rows`: milliseconds per update, then the ratios to
    ``scale_all``."""
    names = list(rows[0][2])
    times = format_table(
        ["model", "elements", *names, "GB/s"],
        [
            [name, size, *(times[n] * 1e3 for n in names), bandwidth / 1e9]
            for name, size, times, bandwidth in rows
        ],
        formats=[None, None, *[".4g"] * len(names), ".1f"],
    )
    ratios = format_table(
        ["model", *names],
        [[name, *(times[n] / times["scale_all"] for n in names)] for name, _, times, _ in rows],
        formats=[None, *[".3g"] * len(names)],
    )
    return f"{times}\nratios to scale_all:\n{ratios}"


# -- the whole optimizer step ---------------------------------------------------


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


def step_table(rows: list[tuple[str, str, dict[str, float], float]]) -> str:
    """The table of :func:`step_rows`: a title per model and dtype, with its floor,
    over a row per step."""
    table: list = []
    for name, dtype, times, bandwidth in rows:
        floor = times["floor"]
        table.append(f"{dtype} {name} (floor {floor * 1e3:.3f} ms at {bandwidth / 1e9:.1f} GB/s)")
        table += [
            [step, seconds * 1e3, seconds / floor, seconds / times["LARS"]]
            for step, seconds in times.items()
            if step != "floor"
        ]
    return format_table(["step", "ms", "/floor", "/LARS"], table, [None, ".3f", ".2f", ".2f"], "  ")


# -- float16 against float32 ---------------------------------------------------


def half_rows(rounds: int) -> list[tuple[str, float, float]]:
    """Seconds per call of ``scale`` at 1e7 elements and of ``scale_all`` on ResNet-50,
    in float32 and float16, timed in the same rounds."""
    from ._shapes import RESNET50_SHAPES

    rng = np.random.default_rng(0)
    candidates = {}
    for dtype in ("float32", "float16"):
        w, g = (rng.standard_normal(10_000_000, dtype=np.float32).astype(dtype) for _ in "wg")
        candidates[f"scale {dtype}"] = scale_of(w, g)
        ws, gs = (
            [rng.standard_normal(s, dtype=np.float32).astype(dtype) for s in RESNET50_SHAPES]
            for _ in "wg"
        )
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
        name: scale_of(w, g, **arguments) for name, arguments in VARIANT_ARGUMENTS.items()
    }
    times = interleaved(candidates, rounds)
    return [(name, times[name]) for name in VARIANT_ARGUMENTS]


# -- parallel beside a busy core ----------------------------------------------


def contention_rows(sizes=(1_000_000, 10_000_000), calls: int = 40) -> list[tuple]:
    """Median and 90th percentile of single ``scale`` calls, threaded and serial,
    quiet and beside a process that keeps one core busy, taken in turn.

    Rows of (size, "quiet" or "busy", (parallel median, p90), (serial median, p90)).
    """
    rows = []
    for size in sizes:
        w, g = random_pair(size)
        calls_of = {"parallel": scale_of(w, g, parallel=True), "serial": scale_of(w, g)}
        for call in calls_of.values():
            call()
        for load in ("quiet", "busy"):
            spinner = None
            if load == "busy":
                spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                time.sleep(0.2)
            try:
                samples = take_turns(calls_of, calls, seconds)
            finally:
                if spinner is not None:
                    spinner.kill()
                    spinner.wait()
            rows.append(
                (size, load, median_and_p90(samples["parallel"]), median_and_p90(samples["serial"]))
            )
    return rows


def contention_table(rows: list[tuple]) -> str:
    """The table of :func:`contention_rows`, in milliseconds."""
    return format_table(
        ["N", "load", "parallel med", "p90", "serial med", "p90", "par/ser med", "par/ser p90"],
        [
            [size, load, *(t * 1e3 for t in (*threaded, *serial)), *map(truediv, threaded, serial)]
            for size, load, threaded, serial in rows
        ],
        formats=[None, None, *[".3f"] * 4, ".2f", ".2f"],
    )


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
        print(cutoff_table(cutoff_rows(args.sizes, args.rounds)))
        print(f"current cut-off: tunables.PARALLEL_MIN_SIZE = {tunables.PARALLEL_MIN_SIZE}")
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
    print(scale_table(rows))

    print(
        f"\nwhole model per update, float32, weight_decay={WEIGHT_DECAY}: milliseconds "
        f"(medians); floors at the bandwidth measured in each row's rounds, on {threads} threads"
    )
    print(model_table(model_rows(args.models, args.rounds)))

    print("\nfloat16 against float32 (medians, ms, timed in turn)")
    print(
        format_table(
            ["call", "float32", "float16", "f16/f32"],
            [
                [name, single * 1e3, half * 1e3, half / single]
                for name, single, half in half_rows(args.rounds)
            ],
            formats=[None, ".3f", ".3f", ".2f"],
        )
    )

    print("\nthe variants of the rule, scale at 1e7 float32 (medians, ms, timed in turn)")
    variants = variant_rows(args.rounds)
    default = variants[0][1]
    print(
        format_table(
            ["variant", "ms", "/default"],
            [[name, seconds * 1e3, seconds / default] for name, seconds in variants],
            formats=[None, ".3f", ".2f"],
        )
    )

    print("\nscale(parallel=True) and (parallel=False) quiet and beside a busy process, float32:")
    print("single calls in turn, median and 90th percentile in ms")
    print(contention_table(contention_rows()))

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
            "fused step's 7 passes at the bandwidth of 1 thread in the same rounds and to LARS"
        )
        print(step_table(steps))

    hooks = hook_rows(args.rounds)
    if hooks:
        print("\nthe hook inside SGD's optimizer.update(), float32: microseconds per parameter")
        print(hook_table(hooks))


if __name__ == "__main__":
    main()
