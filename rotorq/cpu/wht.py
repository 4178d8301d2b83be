"""Orthonormal fast Walsh–Hadamard transform (Sylvester order) on rows."""

import math

import numpy as np

from ._jit import ROWS_PER_TASK, jit, jit_parallel, prange


@jit
def fwht_row(buf):
    """In-place orthonormal WHT of one float32 row whose length is a power of two."""
    n = buf.shape[0]
    h = 1
    while h < n:
        for i in range(0, n, 2 * h):
            for j in range(i, i + h):
                a = buf[j]
                b = buf[j + h]
                buf[j] = a + b
                buf[j + h] = a - b
        h *= 2
    scale = np.float32(1.0 / math.sqrt(n))
    for j in range(n):
        buf[j] *= scale


@jit_parallel
def wht(x, out):
    """``out[r] = H x[r]`` for every row, H the orthonormal Walsh–Hadamard matrix.

    ``x`` (n, D) float32/float64 with D a power of two; ``out`` (n, D) float32.
    """
    n, d = x.shape
    for t in prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        buf = np.empty(d, np.float32)
        for r in range(t * ROWS_PER_TASK, min(n, (t + 1) * ROWS_PER_TASK)):
            for j in range(d):
                buf[j] = x[r, j]
            fwht_row(buf)
            out[r, :] = buf
