"""The host's share of a GPU call, without a GPU: ``python -m lars_numba bench --host``.

Every stage of a ``scale``, ``scale_all`` or ``momentum_step`` call on CUDA
arrays that runs on the host, timed on stand-ins: Numba device arrays over made-up
device addresses, never dereferenced, with the simulator off. The stages
are the checks of :mod:`lars_numba._api` (with the call into
:mod:`lars_numba._cuda` replaced by nothing), the pairs' layout and
addresses (:func:`lars_numba._cuda._views`), and the two
launches as :class:`lars_numba._cuda.Launcher` makes them, on a device that
numba-cuda is made to believe in (:func:`made_up_device`): typed, compiled
by NVVM and packed as for a GPU, up to the driver's launch, which is
recorded instead. Below the stages' sum, the whole public call, up to the
driver's calls (its launches, copies and events, which are all that is left
out), on the stand-ins and on CuPy-like arrays over them
(:class:`InterfaceArray`); then the same launches through numba-cuda's
dispatcher, for comparison. Under the simulator (``NUMBA_ENABLE_CUDASIM=1``)
it runs in a process of its own with the simulator off. The stages are timed
in turn, round by round, as medians (see
:func:`lars_numba.harness.interleaved`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace

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


class _MadeUpDevice:
    """What numba-cuda and :mod:`lars_numba._cuda` read of a device: its compute
    capability, and itself as a key."""

    compute_capability = (9, 0)


class _RecordedEvent:
    """A CUDA event whose work is always done."""

    def record(self, stream: object = 0) -> None:
        pass

    def wait(self, stream: object = 0) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


@contextmanager
def made_up_device() -> Iterator[list]:
    """numba-cuda compiling for a made-up device of compute capability 9.0, with
    the driver's calls replaced: yields the list that receives each launch's
    ``(configuration, kernel, parameters)``.

    Everything numba-cuda does on the host runs, the typing, the compilation
    (NVVM needs no GPU) and the packing of the parameters, up to the driver.
    Its allocations are stand-ins (:class:`StandIns`), its copies between
    host and device copy nothing, its events are always done and its streams
    the legacy default stream, so that a whole call of the public API runs
    as on a GPU, up to the driver's calls. The kernels of
    :mod:`lars_numba._cuda` compiled meanwhile are not cached on disk, but
    stay compiled, for the made-up device: for a process of its own.
    """
    from numba import cuda
    from numba.cuda import api, codegen, dispatcher
    from numba.cuda.core.caching import NullCache
    from numba.cuda.cudadrv import devices, driver

    from . import _cuda

    device = _MadeUpDevice()
    module = SimpleNamespace(initialized=True)
    stand_in = StandIns()
    launched: list = []
    kernels = (_cuda.sums_of_chunks, *_cuda.UPDATE_KERNELS.values())
    saved = [
        (dispatcher, "get_current_device", lambda: device),
        (cuda, "get_current_device", lambda: device),
        (devices, "get_context", lambda devnum=None: SimpleNamespace(device=device)),
        # Views of device arrays ask for a context.
        (devices._runtime, "ensure_context", nullcontext),
        (
            codegen.CUDACodeLibrary,
            "get_cufunc",
            lambda library: SimpleNamespace(kernel=library, module=module),
        ),
        (
            dispatcher,
            "launch",
            lambda stream, configuration, kernel, *parameters: launched.append(
                (configuration, kernel, parameters)
            ),
        ),
        (cuda, "device_array", lambda shape, dtype=np.float64, stream=0: stand_in(shape, dtype)),
        (cuda, "to_device", lambda array, stream=0: stand_in(array.shape, array.dtype)),
        (driver, "host_to_device", _ignored),
        (driver, "device_to_host", _ignored),
        (cuda, "event", lambda timing=True: _RecordedEvent()),
        # What numba-cuda's conversion of an interface asks the driver.
        (api, "current_context", lambda: None),
        (api, "external_stream", lambda handle: 0),
        *((cuda, name, lambda *handle: 0) for name in _STREAMS),
        *((kernel, "_cache", NullCache()) for kernel in kernels),
    ]
    saved = [(owner, name, getattr(owner, name), value) for owner, name, value in saved]
    try:
        for owner, name, _, value in saved:
            setattr(owner, name, value)
        yield launched
    finally:
        for owner, name, value, _ in saved:
            setattr(owner, name, value)


#: numba-cuda's functions that give a stream, each the legacy default stream
#: (0) on the made-up device.
_STREAMS = ("legacy_default_stream", "per_thread_default_stream", "external_stream")


def launches(columns: list, stand_in: StandIns, update: str) -> dict[str, tuple]:
    """A call's two launches, sums and update, for ``columns`` (the pairs' device
    arrays, all flat and of one dtype): each one's kernel, launch configuration
    and a function that makes its arguments as ``_cuda._launch`` makes them
    from its cached plan and the stream's scratch."""
    from . import _api, _cuda, _layout, _rule, tunables

    _, layout, _ = _cuda._views(columns, None)
    chunks = len(_layout.chunk_rows([size for _, size, _ in layout], tunables.GPU_CHUNK))
    likes = tuple(stand_in((1,), dtype) for dtype in _cuda.kernel_arrays(layout[0][0]))
    group = _cuda.Group(
        pairs=tuple(range(len(columns))),
        update=update,
        likes=likes,
        chunks=stand_in((chunks, len(_cuda.CHUNK_COLUMNS)), np.int64),
        base=0,
        first=0,
        launchers=(),
    )
    scratch = _cuda.Scratch(
        stream=None,
        sums=stand_in((chunks + len(columns), _rule.SUMS), np.float64),
        ticket=stand_in((len(columns),), np.uint32),
        addresses=stand_in((len(columns) * len(likes),), np.int64),
        nonfinite=stand_in((1,), np.bool_),
        event=None,
    )
    # What _cuda._tables gives for a flat group, whose slice of the
    # scratch's table needs a context: a table of its own.
    arrays = (stand_in((len(columns), len(likes)), np.int64), likes)
    hyper = _api.hyperparameters(
        1e-2, harness.WEIGHT_DECAY, 1e-9, 1.0, "sum", lr=harness.STEP_LR, momentum=0.9
    )
    rates = stand_in((1,), np.float64)
    launch = _cuda.reducing_launch(chunks, 0)
    # A call's hyperparameters are a tuple of its own, equal to the last's.
    return {
        "sums": (
            _cuda.sums_of_chunks,
            launch,
            lambda: _cuda.sums_arguments(group, arrays, scratch, (*hyper,), scratch.nonfinite),
        ),
        "update": (
            _cuda.UPDATE_KERNELS[update],
            launch[:3],
            lambda: _cuda.update_arguments(
                group, arrays, scratch, (*hyper,), rates, scratch.nonfinite, False
            ),
        ),
    }


