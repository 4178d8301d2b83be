"""CUDA test selection.

- ``cudasim`` tests run the kernels under Numba's simulator, in their own process:
  ``NUMBA_ENABLE_CUDASIM=1 python -m pytest -m cudasim tests/cuda``. Without that variable
  they are skipped, and their module imports no numba.cuda kernel.
- ``cuda`` tests need a real GPU and cupy (``python -m pytest -m cuda tests/cuda``); they are
  skipped under the simulator and where no GPU is visible.
- The compile-only tests need NVVM (``pip install "numba-cuda[cu13]"``) and skip without it.
"""

import os

import pytest

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("cudasim") and not SIMULATOR:
            item.add_marker(pytest.mark.skip(
                reason="simulator test: run with NUMBA_ENABLE_CUDASIM=1 -m cudasim"))
        if item.get_closest_marker("cuda") and SIMULATOR:
            item.add_marker(pytest.mark.skip(reason="real-GPU test: not under the simulator"))


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every array :mod:`rotorq.cuda.api` allocates for a result starts as NaN (floats) or
    0xAB (integers), so an element a kernel skips shows up (real-GPU tests)."""
    import importlib

    import cupy as cp
    import numpy as np
    api = importlib.import_module("rotorq.cuda.api")

    def empty(shape, dtype):
        a = cp.empty(shape, dtype)
        a.fill(np.nan if a.dtype.kind == "f" else 0xAB)
        return a

    monkeypatch.setattr(api, "_empty", empty)
