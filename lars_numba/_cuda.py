"""The GPU engine, compiled with ``numba.cuda.jit``, and its launch helpers.

Imported by :mod:`lars_numba._api` only when a CUDA array is seen, so that
``import lars_numba`` does not load ``numba.cuda``.

The rule comes from :mod:`lars_numba._rule`, compiled here as device
functions from the same source the CPU engine compiles. Every call, ``scale``
on one pair, ``scale_all`` or ``momentum_step`` on many, is two kernels per
group of pairs, on the caller's stream and without synchronization (as
apex's ``multi_tensor_apply`` does):

1. :func:`sums_of_chunks` reads ``w`` and ``g`` once. The pairs of a group
   travel as one table of their arrays' addresses, cut into chunks of
   :data:`lars_numba.tunables.GPU_CHUNK` elements that the blocks share out,
   so that one block's work does not depend on the size of the array it
   comes from. Each chunk's sums go to its row of a scratch array; the block
   that finishes a pair's last chunk (a ticket per pair, counting modulo the
   pair's chunks, decides which) adds up the pair's rows in a fixed order,
   once, into the pair's total, and leaves the ticket at 0 for the next call.
   So the scratch needs no zeroing launch, and the totals do not depend on
   the order in which blocks finish, as they would with floating-point
   atomics.
2. :func:`update_chunks` (``step_chunks`` for a momentum step, over three
   or four arrays a pair) has each block compute its pair's rate from the
   total and update its chunk; the block with the pair's first chunk stores
   the rate, if asked. A momentum step may be skipped on the device: the
   sums set a flag where a gradient is not finite, every group's sums then
   run first, and the step kernels do nothing if the flag is set.

Contiguous pairs of the same dtypes go :data:`lars_numba.tunables.GROUP_PAIRS`
to a group, as the addresses of their 1-d views (see :func:`slot_arrays`);
any other pair is a group of its own, as n-d arrays of any strides, through
the same kernels. A flat group's launches keep their arguments packed for
the driver from one call to the next (see :class:`Launcher`): numba-cuda's
dispatcher would type and pack them all again at every launch.

Like the CPU engine, the kernels accumulate and update in float64: a float16
sum of squares overflows past 65504 and a float32 one loses digits over
millions of terms, while on a memory-bound loop the float64 arithmetic hides
behind the loads on a data-centre GPU (an H100's float64 rate is half its
float32 rate). It also makes the rate agree with the CPU path to a few ulps.

No kernel or device function here is compiled with ``fastmath``, and the
CPU engine's flags never reach them: the rule's functions are plain Python,
compiled here by ``cuda.jit(device=True)``. So NVVM's defaults apply: IEEE
division and square root, subnormals kept, NaN and Inf honoured, and
multiply-adds contracted into FMAs (the one way a GPU's update may differ
from the CPU's, by an ulp).

Kernels are compiled on first use, once per dtype and layout, and cached on
disk (``cache=True``) with :data:`lars_numba._rule.SOURCE_DIGEST` in their
closure, so that a change of the rule compiles them anew.
"""

from __future__ import annotations

import ctypes
import math
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterable
from itertools import chain, compress
from operator import attrgetter, itemgetter, not_, or_
from typing import NamedTuple

import numpy as np
from numba import cuda, float32, float64, types, uint32
from numba.cuda.core import config
from numba.cuda.cudadrv import driver
from numba.cuda.np.numpy_support import is_contiguous

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
_ROUNDED_COPY = tuple(update.rounded_copy for update in _rule.UPDATES.values())


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


# -- the arrays of a group -------------------------------------------------------
#
# A group of flat pairs travels as one table, ``(addresses, likes)``:
# ``addresses[slot, k]`` is the device address of array ``k`` of the pair in
# ``slot``, ``likes[k]`` a zero-size array of that array's dtype. So a launch
# takes the same few parameters whatever its number of pairs: numba-cuda types
# and packs the arrays of a tuple one by one at every launch, and a kernel's
# parameters may not pass 4 KiB. A pair of strided arrays is a group of its
# own and travels as the tuple of its arrays.

if config.ENABLE_CUDASIM:

    def slot_arrays(arrays, slot, stop):
        """The arrays of the pair in ``slot`` of the group ``arrays``, as kernels index
        them: 1-d views of ``stop`` elements for a table, else the pair's arrays.

        The simulator's device arrays are host memory: the views are NumPy's.
        """
        if not isinstance(arrays[1], tuple):
            return arrays
        addresses, likes = arrays
        return tuple(
            _host_view(int(addresses[slot, k]), int(stop), like.dtype)
            for k, like in enumerate(likes)
        )

    def _host_view(address: int, size: int, dtype: np.dtype) -> np.ndarray:
        if size == 0:
            return np.empty(0, dtype)
        buffer = (ctypes.c_byte * (size * dtype.itemsize)).from_address(address)
        return np.frombuffer(buffer, dtype)

else:
    from numba.core import cgutils
    from numba.cuda.extending import intrinsic, overload
    from numba.cuda.np.arrayobj import populate_array

    _GLOBAL = 1  # NVVM's address space of global memory

    @intrinsic
    def view_at(typingctx, address, size, like):
        """The 1-d array of ``size`` elements of ``like``'s dtype at the device
        address ``address``, in global memory."""
        array_type = types.Array(like.dtype, 1, "C")

        def codegen(context, builder, signature, args):
            address, size, _ = args
            element = context.get_data_type(array_type.dtype)
            itemsize = context.get_constant(types.intp, context.get_abi_sizeof(element))
            # Global, so that NVVM loads and stores with ld.global and st.global.
            data = builder.inttoptr(address, element.as_pointer(_GLOBAL))
            array = context.make_array(array_type)(context, builder)
            populate_array(
                array,
                data=builder.addrspacecast(data, element.as_pointer()),
                shape=cgutils.pack_array(builder, [size]),
                strides=cgutils.pack_array(builder, [itemsize]),
                itemsize=itemsize,
                meminfo=None,
            )
            return array._getvalue()

        return array_type(types.int64, types.intp, like), codegen

    def slot_arrays(arrays, slot, stop):
        """The arrays of the pair in ``slot`` of the group ``arrays``, as kernels index
        them: 1-d views of ``stop`` elements for a table, else the pair's arrays."""

    @overload(slot_arrays, inline="always")
    def _slot_arrays(arrays, slot, stop):
        if not isinstance(arrays[1], types.BaseTuple):
            return lambda arrays, slot, stop: arrays
        if len(arrays[1]) == 2:
            return lambda arrays, slot, stop: (
                view_at(arrays[0][slot, 0], stop, arrays[1][0]),
                view_at(arrays[0][slot, 1], stop, arrays[1][1]),
            )
        return lambda arrays, slot, stop: (
            view_at(arrays[0][slot, 0], stop, arrays[1][0]),
            view_at(arrays[0][slot, 1], stop, arrays[1][1]),
            view_at(arrays[0][slot, 2], stop, arrays[1][2]),
            view_at(arrays[0][slot, 3], stop, arrays[1][3]),
        )


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
        index = unravel(i, w.shape)  # g has the shape of w
        sums = add_sums(sums, norm_terms(hyper, float64(w[index]), float64(g[index])))
    return sums


