"""The fused rotor round trip on the GPU, the twin of :mod:`rotorq.cpu.rotor`.

One launch per batch of rows: embed each 3-group of the normalized vector as a Cl(3,0)
vector, apply its rotor sandwich ``R v R̃`` (as the equivalent 3×3 matrix, docs/math.md),
quantize against the codebook, apply the inverse sandwich and extract the first ``d``
coordinates: the reconstruction ``dequantize(quantize(x))`` with float32 norms, never
leaving the chip. Unlike the public RotorQuant kernel this rotates (R̃(R x) ≠ x is the bug
named in docs/math.md) and uses the associative product table.
"""

import numpy as np
from numba import cuda

from ._jit import kernel
from ._threads import row_scratch, row_thread
from .quantize import encode_codes, row_norm
from .rotate import rotor_row, unrotor_row


@kernel
def rotor_roundtrip(x, mats, boundaries, centroids, norm_correction, out):
    """``out[r]`` = rotor-quantized reconstruction of ``x[r]`` (n, d); row kernel (shared D)."""
    lane, lanes, r, rr, active = row_thread(x.shape[0])
    red, buf, idx = row_scratch(3 * mats.shape[0])
    n = row_norm(x[rr], red, lane, lanes)
    inv_n = 1.0 / n if n > 0.0 else 0.0
    rotor_row(x[rr], mats, inv_n, buf, lane, lanes)
    w = encode_codes(buf, n, boundaries, centroids, norm_correction, idx, red, lane, lanes)
    w32 = np.float32(w)
    j = lane
    while j < buf.shape[0]:
        buf[j] = w32 * centroids[idx[j]]
        j += lanes
    cuda.syncthreads()
    if active:
        unrotor_row(buf, mats, out[r], lane, lanes)
