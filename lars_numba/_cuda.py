"""The GPU engine, compiled with ``numba.cuda.jit``, and its launch helpers.

Imported by :mod:`lars_numba._api` only when a CUDA array is seen, so that
``import lars_numba`` does not load ``numba.cuda``.

The rule comes from :mod:`lars_numba._rule`, compiled here as device
functions from the same source the CPU engine compiles. Every call, ``scale``
on one pair or ``scale_all`` on many, is the same two kernels, twice per
group of pairs, on the caller's stream and without synchronization (as
apex's ``multi_tensor_apply`` does):

1. :func:`sums_of_chunks` reads ``w`` and ``g`` once. The pairs of a group
   travel as tuples of arrays, cut into chunks of
   :data:`lars_numba.tunables.GPU_CHUNK` elements that the blocks share out,
   so that one block's work does not depend on the size of the array it
   comes from. Each chunk's sums go to its row of a scratch array; the block
   that finishes a pair's last chunk (a ticket per pair decides which) adds up
   the pair's rows in a fixed order, once, into the pair's total, and resets
   the ticket for the next call. So the scratch needs no zeroing launch, and
   the totals do not depend on the order in which blocks finish, as they
   would with floating-point atomics.
2. :func:`update_chunks` has each block compute its pair's rate from the
   total and update its chunk; the block with the pair's first chunk stores
   the rate, if asked.

Contiguous pairs of one dtype go :data:`lars_numba.tunables.TUPLE_WIDTH` to a
group, as 1-d views; any other pair is a group of its own, as n-d arrays of
any strides, through the same kernels.

Like the CPU engine, the kernels accumulate and update in float64: a float16
sum of squares overflows past 65504 and a float32 one loses digits over
millions of terms, while on a memory-bound loop the float64 arithmetic hides
behind the loads on a data-centre GPU (an H100's float64 rate is half its
float32 rate). It also makes the rate agree with the CPU path to a few ulps.

Kernels are compiled on first use, once per dtype and layout, and cached on
disk (``cache=True``) with :data:`lars_numba._rule.SOURCE_DIGEST` in their
closure, so that a change of the rule compiles them anew.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from typing import NamedTuple

import numpy as np
from numba import cuda, float64
from numba.cuda.core import config

from . import _layout, _rule, tunables


def grid(items: int) -> tuple[int, int]:
    """Blocks and threads per block for ``items`` chunks, one to a block at most."""
    blocks = min(max(items, tunables.MIN_BLOCKS, 1), tunables.MAX_BLOCKS)
    return blocks, tunables.THREADS_PER_BLOCK


# -- device functions ----------------------------------------------------------

if config.ENABLE_CUDASIM:
    # The simulator runs kernels as Python, where Numba's intrinsics cannot run.
    def tuple_setitem(values, index, value):
        """``values`` with ``values[index]`` replaced by ``value``."""
        return (*values[:index], value, *values[index + 1 :])

else:
    from numba.cuda.cpython.unsafe.tuple import tuple_setitem

_device = cuda.jit(device=True, inline=True)
rate_from_sums = _device(_rule.rate_from_sums)
norm_terms = _device(_rule.norm_terms)
masked = _device(_rule.masked)
#: The updates, compiled, and what they write, in the order of ``_rule.UPDATES``.
_UPDATES = tuple(_device(update.function) for update in _rule.UPDATES.values())
_WRITTEN = tuple(update.written for update in _rule.UPDATES.values())


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


#: The sums of a pair start from these: one per term of ``_rule.norm_terms``.
ZERO_SUMS = (0.0,) * _rule.SUMS


@cuda.jit(device=True, inline=True)
def add_sums(a, b):
    """``a + b`` element by element, for tuples of sums."""
    total = a
    for k in range(len(a)):
        total = tuple_setitem(total, k, a[k] + b[k])
    return total


@cuda.jit(device=True, inline=True)
def block_sums(shared, sums):
    """The tuple ``sums`` added up over the threads of the block, for every thread.

    ``shared`` holds ``len(sums)`` float64 per thread. Every thread of the
    block must call this, as it synchronizes the block.
    """
    thread = cuda.threadIdx.x
    threads = cuda.blockDim.x
    for k in range(len(sums)):
        shared[k * threads + thread] = sums[k]
    cuda.syncthreads()
    half = threads // 2
    while half > 0:
        if thread < half:
            for k in range(len(sums)):
                shared[k * threads + thread] += shared[k * threads + thread + half]
        cuda.syncthreads()
        half //= 2
    total = sums
    for k in range(len(sums)):
        total = tuple_setitem(total, k, shared[k * threads])
    return total


@cuda.jit(device=True, inline=True)
def sums_of_range(hyper, w, g, start, stop, step):
    """The sums of :func:`lars_numba._rule.norm_terms` over ``range(start, stop, step)``."""
    sums = ZERO_SUMS
    for i in range(start, stop, step):
        terms = norm_terms(hyper, float64(w[unravel(i, w.shape)]), float64(g[unravel(i, g.shape)]))
        sums = add_sums(sums, terms)
    return sums


@cuda.jit(device=True, inline=True)
def sums_row(sums, row):
    """Row ``row`` of the 2-d array ``sums``, as a tuple of sums."""
    values = ZERO_SUMS
    for k in range(len(values)):
        values = tuple_setitem(values, k, sums[row, k])
    return values


@cuda.jit(device=True, inline=True)
def add_up_partials(shared, sums, row, partial, ticket, slot, first, end, total_row):
    """Store a block's sums ``partial`` in ``sums[row]``; the last of ``first:end`` adds up.

    ``ticket[slot]`` counts the rows of ``sums[first:end]`` stored so far. The
    block that stores the last writes their total, added in a fixed order, to
    ``sums[total_row]`` and resets the ticket. Every thread of the block must
    call this, as it synchronizes the block.
    """
    last = cuda.shared.array(1, np.int32)
    if cuda.threadIdx.x == 0:
        for k in range(len(partial)):
            sums[row, k] = partial[k]
        # The partials must be visible to every block before the ticket says
        # they are there (the memory-fence example of the CUDA guide).
        cuda.threadfence()
        last[0] = cuda.atomic.add(ticket, slot, 1) == end - first - 1
    cuda.syncthreads()
    if last[0]:
        total = ZERO_SUMS
        for other in range(first + cuda.threadIdx.x, end, cuda.blockDim.x):
            total = add_sums(total, sums_row(sums, other))
        total = block_sums(shared, total)
        if cuda.threadIdx.x == 0:
            for k in range(len(total)):
                sums[total_row, k] = total[k]
            ticket[slot] = 0
    # Every thread has read ``shared`` before a caller's next reduction writes it.
    cuda.syncthreads()


# -- kernels -------------------------------------------------------------------
#
# They take ``ws`` and ``gs``, tuples of arrays, and ``chunks``, whose row ``c``
# describes chunk ``c`` (see ``CHUNK_COLUMNS``). Numba's cache keys a kernel by
# its bytecode and closure, so each update's kernel is made by a function
# whose closure holds the update's number and the rule's digest.

#: The columns of a chunk table: the pair's slot in the tuples, the chunk's
#: first and past-last elements, the pair's first and past-last rows of chunks,
#: the pair's index in the call, and whether it gets weight decay and its trust
#: ratio.
CHUNK_COLUMNS = ("slot", "start", "stop", "first", "end", "pair", "decays", "adapts")


def _sums_kernel():
    """The sums kernel, with the rule's digest in its closure."""
    digest = _rule.SOURCE_DIGEST

    @cuda.jit(cache=True)
    def sums_of_chunks(ws, gs, chunks, sums, ticket, hyper):
        """``sums[len(chunks) + s] <-`` the sums over the pair in slot ``s``.

        Chunk ``c``'s sums go to ``sums[c]``; ``ticket[s]`` counts the pair's
        chunks done, and the block that does the last adds up the pair's rows.
        """
        assert digest
        shared = cuda.shared.array(0, float64)
        thread = cuda.threadIdx.x
        for chunk in range(cuda.blockIdx.x, chunks.shape[0], cuda.gridDim.x):
            slot = chunks[chunk, 0]
            pair_hyper = masked(hyper, chunks[chunk, 6], chunks[chunk, 7])
            partial = sums_of_range(
                pair_hyper,
                ws[slot],
                gs[slot],
                chunks[chunk, 1] + thread,
                chunks[chunk, 2],
                cuda.blockDim.x,
            )
            add_up_partials(
                shared,
                sums,
                chunk,
                block_sums(shared, partial),
                ticket,
                slot,
                chunks[chunk, 3],
                chunks[chunk, 4],
                chunks.shape[0] + slot,
            )

    return sums_of_chunks


