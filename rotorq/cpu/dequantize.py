"""Dequantization: unpack → centroids × norm in the rotated domain → inverse rotation."""

import numpy as np

from ._jit import ROWS_PER_TASK, jit, jit_parallel, prange
from .bits import unpack_row
from .rotate import unhadamard_row, unrotor_row


@jit_parallel
def _dequantize_rows(codes, norms, kind, signs, mats, centroids, bits, big_d, out):
    n = codes.shape[0]
    for t in prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        idx = np.empty(big_d, np.uint8)
        y = np.empty(big_d, np.float32)
        buf = np.empty(big_d, np.float32)
        for r in range(t * ROWS_PER_TASK, min(n, (t + 1) * ROWS_PER_TASK)):
            unpack_row(codes[r], bits, big_d, idx)
            w = norms[r]
            for j in range(big_d):
                y[j] = w * centroids[idx[j]]
            if kind == 1:
                unhadamard_row(y, signs, buf, out[r])
            elif kind == 2:
                unrotor_row(y, mats, out[r])
            else:
                out[r, :] = y


@jit
def dequantize_rotated(codes, norms, centroids, bits, out):
    """``out[r] = norms[r] · centroids[codes[r]]`` in the rotated domain, ``out`` (n, D)."""
    _dequantize_rows(codes, norms, 0, np.empty(0, np.float32), np.empty((0, 3, 3), np.float32),
                     centroids, bits, out.shape[1], out)


@jit
def dequantize_hadamard(codes, norms, signs, centroids, bits, out):
    """Reconstruct rows ``out`` (n, d) of a randomized-Hadamard quantizer."""
    _dequantize_rows(codes, norms, 1, signs, np.empty((0, 3, 3), np.float32),
                     centroids, bits, signs.shape[0], out)


@jit
def dequantize_rotor(codes, norms, mats, centroids, bits, out):
    """Reconstruct rows ``out`` (n, d) of a rotor quantizer."""
    _dequantize_rows(codes, norms, 2, np.empty(0, np.float32), mats,
                     centroids, bits, 3 * mats.shape[0], out)
