"""Fused decode attention on packed keys and values on the GPU, the twin of
:mod:`rotorq.cpu.attention` (flash-decoding, split-K).

:func:`decode_attention` takes the CPU kernel's arguments in the same order (without its
``task_lo, task_hi``: the grid is the task range) and writes the same per-split partials
``acc*_out[bh, s]``, ``max_out[bh, s]``, ``sum_out[bh, s]``;
:func:`rotorq.cuda.merge.merge_splits` combines the splits on the device (the CPU backend's
log-sum-exp merge).

Grid of :func:`decode_attention`: ``x`` = split ``s``, ``y`` = batch·KV head ``bh``; 1-D
blocks of ``TILE`` threads (any count ≥ 1). A block walks its split in tiles of
``blockDim.x`` tokens and the query rows in chunks of :data:`ROWS` (the rows' code reads are
shared): thread ``j`` scores token ``j`` of the tile against the chunk's rows (queries staged
in shared memory), one thread per row runs the online-softmax step, then threads stride over
the value coordinates and accumulate ``p · ν · c[jdx]`` for the chunk's rows. float32
throughout, every part (two key parts with scores summed, QJL prod mode, two value parts),
any dimension and bit width: the general path. Dynamic shared memory (float32):
:func:`shared_floats`.

The fast path for the common decode case (one MSE key part, one value part, ``D % 128 == 0``,
at most 8 query rows per KV head) is generated: :mod:`rotorq.cuda.gen.attention`
(tensor-core MMAs), with the key-offset term of :mod:`rotorq.cuda.gen.key_bias`. The split
merge and the exact (window) attention are in :mod:`rotorq.cuda.merge`.
"""

import math

import numba
import numpy as np
from numba import cuda

from ._jit import device, kernel
from .bits import read_code, unpack_value
from .qjl import sign_dots

_TWO_PI = 2.0 * math.pi
_INV_TWO_PI = 1.0 / _TWO_PI

ROWS = 8
"""Query rows per chunk of the general kernel (one register accumulator each)."""


def shared_floats(threads, dk0, dk1, m0, m1, dv0, dv1, levels, n_freq=0):
    """float32 words of dynamic shared memory of :func:`decode_attention` (``n_freq``: the
    length of the key-bias coefficient rows, staged like the queries)."""
    return ROWS * (dk0 + dk1 + m0 + m1) + ROWS * threads + ROWS * (dv0 + dv1) + 3 * ROWS \
        + levels + 2 * ROWS * n_freq


@device
def _key_scores(q_sh, s_sh, kc, kn, ks, kg, cent, bits, qscale, use_qjl, bh, j, count, dk, m,
                acc, qacc):
    """``acc[i] += n_j · ⟨q_i, c[codes_j]⟩ (+ QJL term)`` for the staged rows ``i < count``."""
    for i in range(ROWS):
        qacc[i] = 0.0
    row = kc[bh, j]
    wbits = 8 * row.itemsize
    w = 0
    buf = 0
    nbuf = 0
    for k in range(dk):
        code, w, buf, nbuf = read_code(row, wbits, bits, w, buf, nbuf)
        c = cent[code]
        for i in range(ROWS):
            if i < count:
                qacc[i] += q_sh[i * dk + k] * c
    nrm = np.float32(kn[bh, j])
    for i in range(ROWS):
        acc[i] += nrm * qacc[i]
    if use_qjl:
        for i in range(ROWS):
            qacc[i] = 0.0
        sign_dots(s_sh, m, count, ROWS, ks[bh, j], qacc)
        g = np.float32(qscale * np.float32(kg[bh, j]))
        for i in range(ROWS):
            acc[i] += g * qacc[i]


@device
def _key_bias(ba_sh, bb_sh, kfreq, kpos0, j, count, acc):
    """``acc[i] += Σ_f A cos(p θ_f) + B sin(p θ_f)`` at position ``p = kpos0 + j``, with the
    staged coefficient rows ``A``, ``B``; the angle is reduced modulo 2π in float64, then the
    float32 sine and cosine are taken."""
    pos = np.float64(kpos0 + j)
    nf = kfreq.shape[0]
    for f in range(nf):
        ang = pos * kfreq[f]
        ang -= _TWO_PI * math.floor(ang * _INV_TWO_PI)
        a32 = np.float32(ang)
        ca = math.cos(a32)
        sa = math.sin(a32)
        for i in range(ROWS):
            if i < count:
                acc[i] += ba_sh[i * nf + f] * ca + bb_sh[i * nf + f] * sa


