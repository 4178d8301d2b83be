"""Rotations of rows on the GPU, the twin of :mod:`rotorq.cpu.rotate`.

Forward rotations scale by ``inv_n`` (float64, as on the CPU) so the quantizer normalizes
on the way. The Hadamard helpers work on a shared-memory row and contain block barriers;
the rotor helpers (3×3 matrix per 3-group, 9 FMA) have none and may write anywhere.
"""

import numpy as np
from numba import cuda

from ._jit import device, kernel
from ._threads import row_scratch, row_thread
from .wht import fwht_row


@device
def hadamard_row(x, signs, inv_n, buf, lane, lanes):
    """``buf = H (s ⊙ pad(x)) · inv_n`` for the shared row ``buf`` of length D. Block barriers."""
    d = x.shape[0]
    j = lane
    while j < buf.shape[0]:
        if j < d:
            buf[j] = np.float32(np.float64(x[j]) * inv_n) * signs[j]
        else:
            buf[j] = np.float32(0.0)
        j += lanes
    fwht_row(buf, lane, lanes)


@device
def unhadamard_row(buf, signs, lane, lanes):
    """In place ``buf = s ⊙ H buf`` — the inverse of :func:`hadamard_row`. Block barriers."""
    fwht_row(buf, lane, lanes)
    j = lane
    while j < buf.shape[0]:
        buf[j] *= signs[j]
        j += lanes
    cuda.syncthreads()


@device
def rotor_row(x, mats, inv_n, out, lane, lanes):
    """``out[3g:3g+3] = M_g · pad(x)[3g:3g+3] · inv_n`` for every 3-group; lanes split the groups."""
    d = x.shape[0]
    g = lane
    while g < mats.shape[0]:
        j = 3 * g
        v0 = np.float32(np.float64(x[j]) * inv_n)
        v1 = np.float32(np.float64(x[j + 1]) * inv_n) if j + 1 < d else np.float32(0.0)
        v2 = np.float32(np.float64(x[j + 2]) * inv_n) if j + 2 < d else np.float32(0.0)
        for k in range(3):
            out[j + k] = mats[g, k, 0] * v0 + mats[g, k, 1] * v1 + mats[g, k, 2] * v2
        g += lanes


@device
def unrotor_row(y, mats, out, lane, lanes):
    """``out = (M_gᵀ y_g)[:d]`` — the inverse of :func:`rotor_row`; lanes split the groups."""
    d = out.shape[0]
    g = lane
    while g < mats.shape[0]:
        y0 = y[3 * g]
        y1 = y[3 * g + 1]
        y2 = y[3 * g + 2]
        for k in range(3):
            j = 3 * g + k
            if j < d:
                out[j] = mats[g, 0, k] * y0 + mats[g, 1, k] * y1 + mats[g, 2, k] * y2
        g += lanes


@kernel
def rotate_hadamard(x, signs, scale, out):
    """Rotate every row of ``x`` (n, d), times ``scale``, into ``out`` (n, D) float32. Row
    kernel (shared D)."""
    lane, lanes, r, rr, active = row_thread(x.shape[0])
    _, buf, _ = row_scratch(signs.shape[0])
    hadamard_row(x[rr], signs, scale, buf, lane, lanes)
    if active:
        j = lane
        while j < buf.shape[0]:
            out[r, j] = buf[j]
            j += lanes


@kernel
def unrotate_hadamard(y, signs, out):
    """Inverse-rotate every row of ``y`` (n, D) into ``out`` (n, d) float32. Row kernel (shared D)."""
    lane, lanes, r, rr, active = row_thread(y.shape[0])
    _, buf, _ = row_scratch(signs.shape[0])
    j = lane
    while j < buf.shape[0]:
        buf[j] = y[rr, j]
        j += lanes
    unhadamard_row(buf, signs, lane, lanes)
    if active:
        j = lane
        while j < out.shape[1]:
            out[r, j] = buf[j]
            j += lanes


@kernel
def rotate_rotor(x, mats, scale, out):
    """Rotate every row of ``x`` (n, d), times ``scale``, by the rotor matrices into ``out``
    (n, D). Row kernel."""
    lane, lanes, r, _, active = row_thread(x.shape[0])
    if active:
        rotor_row(x[r], mats, scale, out[r], lane, lanes)


@kernel
def unrotate_rotor(y, mats, out):
    """Inverse-rotate every row of ``y`` (n, D) into ``out`` (n, d) float32. Row kernel."""
    lane, lanes, r, _, active = row_thread(y.shape[0])
    if active:
        unrotor_row(y[r], mats, out[r], lane, lanes)
