"""``python -m lars_numba demo``: large-batch training with and without LARS.

A Chainer MLP learns scikit-learn's bundled handwritten digits (1797 8x8
images, no download) with a batch of 1024 and a large global learning rate,
three times from the same initial weights and the same batches:

1. MomentumSGD alone, with weight decay: the step is too large and diverges;
2. MomentumSGD with :class:`lars_numba.chainer.GradientLARS`: each layer's
   step is scaled to its weights' norm, and the same global rate trains;
3. the same with Chainer's own ``GradientLARS``, for the time it spends in
   the hook; it reaches about the same accuracy (the hooks round differently
   and training amplifies it);
4. :class:`lars_numba.chainer.LARS`, the same rule and momentum step fused
   into one optimizer.

It prints each run's test accuracy, the time of one ``optimizer.update()``
after training (the step alone, on the last batch's gradients) and the time
spent inside the two LARS hooks. Needs the ``demo`` extra: ``pip install 'lars_numba[demo]'``.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np


class _TimedHook:
    """A per-parameter optimizer hook that adds up the time spent inside ``hook``."""

    def __init__(self, hook) -> None:
        self.hook = hook
        self.name = hook.name
        self.timing = hook.timing
        self.call_for_each_param = hook.call_for_each_param
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, rule, param) -> None:
        start = time.perf_counter()
        self.hook(rule, param)
        self.seconds += time.perf_counter() - start
        self.calls += 1


def _digits(seed: int):
    """The digits as float32 pixels in [0, 1] and int32 labels: 80 % train, 20 % test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    pixels, labels = load_digits(return_X_y=True)
    pixels = (pixels / 16.0).astype(np.float32)
    return train_test_split(
        pixels, labels.astype(np.int32), test_size=0.2, random_state=seed, stratify=labels
    )


#: Steps timed after training, on the last batch's gradients.
TIMED_STEPS = 20


