"""The whole LARS momentum step beside other frameworks': ``python -m lars_numba.bench_peers``.

Times, on one CPU core, one step of every parameter of a float32 model by
:func:`lars_numba.momentum_step` and by the peers configured to the same rule:
timm's ``Lars`` on PyTorch (``denominator="sum"``) and optax's ``lars`` under
``jax.jit`` with donated buffers (``denominator="update"``). Each peer is
first checked to give the parameters of ``momentum_step`` after
:data:`CHECK_STEPS` steps from the same start; one that does not is not timed.
The candidates are timed in interleaved rounds with the stream kernels of
:mod:`lars_numba.bench`, whose bandwidth in the same rounds sets the floor of a
fused step: 7 passes of 4 bytes per element (read ``w`` and ``g`` for the
norms; read ``w``, ``g``, ``v`` and write ``v``, ``w`` for the step).
Where chainer imports, :class:`lars_numba.chainer.LARS`'s ``update()`` is
timed too. torch, timm, jax, optax and chainer are imported only here, inside
functions, and only where installed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.util
import inspect
import os
import sys
import types
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata
from typing import NamedTuple

import numpy as np

import lars_numba

from . import bench, harness

LR = harness.STEP_LR
MOMENTUM = 0.9
WEIGHT_DECAY = harness.WEIGHT_DECAY
#: timm's default eps, given to every candidate; optax's default is 0.
EPS = 1e-8
#: timm's and optax's defaults are 0.001; 1 is Chainer's rule, and any value
#: is the same factor in all three.
TRUST_COEFFICIENT = 1.0
#: Steps taken by a peer and by ``momentum_step`` from the same start before
#: their parameters are compared.
CHECK_STEPS = 3
#: The learning rate, weight decay and model of the second check, of the rule,
#: on a peer built anew: at the timed lr and weight decay three steps move the
#: weights by about 1e-3 of their size, so that a weight decay left out (1e-4
#: of that) or the other denominator could pass unseen; here each changes the
#: weights by over 1e-3. The arrays are small because these steps also magnify
#: float32 error in the norms: torch's float32 norm of one of ResNet-50's
#: 2.4M-element arrays is 4e-5 off (NumPy's 5e-6), which gives 7e-5 here.
CHECK_LR = 0.1
CHECK_WEIGHT_DECAY = 0.1
CHECK_SHAPES = ((16,), (3, 5), (1000,), (64, 3, 7, 7))
#: A peer agrees when ``|peer - ours| <= max(RTOL * |ours|, ATOL)`` everywhere:
#: float32 rounding of the same rule, computed in float32 by the peers and in
#: float64 rounded once by ``momentum_step``.
RTOL = 1e-5
ATOL = 1e-6
#: The bytes per element a fused float32 step moves (see the module docstring).
FLOOR_BYTES_PER_ELEMENT = 7 * 4
MODELS = ("ResNet-50", "1000 x 16")


class Stepper(NamedTuple):
    """A peer's step on its own copy of a model."""

    step: Callable[[], object]  # one step, done when it returns
    weights: Callable[[], list[np.ndarray]]  # the current parameters, as NumPy arrays
    note: str  # how the step runs, for the table


class Peer(NamedTuple):
    """A framework's LARS step and the ``momentum_step`` denominator of its rule."""

    name: str
    denominator: str
    #: ``build(ws, gs, lr, weight_decay)``: a stepper on copies of the weights
    #: and gradients, with zero momentum; ImportError if the framework is missing.
    build: Callable[[Sequence[np.ndarray], Sequence[np.ndarray], float, float], Stepper]


class Row(NamedTuple):
    """One line of the table: seconds per step, or ``None`` with the reason in ``note``."""

    model: str
    candidate: str
    seconds: float | None
    reference: str | None  # the momentum_step candidate it is compared with
    note: str


def ours_name(denominator: str) -> str:
    """The table's name of ``momentum_step`` with ``denominator``."""
    return f'momentum_step(denominator="{denominator}")'


def momentum_step_call(
    ws: Sequence[np.ndarray],
    gs: Sequence[np.ndarray],
    vs: Sequence[np.ndarray],
    denominator: str,
    lr: float = LR,
    weight_decay: float = WEIGHT_DECAY,
) -> Callable[[], object]:
    """One call of :func:`lars_numba.momentum_step` on one thread with the peers' rule."""

    def step() -> bool:
        return lars_numba.momentum_step(
            ws,
            gs,
            vs,
            lr=lr,
            momentum=MOMENTUM,
            threshold=0.0,
            weight_decay=weight_decay,
            eps=EPS,
            trust_coefficient=TRUST_COEFFICIENT,
            denominator=denominator,
            parallel=False,
        )

    return step


