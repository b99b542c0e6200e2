"""The peer benchmark without its peers: it imports, says which peer is missing, checks
peers against momentum_step and times none that disagrees (its figures are not checked)."""

import contextlib
import importlib.util
import subprocess
import sys
import warnings

import numpy as np
import pytest

from lars_numba import bench_peers

# bench_peers imports chainer lazily (its LARS row). Chainer's import warns
# about numpy.distutils and setuptools, which pytest makes errors, so it is
# imported here first, where it is installed, with those warnings ignored.
with warnings.catch_warnings(), contextlib.suppress(ImportError):
    warnings.simplefilter("ignore", DeprecationWarning)
    import chainer  # noqa: F401

PEER_MODULES = ("torch", "timm", "jax", "optax")
HAS_CHAINER = importlib.util.find_spec("chainer") is not None


class _Missing:
    """A meta path finder that makes the peers' frameworks uninstalled."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in PEER_MODULES:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


@pytest.fixture
def no_peers(monkeypatch):
    monkeypatch.setattr(sys, "meta_path", [_Missing(), *sys.meta_path])
    for name in list(sys.modules):
        if name.partition(".")[0] in PEER_MODULES:
            monkeypatch.delitem(sys.modules, name)


def numpy_timm_stepper(ws, gs, lr, weight_decay, *, decay=True):
    """timm's Lars step in plain float32 NumPy (see lars_numba.bench_peers.timm_stepper)."""
    params = [w.copy() for w in ws]
    bufs = [None] * len(ws)
    wd = weight_decay if decay else 0.0

    def step():
        for i, (w, g) in enumerate(zip(params, gs, strict=True)):
            w_norm, g_norm = np.linalg.norm(w), np.linalg.norm(g)
            ratio = (
                bench_peers.TRUST_COEFFICIENT * w_norm / (g_norm + wd * w_norm + bench_peers.EPS)
            )
            grad = (g + np.float32(wd) * w) * np.float32(ratio)
            bufs[i] = grad if bufs[i] is None else np.float32(bench_peers.MOMENTUM) * bufs[i] + grad
            w -= np.float32(lr) * bufs[i]

    return bench_peers.Stepper(step, lambda: params, "NumPy stand-in for timm")


def numpy_optax_stepper(ws, gs, lr, weight_decay):
    """optax's lars in plain float32 NumPy: decay, trust ratio on the update, -lr, trace."""
    params = [w.copy() for w in ws]
    traces = [np.zeros_like(w) for w in ws]

    def step():
        for w, g, t in zip(params, gs, traces, strict=True):
            update = g + np.float32(weight_decay) * w
            ratio = np.linalg.norm(w) / (np.linalg.norm(update) + bench_peers.EPS)
            t *= np.float32(bench_peers.MOMENTUM)
            t -= np.float32(lr) * np.float32(ratio) * update
            w += t

    return bench_peers.Stepper(step, lambda: params, "NumPy stand-in for optax")


def without_decay(ws, gs, lr, weight_decay):
    return numpy_timm_stepper(ws, gs, lr, weight_decay, decay=False)


SHAPES = ((16,), (3, 5), (200,), (1,))
RULES = {
    (bench_peers.LR, bench_peers.WEIGHT_DECAY),
    (bench_peers.CHECK_LR, bench_peers.CHECK_WEIGHT_DECAY),
}


def test_the_module_imports_without_any_peer():
    blocker = (
        "import sys\n"
        "class Missing:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.partition('.')[0] in {PEER_MODULES!r}:\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Missing())\n"
        "import lars_numba.bench_peers\n"
        f"print(sorted(set(sys.modules) & set({PEER_MODULES!r})))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", blocker], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("build", "denominator"), [(numpy_timm_stepper, "sum"), (numpy_optax_stepper, "update")]
)
@pytest.mark.parametrize(("lr", "weight_decay"), sorted(RULES))
def test_the_peers_rules_in_numpy_agree_with_momentum_step(build, denominator, lr, weight_decay):
    ws, gs = bench_peers.model_arrays(SHAPES)
    difference = bench_peers.check(
        build(ws, gs, lr, weight_decay), denominator, ws, gs, lr, weight_decay
    )
    assert bench_peers.agrees(difference)  # float32 rounding, computed differently


