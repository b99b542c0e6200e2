"""The GPU launches of :class:`lars_numba._cuda.Launcher`, which packs a launch's
parameters once and hands them to numba-cuda's own launch: the driver must
receive what numba-cuda's dispatcher would have given it, launch after launch,
as arguments change or stay.

The simulator has no launches to compare: the kernels are compiled and
launched in a subprocess with the simulator off, on a device that numba-cuda
is made to believe in (:func:`lars_numba.bench_host.made_up_device`), whose
driver records each launch instead of making it.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

COMPARE = textwrap.dedent(
    """
    import ctypes, json, sys, warnings
    from numba.cuda import dispatcher
    from numba.cuda.cudadrv.devicearray import DeviceNDArray
    from lars_numba import _cuda, bench_host

    def seen(record):
        configuration, kernel, parameters = record
        return [
            [repr(configuration), id(kernel)],
            [[type(p).__name__, p.value if isinstance(p, ctypes._SimpleCData) else p]
             for p in parameters],
        ]

    dispatched = []
    call = dispatcher.CUDADispatcher.call
    def counted(self, args, launch_config):
        dispatched.append(self)
        return call(self, args, launch_config)
    dispatcher.CUDADispatcher.call = counted

    stand_in = bench_host.StandIns()
    out = {}
    caught = warnings.catch_warnings(record=True)
    with caught as compiled, bench_host.made_up_device() as launched:
        warnings.simplefilter("always")
        for update, dtypes in (("scale", ("float32",) * 2), ("momentum", ("float16",) * 3)):
            columns = [tuple(stand_in((5, 3), dtype) for dtype in dtypes) for _ in range(4)]
            for name, (kernel, launch, arguments) in bench_host.launches(
                columns, stand_in, update
            ).items():
                launcher = _cuda.Launcher()
                first = arguments()
                # Each argument's tuple of arguments: the same objects, a
                # new tuple of new hyperparameters, another array in place
                # of an array, an array of another layout (another kernel).
                changed = list(first)
                at = {"sums": 6, "update": 5}[name]
                changed[at] = stand_in((1,), first[at].dtype)
                other_type = list(first)
                base = stand_in((3,), first[at].dtype)
                other_type[at] = DeviceNDArray(
                    (2,), (2 * base.dtype.itemsize,), base.dtype, gpu_data=base.gpu_data
                )
                hyper = {"sums": 5, "update": 4}[name]
                rescheduled = list(first)
                rescheduled[hyper] = (*first[hyper][:-2], 0.125, 0.5)
                steps = {}
                for step, args in (
                    ("first", first),
                    ("again", arguments()),
                    ("hyperparameters", tuple(rescheduled)),
                    ("array", tuple(changed)),
                    ("layout", tuple(other_type)),
                    ("layout again", tuple(other_type)),
                    ("back", arguments()),
                ):
                    del launched[:], dispatched[:]
                    launcher(kernel, launch, args)
                    ours, our_dispatches = [seen(r) for r in launched], len(dispatched)
                    del launched[:]
                    kernel[launch](*args)
                    steps[step] = [ours, [seen(r) for r in launched], our_dispatches]
                out[f"{update} {name}"] = steps

        class Wrapper:  # what the tests' spies do, around a kernel
            def __init__(self, kernel):
                self.kernel, self.seen = kernel, 0

            def __getitem__(self, launch):
                configured = self.kernel[launch]

                def launched(*args):
                    self.seen += 1
                    configured(*args)

                return launched

        wrapped, launcher = Wrapper(kernel), _cuda.Launcher()
        for _ in range(3):
            launcher(wrapped, launch, first)
        out["wrapped"] = wrapped.seen
    out["warnings"] = [f"{type(w.message).__name__}: {w.message}" for w in compiled]
    json.dump(out, sys.stdout)
    """
)


def on_the_made_up_device(script: str) -> dict:
    """What ``script`` prints as JSON, run in a process of its own with the simulator off."""
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "NUMBA_ENABLE_CUDASIM": "0"},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def launches():
    """By kernel and step: the launches the driver received from a
    :class:`Launcher`, from numba-cuda's dispatcher, and how many times the
    launcher went through the dispatcher."""
    return on_the_made_up_device(COMPARE)


KERNELS = ["scale sums", "scale update", "momentum sums", "momentum update"]


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_driver_receives_what_numba_cuda_would_give_it(launches, kernel):
    for step, (ours, numbas, _) in launches[kernel].items():
        assert len(ours) == 1, step
        assert ours == numbas, step


@pytest.mark.parametrize("kernel", KERNELS)
def test_only_a_new_kernel_goes_through_the_dispatcher(launches, kernel):
    # The first launch types and compiles through it, and so does the first
    # of another layout; the rest are packed anew where their arguments changed.
    dispatches = {step: count for step, (_, _, count) in launches[kernel].items()}
    assert dispatches == {
        "first": 1,
        "again": 0,
        "hyperparameters": 0,
        "array": 0,
        "layout": 1,
        "layout again": 0,
        "back": 1,
    }


def test_the_kernels_compile_without_numbas_experimental_features(launches):
    # An update indexed from a tuple of device functions inside a kernel is a
    # first-class function to Numba, which warns at every compilation.
    assert not [w for w in launches["warnings"] if "Experimental" in w]


def test_a_wrapper_of_a_kernel_sees_every_launch(launches):
    assert launches["wrapped"] == 3


@pytest.mark.parametrize("kernel", KERNELS)
def test_new_hyperparameters_and_arrays_reach_the_driver(launches, kernel):
    steps = {step: ours[0][1] for step, (ours, _, _) in launches[kernel].items()}
    assert steps["again"] == steps["first"]
    assert steps["hyperparameters"] != steps["first"]
    assert steps["array"] != steps["first"]
    assert steps["back"] == steps["first"]


UPLOADS = textwrap.dedent(
    """
    import ctypes, json, sys
    import numpy as np
    from numba.cuda.cudadrv import driver
    import lars_numba
    from lars_numba import _cuda, bench_host

    uploads = []

    def recorded(dst, src, size, stream=0):
        # What the driver reads: size bytes from the first element's address.
        data = ctypes.string_at(src.ctypes.data, size).hex()
        uploads.append([driver.device_pointer(dst), data, size, repr(stream)])

    def taken():
        out = uploads[:]
        del uploads[:]
        return out

    out = {}
    with bench_host.made_up_device():
        driver.host_to_device = recorded
        stand_in = bench_host.StandIns()
        ws, gs, vs = ([stand_in((5, 3)) for _ in range(3)] for _ in range(3))
        lars_numba.scale_all(ws, gs)
        (scratch,) = _cuda._scratch.values()
        rows = np.array(
            [[a.device_ctypes_pointer.value for a in pair] for pair in zip(ws, gs)], np.int64
        )
        out["scale_all"] = taken()
        scratch.addresses[:6].reshape(3, 2).copy_to_device(rows, stream=scratch.stream)
        out["scale_all, numba-cuda"] = taken()

        flag = stand_in((1,), np.bool_)
        lars_numba.momentum_step(ws, gs, vs, lr=0.1, skip_nonfinite=True, nonfinite=flag)
        out["momentum_step"] = taken()
        (scratch,) = _cuda._scratch.values()  # grown for four arrays a pair
        flag.copy_to_device(np.zeros(1, np.bool_), stream=scratch.stream)
        rows = np.array(
            [[a.device_ctypes_pointer.value for a in (w, g, v, w)] for w, g, v in zip(ws, gs, vs)],
            np.int64,
        )
        scratch.addresses[:12].reshape(3, 4).copy_to_device(rows, stream=scratch.stream)
        out["momentum_step, numba-cuda"] = taken()
    json.dump(out, sys.stdout)
    """
)


def test_the_uploads_reach_the_driver_as_numba_cudas_copies_would():
    # The address table and the flag are copied by the driver's call itself,
    # without numba-cuda's copy_to_device (about 100 us of checks and views).
    uploads = on_the_made_up_device(UPLOADS)
    assert len(uploads["scale_all"]) == 1
    assert uploads["scale_all"] == uploads["scale_all, numba-cuda"]
    assert len(uploads["momentum_step"]) == 2  # the flag reset, then the table
    assert uploads["momentum_step"] == uploads["momentum_step, numba-cuda"]


DESCRIBED = textwrap.dedent(
    """
    import ctypes, json, sys
    import numpy as np
    from numba.cuda.cudadrv import driver
    from numba.cuda.cudadrv.devicearray import DeviceNDArray
    import lars_numba
    from lars_numba import _cuda, bench_host

    class Foreign:  # CuPy's arrays: the interface only, read-only if asked
        def __init__(self, array, read_only=False):
            self.interface = dict(array.__cuda_array_interface__)
            self.interface["data"] = (self.interface["data"][0], read_only)
            self.interface["stream"] = 1

        @property
        def __cuda_array_interface__(self):
            return dict(self.interface)

    def seen(parameter):
        if isinstance(parameter, ctypes._SimpleCData):
            return [type(parameter).__name__, parameter.value]
        return [type(parameter).__name__, repr(parameter)]

    uploads = []

    def recorded(dst, src, size, stream=0):
        data = ctypes.string_at(src.ctypes.data, size).hex()
        uploads.append([driver.device_pointer(dst), data, size])

    def run(call):
        del launched[:], uploads[:]
        try:
            call()
        except Exception as error:
            return [type(error).__name__, str(error)]
        return [
            [[repr(c), id(k), [seen(p) for p in ps]] for c, k, ps in launched],
            uploads[:],
        ]

    def foreign(*columns):
        return [[Foreign(array) for array in column] for column in columns]

    out = {}
    with bench_host.made_up_device() as launched:
        driver.host_to_device = recorded
        stand_in = bench_host.StandIns()

        def f_order(shape, dtype=np.float32):
            base = stand_in(shape, dtype)
            strides = np.empty(shape, dtype, order="F").strides
            return DeviceNDArray(shape, strides, base.dtype, gpu_data=base.gpu_data)

        shapes = [(), (0,), (1, 7), (300,), (4, 5, 6), (70000,)]
        models = {
            "float32": [[stand_in(s) for s in shapes] for _ in range(3)],
            "float16": [[stand_in(s, np.float16) for s in shapes] for _ in range(2)]
            + [[stand_in(s, np.float32) for s in shapes]],
            # F-order weights beside C-order gradients: strided pairs, whose
            # kernels take the arrays themselves
            "strided": [
                [f_order((6, 5)), f_order((3, 4, 2))],
                [stand_in((6, 5)), stand_in((3, 4, 2))],
                [stand_in((6, 5)), stand_in((3, 4, 2))],
            ],
            "F-order": [[f_order((6, 5))], [f_order((6, 5))], [f_order((6, 5))]],
        }
        for model, (ws, gs, vs) in models.items():
            calls = lambda ws, gs, vs: {
                "scale": lambda: lars_numba.scale(ws[-1], gs[-1], weight_decay=1e-3),
                "scale_all": lambda: lars_numba.scale_all(ws, gs, weight_decay=1e-3),
                "momentum_step": lambda: lars_numba.momentum_step(ws, gs, vs, lr=0.1),
            }
            numbas = calls(ws, gs, vs)
            foreigns = calls(*foreign(ws, gs, vs))
            for name in numbas:
                out[f"{model} {name}"] = [run(numbas[name]), run(foreigns[name])]
        ws, gs, vs = models["float32"]
        g64 = stand_in((300,), np.float64)
        swapped = DeviceNDArray((300,), (4,), np.dtype(">f4"), gpu_data=gs[3].gpu_data)
        bad = {
            "dtype": ([ws[3]], [g64]),
            "shape": ([ws[3]], [gs[4]]),
            "byte order": ([ws[3]], [swapped]),
        }
        for name, (bad_ws, bad_gs) in bad.items():
            out[f"refused {name}"] = [
                run(lambda: lars_numba.scale_all(bad_ws, bad_gs)),
                run(lambda: lars_numba.scale_all(*foreign(bad_ws, bad_gs))),
            ]
        out["refused read-only"] = [
            run(lambda: lars_numba.scale_all([Foreign(ws[3])], [Foreign(gs[3], read_only=True)])),
            run(lambda: lars_numba.scale(Foreign(ws[3]), Foreign(gs[3], read_only=True))),
        ]
        out["refused overlap"] = [
            run(lambda: lars_numba.momentum_step(ws, gs, ws, lr=0.1)),
            run(lambda: lars_numba.momentum_step(*foreign(ws, gs, ws), lr=0.1)),
        ]
        explicit, row = Foreign(ws[4]), Foreign(ws[2])
        explicit.interface["strides"] = (120, 24, 4)  # C order, (4, 5, 6) float32
        row.interface["strides"] = (999, 4)  # (1, 7): the first stride is never taken
        out["described"] = [
            type(_cuda.as_device_array(array, describe=True)[0]).__name__
            for array in (
                Foreign(ws[3]), Foreign(models["F-order"][0][0]), Foreign(ws[0]), explicit, row
            )
        ]
    json.dump(out, sys.stdout)
    """
)


@pytest.fixture(scope="module")
def described():
    """By call: what the driver received from a call on Numba's device arrays and
    from the same call on arrays known by their interface only, over the same
    memory (or the exception each raised)."""
    return on_the_made_up_device(DESCRIBED)


CALLS = [
    f"{model} {call}"
    for model in ("float32", "float16", "strided", "F-order")
    for call in ("scale", "scale_all", "momentum_step")
]


@pytest.mark.parametrize("call", CALLS)
def test_arrays_known_by_their_interface_give_the_driver_what_numbas_do(described, call):
    numbas, foreigns = described[call]
    assert len(numbas) == 2 and numbas[0], numbas  # launches, not an exception
    assert foreigns == numbas


@pytest.mark.parametrize("bad", ["dtype", "shape", "byte order", "overlap"])
def test_arrays_known_by_their_interface_are_refused_as_numbas_are(described, bad):
    numbas, foreigns = described[f"refused {bad}"]
    assert numbas[0] in ("TypeError", "ValueError"), numbas
    assert foreigns == numbas


def test_a_read_only_gradient_known_by_its_interface_is_refused(described):
    for error in described["refused read-only"]:
        assert error[0] == "ValueError" and "must be writeable" in error[1], error


def test_only_c_contiguous_arrays_are_described_without_a_conversion(described):
    # C-contiguous, F-contiguous (2-d), 0-d, C-contiguous with its strides given
    assert described["described"] == [
        "Described",
        "DeviceNDArray",
        "Described",
        "Described",
        "Described",
    ]
