"""Fused quantization on the GPU, the twin of :mod:`rotorq.cpu.quantize`.

One launch per batch of rows: load (float16/32/64) → norm → rotate (Hadamard in shared
memory, or rotor 3×3 blocks) → encode against the sorted boundaries → pack → norm, and in
prod mode → residual → QJL signs → residual norm. The dense rotation is a cuBLAS matmul
followed by :func:`quantize_rotated`.

Arguments are those of the CPU twins (see :mod:`rotorq.cpu.quantize`); ``norm_correction``
is an int flag. All are row kernels over ``D`` (the stored dimension) of shared memory.
"""

import math

import numpy as np
from numba import cuda

from ._jit import device, kernel
from ._threads import row_scratch, row_sum, row_thread
from .bits import pack_row
from .qjl import sketch_signs_row
from .rotate import hadamard_row, rotor_row


@device
def encode_value(y, boundaries):
    """Code of ``y``: the number of boundaries ``<= y`` (binary search)."""
    lo = 0
    hi = boundaries.shape[0]
    while lo < hi:
        mid = (lo + hi) >> 1
        if y >= boundaries[mid]:
            lo = mid + 1
        else:
            hi = mid
    return lo


@device
def row_norm(x, red, lane, lanes):
    """``‖x‖`` in float64 (lanes' partial sums, then a tree). Block barriers."""
    part = 0.0
    j = lane
    while j < x.shape[0]:
        v = np.float64(x[j])
        part += v * v
        j += lanes
    return math.sqrt(row_sum(part, red, lane, lanes))


@device
def encode_codes(y, n, boundaries, centroids, norm_correction, idx, red, lane, lanes):
    """Codes of the unit-scale shared row ``y`` into the shared ``idx``; returns the stored norm.

    ``y`` may have been written by any lane. Block barriers; ``idx`` is complete on return.
    """
    cuda.syncthreads()
    part = 0.0
    j = lane
    while j < y.shape[0]:
        k = encode_value(y[j], boundaries)
        idx[j] = k
        c = np.float64(centroids[k])
        part += c * c
        j += lanes
    if norm_correction:
        cnorm2 = row_sum(part, red, lane, lanes)
        if cnorm2 > 0.0:
            return n / math.sqrt(cnorm2)
    else:
        cuda.syncthreads()
    return n


@device
def encode_row(y, n, boundaries, centroids, bits, norm_correction, sketch, idx, red,
               codes_row, qjl_row, lane, lanes, active):
    """Encode the unit-scale shared row ``y`` of a vector of norm ``n``.

    Writes the packed codes (and, when ``sketch`` has rows, the QJL signs of the residual,
    computed in place in ``y``) if ``active``; returns ``(stored_norm, residual_norm)``.
    Block barriers.
    """
    stored = encode_codes(y, n, boundaries, centroids, norm_correction, idx, red, lane, lanes)
    if active:
        pack_row(idx, bits, codes_row, lane, lanes)
    if sketch.shape[0] == 0:
        return stored, 0.0
    part = 0.0
    j = lane
    while j < y.shape[0]:
        r = np.float32(n * y[j] - stored * centroids[idx[j]])
        y[j] = r
        part += np.float64(r) * r
        j += lanes
    rn = math.sqrt(row_sum(part, red, lane, lanes))
    if active:
        sketch_signs_row(y, sketch, qjl_row, lane, lanes)
    return stored, rn


@device
def store_row(y, n, boundaries, centroids, bits, norm_correction, sketch, idx, red,
              codes, norms, qjl_signs, qjl_norms, lane, lanes, r, rr, active):
    """:func:`encode_row` for row ``r`` of the outputs, then its two norms. Block barriers."""
    stored, rn = encode_row(y, n, boundaries, centroids, bits, norm_correction, sketch, idx,
                            red, codes[rr], qjl_signs[rr], lane, lanes, active)
    if active and lane == 0:
        norms[r] = stored
        qjl_norms[r] = rn


@kernel
def quantize_rotated(y, boundaries, centroids, bits, norm_correction, sketch,
                     codes, norms, qjl_signs, qjl_norms):
    """Quantize rows that are already rotated (the dense rotation runs as a cuBLAS matmul)."""
    lane, lanes, r, rr, active = row_thread(y.shape[0])
    red, buf, idx = row_scratch(y.shape[1])
    n = row_norm(y[rr], red, lane, lanes)
    inv_n = 1.0 / n if n > 0.0 else 0.0
    j = lane
    while j < buf.shape[0]:
        buf[j] = np.float32(np.float64(y[rr, j]) * inv_n)
        j += lanes
    store_row(buf, n, boundaries, centroids, bits, norm_correction, sketch, idx, red,
              codes, norms, qjl_signs, qjl_norms, lane, lanes, r, rr, active)


@kernel
def quantize_hadamard(x, signs, boundaries, centroids, bits, norm_correction, sketch,
                      codes, norms, qjl_signs, qjl_norms):
    """Fused randomized-Hadamard quantization of ``x`` (n, d); ``signs`` float32 (D,) ±1."""
    lane, lanes, r, rr, active = row_thread(x.shape[0])
    red, buf, idx = row_scratch(signs.shape[0])
    n = row_norm(x[rr], red, lane, lanes)
    inv_n = 1.0 / n if n > 0.0 else 0.0
    hadamard_row(x[rr], signs, inv_n, buf, lane, lanes)
    store_row(buf, n, boundaries, centroids, bits, norm_correction, sketch, idx, red,
              codes, norms, qjl_signs, qjl_norms, lane, lanes, r, rr, active)


@kernel
def quantize_rotor(x, mats, boundaries, centroids, bits, norm_correction, sketch,
                   codes, norms, qjl_signs, qjl_norms):
    """Fused rotor quantization of ``x`` (n, d); ``mats`` float32 (G, 3, 3) rotor matrices."""
    lane, lanes, r, rr, active = row_thread(x.shape[0])
    red, buf, idx = row_scratch(3 * mats.shape[0])
    n = row_norm(x[rr], red, lane, lanes)
    inv_n = 1.0 / n if n > 0.0 else 0.0
    rotor_row(x[rr], mats, inv_n, buf, lane, lanes)
    store_row(buf, n, boundaries, centroids, bits, norm_correction, sketch, idx, red,
              codes, norms, qjl_signs, qjl_norms, lane, lanes, r, rr, active)
