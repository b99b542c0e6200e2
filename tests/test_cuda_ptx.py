"""What the GPU kernels compile to: the PTX of the shipped kernels, read for the
memory ordering and the arithmetic that the CUDA simulator cannot show.

NVVM (the ``nvidia-nvvm`` and ``nvidia-cuda-nvrtc`` wheels of the test extra)
compiles without a GPU. The kernels are compiled in a subprocess with the
simulator off, for a device of compute capability 9.0 that the subprocess
makes up, as numba-cuda asks the current device for it while it compiles
device functions.
"""

import os
import re
import subprocess
import sys
import textwrap

import pytest

COMPILE = textwrap.dedent(
    """
    import pathlib, sys, types as pytypes
    from numba import cuda, types
    import numba.cuda.dispatcher
    numba.cuda.dispatcher.get_current_device = lambda: pytypes.SimpleNamespace(
        compute_capability=(9, 0)
    )
    from lars_numba import _cuda, _rule

    out = pathlib.Path(sys.argv[1])
    hyper = types.UniTuple(types.float64, len(_rule.HYPERPARAMETERS))
    chunks, sums = types.int64[:, ::1], types.float64[:, ::1]
    single, half = (types.Array(dtype, 1, "C") for dtype in (types.float32, types.float16))
    # A group of flat pairs: its address table and the likes of its dtypes.
    flat = types.Tuple((types.int64[:, ::1], types.UniTuple(single, 2)))
    flag = types.boolean[::1]
    kernels = {
        "sums": (
            _cuda.sums_of_chunks,
            (flat, chunks, sums, types.int64, types.uint32[::1], hyper, flag),
        ),
    }
    for ndim in (1, 2):
        strided = types.UniTuple(types.Array(types.float32, ndim, "A"), 2)
        kernels[f"update_{ndim}d"] = (
            _cuda.UPDATE_KERNELS["scale"],
            (strided, chunks, sums, types.int64, hyper, types.float64[::1]),
        )
    masters = types.Tuple((types.int64[:, ::1], types.Tuple((single, half, single, half))))
    kernels["step_master"] = (
        _cuda.UPDATE_KERNELS["momentum_master"],
        (masters, chunks, sums, types.int64, hyper, types.float64[::1], flag, types.boolean),
    )
    for name, (kernel, signature) in kernels.items():
        ptx, _ = cuda.compile_ptx(kernel.py_func, signature, cc=(9, 0))
        (out / f"{name}.ptx").write_text(ptx)
    """
)


