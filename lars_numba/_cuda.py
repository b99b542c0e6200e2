"""CUDA kernels for LARS, compiled with ``numba.cuda.jit``, and their launch helpers.

Imported by :mod:`lars_numba._api` only when a CUDA array is seen, so that
``import lars_numba`` does not load ``numba.cuda``.

One call of :func:`scale` is two launches on the caller's stream and no
synchronization:

1. :func:`sum_squares_pair` reads ``w`` and ``g`` once. Each block writes its
   two partial sums of squares to a row of a scratch array; the last block to
   finish (an atomic ticket decides which) adds up the rows in a fixed order,
   writes the totals to row 0 and resets the ticket for the next call. So the
   scratch needs no zeroing launch, and the totals do not depend on the order
   in which blocks finish, as they would with floating-point atomics.
2. :func:`apply_rate` has every thread compute the rate from row 0 with
   :func:`lars_numba._cpu.rate_from_sums`, the very rule the CPU kernels use,
   and scale its share of ``g``.

Like the CPU kernels, the kernels accumulate and update in float64: a float16
sum of squares overflows past 65504 and a float32 one loses digits over
millions of terms, while on a memory-bound loop the float64 arithmetic hides
behind the loads on a data-centre GPU (an H100's float64 rate is half its
float32 rate). It also makes the rate agree with the CPU path to a few ulps.

Kernels are compiled on first use, once per dtype and layout (contiguous arrays
as 1-d views, others as n-d arrays of any strides), and cached on disk
(``cache=True``), so a later process loads them instead of compiling again.

:func:`scale_all` treats many pairs in the same two passes, ``TUPLE_WIDTH``
pairs of one dtype a launch (as apex's ``multi_tensor_apply`` does): the pairs
travel as a tuple of 1-d arrays, cut into chunks of ``CHUNK_SIZE`` elements
that the blocks share out, so that one block's work does not depend on the
size of the array it comes from.

1. :func:`sum_squares_chunks` writes each chunk's two partial sums of squares
   to its row of the scratch; the block that finishes a pair's last chunk (a
   ticket per pair decides which, as in :func:`sum_squares_pair`) adds up the
   pair's rows in a fixed order, once, into the pair's total.
2. :func:`apply_rate_chunks` has each block compute its pair's rate from the
   total and scale its chunk; the block with the pair's first chunk stores the
   rate.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from typing import NamedTuple

import numpy as np
from numba import cuda, float64
from numba.cuda.core import config

from . import _cpu

# -- tunables: read at every launch, so tests may patch them ------------------

#: Threads per block; a power of two, which the block reduction halves.
THREADS_PER_BLOCK = 256
#: Fewest blocks per launch. numba-cuda warns below 128 blocks, and a single
#: wave of mostly idle blocks costs a GPU no more time than one block.
MIN_BLOCKS = 128
#: Most blocks per launch: 4 blocks of 256 threads on each of an H100's 132
#: SMs keep enough loads in flight to stream from HBM at full speed, with a
#: grid-stride loop covering larger arrays.
MAX_BLOCKS = 1024
#: Elements per chunk in :func:`scale_all`: 64 per thread of a 256-thread
#: block. Small enough that ResNet-50's two largest groups make 516 and 616
#: chunks, a block each, about the 528 blocks an H100 holds at once (4 a SM
#: at the kernels' 56 registers a thread); large enough that a block's work
#: outweighs its two block-wide reductions.
CHUNK_SIZE = 1 << 14
#: Pairs per launch in :func:`scale_all`: the width of the tuples of arrays.
#: Each 1-d array is 56 bytes of kernel parameters, so 2 x 24 arrays and the
#: tables stay within the 4 KiB that every CUDA version accepts; ResNet-50's
#: 161 float32 arrays take 7 groups, 14 launches.
TUPLE_WIDTH = 24


def grid(size: int, per_block: int | None = None) -> tuple[int, int]:
    """Blocks and threads per block for ``size`` items, ``per_block`` to a block.

    By default a block takes one item per thread.
    """
    blocks = -(-size // (per_block or THREADS_PER_BLOCK))
    return min(max(blocks, MIN_BLOCKS, 1), MAX_BLOCKS), THREADS_PER_BLOCK


# -- device functions ----------------------------------------------------------

if config.ENABLE_CUDASIM:
    # The simulator runs kernels as Python, where Numba's intrinsics cannot run.
    def tuple_setitem(values, index, value):
        """``values`` with ``values[index]`` replaced by ``value``."""
        return (*values[:index], value, *values[index + 1 :])

else:
    from numba.cuda.cpython.unsafe.tuple import tuple_setitem


@cuda.jit(device=True, inline=True)
def unravel(i, shape):
    """The index of the ``i``-th element, in C order, of an array of ``shape``."""
    index = shape
    # The first axis takes what is left without a division, so that 1-d
    # arrays, the contiguous fast path, are indexed with no division at all.
    for axis in range(len(shape) - 1, 0, -1):
        index = tuple_setitem(index, axis, i % shape[axis])
        i //= shape[axis]
    return tuple_setitem(index, 0, i)


@cuda.jit(device=True, inline=True)
def block_sum_pair(shared, a, b):
    """``(sum of a, sum of b)`` over the threads of the block, for every thread.

    ``shared`` holds two float64 per thread. Every thread of the block must
    call this, as it synchronizes the block.
    """
    thread = cuda.threadIdx.x
    threads = cuda.blockDim.x
    shared[thread] = a
    shared[threads + thread] = b
    cuda.syncthreads()
    half = threads // 2
    while half > 0:
        if thread < half:
            shared[thread] += shared[thread + half]
            shared[threads + thread] += shared[threads + thread + half]
        cuda.syncthreads()
        half //= 2
    return shared[0], shared[threads]


@cuda.jit(device=True, inline=True)
def sum_squares_range(w, g, start, stop, step):
    """``(sum w_i**2, sum g_i**2)`` over ``i`` in ``range(start, stop, step)``, in float64."""
    w_sq = 0.0
    g_sq = 0.0
    for i in range(start, stop, step):
        w_value = float64(w[unravel(i, w.shape)])
        g_value = float64(g[unravel(i, g.shape)])
        w_sq += w_value * w_value
        g_sq += g_value * g_value
    return w_sq, g_sq


@cuda.jit(device=True, inline=True)
def scale_range(w, g, start, stop, step, rate, weight_decay):
    """``g_i <- rate * (g_i + weight_decay * w_i)`` for ``i`` in ``range(start, stop, step)``."""
    for i in range(start, stop, step):
        index = unravel(i, g.shape)
        g[index] = rate * (float64(g[index]) + weight_decay * float64(w[unravel(i, w.shape)]))


@cuda.jit(device=True, inline=True)
def sum_rows(sums, start, stop, step):
    """``(sum sums[r, 0], sum sums[r, 1])`` over ``r`` in ``range(start, stop, step)``."""
    w_sq = 0.0
    g_sq = 0.0
    for row in range(start, stop, step):
        w_sq += sums[row, 0]
        g_sq += sums[row, 1]
    return w_sq, g_sq


@cuda.jit(device=True, inline=True)
def add_up_partials(shared, sums, row, w_sq, g_sq, ticket, slot, first, end, total_row):
    """Store a block's sums in ``sums[row]``; the last of ``first:end`` to be stored adds up.

    ``ticket[slot]`` counts the rows of ``sums[first:end]`` stored so far. The
    block that stores the last writes their total, added in a fixed order, to
    ``sums[total_row]`` and resets the ticket. Every thread of the block must
    call this, as it synchronizes the block.
    """
    last = cuda.shared.array(1, np.int32)
    if cuda.threadIdx.x == 0:
        sums[row, 0] = w_sq
        sums[row, 1] = g_sq
        # The partials must be visible to every block before the ticket says
        # they are there (the memory-fence example of the CUDA guide).
        cuda.threadfence()
        last[0] = cuda.atomic.add(ticket, slot, 1) == end - first - 1
    cuda.syncthreads()
    if last[0]:
        w_sq, g_sq = sum_rows(sums, first + cuda.threadIdx.x, end, cuda.blockDim.x)
        w_sq, g_sq = block_sum_pair(shared, w_sq, g_sq)
        if cuda.threadIdx.x == 0:
            sums[total_row, 0] = w_sq
            sums[total_row, 1] = g_sq
            ticket[slot] = 0
    # Every thread has read ``shared`` before a caller's next reduction writes it.
    cuda.syncthreads()


# -- kernels -------------------------------------------------------------------


@cuda.jit(cache=True)
def sum_squares_pair(w, g, sums, ticket):
    """``sums[0] <- (sum w_i**2, sum g_i**2)``, using ``sums[1 + block]`` and ``ticket``."""
    shared = cuda.shared.array(0, float64)
    w_sq, g_sq = sum_squares_range(w, g, cuda.grid(1), w.size, cuda.gridsize(1))
    w_sq, g_sq = block_sum_pair(shared, w_sq, g_sq)
    add_up_partials(
        shared, sums, 1 + cuda.blockIdx.x, w_sq, g_sq, ticket, 0, 1, 1 + cuda.gridDim.x, 0
    )


@cuda.jit(cache=True)
def apply_rate(w, g, sums, hyper):
    """``g <- rate * (g + weight_decay * w)``, the rate from the sums in ``sums[0]``."""
    rate = _cpu.rate_from_sums(sums[0, 0], sums[0, 1], hyper)
    scale_range(w, g, cuda.grid(1), w.size, cuda.gridsize(1), rate, _cpu.weight_decay_of(hyper))


@cuda.jit(cache=True)
def store_rate(sums, hyper, rates, index):
    """``rates[index] <-`` the rate from the sums in ``sums[0]``."""
    if cuda.grid(1) == 0:
        rates[index] = _cpu.rate_from_sums(sums[0, 0], sums[0, 1], hyper)


# The multi-tensor kernels take ``ws`` and ``gs``, tuples of 1-d arrays, and
# ``chunks``, whose row ``c`` describes chunk ``c``: (slot in the tuples, start,
# stop, first and end rows of the pair's chunks, the pair's row of ``table``).


@cuda.jit(cache=True)
def sum_squares_chunks(ws, gs, chunks, sums, ticket):
    """``sums[len(chunks) + s] <- (sum w_i**2, sum g_i**2)`` over the pair in slot ``s``.

    Chunk ``c``'s sums go to ``sums[c]``; ``ticket[s]`` counts the pair's chunks
    done, and the block that does the last adds up the pair's rows.
    """
    shared = cuda.shared.array(0, float64)
    thread = cuda.threadIdx.x
    for chunk in range(cuda.blockIdx.x, chunks.shape[0], cuda.gridDim.x):
        slot = chunks[chunk, 0]
        w_sq, g_sq = sum_squares_range(
            ws[slot], gs[slot], chunks[chunk, 1] + thread, chunks[chunk, 2], cuda.blockDim.x
        )
        w_sq, g_sq = block_sum_pair(shared, w_sq, g_sq)
        add_up_partials(
            shared,
            sums,
            chunk,
            w_sq,
            g_sq,
            ticket,
            slot,
            chunks[chunk, 3],
            chunks[chunk, 4],
            chunks.shape[0] + slot,
        )


@cuda.jit(cache=True)
def apply_rate_chunks(ws, gs, chunks, sums, table, rates):
    """``g <- rate * (g + weight_decay * w)`` over each chunk, the rate from its pair's total.

    ``table[pair]`` holds the pair's hyperparameters; ``rates[pair]``, unless
    ``rates`` is empty, receives its rate.
    """
    thread = cuda.threadIdx.x
    for chunk in range(cuda.blockIdx.x, chunks.shape[0], cuda.gridDim.x):
        slot = chunks[chunk, 0]
        total = chunks.shape[0] + slot
        pair = chunks[chunk, 5]
        # _cpu.hyper_row's tuple, spelled out: the simulator cannot pass its
        # arrays to a CPU-compiled function.
        hyper = (table[pair, 0], table[pair, 1], table[pair, 2])
        rate = _cpu.rate_from_sums(sums[total, 0], sums[total, 1], hyper)
        if chunk == chunks[chunk, 3] and thread == 0 and rates.size > 0:
            rates[pair] = rate
        scale_range(
            ws[slot],
            gs[slot],
            chunks[chunk, 1] + thread,
            chunks[chunk, 2],
            cuda.blockDim.x,
            rate,
            _cpu.weight_decay_of(hyper),
        )


# -- streams and scratch -------------------------------------------------------


def as_device_array(array):
    """``array`` as a Numba device array over the same memory: no copy, no sync.

    Numba's own device arrays (the simulator's included) pass through; any
    other object is read through its ``__cuda_array_interface__``.
    """
    if getattr(array, "__cuda_ndarray__", False):
        return array
    # No synchronization on the interface's stream: the kernels are enqueued
    # on it (see ``caller_stream``), which orders them after the producer.
    return cuda.as_cuda_array(array, sync=False)


def caller_stream(w, g) -> int:
    """The handle of the stream the caller's work on ``w`` and ``g`` is on.

    CuPy's current stream if CuPy is imported (Chainer's GPU work runs there);
    otherwise the ``stream`` entry of ``g``'s, then ``w``'s
    ``__cuda_array_interface__`` (version 3), where present; otherwise 0, the
    default stream. Handles 1 and 2 are the legacy and per-thread default
    streams, as in the interface.
    """
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        return cupy.cuda.get_current_stream().ptr
    for array in (g, w):
        interface = getattr(array, "__cuda_array_interface__", None)
        if interface is not None and interface.get("stream") is not None:
            return interface["stream"]
    return 0


class Scratch(NamedTuple):
    """The device memory one stream's calls reuse."""

    stream: object  #: the Numba stream for the handle
    sums: object  #: float64, (1 + blocks, 2): totals in row 0, block partials after
    ticket: object  #: uint32, (TUPLE_WIDTH,): blocks done with each reduction; 0 between calls


