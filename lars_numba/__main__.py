"""``python -m lars_numba {demo,bench}``: the training demo or the benchmark table
(``bench --gpu``: the GPU table)."""

import sys


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("demo", "bench"):
        sys.exit("usage: python -m lars_numba {demo,bench} [options]")
    if argv[0] == "demo":
        from .demo import main as run
    elif argv[1:2] == ["--gpu"]:
        from .bench_gpu import main as run

        argv = argv[1:]
    else:
        from .bench import main as run
    run(argv[1:])


if __name__ == "__main__":
    main()
