"""Argument checks and device dispatch: the only module that knows devices.

Every public entry point checks all of its arguments here, before any kernel
runs, so that a bad call raises and leaves the caller's arrays untouched.

NumPy arrays go to :mod:`lars_numba._cpu`. CUDA arrays (CuPy arrays, Numba
device arrays, the CUDA simulator's included, and any object with a
``__cuda_array_interface__``) go to :mod:`lars_numba._cuda`, which is imported
on the first such call so that ``import lars_numba`` does not load
``numba.cuda``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from itertools import chain
from operator import attrgetter

import numpy as np

from . import _cpu, _layout, _rule
from ._layout import kernel_view
from ._rule import HYPERPARAMETERS, Hyperparameters, hyperparameters

__all__ = ["HYPERPARAMETERS", "Hyperparameters", "hyperparameters"]

_FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
#: The same, for membership: a dtype's hash and one comparison, where the tuple
#: compares it with each dtype before its own, at about 40 ns a comparison.
_IS_FLOAT_DTYPE = frozenset(_FLOAT_DTYPES).__contains__


def _check_array(name: str, array: object) -> None:
    if not accepts(array):
        raise TypeError(f"{name} must be a NumPy or CUDA array; got {type(array).__name__}")
    if not _IS_FLOAT_DTYPE(array.dtype):
        raise TypeError(
            f"{name} must have dtype float16, float32 or float64 in native byte order; "
            f"got {array.dtype}"
        )


def plain_pair(w: object, g: object) -> bool:
    """Whether ``w`` and ``g`` pass :func:`check_pair`, decided in a few attribute reads.

    True for plain NumPy float arrays of one dtype and shape with ``g``
    writeable: the common case, on the path of every call. Anything else goes
    through :func:`check_pair`, which accepts it or says what is wrong.
    """
    return (
        type(w) is np.ndarray
        and type(g) is np.ndarray
        and _IS_FLOAT_DTYPE(w.dtype)
        and g.dtype == w.dtype
        and g.shape == w.shape
        and g.flags.writeable
    )


def check_pair(
    w: object, g: object, *, writes_g: bool, names: tuple[str, str] = ("w", "g")
) -> None:
    """Raise unless ``w`` and ``g`` are float arrays of one dtype and shape.

    ``names`` are the names of ``w`` and ``g`` in the messages.
    """
    w_name, g_name = names
    _check_array(w_name, w)
    _check_array(g_name, g)
    if g.dtype != w.dtype:
        raise TypeError(f"{g_name} must have the dtype of {w_name}, {w.dtype}; got {g.dtype}")
    if g.shape != w.shape:
        raise ValueError(f"{g_name} must have the shape of {w_name}, {w.shape}; got {g.shape}")
    if writes_g and not g.flags.writeable:
        raise ValueError(f"{g_name} must be writeable; got a read-only array")


def accepts(array: object) -> bool:
    """Whether ``array`` is of a kind the kernels can take (its dtype aside)."""
    if isinstance(array, np.ndarray):
        return not isinstance(array, np.ma.MaskedArray)
    return on_gpu(array)


def on_gpu(array: object) -> bool:
    """Whether ``array`` is a CUDA array, decided without importing ``numba.cuda``.

    It is if it exposes ``__cuda_array_interface__`` or is one of Numba's own
    device arrays, which the CUDA simulator's are without the interface.
    Where its type defines the interface, as CuPy's ``ndarray`` does with a
    property, the type says so: reading the property makes CuPy's dictionary.
    """
    return (
        bool(getattr(array, "__cuda_ndarray__", False))
        or hasattr(type(array), "__cuda_array_interface__")
        or hasattr(array, "__cuda_array_interface__")
    )


def _device_pair(w, g, *, writes_g: bool):
    """``w`` and ``g`` as Numba device arrays, after the checks of :func:`check_pair`.

    Also returns the streams to run on and wait for, chosen by
    :func:`lars_numba._cuda.caller_streams`.
    """
    if accepts(w) and accepts(g) and not (on_gpu(w) and on_gpu(g)):
        raise TypeError(
            "w and g must both be NumPy arrays or both CUDA arrays; got "
            f"w on the {_device_name(w)} ({type(w).__name__}) and "
            f"g on the {_device_name(g)} ({type(g).__name__})"
        )
    w_device, g_device, handles = _device_arrays(w, g, writes_g=writes_g)
    return w_device, g_device, _gpu_module().caller_streams(handles)


def _device_arrays(w, g, *, writes_g: bool, names: tuple[str, str] = ("w", "g")):
    """``w`` and ``g`` as Numba device arrays, after the checks of :func:`check_pair`,
    and the streams of their interfaces, ``g``'s first (``None`` where unset).

    ``names`` are their names in the messages, as for :func:`check_pair`.
    """
    gpu = _gpu_module()
    # An object that is no array at all is left for check_pair to name.
    (w_device, w_stream, _), (g_device, g_stream, g_read_only) = (
        gpu.as_device_array(a, describe=True) if on_gpu(a) else (a, None, False) for a in (w, g)
    )
    check_pair(w_device, g_device, writes_g=False, names=names)
    if writes_g and g_read_only:
        _refuse_read_only(names[1])
    return w_device, g_device, (g_stream, w_stream)


def _refuse_read_only(name: str) -> None:
    """Raise for a device array whose ``__cuda_array_interface__`` says it is
    read-only (a device array has no writeable flag)."""
    raise ValueError(f"{name} must be writeable; got a read-only array")


def _device_name(array: object) -> str:
    return "GPU" if on_gpu(array) else "CPU"


def _gpu_module():
    """:mod:`lars_numba._cuda`, imported when the first CUDA array is seen."""
    # From sys.modules once imported: an import statement costs a call about 1 us.
    gpu = sys.modules.get(_GPU_MODULE)
    if gpu is None:
        from . import _cuda as gpu
    return gpu


_GPU_MODULE = f"{__package__}._cuda"


def scale(w, g, hyper: Hyperparameters, parallel: bool = True) -> float | None:
    """Scale ``g`` in place after checking both arrays; returns the rate.

    ``parallel`` lets large NumPy arrays run on all of Numba's threads.

    For CUDA arrays it returns ``None`` instead: the scaling is enqueued on
    the caller's stream and the rate stays on the device, as the call does not
    wait for the GPU.
    """
    # Two NumPy arrays, the hot path, are told apart by two isinstance calls
    # inline: a function call here would cost the NumPy path 5 %.
    if not (isinstance(w, np.ndarray) and isinstance(g, np.ndarray)) and (on_gpu(w) or on_gpu(g)):
        w, g, stream = _device_pair(w, g, writes_g=True)
        _gpu_module().scale(w, g, hyper, stream)
        return None
    if not plain_pair(w, g):
        check_pair(w, g, writes_g=True)
    if w is not g and np.may_share_memory(w, g):
        # The update reads w while writing g: an overlap other than w being g
        # itself would read elements that were already scaled.
        w = w.copy()
    return _cpu.pair_rate((kernel_view(w), kernel_view(g)), hyper, True, parallel)[0]


def trust_ratio(w, g, hyper: Hyperparameters, parallel: bool = True) -> float:
    """The rate ``scale`` would apply, after checking both arrays.

    For CUDA arrays it waits for the caller's stream to finish the sums.
    """
    if not (isinstance(w, np.ndarray) and isinstance(g, np.ndarray)) and (on_gpu(w) or on_gpu(g)):
        w, g, stream = _device_pair(w, g, writes_g=False)
        return _gpu_module().trust_ratio(w, g, hyper, stream)
    check_pair(w, g, writes_g=False)
    return _cpu.pair_rate((kernel_view(w), kernel_view(g)), hyper, False, parallel)[0]


# -- many pairs ----------------------------------------------------------------


def scale_all(
    ws: object,
    gs: object,
    hyper: Hyperparameters,
    weight_decay_mask: object,
    trust_ratio_mask: object,
    rates: object,
    parallel: bool = True,
) -> None:
    """Scale every ``gs[i]`` in place after checking every argument.

    The masks are ``None`` or one bool per pair; a pair outside
    ``trust_ratio_mask`` keeps rate 1, one outside ``weight_decay_mask`` gets no
    weight decay. ``rates``, if not ``None``, receives each pair's rate.
    """
    ws = _array_sequence("ws", ws)
    gs = _array_sequence("gs", gs)
    if len(gs) != len(ws):
        raise ValueError(f"gs must hold one array per array of ws, {len(ws)}; got {len(gs)}")
    masks = pair_masks(len(ws), weight_decay_mask, trust_ratio_mask)
    arrays = (*ws, *gs) if rates is None else (*ws, *gs, rates)
    # Plain NumPy arrays, the common case, are told apart without a Python call
    # per array (subclasses of ndarray take the second test).
    kinds = set(map(type, arrays))
    if kinds == {np.ndarray} or not any(map(on_gpu, arrays)):
        _scale_all_cpu(ws, gs, hyper, masks, rates, parallel)
        return
    _refuse_both_kinds(arrays, lambda index: _layout.pair_names(len(ws), rates=True)[index], kinds)
    gpu = _gpu_module()
    w_devices, g_devices, handles = _device_pairs(gpu, ws, gs)
    if rates is not None:
        # An object that is no array at all is left for _check_rates to name.
        rates, rates_stream, read_only = (
            gpu.as_device_array(rates) if on_gpu(rates) else (rates, None, False)
        )
        if read_only:
            _refuse_read_only("rates")
        _check_rates(rates, len(ws))
        handles.append(rates_stream)
    streams = gpu.caller_streams(handles)
    gpu.scale_all(w_devices, g_devices, hyper, masks, rates, streams)


def _device_pairs(gpu, ws: list, gs: list) -> tuple[list, list, list]:
    """``scale_all``'s pairs as Numba device arrays, after the checks of
    :func:`check_pair`, and the streams of their interfaces, each pair's ``g``'s
    first (see :func:`_device_arrays`)."""
    w_column, g_column = _device_column(gpu, ws), _device_column(gpu, gs)
    if w_column is not None and g_column is not None:
        # The common case, checked a column at a time; anything wrong takes the
        # checks pair by pair below, which say what.
        (w_devices, w_streams, _), (g_devices, g_streams, g_read_only) = w_column, g_column
        w_dtypes = list(map(_DTYPE, w_devices))
        if (
            all(map(_IS_FLOAT_DTYPE, w_dtypes))
            and list(map(_DTYPE, g_devices)) == w_dtypes
            and list(map(_SHAPE, g_devices)) == list(map(_SHAPE, w_devices))
            and not any(g_read_only)
        ):
            handles = [None] * (2 * len(g_streams))
            handles[::2], handles[1::2] = g_streams, w_streams
            return list(w_devices), list(g_devices), handles
    pairs = [
        _device_arrays(w, g, writes_g=True, names=(f"ws[{i}]", f"gs[{i}]"))
        for i, (w, g) in enumerate(zip(ws, gs, strict=True))
    ]
    handles = [handle for _, _, pair_handles in pairs for handle in pair_handles]
    return [pair[0] for pair in pairs], [pair[1] for pair in pairs], handles


_DTYPE, _SHAPE = attrgetter("dtype"), attrgetter("shape")


def _device_column(gpu, arrays: list) -> tuple[list, list, list] | None:
    """:func:`lars_numba._cuda.as_device_array` of each of ``arrays``, described, as
    their lists of device arrays, streams and read-only flags; None if one of
    them is not a CUDA array."""
    if all(getattr(kind, "__cuda_ndarray__", False) for kind in set(map(type, arrays))):
        # Numba's own, which it passes through, told apart by their types.
        return arrays, [None] * len(arrays), [False] * len(arrays)
    try:  # an object that is not a CUDA array has no interface
        return gpu.as_device_arrays(arrays, describe=True)
    except AttributeError:
        return None


def _refuse_both_kinds(
    arrays: Sequence, name: Callable[[int], str], kinds: set | None = None
) -> None:
    """Raise if ``arrays``, those of a call that has a CUDA array, hold a NumPy array
    too, naming one of each by its index (``name`` is called only then).
    ``kinds``, if given, is the set of their types."""
    if any(issubclass(kind, np.ndarray) for kind in kinds or set(map(type, arrays))):
        cpu = next(i for i, array in enumerate(arrays) if isinstance(array, np.ndarray))
        gpu = next(i for i, array in enumerate(arrays) if on_gpu(array))
        raise TypeError(
            "the arrays must all be NumPy arrays or all CUDA arrays; "
            f"got {name(cpu)} on the CPU and {name(gpu)} on the GPU"
        )


def _array_sequence(name: str, value: object) -> list:
    if isinstance(value, np.ndarray) or on_gpu(value):
        raise TypeError(f"{name} must be a sequence of arrays; got one array")
    try:
        return list(value)
    except TypeError:
        raise TypeError(
            f"{name} must be a sequence of arrays; got {type(value).__name__}"
        ) from None


def pair_masks(pairs: int, weight_decay_mask: object, trust_ratio_mask: object) -> np.ndarray:
    """Whether each pair gets weight decay and its trust ratio: a (pairs, 2) uint8 array.

    Both engines hand each row to :func:`lars_numba._rule.masked`, so that a
    masked pair runs the one rule with other hyperparameters.
    """
    masks = np.ones((pairs, 2), np.uint8)
    for column, (name, mask) in enumerate(
        (("weight_decay_mask", weight_decay_mask), ("trust_ratio_mask", trust_ratio_mask))
    ):
        if mask is not None:
            masks[:, column] = _bool_mask(name, mask, pairs)
    return masks


def _bool_mask(name: str, mask: object, pairs: int) -> np.ndarray:
    values = np.asarray(mask)
    if values.size == 0:  # an empty list is float64 to NumPy
        values = values.astype(np.bool_)
    if values.dtype != np.bool_:
        raise TypeError(f"{name} must hold booleans, one per pair; got dtype {values.dtype}")
    if values.shape != (pairs,):
        raise ValueError(f"{name} must hold one boolean per pair, ({pairs},); got {values.shape}")
    return values


def _check_rates(rates: object, pairs: int) -> None:
    if not accepts(rates) or rates.dtype != np.float64:
        kind = getattr(rates, "dtype", type(rates).__name__)
        raise TypeError(f"rates must be a float64 array; got {kind}")
    if rates.shape != (pairs,):
        raise ValueError(f"rates must have one entry per pair, ({pairs},); got {rates.shape}")
    if isinstance(rates, np.ndarray) and not rates.flags.writeable:
        raise ValueError("rates must be writeable; got a read-only array")


def _scale_all_cpu(ws: list, gs: list, hyper, masks: np.ndarray, rates, parallel: bool) -> None:
    pairs = len(ws)
    layout = _layout.plain_layouts(ws, gs)
    if layout is None:
        for i, (w, g) in enumerate(zip(ws, gs, strict=True)):
            if not plain_pair(w, g):
                check_pair(w, g, writes_g=True, names=(f"ws[{i}]", f"gs[{i}]"))
        layout = _layout.attribute_layouts(ws, gs)
    if rates is None:
        rates = np.empty(pairs)
    else:
        _check_rates(rates, pairs)
    # The update reads w while writing g: as in scale, a w that overlaps its
    # own g without being the same view of it is copied first.
    overlapping = (layout[:, _layout.W_LOW] < layout[:, _layout.G_HIGH]) & (
        layout[:, _layout.G_LOW] < layout[:, _layout.W_HIGH]
    )
    for i in np.flatnonzero(overlapping):
        if ws[i] is not gs[i] and ws[i].__array_interface__ != gs[i].__array_interface__:
            ws[i] = ws[i].copy()
            layout[i] = _layout.pair_layout(kernel_view(ws[i]), kernel_view(gs[i]))
    _layout.refuse_overlaps(layout, rates)
    _cpu.scale_many(ws, gs, layout, hyper, masks, rates, parallel)


# -- the momentum step ------------------------------------------------------------

_FLOAT16, _FLOAT32 = 0, 1  # kinds of _layout.array_rows


def momentum_step(
    ws: object,
    gs: object,
    vs: object,
    masters: object,
    hyper: Hyperparameters,
    clip: bool,
    weight_decay_mask: object,
    trust_ratio_mask: object,
    rates: object,
    skip_nonfinite: bool,
    parallel: bool,
    nonfinite: object = None,
) -> bool | None:
    """One momentum step of every pair after checking every argument (see
    :func:`lars_numba.momentum_step`); whether it was taken, or ``None`` for
    CUDA arrays, whose step is enqueued.

    ``clip`` makes the learning rate of ``hyper`` its ``clip_lr`` too.
    """
    if clip:
        hyper = _rule.clipped_at_lr(hyper)
    columns = _step_columns(ws, gs, vs, masters)
    arrays = [*chain.from_iterable(columns.values()), rates, nonfinite]
    # NumPy arrays, the common case, are told apart without a Python call per array.
    if not set(map(type, arrays)) <= _HOST_TYPES and any(map(on_gpu, arrays)):
        masks = pair_masks(len(columns["ws"]), weight_decay_mask, trust_ratio_mask)
        _momentum_step_gpu(columns, hyper, masks, rates, skip_nonfinite, nonfinite)
        return None
    if nonfinite is not None:
        raise TypeError(
            "nonfinite must be None with NumPy arrays, whose call returns whether the step "
            f"was taken; got {type(nonfinite).__name__}"
        )
    plan, gs, g_rows = _plan_of_columns(columns, weight_decay_mask, trust_ratio_mask, rates)
    taken = plan.run(gs, g_rows, hyper, skip_nonfinite, parallel)
    if taken and rates is not None:
        rates[...] = plan.rates
    return taken


def momentum_plan(
    ws: object,
    gs: object,
    vs: object,
    masters: object,
    weight_decay_mask: object,
    trust_ratio_mask: object,
    rates: object = None,
) -> tuple[MomentumPlan, list, np.ndarray]:
    """The checked arrays of a :func:`momentum_step` call but its gradients, the
    gradients' list and their rows of :func:`lars_numba._layout.array_rows`.

    Raises as :func:`lars_numba.momentum_step` does, before anything is written.
    """
    columns = _step_columns(ws, gs, vs, masters)
    return _plan_of_columns(columns, weight_decay_mask, trust_ratio_mask, rates)


def _plan_of_columns(
    columns: dict[str, list], weight_decay_mask: object, trust_ratio_mask: object, rates: object
) -> tuple[MomentumPlan, list, np.ndarray]:
    """:func:`momentum_plan` of the lists that :func:`_step_columns` made (it takes them)."""
    masters = columns.pop("masters", None)
    pairs = len(columns["ws"])
    masks = pair_masks(pairs, weight_decay_mask, trust_ratio_mask)
    if rates is not None:
        _check_rates(rates, pairs)
    with_master = np.zeros(pairs, bool)
    if masters is not None:
        with_master = np.fromiter((m is not None for m in masters), bool, pairs)
        columns["masters"] = [m for m in masters if m is not None]
    names = _MomentumNames(with_master)
    rows, ids = {}, {}
    for name, arrays in columns.items():
        if not _layout.all_plain(arrays):
            for index, array in enumerate(arrays):
                label = names(name, index)
                if on_gpu(array):
                    raise TypeError(
                        f"{label} is a CUDA array; momentum_step takes NumPy arrays only"
                    )
                _check_array(label, array)
        rows[name], ids[name] = _layout.array_rows(arrays)
        for index in np.flatnonzero(rows[name][:, _layout.KIND] < 0):
            _check_array(names(name, index), arrays[index])
    _check_momentum_pairs(columns, names, rows, ids, with_master)
    layout = np.concatenate([rows[name] for name in columns])
    if rates is not None:
        low, high = _layout.memory_bounds(rates)
        layout = np.concatenate((layout, [[low, high, rates.size, _layout.WRITEABLE, 3]]))
    written = np.ones(len(layout), bool)
    written[pairs : 2 * pairs] = False  # gs
    first, second = _layout.first_overlap(
        layout[:, _layout.LOW], layout[:, _layout.HIGH], np.arange(len(layout)), written
    )
    if first >= 0:
        labels = [names(name, i) for name in columns for i in range(len(columns[name]))]
        labels.append("rates")
        raise ValueError(
            f"{labels[min(first, second)]} and {labels[max(first, second)]} overlap in memory; "
            "an array that is written must not overlap any other array of the call"
        )
    gs, g_rows = columns.pop("gs"), rows.pop("gs")
    del ids["gs"]
    return MomentumPlan(columns, rows, ids, with_master, masks), gs, g_rows


_HOST_TYPES = {np.ndarray, type(None)}


def _step_columns(ws: object, gs: object, vs: object, masters: object) -> dict[str, list]:
    """The sequences of a :func:`momentum_step` call as lists, by name (``masters``
    only if given), after checking that each has an entry per array of ``ws``."""
    columns = {"ws": _array_sequence("ws", ws)}
    pairs = len(columns["ws"])
    for name, value in (("gs", gs), ("vs", vs), ("masters", masters)):
        if value is None and name == "masters":
            continue
        columns[name] = _array_sequence(name, value)
        if len(columns[name]) != pairs:
            entry = "entry" if name == "masters" else "array"
            raise ValueError(
                f"{name} must hold one {entry} per array of ws, {pairs}; got {len(columns[name])}"
            )
    return columns


def _momentum_step_gpu(
    columns: dict[str, list],
    hyper: Hyperparameters,
    masks: np.ndarray,
    rates: object,
    skip_nonfinite: bool,
    nonfinite: object,
) -> None:
    """:func:`momentum_step` of CUDA arrays, ``columns`` as :func:`_step_columns`
    gives them: the checks of the NumPy path, then the step enqueued on the
    caller's stream."""
    pairs = len(columns["ws"])
    everything = {**columns, "rates": [rates], "nonfinite": [nonfinite]}
    _refuse_both_kinds(
        [array for arrays in everything.values() for array in arrays if array is not None],
        lambda index: _label_of(everything, index),
    )
    gpu = _gpu_module()
    # The gradients first: as for scale_all, the launch stream is the first
    # stream named, unless CuPy's current stream is (see caller_streams).
    ordered = {name: columns[name] for name in sorted(columns, key=lambda name: name != "gs")}
    on_device, handles = _momentum_devices(gpu, ordered) or _checked_momentum_devices(gpu, ordered)
    for name, array in (("rates", rates), ("nonfinite", nonfinite)):
        if array is None:
            continue
        if not on_gpu(array):
            _check_array(name, array)  # names the object that is no array
        device, stream, read_only = gpu.as_device_array(array)
        if read_only:
            _refuse_read_only(name)
        handles.append(stream)
        on_device[name] = [device]
        if name == "rates":
            rates = device
            _check_rates(rates, pairs)
        else:
            nonfinite = device
            if nonfinite.dtype != np.bool_ or nonfinite.shape != (1,):
                raise TypeError(
                    "nonfinite must be a bool CUDA array of shape (1,); "
                    f"got {nonfinite.dtype} of shape {nonfinite.shape}"
                )
    devices = [array for arrays in on_device.values() for array in arrays if array is not None]
    bounds = gpu.device_bounds_of(devices)
    written = np.ones(len(devices), bool)
    written[:pairs] = False  # the gradients, first
    first, second = _layout.first_overlap(
        bounds[:, 0], bounds[:, 1], np.arange(len(bounds)), written
    )
    if first >= 0:
        raise ValueError(
            f"{_label_of(on_device, min(first, second))} and "
            f"{_label_of(on_device, max(first, second))} overlap in memory; an array that "
            "is written must not overlap any other array of the call"
        )
    masters = on_device.get("masters", [None] * pairs)
    steps = [
        (w, g, v) if master is None else (master, g, v, w)
        for w, g, v, master in zip(
            on_device["ws"], on_device["gs"], on_device["vs"], masters, strict=True
        )
    ]
    gpu.momentum_step(
        steps, hyper, masks, rates, gpu.caller_streams(handles), skip_nonfinite, nonfinite
    )


