"""Runs the CUDA kernels under Numba's simulator, in a separate process (CI has no GPU).

The simulator must be switched on before numba.cuda is first imported, hence the
subprocess: ``NUMBA_ENABLE_CUDASIM=1 python -m pytest -m cudasim tests/cuda``. When this test
is selected, ``conftest.py`` starts that process as soon as collection ends and moves the test
to the end of the run, so the simulator (one core, about 5 minutes) runs beside the other
tests instead of after them; the test then waits for it.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 1800
STARTED = pytest.StashKey()
"""``config.stash`` key of the ``(process, log)`` conftest started."""


def start():
    """The simulator run as a background process, its output in a temporary file."""
    import tempfile
    log = tempfile.TemporaryFile(mode="w+")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cudasim",
         "tests/cuda"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    return proc, log


def test_cuda_kernels_under_the_simulator(request):
    pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")
    started = request.config.stash.get(STARTED, None)
    proc, log = started if started is not None else start()
    try:
        proc.wait(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    log.seek(0)
    out = log.read()
    tail = out[-6000:]
    assert proc.returncode == 0, tail
    assert " passed" in out.strip().splitlines()[-1], tail
