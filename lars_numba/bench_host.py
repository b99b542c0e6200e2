"""The host's share of a GPU call, without a GPU: ``python -m lars_numba bench --host``.

Every stage of a ``scale_all`` or ``momentum_step`` call on CUDA arrays that
runs on the host, timed on stand-ins: Numba device arrays over made-up
device addresses, never dereferenced, with the simulator off. The stages
are the checks of :mod:`lars_numba._api` (with the call into
:mod:`lars_numba._cuda` replaced by nothing), the pairs' layout
(:func:`lars_numba._cuda._views`), the address table's rows, and numba-cuda's
typing and packing of each launch's arguments, as its dispatcher does them
before it hands them to the driver. What needs a GPU is left out: the
driver's launches and copies, and the conversion of CuPy arrays to Numba's.
Under the simulator (``NUMBA_ENABLE_CUDASIM=1``) it runs in a process of
its own with the simulator off.
The stages are timed in turn, round by round, as medians (see
:func:`lars_numba.harness.interleaved`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable

import numpy as np

import lars_numba

from . import harness
from ._shapes import RESNET50_SHAPES


class StandIns:
    """Numba device arrays at made-up device addresses, one after the other."""

    def __init__(self) -> None:
        self.next_address = 1 << 40

    def __call__(self, shape: tuple, dtype=np.float32):
        from numba.cuda.cudadrv import driver
        from numba.cuda.cudadrv.devicearray import DeviceNDArray

        # Of one element at least: a zero-size one would ask the driver for a context.
        host = np.empty(shape, dtype)
        memory = driver.MemoryPointer(
            context=None,
            pointer=driver.binding.CUdeviceptr(self.next_address),
            size=max(host.nbytes, 1),
        )
        self.next_address += host.nbytes + 256
        return DeviceNDArray(host.shape, host.strides, host.dtype, gpu_data=memory)


def typed_and_packed(arguments: tuple) -> list:
    """What numba-cuda does with a launch's ``arguments`` on the host: their types,
    as its dispatcher finds them, and the kernel's parameters packed from them."""
    from numba.core.typing.typeof import Purpose, typeof
    from numba.cuda.dispatcher import _Kernel

    class Packer:  # what _Kernel._prepare_args reads of its kernel
        extensions = ()
        _prepare_args = _Kernel._prepare_args

    packer, parameters = Packer(), []
    for argument in arguments:
        packer._prepare_args(typeof(argument, Purpose.argument), argument, 0, [], parameters)
    return parameters


def launches(columns: list, stand_in: StandIns, update: str) -> dict[str, tuple]:
    """The arguments of a call's two launches, sums and update, for ``columns`` (the
    pairs' device arrays, all flat and of one dtype), as ``_cuda._launch`` makes
    them from its cached plan and the stream's scratch."""
    from . import _api, _cuda, _layout, tunables

    _, layout = _cuda._views(columns, None)
    chunks = len(_layout.chunk_rows([size for _, size, _ in layout], tunables.GPU_CHUNK))
    likes = tuple(stand_in((1,), dtype) for dtype in _cuda.kernel_arrays(layout[0][0]))
    group = _cuda.Group(
        pairs=tuple(range(len(columns))),
        update=update,
        likes=likes,
        chunks=stand_in((chunks, len(_cuda.CHUNK_COLUMNS)), np.int64),
        base=0,
        first=0,
    )
    scratch = _cuda.Scratch(
        stream=None,
        sums=stand_in((chunks + len(columns), 2), np.float64),
        ticket=stand_in((len(columns),), np.uint32),
        addresses=stand_in((len(columns) * len(likes),), np.int64),
        nonfinite=stand_in((1,), np.bool_),
        event=None,
    )
    # What _cuda._group_arrays gives for a flat group, whose slice of the
    # scratch's table needs a context: a table of its own.
    arrays = (stand_in((len(columns), len(likes)), np.int64), likes)
    hyper = _api.hyperparameters(
        1e-2, harness.WEIGHT_DECAY, 1e-9, 1.0, "sum", lr=harness.STEP_LR, momentum=0.9
    )
    rates = stand_in((1,), np.float64)
    return {
        "sums": _cuda.sums_arguments(group, arrays, scratch, hyper, scratch.nonfinite),
        "update": _cuda.update_arguments(
            group, arrays, scratch, hyper, rates, scratch.nonfinite, False
        ),
    }


def stages(shapes, dtype=np.float32) -> dict[str, dict[str, Callable[[], object]]]:
    """The host's stages of ``scale_all`` and of ``momentum_step`` on a model of
    ``shapes``, by call and stage."""
    from . import _cuda

    stand_in = StandIns()
    ws, gs, vs = ([stand_in(shape, dtype) for shape in shapes] for _ in range(3))
    ignored = lambda *args, **kwargs: None  # noqa: E731
    calls = {
        "scale_all": (
            lambda: lars_numba.scale_all(ws, gs, weight_decay=harness.WEIGHT_DECAY),
            list(zip(ws, gs, strict=True)),
            "scale",
        ),
        "momentum_step": (
            lambda: lars_numba.momentum_step(
                ws, gs, vs, lr=harness.STEP_LR, weight_decay=harness.WEIGHT_DECAY
            ),
            list(zip(ws, gs, vs, strict=True)),
            "momentum",
        ),
    }
    out = {}
    for name, (checks, columns, update) in calls.items():
        views, _ = _cuda._views(columns, None)
        arguments = launches(columns, stand_in, update)
        out[name] = {
            "checks (lars_numba._api)": lambda checks=checks: _without_launches(checks, ignored),
            "layout of the pairs": lambda columns=columns: _cuda._views(columns, None),
            "address table's rows": lambda views=views: _cuda.address_rows(views),
            **{
                f"typing and packing, {launch} launch": lambda arguments=launch_arguments: (
                    typed_and_packed(arguments)
                )
                for launch, launch_arguments in arguments.items()
            },
        }
    return out


def _without_launches(call: Callable[[], object], ignored: Callable) -> None:
    """``call`` with what ``lars_numba._cuda`` does after the checks replaced by ``ignored``."""
    from . import _cuda

    saved = {
        name: getattr(_cuda, name) for name in ("scale_all", "momentum_step", "caller_streams")
    }
    try:
        for name in saved:
            setattr(_cuda, name, ignored)
        call()
    finally:
        for name, value in saved.items():
            setattr(_cuda, name, value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lars_numba bench --host", description=__doc__)
    parser.add_argument("--rounds", type=int, default=15, help="samples per stage")
    args = parser.parse_args(argv)
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") != "0":
        # The stand-ins are real device arrays, and Numba reads the switch
        # from the environment as it loads: a process of their own.
        command = [
            sys.executable,
            "-m",
            "lars_numba",
            "bench",
            "--host",
            "--rounds",
            str(args.rounds),
        ]
        environment = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0"}
        sys.exit(subprocess.run(command, env=environment, check=False).returncode)
    import numba_cuda

    print(
        f"lars_numba {lars_numba.__version__}, numba-cuda {numba_cuda.__version__}: "
        f"the host's microseconds per call on ResNet-50's {len(RESNET50_SHAPES)} float32 "
        "arrays, on stand-ins (no GPU)"
    )
    for call, call_stages in stages(RESNET50_SHAPES).items():
        times = harness.interleaved(call_stages, args.rounds)
        table = [[stage, seconds * 1e6] for stage, seconds in times.items()]
        table.append(["total, before the driver's launches", sum(times.values()) * 1e6])
        print(f"\n{call}")
        print(harness.format_table(["stage", "us"], table, formats=[None, ".0f"]))
