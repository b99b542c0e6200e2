"""The CPU engine: a sums pass and an update pass over the arrays of N pairs.

The rule comes from :mod:`lars_numba._rule`, compiled here with ``numba.njit``;
the engine is compiled once per update of :data:`lars_numba._rule.UPDATES`,
whatever its number of arrays per pair. ``scale`` and ``trust_ratio`` are the
engine on one pair, ``scale_all`` on many; a pair whose arrays have no 1-d
views that pair their elements takes the n-d path, row by row, through the
same loops.

Every sum is accumulated in float64: a float16 sum of squares overflows past
65504 (300 squared is already 90000) and a float32 sum loses digits over
millions of terms, while a float64 accumulator costs nothing on a memory-bound
loop. The update is computed in float64 and rounded once to the array's dtype.

A pair's sums are taken in chunks of :data:`lars_numba.tunables.CPU_CHUNK`
elements and the chunks' sums added in chunk order, on every path, so that a
rate does not depend on the thread count nor on the other pairs of a call.

Numba has no float16 arithmetic on the CPU, so float16 arrays arrive here as
their ``uint16`` bit patterns, converted by LLVM's ``half`` type (the F16C
instructions on x86-64): exactly, and rounded once (see :func:`half_bits`).

Compile options, chosen once here for every kernel:

- ``fastmath={'reassoc', 'contract'}`` lets LLVM vectorize the reductions and
  fuse multiply-adds, but, unlike ``fastmath=True``, does not assume the
  absence of NaN and Inf, which must propagate as they do in Chainer. The
  update loops, which reduce nothing, take ``contract`` alone
  (``ELEMENTWISE_OPTIONS``), and the sums' loops neither (``STRICT_OPTIONS``),
  so that they add in one written order.
- ``error_model='numpy'``: a division by zero gives Inf or NaN, not an
  exception, again as in NumPy.
- ``nogil=True`` so that several Python threads can run kernels at once.
- ``cache=True`` so that a process pays the compile cost only once per machine;
  every kernel carries :data:`lars_numba._rule.SOURCE_DIGEST`, so that a change
  of the rule's file compiles them anew.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading

import numpy as np
from llvmlite import ir
from numba import carray, config, get_num_threads, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from . import _layout, _rule, tunables


def _load_tbb() -> None:
    """Make TBB's library findable, so that Numba picks its threading layer.

    Numba tries TBB first, but the ``tbb`` wheel puts ``libtbb.so.12`` in the
    environment's ``lib/``, off the loader's path. TBB's work-stealing pool
    lets the calling thread do a parallel loop's work when the other cores are
    busy; OpenMP's waits for every worker to be scheduled, and falls far
    behind the serial kernel beside a busy process (:doc:`/performance`,
    "Measurements behind the design"). A layer the user chose is left alone.
    """
    if config.THREADING_LAYER not in ("default", "tbb") or not sys.platform.startswith("linux"):
        return
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        library = os.path.join(prefix, "lib", "libtbb.so.12")
        if os.path.exists(library):
            try:
                ctypes.CDLL(library, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            return


_load_tbb()

OPTIONS = {
    "nogil": True,
    "error_model": "numpy",
    "fastmath": {"reassoc", "contract"},
}
KERNEL_OPTIONS = {"cache": True, **OPTIONS}

# Numba's ``workqueue`` threading layer aborts the process when two threads
# enter parallel kernels at once, so only one thread at a time may run them;
# the others take the serial kernels, which release the GIL too.
_parallel_slot = threading.Lock()


# -- float16 as uint16 bit patterns --------------------------------------------


@intrinsic
def half_bits(typingctx, bits):
    """The float64 value of the IEEE binary16 number whose bits are ``bits``: exact."""

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.DoubleType())

    return types.float64(types.uint16), codegen


@intrinsic
def single_to_half_bits(typingctx, value):
    """The bits of the float32 ``value`` rounded to binary16, ties to even."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


@intrinsic
def double_bits(typingctx, value):
    """The bits of a float64, as a uint64."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return types.uint64(types.float64), codegen


@intrinsic
def bits_double(typingctx, bits):
    """The float64 whose bits are the uint64 ``bits``."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.uint64), codegen


#: The 29 low bits of a float64's 52 fraction bits that float32 has no room for.
_BEYOND_SINGLE = np.uint64((1 << 29) - 1)
_STICKY = np.uint64(1 << 29)


@njit(inline="always", **OPTIONS)
def to_half_bits(value):
    """The bits of the float64 ``value`` rounded once to binary16, ties to even.

    Rounded first to float32's precision by rounding to odd: the bits float32
    has no room for are dropped and, if any was set, the last bit kept is
    set. Float32 then holds the value exactly, and as float32 has more than
    twice binary16's precision plus two bits, the hardware's rounding of it to
    binary16 gives what one rounding of ``value`` would; a plain rounding to
    float32 first would round twice. Integer operations on the float64's bits,
    which vectorize with the rest of the loop.
    """
    bits = double_bits(value)
    odd = (bits & ~_BEYOND_SINGLE) | (_STICKY if bits & _BEYOND_SINGLE else np.uint64(0))
    return single_to_half_bits(np.float32(bits_double(odd)))


