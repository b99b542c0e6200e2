"""CPU kernels for LARS, compiled with ``numba.njit``.

Every kernel accumulates in float64: a float16 sum of squares overflows past
65504 (300 squared is already 90000) and a float32 sum loses digits over
millions of terms, while a float64 accumulator costs nothing on a memory-bound
loop. The update is computed in float64 and rounded once to the array's dtype.

Numba has no float16 arithmetic on the CPU, so float16 arrays arrive here as
their ``uint16`` bit patterns and ``load``/``encode`` convert them exactly
(round half to even, like NumPy's ``astype``).

Compile options, chosen once here for every kernel:

- ``fastmath={'reassoc', 'contract'}`` lets LLVM vectorize the reductions and
  fuse multiply-adds, but, unlike ``fastmath=True``, does not assume the
  absence of NaN and Inf, which must propagate as they do in Chainer.
- ``error_model='numpy'``: a division by zero gives Inf or NaN, not an
  exception, again as in NumPy.
- ``nogil=True`` so that several Python threads can run kernels at once.
- ``cache=True`` so that a process pays the compile cost only once per machine.
"""

import math
import threading

import numpy as np
from numba import carray, get_num_threads, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

_OPTIONS = {
    "cache": True,
    "nogil": True,
    "error_model": "numpy",
    "fastmath": {"reassoc", "contract"},
}

#: Arrays with fewer elements than this run serially: below it, waking the
#: thread pool costs more than it saves (measured by ``python -m lars_numba.bench
#: --cutoff``; see the README).
PARALLEL_MIN_SIZE = 1 << 16

# Numba's default ``workqueue`` threading layer aborts the process when two
# threads enter parallel kernels at once, so only one thread at a time may
# run them; the others take the serial kernels, which release the GIL too.
_parallel_slot = threading.Lock()


# -- float16 as uint16 bit patterns --------------------------------------------


@njit(**_OPTIONS)
def half_bits_to_float(bits):
    """The float64 value of the IEEE binary16 number whose bits are ``bits``."""
    exponent = (bits >> 10) & 0x1F
    mantissa = bits & 0x3FF
    if exponent == 0x1F:
        value = np.inf if mantissa == 0 else np.nan
    elif exponent == 0:
        value = math.ldexp(float(mantissa), -24)
    else:
        value = math.ldexp(float(mantissa | 0x400), int(exponent) - 25)
    return -value if bits & 0x8000 else value


@njit(**_OPTIONS)
def float_to_half_bits(value):
    """The bits of ``value`` rounded to the nearest binary16, ties to even."""
    sign = 0x8000 if math.copysign(1.0, value) < 0 else 0
    magnitude = abs(value)
    if magnitude != magnitude:
        return np.uint16(sign | 0x7E00)
    # Quantize on the binary16 grid around ``magnitude``: 10 fraction bits in
    # the normal range, a fixed step of 2**-24 in the subnormal range. Scaling
    # by a power of two is exact, so ``rint`` rounds exactly once, ties to even.
    if magnitude >= 2.0**-14:
        step_exponent = math.frexp(magnitude)[1] - 11
    else:
        step_exponent = -24
    if step_exponent > 5:  # 65536 and above, Inf included
        return np.uint16(sign | 0x7C00)
    steps = np.rint(math.ldexp(magnitude, -step_exponent))
    rounded = math.ldexp(steps, step_exponent)
    if rounded >= 65536.0:  # rounded up past the largest finite binary16
        return np.uint16(sign | 0x7C00)
    if rounded < 2.0**-14:
        return np.uint16(sign | int(steps))
    fraction, exponent = math.frexp(rounded)  # rounded = fraction * 2**exponent
    mantissa = int(math.ldexp(fraction, 11)) - 0x400
    return np.uint16(sign | ((exponent + 14) << 10) | mantissa)


def load(x):
    """An element of an input array, as float64."""


def encode(value, array):
    """The float64 ``value`` rounded to what ``array`` holds, ready to assign."""


@overload(load, inline="always")
def _load(x):
    if x == types.uint16:
        return lambda x: half_bits_to_float(x)
    return lambda x: np.float64(x)


@overload(encode, inline="always")
def _encode(value, array):
    if array.dtype == types.uint16:
        return lambda value, array: float_to_half_bits(value)
    return lambda value, array: value


# -- the scalar rule -----------------------------------------------------------
#
# ``hyper`` is the tuple ``_api.HYPERPARAMETERS`` describes: a LARS variant
# adds an entry there and a branch here, and every kernel carries it unchanged.