sums_of_chunks = _sums_kernel()


def _update_kernel(update: int):
    """The update kernel of update number ``update`` (see ``_rule.UPDATES``)."""
    digest = _rule.SOURCE_DIGEST

    @cuda.jit(cache=True)
    def update_chunks(ws, gs, chunks, sums, hyper, rates):
        """Update each chunk, the rate from its pair's total and its masked ``hyper``.

        ``rates[pair]``, unless ``rates`` is empty, receives the pair's rate.
        """
        assert digest
        function = _UPDATES[update]
        written = _WRITTEN[update]
        thread = cuda.threadIdx.x
        for chunk in range(cuda.blockIdx.x, chunks.shape[0], cuda.gridDim.x):
            slot = chunks[chunk, 0]
            total = chunks.shape[0] + slot
            pair_hyper = masked(hyper, chunks[chunk, 6], chunks[chunk, 7])
            rate = rate_from_sums(sums_row(sums, total), pair_hyper)
            if chunk == chunks[chunk, 3] and thread == 0 and rates.size > 0:
                rates[chunks[chunk, 5]] = rate
            w = ws[slot]
            g = gs[slot]
            for i in range(chunks[chunk, 1] + thread, chunks[chunk, 2], cuda.blockDim.x):
                w_index = unravel(i, w.shape)
                g_index = unravel(i, g.shape)
                values = function(rate, pair_hyper, float64(w[w_index]), float64(g[g_index]))
                if written[0]:
                    w[w_index] = values[0]
                if written[1]:
                    g[g_index] = values[1]

    return update_chunks