def load(x):
    """An element of an input array, as float64."""


def store(value, array):
    """The float64 ``value`` rounded to what ``array`` holds, ready to assign."""


@overload(load, inline="always")
def _load(x):
    if x == types.uint16:
        return lambda x: half_bits(x)
    return lambda x: np.float64(x)


@overload(store, inline="always")
def _store(value, array):
    if array.dtype == types.uint16:
        return lambda value, array: to_half_bits(value)
    return lambda value, array: value


def copy_rounded(value, array):
    """The float32 ``value`` (a master's element, as stored) rounded once to what
    ``array`` holds, ready to assign."""


@overload(copy_rounded, inline="always")
def _copy_rounded(value, array):
    if array.dtype == types.uint16:
        return lambda value, array: single_to_half_bits(value)
    return lambda value, array: value


# -- the rule, compiled --------------------------------------------------------

rate_from_sums = njit(inline="always", **OPTIONS)(_rule.rate_from_sums)
masked = njit(inline="always", **OPTIONS)(_rule.masked)

#: The update loops reduce nothing, so they need no ``reassoc``; with it, LLVM
#: rewrites ``weight_decay / grad_scale * w`` as ``weight_decay * w / grad_scale``,
#: a division per element where the loop-invariant quotient was hoisted.
ELEMENTWISE_OPTIONS = {**OPTIONS, "fastmath": {"contract"}}

#: The updates, compiled, in the order of ``_rule.UPDATES``.
_UPDATES = tuple(
    njit(inline="always", **ELEMENTWISE_OPTIONS)(u.function) for u in _rule.UPDATES.values()
)
_UPDATE_SHAPES = tuple(_rule.UPDATES.values())
ZERO_SUMS = (0.0,) * _rule.SUMS

#: What a call of the engine does: both passes (the updates of small pairs
#: right after their sums); the sums pass alone, for the rates and whether
#: every gradient is finite; or the update pass alone, with rates found before.
BOTH, SUMS_ONLY, UPDATE_ONLY = 0, 1, 2


# -- rows of a pair's arrays: generated for any number of arrays ---------------


def _generated(name: str, arguments: str, body: str, scope: dict) -> object:
    """A function ``name(arguments)`` returning ``body``, for an overload's implementation."""
    namespace = dict(scope)
    exec(f"def {name}({arguments}):\n    return {body}\n", namespace)
    return namespace[name]


def add_sums(a, b):
    """``a + b`` element by element, for tuples of sums."""


@overload(add_sums, inline="always")
def _add_sums(a, b):
    body = ", ".join(f"a[{k}] + b[{k}]" for k in range(len(a)))
    return _generated("add", "a, b", f"({body},)", {})


def chunk_of(arrays, start, stop):
    """``(arrays[0][start:stop], arrays[1][start:stop], ...)``."""


@overload(chunk_of, inline="always")
def _chunk_of(arrays, start, stop):
    body = ", ".join(f"arrays[{k}][start:stop]" for k in range(len(arrays)))
    return _generated("chunk", "arrays, start, stop", f"({body},)", {})


def rows_at(arrays, index):
    """``(arrays[0][index], arrays[1][index], ...)``: 1-d rows of n-d arrays."""


@overload(rows_at, inline="always")
def _rows_at(arrays, index):
    body = ", ".join(f"arrays[{k}][index]" for k in range(len(arrays)))
    return _generated("rows", "arrays, index", f"({body},)", {})


def views_at(addresses, pair, size, likes):
    """The contiguous 1-d arrays of ``size`` elements at ``addresses[pair]``, one per
    array of ``likes``, of its dtype."""


@overload(views_at, inline="always")
def _views_at(addresses, pair, size, likes):
    body = ", ".join(
        f"carray(pointer(addresses[pair, {k}]), size, likes[{k}].dtype)" for k in range(len(likes))
    )
    return _generated(
        "views",
        "addresses, pair, size, likes",
        f"({body},)",
        {"carray": carray, "pointer": _layout.address_as_pointer},
    )


# -- the two loops every kernel is made of --------------------------------------


#: Elements a sum of the CPU engine takes in turn, each into an accumulator of
#: its own (lanes that the compiler packs into vector registers). Part of the
#: order of the additions, hence of the results, like ``tunables.CPU_CHUNK``.
LANES = 8

#: The sums' loops add in exactly the order they are written: without
#: ``reassoc`` and ``contract``, which let LLVM pick the order (an interleave
#: of the vectorized loop) afresh in every kernel that inlines the loop, so
#: that the kernels of ``scale`` and ``scale_all`` would differ by an ulp.
#: ``fastmath=False`` is explicit: left unset, Numba compiles a function
#: with the flags of the kernel that first calls it.
STRICT_OPTIONS = {"nogil": True, "error_model": "numpy", "fastmath": False}