@cuda.jit(device=True, inline=True)
def sums_row(sums, row):
    """Row ``row`` of the 2-d array ``sums``, as a tuple of sums."""
    values = ZERO_SUMS
    for k in range(len(values)):
        values = tuple_setitem(values, k, sums[row, k])
    return values


@cuda.jit(device=True, inline=True)
def add_up_partials(shared, sums, row, partial, ticket, slot, first, end, total_row, nonfinite):
    """Store a block's sums ``partial`` in ``sums[row]``; the last of ``first:end`` adds up.

    ``ticket[slot]`` counts the rows of ``sums[first:end]`` stored so far,
    modulo their number. The block that stores the last writes their total,
    added in a fixed order, to ``sums[total_row]``, and sets ``nonfinite[0]``
    if the gradient's sum of squares is not finite. Every thread of the block
    must call this, as it synchronizes the block.
    """
    last = cuda.shared.array(1, np.int32)
    if cuda.threadIdx.x == 0:
        for k in range(len(partial)):
            sums[row, k] = partial[k]
        # Release: the partials are visible to every block before the ticket
        # says they are there (the memory-fence example of the CUDA guide).
        cuda.threadfence()
        # The increment wraps to 0 at the last row, so the ticket is ready for
        # the next call with no store, which could wipe out another kernel's
        # increment and leave every later call adding stale rows.
        rows = uint32(end - first)
        last[0] = cuda.atomic.inc(ticket, slot, rows - uint32(1)) == rows - uint32(1)
    cuda.syncthreads()
    if last[0]:
        # Acquire, in every thread that reads the rows: without it the loads
        # below may be served stale lines from this SM's L1 cache.
        cuda.threadfence()
        total = ZERO_SUMS
        for other in range(first + cuda.threadIdx.x, end, cuda.blockDim.x):
            total = add_sums(total, sums_row(sums, other))
        total = block_sums(shared, total)
        if cuda.threadIdx.x == 0:
            for k in range(len(total)):
                sums[total_row, k] = total[k]
            if not math.isfinite(total[1]):
                nonfinite[0] = True
    # Every thread has read ``shared`` before a caller's next reduction writes it.
    cuda.syncthreads()


# -- kernels -------------------------------------------------------------------
#
# They take a group's arrays (see :func:`slot_arrays`), ``chunks``, whose row
# ``c`` describes chunk ``c`` (see ``CHUNK_COLUMNS``),
# and ``sums`` from row ``base`` on: a row per chunk, then a total per slot.
# Numba's cache keys a kernel by its bytecode and closure, so each update's
# kernel is made by a function whose closure holds the update's number and
# the rule's digest.

#: The columns of a chunk table: the pair's slot in the group, the chunk's
#: first and past-last elements, the pair's first and past-last rows of chunks,
#: the pair's index in the call, and whether it gets weight decay and its trust
#: ratio.
CHUNK_COLUMNS = ("slot", "start", "stop", "first", "end", "pair", "decays", "adapts")


def _sums_kernel():
    """The sums kernel, with the rule's digest in its closure."""
    digest = _rule.SOURCE_DIGEST

    @cuda.jit(cache=True)
    def sums_of_chunks(arrays, chunks, sums, base, ticket, hyper, nonfinite):
        """``sums[base + len(chunks) + s] <-`` the sums over the pair in slot ``s``.

        Chunk ``c``'s sums go to ``sums[base + c]``; ``ticket[s]`` counts the
        pair's chunks done, and the block that does the last adds up the pair's
        rows and sets ``nonfinite[0]`` if its gradient is not finite.
        """
        assert digest
        shared = cuda.shared.array(0, float64)
        thread = cuda.threadIdx.x
        for chunk in range(cuda.blockIdx.x, chunks.shape[0], cuda.gridDim.x):
            slot = chunks[chunk, 0]
            pair = slot_arrays(arrays, slot, chunks[chunk, 2])
            pair_hyper = masked(hyper, chunks[chunk, 6], chunks[chunk, 7])
            partial = sums_of_range(
                pair_hyper,
                pair[0],
                pair[1],
                chunks[chunk, 1] + thread,
                chunks[chunk, 2],
                cuda.blockDim.x,
            )
            add_up_partials(
                shared,
                sums,
                base + chunk,
                block_sums(shared, partial),
                ticket,
                slot,
                base + chunks[chunk, 3],
                base + chunks[chunk, 4],
                base + chunks.shape[0] + slot,
                nonfinite,
            )

    return sums_of_chunks


sums_of_chunks = _sums_kernel()


@cuda.jit(device=True, inline=True)
def chunk_rate(chunks, chunk, sums, base, hyper, rates):
    """The slot, the masked ``hyper`` and the rate of chunk ``chunk``'s pair, from
    its total; the block of the pair's first chunk stores the rate in
    ``rates[pair]``, unless ``rates`` is empty."""
    slot = chunks[chunk, 0]
    pair_hyper = masked(hyper, chunks[chunk, 6], chunks[chunk, 7])
    rate = rate_from_sums(sums_row(sums, base + chunks.shape[0] + slot), pair_hyper)
    if chunk == chunks[chunk, 3] and cuda.threadIdx.x == 0 and rates.size > 0:
        rates[chunks[chunk, 5]] = rate
    return slot, pair_hyper, rate


