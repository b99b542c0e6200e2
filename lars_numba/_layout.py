"""Where the arrays lie: flat views, byte ranges, overlaps, groups by dtype, chunks.

What :mod:`lars_numba._api` and both engines need to know of a set of pairs
before any kernel runs, shared so that each is decided once and alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from numba import njit


def flat_views(w, g):
    """1-d views of ``w`` and ``g`` that pair the same elements, or ``None``.

    Works for NumPy arrays and Numba device arrays alike: 0-d arrays become
    one element, arrays contiguous in the same order are raveled in it, 1-d
    arrays of any stride stay as they are.
    """
    if w.ndim == 1:
        # Already 1-d; a Numba device array refuses to reshape when strided.
        return w, g
    if w.ndim == 0:
        return w.reshape(1), g.reshape(1)
    for order, flag in (("C", "C_CONTIGUOUS"), ("F", "F_CONTIGUOUS")):
        if w.flags[flag] and g.flags[flag]:
            return w.ravel(order), g.ravel(order)
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
LAYOUT_COLUMNS = range(6)
W_LOW, W_HIGH, G_LOW, G_HIGH, SIZE, CONTIGUOUS = LAYOUT_COLUMNS


@njit(cache=True, nogil=True)
def pair_layout(w, g):
    """What the CPU engine needs of a pair, in one call: the byte ranges of ``w``
    and ``g``, their size, and whether they are contiguous in one order."""
    w_low, w_high = memory_bounds(w)
    g_low, g_high = memory_bounds(g)
    contiguous = (w.flags.c_contiguous and g.flags.c_contiguous) or (
        w.flags.f_contiguous and g.flags.f_contiguous
    )
    return w_low, w_high, g_low, g_high, w.size, int(contiguous)


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