# A function that Numba inlines brings its own flags along: the rule's terms,
# compiled strict for the sums' loops.
strict_norm_terms = njit(inline="always", **STRICT_OPTIONS)(_rule.norm_terms)


@intrinsic
def vector_lanes(typingctx, w, g, weight_decay, grad_scale, count):
    """Lane by lane, the sums of the first ``count`` terms of ``norm_terms`` over the
    whole blocks of ``LANES`` elements of the 1-d C-contiguous ``w`` and ``g``: a
    tuple of ``count * LANES``, sum by sum.

    The loop of ``_scalar_lanes`` written with LLVM's vector types, which
    Numba's loops do not reach without ``reassoc``: the same operations in the
    same order (the terms as ``_rule.norm_terms`` writes them), several times
    faster (:doc:`/performance`, "Measurements behind the design").
    """
    if not isinstance(count, types.IntegerLiteral):
        return None  # Numba asks again with the constant's value
    sums = count.literal_value

    def codegen(context, builder, signature, args):
        lanes = ir.VectorType(ir.DoubleType(), LANES)

        def block(array_type, array, start):
            element = context.get_data_type(array_type.dtype)
            pointer = builder.gep(
                context.make_array(array_type)(context, builder, array).data, [start]
            )
            value = builder.load(
                builder.bitcast(pointer, ir.PointerType(ir.VectorType(element, LANES))), align=1
            )
            if array_type.dtype == types.uint16:  # float16 as its bits
                value = builder.bitcast(value, ir.VectorType(ir.HalfType(), LANES))
            return value if array_type.dtype == types.float64 else builder.fpext(value, lanes)

        size = builder.extract_value(
            context.make_array(signature.args[0])(context, builder, args[0]).shape, 0
        )

        def broadcast(value):
            vector = builder.insert_element(
                ir.Constant(lanes, ir.Undefined), value, ir.Constant(ir.IntType(32), 0)
            )
            return builder.shuffle_vector(
                vector, vector, ir.Constant(ir.VectorType(ir.IntType(32), LANES), [0] * LANES)
            )

        decay = broadcast(args[2])
        scale = broadcast(args[3])
        totals = [
            cgutils.alloca_once_value(builder, ir.Constant(lanes, [0.0] * LANES))
            for _ in range(sums)
        ]
        blocks = builder.sdiv(size, ir.Constant(size.type, LANES))

        def loop_over_blocks(scaled: bool) -> None:
            with cgutils.for_range(builder, blocks) as loop:
                start = builder.mul(loop.index, ir.Constant(size.type, LANES))
                w_lanes = block(signature.args[0], args[0], start)
                g_lanes = block(signature.args[1], args[1], start)
                if scaled:
                    g_lanes = builder.fmul(scale, g_lanes)
                update = builder.fadd(g_lanes, builder.fmul(decay, w_lanes))
                terms = (
                    builder.fmul(w_lanes, w_lanes),
                    builder.fmul(g_lanes, g_lanes),
                    builder.fmul(update, update),
                )
                for total, term in zip(totals, terms, strict=False):
                    builder.store(builder.fadd(builder.load(total), term), total)

        # A gradient scale of 1 leaves every product as it is: the loop without
        # that multiply gives the same bits with one operation less an element.
        unscaled = builder.fcmp_ordered("==", args[3], ir.Constant(ir.DoubleType(), 1.0))
        with builder.if_else(unscaled) as (without_scale, with_scale):
            with without_scale:
                loop_over_blocks(scaled=False)
            with with_scale:
                loop_over_blocks(scaled=True)
        values = [
            builder.extract_element(builder.load(total), ir.Constant(ir.IntType(32), lane))
            for total in totals
            for lane in range(LANES)
        ]
        return context.make_tuple(builder, signature.return_type, values)

    signature = types.UniTuple(types.float64, sums * LANES)(w, g, weight_decay, grad_scale, count)
    return signature, codegen


def _scalar_lanes(count: int):
    """:func:`vector_lanes` for arrays of any stride, as scalar code."""
    lanes = [f"s{k}_{lane}" for k in range(count) for lane in range(LANES)]
    lines = [
        "def scalar_lanes(hyper, w, g):",
        f"    {' = '.join(lanes)} = 0.0",
        # From 0 and on slices: an index LLVM cannot prove non-negative keeps
        # the wrap-around of negative indices in the loop, which is much slower.
        f"    for block in range(w.shape[0] // {LANES}):",
        f"        start = block * {LANES}",
    ]
    for lane in range(LANES):
        lines.append(
            f"        t = norm_terms(hyper, load(w[start + {lane}]), load(g[start + {lane}]))"
        )
        lines += [f"        s{k}_{lane} += t[{k}]" for k in range(count)]
    lines.append(f"    return ({', '.join(lanes)},)")
    namespace = {"norm_terms": strict_norm_terms, "load": load}
    exec("\n".join(lines), namespace)
    return njit(**STRICT_OPTIONS)(namespace["scalar_lanes"])