def _update_kernel(update: int):
    """The update kernel of update number ``update`` (see ``_rule.UPDATES``), for
    pairs of two arrays."""
    digest = _rule.SOURCE_DIGEST
    # The update's function from the closure, not indexed in the kernel from
    # the tuple, which Numba types as first-class functions.
    function, written = _UPDATES[update], _WRITTEN[update]

    @cuda.jit(cache=True)
    def update_chunks(arrays, chunks, sums, base, hyper, rates):
        """Update each chunk, the rate from its pair's total and its masked ``hyper``.

        ``rates[pair]``, unless ``rates`` is empty, receives the pair's rate.
        """
        assert digest
        for chunk in range(cuda.blockIdx.x, chunks.shape[0], cuda.gridDim.x):
            slot, pair_hyper, rate = chunk_rate(chunks, chunk, sums, base, hyper, rates)
            pair = slot_arrays(arrays, slot, chunks[chunk, 2])
            w = pair[0]
            g = pair[1]
            for i in range(chunks[chunk, 1] + cuda.threadIdx.x, chunks[chunk, 2], cuda.blockDim.x):
                index = unravel(i, w.shape)  # g has the shape of w
                values = function(rate, pair_hyper, float64(w[index]), float64(g[index]))
                if written[0]:
                    w[index] = values[0]
                if written[1]:
                    g[index] = values[1]

    return update_chunks


def _step_kernel(update: int):
    """The update kernel of update number ``update``, a momentum step: pairs of
    weights (or masters), gradients, velocities and the copies that receive
    the new weights' rounding where the update has them (the weights again
    where it has not)."""
    digest = _rule.SOURCE_DIGEST
    function, written = _UPDATES[update], _WRITTEN[update]
    rounded_copy = _ROUNDED_COPY[update]

    @cuda.jit(cache=True)
    def step_chunks(arrays, chunks, sums, base, hyper, rates, nonfinite, skip):
        """:func:`update_chunks` for four arrays a pair; nothing at all if ``skip``
        and ``nonfinite[0]``, set by the sums of this call."""
        assert digest
        if skip and nonfinite[0]:
            return
        for chunk in range(cuda.blockIdx.x, chunks.shape[0], cuda.gridDim.x):
            slot, pair_hyper, rate = chunk_rate(chunks, chunk, sums, base, hyper, rates)
            pair = slot_arrays(arrays, slot, chunks[chunk, 2])
            w = pair[0]
            g = pair[1]
            v = pair[2]
            copy = pair[3]
            for i in range(chunks[chunk, 1] + cuda.threadIdx.x, chunks[chunk, 2], cuda.blockDim.x):
                index = unravel(i, w.shape)  # the arrays of a pair have one shape
                values = function(
                    rate, pair_hyper, float64(w[index]), float64(g[index]), float64(v[index])
                )
                if written[0]:
                    w[index] = values[0]
                if written[1]:
                    g[index] = values[1]
                if written[2]:
                    v[index] = values[2]
                if rounded_copy:  # the float32 master as stored, rounded to float16
                    copy[index] = float32(values[0])

    return step_chunks


#: The update kernels, by the update's name: ``update_chunks`` for pairs of two
#: arrays, ``step_chunks`` for the momentum steps.
UPDATE_KERNELS = {
    name: (_update_kernel if update.arrays == 2 else _step_kernel)(number)
    for number, (name, update) in enumerate(_rule.UPDATES.items())
}

#: The update of pairs of each number of arrays.
UPDATE_OF_ARITY = {update.arrays: name for name, update in _rule.UPDATES.items()}


# -- launches ------------------------------------------------------------------


class Launcher:
    """The launches of one kernel for one group of a plan, each argument typed and
    packed into the kernel's parameters only when it is not the very object it
    was at the previous launch (a tuple of floats: not an equal tuple).

    numba-cuda's dispatcher types every argument and packs it at every launch,
    in Python: about 150 us for one launch of a group's table. A plan's
    launches on one stream differ from call to call in the hyperparameters
    and the caller's ``rates`` and ``nonfinite`` arrays at most, so the rest
    is packed once. The types, the kernel and the packing are numba-cuda's
    (its dispatcher's ``typeof_pyval``, ``overloads`` and
    ``_Kernel._prepare_args``), and so is the launch (``_Kernel.launch``, given
    the parameters); a launch whose types have no compiled kernel, or whose
    kernel depends on its launch configuration, goes through the dispatcher.
    So does every launch under the simulator, and every launch of anything
    but numba-cuda's own dispatcher (a wrapper of one, as the tests' spies
    are, sees each launch). Holds the arguments of its last launch (a
    caller's ``rates`` and ``nonfinite`` arrays among them) until its next.
    """

    def __init__(self) -> None:
        self.dispatcher = None
        self.launch: tuple = ()  #: blocks, threads, stream and shared memory
        self.configured = None  #: the dispatcher's launch configuration for ``launch``
        self.kernel = None  #: the compiled kernel of ``types``; None: dispatch
        self.packed = None  #: ``kernel``, to be launched on packed parameters
        self.arguments: list = []
        self.types: tuple = ()
        self.parameters: list[list] = []  #: the packed parameters of each argument
        self.flat: list = []  #: all of them, in order

    def __call__(self, dispatcher, launch: tuple, arguments: tuple) -> None:
        """Launch ``dispatcher``'s kernel on ``arguments`` with ``launch``, as
        ``dispatcher[launch](*arguments)`` does."""
        if dispatcher is not self.dispatcher or launch != self.launch:
            if dispatcher is not self.dispatcher:
                self.dispatcher, self.kernel = dispatcher, None
            self.launch, self.configured = launch, dispatcher[launch]
        if self.kernel is None or not self._repacked(arguments):
            self._dispatched(arguments)
            return
        configured = self.configured
        _Kernel.launch(
            self.packed,
            (self.flat,),
            configured.griddim,
            configured.blockdim,
            configured.stream,
            configured.sharedmem,
        )

    def _repacked(self, arguments: tuple) -> bool:
        """Pack the arguments that changed; False if one changed its type."""
        if len(arguments) != len(self.arguments):
            return False
        changed = False
        for i, (argument, previous) in enumerate(zip(arguments, self.arguments, strict=True)):
            if argument is previous or (type(argument) is tuple and argument == previous):
                continue
            kind = self.dispatcher.typeof_pyval(argument)
            if kind != self.types[i]:
                return False
            self.arguments[i] = argument
            self.parameters[i] = _parameters(self.kernel, kind, argument)
            changed = True
        if changed:
            self.flat = list(chain.from_iterable(self.parameters))
        return True

    def _dispatched(self, arguments: tuple) -> None:
        """Launch through the dispatcher (compiling if it must), then pack for the next."""
        self.configured(*arguments)
        if type(self.dispatcher) is not _DISPATCHER:
            return
        self.types = tuple(map(self.dispatcher.typeof_pyval, arguments))
        self.kernel = self.dispatcher.overloads.get(self.types)
        if self.kernel is None or getattr(self.kernel, "launch_config_sensitive", False):
            self.kernel = None
            return
        self.packed = _Packed(self.kernel)
        self.arguments = list(arguments)
        self.parameters = [
            _parameters(self.kernel, kind, argument)
            for kind, argument in zip(self.types, arguments, strict=True)
        ]
        self.flat = list(chain.from_iterable(self.parameters))