_scratch: dict[tuple[object, int], Scratch] = {}
_scratch_lock = threading.Lock()


def _numba_stream(handle: int):
    if handle in (0, 1):
        return cuda.legacy_default_stream()
    if handle == 2:
        return cuda.per_thread_default_stream()
    return cuda.external_stream(handle)


def scratch_for(handle: int, blocks: int) -> Scratch:
    """The scratch of the stream ``handle`` on the current device, for ``blocks`` blocks.

    Made once per device and stream (and again if ``MAX_BLOCKS`` grows), then
    reused: calls on one stream run in order, so they never use it at once.
    """
    key = (cuda.get_current_device(), handle)
    scratch = _scratch.get(key)
    if (
        scratch is None
        or scratch.sums.shape[0] < 1 + blocks
        or scratch.ticket.shape[0] < TUPLE_WIDTH
    ):
        with _scratch_lock:
            stream = _numba_stream(handle)
            rows = 1 + max(blocks, MAX_BLOCKS)
            scratch = Scratch(
                stream=stream,
                sums=cuda.device_array((rows, 2), np.float64, stream=stream),
                ticket=cuda.to_device(np.zeros(max(1, TUPLE_WIDTH), np.uint32), stream=stream),
            )
            _scratch[key] = scratch
    return scratch