def _label_of(columns: dict[str, list], index: int) -> str:
    """How the messages name the array at ``index`` of the arrays of ``columns``, by
    name in order, those that are None left out: ``name[i]``, or ``name`` for
    ``rates`` and ``nonfinite``."""
    for name, arrays in columns.items():
        present = [i for i, array in enumerate(arrays) if array is not None]
        if index < len(present):
            return name if name in ("rates", "nonfinite") else f"{name}[{present[index]}]"
        index -= len(present)
    raise IndexError(index)


def _momentum_devices(gpu, columns: dict[str, list]) -> tuple[dict, list] | None:
    """The arrays of ``columns`` (a GPU ``momentum_step``'s, the gradients first) as
    Numba device arrays by name (``None`` where ``masters`` has no entry) and
    their interfaces' streams, if each is a CUDA array of the dtype and shape
    the step takes, not read-only if it is written; None otherwise.

    A column at a time, for the common case; :func:`_checked_momentum_devices`
    says what is wrong.
    """
    on_device, handles = {}, []
    for name, arrays in columns.items():
        column = _device_column(gpu, [array for array in arrays if array is not None])
        if column is None:
            return None
        devices, streams, read_only = column
        if (name != "gs" and any(read_only)) or not all(map(_IS_FLOAT_DTYPE, map(_DTYPE, devices))):
            return None
        handles += streams
        on_device[name] = list(devices)
        if len(devices) < len(arrays):  # masters without an entry for every pair
            found = iter(devices)
            on_device[name] = [None if array is None else next(found) for array in arrays]
    ws = on_device["ws"]
    w_dtypes, w_shapes = list(map(_DTYPE, ws)), list(map(_SHAPE, ws))
    masters = on_device.get("masters", [None] * len(ws))
    wanted = {
        "gs": w_dtypes,
        "vs": [
            _FLOAT32_DTYPE if master is not None or dtype == _FLOAT16_DTYPE else dtype
            for dtype, master in zip(w_dtypes, masters, strict=True)
        ],
    }
    for name, dtypes in wanted.items():
        arrays = on_device[name]
        if list(map(_DTYPE, arrays)) != dtypes or list(map(_SHAPE, arrays)) != w_shapes:
            return None
    if not all(
        master.dtype == _FLOAT32_DTYPE and master.shape == shape
        for master, shape in zip(masters, w_shapes, strict=True)
        if master is not None
    ):
        return None
    return on_device, handles


