"""Orthonormal fast Walsh–Hadamard transform in shared memory, the twin of :mod:`rotorq.cpu.wht`.

The butterflies run stage by stage (h = 1, 2, 4, …) exactly as on the CPU, so every output
is the same sequence of float32 additions: results are bit-identical to the CPU's.
"""

import math

import numpy as np
from numba import cuda

from ._jit import device, kernel
from ._threads import row_scratch, row_thread


@device
def fwht_row(buf, lane, lanes):
    """In-place orthonormal WHT of the shared row ``buf`` (length a power of two).

    Lanes split the butterflies of each stage. Block barriers: every row of the block must
    have the same length.
    """
    n = buf.shape[0]
    cuda.syncthreads()
    h = 1
    while h < n:
        p = lane
        while p < n >> 1:
            j = ((p & ~(h - 1)) << 1) | (p & (h - 1))
            a = buf[j]
            b = buf[j + h]
            buf[j] = a + b
            buf[j + h] = a - b
            p += lanes
        cuda.syncthreads()
        h <<= 1
    scale = np.float32(1.0 / math.sqrt(n))
    j = lane
    while j < n:
        buf[j] *= scale
        j += lanes
    cuda.syncthreads()


@kernel
def wht(x, out):
    """``out[r] = H x[r]`` for every row; ``x`` (n, D) float16/32/64, D a power of two.

    ``out`` (n, D) of any float dtype (float32 for CPU parity). Row kernel.
    """
    lane, lanes, r, rr, active = row_thread(x.shape[0])
    _, buf, _ = row_scratch(x.shape[1])
    j = lane
    while j < buf.shape[0]:
        buf[j] = np.float32(x[rr, j])
        j += lanes
    fwht_row(buf, lane, lanes)
    if active:
        j = lane
        while j < buf.shape[0]:
            out[r, j] = buf[j]
            j += lanes