def relative_difference(theirs: Sequence[np.ndarray], ours: Sequence[np.ndarray]) -> float:
    """``max |theirs - ours| / max(|ours|, ATOL / RTOL)`` over every element of every array.

    At most ``RTOL`` exactly where the peer agrees within ``RTOL`` relative to
    the weights, or ``ATOL`` where the weights are below ``ATOL / RTOL``.
    """
    worst = 0.0
    for their, our in zip(theirs, ours, strict=True):
        if their.shape != our.shape:
            raise ValueError(f"a peer's parameter has shape {their.shape}; expected {our.shape}")
        our64 = our.astype(np.float64)
        scale = np.maximum(np.abs(our64), ATOL / RTOL)
        if our.size:
            worst = max(worst, float(np.max(np.abs(their.astype(np.float64) - our64) / scale)))
    return worst


def check(
    stepper: Stepper,
    denominator: str,
    ws: Sequence[np.ndarray],
    gs: Sequence[np.ndarray],
    lr: float,
    weight_decay: float,
) -> float:
    """The :func:`relative_difference` of a new ``stepper``'s parameters from those of
    ``momentum_step`` with ``denominator``, ``lr`` and ``weight_decay`` after
    :data:`CHECK_STEPS` steps of both from weights ``ws``, gradients ``gs`` and zero
    velocities.

    NaN where either gives a non-finite parameter, so that it does not agree.
    """
    ours = [w.copy() for w in ws]
    step = momentum_step_call(
        ours, gs, [np.zeros_like(w) for w in ws], denominator, lr, weight_decay
    )
    for _ in range(CHECK_STEPS):
        step()
        stepper.step()
    theirs = stepper.weights()
    if not all(np.isfinite(a).all() for a in (*ours, *theirs)):
        return float("nan")
    return relative_difference(theirs, ours)


def agrees(difference: float) -> bool:
    """Whether a :func:`check` result is within tolerance (NaN is not)."""
    return difference <= RTOL


# -- the peers ------------------------------------------------------------------


@functools.cache
def _timm_lars() -> tuple[type, str]:
    """timm's ``Lars`` class and where it came from.

    ``import timm`` imports torchvision, for timm's models and layers, and the
    only torchvision wheel on PyPI for Linux is built for CUDA PyTorch, whose
    extension does not load beside a CPU build of torch. ``timm.optim.lars``
    itself needs only torch, so where the package does not import, that
    module is loaded from timm's files without running timm's ``__init__``.
    """
    try:
        from timm.optim import Lars
    except ModuleNotFoundError as error:
        if error.name != "torchvision":
            raise
        reason = "torchvision not installed"
    except RuntimeError as error:  # torchvision's operators fail to register
        reason = f"torchvision does not load ({error})"
    else:
        return Lars, "timm.optim"
    spec = importlib.util.find_spec("timm")
    if spec is None or spec.submodule_search_locations is None:
        raise ModuleNotFoundError("No module named 'timm'", name="timm")
    root = spec.submodule_search_locations[0]
    for name, path in (("timm", root), ("timm.optim", os.path.join(root, "optim"))):
        package = types.ModuleType(name)
        package.__path__ = [path]
        sys.modules[name] = package
    lars = importlib.import_module("timm.optim.lars")
    return lars.Lars, f"timm/optim/lars.py alone: {reason}"


def timm_stepper(
    ws: Sequence[np.ndarray], gs: Sequence[np.ndarray], lr: float, weight_decay: float
) -> Stepper:
    """timm's ``Lars`` with our rule: trust_coeff 1, no clipping, no dampening or Nesterov.

    Its multi-tensor (``torch._foreach_*``) path is forced where this timm has
    one: timm picks it by default only on CUDA.
    """
    import torch

    torch.set_num_threads(1)
    lars_class, origin = _timm_lars()
    params = [torch.nn.Parameter(torch.from_numpy(w.copy())) for w in ws]
    for param, g in zip(params, gs, strict=True):
        param.grad = torch.from_numpy(g.copy())
    options = {}
    foreach = "foreach" in inspect.signature(lars_class).parameters
    if foreach:
        options["foreach"] = True
    optimizer = lars_class(
        params,
        lr=lr,
        momentum=MOMENTUM,
        weight_decay=weight_decay,
        trust_coeff=TRUST_COEFFICIENT,
        eps=EPS,
        trust_clip=False,
        **options,
    )
    path = "foreach" if foreach else "per-tensor loop: this timm has no foreach path"
    return Stepper(
        optimizer.step,
        lambda: [param.detach().numpy().copy() for param in params],
        f"timm {metadata.version('timm')}, torch {torch.__version__}, {path}; {origin}",
    )