_FLOAT16_DTYPE, _FLOAT32_DTYPE = _FLOAT_DTYPES[:2]


def _checked_momentum_devices(gpu, columns: dict[str, list]) -> tuple[dict, list]:
    """What :func:`_momentum_devices` gives, the arrays checked one by one: raises,
    naming the first array that is not as the step takes it."""
    handles = []
    on_device = {}
    for name, arrays in columns.items():
        on_device[name] = []
        for i, array in enumerate(arrays):
            if array is None:
                on_device[name].append(None)
                continue
            label = f"{name}[{i}]"
            if not on_gpu(array):
                _check_array(label, array)  # names the object that is no array
            device, stream, read_only = gpu.as_device_array(array, describe=True)
            if read_only and name != "gs":
                _refuse_read_only(label)
            handles.append(stream)
            on_device[name].append(device)
    for name, arrays in on_device.items():
        for i, array in enumerate(arrays):
            if array is not None:
                _check_array(f"{name}[{i}]", array)
    masters = on_device.get("masters", [None] * len(on_device["ws"]))
    for i, (w, master) in enumerate(zip(on_device["ws"], masters, strict=True)):
        velocity = np.dtype(np.float32 if master is not None or w.dtype == np.float16 else w.dtype)
        wanted = {
            "gs": (w.dtype, f"the dtype of ws[{i}], {w.dtype}"),
            "vs": (
                velocity,
                f"dtype {velocity} for ws[{i}] of {w.dtype}"
                + (" with a master" if master is not None else ""),
            ),
            "masters": (np.dtype(np.float32), "dtype float32"),
        }
        for name, (dtype, description) in wanted.items():
            array = masters[i] if name == "masters" else on_device[name][i]
            if array is None:
                continue
            if array.dtype != dtype:
                raise TypeError(f"{name}[{i}] must have {description}; got {array.dtype}")
            if array.shape != w.shape:
                raise ValueError(
                    f"{name}[{i}] must have the shape of ws[{i}], {w.shape}; got {array.shape}"
                )
    return on_device, handles


