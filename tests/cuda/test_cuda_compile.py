"""Every CUDA kernel type-checks and compiles to PTX for sm_90, without a GPU.

Needs NVVM and NVRTC, which ``pip install "numba-cuda[cu13]"`` (or ``[cu12]``) provides;
skipped with the reason where they are missing, and under the simulator.
"""

import os
import types

import numpy as np
import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("compile tests need the real numba.cuda, not the simulator",
                allow_module_level=True)

from _cuda_cases import kernel_cases

CC = (9, 0)


def _signature_cases():
    seen, out = set(), []
    for case in kernel_cases():
        key = (case.module, case.kernel,
               tuple((a.dtype.str, a.ndim) if isinstance(a, np.ndarray) else type(a)
                     for a in case.args))
        if key not in seen:
            seen.add(key)
            out.append(case)
    return out


@pytest.fixture(scope="module")
def compiler():
    """``compile_ptx`` with device functions compiled for sm_90 even where no GPU is visible.

    Numba compiles a kernel's device functions for the *current* device's compute
    capability; the fixture substitutes a fake sm_90 device for that lookup.
    """
    import numba.cuda.dispatcher as dispatcher
    from numba import cuda, float32

    def probe(a):
        a[0] = 1.0

    try:
        cuda.compile_ptx(probe, (float32[::1],), cc=CC)
    except Exception as exc:  # missing NVVM / NVRTC libraries
        pytest.skip(f"NVVM/NVRTC unavailable ({type(exc).__name__}: {exc}); "
                    'install them with: pip install "numba-cuda[cu13]"')
    mp = pytest.MonkeyPatch()
    mp.setattr(dispatcher, "get_current_device",
               lambda: types.SimpleNamespace(compute_capability=CC))
    yield cuda.compile_ptx
    mp.undo()


@pytest.mark.parametrize("case", _signature_cases(), ids=lambda c: c.name)
def test_kernel_compiles_for_sm90(compiler, case):
    from rotorq.cuda._jit import kernel_signature

    ptx, _ = compiler(case.get_kernel().py_func, kernel_signature(case.args), cc=CC)
    assert ".entry" in ptx and ".target sm_90" in ptx