def _train(args, data, hook, title: str) -> tuple[float, float]:
    """Train a fresh MLP with ``hook`` (``None``: plain weight decay; ``"LARS"``:
    lars_numba's optimizer); the test accuracy and the median seconds of a step."""
    import chainer
    import chainer.functions as F
    import chainer.links as L
    from chainer import training
    from chainer.training import extensions

    x_train, x_test, y_train, y_test = data
    # Every run starts from the same weights and sees the same batches.
    initial = chainer.initializers.LeCunNormal(rng=np.random.default_rng(args.seed))
    mlp = chainer.Sequential(
        L.Linear(None, args.hidden, initialW=initial),
        F.relu,
        L.Linear(None, args.hidden, initialW=initial),
        F.relu,
        L.Linear(None, 10, initialW=initial),
    )
    model = L.Classifier(mlp)
    train = chainer.datasets.TupleDataset(x_train, y_train)
    test = chainer.datasets.TupleDataset(x_test, y_test)
    order = chainer.iterators.ShuffleOrderSampler(np.random.default_rng(args.seed))
    train_iter = chainer.iterators.SerialIterator(train, args.batch_size, order_sampler=order)
    test_iter = chainer.iterators.SerialIterator(test, len(test), repeat=False, shuffle=False)

    if hook is None:
        optimizer = chainer.optimizers.MomentumSGD(lr=args.lr).setup(model)
        optimizer.add_hook(chainer.optimizer_hooks.WeightDecay(args.weight_decay))
    elif hook == "LARS":
        from .chainer import LARS

        optimizer = LARS(lr=args.lr * args.eta, weight_decay=args.weight_decay).setup(model)
    else:
        # As in Chainer's GradientLARS, the optimizer's rate is the global
        # rate times the LARS coefficient.
        optimizer = chainer.optimizers.MomentumSGD(lr=args.lr * args.eta).setup(model)
        optimizer.add_hook(hook)

    updater = training.updaters.StandardUpdater(train_iter, optimizer)
    with tempfile.TemporaryDirectory() as out:
        trainer = training.Trainer(updater, (args.epochs, "epoch"), out=out)
        trainer.extend(extensions.Evaluator(test_iter, model))
        trainer.extend(extensions.LogReport(trigger=(args.epochs // 4, "epoch")))
        trainer.extend(
            extensions.PrintReport(
                ["epoch", "main/loss", "main/accuracy", "validation/main/accuracy"]
            )
        )
        trainer.extend(extensions.ProgressBar(update_interval=10))
        print(f"\n== {title}")
        # A diverging run overflows: it is reported below, not warned about.
        with np.errstate(over="ignore", invalid="ignore"):
            trainer.run()
            with chainer.using_config("train", False), chainer.no_backprop_mode():
                accuracy = float(F.accuracy(mlp(x_test), y_test).array)
            steps = []
            for _ in range(TIMED_STEPS):
                start = time.perf_counter()
                optimizer.update()
                steps.append(time.perf_counter() - start)
    return accuracy, float(np.median(steps))


def _warm_up(hook) -> float:
    """Seconds of ``hook``'s first calls, which load (or compile) the float32 kernels.

    A small and a large parameter, as the kernels for large arrays run on all cores.
    """
    import chainer

    start = time.perf_counter()
    for size in (4, 1 << 20):
        param = chainer.Parameter(np.ones(size, dtype=np.float32))
        param.grad = np.ones(size, dtype=np.float32)
        hook(None, param)
    return time.perf_counter() - start


def main(argv: list[str]) -> None:
    """Run the demo; ``argv`` are the options after ``demo`` (``--help`` lists them).

    Parameters
    ----------
    argv : list of str
        Command-line options, e.g. ``["--epochs", "20"]``.
    """
    parser = argparse.ArgumentParser(
        prog="python -m lars_numba demo",
        description="Large-batch training of an MLP on the digits, with and without LARS.",
    )
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=1024, help="units per hidden layer")
    parser.add_argument("--lr", type=float, default=2.0, help="global learning rate")
    parser.add_argument("--eta", type=float, default=0.005, help="LARS coefficient")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import chainer.optimizer_hooks

    from .chainer import GradientLARS

    data = _digits(args.seed)
    print(
        f"digits: {len(data[0])} training and {len(data[1])} test images; "
        f"batch {args.batch_size}, {args.epochs} epochs, global learning rate {args.lr}"
    )
    ours = _TimedHook(GradientLARS(weight_decay=args.weight_decay))
    theirs = _TimedHook(chainer.optimizer_hooks.GradientLARS(weight_decay=args.weight_decay))
    first_call = _warm_up(ours.hook)

    runs = [
        (f"MomentumSGD, lr {args.lr}", None),
        (f"MomentumSGD + lars_numba's GradientLARS, lr {args.lr} x eta {args.eta}", ours),
        (f"MomentumSGD + Chainer's GradientLARS, lr {args.lr} x eta {args.eta}", theirs),
        (f"lars_numba's LARS optimizer, lr {args.lr} x eta {args.eta}", "LARS"),
    ]
    results = [_train(args, data, hook, title) for title, hook in runs]

    print(f"\ntest accuracy, and one optimizer.update() (median of {TIMED_STEPS}, after training)")
    for (title, _), (accuracy, step) in zip(runs, results, strict=True):
        print(f"  {accuracy:6.1%}  {step * 1e3:7.2f} ms  {title}")
    print(f"\ntime inside the LARS hook ({ours.calls} calls each)")
    print(f"  lars_numba {ours.seconds * 1e3:8.1f} ms")
    print(f"  Chainer    {theirs.seconds * 1e3:8.1f} ms")
    print(f"  Chainer / lars_numba: {theirs.seconds / ours.seconds:.2g}")
    print(f"  (not counted: lars_numba's first calls, which load its kernels: {first_call:.2f} s)")
