"""Plot each layer's LARS trust ratio during a short training, with Chainer's PlotReport.

Usage: ``python docs/examples/trust_ratios.py [OUT_DIR]`` (default ``result``).

A three-layer perceptron learns scikit-learn's bundled handwritten digits (no
download) with MomentumSGD and lars_numba's FusedGradientLARS. The hook
reports every weight matrix's trust ratio to Chainer's reporter as
``lars/<path>``; LogReport averages them over each epoch and PlotReport draws
them to ``OUT_DIR/trust_ratios.png``. The biases are kept out of weight decay.
Needs the ``demo`` extra and matplotlib.
"""

import sys

import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np
from chainer.training import extensions
from sklearn.datasets import load_digits

from lars_numba.chainer import FusedGradientLARS

EPOCHS = 30


def main(out: str = "result") -> None:
    x, t = load_digits(return_X_y=True)
    train = chainer.datasets.TupleDataset((x / 16).astype(np.float32), t.astype(np.int32))

    initial = chainer.initializers.LeCunNormal(rng=np.random.default_rng(0))
    model = L.Classifier(
        chainer.Sequential(
            L.Linear(64, 256, initialW=initial),
            F.relu,
            L.Linear(256, 256, initialW=initial),
            F.relu,
            L.Linear(256, 10, initialW=initial),
        )
    )
    optimizer = chainer.optimizers.MomentumSGD(lr=0.02).setup(model)
    optimizer.add_hook(
        FusedGradientLARS(weight_decay=5e-4, exclude_from_weight_decay=["*/b"], report=True)
    )

    order = chainer.iterators.ShuffleOrderSampler(np.random.default_rng(0))
    iterator = chainer.iterators.SerialIterator(train, batch_size=256, order_sampler=order)
    updater = chainer.training.StandardUpdater(iterator, optimizer)
    trainer = chainer.training.Trainer(updater, (EPOCHS, "epoch"), out=out)

    # Parameter paths are /predictor/<link>/W, Sequential numbering its links 0, 1, 2.
    weights = [f"lars/predictor/{link}/W" for link in range(3)]
    trainer.extend(extensions.LogReport(trigger=(1, "epoch")))
    trainer.extend(
        extensions.PlotReport(
            weights,
            x_key="epoch",
            trigger=(1, "epoch"),
            # The ratios span orders of magnitude as the gradients shrink.
            postprocess=lambda figure, axes, summary: axes.set_yscale("log"),
            filename="trust_ratios.png",
        )
    )
    trainer.extend(extensions.PrintReport(["epoch", "main/accuracy", *weights]))
    trainer.run()


if __name__ == "__main__":
    main(*sys.argv[1:])