def optax_stepper(
    ws: Sequence[np.ndarray], gs: Sequence[np.ndarray], lr: float, weight_decay: float
) -> Stepper:
    """optax's ``lars`` under ``jax.jit`` with the parameters and state donated.

    JAX's CPU thread pool is as large as the process's CPU affinity mask when
    the backend starts; :func:`main` runs everything on one core. (jax 0.10's
    runtime runs on every core with ``--xla_cpu_multi_thread_eigen=false``.)
    """
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_enable_x64", False)
    import jax.numpy as jnp
    import optax

    optimizer = optax.lars(
        lr,
        weight_decay=weight_decay,
        trust_coefficient=TRUST_COEFFICIENT,
        eps=EPS,
        momentum=MOMENTUM,
    )

    def update(params, state, grads):
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    update = jax.jit(update, donate_argnums=(0, 1))
    grads = [jnp.asarray(g) for g in gs]
    params = [jnp.asarray(w) for w in ws]
    current = [params, optimizer.init(params)]

    def step() -> None:
        current[:] = update(*current, grads)
        jax.block_until_ready(current)

    return Stepper(
        step,
        lambda: [np.array(param) for param in current[0]],
        f"optax {optax.__version__}, jax {jax.__version__}, jit, parameters and state donated",
    )


PEERS = (
    Peer("timm Lars", "sum", timm_stepper),
    Peer("optax lars", "update", optax_stepper),
)

# -- the table ------------------------------------------------------------------


def model_arrays(shapes) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Float32 weights and gradients of ``shapes``, the same at every call."""
    rng = np.random.default_rng(0)
    ws = [rng.standard_normal(shape, dtype=np.float32) for shape in shapes]
    gs = [rng.standard_normal(shape, dtype=np.float32) for shape in shapes]
    return ws, gs


def chainer_lars_update(shapes) -> Callable[[], object] | None:
    """:class:`lars_numba.chainer.LARS`'s ``update()`` from :func:`harness.step_candidates`,
    where chainer imports."""
    try:
        import chainer  # noqa: F401
    except ImportError:
        return None
    return harness.step_candidates(shapes)[0]["LARS"]


def model_rows(
    name: str, shapes, rounds: int, peers: Sequence[Peer] = PEERS
) -> tuple[list[Row], float]:
    """The rows of one model and the bandwidth measured in its rounds.

    ``momentum_step`` is timed with each denominator that a peer uses; a peer
    is timed if it imports and passes :func:`check`, and otherwise its row
    says why not.
    """
    ws, gs = model_arrays(shapes)
    check_ws, check_gs = model_arrays(CHECK_SHAPES)
    candidates: dict[str, Callable[[], object]] = {}
    rows: list[Row] = []
    for denominator in dict.fromkeys(peer.denominator for peer in peers):
        ours = ours_name(denominator)
        candidates[ours] = momentum_step_call(
            [w.copy() for w in ws], gs, [np.zeros_like(w) for w in ws], denominator
        )
        rows.append(Row(name, ours, None, None, "lars_numba, one thread"))
        for peer in (peer for peer in peers if peer.denominator == denominator):
            try:
                stepper = peer.build(ws, gs, LR, WEIGHT_DECAY)
            except ImportError as error:
                rows.append(Row(name, peer.name, None, ours, f"not installed: {error}"))
                continue
            # The stepper checked at the timed hyperparameters is the one timed,
            # from the weights of its last checked step.
            timed = check(stepper, denominator, ws, gs, LR, WEIGHT_DECAY)
            strict = check(
                peer.build(check_ws, check_gs, CHECK_LR, CHECK_WEIGHT_DECAY),
                denominator,
                check_ws,
                check_gs,
                CHECK_LR,
                CHECK_WEIGHT_DECAY,
            )
            verdict = (
                f"max relative difference after {CHECK_STEPS} steps {timed:.1e},"
                f" {strict:.1e} at lr={CHECK_LR}, weight_decay={CHECK_WEIGHT_DECAY}"
                " on CHECK_SHAPES"
            )
            if not (agrees(timed) and agrees(strict)):
                rows.append(Row(name, peer.name, None, ours, f"DISAGREES, not timed: {verdict}"))
                continue
            candidates[peer.name] = stepper.step
            rows.append(Row(name, peer.name, None, ours, f"{verdict}; {stepper.note}"))
    chainer_update = chainer_lars_update(shapes)
    if chainer_update is not None:
        candidates["chainer LARS.update()"] = chainer_update
        rows.append(
            Row(
                name,
                "chainer LARS.update()",
                None,
                ours_name("sum"),
                "lars_numba.chainer.LARS, Chainer's threshold and eps, one thread",
            )
        )
    times = harness.interleaved({**candidates, **harness.stream_candidates(False)}, rounds)
    bandwidth = harness.pop_bandwidth(times)
    return [row._replace(seconds=times.get(row.candidate)) for row in rows], bandwidth


def format_table(models: Sequence[tuple[list[Row], float, int]]) -> str:
    """The table of :func:`model_rows` results, each with the model's element count."""
    table: list = []
    for rows, bandwidth, elements in models:
        floor = FLOOR_BYTES_PER_ELEMENT * elements / bandwidth
        table.append(
            f"{rows[0].model}, {elements} float32 elements: floor {floor * 1e3:.3g} ms"
            f" (7 passes at {bandwidth / 1e9:.1f} GB/s, one core, same rounds)"
        )
        times = {row.candidate: row.seconds for row in rows}
        for row in rows:
            ours = times.get(row.reference) if row.reference else row.seconds
            timed = row.seconds is not None
            table.append(
                [
                    row.candidate,
                    row.seconds * 1e3 if timed else None,
                    row.seconds / floor if timed else None,
                    row.seconds / ours if timed and ours else None,
                    row.note,
                ]
            )
    return harness.format_table(
        ["candidate", "ms/step", "x floor", "x ours", "notes"],
        table,
        formats=[None, ".3f", ".2f", ".2f"],
        indent="  ",
    )


