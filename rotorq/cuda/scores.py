"""Inner products of rotated queries with packed codes on the GPU, the twin of
:mod:`rotorq.cpu.scores`: ``norm · ⟨Π q, c[idx]⟩`` (+ the QJL term in prod mode).

GQA-friendly: a block stages up to :data:`~rotorq.cuda._threads.MAX_QUERIES` query rows of
one output batch in shared memory; each thread streams its key's codes (and signs) once,
word by word, and accumulates every staged query row from that single read. Batches pair
through the ``qmap``/``kmap`` index maps exactly as on the CPU: put a KV head's query heads
on the query-row axis (``M``) to score them all per code read.

``codes`` and ``signs`` may be uint8 rows or the same bytes viewed as uint32 words (rows of
a multiple of 4 bytes; 4× fewer loads). Shared memory (float32): ``chunk · (D + m)`` staged
queries and sketched queries, then the ``L`` centroids.
"""

import numba
import numpy as np
from numba import cuda

from ._jit import device, kernel
from ._threads import MAX_QUERIES, key_thread, stage_rows
from .bits import read_code
from .qjl import sign_dots


@device
def code_dots(row, bits, stored_dim, q_sh, c_sh, count, queries, acc):
    """``acc[i] += Σ_k q_sh[i·D + k] · c_sh[code k]`` for ``i < count ≤ queries``.

    ``queries`` is a constant at each call site, so the query loop unrolls into registers.
    """
    wbits = 8 * row.itemsize
    w = 0
    buf = 0
    nbuf = 0
    for k in range(stored_dim):
        code, w, buf, nbuf = read_code(row, wbits, bits, w, buf, nbuf)
        c = c_sh[code]
        for i in range(queries):
            if i < count:
                acc[i] += q_sh[i * stored_dim + k] * c


@device
def _scores(qrot, qsketch, qmap, codes, norms, signs, qjl_norms, kmap, centroids, bits,
            qjl_scale, use_qjl, out):
    n_b, n_m, n_keys = out.shape
    tid, threads, j, first, count = key_thread(n_keys, n_m)
    stored_dim = qrot.shape[2]
    m = qsketch.shape[2] if use_qjl else 0
    sh = cuda.shared.array(0, numba.float32)
    q_sh = sh[:count * stored_dim]
    s_sh = sh[count * stored_dim:count * (stored_dim + m)]
    c_sh = sh[count * (stored_dim + m):count * (stored_dim + m) + centroids.shape[0]]
    t = tid
    while t < centroids.shape[0]:
        c_sh[t] = centroids[t]
        t += threads
    acc = cuda.local.array(MAX_QUERIES, numba.float32)
    qacc = cuda.local.array(MAX_QUERIES, numba.float32)
    b = cuda.blockIdx.y
    while b < n_b:
        stage_rows(qrot, qmap[b], first, count, q_sh, tid, threads)
        if use_qjl:
            stage_rows(qsketch, qmap[b], first, count, s_sh, tid, threads)
        cuda.syncthreads()
        if j < n_keys:
            kb = kmap[b]
            for i in range(MAX_QUERIES):
                acc[i] = 0.0
                qacc[i] = 0.0
            if count == 1:
                code_dots(codes[kb, j], bits, stored_dim, q_sh, c_sh, 1, 1, acc)
            else:
                code_dots(codes[kb, j], bits, stored_dim, q_sh, c_sh, count, MAX_QUERIES, acc)
            w = norms[kb, j]
            gamma = np.float32(0.0)
            if use_qjl:
                if count == 1:
                    sign_dots(s_sh, m, 1, 1, signs[kb, j], qacc)
                else:
                    sign_dots(s_sh, m, count, MAX_QUERIES, signs[kb, j], qacc)
                gamma = np.float32(qjl_scale * qjl_norms[kb, j])
            for i in range(MAX_QUERIES):
                if i < count:
                    s = w * acc[i]
                    if use_qjl:
                        s += gamma * qacc[i]
                    out[b, first + i, j] = s
        cuda.syncthreads()
        b += cuda.gridDim.y


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