@device
def _stage(src, bh, first, count, dst, tid, threads):
    w = src.shape[2]
    n = count * w
    k = tid
    while k < n:
        dst[k] = src[bh, first + k // w, k % w]
        k += threads


@device
def _values(vc, vn, cent, bits, bh, j0, nt, p_sh, alpha_sh, count, threads, acc_sh, dv,
            tid, acc):
    """``acc_sh[i, k] = α_i · acc_sh[i, k] + Σ_j p[i, j] · ν_j · c[jdx_jk]`` for this tile."""
    k = tid
    while k < dv:
        for i in range(ROWS):
            if i < count:
                acc[i] = acc_sh[i * dv + k] * alpha_sh[i]
        for jj in range(nt):
            row = vc[bh, j0 + jj]
            val = np.float32(vn[bh, j0 + jj]) * cent[unpack_value(row, bits, k)]
            for i in range(ROWS):
                if i < count:
                    acc[i] += p_sh[i * threads + jj] * val
        for i in range(ROWS):
            if i < count:
                acc_sh[i * dv + k] = acc[i]
        k += threads


@kernel
def decode_attention(q0, q1, qs0, qs1, kba, kbb, kfreq, kpos0,
                     kc0, kn0, ks0, kg0, kcent0, kbits0, kscale0,
                     kc1, kn1, ks1, kg1, kcent1, kbits1, kscale1,
                     vc0, vn0, vcent0, vbits0,
                     vc1, vn1, vcent1, vbits1,
                     n_keys, n_q, causal_offset, chunk,
                     acc0_out, acc1_out, max_out, sum_out):
    """Split-K fused attention over packed keys/values (contract: :mod:`rotorq.cpu.attention`).

    Norms ``kn*``, ``kg*``, ``vn*`` are float16 arrays (the CPU twin takes their uint16 bit
    patterns); code and sign rows are uint8 (or uint32 words). Grid ``(S, BH)``, 1-D
    blocks; dynamic shared memory ``4 · shared_floats(...)`` bytes.
    """
    s = cuda.blockIdx.x
    bh = cuda.blockIdx.y
    tid = cuda.threadIdx.x
    threads = cuda.blockDim.x
    n_rows = acc0_out.shape[2]
    dv0 = acc0_out.shape[3]
    dv1 = acc1_out.shape[3]
    dk0 = q0.shape[2]
    dk1 = q1.shape[2]
    m0 = qs0.shape[2]
    m1 = qs1.shape[2]
    neg_inf = np.float32(-math.inf)
    sh = cuda.shared.array(0, numba.float32)
    o = 0
    q0_sh = sh[o:o + ROWS * dk0]
    o += ROWS * dk0
    q1_sh = sh[o:o + ROWS * dk1]
    o += ROWS * dk1
    s0_sh = sh[o:o + ROWS * m0]
    o += ROWS * m0
    s1_sh = sh[o:o + ROWS * m1]
    o += ROWS * m1
    p_sh = sh[o:o + ROWS * threads]
    o += ROWS * threads
    a0_sh = sh[o:o + ROWS * dv0]
    o += ROWS * dv0
    a1_sh = sh[o:o + ROWS * dv1]
    o += ROWS * dv1
    m_sh = sh[o:o + ROWS]
    l_sh = sh[o + ROWS:o + 2 * ROWS]
    alpha_sh = sh[o + 2 * ROWS:o + 3 * ROWS]
    o += 3 * ROWS
    nf = kfreq.shape[0]
    ba_sh = sh[o:o + ROWS * nf]
    bb_sh = sh[o + ROWS * nf:o + 2 * ROWS * nf]
    acc = cuda.local.array(ROWS, numba.float32)
    qacc = cuda.local.array(ROWS, numba.float32)
    t0 = s * chunk
    t1 = min(n_keys, t0 + chunk, n_q + causal_offset)
    for first in range(0, n_rows, ROWS):
        count = min(ROWS, n_rows - first)
        _stage(q0, bh, first, count, q0_sh, tid, threads)
        _stage(q1, bh, first, count, q1_sh, tid, threads)
        _stage(qs0, bh, first, count, s0_sh, tid, threads)
        _stage(qs1, bh, first, count, s1_sh, tid, threads)
        _stage(kba, bh, first, count, ba_sh, tid, threads)
        _stage(kbb, bh, first, count, bb_sh, tid, threads)
        k = tid
        while k < ROWS * dv0:
            a0_sh[k] = 0.0
            k += threads
        k = tid
        while k < ROWS * dv1:
            a1_sh[k] = 0.0
            k += threads
        k = tid
        while k < ROWS:
            m_sh[k] = neg_inf
            l_sh[k] = 0.0
            k += threads
        cuda.syncthreads()
        j0 = t0
        while j0 < t1:
            nt = min(threads, t1 - j0)
            j = j0 + tid
            if tid < nt:
                for i in range(ROWS):
                    acc[i] = 0.0
                _key_scores(q0_sh, s0_sh, kc0, kn0, ks0, kg0, kcent0, kbits0, kscale0, m0 > 0,
                            bh, j, count, dk0, m0, acc, qacc)
                if dk1 > 0:
                    _key_scores(q1_sh, s1_sh, kc1, kn1, ks1, kg1, kcent1, kbits1, kscale1,
                                m1 > 0, bh, j, count, dk1, m1, acc, qacc)
                if nf > 0:
                    _key_bias(ba_sh, bb_sh, kfreq, kpos0, j, count, acc)
                for i in range(ROWS):
                    if i < count:
                        r = first + i
                        p_sh[i * threads + tid] = acc[i] if j <= r % n_q + causal_offset \
                            else neg_inf
            cuda.syncthreads()
            i = tid
            while i < count:  # the online-softmax step of row ``first + i``
                mt = neg_inf
                for jj in range(nt):
                    mt = max(mt, p_sh[i * threads + jj])
                mo = m_sh[i]
                mn = max(mo, mt)
                alpha = np.float32(1.0)
                if mn != neg_inf:
                    alpha = np.float32(math.exp(mo - mn))
                    tot = np.float32(0.0)
                    for jj in range(nt):
                        p = np.float32(math.exp(p_sh[i * threads + jj] - mn))
                        p_sh[i * threads + jj] = p
                        tot += p
                    l_sh[i] = l_sh[i] * alpha + tot
                    m_sh[i] = mn
                else:
                    for jj in range(nt):
                        p_sh[i * threads + jj] = 0.0
                alpha_sh[i] = alpha
                i += threads
            cuda.syncthreads()
            _values(vc0, vn0, vcent0, vbits0, bh, j0, nt, p_sh, alpha_sh, count, threads,
                    a0_sh, dv0, tid, acc)
            if dv1 > 0:
                _values(vc1, vn1, vcent1, vbits1, bh, j0, nt, p_sh, alpha_sh, count, threads,
                        a1_sh, dv1, tid, acc)
            cuda.syncthreads()
            j0 += threads
        k = tid
        while k < count * dv0:
            acc0_out[bh, s, first + k // dv0, k % dv0] = a0_sh[k]
            k += threads
        k = tid
        while k < count * dv1:
            acc1_out[bh, s, first + k // dv1, k % dv1] = a1_sh[k]
            k += threads
        k = tid
        while k < count:
            max_out[bh, s, first + k] = m_sh[k]
            sum_out[bh, s, first + k] = l_sh[k]
            k += threads
        cuda.syncthreads()


BIAS_THREADS = 128
"""Tokens (threads) per block of :func:`key_bias_scores`."""


@kernel
def key_bias_scores(kba, kbb, kfreq, kpos0, n_keys, out):
    """The RoPE-aware key-offset term of every compressed key, for the tensor-core kernel
    (where :mod:`rotorq.cuda.gen.key_bias` does not apply):
    twin of :func:`rotorq.cpu.attention.key_bias_scores` (``out`` (BH, ≥ n_keys, ≥ R), R ≤ 8).

    Grid ``(ceil(n_keys / BIAS_THREADS), BH)``, :data:`BIAS_THREADS` threads, one token each;
    the coefficient rows are staged in shared memory (dynamic: ``8 · R · F`` bytes). A
    token's cosines and sines serve all its rows."""
    bh = cuda.blockIdx.y
    tid = cuda.threadIdx.x
    threads = cuda.blockDim.x
    n_rows = kba.shape[1]
    nf = kba.shape[2]
    sh = cuda.shared.array(0, numba.float32)
    e = tid
    while e < n_rows * nf:
        sh[e] = kba[bh, e // nf, e % nf]
        sh[n_rows * nf + e] = kbb[bh, e // nf, e % nf]
        e += threads
    cuda.syncthreads()
    j = cuda.blockIdx.x * threads + tid
    if j >= n_keys:
        return
    pos = np.float64(kpos0 + j)
    # eight scalar accumulators (a local array would live in local memory); rows past
    # n_rows repeat the last row and are not stored
    last = n_rows - 1
    b1, b2, b3 = min(1, last) * nf, min(2, last) * nf, min(3, last) * nf
    b4, b5, b6, b7 = min(4, last) * nf, min(5, last) * nf, min(6, last) * nf, min(7, last) * nf
    off = n_rows * nf
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0.0)
    for f in range(nf):
        ang = pos * kfreq[f]
        ang -= _TWO_PI * math.floor(ang * _INV_TWO_PI)
        a32 = np.float32(ang)
        ca = math.cos(a32)
        sa = math.sin(a32)
        a0 += sh[f] * ca + sh[off + f] * sa
        a1 += sh[b1 + f] * ca + sh[off + b1 + f] * sa
        a2 += sh[b2 + f] * ca + sh[off + b2 + f] * sa
        a3 += sh[b3 + f] * ca + sh[off + b3 + f] * sa
        a4 += sh[b4 + f] * ca + sh[off + b4 + f] * sa
        a5 += sh[b5 + f] * ca + sh[off + b5 + f] * sa
        a6 += sh[b6 + f] * ca + sh[off + b6 + f] * sa
        a7 += sh[b7 + f] * ca + sh[off + b7 + f] * sa
    out[bh, j, 0] = a0
    if n_rows > 1:
        out[bh, j, 1] = a1
    if n_rows > 2:
        out[bh, j, 2] = a2
    if n_rows > 3:
        out[bh, j, 3] = a3
    if n_rows > 4:
        out[bh, j, 4] = a4
    if n_rows > 5:
        out[bh, j, 5] = a5
    if n_rows > 6:
        out[bh, j, 6] = a6
    if n_rows > 7:
        out[bh, j, 7] = a7
