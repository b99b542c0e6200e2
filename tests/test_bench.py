"""The benchmark table runs and reports every candidate (its figures are not checked here)."""

import importlib.util

from lars_numba import bench


def test_the_table_has_a_row_per_size_and_the_hook_table_with_chainer(capsys):
    bench.main(["--sizes", "64", "1000", "--rounds", "1"])
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["64"], ["1000"])]
    assert [row[0] for row in rows] == ["64", "1000"]
    with_chainer = importlib.util.find_spec("chainer") is not None
    assert ("chainer/lars" in out) == with_chainer
    assert ("optimizer.update()" in out) == with_chainer
    # every figure is a positive number
    assert all(float(value) > 0 for row in rows for value in row[2:])


def test_the_cutoff_table_times_both_kernels(capsys):
    bench.main(["--cutoff", "--sizes", "4096", "--rounds", "1"])
    row = next(
        line.split()
        for line in capsys.readouterr().out.splitlines()
        if line.startswith(" " * 6 + "4096")
    )
    serial, parallel, ratio = map(float, row[1:])
    assert serial > 0 and parallel > 0
    assert abs(ratio - serial / parallel) < 0.01 * ratio + 0.01