def stages(shapes, dtype=np.float32) -> dict[str, dict[str, Callable[[], object]]]:
    """The host's stages of ``scale`` on the first of a model of ``shapes``, and of
    ``scale_all`` and ``momentum_step`` on the whole model, by call and stage."""
    from . import _cuda

    stand_in = StandIns()
    columns = [[stand_in(shape, dtype) for shape in shapes] for _ in range(3)]
    described = [list(map(InterfaceArray, column)) for column in columns]
    calls, on_interfaces = _calls(*columns), _calls(*described)
    ws, gs, vs = columns
    pairs = {
        "scale": ([(ws[0], gs[0])], "scale"),
        "scale_all": (list(zip(ws, gs, strict=True)), "scale"),
        "momentum_step": (list(zip(ws, gs, vs, strict=True)), "momentum"),
    }
    out = {}
    for name, (pairs_of_call, update) in pairs.items():
        out[name] = {
            "checks (lars_numba._api)": lambda call=calls[name]: _without_launches(call),
            "layout and addresses of the pairs": lambda pairs_of_call=pairs_of_call: _cuda._views(
                pairs_of_call, None
            ),
            **{
                f"{name} launch, {way}": lambda run=run, kernel=kernel, launch=launch, made=made: (
                    run(kernel, launch, made())
                )
                for name, (kernel, launch, made) in launches(
                    pairs_of_call, stand_in, update
                ).items()
                for way, run in ((PREPARED, _cuda.Launcher()), (DISPATCHED, _dispatched))
            },
            WHOLE: calls[name],
            WHOLE_ON_INTERFACES: on_interfaces[name],
        }
    return out


