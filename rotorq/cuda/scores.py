"""Inner products of rotated queries with packed codes on the GPU, the twin of
:mod:`rotorq.cpu.scores`: ``norm · ⟨Π q, c[idx]⟩`` (+ the QJL term in prod mode).

GQA-friendly: a block stages up to :data:`~rotorq.cuda._threads.MAX_QUERIES` query rows of
one output batch in shared memory; each thread reads its key's codes (and signs) once and
accumulates every staged query row from that single read. Batches pair through the
``qmap``/``kmap`` index maps exactly as on the CPU: put a KV head's query heads on the
query-row axis (``M``) to score them all per code read.

Shared memory (float32): ``chunk · (D + m)`` staged queries and sketched queries, then the
``L`` centroids.
"""

import numba
import numpy as np
from numba import cuda

from ._jit import device, kernel
from ._threads import MAX_QUERIES, key_thread, stage_rows
from .bits import unpack_value
from .qjl import sign_dots


@device
def _scores(qrot, qsketch, qmap, codes, norms, signs, qjl_norms, kmap, centroids, bits,
            qjl_scale, use_qjl, out):
    n_keys = out.shape[2]
    tid, threads, b, j, first, count = key_thread(n_keys, out.shape[1])
    big_d = qrot.shape[2]
    m = qsketch.shape[2] if use_qjl else 0
    qb = qmap[b]
    sh = cuda.shared.array(0, numba.float32)
    q_sh = sh[:count * big_d]
    s_sh = sh[count * big_d:count * (big_d + m)]
    c_sh = sh[count * (big_d + m):count * (big_d + m) + centroids.shape[0]]
    stage_rows(qrot, qb, first, count, q_sh, tid, threads)
    if use_qjl:
        stage_rows(qsketch, qb, first, count, s_sh, tid, threads)
    for t in range(tid, centroids.shape[0], threads):
        c_sh[t] = centroids[t]
    cuda.syncthreads()
    if j >= n_keys:
        return
    kb = kmap[b]
    row = codes[kb, j]
    acc = cuda.local.array(MAX_QUERIES, numba.float32)
    for i in range(MAX_QUERIES):
        acc[i] = 0.0
    for k in range(big_d):
        c = c_sh[unpack_value(row, bits, k)]
        for i in range(MAX_QUERIES):
            if i < count:
                acc[i] += q_sh[i * big_d + k] * c
    w = norms[kb, j]
    for i in range(MAX_QUERIES):
        acc[i] *= w
    if use_qjl:
        qacc = cuda.local.array(MAX_QUERIES, numba.float32)
        for i in range(MAX_QUERIES):
            qacc[i] = 0.0
        sign_dots(s_sh, m, count, signs[kb, j], qacc)
        gamma = np.float32(qjl_scale * qjl_norms[kb, j])
        for i in range(MAX_QUERIES):
            acc[i] += gamma * qacc[i]
    for i in range(MAX_QUERIES):
        if i < count:
            out[b, first + i, j] = acc[i]


@kernel
def scores_mse(qrot, qmap, codes, norms, kmap, centroids, bits, out):
    """MSE-mode scores: ``qrot`` (Bq, M, D) rotated queries, ``codes`` (Bk, N, nbytes),
    ``norms`` (Bk, N) → ``out`` (B, M, N). Score kernel."""
    # qrot/codes/norms stand in for the absent QJL arrays (same types, never read).
    _scores(qrot, qrot, qmap, codes, norms, codes, norms, kmap, centroids, bits, 0.0, False,
            out)


@kernel
def scores_prod(qrot, qsketch, qmap, codes, norms, signs, qjl_norms, kmap,
                centroids, bits, qjl_scale, out):
    """Prod-mode scores: MSE part plus the QJL residual term, ``qsketch`` (Bq, M, m). Score kernel."""
    _scores(qrot, qsketch, qmap, codes, norms, signs, qjl_norms, kmap, centroids, bits,
            qjl_scale, True, out)


def shared_bytes(chunk, big_d, m, levels):
    """Dynamic shared memory of a score kernel block staging ``chunk`` query rows."""
    return 4 * (chunk * (big_d + m) + levels)
