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

import numpy as np

from . import _cpu, _layout
from ._layout import kernel_view
from ._rule import HYPERPARAMETERS, Hyperparameters, hyperparameters

__all__ = ["HYPERPARAMETERS", "Hyperparameters", "hyperparameters"]

_FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def _check_array(name: str, array: object) -> None:
    if not accepts(array):
        raise TypeError(f"{name} must be a NumPy or CUDA array; got {type(array).__name__}")
    if array.dtype not in _FLOAT_DTYPES:
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
        and w.dtype in _FLOAT_DTYPES
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
    """
    return bool(getattr(array, "__cuda_ndarray__", False)) or hasattr(
        array, "__cuda_array_interface__"
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
    (w_device, w_stream), (g_device, g_stream) = (
        gpu.as_device_array(a) if on_gpu(a) else (a, None) for a in (w, g)
    )
    check_pair(w_device, g_device, writes_g=False, names=names)
    if writes_g:
        _refuse_read_only_interface(names[1], g)
    return w_device, g_device, (g_stream, w_stream)


def _refuse_read_only_interface(name: str, array: object) -> None:
    """A device array has no writeable flag; its ``__cuda_array_interface__`` may say read-only."""
    interface = getattr(array, "__cuda_array_interface__", None)
    if interface is not None and interface["data"][1]:
        raise ValueError(f"{name} must be writeable; got a read-only array")


def _device_name(array: object) -> str:
    return "GPU" if on_gpu(array) else "CPU"


def _gpu_module():
    """:mod:`lars_numba._cuda`, imported when the first CUDA array is seen."""
    from . import _cuda

    return _cuda


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
    return _cpu.pair_rate((kernel_view(w), kernel_view(g)), hyper, True, parallel)


def trust_ratio(w, g, hyper: Hyperparameters, parallel: bool = True) -> float:
    """The rate ``scale`` would apply, after checking both arrays.

    For CUDA arrays it waits for the caller's stream to finish the sums.
    """
    if not (isinstance(w, np.ndarray) and isinstance(g, np.ndarray)) and (on_gpu(w) or on_gpu(g)):
        w, g, stream = _device_pair(w, g, writes_g=False)
        return _gpu_module().trust_ratio(w, g, hyper, stream)
    check_pair(w, g, writes_g=False)
    return _cpu.pair_rate((kernel_view(w), kernel_view(g)), hyper, False, parallel)


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
    # Plain NumPy arrays, the common case, are told apart without a call per array.
    if all(isinstance(array, np.ndarray) for array in arrays) or not any(map(on_gpu, arrays)):
        _scale_all_cpu(ws, gs, hyper, masks, rates, parallel)
        return
    # The name "rates" is unused when rates is None: zip stops at the arrays.
    placed = list(zip(_layout.pair_names(len(ws), rates=True), arrays, strict=False))
    cpu = next((name for name, array in placed if isinstance(array, np.ndarray)), None)
    if cpu is not None:
        gpu = next(name for name, array in placed if on_gpu(array))
        raise TypeError(
            "the arrays must all be NumPy arrays or all CUDA arrays; "
            f"got {cpu} on the CPU and {gpu} on the GPU"
        )
    gpu = _gpu_module()
    pairs = [
        _device_arrays(w, g, writes_g=True, names=(f"ws[{i}]", f"gs[{i}]"))
        for i, (w, g) in enumerate(zip(ws, gs, strict=True))
    ]
    handles = [handle for _, _, pair_handles in pairs for handle in pair_handles]
    if rates is not None:
        _refuse_read_only_interface("rates", rates)
        # An object that is no array at all is left for _check_rates to name.
        rates, rates_stream = gpu.as_device_array(rates) if on_gpu(rates) else (rates, None)
        _check_rates(rates, len(ws))
        handles.append(rates_stream)
    streams = gpu.caller_streams(handles)
    gpu.scale_all([p[0] for p in pairs], [p[1] for p in pairs], hyper, masks, rates, streams)


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