class MomentumPlan:
    """The checked weights, velocities and masters of a :func:`momentum_step` call,
    kept by a caller that steps the same arrays again with new gradients (the
    Chainer optimizer), so that :meth:`restep` checks only what may have changed.

    It holds no gradient: a kept plan does not keep a step's gradients alive.
    """

    def __init__(
        self, columns: dict, rows: dict, ids: dict, with_master: np.ndarray, masks: np.ndarray
    ):
        self.columns, self.rows, self.ids = columns, rows, ids
        #: The ids and rows of the arrays, all plain, that restep reads again in
        #: one call; None where an array is not plain.
        self._kept: tuple[np.ndarray, np.ndarray] | None = None
        if all(name_ids is not None for name_ids in ids.values()):
            self._kept = np.concatenate(list(ids.values())), np.concatenate(list(rows.values()))
        self.with_master, self.masks = with_master, masks
        #: The rates of the last step run.
        self.rates = np.empty(len(with_master))
        self._written: tuple[np.ndarray, np.ndarray] | None = None
        #: The kernel's calls of the first step, whose pairs were all contiguous,
        #: with the flags the weights, velocities and masters share; None
        #: until then, or for good if a pair was strided.
        self._calls: tuple[list, np.ndarray] | None = None

    def __getstate__(self) -> None:
        raise TypeError(
            "a MomentumPlan holds the addresses of its arrays and cannot be copied or "
            "pickled; make one anew with momentum_plan"
        )

    def run(
        self, gs: list, g_rows: np.ndarray, hyper, skip_nonfinite: bool, parallel: bool
    ) -> bool:
        """The step with the checked gradients ``gs`` of rows ``g_rows``; whether it
        was taken. The rates it found are :attr:`rates`.

        The kernel's calls are made at the first step and kept: a later step
        only writes its gradients' addresses into them, if each gradient is
        contiguous in an order its pair's other arrays share.
        """
        calls = self._calls_with(g_rows)
        if calls is not None:
            return _cpu.run_momentum(calls, [], hyper, self.rates, skip_nonfinite, parallel)
        return _cpu.momentum_many(
            {**self.columns, "gs": gs},
            {**self.rows, "gs": g_rows},
            self.with_master,
            hyper,
            self.masks,
            self.rates,
            skip_nonfinite,
            parallel,
        )

    def _calls_with(self, g_rows: np.ndarray) -> list | None:
        """The kept calls with the addresses of the gradients of rows ``g_rows``, or
        None where they do not serve (see :meth:`run`)."""
        if self._calls is None:
            rows = {**self.rows, "gs": g_rows}
            calls, contiguous, shared = _cpu.momentum_calls(rows, self.with_master, self.masks)
            if not contiguous.all():
                return None
            self._calls = calls, shared
            return calls
        calls, shared = self._calls
        orders = _layout.C_CONTIGUOUS | _layout.F_CONTIGUOUS
        if not np.all(shared & g_rows[:, _layout.FLAGS] & orders):
            return None
        for _, addresses, _, _, _, members in calls:
            addresses[:, _cpu.GRADIENTS] = g_rows[members, _layout.LOW]
        return calls

    def restep(self, gs: list, hyper, skip_nonfinite: bool, parallel: bool) -> bool | None:
        """:func:`momentum_step` of the plan's arrays with the gradients ``gs``: whether
        the step was taken, or ``None``, before anything is written, if an array of
        the plan has changed since it was checked or ``gs`` are not what the call
        takes (:func:`momentum_plan` then says what is wrong)."""
        if self._kept is None or len(gs) != len(self.masks):
            return None
        plain = _layout.plain_rows(gs)
        if plain is None:
            return None
        g_rows, g_ids = plain
        kept_ids, kept_rows = self._kept
        if not np.array_equal(_layout.rows_of_ids(kept_ids), kept_rows):
            return None
        w_ids = self.ids["ws"]
        for name, name_ids in self.ids.items():
            others = w_ids if name != "masters" else w_ids[self.with_master]
            if name != "ws" and _layout.first_shape_difference(name_ids, others) >= 0:
                return None
        if (
            not np.array_equal(g_rows[:, _layout.KIND], self.rows["ws"][:, _layout.KIND])
            or _layout.first_shape_difference(g_ids, w_ids) >= 0
            or self._overlaps_written(g_rows)
        ):
            return None
        return self.run(gs, g_rows, hyper, skip_nonfinite, parallel)

    def _overlaps_written(self, g_rows: np.ndarray) -> bool:
        """Whether a gradient's byte range overlaps one of the arrays the step writes."""
        if self._written is None:
            # Checked disjoint: in order of their starts, their ends are in order too.
            written = np.concatenate([self.rows[name] for name in self.columns])
            written = written[written[:, _layout.HIGH] > written[:, _layout.LOW]]
            order = np.argsort(written[:, _layout.LOW])
            self._written = written[order, _layout.LOW], written[order, _layout.HIGH]
        lows, highs = self._written
        if not lows.size:
            return False
        g_lows, g_highs = g_rows[:, _layout.LOW], g_rows[:, _layout.HIGH]
        # The first written range that ends after a gradient starts.
        at = np.minimum(np.searchsorted(highs, g_lows, side="right"), lows.size - 1)
        return bool(((g_highs > g_lows) & (highs[at] > g_lows) & (lows[at] < g_highs)).any())