def _parameters(kernel, kind, argument) -> list:
    """``argument``'s parameters, of Numba type ``kind``, as ``kernel`` packs them."""
    if isinstance(kind, types.UniTuple) and kind.dtype == types.float64:
        # What numba-cuda packs a float64 as, in a tenth of its time.
        return list(map(ctypes.c_double, argument))
    parameters: list = []
    kernel._prepare_args(kind, argument, 0, [], parameters)
    return parameters


class _Packed:
    """A compiled kernel that ``_Kernel.launch`` launches on parameters packed
    beforehand: its one argument is the parameters."""

    argument_types = (None,)

    def __init__(self, kernel) -> None:
        self._kernel = kernel
        # What the launch reads at every call, read once; anything else, from
        # the kernel, through __getattr__.
        for name in ("debug", "cooperative", "_codelibrary"):
            if hasattr(kernel, name):
                setattr(self, name, getattr(kernel, name))

    def __getattr__(self, name: str):
        return getattr(self._kernel, name)

    @staticmethod
    def _prepare_args(kind, parameters, stream, retr, kernelargs: list) -> None:
        kernelargs.extend(parameters)


if config.ENABLE_CUDASIM:
    _DISPATCHER = None  # the simulator's kernels launch as they are called
else:
    from numba.cuda.dispatcher import CUDADispatcher as _DISPATCHER
    from numba.cuda.dispatcher import _Kernel


# -- streams -------------------------------------------------------------------


def as_device_array(array, *, describe: bool = False) -> tuple:
    """``array`` as a Numba device array over the same memory, its interface's
    stream and whether its interface says it is read-only.

    No copy, no synchronization. Numba's own device arrays (the simulator's
    included) pass through, with no stream, writeable; any other object is
    read through its ``__cuda_array_interface__``, once, and its ``stream``
    entry (``None`` when unset) comes back for :func:`caller_streams`. With
    ``describe`` (an array of a pair, which flat kernels reach by its
    address), a :class:`Described` comes back in place of the conversion
    where the interface allows one, unless the simulator is on (its device
    arrays are host arrays).
    """
    (device,), (stream,), (read_only,) = as_device_arrays([array], describe=describe)
    return device, stream, read_only


def as_device_arrays(arrays: list, *, describe: bool = False) -> tuple[list, list, list]:
    """:func:`as_device_array` of each of ``arrays``: their device arrays, their
    interfaces' streams and whether each is read-only, as three lists, in one
    loop rather than a call per array whose results are then unzipped, which a
    column of CuPy arrays would pay for at every call."""
    describing = describe and not config.ENABLE_CUDASIM
    devices, streams, read_only = [], [], []
    for array in arrays:
        if getattr(array, "__cuda_ndarray__", False):
            devices.append(array)
            streams.append(None)
            read_only.append(False)
            continue
        interface = array.__cuda_array_interface__
        device = Described.of(interface, array) if describing else None
        if device is None:
            device = from_interface(interface, array)
        devices.append(device)
        streams.append(interface.get("stream"))
        read_only.append(bool(interface["data"][1]))
    return devices, streams, read_only


class Described:
    """A C-contiguous CUDA array known by its ``__cuda_array_interface__`` (CuPy's
    arrays), not converted to a Numba device array: numba-cuda's conversion
    takes about 9 us an array on the host, several times what a flat pair
    costs a call otherwise.

    It has the fields of a Numba device array that the checks and the layout
    read: ``dtype``, ``shape``, ``size``, ``nbytes``, ``_dummy.flags`` and
    ``gpu_data.device_pointer``. A flat pair's kernels reach its memory by
    its address; where a kernel takes the array itself (a strided pair's),
    :func:`kernel_array` converts it. It keeps the owner of the memory
    alive, as a conversion does.
    """

    __slots__ = (
        "__cuda_array_interface__",
        "_dummy",
        "_owner",
        "device_pointer",
        "dtype",
        "nbytes",
        "shape",
        "size",
    )

    @classmethod
    def of(cls, interface: dict, owner: object) -> Described | None:
        """``owner``, whose interface is ``interface``, described; None unless it is
        C-contiguous and unmasked."""
        if interface.get("mask") is not None:
            return None  # for numba-cuda's conversion to refuse
        shape = tuple(interface["shape"])
        dtype = _DTYPES.get(interface["typestr"]) or np.dtype(interface["typestr"])
        strides = interface.get("strides")
        if strides is not None and not is_contiguous(shape, strides, dtype.itemsize):
            return None
        size = math.prod(shape)
        described = cls()
        described.__cuda_array_interface__ = interface
        described._owner = owner
        described.dtype, described.shape, described.size = dtype, shape, size
        described.nbytes = size * dtype.itemsize
        # C-contiguous; F-contiguous too with one extent above 1 at most.
        described._dummy = (
            _C_AND_F if len(shape) - shape.count(1) - shape.count(0) <= 1 else _C_ONLY
        )
        described.device_pointer = interface["data"][0]
        return described

    @property
    def gpu_data(self) -> Described:
        """What holds the address that :func:`device_addresses` reads, as a Numba
        device array's memory does: the array itself, which saves making an
        object per array and call."""
        return self


class _Layout(NamedTuple):
    """What :func:`_views` and :func:`device_bounds_of` read of a :class:`Described`
    array's layout."""

    flags: dict


