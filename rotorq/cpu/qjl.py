"""QJL: 1-bit sign sketches ``sign(S x)`` and the asymmetric inner-product estimator."""

import math

import numpy as np

from ._jit import ROWS_PER_TASK, jit, jit_parallel, prange


@jit
def sign_dot(qs, sign_row):
    """``Σ_i qs_i · (±1)_i`` with the signs packed LSB first in ``sign_row``."""
    acc = np.float32(0.0)
    for i in range(qs.shape[0]):
        bit = (sign_row[i >> 3] >> (i & 7)) & 1
        acc += qs[i] if bit else -qs[i]
    return acc


@jit
def sketch_signs_row(x, sketch, out_row):
    """Pack ``sign(sketch @ x)`` (bit 1 for ``>= 0``) of one row into ``out_row``."""
    m, d = sketch.shape
    acc = np.uint32(0)
    for i in range(m):
        s = np.float32(0.0)
        for j in range(d):
            s += sketch[i, j] * np.float32(x[j])
        if s >= 0:
            acc |= np.uint32(1) << np.uint32(i & 7)
        if (i & 7) == 7 or i == m - 1:
            out_row[i >> 3] = np.uint8(acc)
            acc = np.uint32(0)


@jit_parallel
def qjl_quantize(x, sketch, signs, norms):
    """Signs of ``sketch @ x[r]`` and ``‖x[r]‖`` for every row of ``x`` (n, d)."""
    n = x.shape[0]
    for t in prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        for r in range(t * ROWS_PER_TASK, min(n, (t + 1) * ROWS_PER_TASK)):
            sketch_signs_row(x[r], sketch, signs[r])
            acc = 0.0
            for j in range(x.shape[1]):
                v = np.float64(x[r, j])
                acc += v * v
            norms[r] = math.sqrt(acc)


@jit_parallel
def qjl_scores(qsketch, qmap, signs, norms, kmap, scale, out):
    """``out[b, i, j] = scale · norms[kmap[b], j] · ⟨qsketch[qmap[b], i], ±1[kmap[b], j]⟩``."""
    n_b, n_m, n_keys = out.shape
    total = n_b * n_keys
    for t in prange((total + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        for flat in range(t * ROWS_PER_TASK, min(total, (t + 1) * ROWS_PER_TASK)):
            b = flat // n_keys
            j = flat - b * n_keys
            kb = kmap[b]
            qb = qmap[b]
            w = np.float32(scale * norms[kb, j])
            for i in range(n_m):
                out[b, i, j] = w * sign_dot(qsketch[qb, i], signs[kb, j])
