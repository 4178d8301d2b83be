"""The one place that configures Numba's CPU compiler for rotorq's kernels."""

import numba

# fastmath would let LLVM reorder sums and break parity with the CUDA twins; leave it off.
jit = numba.njit(cache=True, nogil=True)
jit_parallel = numba.njit(cache=True, nogil=True, parallel=True)
prange = numba.prange

ROWS_PER_TASK = 256
