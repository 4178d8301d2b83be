"""``python -m benchmarks.gpu [STEP] [PYTEST_K]``: one GPU session (``benchmarks/gpu/run.sh``).

Steps: ``tests`` (the CUDA tests), ``bench``, ``kv``, ``attend``, ``shapes``, ``tables``
(the benchmarks listed in benchmarks/gpu/__init__.py), ``all`` (every one of these, the
default) and ``variants`` (the decode-attention kernel's configurations, not part of
``all``). Tables go to ``$OUT`` (default ``./gpu_out``).
"""

import argparse
import os
import sys
from pathlib import Path

STEPS = ("tests", "bench", "kv", "attend", "shapes", "tables", "variants", "all")
RUN_SH = Path(__file__).resolve().parent / "run.sh"


def main(argv=None) -> None:
    """Parse the step and hand over to ``run.sh`` (the process is replaced)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu",
                                     description=__doc__.split("\n\n")[1].replace("``", ""))
    parser.add_argument("step", nargs="?", default="all", choices=STEPS)
    parser.add_argument("pytest_k", nargs="?", default="",
                        help="pytest -k expression for the tests step")
    args = parser.parse_args(argv)
    cmd = ["bash", str(RUN_SH), args.step] + ([args.pytest_k] if args.pytest_k else [])
    sys.stdout.flush()
    os.execvp("bash", cmd)


if __name__ == "__main__":
    main()
