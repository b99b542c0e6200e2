"""The benchmark table runs and reports every candidate (its figures are not checked here)."""

import contextlib
import importlib.util
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest

from lars_numba import bench

# lars_numba.bench imports chainer lazily. Chainer's import warns about
# numpy.distutils and setuptools, which pytest makes errors, so it is
# imported here first, where it is installed, with those warnings ignored.
with warnings.catch_warnings(), contextlib.suppress(ImportError):
    warnings.simplefilter("ignore", DeprecationWarning)
    import chainer  # noqa: F401


def test_the_table_has_a_row_per_size_and_the_hook_table_with_chainer(capsys):
    bench.main(["--sizes", "64", "1000", "--rounds", "1", "--models", "1000 x 16"])
    out = capsys.readouterr().out
    rows = [
        line.split()
        for line in out.splitlines()
        if line.split()[:1] in (["64"], ["1000"]) and line.split()[1].isdigit()
    ]
    assert [row[0] for row in rows] == ["64", "1000"]
    with_chainer = importlib.util.find_spec("chainer") is not None
    assert ("chainer/lars" in out) == with_chainer
    assert ("optimizer.update()" in out) == with_chainer
    # every figure is a positive number
    assert all(float(value) > 0 for row in rows for value in row[2:])


def test_the_cutoff_table_times_both_kernels(capsys):
    bench.main(["--cutoff", "--sizes", "4096", "--rounds", "1"])
    row = next(
        line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("4096 ")
    )
    serial, parallel, ratio = map(float, row[1:])
    assert serial > 0 and parallel > 0
    assert abs(ratio - serial / parallel) < 0.01 * ratio + 0.01


def test_the_whole_model_table_times_every_candidate(capsys):
    bench.main(["--sizes", "64", "--rounds", "1", "--models", "1000 x 16"])
    lines = capsys.readouterr().out.splitlines()
    *names, bandwidth = next(line for line in lines if line.startswith("model")).split()[2:]
    times, ratios = (line.split()[3:] for line in lines if line.startswith("1000 x 16"))
    assert bandwidth == "GB/s"
    expected = {"scale_loop", "scale_all", "floor5", "floor3"}
    if importlib.util.find_spec("chainer") is not None:
        expected |= {"chainer_hook", "lars_hook", "fused_hook"}
    assert set(names) == expected
    # The times start with the element count and end with the bandwidth.
    assert len(ratios) == len(names) == len(times) - 2
    assert all(float(value) > 0 for value in times + ratios)
    assert float(ratios[names.index("scale_all")]) == 1


def test_the_step_table_times_every_optimizer_against_the_floor(capsys):
    pytest.importorskip("chainer")
    bench.main(["--sizes", "64", "--rounds", "1", "--models", "1000 x 16"])
    lines = capsys.readouterr().out.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("float32 1000 x 16")))
    rows = {line.split()[0]: line.split()[1:] for line in lines[start + 1 : start + 6]}
    assert set(rows) == {"LARS", "LARS_parallel", "MomentumSGD", "+chainer_hook", "+fused_hook"}
    lars_ms = float(rows["LARS"][0])
    for ms, to_floor, to_lars in rows.values():
        assert float(ms) > 0 and float(to_floor.rstrip("x")) > 0
        assert abs(float(to_lars.rstrip("x")) * lars_ms - float(ms)) < 0.01 * float(ms) + 1e-3


def test_the_gpu_table_times_every_candidate(capsys):
    # On the simulator (no GPU here) the table runs, with the host's times.
    from lars_numba import bench_gpu

    bench_gpu.main(
        ["--rounds", "1", "--call-size", "300", "--model", "3 x 50", "--copy-bytes", "4096"]
    )
    lines = capsys.readouterr().out.splitlines()
    titles = [line for line in lines if line.startswith("one ")]
    assert [title.split(" (")[0] for title in titles] == ["one call", "one update"]
    rows = [line.split() for line in lines if line.split()[:1] in (["scale"], ["scale_all"])]
    assert [row[0] for row in rows] == ["scale", "scale_all"] * 2
    assert all(float(row[2]) > 0 for row in rows)


def test_the_gpu_model_is_resnet50_or_n_arrays_of_s():
    from lars_numba import bench_gpu
    from lars_numba._shapes import RESNET50_SHAPES

    assert bench_gpu.model_shapes("resnet50") == RESNET50_SHAPES
    assert bench_gpu.model_shapes("3 x 50") == ((50,),) * 3


def test_ci_gpu_says_there_is_no_gpu_and_succeeds(tmp_path):
    # Only what the script needs before it looks for a GPU is on the path.
    (tmp_path / "dirname").symlink_to(shutil.which("dirname"))
    script = Path(__file__).parents[1] / ".ci" / "gpu"
    result = subprocess.run(
        [shutil.which("bash"), str(script)],
        env={"PATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "no NVIDIA GPU on this machine" in result.stdout


def test_the_host_table_times_every_stage_of_both_calls_on_stand_ins(capfd):
    # This process runs the simulator: the table takes a process of its own.
    from lars_numba import __main__

    assert os.environ["NUMBA_ENABLE_CUDASIM"] == "1"
    with pytest.raises(SystemExit) as finished:
        __main__.main(["bench", "--host", "--rounds", "1"])
    out, err = capfd.readouterr()
    assert finished.value.code == 0, err[-3000:]
    tables = out.split("\n\n")[1:]
    assert [table.splitlines()[0] for table in tables] == ["scale", "scale_all", "momentum_step"]
    for table in tables:
        rows = [line.rsplit(None, 1) for line in table.splitlines()[2:]]
        stages = {stage: float(us) for stage, us in rows}
        assert list(stages) == [
            "checks (lars_numba._api)",
            "layout and addresses of the pairs",
            "sums launch, packed once (_cuda.Launcher)",
            "update launch, packed once (_cuda.Launcher)",
            "the stages above, in all",
            "the whole call, up to the driver's calls",
            "the same on CuPy-like arrays",
            "sums launch, numba-cuda's dispatcher",
            "update launch, numba-cuda's dispatcher",
        ]
        compared = [stages.pop(stage) for stage in list(stages)[-2:]]
        assert all(us > 0 for us in compared)
        assert stages.pop("the whole call, up to the driver's calls") > 0
        assert stages.pop("the same on CuPy-like arrays") > 0
        total = stages.pop("the stages above, in all")
        assert all(us > 0 for us in stages.values())
        assert total == pytest.approx(sum(stages.values()), abs=len(stages))  # whole us
