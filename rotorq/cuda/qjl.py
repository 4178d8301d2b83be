"""QJL on the GPU, the twin of :mod:`rotorq.cpu.qjl`: sign sketches and their estimator.

Any dimension and any number of query rows per key batch (the reference CUDA code fixes
d = 128 and at most 4 heads per group). Sign bytes are computed independently, so lanes
split them; the score kernel reads each key's signs once for all its query rows.
"""

import math

import numba
import numpy as np
from numba import cuda

from ._jit import device, kernel
from ._threads import MAX_QUERIES, key_thread, row_scratch, row_sum, row_thread, stage_rows
from .bits import read_code


@device
def sign_dots(qs, m, count, queries, sign_row, acc):
    """``acc[i] += Σ_t qs[i·m + t] · (±1)_t`` for ``i < count ≤ queries``, signs packed LSB
    first in ``sign_row`` (uint8 or uint32 words).

    The multi-query form of :func:`rotorq.cpu.qjl.sign_dot`: one pass over a key's signs
    serves every query row (same summation order per query as the CPU). ``queries`` is a
    constant at each call site, so the query loop unrolls into registers.
    """
    wbits = 8 * sign_row.itemsize
    w = 0
    buf = 0
    nbuf = 0
    for t in range(m):
        bit, w, buf, nbuf = read_code(sign_row, wbits, 1, w, buf, nbuf)
        for i in range(queries):
            if i < count:
                q = qs[i * m + t]
                acc[i] += q if bit else -q


@device
def sketch_signs_row(x, sketch, out_row, lane, lanes):
    """Pack ``sign(sketch @ x)`` (bit 1 for ``>= 0``) of the float32 row ``x``; lanes split bytes."""
    m, d = sketch.shape
    o = lane
    while o < out_row.shape[0]:
        acc = 0
        for bit in range(8):
            i = 8 * o + bit
            if i < m:
                s = np.float32(0.0)
                for j in range(d):
                    s += sketch[i, j] * x[j]
                if s >= 0:
                    acc |= 1 << bit
        out_row[o] = np.uint8(acc)
        o += lanes


@kernel
def qjl_quantize(x, sketch, signs, norms):
    """Signs of ``sketch @ x[r]`` and ``‖x[r]‖`` for every row of ``x`` (n, d). Row kernel (shared d)."""
    lane, lanes, r, rr, active = row_thread(x.shape[0])
    red, buf, _ = row_scratch(x.shape[1])
    part = 0.0
    j = lane
    while j < buf.shape[0]:
        v = np.float64(x[rr, j])
        buf[j] = np.float32(x[rr, j])
        part += v * v
        j += lanes
    n = math.sqrt(row_sum(part, red, lane, lanes))
    if active:
        sketch_signs_row(buf, sketch, signs[r], lane, lanes)
        if lane == 0:
            norms[r] = n


@kernel
def qjl_scores(qsketch, qmap, signs, norms, kmap, scale, out):
    """``out[b, i, j] = scale · norms[kmap[b], j] · ⟨qsketch[qmap[b], i], ±1[kmap[b], j]⟩``.

    Score kernel: shared memory holds ``chunk · m`` float32 (the block's sketched queries);
    ``signs`` uint8 or uint32 words.
    """
    n_b, n_m, n_keys = out.shape
    tid, threads, j, first, count = key_thread(n_keys, n_m)
    m = qsketch.shape[2]
    qs = cuda.shared.array(0, numba.float32)
    acc = cuda.local.array(MAX_QUERIES, numba.float32)
    b = cuda.blockIdx.y
    while b < n_b:
        stage_rows(qsketch, qmap[b], first, count, qs, tid, threads)
        cuda.syncthreads()
        if j < n_keys:
            kb = kmap[b]
            for i in range(MAX_QUERIES):
                acc[i] = 0.0
            if count == 1:
                sign_dots(qs, m, 1, 1, signs[kb, j], acc)
            else:
                sign_dots(qs, m, count, MAX_QUERIES, signs[kb, j], acc)
            w = np.float32(scale * norms[kb, j])
            for i in range(MAX_QUERIES):
                if i < count:
                    out[b, first + i, j] = w * acc[i]
        cuda.syncthreads()
        b += cuda.gridDim.y
