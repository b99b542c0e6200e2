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
"""

from __future__ import annotations

import sys
import threading
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


def grid(size: int) -> tuple[int, int]:
    """Blocks and threads per block for arrays of ``size`` elements."""
    blocks = -(-size // THREADS_PER_BLOCK)
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


# -- kernels -------------------------------------------------------------------


@cuda.jit(cache=True)
def sum_squares_pair(w, g, sums, ticket):
    """``sums[0] <- (sum w_i**2, sum g_i**2)``, using ``sums[1 + block]`` and ``ticket``."""
    shared = cuda.shared.array(0, float64)
    w_sq = 0.0
    g_sq = 0.0
    for i in range(cuda.grid(1), w.size, cuda.gridsize(1)):
        w_value = float64(w[unravel(i, w.shape)])
        g_value = float64(g[unravel(i, g.shape)])
        w_sq += w_value * w_value
        g_sq += g_value * g_value
    w_sq, g_sq = block_sum_pair(shared, w_sq, g_sq)

    last = cuda.shared.array(1, np.int32)
    if cuda.threadIdx.x == 0:
        sums[1 + cuda.blockIdx.x, 0] = w_sq
        sums[1 + cuda.blockIdx.x, 1] = g_sq
        # The partials must be visible to every block before the ticket says
        # they are there (the memory-fence example of the CUDA guide).
        cuda.threadfence()
        last[0] = cuda.atomic.add(ticket, 0, 1) == cuda.gridDim.x - 1
    cuda.syncthreads()
    if last[0]:
        w_sq = 0.0
        g_sq = 0.0
        for block in range(cuda.threadIdx.x, cuda.gridDim.x, cuda.blockDim.x):
            w_sq += sums[1 + block, 0]
            g_sq += sums[1 + block, 1]
        w_sq, g_sq = block_sum_pair(shared, w_sq, g_sq)
        if cuda.threadIdx.x == 0:
            sums[0, 0] = w_sq
            sums[0, 1] = g_sq
            ticket[0] = 0


@cuda.jit(cache=True)
def apply_rate(w, g, sums, hyper):
    """``g <- rate * (g + weight_decay * w)``, the rate from the sums in ``sums[0]``."""
    rate = _cpu.rate_from_sums(sums[0, 0], sums[0, 1], hyper)
    weight_decay = _cpu.weight_decay_of(hyper)
    for i in range(cuda.grid(1), w.size, cuda.gridsize(1)):
        index = unravel(i, g.shape)
        g[index] = rate * (float64(g[index]) + weight_decay * float64(w[unravel(i, w.shape)]))


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
    ticket: object  #: uint32, (1,): blocks done with the current reduction; 0 between calls


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
    if scratch is None or scratch.sums.shape[0] < 1 + blocks:
        with _scratch_lock:
            stream = _numba_stream(handle)
            rows = 1 + max(blocks, MAX_BLOCKS)
            scratch = Scratch(
                stream=stream,
                sums=cuda.device_array((rows, 2), np.float64, stream=stream),
                ticket=cuda.to_device(np.zeros(1, np.uint32), stream=stream),
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


def _sum_squares(w, g, handle: int) -> Scratch:
    blocks, threads = grid(w.size)
    scratch = scratch_for(handle, blocks)
    shared_bytes = 2 * threads * np.dtype(np.float64).itemsize
    sum_squares_pair[blocks, threads, scratch.stream, shared_bytes](
        w, g, scratch.sums, scratch.ticket
    )
    return scratch


def scale(w, g, hyper, handle: int) -> None:
    """Enqueue the scaling of ``g`` on the stream ``handle``; no synchronization.

    ``w`` and ``g`` are validated device arrays of one shape and dtype.
    """
    if w.size == 0:
        return
    w, g = kernel_views(w, g)
    scratch = _sum_squares(w, g, handle)
    blocks, threads = grid(w.size)
    apply_rate[blocks, threads, scratch.stream](w, g, scratch.sums, hyper)


def trust_ratio(w, g, hyper, handle: int) -> float:
    """The rate for two validated device arrays; waits for the stream ``handle``."""
    scratch = _sum_squares(*kernel_views(w, g), handle)
    sums = scratch.sums[0].copy_to_host(stream=scratch.stream)
    scratch.stream.synchronize()
    return _cpu.rate_from_sums(float(sums[0]), float(sums[1]), hyper)
