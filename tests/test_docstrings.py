"""The examples in the public docstrings run and print what they show."""

import doctest

import lars_numba


def test_public_docstring_examples():
    results = doctest.testmod(lars_numba, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert results.attempted > 0
    assert results.failed == 0