# -- drivers -------------------------------------------------------------------


def kernel_views(w, g):
    """``w`` and ``g`` as the kernels take them: 1-d views where their layouts allow."""
    if w.ndim == 1:
        # Already 1-d; a Numba device array refuses to reshape when strided.
        return w, g
    flat = _cpu.flat_views(w, g)
    return (w, g) if flat is None else flat


def reducing_launch(size: int, stream, per_block: int | None = None) -> tuple:
    """The launch configuration of a kernel that calls :func:`block_sum_pair`."""
    blocks, threads = grid(size, per_block)
    return blocks, threads, stream, 2 * threads * np.dtype(np.float64).itemsize


def _sum_squares(w, g, handle: int) -> Scratch:
    scratch = scratch_for(handle, grid(w.size)[0])
    launch = reducing_launch(w.size, scratch.stream)
    sum_squares_pair[launch](w, g, scratch.sums, scratch.ticket)
    return scratch


def _scale_pair(w, g, hyper, handle: int) -> Scratch:
    scratch = _sum_squares(w, g, handle)
    blocks, threads = grid(w.size)
    apply_rate[blocks, threads, scratch.stream](w, g, scratch.sums, hyper)
    return scratch


def scale(w, g, hyper, handle: int) -> None:
    """Enqueue the scaling of ``g`` on the stream ``handle``; no synchronization.

    ``w`` and ``g`` are validated device arrays of one shape and dtype.
    """
    if w.size == 0:
        return
    _scale_pair(*kernel_views(w, g), hyper, handle)


