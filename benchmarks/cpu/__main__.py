"""``python -m benchmarks.cpu``: the CPU benchmark suite (:mod:`benchmarks.cpu.suite`)."""

from benchmarks.cpu.suite import main

if __name__ == "__main__":
    main()
