"""Where the arrays lie: flat views, byte ranges, overlaps, groups by dtype, chunks.

What :mod:`lars_numba._api` and both engines need to know of a set of pairs
before any kernel runs, shared so that each is decided once and alike.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterable, Sequence

import numpy as np
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import tunables


def flat_views(*arrays):
    """1-d views of ``arrays``, of one shape, that pair the same elements, or ``None``.

    Works for NumPy arrays and Numba device arrays alike: 0-d arrays become
    one element, arrays contiguous in the same order are raveled in it, 1-d
    arrays of any stride stay as they are.
    """
    ndim = arrays[0].ndim
    if ndim == 1:
        # Already 1-d; a Numba device array refuses to reshape when strided.
        return arrays
    if ndim == 0:
        return tuple(array.reshape(1) for array in arrays)
    for order, flag in (("C", "C_CONTIGUOUS"), ("F", "F_CONTIGUOUS")):
        if all(array.flags[flag] for array in arrays):
            return tuple(array.ravel(order) for array in arrays)
    return None


def chunk_count(size: int, chunk: int) -> int:
    """The number of chunks of ``chunk`` elements that cover ``size``, at least one."""
    return max(1, -(-size // chunk))


def groups_by_dtype(dtypes: Iterable[np.dtype], width: int | None = None) -> list[list[int]]:
    """The indices of ``dtypes``, grouped by dtype in the order each first appears,
    each group cut into runs of at most ``width``."""
    by_dtype: dict[np.dtype, list[int]] = {}
    for index, dtype in enumerate(dtypes):
        by_dtype.setdefault(dtype, []).append(index)
    if width is None:
        return list(by_dtype.values())
    return [
        members[start : start + width]
        for members in by_dtype.values()
        for start in range(0, len(members), width)
    ]


def pair_names(pairs: int, rates: bool = False) -> list[str]:
    """How the messages name the arrays of ``scale_all``: ``ws[i]``, ``gs[i]``, ``rates``."""
    names = [*(f"ws[{i}]" for i in range(pairs)), *(f"gs[{i}]" for i in range(pairs))]
    return [*names, "rates"] if rates else names


# -- byte ranges ---------------------------------------------------------------


@njit(cache=True, nogil=True)
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
LAYOUT_COLUMNS = range(7)
W_LOW, W_HIGH, G_LOW, G_HIGH, SIZE, CONTIGUOUS, ITEMSIZE = LAYOUT_COLUMNS


@njit(cache=True, nogil=True)
def pair_layout(w, g):
    """What the CPU engine needs of a pair, in one call: the byte ranges of ``w``
    and ``g``, their size, whether they are contiguous in one order, and their
    itemsize (which tells the float dtypes apart)."""
    w_low, w_high = memory_bounds(w)
    g_low, g_high = memory_bounds(g)
    contiguous = (w.flags.c_contiguous and g.flags.c_contiguous) or (
        w.flags.f_contiguous and g.flags.f_contiguous
    )
    return w_low, w_high, g_low, g_high, w.size, int(contiguous), w.itemsize


# -- many plain pairs in one call -----------------------------------------------
#
# Python's attribute reads, and an array's address above all
# (``ctypes.data``), cost more per pair than the whole kernel spends on a
# small one. So the layouts of plain NumPy arrays (exactly ``numpy.ndarray``, one of
# the three float dtypes in native byte order) are read in one compiled call
# from the arrays' objects, at the addresses ``id`` gives, through the fields
# of ``PyArrayObject_fields`` that NumPy's C API has laid out alike since
# NumPy 1.7, 2.x included: after the 16-byte object header, the data pointer,
# ``nd``, the dimension and stride pointers, ``base``, ``descr`` and ``flags``.
# The built-in dtypes are singletons, so ``descr`` tells them apart. A check
# on probe arrays, once per process, compares the reading with NumPy's own
# attributes; where it differs (another interpreter's object header, say),
# every pair is read through its attributes instead.

_DATA, _ND, _DIMENSIONS, _STRIDES, _DESCR, _FLAGS = 16, 24, 32, 40, 56, 64
_C_CONTIGUOUS, _F_CONTIGUOUS, _WRITEABLE = 0x1, 0x2, 0x400


@intrinsic
def address_as_pointer(typingctx, address):
    """The integer ``address`` as a ``void *``, for :func:`numba.carray`."""

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(types.intp), codegen


@njit(inline="always", nogil=True)
def _word(address):
    return carray(address_as_pointer(address), 1, np.int64)[0]


@njit(inline="always", nogil=True)
def _int(address):
    return carray(address_as_pointer(address), 1, np.int32)[0]


@njit(nogil=True)
def _bounds_of(array, itemsize):
    """The byte range, size and flags of the array object at ``array``."""
    low = _word(array + _DATA)
    nd = _int(array + _ND)
    dimensions = carray(address_as_pointer(_word(array + _DIMENSIONS)), nd, np.int64)
    strides = carray(address_as_pointer(_word(array + _STRIDES)), nd, np.int64)
    size = 1
    for axis in range(nd):
        size *= dimensions[axis]
    high = low
    if size > 0:
        high = low + itemsize
        for axis in range(nd):
            reach = strides[axis] * (dimensions[axis] - 1)
            if reach < 0:
                low += reach
            else:
                high += reach
    return low, high, size, _int(array + _FLAGS)


@njit(cache=True, nogil=True)
def read_layouts(w_ids, g_ids, descrs, itemsizes, layout):
    """Fill ``layout`` with :func:`pair_layout`'s rows of the plain arrays at the ids.

    ``descrs`` are the addresses of the float dtypes taken, ``itemsizes``
    their itemsizes. Returns the first pair that is not a plain one (dtypes
    that differ or are not taken, shapes that differ, ``g`` read-only), or -1.
    """
    for pair in range(w_ids.shape[0]):
        w, g = w_ids[pair], g_ids[pair]
        descr = _word(w + _DESCR)
        kind = -1
        for index in range(descrs.shape[0]):
            if descrs[index] == descr:
                kind = index
        nd = _int(w + _ND)
        if kind < 0 or _word(g + _DESCR) != descr or _int(g + _ND) != nd:
            return pair
        w_shape = carray(address_as_pointer(_word(w + _DIMENSIONS)), nd, np.int64)
        g_shape = carray(address_as_pointer(_word(g + _DIMENSIONS)), nd, np.int64)
        for axis in range(nd):
            if w_shape[axis] != g_shape[axis]:
                return pair
        itemsize = itemsizes[kind]
        w_low, w_high, size, w_flags = _bounds_of(w, itemsize)
        g_low, g_high, _, g_flags = _bounds_of(g, itemsize)
        if not g_flags & _WRITEABLE:
            return pair
        both = w_flags & g_flags
        layout[pair, 0] = w_low
        layout[pair, 1] = w_high
        layout[pair, 2] = g_low
        layout[pair, 3] = g_high
        layout[pair, 4] = size
        layout[pair, 5] = (both & _C_CONTIGUOUS) != 0 or (both & _F_CONTIGUOUS) != 0
        layout[pair, 6] = itemsize
    return -1


_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_DESCRS = np.array([id(dtype) for dtype in _FLOATS], np.int64)
_ITEMSIZES = np.array([dtype.itemsize for dtype in _FLOATS], np.int64)


def attribute_layouts(ws, gs) -> np.ndarray:
    """:func:`pair_layout`'s rows of checked pairs, read pair by pair."""
    return np.array(
        [pair_layout(kernel_view(w), kernel_view(g)) for w, g in zip(ws, gs, strict=True)],
        np.int64,
    ).reshape(len(ws), len(LAYOUT_COLUMNS))