def trust_ratio(w, g, hyper, handle: int) -> float:
    """The rate for two validated device arrays; waits for the stream ``handle``."""
    scratch = _sum_squares(*kernel_views(w, g), handle)
    sums = scratch.sums[0].copy_to_host(stream=scratch.stream)
    scratch.stream.synchronize()
    return _cpu.rate_from_sums(float(sums[0]), float(sums[1]), hyper)


# -- many pairs at once --------------------------------------------------------


class Group(NamedTuple):
    """The pairs that one launch of each multi-tensor kernel treats."""

    dtype: np.dtype  #: the dtype of all its arrays
    pairs: tuple[int, ...]  #: indices into ``ws`` and ``gs``, in tuple order
    chunks: object  #: int64 device array, a row per chunk (see ``sum_squares_chunks``)


class Plan(NamedTuple):
    """The launches of one kind of :func:`scale_all` call and their device tables."""

    groups: tuple[Group, ...]
    table: object  #: float64 device array, (n, 3): a row of hyperparameters per pair
    rows: int  #: scratch rows a group takes: its partial sums, then a total per slot


#: Plans kept on the device: a training loop makes one (more if it alternates
#: between models); ResNet-50's takes 84 KB.
PLANS_KEPT = 8

_plans: OrderedDict[tuple, Plan] = OrderedDict()
_plans_lock = threading.Lock()
_empty: dict[tuple[object, np.dtype], object] = {}


