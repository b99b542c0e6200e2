"""The GPU table: ``python -m lars_numba bench --gpu``, which ``.ci/gpu`` runs.

For one parameter and for a whole model's update (ResNet-50's 161 float32
arrays by default), each candidate's GPU time (between CUDA events recorded
on the launch stream before and after the call: the kernels, and the gaps
between them when the host cannot keep up) and host time (the call's
wall-clock time until it returns, before the synchronization), as medians
of rounds in which the candidates take turns. The floor is the
five passes over ``w`` and ``g`` that the rule needs, at the bandwidth of a
device-to-device copy timed in the same rounds.

The candidates are ``lars_numba.scale`` (once per array), ``scale_all`` and,
where Chainer and CuPy are installed, both of lars_numba's hooks
(``lars_hook``, ``fused_hook``) and Chainer's ``GradientLARS``
(``chainer_hook``) on CuPy parameters. The arrays are CuPy's where
CuPy is installed, Numba's device arrays otherwise. Under Numba's CUDA
simulator the table runs too, but its times say nothing of a GPU.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import numpy as np

import lars_numba

from . import harness
from ._shapes import RESNET50_SHAPES

#: Bytes of the buffer the copy floor is timed on: larger than any GPU's L2.
COPY_BYTES = 1 << 28


def model_shapes(spec: str) -> tuple[tuple[int, ...], ...]:
    """The shapes of ``spec``: ``"resnet50"``, or ``"N x S"`` for N arrays of S elements."""
    if spec == "resnet50":
        return RESNET50_SHAPES
    count, _, size = spec.partition("x")
    return ((int(size),),) * int(count)


def launch_stream():
    """The Numba stream lars_numba launches on when no array names one."""
    from . import _cuda

    return _cuda._numba_stream(_cuda.caller_streams([]).launch)


def gpu_and_host_seconds(call: Callable[[], object], stream) -> tuple[float, float]:
    """The GPU's and the host's seconds for ``call``, whose work goes to ``stream``."""
    from numba import cuda

    start, stop = cuda.event(), cuda.event()
    start.record(stream)
    began = time.perf_counter()
    call()
    host = time.perf_counter() - began
    stop.record(stream)
    stop.synchronize()
    return start.elapsed_time(stop) / 1e3, host


def device_arrays(shapes, seed: int) -> list:
    """float32 arrays of ``shapes`` on the GPU: CuPy's if CuPy is installed, else Numba's."""
    rng = np.random.default_rng(seed)
    host = [rng.standard_normal(shape, dtype=np.float32) for shape in shapes]
    try:
        import cupy
    except ImportError:
        from numba import cuda

        return [cuda.to_device(array) for array in host]
    return [cupy.asarray(array) for array in host]


def candidates(shapes) -> dict[str, Callable[[], object]]:
    """Ways to scale every gradient of a float32 model of ``shapes`` once.

    Rescaling the same gradients again and again converges to a fixed point,
    so the work per call stays the same.
    """
    ws, gs = device_arrays(shapes, 0), device_arrays(shapes, 1)
    ways = {
        "scale": lambda: [
            lars_numba.scale(w, g, weight_decay=harness.WEIGHT_DECAY)
            for w, g in zip(ws, gs, strict=True)
        ],
        "scale_all": lambda: lars_numba.scale_all(ws, gs, weight_decay=harness.WEIGHT_DECAY),
    }
    try:
        import chainer  # noqa: F401
        import cupy  # noqa: F401
    except ImportError:
        return ways
    return {**ways, **harness.hook_candidates(ws, gs, parallel=False)}


def copy_call(nbytes: int) -> Callable[[], object]:
    """A device-to-device copy of ``nbytes``, on the stream lars_numba launches on."""
    from numba import cuda

    source = cuda.device_array(nbytes // 4, np.float32)
    target = cuda.device_array_like(source)
    stream = launch_stream()
    return lambda: target.copy_to_device(source, stream=stream)


def timed(ways: dict[str, Callable[[], object]], rounds: int) -> dict[str, tuple[float, float]]:
    """Median (GPU, host) seconds of each way, the ways timed in turn each round."""
    stream = launch_stream()
    for call in ways.values():
        gpu_and_host_seconds(call, stream)  # the first call compiles, or loads from the cache
    samples = harness.take_turns(ways, rounds, lambda call: gpu_and_host_seconds(call, stream))
    return {
        name: tuple(statistics.median(column) for column in zip(*pairs, strict=True))
        for name, pairs in samples.items()
    }


def rows(shapes, rounds: int, copy_bytes: int = COPY_BYTES):
    """Times of every candidate on ``shapes``, the bandwidth and the floor's seconds."""
    times = timed({**candidates(shapes), "copy": copy_call(copy_bytes)}, rounds)
    copy_seconds, _ = times.pop("copy")
    bandwidth = 2 * copy_bytes / copy_seconds  # the copy reads and writes its bytes
    elements = sum(math.prod(shape) for shape in shapes)
    return times, bandwidth, 5 * 4 * elements / bandwidth


def main(argv: list[str] | None = None) -> None:
    from numba import cuda
    from numba.cuda.core import config

    parser = argparse.ArgumentParser(prog="python -m lars_numba bench --gpu", description=__doc__)
    parser.add_argument("--rounds", type=int, default=20, help="samples per candidate")
    parser.add_argument(
        "--call-size", type=int, default=1 << 20, help="elements of the one parameter per call"
    )
    parser.add_argument("--model", default="resnet50", help='"resnet50" or "N x S"')
    parser.add_argument("--copy-bytes", type=int, default=COPY_BYTES)
    args = parser.parse_args(argv)

    simulated = bool(config.ENABLE_CUDASIM)
    device = "the CUDA simulator" if simulated else cuda.get_current_device().name
    print(f"lars_numba {lars_numba.__version__} on {device}; float32, medians in microseconds")
    if simulated:
        print("(the simulator's events time nothing: only the host's times are shown)")
    shapes = model_shapes(args.model)
    tables = {
        f"one call ({args.call_size} elements)": rows(
            ((args.call_size,),), args.rounds, args.copy_bytes
        ),
        f"one update ({args.model}, {len(shapes)} arrays)": rows(
            shapes, args.rounds, args.copy_bytes
        ),
    }
    for title, (times, bandwidth, floor) in tables.items():
        if simulated:
            print(f"\n{title}")
        else:
            print(f"\n{title}: copy {bandwidth / 1e9:.0f} GB/s, floor {floor * 1e6:.1f} us")
        table = [
            [name, None, host * 1e6, None]
            if simulated
            else [name, gpu * 1e6, host * 1e6, gpu / floor]
            for name, (gpu, host) in times.items()
        ]
        print(
            harness.format_table(
                ["candidate", "GPU us", "host us", "GPU/floor"],
                table,
                formats=[None, ".1f", ".1f", ".2f"],
            )
        )