_SCALAR_LANES = {count: _scalar_lanes(count) for count in (2, _rule.SUMS)}


def _lanes_tree(names: list[str]) -> str:
    """``names`` added up pairwise: ``((a + b) + (c + d))``."""
    while len(names) > 1:
        names = [f"({a} + {b})" for a, b in zip(names[::2], names[1::2], strict=True)]
    return names[0]


def _sums_loop(count: int):
    """The sums of the first ``count`` terms of ``norm_terms`` over 1-d ``w`` and
    ``g``: element ``i`` goes to lane ``i % LANES`` (the tail to lane 0), and
    the lanes are added up pairwise."""
    lanes = [[f"lanes[{k * LANES + lane}]" for lane in range(LANES)] for k in range(count)]
    trees = ", ".join(_lanes_tree([f"s{k}", *names[1:]]) for k, names in enumerate(lanes))
    lines = [
        "def sums_loop(hyper, w, g):",
        "    lanes = block_lanes(hyper, w, g)",
        *(f"    s{k} = lanes[{k * LANES}]" for k in range(count)),
        f"    tail = w.shape[0] // {LANES} * {LANES}",
        "    for i in range(w.shape[0] - tail):",
        "        t = norm_terms(hyper, load(w[tail + i]), load(g[tail + i]))",
        *(f"        s{k} += t[{k}]" for k in range(count)),
        f"    return ({trees},)",
    ]

    def block_lanes(hyper, w, g):
        """The lanes of the whole blocks, by vector code where both are contiguous."""

    @overload(block_lanes, inline="always", jit_options=STRICT_OPTIONS)
    def _block_lanes(hyper, w, g):
        if w.layout == "C" and g.layout == "C":
            return lambda hyper, w, g: vector_lanes(
                w, g, hyper[_rule.WEIGHT_DECAY], hyper[_rule.GRAD_SCALE], count
            )
        scalar = _SCALAR_LANES[count]
        return lambda hyper, w, g: scalar(hyper, w, g)

    namespace = {"norm_terms": strict_norm_terms, "load": load, "block_lanes": block_lanes}
    exec("\n".join(lines), namespace)
    return njit(**STRICT_OPTIONS)(namespace["sums_loop"])


_SUMS_OF_THE_SUM = _sums_loop(2)
_ALL_SUMS = _sums_loop(_rule.SUMS)


@njit(**OPTIONS)
def chunk_sums(hyper, w, g):
    """The sums of :func:`lars_numba._rule.norm_terms` over 1-d ``w`` and ``g``."""
    if hyper[_rule.DENOMINATOR]:
        return _ALL_SUMS(hyper, w, g)
    # The denominator "sum" needs the first two sums only: a loop that skips
    # the third's work (the first two come out the same in both loops).
    w_sq, g_sq = _SUMS_OF_THE_SUM(hyper, w, g)
    return (w_sq, g_sq, 0.0)


def update_chunk(arrays, rate, hyper, update):
    """Apply update number ``update`` (a constant) to each element of the 1-d ``arrays``."""


# Not inlined by Numba, which would compile the loop with the calling kernel's
# flags: LLVM inlines it later with its own.
@overload(update_chunk, jit_options=ELEMENTWISE_OPTIONS)
def _update_chunk(arrays, rate, hyper, update):
    if not isinstance(update, types.IntegerLiteral):
        return None  # Numba asks again with the constant's value
    number = update.literal_value
    shape = _UPDATE_SHAPES[number]
    stores = "".join(
        f"        arrays[{k}][i] = store(values[{k}], arrays[{k}])\n"
        for k, written in enumerate(shape.written)
        if written
    )
    if shape.rounded_copy:  # from the master as stored, not from its float64 value
        copy = len(shape.written)
        stores += f"        arrays[{copy}][i] = copy_rounded(arrays[0][i], arrays[{copy}])\n"
    loads = ", ".join(f"load(arrays[{k}][i])" for k in range(len(shape.written)))
    namespace = {
        "function": _UPDATES[number],
        "load": load,
        "store": store,
        "copy_rounded": copy_rounded,
    }
    exec(
        "def apply(arrays, rate, hyper, update):\n"
        "    for i in range(arrays[0].shape[0]):\n"
        f"        values = function(rate, hyper, {loads})\n" + stores,
        namespace,
    )
    return namespace["apply"]


# -- kernels ----------------------------------------------------------------
#
# Numba's cache keys a kernel by its bytecode and closure, not by its compile
# options, so each kernel is made by a function whose closure holds what
# tells the variants apart: the loop function (``prange``, or ``range`` when
# serial), the update's number and the rule's digest. Kernels call only
# module-level functions: a compiled function in a closure would defeat the
# cache.


def sums_row(partial, index):
    """Row ``index`` of a 2-d array of partial sums, as a tuple of sums."""