def _empty_array(device, dtype):
    """A zero-size 1-d device array: padding for the tuples, and "no rates"."""
    key = (device, np.dtype(dtype))
    array = _empty.get(key)
    if array is None:
        array = _empty[key] = cuda.device_array(0, dtype)
    return array


def _make_plan(layout, table: np.ndarray, stream) -> Plan:
    """Group the 1-d pairs, ``layout[i] = (dtype, size)``, and cut them into chunks.

    Pairs of one dtype go ``TUPLE_WIDTH`` to a group, in their order. A
    zero-size pair gets one empty chunk, so that its rate (1) is stored too.
    """
    by_dtype: dict[np.dtype, list[int]] = {}
    for pair, entry in enumerate(layout):
        if entry is not None:
            by_dtype.setdefault(entry[0], []).append(pair)
    members = [
        (dtype, pairs[i : i + TUPLE_WIDTH])
        for dtype, pairs in by_dtype.items()
        for i in range(0, len(pairs), TUPLE_WIDTH)
    ]
    rows: list[tuple[int, ...]] = []
    bounds = []
    for _, pairs in members:
        top = len(rows)
        for slot, pair in enumerate(pairs):
            size = layout[pair][1]
            starts = range(0, size, CHUNK_SIZE) or range(1)
            first = len(rows) - top
            end = first + len(starts)
            rows.extend(
                (slot, start, min(start + CHUNK_SIZE, size), first, end, pair) for start in starts
            )
        bounds.append((top, len(rows)))
    chunks = cuda.to_device(np.array(rows, np.int64), stream=stream)
    return Plan(
        groups=tuple(
            Group(dtype, tuple(pairs), chunks[top:bottom])
            for (dtype, pairs), (top, bottom) in zip(members, bounds, strict=True)
        ),
        table=cuda.to_device(np.ascontiguousarray(table), stream=stream),
        rows=max(bottom - top for top, bottom in bounds) + TUPLE_WIDTH,
    )