class _MomentumNames:
    """How the messages of ``momentum_step`` name its arrays, made when one is needed."""

    def __init__(self, with_master: np.ndarray):
        self.pairs_with_master = np.flatnonzero(with_master)

    def pair(self, name: str, index: int) -> int:
        """The pair of array ``index`` of the list ``name``."""
        return int(self.pairs_with_master[index]) if name == "masters" else index

    def __call__(self, name: str, index: int) -> str:
        return f"{name}[{self.pair(name, index)}]"


def _check_momentum_pairs(
    columns: dict, names: _MomentumNames, rows: dict, ids: dict, with_master: np.ndarray
) -> None:
    """Raise unless each pair's arrays have the dtypes and shapes of
    :func:`lars_numba.momentum_step` and those it writes are writeable."""
    ws, w_kinds = columns["ws"], rows["ws"][:, _layout.KIND]
    expected = {"gs": w_kinds, "vs": np.where(w_kinds == _FLOAT16, _FLOAT32, w_kinds)}
    expected["vs"][with_master] = _FLOAT32
    if "masters" in columns:
        expected["masters"] = np.full(len(columns["masters"]), _FLOAT32)
    for name, kinds in expected.items():
        pair_of = names.pairs_with_master if name == "masters" else np.arange(len(ws))
        wrong = np.flatnonzero(rows[name][:, _layout.KIND] != kinds)
        if wrong.size:
            index = wrong[0]
            w_label, w = f"ws[{pair_of[index]}]", ws[pair_of[index]]
            wanted = {
                "gs": f"the dtype of {w_label}, {w.dtype}",
                "vs": f"dtype {_FLOAT_DTYPES[kinds[index]]} for {w_label} of {w.dtype}"
                + (" with a master" if with_master[pair_of[index]] else ""),
                "masters": "dtype float32",
            }[name]
            raise TypeError(
                f"{names(name, index)} must have {wanted}; got {columns[name][index].dtype}"
            )
        others, other_ids = ws, ids["ws"]
        if name == "masters":
            others = [ws[i] for i in pair_of]
            other_ids = None if other_ids is None else other_ids[pair_of]
        index = _layout.shapes_differ_at(columns[name], others, ids[name], other_ids)
        if index >= 0:
            raise ValueError(
                f"{names(name, index)} must have the shape of ws[{pair_of[index]}], "
                f"{others[index].shape}; got {columns[name][index].shape}"
            )
    for name in columns.keys() - {"gs"}:
        read_only = np.flatnonzero(rows[name][:, _layout.FLAGS] & _layout.WRITEABLE == 0)
        if read_only.size:
            name_of = names(name, read_only[0])
            raise ValueError(f"{name_of} must be writeable; got a read-only array")