def kernel_view(array: np.ndarray) -> np.ndarray:
    """``array`` as the CPU kernels take it: float16 as its uint16 bit patterns."""
    return array.view(np.uint16) if array.dtype == np.float16 else array


def _reading_agrees() -> bool:
    """Whether :func:`read_layouts` reads probe arrays as their attributes say."""
    if sys.maxsize != 2**63 - 1 or struct.calcsize("P") != 8:
        return False
    base = np.arange(60.0).reshape(3, 4, 5)
    read_only = np.ones(3, np.float16)
    read_only.flags.writeable = False
    probes = [
        (base, base + 1),
        (base[:, ::-2, 1:], np.asfortranarray(base)[:, ::-2, 1:]),
        (np.asfortranarray(base.astype(np.float32)), np.asfortranarray(base.astype(np.float32))),
        (np.ones(()), np.zeros(())),
        (np.ones(7, np.float16), np.ones(7, np.float16)[::-1]),
    ]
    ws, gs = [w for w, _ in probes], [g for _, g in probes]
    read = np.zeros((len(ws), len(LAYOUT_COLUMNS)), np.int64)
    ids = (np.array([id(a) for a in arrays], np.int64) for arrays in (ws, gs))
    if read_layouts(*ids, _DESCRS, _ITEMSIZES, read) != -1:
        return False
    one = np.array([id(read_only)], np.int64)
    refused = read_layouts(one, one, _DESCRS, _ITEMSIZES, np.empty_like(read[:1]))
    return refused == 0 and np.array_equal(read, attribute_layouts(ws, gs))