def _plan_for(key: tuple, layout, table: np.ndarray, stream) -> Plan:
    """The plan for ``key`` from the cache, made and copied to the device on a miss."""
    with _plans_lock:
        plan = _plans.pop(key, None) or _make_plan(layout, table, stream)
        _plans[key] = plan  # the most recently used last
        if len(_plans) > PLANS_KEPT:
            _plans.popitem(last=False)
    return plan


def scale_all(ws, gs, table: np.ndarray, rates, handle: int) -> None:
    """Enqueue the scaling of every ``gs[i]`` on the stream ``handle``; no synchronization.

    ``ws[i]`` and ``gs[i]`` are validated device arrays of one shape and dtype
    and ``table[i]`` (a host float64 array of shape (n, 3)) their
    hyperparameters; ``rates``, unless None, a float64 device array of length
    n that receives the rates.

    Pairs that have 1-d contiguous views (:func:`kernel_views`) go
    ``TUPLE_WIDTH`` of one dtype to a launch of each multi-tensor kernel; any
    other pair takes :func:`scale`'s two launches, and one more to store its
    rate. The chunk and hyperparameter tables are copied to the device once
    per kind of call: they are cached under what they are made of (the
    device, the stream, each pair's dtype and size or its being strided, the
    hyperparameters and the tunables), not under the arrays' addresses, so
    that gradients allocated afresh at every step reuse them.
    """
    device = cuda.get_current_device()
    views = []
    layout = []
    for w, g in zip(ws, gs, strict=True):
        if w.size == 0:
            w = g = _empty_array(device, w.dtype)
        else:
            w, g = kernel_views(w, g)
        # Unit strides, not the contiguous flags: those also hold for one
        # element of stride 0, which Numba types with another layout. (The
        # zero-size padding has stride 0 and the contiguous layout.)
        flat = w.ndim == 1 and (w.size == 0 or w.strides == g.strides == (w.dtype.itemsize,))
        layout.append((w.dtype, w.size) if flat else None)
        views.append((w, g))

    if any(entry is not None for entry in layout):
        key = (device, handle, CHUNK_SIZE, TUPLE_WIDTH, tuple(layout), table.tobytes())
        plan = _plan_for(key, layout, table, scratch_for(handle, 0).stream)
        scratch = scratch_for(handle, plan.rows)
        stored = _empty_array(device, np.float64) if rates is None else rates
        for group in plan.groups:
            padding = (_empty_array(device, group.dtype),) * (TUPLE_WIDTH - len(group.pairs))
            w_tuple = tuple(views[pair][0] for pair in group.pairs) + padding
            g_tuple = tuple(views[pair][1] for pair in group.pairs) + padding
            launch = reducing_launch(group.chunks.shape[0], scratch.stream, per_block=1)
            sum_squares_chunks[launch](w_tuple, g_tuple, group.chunks, scratch.sums, scratch.ticket)
            apply_rate_chunks[launch[:3]](
                w_tuple, g_tuple, group.chunks, scratch.sums, plan.table, stored
            )

    for pair, entry in enumerate(layout):
        if entry is None:
            hyper = tuple(float(value) for value in table[pair])
            scratch = _scale_pair(*views[pair], hyper, handle)
            if rates is not None:
                blocks, threads = grid(1)
                store_rate[blocks, threads, scratch.stream](scratch.sums, hyper, rates, pair)
