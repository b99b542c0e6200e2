"""A 2-rank ChainerMN run with one of lars_numba's hooks or its optimizer, launched by
test_chainermn.py.

Usage: ``mpiexec -n 2 python chainermn_job.py RESULT.json {GradientLARS,FusedGradientLARS,LARS}``

Every rank trains the same small MLP, each from its own random initial
weights, through ``chainermn.create_multi_node_optimizer`` over the naive
communicator, each on its own half of every batch. The first update only
broadcasts rank 0's weights; each later one averages the gradients and runs
the hook and the update rule (or LARS's fused step) on every rank. Rank 0
also trains a single-process copy from its initial weights on the whole
batches, and writes to RESULT.json the flattened parameters of every rank and
of the copy after every update, and how often the hook ran on each rank.
test_chainermn.py judges them.
"""

import json
import sys

import chainer
import chainer.functions as F
import chainer.links as L
import chainermn
import numpy as np

from lars_numba.chainer import LARS, FusedGradientLARS, GradientLARS

STEPS = 6
BATCH_PER_RANK = 16
IN, HIDDEN, OUT = 5, 8, 3


def counting(hook_class: type) -> type:
    """``hook_class`` that counts its calls."""

    class Counting(hook_class):
        calls = 0

        def __call__(self, *args):
            self.calls += 1
            super().__call__(*args)

    return Counting


HOOKS = {"GradientLARS": GradientLARS, "FusedGradientLARS": FusedGradientLARS}


def classifier(seed: int) -> L.Classifier:
    initial = chainer.initializers.LeCunNormal(rng=np.random.default_rng(seed))
    return L.Classifier(
        chainer.Sequential(
            L.Linear(IN, HIDDEN, initialW=initial), F.tanh, L.Linear(HIDDEN, OUT, initialW=initial)
        )
    )


class CountingLARS(LARS):
    """The LARS optimizer, counting its fused steps as ``calls``."""

    calls = 0

    def _step(self):
        self.calls += 1
        super()._step()


def optimizer(model: chainer.Link, hook, comm=None) -> chainer.Optimizer:
    """MomentumSGD with ``hook``, or ``hook`` itself if it is the LARS optimizer."""
    actual = hook if isinstance(hook, LARS) else chainer.optimizers.MomentumSGD(lr=0.1)
    if comm is not None:
        actual = chainermn.create_multi_node_optimizer(actual, comm)
    actual.setup(model)
    if not isinstance(hook, LARS):
        actual.add_hook(hook)
    return actual


def make_hook(name: str, count: bool):
    """The hook (or LARS optimizer) ``name``, with lars_numba's weight decay, lr 0.1."""
    if name == "LARS":
        return (CountingLARS if count else LARS)(lr=0.1, weight_decay=1e-3)
    return (counting(HOOKS[name]) if count else HOOKS[name])(weight_decay=1e-3)


def flat(model: chainer.Link) -> list[float]:
    return [float(v) for _, p in sorted(model.namedparams()) for v in p.array.ravel()]


def main(result_path: str, hook_name: str) -> None:
    comm = chainermn.create_communicator("naive")
    size = comm.size
    rng = np.random.default_rng(0)
    x = rng.standard_normal((STEPS, size, BATCH_PER_RANK, IN), dtype=np.float32)
    t = rng.integers(0, OUT, (STEPS, size, BATCH_PER_RANK)).astype(np.int32)

    model = classifier(seed=comm.rank)
    hook = make_hook(hook_name, count=True)
    opt = optimizer(model, hook, comm)
    opt.update()  # broadcasts rank 0's weights; no gradient, no hook
    history = [comm.mpi_comm.gather(flat(model), root=0)]
    for step in range(STEPS):
        opt.update(model, x[step, comm.rank], t[step, comm.rank])
        history.append(comm.mpi_comm.gather(flat(model), root=0))
    calls = comm.mpi_comm.gather(hook.calls, root=0)
    if comm.rank != 0:
        return

    reference = classifier(seed=0)
    reference_opt = optimizer(reference, make_hook(hook_name, count=False))
    reference_history = [flat(reference)]
    for step in range(STEPS):
        batch = (x[step].reshape(-1, IN), t[step].reshape(-1))
        reference_opt.update(reference, *batch)
        reference_history.append(flat(reference))

    with open(result_path, "w") as out:
        json.dump(
            {
                "ranks": size,
                "steps": STEPS,
                "n_params": len(list(model.params())),
                "history": history,
                "reference": reference_history,
                "hook_calls": calls,
                "initial_weights_differed": flat(classifier(seed=0)) != flat(classifier(seed=1)),
            },
            out,
        )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
