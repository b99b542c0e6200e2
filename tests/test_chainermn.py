"""GradientLARS inside ChainerMN's multi-node optimizer, over MPI on loopback.

Launches ``chainermn_job.py`` on 2 ranks with the ``mpiexec`` installed beside
this Python (the ``mpich`` wheel's) and judges what rank 0 reports.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("chainer")
pytest.importorskip("chainermn")
pytest.importorskip("mpi4py")

JOB = Path(__file__).with_name("chainermn_job.py")
MPIEXEC = Path(sys.executable).with_name("mpiexec")
RANKS = 2
TIMEOUT_S = 90


def run_job(result: Path, hook: str) -> None:
    """Run the job on ``RANKS`` ranks; kill its whole process group if it hangs."""
    if not MPIEXEC.exists():
        pytest.skip(f"no mpiexec beside {sys.executable}")
    # One BLAS thread per rank: the ranks share the machine's cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    command = [
        str(MPIEXEC),
        "-n",
        str(RANKS),
        "-iface",
        "lo",
        sys.executable,
        str(JOB),
        str(result),
        hook,
    ]
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    ) as process:
        try:
            output, _ = process.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            pytest.fail(f"the MPI job ran past {TIMEOUT_S} s:\n{output}")
    assert process.returncode == 0, f"the MPI job failed:\n{output}"


@pytest.fixture(scope="module", params=["GradientLARS", "FusedGradientLARS", "LARS"])
def report(request, tmp_path_factory):
    result = tmp_path_factory.mktemp("chainermn") / "result.json"
    run_job(result, request.param)
    return {**json.loads(result.read_text()), "hook": request.param}


def test_every_rank_holds_the_same_parameters_after_every_update(report):
    assert report["ranks"] == RANKS
    # Without the broadcast the ranks would differ from the start.
    assert report["initial_weights_differed"]
    for step, per_rank in enumerate(report["history"]):
        for rank, params in enumerate(per_rank[1:], start=1):
            assert params == per_rank[0], f"rank {rank} differs from rank 0 after update {step}"


def test_parameters_equal_a_single_process_run_on_the_whole_batches(report):
    history = np.array([per_rank[0] for per_rank in report["history"]])
    reference = np.array(report["reference"])
    assert history.shape == reference.shape == (report["steps"] + 1, history.shape[1])
    # The training moves the weights by far more than the tolerance.
    assert np.abs(reference[-1] - reference[0]).max() > 1e-2
    np.testing.assert_allclose(history, reference, rtol=1e-5, atol=1e-6)


def test_the_hook_ran_on_every_rank_for_every_update_after_the_broadcast(report):
    # Chainer calls the per-parameter hook once per parameter, the fused one once,
    # and LARS takes one fused step.
    per_update = report["n_params"] if report["hook"] == "GradientLARS" else 1
    expected = report["steps"] * per_update
    assert report["hook_calls"] == [expected] * RANKS