_agrees: list[bool] = []


def _reading_trusted() -> bool:
    """Whether the array objects may be read directly here: checked once per process."""
    if not _agrees:
        _agrees.append(_reading_agrees())
    return _agrees[0]


def plain_layouts(ws: list, gs: list) -> np.ndarray | None:
    """:func:`pair_layout`'s rows of every pair, read in one call, if all are plain.

    ``None`` if a pair is not of plain NumPy float arrays of one dtype and
    shape with a writeable ``g`` (then the caller checks each pair, to name
    what is wrong), or if reading the arrays' objects cannot be trusted here.
    """
    kinds = set(map(type, ws))
    kinds.update(map(type, gs))
    if not _reading_trusted() or kinds - {np.ndarray}:
        return None
    pairs = len(ws)
    layout = np.empty((pairs, len(LAYOUT_COLUMNS)), np.int64)
    ids = map(ids_of, (ws, gs))
    if read_layouts(*ids, _DESCRS, _ITEMSIZES, layout) != -1:
        return None
    return layout


# -- arrays one by one, for calls of more than two arrays per pair -------------

#: The columns of :func:`array_rows`' rows.
ARRAY_COLUMNS = range(5)
LOW, HIGH, ARRAY_SIZE, FLAGS, KIND = ARRAY_COLUMNS
C_CONTIGUOUS, F_CONTIGUOUS, WRITEABLE = _C_CONTIGUOUS, _F_CONTIGUOUS, _WRITEABLE


@njit(cache=True, nogil=True)
def read_arrays(ids, descrs, itemsizes, rows):
    """Fill ``rows`` with the byte range, size, flags and float kind (an index of
    ``descrs``, -1 for another dtype) of each plain array object at ``ids``."""
    for index in range(ids.shape[0]):
        descr = _word(ids[index] + _DESCR)
        kind = -1
        for candidate in range(descrs.shape[0]):
            if descrs[candidate] == descr:
                kind = candidate
        rows[index, KIND] = kind
        if kind >= 0:
            low, high, size, flags = _bounds_of(ids[index], itemsizes[kind])
            rows[index, LOW] = low
            rows[index, HIGH] = high
            rows[index, ARRAY_SIZE] = size
            rows[index, FLAGS] = flags


@njit(cache=True, nogil=True)
def first_shape_difference(ids, other_ids):
    """The first index at which the plain arrays at ``ids`` and ``other_ids`` differ
    in shape, or -1."""
    for index in range(ids.shape[0]):
        nd = _int(ids[index] + _ND)
        if _int(other_ids[index] + _ND) != nd:
            return index
        shape = carray(address_as_pointer(_word(ids[index] + _DIMENSIONS)), nd, np.int64)
        other = carray(address_as_pointer(_word(other_ids[index] + _DIMENSIONS)), nd, np.int64)
        for axis in range(nd):
            if shape[axis] != other[axis]:
                return index
    return -1


def _attribute_row(array: np.ndarray) -> tuple[int, int, int, int, int]:
    """:func:`array_rows`' row of one array, read through its attributes."""
    kind = _FLOATS.index(array.dtype) if array.dtype in _FLOATS else -1
    if kind < 0:
        return 0, 0, 0, 0, kind
    low, high = memory_bounds(kernel_view(array))
    flags = (
        C_CONTIGUOUS * array.flags.c_contiguous
        | F_CONTIGUOUS * array.flags.f_contiguous
        | WRITEABLE * array.flags.writeable
    )
    return low, high, array.size, flags, kind


def all_plain(arrays: list) -> bool:
    """Whether every one of ``arrays`` is exactly a ``numpy.ndarray``: a set of their
    types, three times quicker than a test of each."""
    return set(map(type, arrays)) <= {np.ndarray}


