"""Runs the CUDA kernels under Numba's simulator, in a separate process (CI has no GPU).

The simulator must be switched on before numba.cuda is first imported, hence the
subprocess: ``NUMBA_ENABLE_CUDASIM=1 python -m pytest -m cudasim tests/cuda``.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_cuda_kernels_under_the_simulator():
    pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cudasim",
         "tests/cuda"], cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    tail = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout.splitlines()[-1], tail