@njit(**_OPTIONS)
def rate_from_sums(w_sq, g_sq, hyper):
    """``||w|| / (eps + ||g|| + weight_decay * ||w||)`` if ``||w|| > threshold`` else 1."""
    threshold, weight_decay, eps = hyper
    w_norm = math.sqrt(w_sq)
    if w_norm > threshold:
        return w_norm / (eps + math.sqrt(g_sq) + weight_decay * w_norm)
    return 1.0


@njit(inline="always", **_OPTIONS)
def weight_decay_of(hyper):
    """The weight decay in ``hyper``."""
    return hyper[1]


# -- loops over 1-d views -------------------------------------------------------
#
# Every 1-d kernel below is made of these two loops, so that the serial,
# parallel and many-array kernels compute alike.


@njit(**_OPTIONS)
def sum_squares_pair(w, g):
    """``(sum w[i]**2, sum g[i]**2)`` for 1-d ``w`` and ``g``."""
    w_sq = 0.0
    g_sq = 0.0
    # Loops start at 0 and callers pass slices: from an index LLVM cannot
    # prove non-negative, the wrap-around of negative indices stays in the
    # loop and stops it from being vectorized (5 times slower, measured).
    for i in range(w.shape[0]):
        w_value = load(w[i])
        g_value = load(g[i])
        w_sq += w_value * w_value
        g_sq += g_value * g_value
    return w_sq, g_sq


@njit(**_OPTIONS)
def apply_rate_pair(w, g, rate, weight_decay):
    """``g[i] <- rate * (g[i] + weight_decay * w[i])`` for 1-d ``w`` and ``g``."""
    for i in range(w.shape[0]):
        g[i] = encode(rate * (load(g[i]) + weight_decay * load(w[i])), g)


#: Elements per task of the parallel and many-array kernels: large enough that
#: a task outlasts its scheduling, small enough that a pair of float32 chunks
#: (512 KiB) stays in a core's L2 cache between the two passes.
CHUNK_SIZE = 1 << 16