def array_rows(arrays: list) -> tuple[np.ndarray, np.ndarray | None]:
    """A row per NumPy array of ``arrays``: its byte range ``[LOW, HIGH)``, size, flags
    (``C_CONTIGUOUS``, ``F_CONTIGUOUS``, ``WRITEABLE``) and ``KIND``, the index of
    its dtype in float16, float32, float64 (-1 for any other dtype); and the
    arrays' ids for :func:`shapes_differ_at`.

    Read in one compiled call from the objects of plain arrays (see
    :func:`plain_layouts`), through the attributes of any other (and then
    the ids are ``None``).
    """
    plain = plain_rows(arrays)
    if plain is not None:
        rows, ids = plain
        # A float dtype that is not NumPy's own object for it (an unpickled
        # array's, say) is not known by its address: its row is read as any
        # other array's.
        for index in np.flatnonzero(rows[:, KIND] < 0):
            rows[index] = _attribute_row(arrays[index])
        return rows, ids
    rows = np.empty((len(arrays), len(ARRAY_COLUMNS)), np.int64)
    for index, array in enumerate(arrays):
        rows[index] = _attribute_row(array)
    return rows, None


def plain_rows(arrays: list) -> tuple[np.ndarray, np.ndarray] | None:
    """:func:`array_rows` of ``arrays`` read in one compiled call, if all of them are
    plain NumPy arrays and their objects may be read here; ``None`` otherwise."""
    if not (_reading_trusted() and all_plain(arrays)):
        return None
    ids = ids_of(arrays)
    return rows_of_ids(ids), ids


def ids_of(objects: Sequence) -> np.ndarray:
    """The ids of ``objects``, their addresses (CPython's), as int64."""
    if len(objects) < tunables.IDS_FROM_OBJECTS:
        return np.fromiter(map(id, objects), np.int64, len(objects))
    # A NumPy array of the objects holds their addresses, read while it keeps
    # them alive.
    held = np.fromiter(objects, object, len(objects))
    return _words(held.__array_interface__["data"][0], len(objects))


@njit(cache=True, nogil=True)
def _words(address, count):
    """A copy of the ``count`` int64 words at ``address``."""
    return carray(address_as_pointer(address), count, np.int64).copy()


def rows_of_ids(ids: np.ndarray) -> np.ndarray:
    """:func:`array_rows`' rows of the plain arrays at ``ids``, which the caller keeps
    alive (an id is the object's address); a row of KIND -1 holds nothing else."""
    rows = np.zeros((len(ids), len(ARRAY_COLUMNS)), np.int64)
    read_arrays(ids, _DESCRS, _ITEMSIZES, rows)
    return rows


def shapes_differ_at(arrays: list, others: list, ids, other_ids) -> int:
    """The first index at which ``arrays`` and ``others`` differ in shape, or -1.

    ``ids`` and ``other_ids`` are theirs from :func:`array_rows`, or ``None``.
    """
    if ids is not None and other_ids is not None:
        return first_shape_difference(ids, other_ids)
    return next(
        (i for i, (a, b) in enumerate(zip(arrays, others, strict=True)) if a.shape != b.shape),
        -1,
    )


@njit(cache=True, nogil=True)
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


def refuse_overlaps(layout: np.ndarray, rates: np.ndarray) -> None:
    """Raise if a written array of the pairs (``gs[i]``, ``rates``) overlaps another pair's.

    ``layout`` holds the pairs' rows of :func:`pair_layout`.
    """
    pairs = layout.shape[0]
    rates_low, rates_high = memory_bounds(rates)
    lows = np.concatenate((layout[:, W_LOW], layout[:, G_LOW], [rates_low]))
    highs = np.concatenate((layout[:, W_HIGH], layout[:, G_HIGH], [rates_high]))
    owners = np.concatenate((np.arange(pairs), np.arange(pairs), [pairs]))
    written = np.repeat((False, True, True), (pairs, pairs, 1))
    first, second = first_overlap(lows, highs, owners, written)
    if first >= 0:
        names = pair_names(pairs, rates=True)
        raise ValueError(
            f"{names[min(first, second)]} and {names[max(first, second)]} overlap in memory; "
            "the address range of an array that is written must not overlap those of "
            "another pair's arrays"
        )


# -- chunks --------------------------------------------------------------------


def chunk_rows(sizes: Sequence[int], chunk: int) -> list[tuple[int, int, int, int, int]]:
    """A row per chunk of the pairs of ``sizes``: (pair, start, stop, first, end).

    ``first`` and ``end`` are the rows of the pair's first chunk and past its
    last. A zero-size pair gets one empty chunk, so that its rate is computed
    too.
    """
    rows: list[tuple[int, int, int, int, int]] = []
    for pair, size in enumerate(sizes):
        starts = range(0, size, chunk) or range(1)
        first = len(rows)
        end = first + len(starts)
        rows.extend((pair, start, min(start + chunk, size), first, end) for start in starts)
    return rows
