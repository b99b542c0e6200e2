"""``python -m lars_numba {demo,bench}``: the training demo or the benchmark table
(``bench --gpu``: the GPU table; ``bench --host``: the host's share of a GPU
call, on stand-ins)."""

import sys


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("demo", "bench"):
        sys.exit("usage: python -m lars_numba {demo,bench} [options]")
    options = argv[1:]
    if argv[0] == "demo":
        from .demo import main as run
    elif options[:1] == ["--gpu"]:
        from .bench_gpu import main as run

        options = options[1:]
    elif options[:1] == ["--host"]:
        from .bench_host import main as run

        options = options[1:]
    else:
        from .bench import main as run
    run(options)


if __name__ == "__main__":
    main()