@contextlib.contextmanager
def one_core() -> Iterator[bool]:
    """Run the block with this thread, and the threads it starts, on one core.

    Yields whether the platform could pin; the old mask is restored after.
    """
    if not hasattr(os, "sched_setaffinity"):
        yield False
        return
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cores)})
    try:
        yield True
    finally:
        os.sched_setaffinity(0, cores)


def main(argv: list[str] | None = None, peers: Sequence[Peer] = PEERS) -> int:
    """Print the table; 1 if no peer was timed or one disagrees, else 0."""
    parser = argparse.ArgumentParser(prog="python -m lars_numba.bench_peers", description=__doc__)
    parser.add_argument("--rounds", type=int, default=7, help="samples per candidate")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=MODELS)
    args = parser.parse_args(argv)
    shapes = {
        short: next(s for name, s in bench.whole_models().items() if name.startswith(short))
        for short in args.models
    }
    with one_core() as pinned:
        print(
            f"lars_numba {lars_numba.__version__}, numpy {np.__version__}, "
            f"{'one core (CPU affinity)' if pinned else 'NOT pinned to one core'}; "
            f"lr={LR}, momentum={MOMENTUM}, weight_decay={WEIGHT_DECAY}, eps={EPS}, "
            f"trust coefficient {TRUST_COEFFICIENT}, threshold 0; medians of "
            f"{args.rounds} interleaved rounds; 'x ours': time over momentum_step's "
            "with the same rule"
        )
        models = []
        for short, model_shapes in shapes.items():
            rows, bandwidth = model_rows(short, model_shapes, args.rounds, peers)
            models.append((rows, bandwidth, sum(int(np.prod(s)) for s in model_shapes)))
    print(format_table(models))
    peer_rows = [
        row for rows, _, _ in models for row in rows if row.candidate in {p.name for p in peers}
    ]
    if any(row.note.startswith("DISAGREES") for row in peer_rows):
        print("a peer disagrees with momentum_step: its time is not printed", file=sys.stderr)
        return 1
    if all(row.seconds is None for row in peer_rows):
        print(
            "no peer was timed: pip install 'lars_numba[peers]' (torch, timm, jax, optax)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
