"""Fused quantization: norm → rotate → encode against sorted boundaries → pack → norm
(prod mode: → residual → QJL signs → residual norm), one pass over each row.

Shared arguments
----------------
boundaries, centroids : float32 (L-1,), (L,)
    The Lloyd-Max codebook for unit vectors, already scaled to the rotated coordinates.
bits : int
    Bits per code of the MSE stage.
norm_correction : bool
    Store ``‖x‖ / ‖c[idx]‖`` instead of ``‖x‖`` so reconstructions keep their length.
sketch : float32 (m, D)
    QJL matrix applied to the residual in the rotated domain; ``m = 0`` disables prod mode.
codes : uint8 (n, ceil(D*bits/8)); norms : float32 (n,)
qjl_signs : uint8 (n, ceil(m/8)); qjl_norms : float32 (n,)
    Outputs.
"""

import math

import numpy as np

from ._jit import ROWS_PER_TASK, jit, jit_parallel, prange
from .bits import pack_row
from .rotate import hadamard_row, rotor_row


@jit
def encode_value(y, boundaries):
    """Code of ``y``: the number of boundaries ``<= y``.

    A branch-free compare chain up to 4 bits, a binary search above.
    """
    hi = boundaries.shape[0]
    if hi <= 15:
        count = 0
        for i in range(hi):
            count += y >= boundaries[i]
        return count
    lo = 0
    while lo < hi:
        mid = (lo + hi) >> 1
        if y >= boundaries[mid]:
            lo = mid + 1
        else:
            hi = mid
    return lo


@jit
def row_norm(x):
    acc = 0.0
    for j in range(x.shape[0]):
        v = np.float64(x[j])
        acc += v * v
    return math.sqrt(acc)


@jit
def encode_row(y, n, boundaries, centroids, bits, norm_correction, sketch,
               idx, resid, codes_row, qjl_row):
    """Encode the unit-scale rotated row ``y`` of a vector of norm ``n``.

    Writes the packed codes (and QJL signs); returns ``(stored_norm, residual_norm)``.
    """
    cnorm2 = 0.0
    for j in range(y.shape[0]):
        k = encode_value(y[j], boundaries)
        idx[j] = k
        c = np.float64(centroids[k])
        cnorm2 += c * c
    pack_row(idx, bits, codes_row)
    stored = n
    if norm_correction and cnorm2 > 0.0:
        stored = n / math.sqrt(cnorm2)
    m = sketch.shape[0]
    if m == 0:
        return stored, 0.0
    rn2 = 0.0
    for j in range(y.shape[0]):
        r = np.float32(n * y[j] - stored * centroids[idx[j]])
        resid[j] = r
        rn2 += np.float64(r) * r
    acc = np.uint32(0)
    for i in range(m):
        s = np.float32(0.0)
        for j in range(y.shape[0]):
            s += sketch[i, j] * resid[j]
        if s >= 0:
            acc |= np.uint32(1) << np.uint32(i & 7)
        if (i & 7) == 7 or i == m - 1:
            qjl_row[i >> 3] = np.uint8(acc)
            acc = np.uint32(0)
    return stored, math.sqrt(rn2)


@jit_parallel
def _quantize_rows(x, kind, signs, mats, boundaries, centroids, bits, norm_correction,
                   sketch, big_d, codes, norms, qjl_signs, qjl_norms):
    n_rows = x.shape[0]
    for t in prange((n_rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        buf = np.empty(big_d, np.float32)
        resid = np.empty(big_d, np.float32)
        idx = np.empty(big_d, np.uint8)
        for r in range(t * ROWS_PER_TASK, min(n_rows, (t + 1) * ROWS_PER_TASK)):
            n = row_norm(x[r])
            inv_n = 1.0 / n if n > 0.0 else 0.0
            if kind == 1:
                hadamard_row(x[r], signs, inv_n, buf)
            elif kind == 2:
                rotor_row(x[r], mats, inv_n, buf)
            else:
                for j in range(big_d):
                    buf[j] = np.float32(x[r, j] * inv_n)
            stored, rn = encode_row(buf, n, boundaries, centroids, bits, norm_correction,
                                    sketch, idx, resid, codes[r], qjl_signs[r])
            norms[r] = stored
            qjl_norms[r] = rn


@jit
def quantize_rotated(y, boundaries, centroids, bits, norm_correction, sketch,
                     codes, norms, qjl_signs, qjl_norms):
    """Quantize rows that are already rotated (the dense rotation runs as a BLAS matmul)."""
    empty_signs = np.empty(0, np.float32)
    empty_mats = np.empty((0, 3, 3), np.float32)
    _quantize_rows(y, 0, empty_signs, empty_mats, boundaries, centroids, bits,
                            norm_correction, sketch, y.shape[1], codes, norms,
                            qjl_signs, qjl_norms)


@jit
def quantize_hadamard(x, signs, boundaries, centroids, bits, norm_correction, sketch,
                      codes, norms, qjl_signs, qjl_norms):
    """Fused randomized-Hadamard quantization of ``x`` (n, d); ``signs`` float32 (D,) ±1."""
    empty_mats = np.empty((0, 3, 3), np.float32)
    _quantize_rows(x, 1, signs, empty_mats, boundaries, centroids, bits,
                            norm_correction, sketch, signs.shape[0], codes, norms,
                            qjl_signs, qjl_norms)


@jit
def quantize_rotor(x, mats, boundaries, centroids, bits, norm_correction, sketch,
                   codes, norms, qjl_signs, qjl_norms):
    """Fused rotor quantization of ``x`` (n, d); ``mats`` float32 (G, 3, 3) rotor matrices."""
    empty_signs = np.empty(0, np.float32)
    _quantize_rows(x, 2, empty_signs, mats, boundaries, centroids, bits,
                            norm_correction, sketch, 3 * mats.shape[0], codes, norms,
                            qjl_signs, qjl_norms)