def test_the_check_catches_a_wrong_rule():
    ws, gs = bench_peers.model_arrays(bench_peers.CHECK_SHAPES)
    strict = bench_peers.CHECK_LR, bench_peers.CHECK_WEIGHT_DECAY
    wrong = (
        (without_decay, "sum"),
        (numpy_timm_stepper, "update"),
        (numpy_optax_stepper, "sum"),
    )
    for build, denominator in wrong:
        difference = bench_peers.check(build(ws, gs, *strict), denominator, ws, gs, *strict)
        assert not bench_peers.agrees(difference), (build.__name__, denominator)
        assert difference > 1e-3


def test_a_non_finite_peer_disagrees():
    ws, gs = bench_peers.model_arrays(SHAPES)

    def nan_stepper(ws, gs, lr, weight_decay):
        params = [np.full_like(w, np.nan) for w in ws]
        return bench_peers.Stepper(lambda: None, lambda: params, "NaN")

    difference = bench_peers.check(nan_stepper(ws, gs, 0.1, 0.1), "sum", ws, gs, 0.1, 0.1)
    assert not bench_peers.agrees(difference)


def test_relative_difference_is_relative_to_the_weights_above_atol_over_rtol():
    ours = [np.array([2.0, 0.0, -0.5], np.float32)]
    theirs = [np.array([2.0 + 2e-5, 3e-7, -0.5], np.float32)]
    # 2e-5 / 2 at the first element; 3e-7 / (ATOL / RTOL = 0.1) at the second.
    assert bench_peers.relative_difference(theirs, ours) == pytest.approx(1e-5, rel=0.05)
    with pytest.raises(ValueError, match="shape"):
        bench_peers.relative_difference([np.zeros(2)], [np.zeros(3)])


def test_missing_peers_get_a_row_each_and_exit_1(no_peers, capsys):
    assert bench_peers.main(["--rounds", "1", "--models", "1000 x 16"]) == 1
    out, err = capsys.readouterr()
    rows = {line.split("  ")[1].strip(): line for line in out.splitlines() if line.startswith("  ")}
    for peer in ("timm Lars", "optax lars"):
        assert "not installed: No module named" in rows[peer]
        assert rows[peer].split()[2:5] == ["-", "-", "-"]
    for ours in ('momentum_step(denominator="sum")', 'momentum_step(denominator="update")'):
        ms, to_floor, to_ours = map(float, rows[ours].split()[1:4])
        assert ms > 0 and to_floor > 0 and to_ours == 1
    assert ("chainer LARS.update()" in rows) == HAS_CHAINER
    assert "pip install 'lars_numba[peers]'" in err


def test_a_peer_that_disagrees_is_not_timed_and_exits_1(capsys):
    peers = (
        bench_peers.Peer("numpy timm", "sum", numpy_timm_stepper),
        bench_peers.Peer("wrong decay", "sum", without_decay),
        bench_peers.Peer("numpy optax", "update", numpy_optax_stepper),
    )
    rows, bandwidth = bench_peers.model_rows("tiny", SHAPES, 1, peers)
    by_name = {row.candidate: row for row in rows}
    assert bandwidth > 0
    assert by_name["wrong decay"].seconds is None
    assert by_name["wrong decay"].note.startswith("DISAGREES, not timed")
    for name, ours in (("numpy timm", "sum"), ("numpy optax", "update")):
        assert by_name[name].seconds > 0
        assert by_name[name].reference == bench_peers.ours_name(ours)
        assert "max relative difference" in by_name[name].note
    assert bench_peers.main(["--rounds", "1", "--models", "1000 x 16"], peers) == 1
    out, err = capsys.readouterr()
    assert "DISAGREES, not timed" in out
    assert "disagrees" in err


def test_the_table_gives_the_floor_and_the_ratio_to_the_matching_momentum_step():
    ours = bench_peers.ours_name("sum")
    rows = [
        bench_peers.Row("m", ours, 2e-3, None, "lars_numba"),
        bench_peers.Row("m", "peer", 6e-3, ours, "agrees"),
        bench_peers.Row("m", "absent", None, ours, "not installed: No module named 'x'"),
    ]
    # 1000 elements, 28 bytes each, at 28 GB/s: a floor of 1 us.
    text = bench_peers.format_table([(rows, 28e9, 1000)])
    lines = text.splitlines()
    assert "floor 0.001 ms (7 passes at 28.0 GB/s" in lines[1]
    fields = {line.split("  ")[1].strip(): line.split() for line in lines[2:]}
    assert fields[ours][1:4] == ["2.000", "2000.00", "1.00"]
    assert fields["peer"][1:4] == ["6.000", "6000.00", "3.00"]
    assert fields["absent"][1:4] == ["-", "-", "-"]
