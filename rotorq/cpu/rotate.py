"""Rotations of rows: randomized Hadamard (pad to a power of two) and Cl(3,0) rotors (3×3 form).

``x`` rows have the caller's dimension ``d``; rotated rows have the stored dimension ``D``
(Hadamard: the next power of two; rotor: 3·⌈d/3⌉). Forward rotations scale by ``inv_n``
so the quantizer can normalize on the way.
"""

import numpy as np

from ._jit import ROWS_PER_TASK, jit, jit_parallel, prange
from .wht import fwht_row


@jit
def hadamard_row(x, signs, inv_n, buf):
    """``buf = H (s ⊙ pad(x)) * inv_n``."""
    d = x.shape[0]
    for j in range(d):
        buf[j] = np.float32(x[j] * inv_n) * signs[j]
    for j in range(d, buf.shape[0]):
        buf[j] = 0.0
    fwht_row(buf)


@jit
def unhadamard_row(y, signs, buf, out):
    """``out = (s ⊙ H y)[:d]`` — the inverse of :func:`hadamard_row` (without the scale)."""
    for j in range(y.shape[0]):
        buf[j] = y[j]
    fwht_row(buf)
    for j in range(out.shape[0]):
        out[j] = buf[j] * signs[j]


@jit
def rotor_row(x, mats, inv_n, buf):
    """``buf[3g:3g+3] = M_g · pad(x)[3g:3g+3] * inv_n`` for every 3-group ``g``."""
    d = x.shape[0]
    for g in range(mats.shape[0]):
        v0 = np.float32(x[3 * g] * inv_n)
        v1 = np.float32(x[3 * g + 1] * inv_n) if 3 * g + 1 < d else np.float32(0.0)
        v2 = np.float32(x[3 * g + 2] * inv_n) if 3 * g + 2 < d else np.float32(0.0)
        for k in range(3):
            buf[3 * g + k] = mats[g, k, 0] * v0 + mats[g, k, 1] * v1 + mats[g, k, 2] * v2


@jit
def unrotor_row(y, mats, out):
    """``out = (M_gᵀ y_g)[:d]`` — the inverse of :func:`rotor_row` (without the scale)."""
    d = out.shape[0]
    for g in range(mats.shape[0]):
        y0 = y[3 * g]
        y1 = y[3 * g + 1]
        y2 = y[3 * g + 2]
        for k in range(3):
            j = 3 * g + k
            if j < d:
                out[j] = mats[g, 0, k] * y0 + mats[g, 1, k] * y1 + mats[g, 2, k] * y2


@jit_parallel
def rotate_hadamard(x, signs, scale, out):
    """Rotate every row of ``x`` (n, d), times ``scale``, into ``out`` (n, D) float32."""
    n = x.shape[0]
    for t in prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        for r in range(t * ROWS_PER_TASK, min(n, (t + 1) * ROWS_PER_TASK)):
            hadamard_row(x[r], signs, scale, out[r])


@jit_parallel
def unrotate_hadamard(y, signs, out):
    """Inverse-rotate every row of ``y`` (n, D) into ``out`` (n, d) float32."""
    n, big_d = y.shape
    for t in prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        buf = np.empty(big_d, np.float32)
        for r in range(t * ROWS_PER_TASK, min(n, (t + 1) * ROWS_PER_TASK)):
            unhadamard_row(y[r], signs, buf, out[r])


@jit_parallel
def rotate_rotor(x, mats, scale, out):
    """Rotate every row of ``x`` (n, d), times ``scale``, by the 3×3 rotor matrices into
    ``out`` (n, D)."""
    n = x.shape[0]
    for t in prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        for r in range(t * ROWS_PER_TASK, min(n, (t + 1) * ROWS_PER_TASK)):
            rotor_row(x[r], mats, scale, out[r])


@jit_parallel
def unrotate_rotor(y, mats, out):
    """Inverse-rotate every row of ``y`` (n, D) into ``out`` (n, d) float32."""
    n = y.shape[0]
    for t in prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        for r in range(t * ROWS_PER_TASK, min(n, (t + 1) * ROWS_PER_TASK)):
            unrotor_row(y[r], mats, out[r])