@pytest.fixture(scope="module")
def ptx(tmp_path_factory):
    """The PTX of the kernels, by name, as lists of instructions."""
    out = tmp_path_factory.mktemp("ptx")
    env = {"NUMBA_ENABLE_CUDASIM": "0", "NUMBA_CACHE_DIR": str(out / "cache")}
    result = subprocess.run(
        [sys.executable, "-c", COMPILE, str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {
        path.stem: [line.strip() for line in path.read_text().splitlines() if line.strip()]
        for path in out.glob("*.ptx")
    }


def indices(lines, pattern):
    return [i for i, line in enumerate(lines) if re.match(pattern, line)]


def test_the_ticket_wraps_with_an_atomic_and_is_never_stored(ptx):
    # A plain store resetting the ticket could wipe out another kernel's
    # increment; the wrapping increment leaves nothing to reset.
    lines = ptx["sums"]
    assert len(indices(lines, r"atom\.global\.inc\.u32")) == 1
    assert indices(lines, r"atom\.global\.add\.u32") == []
    assert indices(lines, r"st\.global\.u32") == []


def test_the_last_block_fences_before_it_reads_the_other_blocks_rows(ptx):
    # Release before the ticket (the partials reach memory first), and in
    # the last block, after the barrier that tells its threads they are
    # last, an acquire fence before the first load of the rows.
    lines = ptx["sums"]
    (ticket,) = indices(lines, r"atom\.global\.inc")
    fences = indices(lines, r"(membar\.gl|fence\.(sc|acq_rel)\.gpu)")
    assert any(fence < ticket for fence in fences)
    first_read = min(i for i in indices(lines, r"ld\.global(\.[a-z]+)*\.f64") if i > ticket)
    barrier = min(i for i in indices(lines, r"bar\.sync") if i > ticket)
    assert any(barrier < fence < first_read for fence in fences)


@pytest.mark.parametrize("kernel", ["sums", "update_1d", "update_2d", "step_master"])
def test_the_kernels_keep_ieee_arithmetic(ptx, kernel):
    # No fastmath: no flush of subnormals to zero, no approximate division
    # or square root; the update's rate is divided and rooted to nearest.
    lines = ptx[kernel]
    assert [line for line in lines if re.search(r"\.(ftz|approx)\b", line)] == []
    if kernel != "sums":
        assert indices(lines, r"div\.rn\.f64") != []
        assert indices(lines, r"sqrt\.rn\.f64") != []


def test_a_strided_element_is_unravelled_once_for_w_and_g(ptx):
    # A second axis costs one remainder and one division per element, shared
    # by w and g, which have the same shape (the other divisions are the
    # loops' trip counts, in both kernels).
    def divisions(kernel):
        return [len(indices(ptx[kernel], rf"{op}\.s64")) for op in ("rem", "div")]

    assert [a - b for a, b in zip(divisions("update_2d"), divisions("update_1d"), strict=True)] == [
        1,
        1,
    ]


def test_the_float16_weights_of_a_master_are_the_masters_rounding(ptx):
    # The master and the velocity are rounded once from float64 to float32;
    # the float16 copy is the master as stored, rounded to float16, as
    # Chainer's use_fp32_update copies it (the loop may be unrolled), never
    # rounded from float64 directly.
    lines = ptx["step_master"]
    halves = [re.findall(r"%f\d+", lines[i])[-1] for i in indices(lines, r"cvt\.rn\.f16\.f32")]
    singles = [re.findall(r"%f\d+", lines[i])[0] for i in indices(lines, r"cvt\.rn\.f32\.f64")]
    stored = [re.findall(r"%f\d+", lines[i])[-1] for i in indices(lines, r"st\.global\.f32")]
    assert halves and set(halves) <= set(singles) & set(stored)
    assert len(singles) == 2 * len(halves)
    assert indices(lines, r"cvt\.rn\.f16\.f64") == []


def test_the_step_reads_the_flag_before_anything_else_it_reads_of_its_arrays(ptx):
    # The skip is decided on the device: the flag's load precedes every other
    # global load of the kernel.
    lines = ptx["step_master"]
    loads = indices(lines, r"ld\.global")
    assert loads and re.match(r"ld\.global(\.[a-z]+)*\.u8", lines[loads[0]])


def parameter_bytes(lines):
    """The bytes of the kernel's parameters, from the ``.param`` declarations of its entry."""
    total = 0
    for line in lines:
        declared = re.match(
            r"\.param \.(?:align \d+ )?\.?([bsuf])(\d+) \S+?(?:\[(\d+)\])?,?$", line
        )
        if declared:
            total += int(declared[2]) // 8 * int(declared[3] or 1)
    return total


@pytest.mark.parametrize("kernel", ["sums", "step_master"])
def test_the_widest_launches_keep_within_4_kib_of_parameters(ptx, kernel):
    # Every CUDA version takes 4 KiB of kernel parameters. A group of flat
    # pairs is one address table, whatever its number of pairs: its table,
    # its four likes and the chunks take a few hundred bytes.
    assert 300 < parameter_bytes(ptx[kernel]) <= 1024


@pytest.mark.parametrize("kernel", ["sums", "step_master"])
def test_a_table_s_arrays_are_read_and_written_in_global_memory(ptx, kernel):
    # The views over a table's addresses are in the global address space, so
    # that their loads and stores are ld.global and st.global, not generic.
    lines = ptx[kernel]
    assert indices(lines, r"ld\.global(\.[a-z]+)*\.f32") != []
    assert indices(lines, r"(ld|st)\.[bfsu]\d+\s") == []
