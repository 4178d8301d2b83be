"""Inner products of rotated queries with packed codes, without dequantizing the keys.

``score = norm · ⟨Π q, c[idx]⟩`` (+ ``γ · √(π/2)/m · ⟨S Π q, signs⟩`` in prod mode).
Batches broadcast through index maps: output batch ``b`` pairs query batch ``qmap[b]``
with key batch ``kmap[b]`` (GQA maps several query heads to one key head this way).
"""

import numpy as np

from ._jit import ROWS_PER_TASK, jit, jit_parallel, prange
from .bits import unpack_row
from .qjl import sign_dot


@jit_parallel
def _scores_rows(qrot, qsketch, qmap, codes, norms, signs, qjl_norms, kmap,
                 centroids, bits, qjl_scale, out):
    n_b, n_m, n_keys = out.shape
    big_d = qrot.shape[2]
    use_qjl = qsketch.shape[2] > 0
    total = n_b * n_keys
    for t in prange((total + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        idx = np.empty(big_d, np.uint8)
        vals = np.empty(big_d, np.float32)
        for flat in range(t * ROWS_PER_TASK, min(total, (t + 1) * ROWS_PER_TASK)):
            b = flat // n_keys
            j = flat - b * n_keys
            kb = kmap[b]
            qb = qmap[b]
            unpack_row(codes[kb, j], bits, big_d, idx)
            for k in range(big_d):
                vals[k] = centroids[idx[k]]
            w = norms[kb, j]
            for i in range(n_m):
                acc = np.float32(0.0)
                for k in range(big_d):
                    acc += qrot[qb, i, k] * vals[k]
                s = w * acc
                if use_qjl:
                    s += np.float32(qjl_scale * qjl_norms[kb, j]) * sign_dot(qsketch[qb, i], signs[kb, j])
                out[b, i, j] = s


@jit
def scores_mse(qrot, qmap, codes, norms, kmap, centroids, bits, out):
    """MSE-mode scores: ``qrot`` (Bq, M, D) rotated queries, ``codes`` (Bk, N, nbytes),
    ``norms`` (Bk, N) → ``out`` (B, M, N)."""
    _scores_rows(qrot, np.empty((1, 1, 0), np.float32), qmap, codes, norms,
                 np.empty((1, 1, 1), np.uint8), np.empty((1, 1), np.float32), kmap,
                 centroids, bits, 0.0, out)


@jit
def scores_prod(qrot, qsketch, qmap, codes, norms, signs, qjl_norms, kmap,
                centroids, bits, qjl_scale, out):
    """Prod-mode scores: MSE part plus the QJL residual term, ``qsketch`` (Bq, M, m)."""
    _scores_rows(qrot, qsketch, qmap, codes, norms, signs, qjl_norms, kmap,
                 centroids, bits, qjl_scale, out)