#: The update kernels, by the update's name.
UPDATE_KERNELS = {name: _update_kernel(number) for number, name in enumerate(_rule.UPDATES)}


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
    sums: object  #: float64, (rows, SUMS): each chunk's partial sums, then each pair's totals
    ticket: object  #: uint32, (TUPLE_WIDTH,): chunks done of each pair; 0 between calls


_scratch: dict[tuple[object, int], Scratch] = {}
_scratch_lock = threading.Lock()


def _numba_stream(handle: int):
    if handle in (0, 1):
        return cuda.legacy_default_stream()
    if handle == 2:
        return cuda.per_thread_default_stream()
    return cuda.external_stream(handle)


def scratch_for(handle: int, rows: int) -> Scratch:
    """The scratch of the stream ``handle`` on the current device, of ``rows`` rows at least.

    Made once per device and stream (and again if it must grow), then
    reused: calls on one stream run in order, so they never use it at once.
    """
    key = (cuda.get_current_device(), handle)
    scratch = _scratch.get(key)
    if (
        scratch is None
        or scratch.sums.shape[0] < rows
        or scratch.ticket.shape[0] < tunables.TUPLE_WIDTH
    ):
        with _scratch_lock:
            stream = _numba_stream(handle)
            scratch = Scratch(
                stream=stream,
                sums=cuda.device_array((max(rows, 1), _rule.SUMS), np.float64, stream=stream),
                ticket=cuda.to_device(np.zeros(tunables.TUPLE_WIDTH, np.uint32), stream=stream),
            )
            _scratch[key] = scratch
    return scratch


# -- plans ---------------------------------------------------------------------


class Group(NamedTuple):
    """The pairs that one launch of each kernel treats."""

    pairs: tuple[int, ...]  #: indices into ``ws`` and ``gs``, in tuple order
    flat: bool  #: 1-d contiguous views of one dtype, padded to ``TUPLE_WIDTH``
    chunks: object  #: int64 device array, a row per chunk (see ``CHUNK_COLUMNS``)


class Plan(NamedTuple):
    """The launches of one kind of call and their chunk tables on the device."""

    groups: tuple[Group, ...]
    rows: int  #: scratch rows a group takes at most: its partial sums, then a total per slot


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


def _make_plan(layout, masks: np.ndarray, stream) -> Plan:
    """Group the pairs, ``layout[i] = (dtype, size, flat)``, and cut them into chunks.

    Flat pairs of one dtype go ``TUPLE_WIDTH`` to a group, in their order;
    every other pair is a group of its own.
    """
    flat = [pair for pair, entry in enumerate(layout) if entry[2]]
    members = [
        ([flat[i] for i in group], True)
        for group in _layout.groups_by_dtype(
            (layout[pair][0] for pair in flat), tunables.TUPLE_WIDTH
        )
    ]
    members += [([pair], False) for pair, entry in enumerate(layout) if not entry[2]]
    tables = []
    for pairs, _ in members:
        rows = _layout.chunk_rows([layout[pair][1] for pair in pairs], tunables.GPU_CHUNK)
        tables.append(
            [
                (slot, start, stop, first, end, pairs[slot], *masks[pairs[slot]])
                for slot, start, stop, first, end in rows
            ]
        )
    bounds = np.cumsum([0] + [len(table) for table in tables])
    chunks = cuda.to_device(
        np.array([row for table in tables for row in table], np.int64).reshape(
            -1, len(CHUNK_COLUMNS)
        ),
        stream=stream,
    )
    return Plan(
        groups=tuple(
            Group(tuple(pairs), is_flat, chunks[bounds[i] : bounds[i + 1]])
            for i, (pairs, is_flat) in enumerate(members)
        ),
        rows=max(len(table) for table in tables) + tunables.TUPLE_WIDTH,
    )


