"""Dequantization on the GPU, the twin of :mod:`rotorq.cpu.dequantize`: unpack →
centroids × norm in the rotated domain → inverse rotation. Row kernels.
"""

from numba import cuda

from ._jit import device, kernel
from ._threads import row_scratch, row_thread
from .bits import unpack_value
from .rotate import unhadamard_row, unrotor_row


@device
def dequantize_row(codes_row, w, centroids, bits, out, lane, lanes):
    """``out[j] = w · centroids[code j]`` for the whole of ``out``; lanes split the codes."""
    j = lane
    while j < out.shape[0]:
        out[j] = w * centroids[unpack_value(codes_row, bits, j)]
        j += lanes


@kernel
def dequantize_rotated(codes, norms, centroids, bits, out):
    """``out[r] = norms[r] · centroids[codes[r]]`` in the rotated domain, ``out`` (n, D)."""
    lane, lanes, r, _, active = row_thread(codes.shape[0])
    if active:
        dequantize_row(codes[r], norms[r], centroids, bits, out[r], lane, lanes)


@kernel
def dequantize_hadamard(codes, norms, signs, centroids, bits, out):
    """Reconstruct rows ``out`` (n, d) of a randomized-Hadamard quantizer (shared D)."""
    lane, lanes, r, rr, active = row_thread(codes.shape[0])
    _, buf, _ = row_scratch(signs.shape[0])
    dequantize_row(codes[rr], norms[rr], centroids, bits, buf, lane, lanes)
    unhadamard_row(buf, signs, lane, lanes)
    if active:
        j = lane
        while j < out.shape[1]:
            out[r, j] = buf[j]
            j += lanes


@kernel
def dequantize_rotor(codes, norms, mats, centroids, bits, out):
    """Reconstruct rows ``out`` (n, d) of a rotor quantizer (shared D)."""
    lane, lanes, r, rr, active = row_thread(codes.shape[0])
    _, buf, _ = row_scratch(3 * mats.shape[0])
    dequantize_row(codes[rr], norms[rr], centroids, bits, buf, lane, lanes)
    cuda.syncthreads()
    if active:
        unrotor_row(buf, mats, out[r], lane, lanes)
