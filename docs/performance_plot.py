"""Measure the benchmark table and plot it for the performance page.

Run on demand, not at every docs build (it takes a few minutes and timings on
a shared machine are noisy); commit what it writes::

    .venv/bin/python docs/performance_plot.py [--rounds 7]

It writes ``docs/performance_results.inc`` (the machine, the bandwidth and
the two tables, included by ``performance.rst``),
``docs/performance_first_call.inc`` (import and first call, cold and warm) and
``docs/_static/performance.png``. The numbers come from
:mod:`lars_numba.bench`, the code behind ``python -m lars_numba bench``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed

import matplotlib.pyplot as plt
import numba
import numpy as np

import lars_numba
from lars_numba import bench, harness

DOCS = Path(__file__).resolve().parent
LABELS = {
    "chainer": "Chainer's GradientLARS",
    "numpy": "the rule in NumPy",
    "lars_numba": "lars_numba.scale",
    "floor": "bandwidth floor",
}


def machine() -> str:
    """The CPU as ``lscpu`` names it, with its cores and last-level cache."""
    fields = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    for line in out.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    parts = [fields.get("Model name", platform.machine()), f"{fields.get('CPU(s)', '?')} cores"]
    if "L3 cache" in fields:
        parts.append(f"L3 {fields['L3 cache']}")
    if "Hypervisor vendor" in fields:
        parts.append(f"virtual machine ({fields['Hypervisor vendor']})")
    return ", ".join(parts)


def _us(seconds: float) -> str:
    value = seconds * 1e6
    if value >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}" if value < 10 else f"{value:.1f}"


# Below about a microsecond the floor is far under the cost of any Python call,
# and the ratio to it says nothing about memory traffic.
FLOOR_SHOWN_FROM = 1e-6


def _floor_ratio(row) -> str:
    if row["floor"] < FLOOR_SHOWN_FROM:
        return "n/a"
    return f"{row['lars_numba'] / row['floor']:.2f}"


def _list_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = [".. list-table::", "   :header-rows: 1", ""]
    for row in [header, *rows]:
        lines.append(f"   * - {row[0]}")
        lines.extend(f"     - {cell}" for cell in row[1:])
    return [*lines, ""]


def _model_table(models) -> list[str]:
    """The whole-model table: milliseconds per update and the ratio to ``scale_all``."""
    names = list(models[0][2])
    lines = [
        "Every gradient of a float32 model once, ``weight_decay=1e-4``, median "
        "milliseconds per update (ratio to ``scale_all`` in brackets); the floors "
        "are five and three passes of the model's bytes at the bandwidth measured in "
        "the same rounds (last column). "
        "``chainer_hook`` and ``lars_hook`` are the per-parameter hooks called as the "
        "optimizer calls them, ``fused_hook`` is :class:`~lars_numba.chainer."
        "FusedGradientLARS` (``parallel=True``), ``scale_loop`` one "
        ":func:`~lars_numba.scale` per array:",
        "",
    ]
    table = [
        [name, f"{size:,}"]
        + [f"{times[n] * 1e3:.3g} ({times[n] / times['scale_all']:.2f})" for n in names]
        + [f"{bandwidth / 1e9:.1f}"]
        for name, size, times, bandwidth in models
    ]
    return lines + _list_table(["model", "elements", *names, "GB/s"], table)


def write_results(rows, hooks, models, loads, path: Path) -> None:
    threads = numba.get_num_threads()
    lines = [
        ".. This file is written by docs/performance_plot.py; do not edit it by hand.",
        "",
        f"Measured {datetime.date.today().isoformat()} on {machine()}, Linux, "
        f"Python {platform.python_version()}, lars_numba {lars_numba.__version__}, "
        f"Numba {numba.__version__} ({threads} threads), NumPy {np.__version__}. "
        "Bandwidth, measured in the same rounds as each row's candidates: "
        f"{bench.bandwidth_range(rows, 1)} on 1 thread, "
        f"{bench.bandwidth_range(rows, threads)} on {threads}. "
        f"One-minute load average {loads[0]:.1f} before the run and {loads[1]:.1f} after it "
        "(other processes share the machine). NumPy's BLAS on one thread "
        "(``lars_numba.harness.single_threaded_blas``).",
        "",
        "``scale(w, g, weight_decay=1e-4)`` on float32 arrays of N elements, median "
        "microseconds per call:",
        "",
    ]
    has_chainer = "chainer" in rows[0]
    header = ["N", "threads"]
    header += ["Chainer's hook"] if has_chainer else []
    header += ["NumPy", "lars_numba", "floor"]
    header += ["Chainer / lars_numba"] if has_chainer else []
    header += ["lars_numba / floor"]
    table = []
    for row in rows:
        cells = [f"{row['N']:,}", str(row["threads"])]
        cells += [_us(row["chainer"])] if has_chainer else []
        cells += [_us(row["numpy"]), _us(row["lars_numba"]), _us(row["floor"])]
        cells += [f"{row['chainer'] / row['lars_numba']:.2f}"] if has_chainer else []
        cells += [_floor_ratio(row)]
        table.append(cells)
    lines += _list_table(header, table)
    lines += _model_table(models)
    if hooks:
        lines += [
            "The hook inside SGD's ``optimizer.update()``, float32, microseconds of hook "
            "per parameter (update time with the hook minus without, over the parameters):",
            "",
        ]
        table = []
        for n, size, times in hooks:
            chainer_cost, lars_cost = (
                (times[name] - times["no hook"]) / n for name in ("chainer", "lars_numba")
            )
            table.append(
                [
                    f"{n} x {size:,}",
                    _us(chainer_cost),
                    _us(lars_cost),
                    f"{chainer_cost / lars_cost:.2f}",
                ]
            )
        lines += _list_table(
            ["parameters x elements", "Chainer's hook", "lars_numba's hook", "ratio"], table
        )
    path.write_text("\n".join(lines))


def plot(rows, path: Path) -> None:
    sizes = np.array([row["N"] for row in rows])
    fig, (times_ax, ratio_ax) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    # Chainer's hook and plain NumPy take about the same time: the dotted,
    # smaller NumPy markers keep both visible where they overlap.
    styles = {
        "chainer": {"fmt": "o-", "markersize": 7},
        "numpy": {"fmt": "s:", "markersize": 4},
        "lars_numba": {"fmt": "D-", "markersize": 5},
        "floor": {"fmt": "k--"},
    }
    for name, style in styles.items():
        if name in rows[0]:
            times = np.array([row[name] for row in rows]) * 1e6
            fmt = style.pop("fmt")
            times_ax.loglog(sizes, times, fmt, label=LABELS[name], **style)
    times_ax.set(xlabel="elements per array (float32)", ylabel="microseconds per call")
    times_ax.set_title("Time per call (median)")
    times_ax.grid(True, which="major", alpha=0.3)
    times_ax.legend()

    lars = np.array([row["lars_numba"] for row in rows])
    for name, fmt in (("chainer", "o-"), ("numpy", "s:")):
        if name in rows[0]:
            ratio = np.array([row[name] for row in rows]) / lars
            ratio_ax.semilogx(sizes, ratio, fmt, label=f"{LABELS[name]} / lars_numba")
    shown = [row for row in rows if row["floor"] >= FLOOR_SHOWN_FROM]
    ratio_ax.semilogx(
        [row["N"] for row in shown],
        [row["lars_numba"] / row["floor"] for row in shown],
        "D--",
        label="lars_numba / floor",
    )
    ratio_ax.axhline(1.0, color="k", linewidth=0.8)
    ratio_ax.set(xlabel="elements per array (float32)", ylabel="ratio", ylim=(0, None))
    ratio_ax.set_title("Speed-up over Chainer, and distance to the floor")
    ratio_ax.grid(True, which="major", alpha=0.3)
    ratio_ax.legend(loc="upper center")
    ratio_ax.set_ylim(0, 1.3 * ratio_ax.get_ylim()[1])  # room for the legend
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=bench.SIZES)
    parser.add_argument("--rounds", type=int, default=7, help="samples per candidate")
    args = parser.parse_args(argv)

    harness.single_threaded_blas()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as cache_dir:
        cold = bench.first_call_seconds(cache_dir)
        warm = bench.first_call_seconds(cache_dir)
    (DOCS / "performance_first_call.inc").write_text(
        ".. This file is written by docs/performance_plot.py; do not edit it by hand.\n\n"
        f"- {cold:.2f} s with an empty cache (compiling the float32 kernels);\n"
        f"- {warm:.2f} s with the kernels in the cache.\n"
    )
    rows = bench.scale_rows(args.sizes, args.rounds)
    models = bench.model_rows(list(bench.whole_models()), args.rounds)
    hooks = bench.hook_rows(args.rounds)
    loads = (load_before, os.getloadavg()[0])
    write_results(rows, hooks, models, loads, DOCS / "performance_results.inc")
    plot(rows, DOCS / "_static" / "performance.png")
    print(f"wrote {DOCS / 'performance_results.inc'} and {DOCS / '_static' / 'performance.png'}")


if __name__ == "__main__":
    main()