_C_ONLY = _Layout({"C_CONTIGUOUS": True, "F_CONTIGUOUS": False})
_C_AND_F = _Layout({"C_CONTIGUOUS": True, "F_CONTIGUOUS": True})
#: The dtypes of the float typestrs, which np.dtype would make afresh each time.
_DTYPES = {np.dtype(name).str: np.dtype(name) for name in ("float16", "float32", "float64")}


def kernel_array(array):
    """``array`` as a kernel takes it: a :class:`Described` one converted."""
    if type(array) is Described:
        return from_interface(array.__cuda_array_interface__, array._owner)
    return array


def from_interface(interface: dict, owner: object):
    """A Numba device array over the memory that ``interface``, ``owner``'s
    ``__cuda_array_interface__``, describes."""
    # No synchronization on the interface's stream: the launch stream waits
    # for it on the device (see ``caller_streams``).
    return cuda.from_cuda_array_interface(interface, owner=owner, sync=False)


class Streams(NamedTuple):
    """Where a call's kernels run, and what they wait for first."""

    launch: int  #: the handle of the stream the kernels are enqueued on
    waits: tuple[int, ...]  #: the arrays' other streams, which the launch stream waits for


def _same_stream(handle: int) -> int:
    """``handle``, with both names of the legacy default stream, 0 and 1, made 0."""
    return 0 if handle == 1 else handle


def caller_streams(handles) -> Streams:
    """The streams of a call whose arrays' interfaces name ``handles``, in order of preference.

    ``None`` is an array without a stream. The launch stream is CuPy's
    current stream if CuPy is imported (Chainer's GPU work runs there),
    otherwise the first handle given, otherwise 0, the legacy default stream.
    Every other stream named is a producer's that the interface (version 3)
    asks the consumer to order its work after: the launch stream waits for
    an event recorded on it, on the device, with no host synchronization.
    Handles 1 and 2 are the legacy and per-thread default streams, as in the
    interface.
    """
    # Each handle once, in order: a call's arrays mostly name one stream.
    named = [handle for handle in dict.fromkeys(handles) if handle is not None]
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        launch = cupy.cuda.get_current_stream().ptr
    else:
        launch = named[0] if named else 0
    others = (handle for handle in named if _same_stream(handle) != _same_stream(launch))
    return Streams(launch, tuple(dict.fromkeys(others)))


def _numba_stream(handle: int):
    if handle in (0, 1):
        return cuda.legacy_default_stream()
    if handle == 2:
        return cuda.per_thread_default_stream()
    return cuda.external_stream(handle)


def _new_event():
    """An event for ordering work, without timing (the simulator's take no options)."""
    return cuda.event() if config.ENABLE_CUDASIM else cuda.event(timing=False)


def _completed(event) -> bool:
    """Whether the GPU has passed ``event``; under the simulator, whose launches
    are synchronous and whose events cannot be queried, it always has."""
    return bool(config.ENABLE_CUDASIM) or event.query()


# -- the memory queued kernels use ----------------------------------------------
#
# One lock is held while a call enqueues its launches, so that two host
# threads on one stream cannot interleave them (sums A, sums B, update A,
# update B would scale A with B's rate). Kernels on different streams may run
# at once, so each stream has scratch of its own; the per-thread default
# stream (handle 2) is a different stream in each host thread, so there the
# scratch is the thread's. Buffers dropped from the caches (an evicted plan,
# scratch that grew or whose stream was evicted) may still be read by queued
# kernels: they are kept, with events recorded after their last use, until
# the events complete. With Numba's default allocator freeing them early
# would stall the device; with a pooled one (RMM, CuPy's) their memory could
# be handed out and overwritten while the kernels read it.


class Scratch(NamedTuple):
    """The device memory that one stream's calls reuse."""

    stream: object  #: the Numba stream
    sums: object  #: float64, (rows, SUMS): each group's chunks' partial sums, then its totals
    ticket: object  #: uint32, a slot's chunks done, modulo their number, for the widest group
    addresses: object  #: int64, 1-d: the call's address table (see :func:`slot_arrays`)
    nonfinite: object  #: bool, (1,): whether a gradient was not finite, where the call has no flag
    event: object  #: recorded on ``stream`` after each call's last launch


_lock = threading.Lock()
_scratch: OrderedDict[tuple, Scratch] = OrderedDict()
#: (buffers, events): what queued kernels may still read, until every event completes.
_retiring: list[tuple[object, tuple]] = []


def _retire(buffers: object, events: tuple) -> None:
    """Keep ``buffers`` until ``events`` complete; free what has completed."""
    _retiring.append((buffers, events))
    _retiring[:] = [entry for entry in _retiring if not all(map(_completed, entry[1]))]
    # A stream that is never idle when asked would keep them forever: past
    # the bound, wait for the oldest on the host.
    while len(_retiring) > tunables.BUFFERS_RETIRING:
        for event in _retiring.pop(0)[1]:
            event.synchronize()


_threads = threading.local()


def stream_key(handle: int) -> tuple:
    """What tells the stream ``handle`` of the current host thread from any other.

    The per-thread default stream, handle 2, is a different stream in each
    thread: the key holds a token of the thread's own, not its ident, which a
    new thread may reuse while the kernels of the old one are still queued.
    """
    if handle != 2:
        return (_same_stream(handle), None)
    token = getattr(_threads, "token", None)
    if token is None:
        token = _threads.token = object()
    return (handle, token)


def _scratch_for(device, handle: int, key: tuple, plan: Plan) -> Scratch:
    """The scratch of stream ``handle`` on ``device``, large enough for ``plan``.

    ``key`` is the stream's :func:`stream_key`. Made once per stream (and
    again if it must grow), then reused: calls on one stream run in order, so
    they never use it at once. Call with ``_lock`` held.
    """
    key = (device, *key)
    scratch = _scratch.get(key)
    if scratch is not None and (
        scratch.sums.shape[0] < plan.rows
        or scratch.ticket.shape[0] < plan.slots
        or scratch.addresses.shape[0] < plan.addresses
    ):
        _retire(scratch, (scratch.event,))
        scratch = None
    if scratch is None:
        stream = _numba_stream(handle)
        scratch = Scratch(
            stream=stream,
            sums=cuda.device_array((max(plan.rows, 1), _rule.SUMS), np.float64, stream=stream),
            ticket=cuda.to_device(np.zeros(max(plan.slots, 1), np.uint32), stream=stream),
            addresses=cuda.device_array(max(plan.addresses, 1), np.int64, stream=stream),
            nonfinite=cuda.to_device(_FINITE, stream=stream),
            event=_new_event(),
        )
        _scratch[key] = scratch
        if len(_scratch) > tunables.STREAMS_KEPT:
            _, evicted = _scratch.popitem(last=False)
            _retire(evicted, (evicted.event,))
    else:
        _scratch.move_to_end(key)
    return scratch