def _calls(ws: list, gs: list, vs: list) -> dict[str, Callable[[], object]]:
    """The calls the table times, on these arrays."""
    return {
        "scale": lambda: lars_numba.scale(ws[0], gs[0], weight_decay=harness.WEIGHT_DECAY),
        "scale_all": lambda: lars_numba.scale_all(ws, gs, weight_decay=harness.WEIGHT_DECAY),
        "momentum_step": lambda: lars_numba.momentum_step(
            ws, gs, vs, lr=harness.STEP_LR, weight_decay=harness.WEIGHT_DECAY
        ),
    }


class InterfaceArray:
    """A device array known only by its ``__cuda_array_interface__``, over the
    memory of a Numba device array, which makes its interface as CuPy's
    ``ndarray`` does at every read (version 3, on the legacy default stream,
    with the dtype's ``descr``): what a call reads from the interface, or
    converts to a Numba device array, first."""

    def __init__(self, array) -> None:
        self.shape, self.dtype = array.shape, array.dtype
        self.pointer = array.device_ctypes_pointer.value

    @property
    def __cuda_array_interface__(self) -> dict:
        return {
            "shape": self.shape,
            "typestr": self.dtype.str,
            "descr": self.dtype.descr,
            "stream": 1,
            "version": 3,
            "strides": None,
            "data": (self.pointer, False),
        }


#: The two ways to launch that the table compares: the first is the call's.
PREPARED = "packed once (_cuda.Launcher)"
DISPATCHED = "numba-cuda's dispatcher"
#: The stage that is the public call itself, on the made-up device: the stages
#: and what runs between them (the plan and scratch caches, the streams, the
#: upload of the address table), up to the driver's calls.
WHOLE = "the whole call, up to the driver's calls"
#: The same on :class:`InterfaceArray` s, which each call converts to Numba's.
WHOLE_ON_INTERFACES = "the same on CuPy-like arrays"


def _dispatched(kernel, launch: tuple, arguments: tuple) -> None:
    kernel[launch](*arguments)


def _ignored(*args: object, **kwargs: object) -> None:
    """Nothing, in place of a call that the table leaves out."""


def _without_launches(call: Callable[[], object]) -> None:
    """``call`` with what ``lars_numba._cuda`` does after the checks replaced by nothing."""
    from . import _cuda

    saved = {
        name: getattr(_cuda, name)
        for name in ("scale", "scale_all", "momentum_step", "caller_streams")
    }
    try:
        for name in saved:
            setattr(_cuda, name, _ignored)
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
        "arrays (scale: on its first), on stand-ins (no GPU)"
    )
    with made_up_device():
        for call, call_stages in stages(RESNET50_SHAPES).items():
            for stage in call_stages.values():
                stage()  # the first launch of each kernel compiles it
            times = {
                stage: us * 1e6
                for stage, us in harness.interleaved(call_stages, args.rounds).items()
            }
            wholes = [[stage, times.pop(stage)] for stage in (WHOLE, WHOLE_ON_INTERFACES)]
            table = [[stage, us] for stage, us in times.items() if DISPATCHED not in stage]
            table.append(["the stages above, in all", sum(us for _, us in table)])
            table += wholes
            table += [[stage, us] for stage, us in times.items() if DISPATCHED in stage]
            print(f"\n{call}")
            print(harness.format_table(["stage", "us"], table, formats=[None, ".0f"]))