def _plan_for(key: tuple, layout, masks: np.ndarray, stream) -> Plan:
    """The plan for ``key`` from the cache, made and copied to the device on a miss."""
    with _plans_lock:
        plan = _plans.pop(key, None) or _make_plan(layout, masks, stream)
        _plans[key] = plan  # the most recently used last
        if len(_plans) > tunables.PLANS_KEPT:
            _plans.popitem(last=False)
    return plan


def reducing_launch(items: int, stream) -> tuple:
    """The launch configuration of a kernel that calls :func:`block_sums`."""
    blocks, threads = grid(items)
    return blocks, threads, stream, _rule.SUMS * threads * np.dtype(np.float64).itemsize


# -- drivers -------------------------------------------------------------------


def _views(ws, gs, device) -> tuple[list, list]:
    """The pairs as the kernels take them, and their ``(dtype, size, flat)``.

    Flat pairs are 1-d views of unit stride (see :func:`lars_numba._layout.flat_views`);
    a zero-size pair is the zero-size padding.
    """
    views = []
    layout = []
    for w, g in zip(ws, gs, strict=True):
        if w.size == 0:
            w = g = _empty_array(device, w.dtype)
        else:
            w, g = _layout.flat_views(w, g) or (w, g)
        # Unit strides, not the contiguous flags: those also hold for one
        # element of stride 0, which Numba types with another layout. (The
        # zero-size padding has stride 0 and the contiguous layout.)
        flat = w.ndim == 1 and (w.size == 0 or w.strides == g.strides == (w.dtype.itemsize,))
        layout.append((w.dtype, w.size, flat))
        views.append((w, g))
    return views, layout


def _launch(ws, gs, hyper, masks, rates, handle: int, update: bool) -> tuple[Plan, Scratch]:
    """Enqueue the sums and, if ``update``, the update of every pair; no synchronization.

    Returns the plan and the scratch, whose rows hold each pair's totals.
    """
    device = cuda.get_current_device()
    views, layout = _views(ws, gs, device)
    key = (device, handle, tunables.GPU_CHUNK, tunables.TUPLE_WIDTH, tuple(layout), masks.tobytes())
    plan = _plan_for(key, layout, masks, scratch_for(handle, 0).stream)
    scratch = scratch_for(handle, plan.rows)
    stored = _empty_array(device, np.float64) if rates is None else rates
    for group in plan.groups:
        w_tuple = tuple(views[pair][0] for pair in group.pairs)
        g_tuple = tuple(views[pair][1] for pair in group.pairs)
        if group.flat:
            padding = (_empty_array(device, w_tuple[0].dtype),) * (
                tunables.TUPLE_WIDTH - len(group.pairs)
            )
            w_tuple += padding
            g_tuple += padding
        launch = reducing_launch(group.chunks.shape[0], scratch.stream)
        sums_of_chunks[launch](w_tuple, g_tuple, group.chunks, scratch.sums, scratch.ticket, hyper)
        if update:
            UPDATE_KERNELS["scale"][launch[:3]](
                w_tuple, g_tuple, group.chunks, scratch.sums, hyper, stored
            )
    return plan, scratch


def scale(w, g, hyper, handle: int) -> None:
    """Enqueue the scaling of ``g`` on the stream ``handle``; no synchronization.

    ``w`` and ``g`` are validated device arrays of one shape and dtype.
    """
    if w.size:
        _launch([w], [g], hyper, _ALL_RULES, None, handle, update=True)


#: The masks of a pair that gets the whole rule.
_ALL_RULES = np.ones((1, 2), np.uint8)


def trust_ratio(w, g, hyper, handle: int) -> float:
    """The rate for two validated device arrays; waits for the stream ``handle``."""
    plan, scratch = _launch([w], [g], hyper, _ALL_RULES, None, handle, update=False)
    total_row = plan.groups[0].chunks.shape[0]
    sums = scratch.sums[total_row].copy_to_host(stream=scratch.stream)
    scratch.stream.synchronize()
    return _rule.rate_from_sums(tuple(float(value) for value in sums), hyper)


def scale_all(ws, gs, hyper, masks: np.ndarray, rates, handle: int) -> None:
    """Enqueue the scaling of every ``gs[i]`` on the stream ``handle``; no synchronization.

    ``ws[i]`` and ``gs[i]`` are validated device arrays of one shape and dtype,
    ``masks[i]`` whether pair ``i`` gets weight decay and its trust ratio
    (see :func:`lars_numba._api.pair_masks`); ``rates``, unless None, a
    float64 device array of length n that receives the rates.

    The chunk tables are copied to the device once per kind of call: they are
    cached under what they are made of (the device, the stream, each pair's
    dtype, size and layout, the masks and the tunables), not under the
    arrays' addresses nor the hyperparameters, so that gradients allocated
    afresh at every step and a changing weight decay reuse them.
    """
    if ws:
        _launch(ws, gs, hyper, masks, rates, handle, update=True)
