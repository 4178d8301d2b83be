"""The fused rotor round trip: normalize → rotor sandwich per 3-group (3×3 form) → encode →
reconstruct → inverse sandwich → first ``d`` coordinates, one pass over each row.

The result equals ``dequantize(quantize(x))`` of a rotor quantizer with float32 norms;
:mod:`rotorq.cuda.rotor` is its GPU twin.
"""

import math

import numpy as np

from ._jit import ROWS_PER_TASK, jit_parallel, prange
from .quantize import encode_value, row_norm
from .rotate import rotor_row, unrotor_row


@jit_parallel
def rotor_roundtrip(x, mats, boundaries, centroids, norm_correction, out):
    """``out[r]`` (n, d) float32 = the rotor-quantized reconstruction of ``x[r]`` (n, d).

    ``mats`` float32 (G, 3, 3) rotor matrices; ``boundaries``/``centroids`` the scaled
    codebook; ``norm_correction`` as in :mod:`rotorq.cpu.quantize`.
    """
    n_rows = x.shape[0]
    big_d = 3 * mats.shape[0]
    for t in prange((n_rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        buf = np.empty(big_d, np.float32)
        idx = np.empty(big_d, np.int64)
        for r in range(t * ROWS_PER_TASK, min(n_rows, (t + 1) * ROWS_PER_TASK)):
            n = row_norm(x[r])
            inv_n = 1.0 / n if n > 0.0 else 0.0
            rotor_row(x[r], mats, inv_n, buf)
            cnorm2 = 0.0
            for j in range(big_d):
                k = encode_value(buf[j], boundaries)
                idx[j] = k
                c = np.float64(centroids[k])
                cnorm2 += c * c
            w = n
            if norm_correction and cnorm2 > 0.0:
                w = n / math.sqrt(cnorm2)
            w32 = np.float32(w)
            for j in range(big_d):
                buf[j] = w32 * centroids[idx[j]]
            unrotor_row(buf, mats, out[r])