@njit(inline="always", **_OPTIONS)
def chunk_count(size):
    """The number of chunks of ``CHUNK_SIZE`` that cover ``size`` elements, at least one."""
    return max(1, -(-size // CHUNK_SIZE))


@njit(inline="always", **_OPTIONS)
def chunk_of(w, g, chunk):
    """The ``chunk``-th slices of ``CHUNK_SIZE`` elements of 1-d ``w`` and ``g``."""
    start = chunk * CHUNK_SIZE
    return w[start : start + CHUNK_SIZE], g[start : start + CHUNK_SIZE]


# -- kernels over one pair of 1-d views ----------------------------------------


@njit(**_OPTIONS)
def trust_ratio_flat(w, g, hyper):
    """The rate for 1-d ``w`` and ``g``: both sums of squares in one pass."""
    return rate_from_sums(*sum_squares_pair(w, g), hyper)


@njit(**_OPTIONS)
def apply_rate_flat(w, g, rate, hyper):
    """``g <- rate * (g + weight_decay * w)`` for 1-d ``w`` and ``g``."""
    apply_rate_pair(w, g, rate, weight_decay_of(hyper))


@njit(**_OPTIONS)
def scale_flat(w, g, hyper):
    """Both passes over 1-d ``w`` and ``g`` in one call; returns the rate."""
    rate = trust_ratio_flat(w, g, hyper)
    apply_rate_flat(w, g, rate, hyper)
    return rate


@njit(parallel=True, **_OPTIONS)
def trust_ratio_flat_parallel(w, g, hyper):
    """:func:`trust_ratio_flat` with a chunk per task on all threads."""
    size = w.shape[0]
    w_sq = 0.0
    g_sq = 0.0
    for chunk in prange(chunk_count(size)):
        chunk_w_sq, chunk_g_sq = sum_squares_pair(*chunk_of(w, g, chunk))
        w_sq += chunk_w_sq
        g_sq += chunk_g_sq
    return rate_from_sums(w_sq, g_sq, hyper)


@njit(parallel=True, **_OPTIONS)
def apply_rate_flat_parallel(w, g, rate, hyper):
    """:func:`apply_rate_flat` with a chunk per task on all threads."""
    size = w.shape[0]
    weight_decay = weight_decay_of(hyper)
    for chunk in prange(chunk_count(size)):
        apply_rate_pair(*chunk_of(w, g, chunk), rate, weight_decay)


# -- many pairs in one call ----------------------------------------------------


@intrinsic
def address_as_pointer(typingctx, address):
    """The integer ``address`` as a ``void *``, for :func:`numba.carray`."""

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(types.intp), codegen


@njit(inline="always", **_OPTIONS)
def hyper_row(table, pair):
    """Row ``pair`` of a table of hyperparameters, as the tuple the rate rule takes."""
    return table[pair, 0], table[pair, 1], table[pair, 2]


@njit(**_OPTIONS)
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


@njit(inline="always", **_OPTIONS)
def chunk_at(w_addresses, g_addresses, sizes, pair, chunk, like):
    """Chunk ``chunk`` of pair ``pair`` of the contiguous 1-d arrays at the addresses."""
    w = carray(address_as_pointer(w_addresses[pair]), sizes[pair], like.dtype)
    g = carray(address_as_pointer(g_addresses[pair]), sizes[pair], like.dtype)
    return chunk_of(w, g, chunk)


#: Bytes of ``w`` and ``g`` that :func:`scale_many_flat` takes through both
#: passes before it moves on: half of a 32 MiB last-level cache, so that the
#: second pass finds them there, as it does for one array of that size.
BATCH_BYTES = 16 << 20


@njit(**_OPTIONS)
def pair_batches(sizes, itemsize):
    """Where to cut the pairs into runs of at most ``BATCH_BYTES`` (a larger pair alone)."""
    ends = [0]
    bytes_in_batch = 0
    for pair in range(sizes.shape[0]):
        pair_bytes = 2 * itemsize * sizes[pair]
        if bytes_in_batch > 0 and bytes_in_batch + pair_bytes > BATCH_BYTES:
            ends.append(pair)
            bytes_in_batch = 0
        bytes_in_batch += pair_bytes
    ends.append(sizes.shape[0])
    return np.array(ends)


def _many_pairs_kernel(parallel: bool):
    """The kernel of :func:`scale_many`, serial or on all threads.

    ``prange`` is ``range`` when ``parallel`` is off; Numba's cache keys a
    function by its bytecode and closure, not by its compile options, so the
    loop function is a closure variable to keep the two variants apart.
    """
    loop = prange if parallel else range

    @njit(parallel=parallel, **_OPTIONS)
    def scale_many_flat(w_addresses, g_addresses, sizes, table, rates, like, tasks):
        """Scale each pair of contiguous arrays at the addresses, of ``like``'s dtype.

        The pairs go in batches of about ``BATCH_BYTES``, each through both
        passes, and every pair is cut into chunks. A pair of one chunk is
        scaled as soon as its sums are known, while it is still in a core's
        cache; the chunks of larger pairs are scaled after their partial sums
        are added up, in chunk order, so that the result does not depend on
        the thread count. Each pass cuts the batch's chunks into
        ``tasks`` runs of about equal work, a run per thread: an even share of
        the chunks would not do, as they range from a handful of elements to
        ``CHUNK_SIZE``.
        """
        pairs = sizes.shape[0]
        first_chunk = np.zeros(pairs + 1, np.int64)
        for pair in range(pairs):
            first_chunk[pair + 1] = first_chunk[pair] + chunk_count(sizes[pair])
        chunks = first_chunk[pairs]
        chunk_pair = np.empty(chunks, np.int64)
        # Element passes over memory in the first loop, then in the last.
        first_work = np.empty(chunks)
        last_work = np.empty(chunks)
        for pair in range(pairs):
            whole = first_chunk[pair + 1] - first_chunk[pair] == 1
            for chunk in range(first_chunk[pair], first_chunk[pair + 1]):
                chunk_pair[chunk] = pair
                elements = min(CHUNK_SIZE, sizes[pair] - (chunk - first_chunk[pair]) * CHUNK_SIZE)
                first_work[chunk] = (3 if whole else 2) * (elements + 1)
                last_work[chunk] = 0 if whole else 3 * elements
        partial_sums = np.empty((chunks, 2))

        batches = pair_batches(sizes, like.itemsize)
        for batch in range(batches.shape[0] - 1):
            top = first_chunk[batches[batch]]
            bottom = first_chunk[batches[batch + 1]]

            splits = top + balanced_splits(first_work[top:bottom], tasks)
            for task in loop(tasks):
                for chunk in range(splits[task], splits[task + 1]):
                    pair = chunk_pair[chunk]
                    w_chunk, g_chunk = chunk_at(
                        w_addresses, g_addresses, sizes, pair, chunk - first_chunk[pair], like
                    )
                    w_sq, g_sq = sum_squares_pair(w_chunk, g_chunk)
                    if last_work[chunk] == 0:
                        hyper = hyper_row(table, pair)
                        rates[pair] = rate_from_sums(w_sq, g_sq, hyper)
                        apply_rate_pair(w_chunk, g_chunk, rates[pair], weight_decay_of(hyper))
                    partial_sums[chunk, 0] = w_sq
                    partial_sums[chunk, 1] = g_sq

            for pair in range(batches[batch], batches[batch + 1]):
                if first_chunk[pair + 1] - first_chunk[pair] > 1:
                    w_sq = 0.0
                    g_sq = 0.0
                    for chunk in range(first_chunk[pair], first_chunk[pair + 1]):
                        w_sq += partial_sums[chunk, 0]
                        g_sq += partial_sums[chunk, 1]
                    rates[pair] = rate_from_sums(w_sq, g_sq, hyper_row(table, pair))

            splits = top + balanced_splits(last_work[top:bottom], tasks)
            for task in loop(tasks):
                for chunk in range(splits[task], splits[task + 1]):
                    if last_work[chunk] > 0:
                        pair = chunk_pair[chunk]
                        w_chunk, g_chunk = chunk_at(
                            w_addresses, g_addresses, sizes, pair, chunk - first_chunk[pair], like
                        )
                        weight_decay = weight_decay_of(hyper_row(table, pair))
                        apply_rate_pair(w_chunk, g_chunk, rates[pair], weight_decay)

    return scale_many_flat


scale_many_flat = _many_pairs_kernel(parallel=False)
scale_many_flat_parallel = _many_pairs_kernel(parallel=True)


@njit(**_OPTIONS)
def memory_bounds(array):
    """The byte range ``[low, high)`` that the elements of ``array`` lie in."""
    low = array.ctypes.data
    if array.size == 0:
        return low, low
    high = low + array.itemsize
    for axis in range(array.ndim):
        reach = array.strides[axis] * (array.shape[axis] - 1)
        if reach < 0:
            low += reach
        else:
            high += reach
    return low, high


#: The columns of :func:`pair_layout`'s rows.
LAYOUT_COLUMNS = range(6)
W_LOW, W_HIGH, G_LOW, G_HIGH, SIZE, CONTIGUOUS = LAYOUT_COLUMNS


@njit(**_OPTIONS)
def pair_layout(w, g):
    """What :func:`scale_many` needs of a pair, in one call: the byte ranges of
    ``w`` and ``g``, their size, and whether they are contiguous in one order."""
    w_low, w_high = memory_bounds(w)
    g_low, g_high = memory_bounds(g)
    contiguous = (w.flags.c_contiguous and g.flags.c_contiguous) or (
        w.flags.f_contiguous and g.flags.f_contiguous
    )
    return w_low, w_high, g_low, g_high, w.size, int(contiguous)


@njit(**_OPTIONS)
def first_overlap(lows, highs, owners, written):
    """The first two byte ranges ``[low, high)`` that overlap, of different owners,
    at least one of them written; ``(-1, -1)`` if there are none.

    Ranges that are written must not overlap anything else; ranges that are
    only read may overlap each other. A sweep in order of ``low`` that keeps
    the last written range (written ranges are disjoint until one is found
    that is not) and the read ranges of two different owners that reach
    furthest: O(n log n) for n ranges.
    """
    last_written = -1
    furthest_read = -1  # the read range that reaches furthest
    second_read = -1  # the one reaching furthest of another owner than furthest_read
    for index in np.argsort(lows, kind="mergesort"):
        if highs[index] <= lows[index]:
            continue  # empty
        low = lows[index]
        owner = owners[index]
        if last_written >= 0 and low < highs[last_written] and owners[last_written] != owner:
            return last_written, index
        if written[index]:
            for read in (furthest_read, second_read):
                if read >= 0 and low < highs[read] and owners[read] != owner:
                    return read, index
            last_written = index
        elif furthest_read < 0 or highs[index] >= highs[furthest_read]:
            if furthest_read >= 0 and owners[furthest_read] != owner:
                second_read = furthest_read
            furthest_read = index
        elif owner != owners[furthest_read] and (
            second_read < 0 or highs[index] > highs[second_read]
        ):
            second_read = index
    return -1, -1


# -- kernels over n-d arrays whose layouts do not flatten alike ----------------


@njit(**_OPTIONS)
def trust_ratio_nd(w, g, hyper):
    """:func:`trust_ratio_flat` for n-d arrays of any strides."""
    w_sq = 0.0
    g_sq = 0.0
    for wi, gi in np.nditer((w, g)):
        w_value = load(wi.item())
        g_value = load(gi.item())
        w_sq += w_value * w_value
        g_sq += g_value * g_value
    return rate_from_sums(w_sq, g_sq, hyper)


@njit(**_OPTIONS)
def apply_rate_nd(w, g, rate, hyper):
    """:func:`apply_rate_flat` for n-d arrays of any strides."""
    weight_decay = weight_decay_of(hyper)
    for wi, gi in np.nditer((w, g)):
        gi[()] = encode(rate * (load(gi.item()) + weight_decay * load(wi.item())), gi)


# -- drivers: pick the kernel for the arrays' size and layout ------------------


def flat_views(w, g):
    """1-d views of ``w`` and ``g`` that pair the same elements, or ``None``."""
    if w.ndim == 1:
        return w, g
    if w.ndim == 0:
        return w.reshape(-1), g.reshape(-1)
    for order, flag in (("C", "C_CONTIGUOUS"), ("F", "F_CONTIGUOUS")):
        if w.flags[flag] and g.flags[flag]:
            return w.ravel(order), g.ravel(order)
    return None


_SERIAL = (trust_ratio_flat, apply_rate_flat)
_PARALLEL = (trust_ratio_flat_parallel, apply_rate_flat_parallel)
_ND = (trust_ratio_nd, apply_rate_nd)


def _run(kernels, w, g, hyper, update):
    trust_ratio_kernel, apply_rate_kernel = kernels
    rate = trust_ratio_kernel(w, g, hyper)
    if update:
        apply_rate_kernel(w, g, rate, hyper)
    return rate


def _on_threads_where_it_pays(parallel: bool, size: int, threaded, serial, *arguments):
    """``threaded(*arguments)`` if all threads pay for ``size`` elements and are free.

    Otherwise ``serial(*arguments)``.
    """
    if parallel and size >= PARALLEL_MIN_SIZE and _parallel_slot.acquire(blocking=False):
        try:
            return threaded(*arguments)
        finally:
            _parallel_slot.release()
    return serial(*arguments)


def _run_threaded(w, g, hyper, update):
    return _run(_PARALLEL, w, g, hyper, update)


def _run_serial(w, g, hyper, update):
    # One compiled call for both passes: small arrays, the common case, pay
    # for the calls more than for the loops.
    return scale_flat(w, g, hyper) if update else trust_ratio_flat(w, g, hyper)


def _pick_and_run(w, g, hyper, update, parallel):
    flat = flat_views(w, g)
    if flat is None:
        return _run(_ND, w, g, hyper, update)
    return _on_threads_where_it_pays(
        parallel, flat[0].shape[0], _run_threaded, _run_serial, *flat, hyper, update
    )


def trust_ratio(w, g, hyper, parallel: bool = True) -> float:
    """The rate for two validated arrays of one shape and dtype."""
    return _pick_and_run(w, g, hyper, False, parallel)


def scale(w, g, hyper, parallel: bool = True) -> float:
    """Scale ``g`` in place for two validated arrays; returns the rate."""
    return _pick_and_run(w, g, hyper, True, parallel)


def _scale_many_threaded(*arguments):
    return scale_many_flat_parallel(*arguments, get_num_threads())


def _scale_many_serial(*arguments):
    return scale_many_flat(*arguments, 1)


_EMPTY_OF_DTYPE = {np.dtype(t): np.empty(0, t) for t in (np.uint16, np.float32, np.float64)}


def scale_many(ws, gs, layout, table, rates, parallel: bool = True) -> None:
    """Scale every ``gs[i]`` in place by its rate, written to ``rates[i]``.

    ``ws`` and ``gs`` are validated pairs (float16 as bit patterns) that
    overlap no other pair, ``layout`` their rows of :func:`pair_layout` and
    ``table`` their hyperparameters. The contiguous pairs of each dtype take
    one call of :func:`scale_many_flat`; the rare strided ones go through
    :func:`scale` one by one.
    """
    contiguous = layout[:, CONTIGUOUS].astype(bool)
    dtypes = np.array([w.dtype.num for w in ws])
    for dtype_number in np.unique(dtypes):
        members = np.flatnonzero(contiguous & (dtypes == dtype_number))
        if members.size == 0:
            continue
        sizes = layout[members, SIZE]
        group_rates = np.empty(members.size)
        arguments = (
            layout[members, W_LOW],
            layout[members, G_LOW],
            sizes,
            table[members],
            group_rates,
            _EMPTY_OF_DTYPE[ws[members[0]].dtype],
        )
        _on_threads_where_it_pays(
            parallel, int(sizes.sum()), _scale_many_threaded, _scale_many_serial, *arguments
        )
        rates[members] = group_rates
    strided = np.flatnonzero(~contiguous)
    for i in strided:
        rates[i] = scale(ws[i], gs[i], tuple(table[i]), parallel)
