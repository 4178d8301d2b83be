"""The one place that configures Numba's CUDA compiler for rotorq's kernels.

No ``fastmath``: it would reorder sums and flush denormals, breaking parity with the CPU
twins (:mod:`rotorq.cpu`). NVVM still contracts ``a*b + c`` into FMAs, which is the source
of the rare, documented code flips at rounding boundaries.
"""

import numba
import numpy as np
from numba import config, cuda, types

SIMULATOR = bool(config.ENABLE_CUDASIM)
"""True when ``NUMBA_ENABLE_CUDASIM=1``: kernels run on the host, one Python thread each."""

kernel = cuda.jit
device = cuda.jit(device=True)


def kernel_signature(args):
    """Numba argument types of a kernel call: C-contiguous arrays, int64 and float64 scalars.

    Parameters
    ----------
    args : sequence
        Arrays (anything with ``dtype`` and ``ndim``: numpy, cupy), Python/numpy ints and bools
        (passed as int64) and floats (float64).

    Returns
    -------
    tuple of numba types
    """
    sig = []
    for a in args:
        if hasattr(a, "ndim") and hasattr(a, "dtype") and a.ndim > 0:
            sig.append(types.Array(numba.from_dtype(a.dtype), a.ndim, "C"))
        elif isinstance(a, (float, np.floating)):
            sig.append(types.float64)
        else:
            sig.append(types.int64)
    return tuple(sig)
