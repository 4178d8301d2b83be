"""The one place that configures Numba's CPU compiler for rotorq's kernels.

Every kernel is compiled with ``cache=True``: Numba keeps the machine code on disk (beside the
module in ``__pycache__``, or under ``NUMBA_CACHE_DIR``), so a later process loads it instead
of compiling again. Compiles are logged on the ``"rotorq"`` logger (:mod:`rotorq._log`).
"""

import numba

from .. import _log  # noqa: F401  (registers the compile-event listener before any kernel compiles)

# fastmath would let LLVM reorder sums and break parity with the CUDA twins; leave it off.
jit = numba.njit(cache=True, nogil=True)
jit_parallel = numba.njit(cache=True, nogil=True, parallel=True)
prange = numba.prange

ROWS_PER_TASK = 256