# -- plans ---------------------------------------------------------------------


class Group(NamedTuple):
    """The pairs that one launch of each kernel treats."""

    pairs: tuple[int, ...]  #: indices into the call's pairs, in slot order
    update: str  #: the name of the pairs' update, from their number of arrays
    #: zero-size arrays of the dtypes of a pair's arrays (as :func:`kernel_arrays`
    #: gives them) if the pairs are flat, 1-d views of unit stride; None for
    #: the one strided pair of a group
    likes: tuple | None
    chunks: object  #: int64 device array, a row per chunk (see ``CHUNK_COLUMNS``)
    base: int  #: the group's first row of the scratch sums
    first: int  #: the group's first row of the call's address table, if flat
    launchers: tuple[Launcher, Launcher]  #: of its sums kernel and its update kernel


class Plan(NamedTuple):
    """The launches of one kind of call on one stream and their chunk tables on the device.

    A plan serves one stream, the one its tables were copied on, so that no
    kernel on another stream can read them before the copy is done.
    """

    groups: tuple[Group, ...]
    #: scratch rows of the groups: each group's partial sums, then a total per
    #: slot, apart, so that every group's sums may be taken before any update
    rows: int
    slots: int  #: the pairs of the largest group: the tickets a call uses
    addresses: int  #: the elements of the call's address table
    #: the pairs of the address table's rows, in order; None if they are the
    #: call's pairs in their order
    flat_pairs: np.ndarray | None
    last_use: list  #: the event recorded after the plan's latest call, once it has had one
    #: the scratch of the plan's latest call, its address table and what
    #: :func:`_tables` gives for each group: the same objects while the
    #: scratch is, for the launchers
    tables: list
    strided: bool  #: whether a group is a strided pair


_plans: OrderedDict[tuple, Plan] = OrderedDict()
_empty: dict[tuple[object, np.dtype], object] = {}


def _empty_array(device, dtype):
    """A zero-size 1-d device array: a table's like, a zero-size pair's arrays, and
    "no rates"."""
    key = (device, np.dtype(dtype))
    array = _empty.get(key)
    if array is None:
        array = _empty[key] = cuda.device_array(0, dtype)
    return array


def kernel_arrays(arrays: tuple) -> tuple:
    """A pair's arrays, or their dtypes, as the kernels take them: two for
    ``scale``, four for a momentum step, whose three without a float16 copy
    are followed by the weights again (their update writes no copy)."""
    return (*arrays, arrays[0]) if len(arrays) == 3 else arrays


