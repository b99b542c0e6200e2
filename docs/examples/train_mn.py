"""Data-parallel training with ChainerMN and lars_numba's GradientLARS.

Usage: ``mpiexec -n 2 -iface lo python docs/examples/train_mn.py [OUT_DIR]``

Needs the ``mpi`` extra and scikit-learn.
"""

import sys

import chainer
import chainer.functions as F
import chainer.links as L
import chainermn
import numpy as np
from chainer.training import extensions
from sklearn.datasets import load_digits

from lars_numba.chainer import GradientLARS


def main(out: str = "result") -> None:
    comm = chainermn.create_communicator("naive")

    if comm.rank == 0:
        x, t = load_digits(return_X_y=True)
        dataset = chainer.datasets.TupleDataset((x / 16).astype(np.float32), t.astype(np.int32))
    else:
        dataset = None
    # Rank 0 shuffles the data and sends each rank its shard.
    dataset = chainermn.scatter_dataset(dataset, comm, shuffle=True, seed=0)

    model = L.Classifier(chainer.Sequential(L.Linear(None, 256), F.relu, L.Linear(None, 10)))
    optimizer = chainermn.create_multi_node_optimizer(
        chainer.optimizers.MomentumSGD(lr=0.01), comm
    ).setup(model)
    optimizer.add_hook(GradientLARS(weight_decay=5e-4))

    iterator = chainer.iterators.SerialIterator(dataset, batch_size=256)
    updater = chainer.training.StandardUpdater(iterator, optimizer)
    trainer = chainer.training.Trainer(updater, (20, "epoch"), out=out)
    if comm.rank == 0:
        trainer.extend(extensions.LogReport(trigger=(5, "epoch")))
        trainer.extend(extensions.PrintReport(["epoch", "main/loss", "main/accuracy"]))
    trainer.run()


if __name__ == "__main__":
    main(*sys.argv[1:])