@overload(sums_row, inline="always")
def _sums_row(partial, index):
    body = ", ".join(f"partial[index, {k}]" for k in range(_rule.SUMS))
    return _generated("row", "partial, index", f"({body},)", {})


@njit(inline="always", **OPTIONS)
def store_sums(partial, index, sums):
    """``partial[index] <- sums``."""
    for k in range(len(sums)):
        partial[index, k] = sums[k]


# Compiled apart with STRICT_OPTIONS, so that the rows are added in row order
# whatever kernel calls it.
@njit(**STRICT_OPTIONS)
def total_in_order(partial, first, end):
    """The sum of the rows ``first:end`` of ``partial``, added in row order."""
    total = ZERO_SUMS
    for index in range(first, end):
        total = add_sums(total, sums_row(partial, index))
    return total


@njit(**STRICT_OPTIONS)
def add_in_order(total, sums):
    """``total + sums``, as written (see ``STRICT_OPTIONS``)."""
    return add_sums(total, sums)


def _pair_kernels(update: int, parallel: bool, apply: bool):
    """The kernels over one pair, serial or on all threads: its rate and, if ``apply``,
    update number ``update`` (without it, the arrays may be read-only).

    Each takes a ``stage`` (:data:`BOTH`, :data:`SUMS_ONLY`, :data:`UPDATE_ONLY`)
    and the rate to apply in the update pass alone, and returns the rate and
    whether the gradient's sum of squares is finite (true in the update pass
    alone, which takes no sums).
    """
    loop = prange if parallel else range
    digest = _rule.SOURCE_DIGEST

    @njit(parallel=parallel, **KERNEL_OPTIONS)
    def pair_rate(arrays, hyper, chunk, stage, rate):
        """The rate of the pair of 1-d ``arrays`` and, if ``apply``, the update.

        Both passes in one call, a chunk a task; a pair of one chunk is updated
        right after its sums, while it is in cache.
        """
        assert digest
        size = arrays[0].shape[0]
        chunks = max(1, -(-size // chunk))
        finite = True
        if chunks == 1:
            if stage != UPDATE_ONLY:
                sums = chunk_sums(hyper, arrays[0], arrays[1])
                rate = rate_from_sums(sums, hyper)
                finite = np.isfinite(sums[1])
            if apply and stage != SUMS_ONLY:
                update_chunk(arrays, rate, hyper, update)
            return rate, finite
        if stage != UPDATE_ONLY:
            partial = np.empty((chunks, len(ZERO_SUMS)))
            for index in loop(chunks):
                part = chunk_of(arrays, index * chunk, (index + 1) * chunk)
                store_sums(partial, index, chunk_sums(hyper, part[0], part[1]))
            total = total_in_order(partial, 0, chunks)
            rate = rate_from_sums(total, hyper)
            finite = np.isfinite(total[1])
        if apply and stage != SUMS_ONLY:
            for index in loop(chunks):
                part = chunk_of(arrays, index * chunk, (index + 1) * chunk)
                update_chunk(part, rate, hyper, update)
        return rate, finite

    @njit(**KERNEL_OPTIONS)
    def nd_rate(arrays, hyper, stage, rate):
        """:func:`pair_rate` for n-d arrays of any strides, row by row, on one thread."""
        assert digest
        finite = True
        if stage != UPDATE_ONLY:
            total = ZERO_SUMS
            for index in np.ndindex(arrays[0].shape[:-1]):
                rows = rows_at(arrays, index)
                total = add_in_order(total, chunk_sums(hyper, rows[0], rows[1]))
            rate = rate_from_sums(total, hyper)
            finite = np.isfinite(total[1])
        if apply and stage != SUMS_ONLY:
            for index in np.ndindex(arrays[0].shape[:-1]):
                update_chunk(rows_at(arrays, index), rate, hyper, update)
        return rate, finite

    return pair_rate, nd_rate


# -- many pairs in one call -----------------------------------------------------


@njit(**OPTIONS)
def balanced_splits(weights, tasks):
    """Where to cut ``weights`` into ``tasks`` runs of about equal sums, in order."""
    splits = np.empty(tasks + 1, np.int64)
    splits[0] = 0
    splits[tasks] = weights.shape[0]
    total = weights.sum()
    index = 0
    running = 0.0
    for task in range(1, tasks):
        while index < weights.shape[0] and running + weights[index] <= total * task / tasks:
            running += weights[index]
            index += 1
        splits[task] = index
    return splits


@njit(**OPTIONS)
def pair_batches(sizes, itemsize, batch_bytes):
    """Where to cut the pairs into runs of at most ``batch_bytes`` (a larger pair alone)."""
    ends = [0]
    bytes_in_batch = 0
    for pair in range(sizes.shape[0]):
        pair_bytes = 2 * itemsize * sizes[pair]
        if bytes_in_batch > 0 and bytes_in_batch + pair_bytes > batch_bytes:
            ends.append(pair)
            bytes_in_batch = 0
        bytes_in_batch += pair_bytes
    ends.append(sizes.shape[0])
    return np.array(ends)


def _many_pairs_kernel(update: int, parallel: bool):
    """The kernel of :func:`run_many` for update number ``update``, serial or threaded."""
    loop = prange if parallel else range
    digest = _rule.SOURCE_DIGEST

    @njit(parallel=parallel, **KERNEL_OPTIONS)
    def many_rates(addresses, sizes, hyper, masks, rates, likes, tasks, chunk, batch_bytes, stage):
        """Update each pair of contiguous arrays at ``addresses``, of ``likes``' dtypes.

        ``masks[pair]`` holds whether the pair gets weight decay and its trust
        ratio; ``rates[pair]`` receives its rate (or, in the update pass alone,
        holds it). The pairs go in batches of about ``batch_bytes``, each
        through both passes, and every pair is cut into chunks. A pair of one
        chunk is updated as soon as its sums are known, while it is still in a
        core's cache; the chunks of larger pairs are updated after their sums
        are added up, in chunk order, so that the result does not depend on
        the thread count. Each pass cuts the batch's chunks into ``tasks`` runs
        of about equal work, a run per thread: an even share of the chunks
        would not do, as they range from a handful of elements to ``chunk``.

        Returns whether every gradient's sum of squares is finite.
        """
        assert digest
        pairs = sizes.shape[0]
        first_chunk = np.zeros(pairs + 1, np.int64)
        for pair in range(pairs):
            first_chunk[pair + 1] = first_chunk[pair] + max(1, -(-sizes[pair] // chunk))
        chunks = first_chunk[pairs]
        chunk_pair = np.empty(chunks, np.int64)
        # Element passes over memory in the first loop, then in the last; a
        # chunk of no work in the last loop is updated in the first.
        first_work = np.empty(chunks)
        last_work = np.empty(chunks)
        for pair in range(pairs):
            whole = first_chunk[pair + 1] - first_chunk[pair] == 1 and stage == BOTH
            for index in range(first_chunk[pair], first_chunk[pair + 1]):
                chunk_pair[index] = pair
                elements = min(chunk, sizes[pair] - (index - first_chunk[pair]) * chunk)
                first_work[index] = (3 if whole else 2) * (elements + 1)
                last_work[index] = 0 if whole or stage == SUMS_ONLY else 3 * elements
        partial = np.empty((chunks, len(ZERO_SUMS)))
        finite = True

        batches = pair_batches(sizes, likes[0].itemsize, batch_bytes)
        for batch in range(batches.shape[0] - 1):
            top = first_chunk[batches[batch]]
            bottom = first_chunk[batches[batch + 1]]

            if stage != UPDATE_ONLY:
                splits = top + balanced_splits(first_work[top:bottom], tasks)
                for task in loop(tasks):
                    for index in range(splits[task], splits[task + 1]):
                        pair = chunk_pair[index]
                        start = (index - first_chunk[pair]) * chunk
                        views = views_at(addresses, pair, sizes[pair], likes)
                        part = chunk_of(views, start, start + chunk)
                        pair_hyper = masked(hyper, masks[pair, 0], masks[pair, 1])
                        sums = chunk_sums(pair_hyper, part[0], part[1])
                        if stage == BOTH and last_work[index] == 0:
                            rates[pair] = rate_from_sums(sums, pair_hyper)
                            update_chunk(part, rates[pair], pair_hyper, update)
                        store_sums(partial, index, sums)

                for pair in range(batches[batch], batches[batch + 1]):
                    sums = total_in_order(partial, first_chunk[pair], first_chunk[pair + 1])
                    finite = finite and np.isfinite(sums[1])
                    if stage != BOTH or first_chunk[pair + 1] - first_chunk[pair] > 1:
                        pair_hyper = masked(hyper, masks[pair, 0], masks[pair, 1])
                        rates[pair] = rate_from_sums(sums, pair_hyper)

            if stage != SUMS_ONLY:
                splits = top + balanced_splits(last_work[top:bottom], tasks)
                for task in loop(tasks):
                    for index in range(splits[task], splits[task + 1]):
                        if last_work[index] > 0:
                            pair = chunk_pair[index]
                            start = (index - first_chunk[pair]) * chunk
                            views = views_at(addresses, pair, sizes[pair], likes)
                            pair_hyper = masked(hyper, masks[pair, 0], masks[pair, 1])
                            part = chunk_of(views, start, start + chunk)
                            update_chunk(part, rates[pair], pair_hyper, update)
        return finite

    return many_rates


#: For each update, by name, and whether threaded: the kernels over one pair, with and
#: without the update, and the kernel over many pairs.
_KERNELS = {
    name: {
        parallel: (
            _pair_kernels(number, parallel, apply=True),
            _pair_kernels(number, parallel, apply=False),
            _many_pairs_kernel(number, parallel),
        )
        for parallel in (False, True)
    }
    for number, name in enumerate(_rule.UPDATES)
}


# -- drivers --------------------------------------------------------------------


def _threaded(parallel: bool, size: int) -> bool:
    """Whether a call over ``size`` elements takes the threaded kernels, which it then
    holds until it releases ``_parallel_slot``."""
    return parallel and size >= tunables.PARALLEL_MIN_SIZE and _parallel_slot.acquire(False)


#: The kernels over one pair by update and whether they update, serial then threaded.
_PAIR_KERNELS = {
    (name, apply): (kernels[False][1 - apply], kernels[True][1 - apply])
    for name, kernels in _KERNELS.items()
    for apply in (True, False)
}


def pair_rate(
    arrays: tuple,
    hyper,
    apply: bool,
    parallel: bool,
    update: str = "scale",
    stage: int = BOTH,
    rate: float = 1.0,
) -> tuple[float, bool]:
    """The rate of one validated pair (float16 as bit patterns) and, if ``apply``, its
    update; and whether the gradient's sum of squares is finite.

    ``arrays`` are the arrays of update ``update``, of one shape, starting
    with the weights and the gradient; ``stage`` and ``rate`` are as for the
    kernels of :func:`_pair_kernels`.
    """
    serial, threaded = _PAIR_KERNELS[update, apply]
    flat = _layout.flat_views(*arrays)
    if flat is None:
        return serial[1](arrays, hyper, stage, rate)
    # _threaded inline: this is the path of every small call.
    if (
        parallel
        and flat[0].shape[0] >= tunables.PARALLEL_MIN_SIZE
        and _parallel_slot.acquire(False)
    ):
        try:
            return threaded[0](flat, hyper, tunables.CPU_CHUNK, stage, rate)
        finally:
            _parallel_slot.release()
    return serial[0](flat, hyper, tunables.CPU_CHUNK, stage, rate)


#: A zero-size array of what the kernels take for each itemsize: float16 as bits.
EMPTY_OF_ITEMSIZE = {2: np.empty(0, np.uint16), 4: np.empty(0, np.float32), 8: np.empty(0)}


def run_many(
    update: str,
    addresses: np.ndarray,
    sizes: np.ndarray,
    likes: tuple,
    hyper,
    masks: np.ndarray,
    rates: np.ndarray,
    parallel: bool,
    stage: int = BOTH,
) -> bool:
    """One call of the many-pairs kernel of ``update`` on contiguous validated pairs.

    ``addresses[i]`` holds the addresses of pair ``i``'s arrays, ``likes``
    an empty array of each one's kernel dtype; ``rates`` (float64, one per
    pair) receives the rates or, for :data:`UPDATE_ONLY`, holds them. Returns
    whether every gradient's sum of squares is finite.
    """
    threaded = _threaded(parallel, int(sizes.sum()))
    try:
        return _KERNELS[update][threaded][2](
            addresses,
            sizes,
            hyper,
            masks,
            rates,
            likes,
            get_num_threads() if threaded else 1,
            tunables.CPU_CHUNK,
            tunables.CPU_BATCH_BYTES,
            stage,
        )
    finally:
        if threaded:
            _parallel_slot.release()


def scale_many(ws, gs, layout, hyper, masks, rates, parallel: bool = True) -> None:
    """Scale every ``gs[i]`` in place by its rate, written to ``rates[i]``.

    ``ws`` and ``gs`` are validated pairs that overlap no other pair, ``layout``
    their rows of :func:`lars_numba._layout.pair_layout` and ``masks[i]``
    whether pair ``i`` gets weight decay and its trust ratio. The contiguous
    pairs of each dtype take one call of the many-pairs kernel; the rare
    strided ones go through :func:`pair_rate` one by one.
    """
    contiguous = layout[:, _layout.CONTIGUOUS].astype(bool)
    itemsizes = layout[:, _layout.ITEMSIZE]
    for itemsize in np.unique(itemsizes[contiguous]):
        members = np.flatnonzero(contiguous & (itemsizes == itemsize))
        group_rates = np.empty(members.size)
        like = EMPTY_OF_ITEMSIZE[int(itemsize)]
        run_many(
            "scale",
            layout[members][:, [_layout.W_LOW, _layout.G_LOW]],
            layout[members, _layout.SIZE],
            (like, like),
            hyper,
            masks[members],
            group_rates,
            parallel,
        )
        rates[members] = group_rates
    for i in np.flatnonzero(~contiguous):
        pair = (_layout.kernel_view(ws[i]), _layout.kernel_view(gs[i]))
        rates[i] = pair_rate(pair, _rule.masked(hyper, *masks[i]), True, parallel)[0]


#: A zero-size array of what the kernels take for each kind of
#: :func:`lars_numba._layout.array_rows`: float16 as bits, float32, float64.
_EMPTY_OF_KIND = (EMPTY_OF_ITEMSIZE[2], EMPTY_OF_ITEMSIZE[4], EMPTY_OF_ITEMSIZE[8])


def momentum_many(
    columns: dict,
    rows: dict,
    with_master: np.ndarray,
    hyper,
    masks: np.ndarray,
    rates: np.ndarray,
    skip_nonfinite: bool,
    parallel: bool,
) -> bool:
    """One momentum step of every validated pair; whether it was taken.

    ``columns`` holds the lists ``ws``, ``gs``, ``vs`` and, if some pairs
    have one, ``masters`` (of those pairs only, in order), ``rows`` their
    rows of :func:`lars_numba._layout.array_rows`, ``with_master`` which pairs
    have a master, and ``rates`` receives the rates. The contiguous pairs of
    each combination of dtypes take one call of the many-pairs kernel (see
    :func:`momentum_calls`); the rare strided ones go through
    :func:`pair_rate` one by one.
    """
    calls, contiguous, _ = momentum_calls(rows, with_master, masks)
    masters: list = [None] * len(columns["ws"])
    for pair, master in zip(np.flatnonzero(with_master), columns.get("masters", ()), strict=True):
        masters[pair] = master
    strided = []
    for pair in np.flatnonzero(~contiguous):
        w, g, v = (columns[name][pair] for name in ("ws", "gs", "vs"))
        arrays = (w, g, v) if masters[pair] is None else (masters[pair], g, v, w)
        strided.append(
            (
                "momentum_master" if masters[pair] is not None else "momentum",
                tuple(map(_layout.kernel_view, arrays)),
                _rule.masked(hyper, *masks[pair]),
                pair,
            )
        )
    return run_momentum(calls, strided, hyper, rates, skip_nonfinite, parallel)


#: The column of the gradients' addresses in a call of :func:`momentum_calls`.
GRADIENTS = 1


def momentum_calls(
    rows: dict, with_master: np.ndarray, masks: np.ndarray
) -> tuple[list, np.ndarray, np.ndarray]:
    """The calls of the many-pairs kernel for the contiguous pairs of a momentum step,
    which pairs are contiguous, and the flags that each pair's arrays other than
    the gradient share.

    ``rows`` holds the rows of ``ws``, ``gs``, ``vs`` and ``masters`` as for
    :func:`momentum_many`. A call is ``(update, addresses, sizes, likes,
    masks, members)``, for the pairs ``members`` of one combination of
    dtypes; ``addresses[i]`` holds the addresses of the weights (or the
    master), the gradient (column :data:`GRADIENTS`), the velocity and, with
    a master, the weights.
    """
    w_rows = rows["ws"]
    first = w_rows.copy()  # the rows of the arrays the rule reads as the weights
    first[np.flatnonzero(with_master)] = rows.get("masters", first[:0])
    ordered = (first, rows["gs"], rows["vs"], w_rows)
    shared = first[:, _layout.FLAGS] & rows["vs"][:, _layout.FLAGS] & w_rows[:, _layout.FLAGS]
    both = shared & rows["gs"][:, _layout.FLAGS]
    contiguous = both & (_layout.C_CONTIGUOUS | _layout.F_CONTIGUOUS) != 0
    kinds = np.column_stack([r[:, _layout.KIND] for r in ordered[:3]])
    keys = with_master * 64 + kinds @ np.array([16, 4, 1])
    addresses = np.column_stack([r[:, _layout.LOW] for r in ordered])
    sizes = w_rows[:, _layout.ARRAY_SIZE]
    calls = []
    for key in np.unique(keys[contiguous]):
        members = np.flatnonzero(contiguous & (keys == key))
        master = bool(key // 64)
        likes = tuple(_EMPTY_OF_KIND[kind] for kind in kinds[members[0]])
        if master:
            likes = (*likes, _EMPTY_OF_KIND[w_rows[members[0], _layout.KIND]])
        arity = len(likes)
        calls.append(
            (
                "momentum_master" if master else "momentum",
                np.ascontiguousarray(addresses[members, :arity]),
                sizes[members],
                likes,
                masks[members],
                members,
            )
        )
    return calls, contiguous, shared


def run_momentum(
    calls: list, strided: list, hyper, rates: np.ndarray, skip_nonfinite: bool, parallel: bool
) -> bool:
    """The step of :func:`momentum_calls`' ``calls`` and of the ``strided`` pairs;
    whether it was taken. With ``skip_nonfinite``, every pair's sums are taken
    first and the update pass runs only if every gradient's sum of squares is
    finite."""

    def run(stage: int) -> bool:
        finite = True
        for update, group_addresses, group_sizes, likes, group_masks, members in calls:
            group_rates = np.ascontiguousarray(rates[members])
            finite &= run_many(
                update,
                group_addresses,
                group_sizes,
                likes,
                hyper,
                group_masks,
                group_rates,
                parallel,
                stage,
            )
            rates[members] = group_rates
        for update, arrays, pair_hyper, pair in strided:
            rates[pair], pair_finite = pair_rate(
                arrays, pair_hyper, True, parallel, update, stage, rates[pair]
            )
            finite &= pair_finite
        return finite

    if not skip_nonfinite:
        run(BOTH)
        return True
    if not run(SUMS_ONLY):
        return False
    run(UPDATE_ONLY)
    return True