def _make_plan(layout, masks: np.ndarray, stream, device) -> Plan:
    """Group the pairs, ``layout[i] = (dtypes, size, flat)``, and cut them into chunks.

    Flat pairs of the same dtypes go :data:`lars_numba.tunables.GROUP_PAIRS`
    to a group, in their order; every other pair is a group of its own.
    """
    flat = [pair for pair, entry in enumerate(layout) if entry[2]]
    members = [
        ([flat[i] for i in group], True)
        for group in _layout.groups_by_dtype(
            (layout[pair][0] for pair in flat), tunables.GROUP_PAIRS
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
    rows = np.cumsum(
        [0] + [len(table) + len(pairs) for table, (pairs, _) in zip(tables, members, strict=True)]
    )
    firsts = np.cumsum([0] + [len(pairs) if is_flat else 0 for pairs, is_flat in members])
    chunks = cuda.to_device(
        np.array([row for table in tables for row in table], np.int64).reshape(
            -1, len(CHUNK_COLUMNS)
        ),
        stream=stream,
    )
    groups = []
    for i, (pairs, is_flat) in enumerate(members):
        dtypes = layout[pairs[0]][0]
        likes = None
        if is_flat:
            likes = tuple(_empty_array(device, dtype) for dtype in kernel_arrays(dtypes))
        groups.append(
            Group(
                pairs=tuple(pairs),
                update=UPDATE_OF_ARITY[len(dtypes)],
                likes=likes,
                chunks=chunks[bounds[i] : bounds[i + 1]],
                base=int(rows[i]),
                first=int(firsts[i]),
                launchers=(Launcher(), Launcher()),
            )
        )
    columns = len(kernel_arrays(layout[0][0]))
    flat_pairs = [pair for pairs, is_flat in members if is_flat for pair in pairs]
    in_order = flat_pairs == list(range(len(layout)))
    return Plan(
        groups=tuple(groups),
        rows=int(rows[-1]),
        slots=max(len(pairs) for pairs, _ in members),
        addresses=int(firsts[-1]) * columns,
        flat_pairs=None if in_order else np.array(flat_pairs, np.intp),
        last_use=[],
        tables=[None, None, ()],
        strided=len(flat_pairs) < len(layout),
    )


def _plan_for(key: tuple, layout, masks: np.ndarray, handle: int, device) -> Plan:
    """The plan for ``key`` from the cache, made and copied to the device on a miss.

    Call with ``_lock`` held.
    """
    if _plans:
        # The latest call's plan, which a training loop's calls mostly share, is
        # found by comparing keys, without hashing one: a key holds every pair's
        # layout, and hashing ResNet-50's twice took a tenth of a call.
        newest_key, newest = next(reversed(_plans.items()))
        if newest_key == key:
            return newest
    plan = _plans.pop(key, None) or _make_plan(layout, masks, _numba_stream(handle), device)
    _plans[key] = plan  # the most recently used last
    if len(_plans) > tunables.PLANS_KEPT:
        _, evicted = _plans.popitem(last=False)
        _retire(evicted, tuple(evicted.last_use))
    return plan


def reducing_launch(items: int, stream) -> tuple:
    """The launch configuration of a kernel that calls :func:`block_sums`."""
    blocks, threads = grid(items)
    return blocks, threads, stream, _rule.SUMS * threads * np.dtype(np.float64).itemsize


# -- drivers -------------------------------------------------------------------


def _views(columns, device) -> tuple[list, list, np.ndarray]:
    """The pairs' arrays, their ``(dtypes, size, flat)`` and the device addresses
    of their arrays as the kernels take them (see :func:`kernel_arrays`), a
    row per pair.

    ``columns[i]`` holds the arrays of pair ``i``, of one shape. A pair is flat
    if its arrays hold their elements in the same order in memory, one after
    the other: of one element, or all C-contiguous, or all F-contiguous. The
    kernels then reach them by their addresses alone (see
    :func:`slot_arrays`), so no view is made. A zero-size pair is the
    zero-size padding. Each field is read for all the arrays at once, by
    ``map``, not in a Python loop over the pairs, and each array once: the
    weights that kernel_arrays repeats are repeated in the addresses.
    """
    views = list(columns)
    mixed = len(set(map(len, views))) > 1  # a momentum step with masters for some pairs
    if mixed:
        views = list(map(kernel_arrays, views))
    sizes = [arrays[0].size for arrays in views]
    if 0 in sizes:
        for pair in [pair for pair, size in enumerate(sizes) if size == 0]:
            views[pair] = tuple(_empty_array(device, array.dtype) for array in views[pair])
    arrays = list(chain.from_iterable(views))
    width = len(views[0])  # now the same for every pair of the call
    flags = list(map(_FLAGS, arrays))
    if all(map(_C_CONTIGUOUS, flags)):  # the common case: no pass per pair
        flat = [True] * len(views)
    else:
        # In Python, not NumPy: a NumPy call's cost is a pair's, and scale has one.
        c_order, f_order = (
            map(all, zip(*[iter(map(order, flags))] * width, strict=True))
            for order in (_C_CONTIGUOUS, _F_CONTIGUOUS)
        )
        flat = [size <= 1 or c or f for size, c, f in zip(sizes, c_order, f_order, strict=True)]
    dtypes = list(zip(*[iter(map(_DTYPE, arrays))] * width, strict=True))
    if mixed:
        # Without the weights that kernel_arrays repeats.
        dtypes = [pair[: len(given)] for pair, given in zip(dtypes, columns, strict=True)]
    addresses = np.array(device_addresses(arrays), np.int64).reshape(-1, width)
    taken = kernel_arrays(tuple(range(width)))
    if len(taken) != width:
        addresses = addresses[:, taken]
    return views, list(zip(dtypes, sizes, flat, strict=True)), addresses


#: A device array's flags, read from its fields: a Numba device array's flags
#: property copies a dict, a third of the time of a pair's layout. (The
#: simulator's device arrays hold host arrays.)
_FLAGS = attrgetter("flags" if config.ENABLE_CUDASIM else "_dummy.flags")
_C_CONTIGUOUS, _F_CONTIGUOUS = itemgetter("C_CONTIGUOUS"), itemgetter("F_CONTIGUOUS")
_DTYPE = attrgetter("dtype")


def device_addresses(arrays: Iterable) -> list[int]:
    """The device address of each device array's element at index 0 (0 if it has
    none): its first in memory where its strides are positive."""
    if config.ENABLE_CUDASIM:  # the simulator's device arrays hold host arrays
        return [array._ary.ctypes.data for array in arrays]
    # What their device_ctypes_pointer holds, without the ctypes objects (a
    # quarter of the time). Numba gives every device array a pointer, a null
    # one where it has no elements.
    return list(map(int, map(_DEVICE_POINTER, arrays)))


_DEVICE_POINTER = attrgetter("gpu_data.device_pointer")


def _tables(plan: Plan, scratch: Scratch) -> tuple:
    """The plan's address table in ``scratch`` (None if no group is flat) and, for
    each group, the group, its arrays in the table (None for a strided group),
    its launch configuration on the scratch's stream and how to launch its two
    kernels: made once per scratch."""
    if plan.tables[0] is not scratch:
        flat = [group for group in plan.groups if group.likes is not None]
        table = None
        if flat:
            columns = len(flat[0].likes)
            table = scratch.addresses[: plan.addresses].reshape(plan.addresses // columns, columns)
        entries = tuple(
            (
                group,
                None
                if group.likes is None
                else (table[group.first : group.first + len(group.pairs)], group.likes),
                reducing_launch(len(group.chunks), scratch.stream),
                (_dispatch, _dispatch) if group.likes is None else group.launchers,
            )
            for group in plan.groups
        )
        plan.tables[:] = [scratch, table, entries]
    return plan.tables[1], plan.tables[2]


def _copy_addresses(plan: Plan, addresses: np.ndarray, table, stream) -> None:
    """Copy the rows of ``addresses`` (see :func:`_views`) of the flat groups'
    pairs, in the order of the plan's groups, to ``table`` on ``stream``."""
    # From pageable memory the copy has taken the rows when it returns; on
    # the stream it runs after the kernels queued before, which may still
    # read the previous call's table.
    _upload(table, addresses if plan.flat_pairs is None else addresses[plan.flat_pairs], stream)


def _upload(target, values: np.ndarray, stream) -> None:
    """Copy ``values`` to the contiguous device array ``target`` of their size on
    ``stream``: what numba-cuda's ``copy_to_device`` does, without the checks
    and views of both arrays that take it about 100 us on the host."""
    # The driver copies the bytes from the first element on.
    values = np.ascontiguousarray(values)
    driver.host_to_device(target, values, values.nbytes, stream=stream)


def _dispatch(dispatcher, launch: tuple, arguments: tuple) -> None:
    """A launch through ``dispatcher``: a strided group's, whose arrays are the
    caller's, not to be held by a :class:`Launcher`."""
    dispatcher[launch](*arguments)


def _launch(
    columns, hyper, masks, rates, streams: Streams, update: bool, skip=False, nonfinite=None
):
    """Enqueue the sums and, if ``update``, the update of every pair; no synchronization.

    ``columns[i]`` holds the arrays of pair ``i``: two for ``scale``, three
    or four for a momentum step (see :data:`UPDATE_OF_ARITY`). The launch
    stream first waits for the arrays' other streams. Every group's sums run
    before any update if ``skip``, and the updates do nothing if a gradient
    is not finite; ``nonfinite``, unless None, is the device flag that says
    so, reset by the call. Returns the launch stream and, unless ``update``,
    a host array that the stream fills with the first pair's totals.
    """
    device = cuda.get_current_device()
    with _lock:
        views, layout, addresses = _views(columns, device)
        stream = stream_key(streams.launch)
        key = (
            device,
            stream,
            tunables.GPU_CHUNK,
            tunables.GROUP_PAIRS,
            tuple(layout),
            masks.tobytes(),
        )
        plan = _plan_for(key, layout, masks, streams.launch, device)
        scratch = _scratch_for(device, streams.launch, stream, plan)
        for handle in streams.waits:
            produced = _new_event()
            produced.record(_numba_stream(handle))
            produced.wait(scratch.stream)
        flag = scratch.nonfinite if nonfinite is None else nonfinite
        if skip or nonfinite is not None:
            _upload(flag, _FINITE, scratch.stream)
        stored = _empty_array(device, np.float64) if rates is None else rates
        table, groups = _tables(plan, scratch)
        if table is not None:
            _copy_addresses(plan, addresses, table, scratch.stream)
        if plan.strided:
            # A strided group's kernels take its pair's arrays, this call's.
            groups = [
                (group, kernel_arrays(tuple(map(kernel_array, views[group.pairs[0]]))), *rest)
                if arrays is None
                else (group, arrays, *rest)
                for group, arrays, *rest in groups
            ]
        # With skip, every gradient's sums come before any update.
        for sums, updates in ((True, False), (False, update)) if skip else ((True, update),):
            for group, arrays, launch, (sums_launch, update_launch) in groups:
                if sums:
                    sums_launch(
                        sums_of_chunks,
                        launch,
                        sums_arguments(group, arrays, scratch, hyper, flag),
                    )
                if updates:
                    update_launch(
                        UPDATE_KERNELS[group.update],
                        launch[:3],
                        update_arguments(group, arrays, scratch, hyper, stored, flag, skip),
                    )
        totals = None
        if not update:
            group = plan.groups[0]
            total_row = group.base + group.chunks.shape[0]
            totals = scratch.sums[total_row].copy_to_host(stream=scratch.stream)
        scratch.event.record(scratch.stream)
        plan.last_use[:] = [scratch.event]
    return scratch.stream, totals


def sums_arguments(group: Group, arrays: tuple, scratch: Scratch, hyper, flag) -> tuple:
    """The arguments of :func:`sums_of_chunks` for ``group``, whose arrays are
    ``arrays`` (see :func:`_tables`)."""
    return (arrays, group.chunks, scratch.sums, group.base, scratch.ticket, hyper, flag)


def update_arguments(
    group: Group, arrays: tuple, scratch: Scratch, hyper, rates, flag, skip: bool
) -> tuple:
    """The arguments of ``group``'s update kernel (see :data:`UPDATE_KERNELS`)."""
    arguments = (arrays, group.chunks, scratch.sums, group.base, hyper, rates)
    return arguments if group.update == "scale" else (*arguments, flag, skip)


#: A flag's value before the sums: every gradient finite.
_FINITE = np.zeros(1, np.bool_)


def scale(w, g, hyper, streams: Streams) -> None:
    """Enqueue the scaling of ``g`` on ``streams.launch``; no synchronization.

    ``w`` and ``g`` are validated device arrays of one shape and dtype.
    """
    if w.size:
        _launch([(w, g)], hyper, _ALL_RULES, None, streams, update=True)


#: The masks of a pair that gets the whole rule.
_ALL_RULES = np.ones((1, 2), np.uint8)


def trust_ratio(w, g, hyper, streams: Streams) -> float:
    """The rate for two validated device arrays; waits for ``streams.launch``."""
    stream, totals = _launch([(w, g)], hyper, _ALL_RULES, None, streams, update=False)
    stream.synchronize()
    return _rule.rate_from_sums(tuple(float(value) for value in totals), hyper)


def scale_all(ws, gs, hyper, masks: np.ndarray, rates, streams: Streams) -> None:
    """Enqueue the scaling of every ``gs[i]`` on ``streams.launch``; no synchronization.

    ``ws[i]`` and ``gs[i]`` are validated device arrays of one shape and dtype,
    ``masks[i]`` whether pair ``i`` gets weight decay and its trust ratio
    (see :func:`lars_numba._api.pair_masks`); ``rates``, unless None, a
    float64 device array of length n that receives the rates.

    The chunk tables are copied to the device once per kind of call: they are
    cached under what they are made of (the device, the stream, each pair's
    dtypes, size and layout, the masks and the tunables), not under the
    arrays' addresses nor the hyperparameters, so that gradients allocated
    afresh at every step and a changing weight decay reuse them.
    """
    if ws:
        _launch(list(zip(ws, gs, strict=True)), hyper, masks, rates, streams, update=True)


def momentum_step(
    columns, hyper, masks: np.ndarray, rates, streams: Streams, skip: bool, nonfinite
) -> None:
    """Enqueue one momentum step of every pair on ``streams.launch``; no synchronization.

    ``columns[i]`` is ``(w, g, v)``, or ``(master, g, v, w)`` where pair ``i``
    has a float32 master, validated device arrays of one shape; ``masks`` and
    ``rates`` as for :func:`scale_all`. With ``skip``, nothing is written if
    a gradient is not finite. ``nonfinite``, unless None, is a bool device
    array of one element that receives whether a gradient was not finite.
    Two launches per group, as for :func:`scale_all`.
    """
    if columns:
        _launch(columns, hyper, masks, rates, streams, True, skip, nonfinite)


def device_bounds_of(arrays: list) -> np.ndarray:
    """The byte range ``[low, high)`` of each device array's elements, a row each."""
    lows = np.array(device_addresses(arrays), np.int64)
    bounds = np.stack([lows, lows + np.fromiter(map(_NBYTES, arrays), np.int64, len(arrays))], 1)
    # Right where the strides are positive, as they are in a contiguous array;
    # the others' ranges are found from their strides.
    flags = list(map(_FLAGS, arrays))
    if all(map(_C_CONTIGUOUS, flags)):  # the common case
        return bounds
    either = map(or_, map(_C_CONTIGUOUS, flags), map(_F_CONTIGUOUS, flags))
    for index in compress(range(len(arrays)), map(not_, either)):
        array = arrays[index]
        low = high = int(lows[index])
        if array.size:
            high += array.dtype.itemsize
            for extent, stride in zip(array.shape, array.strides, strict=True):
                reach = stride * (extent - 1)
                low, high = (low + reach, high) if reach < 0 else (low, high + reach)
        bounds[index] = low, high
    return bounds


_NBYTES = attrgetter("nbytes")
