"""Fused decode attention on packed keys and values on the GPU, the twin of
:mod:`rotorq.cpu.attention` (flash-decoding, split-K).

:func:`decode_attention` takes the CPU kernel's arguments in the same order (without its
``task_lo, task_hi``: the grid is the task range) and writes the same per-split partials
``acc*_out[bh, s]``, ``max_out[bh, s]``, ``sum_out[bh, s]``; :func:`merge_splits` combines
the splits on the device (the CPU backend's log-sum-exp merge).

Grid of :func:`decode_attention`: ``x`` = split ``s``, ``y`` = batch·KV head ``bh``; 1-D
blocks of ``TILE`` threads (any count ≥ 1). A block walks its split in tiles of
``blockDim.x`` tokens and the query rows in chunks of :data:`ROWS` (the rows' code reads are
shared): thread ``j`` scores token ``j`` of the tile against the chunk's rows (queries staged
in shared memory), one thread per row runs the online-softmax step, then threads stride over
the value coordinates and accumulate ``p · ν · c[jdx]`` for the chunk's rows. float32
throughout, every part (two key parts with scores summed, QJL prod mode, two value parts),
any dimension and bit width: the general path. Dynamic shared memory (float32):
:func:`shared_floats`.

:func:`attention_kernel` generates the fast path for the common decode case (one MSE key part,
one value part, ``D % 128 == 0``, 2–4 bits, at most 8 query rows per KV head): warp-level
tensor-core MMAs (``mma.sync.m16n8k16``, fp16 inputs, fp32 accumulation), see its docstring.
"""

import linecache
import math

import numba
import numpy as np
from numba import cuda

from ._jit import SIMULATOR, device, kernel
from .bits import read_code, unpack_value
from .qjl import sign_dots

_TWO_PI = 2.0 * math.pi
LOG2E = float(np.float32(1.0 / math.log(2.0)))
LN2 = float(np.float32(math.log(2.0)))
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


MERGE_COLS = 32
"""Accumulator columns per block of :func:`merge_splits` (``blockDim.x``: one warp)."""
MERGE_ROWS = 16
"""Warps per block of :func:`merge_splits` (``blockDim.y``): each sums its share of the
splits, so few loads of a thread wait on each other."""


def merge_shared_floats(n_split, threads):
    """float32 words of dynamic shared memory of :func:`merge_splits` (whatever ``n_split``;
    at most 32 warps)."""
    return 2 * threads + 64


if SIMULATOR:
    @device
    def _row_reduce(sc, v, is_max):
        """Max or sum of ``v`` over the ``blockDim.x`` threads of this ``threadIdx.y``
        (emulated with block barriers; every thread of the block calls it)."""
        x, y, nx = cuda.threadIdx.x, cuda.threadIdx.y, cuda.blockDim.x
        sc[y * nx + x] = v
        cuda.syncthreads()
        out = sc[y * nx]
        for i in range(1, nx):
            out = max(out, sc[y * nx + i]) if is_max else out + sc[y * nx + i]
        cuda.syncthreads()
        return out
else:
    @device
    def _row_reduce(sc, v, is_max):
        """Max or sum of ``v`` over the warp (``blockDim.x`` = 32), by shuffles."""
        for sh in (16, 8, 4, 2, 1):
            o = cuda.shfl_xor_sync(0xFFFFFFFF, v, sh)
            v = max(v, o) if is_max else v + o
        return v


@device
def _column_sum(max_in, safe, acc, bh, r, col, y, ny, n_split):
    """``Σ_{s ≡ y (mod ny)} exp(max_in[bh, s, r] − safe) · acc[bh, s, r, col]``, four splits
    per step: their loads are in flight together (a plain loop waits for each load)."""
    t0 = np.float32(0.0)
    t1 = np.float32(0.0)
    t2 = np.float32(0.0)
    t3 = np.float32(0.0)
    s = y
    while s + 3 * ny < n_split:
        t0 += np.float32(math.exp(max_in[bh, s, r] - safe)) * acc[bh, s, r, col]
        t1 += np.float32(math.exp(max_in[bh, s + ny, r] - safe)) * acc[bh, s + ny, r, col]
        t2 += (np.float32(math.exp(max_in[bh, s + 2 * ny, r] - safe))
               * acc[bh, s + 2 * ny, r, col])
        t3 += (np.float32(math.exp(max_in[bh, s + 3 * ny, r] - safe))
               * acc[bh, s + 3 * ny, r, col])
        s += 4 * ny
    while s < n_split:
        t0 += np.float32(math.exp(max_in[bh, s, r] - safe)) * acc[bh, s, r, col]
        s += ny
    return (t0 + t1) + (t2 + t3)


@kernel
def merge_splits(max_in, sum_in, acc0_in, acc1_in, acc0_out, acc1_out, m_out, l_out):
    """Log-sum-exp merge of the splits: ``(BH, S, R[, D])`` partials → ``(BH, R[, D])``.

    Grid ``(ceil((Dv0 + Dv1) / MERGE_COLS), R, BH)``, blocks ``(MERGE_COLS, Y)`` (Y warps;
    ``blockDim.x`` must be 32 on the device). The block finds the row's max over the splits
    (one load per thread up to a split per thread, shuffles within the warps, one barrier
    across them), then the running sums likewise; thread ``(x, y)`` sums column ``x`` over
    the splits ``s ≡ y (mod Y)`` (coalesced rows), each weighted ``exp(m_s − m)`` (splits
    that saw no key weigh 0), and the ``Y`` partial sums are added in shared memory. Dynamic
    shared memory: ``4 · merge_shared_floats(S, MERGE_COLS · Y)`` bytes.
    """
    r = cuda.blockIdx.y
    bh = cuda.blockIdx.z
    x = cuda.threadIdx.x
    y = cuda.threadIdx.y
    nx = cuda.blockDim.x
    ny = cuda.blockDim.y
    threads = nx * ny
    tid = y * nx + x
    n_split = max_in.shape[1]
    dv0 = acc0_in.shape[3]
    dv1 = acc1_in.shape[3]
    sh = cuda.shared.array(0, numba.float32)
    part = sh[:threads]
    sc = sh[threads:2 * threads]
    red_m = sh[2 * threads:2 * threads + 32]
    red_l = sh[2 * threads + 32:2 * threads + 64]
    neg_inf = np.float32(-math.inf)
    mx = neg_inf
    s = tid
    while s < n_split:
        mx = max(mx, max_in[bh, s, r])
        s += threads
    mx = _row_reduce(sc, mx, True)
    if x == 0:
        red_m[y] = mx
    cuda.syncthreads()
    for yy in range(ny):
        mx = max(mx, red_m[yy])
    safe = mx if mx != neg_inf else np.float32(0.0)
    lsum = np.float32(0.0)
    s = tid
    while s < n_split:
        lsum += np.float32(math.exp(max_in[bh, s, r] - safe)) * sum_in[bh, s, r]
        s += threads
    lsum = _row_reduce(sc, lsum, False)
    if x == 0:
        red_l[y] = lsum
    col = cuda.blockIdx.x * nx + x
    tot = np.float32(0.0)
    if col < dv0:
        tot = _column_sum(max_in, safe, acc0_in, bh, r, col, y, ny, n_split)
    elif col < dv0 + dv1:
        tot = _column_sum(max_in, safe, acc1_in, bh, r, col - dv0, y, ny, n_split)
    part[tid] = tot
    cuda.syncthreads()
    if tid == 0 and cuda.blockIdx.x == 0:
        lsum = np.float32(0.0)
        for yy in range(ny):
            lsum += red_l[yy]
        m_out[bh, r] = mx
        l_out[bh, r] = lsum
    if y == 0 and col < dv0 + dv1:
        for yy in range(1, ny):
            tot += part[yy * nx + x]
        if col < dv0:
            acc0_out[bh, r, col] = tot
        else:
            acc1_out[bh, r, col - dv0] = tot


EXACT_THREADS = 128
"""Threads per block (one block per query row) of :func:`exact_attention`."""


def exact_shared_floats(n_e, threads):
    """float32 words of dynamic shared memory of :func:`exact_attention`."""
    return n_e + threads


@device
def _block_reduce(red, x, is_max):
    """Max (``is_max``) or sum of ``x`` over the block, through the scratch ``red``
    (≥ blockDim.x floats); every thread gets the result."""
    tid = cuda.threadIdx.x
    threads = cuda.blockDim.x
    red[tid] = x
    cuda.syncthreads()
    h = 1
    while h < threads:
        h <<= 1
    h >>= 1
    while h > 0:
        if tid < h and tid + h < threads:
            if is_max:
                red[tid] = max(red[tid], red[tid + h])
            else:
                red[tid] += red[tid + h]
        cuda.syncthreads()
        h >>= 1
    out = red[0]
    cuda.syncthreads()
    return out


@kernel
def exact_attention(q, ke, ve, pos, n_e, scale, n_q, offset, causal, acc_c, m_c, l_c, has_c,
                    out):
    """Attention of one query row per block over the first ``n_e`` uncompressed keys/values,
    merged with the compressed part's partial sums: the twin of
    :func:`rotorq.cpu.attention.exact_attention` (same arguments, without the scratch).

    Grid ``(R, BH)``, 1-D blocks (:data:`EXACT_THREADS`): threads stride over the tokens for
    the scores (kept in shared memory), the block reduces the max and the sum, then threads
    stride over the value coordinates. Dynamic shared memory:
    ``4 · exact_shared_floats(n_e, blockDim.x)`` bytes. This replaces about twenty array
    operations (each a launch and 10–40 µs of host time) of the window part of
    :meth:`rotorq.KVCache.attend`.
    """
    r = cuda.blockIdx.x
    bh = cuda.blockIdx.y
    tid = cuda.threadIdx.x
    threads = cuda.blockDim.x
    d = q.shape[2]
    dv = ve.shape[2]
    sh = cuda.shared.array(0, numba.float32)
    s = sh[:n_e]
    red = sh[n_e:n_e + threads]
    neg_inf = np.float32(-math.inf)
    lim = r % n_q + offset
    mx = neg_inf
    j = tid
    while j < n_e:
        v = neg_inf
        if causal == 0 or pos[j] <= lim:
            acc = np.float32(0.0)
            for k in range(d):
                acc += q[bh, r, k] * ke[bh, j, k]
            v = acc * np.float32(scale)
        s[j] = v
        mx = max(mx, v)
        j += threads
    mx = _block_reduce(red, mx, True)
    safe = mx if mx != neg_inf else np.float32(0.0)
    lsum = np.float32(0.0)
    j = tid
    while j < n_e:
        p = np.float32(math.exp(s[j] - safe))
        s[j] = p
        lsum += p
        j += threads
    lsum = _block_reduce(red, lsum, False)
    a = np.float32(0.0)
    b = np.float32(1.0)
    if has_c:
        m = max(m_c[bh, r], mx)
        a = np.float32(math.exp(m_c[bh, r] - m))
        b = np.float32(math.exp(mx - m))
    den = b * lsum
    if has_c:
        den += a * l_c[bh, r]
    c = tid
    while c < dv:
        acc = np.float32(0.0)
        for j in range(n_e):
            acc += s[j] * ve[bh, j, c]
        num = b * acc
        if has_c:
            num += a * acc_c[bh, r, c]
        out[bh, r, c] = num / den
        c += threads


BIAS_THREADS = 128
"""Tokens (threads) per block of :func:`key_bias_scores`."""


@kernel
def key_bias_scores(kba, kbb, kfreq, kpos0, n_keys, out):
    """The RoPE-aware key-offset term of every compressed key, for the tensor-core kernel:
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


# ------------------------------------------------------------------ tensor-core fast path

FAST_ROWS = 8
"""Query rows per KV head the tensor-core kernel takes (the MMA's N = 8)."""
FAST_WARPS = 4
"""Warps per block of the tensor-core kernel; each takes 16 tokens per step."""
FAST_BLOCKS_PER_SM = 4
"""Blocks per SM the split count aims at: the 4 that are resident at once (one wave; 8
measured 6% slower at 1M tokens and 50% at 64K: each block has a fixed cost)."""
FAST_LAUNCH_BLOCKS = 4
"""Resident blocks per SM the tensor-core kernel's registers are capped for (its
``launch_bounds``: 128 registers, no spills at D = 128; left to itself the compiler took 133
once the tables were replicated, and 3 blocks fit); 0: the compiler's choice. Only for
``DK = DV = 128``: at 256 the cap spills (199 registers uncapped, none spilled)."""

if SIMULATOR:
    def half_bits(f):
        """The float16 bits (uint32, round to nearest even) of the float32 ``f``."""
        return np.uint32(np.array(np.float16(f)).view(np.uint16))

    def half_float(u):
        """The float32 value of the float16 bits in the low 16 bits of ``u``."""
        return np.float32(np.array(int(u) & 0xFFFF, np.uint16).view(np.float16))

    def load_f2(arr, i):
        """``(arr[i], arr[i + 1])`` (one 8-byte load on the device; ``i`` even)."""
        return arr[i], arr[i + np.uint64(1)]

    def store_f2(arr, i, a, b):
        """``arr[i], arr[i + 1] = a, b`` (one 8-byte store on the device; ``i`` even)."""
        arr[i] = a
        arr[i + np.uint64(1)] = b

    def half2_bits(lo, hi):
        """The float16 bits of ``lo`` (low half) and ``hi`` (high half) in one uint32."""
        return np.uint32(int(half_bits(lo)) | (int(half_bits(hi)) << 16))

    def load_u4(arr, i, c):
        """``arr[i + c : i + c + 4]`` of a uint32 array (one 16-byte load on the device;
        ``i + c`` a multiple of 4)."""
        k = int(i) + int(c)
        return arr[k], arr[k + 1], arr[k + 2], arr[k + 3]

    def load_u2(arr, i, c):
        """``arr[i + c : i + c + 2]`` of a uint32 array (one 8-byte load on the device;
        ``i + c`` even)."""
        k = int(i) + int(c)
        return arr[k], arr[k + 1]

    def load_u1(arr, i, c):
        """``arr[i + c]`` of a uint32 array."""
        return arr[int(i) + int(c)]

    def _half_of(u):
        return np.float64(np.array(int(u) & 0xFFFF, np.uint16).view(np.float16))

    @device
    def mma_sim(sa, sb, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        """``mma.sync.m16n8k16.row.col.f32.f16.f16.f32`` of one warp, emulated through the
        block-shared scratch ``sa`` (uint32, 4/lane), ``sb`` (uint32, 2/lane) — every thread of
        the block calls it (block barriers)."""
        tid = cuda.threadIdx.x
        base = tid - (tid & 31)
        lane = tid & 31
        sa[4 * tid], sa[4 * tid + 1], sa[4 * tid + 2], sa[4 * tid + 3] = a0, a1, a2, a3
        sb[2 * tid], sb[2 * tid + 1] = b0, b1
        cuda.syncthreads()
        g, t = lane >> 2, lane & 3
        out = [c0, c1, c2, c3]
        for i in range(4):
            row = g + 8 * (i >> 1)
            col = 2 * t + (i & 1)
            acc = np.float64(out[i])
            for k in range(16):
                ta = base + 4 * (row & 7) + ((k & 7) >> 1)
                areg = sa[4 * ta + (row >> 3) + 2 * (k >> 3)]
                tb = base + 4 * col + ((k & 7) >> 1)
                breg = sb[2 * tb + (k >> 3)]
                acc += _half_of(int(areg) >> (16 * (k & 1))) * _half_of(int(breg) >> (16 * (k & 1)))
            out[i] = np.float32(acc)
        cuda.syncthreads()
        return out[0], out[1], out[2], out[3]

    @device
    def lanes_max(sx, x):
        """Max of ``x`` over the 8 lanes of a warp with this lane's ``lane % 4`` (emulated)."""
        tid = cuda.threadIdx.x
        sx[tid] = x
        cuda.syncthreads()
        base = tid - (tid & 31) + (tid & 3)
        v = sx[base]
        for gg in range(1, 8):
            v = max(v, sx[base + 4 * gg])
        cuda.syncthreads()
        return np.float32(v)

    @device
    def block_any(sx, p):
        """Whether ``p`` holds on any thread of the block (emulates ``any_sync`` of the warp
        with block barriers: a block-uniform, hence warp-uniform, answer)."""
        tid = cuda.threadIdx.x
        sx[tid] = np.float32(1.0) if p else np.float32(0.0)
        cuda.syncthreads()
        v = np.float32(0.0)
        for i in range(cuda.blockDim.x):
            v = max(v, sx[i])
        cuda.syncthreads()
        return v > np.float32(0.0)

    @device
    def lanes_sum(sx, x):
        tid = cuda.threadIdx.x
        sx[tid] = x
        cuda.syncthreads()
        base = tid - (tid & 31) + (tid & 3)
        v = np.float32(0.0)
        for gg in range(8):
            v += sx[base + 4 * gg]
        cuda.syncthreads()
        return np.float32(v)
else:
    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    @intrinsic
    def half_bits(typingctx, f):
        def codegen(context, builder, signature, args):
            h = builder.fptrunc(args[0], ir.HalfType())
            return builder.zext(builder.bitcast(h, ir.IntType(16)), ir.IntType(32))
        return types.uint32(types.float32), codegen

    @intrinsic
    def half_float(typingctx, u):
        """The float32 value of the float16 bits ``u`` (uint16: a 16-bit load, one
        conversion)."""
        def codegen(context, builder, signature, args):
            h = builder.bitcast(args[0], ir.HalfType())
            return builder.fpext(h, ir.FloatType())
        if not isinstance(u, types.Integer) or u.bitwidth != 16:
            return None
        return types.float32(u), codegen

    def _f2_pointer(context, builder, arrty, arr, idx):
        ary = context.make_array(arrty)(context, builder, arr)
        ptr = builder.gep(ary.data, [idx], inbounds=True)
        return builder.bitcast(ptr, ir.VectorType(ir.FloatType(), 2).as_pointer())

    def _f2_array(arr):
        return (isinstance(arr, types.Array) and arr.dtype == types.float32 and arr.ndim == 1
                and arr.layout == "C")

    @intrinsic
    def load_f2(typingctx, arr, i):
        """``(arr[i], arr[i + 1])`` of a float32 array in one 8-byte load (``i``: uint64,
        even; the array 8-byte aligned, as every device allocation is)."""
        if not _f2_array(arr):
            return None

        def codegen(context, builder, signature, args):
            v = builder.load(_f2_pointer(context, builder, signature.args[0], *args), align=8)
            vals = [builder.extract_element(v, ir.Constant(ir.IntType(32), k)) for k in (0, 1)]
            return context.make_tuple(builder, signature.return_type, vals)
        return types.UniTuple(types.float32, 2)(arr, types.uint64), codegen

    @intrinsic
    def store_f2(typingctx, arr, i, a, b):
        """``arr[i], arr[i + 1] = a, b`` in one 8-byte store (as :func:`load_f2`)."""
        if not _f2_array(arr):
            return None

        def codegen(context, builder, signature, args):
            vty = ir.VectorType(ir.FloatType(), 2)
            v = builder.insert_element(ir.Constant(vty, ir.Undefined), args[2],
                                       ir.Constant(ir.IntType(32), 0))
            v = builder.insert_element(v, args[3], ir.Constant(ir.IntType(32), 1))
            builder.store(v, _f2_pointer(context, builder, signature.args[0], args[0], args[1]),
                          align=8)
            return context.get_dummy_value()
        return types.none(arr, types.uint64, types.float32, types.float32), codegen

    @intrinsic
    def half2_bits(typingctx, lo, hi):
        """``cvt.rn.f16x2.f32``: the float16 bits of ``lo`` (low half) and ``hi`` (high half)
        in one uint32, one instruction."""
        def codegen(context, builder, signature, args):
            f32, i32 = ir.FloatType(), ir.IntType(32)
            fn = ir.InlineAsm(ir.FunctionType(i32, [f32, f32]), "cvt.rn.f16x2.f32 $0, $2, $1;",
                              "=r,f,f")
            return builder.call(fn, args)
        return types.uint32(types.float32, types.float32), codegen

    def _u32_array(arr):
        return (isinstance(arr, types.Array) and arr.dtype == types.uint32 and arr.ndim == 1
                and arr.layout == "C")

    def _load_words(n):
        def typer(typingctx, arr, i, c):
            if not _u32_array(arr):
                return None

            def codegen(context, builder, signature, args):
                ary = context.make_array(signature.args[0])(context, builder, args[0])
                i64 = ir.IntType(64)
                # the 32-bit offset widened once (one wide multiply-add onto the row's
                # pointer), the constant apart: it folds into the load's immediate
                ptr = builder.gep(ary.data, [builder.zext(args[1], i64)], inbounds=True)
                ptr = builder.gep(ptr, [builder.zext(args[2], i64)], inbounds=True)
                if n == 1:
                    return builder.load(ptr, align=4)
                vty = ir.VectorType(ir.IntType(32), n)
                v = builder.load(builder.bitcast(ptr, vty.as_pointer()), align=4 * n)
                vals = [builder.extract_element(v, ir.Constant(ir.IntType(32), k))
                        for k in range(n)]
                return context.make_tuple(builder, signature.return_type, vals)
            ret = types.uint32 if n == 1 else types.UniTuple(types.uint32, n)
            return ret(arr, types.uint32, types.uint32), codegen
        return typer

    load_u4 = intrinsic(_load_words(4))
    load_u4.__doc__ = """``arr[i + c : i + c + 4]`` of a 1-D uint32 array in one 16-byte load
    (``i``, ``c``: uint32, ``c`` a constant, ``i + c`` a multiple of 4; the array 16-byte
    aligned)."""
    load_u2 = intrinsic(_load_words(2))
    load_u1 = intrinsic(_load_words(1))

    @intrinsic
    def mma16816(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        """``mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32`` (inline PTX)."""
        ret = types.UniTuple(types.float32, 4)
        sig = ret(*([types.uint32] * 6 + [types.float32] * 4))

        def codegen(context, builder, signature, args):
            f32, i32 = ir.FloatType(), ir.IntType(32)
            fnty = ir.FunctionType(ir.LiteralStructType([f32] * 4), [i32] * 6 + [f32] * 4)
            asm = ("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                   "{$0,$1,$2,$3}, {$4,$5,$6,$7}, {$8,$9}, {$10,$11,$12,$13};")
            fn = ir.InlineAsm(fnty, asm, "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f")
            res = builder.call(fn, args)
            vals = [builder.extract_value(res, i) for i in range(4)]
            return context.make_tuple(builder, signature.return_type, vals)
        return sig, codegen


if SIMULATOR:
    def shr32(a, s):
        """32-bit logical ``a >> s`` (uint32)."""
        return np.uint32(int(a) >> int(s))

    def mulhi32(a, b):
        """The high word of the 64-bit product ``a · b`` (uint32)."""
        return np.uint32((int(a) * int(b)) >> 32)

    def shl32(a, s):
        """32-bit ``a << s`` (uint32, truncated)."""
        return np.uint32((int(a) << int(s)) & 0xFFFFFFFF)

    def fshr32(lo, hi, s):
        """The low word of the 64-bit ``(hi:lo) >> s`` (``s`` < 32; uint32)."""
        return np.uint32((((int(hi) << 32) | int(lo)) >> int(s)) & 0xFFFFFFFF)

    def and32(a, b):
        return np.uint32(int(a) & int(b))

    def or32(a, b):
        return np.uint32(int(a) | int(b))

    def add32(a, b):
        """32-bit ``a + b`` (uint32, wrapping)."""
        return np.uint32((int(a) + int(b)) & 0xFFFFFFFF)

    def mul32(a, b):
        """32-bit ``a · b`` (uint32, wrapping)."""
        return np.uint32((int(a) * int(b)) & 0xFFFFFFFF)

    def min32(a, b):
        """Unsigned 32-bit ``min(a, b)``."""
        return np.uint32(min(int(a), int(b)))

    def exp2f(x):
        """``2 ** x`` in float32 (``ex2.approx.ftz.f32`` on the device)."""
        return np.float32(math.pow(2.0, float(x)))

    def word_at(arr, off):
        """The uint32 word of ``arr`` at byte offset ``off`` (a multiple of 4)."""
        return arr[int(off) >> 2]

    def f32_at(arr, off, c):
        """The float32 of ``arr`` at byte offset ``off + c``."""
        return arr[(int(off) + int(c)) >> 2]

    def set_f32_at(arr, off, c, v):
        """``arr`` at byte offset ``off + c`` = ``v`` (float32)."""
        arr[(int(off) + int(c)) >> 2] = v
else:
    def _binop32(op):
        def typer(typingctx, a, b):
            def codegen(context, builder, signature, args):
                return getattr(builder, op)(args[0], args[1])
            return types.uint32(types.uint32, types.uint32), codegen
        return intrinsic(typer)

    shr32 = _binop32("lshr")

    @intrinsic
    def mulhi32(typingctx, a, b):
        """``mul.hi.u32``: the high word of ``a · b`` (a right shift when ``b`` is a power of
        two, issued to the FMA pipe as IMAD.HI)."""
        def codegen(context, builder, signature, args):
            i32 = ir.IntType(32)
            fn = ir.InlineAsm(ir.FunctionType(i32, [i32, i32]), "mul.hi.u32 $0, $1, $2;",
                              "=r,r,r")
            return builder.call(fn, args)
        return types.uint32(types.uint32, types.uint32), codegen
    @intrinsic
    def fshr32(typingctx, lo, hi, s):
        """``shf.r.clamp.b32``: the low word of the 64-bit ``(hi:lo) >> s`` (one funnel
        shift: a field across two words)."""
        def codegen(context, builder, signature, args):
            i32 = ir.IntType(32)
            fn = ir.InlineAsm(ir.FunctionType(i32, [i32, i32, i32]),
                              "shf.r.clamp.b32 $0, $1, $2, $3;", "=r,r,r,r")
            return builder.call(fn, args)
        return types.uint32(types.uint32, types.uint32, types.uint32), codegen
    shl32 = _binop32("shl")
    and32 = _binop32("and_")
    or32 = _binop32("or_")
    add32 = _binop32("add")
    mul32 = _binop32("mul")

    @intrinsic
    def min32(typingctx, a, b):
        """Unsigned 32-bit ``min(a, b)`` (one instruction; Numba's ``min`` widens)."""
        def codegen(context, builder, signature, args):
            return builder.select(builder.icmp_unsigned("<", args[0], args[1]), args[0], args[1])
        return types.uint32(types.uint32, types.uint32), codegen

    @intrinsic
    def word_at(typingctx, arr, off):
        """The uint32 word of the 1-D uint32 array ``arr`` at byte offset ``off`` (uint32, a
        multiple of 4): a table index built at bit 2 goes to the load as it is, where
        ``arr[off >> 2]`` would be re-scaled (LLVM folds the shift back into the fields)."""
        if not (isinstance(arr, types.Array) and arr.dtype == types.uint32 and arr.ndim == 1):
            return None

        def codegen(context, builder, signature, args):
            ary = context.make_array(signature.args[0])(context, builder, args[0])
            base = builder.bitcast(ary.data, ir.IntType(8).as_pointer())
            ptr = builder.gep(base, [builder.zext(args[1], ir.IntType(64))], inbounds=True)
            return builder.load(builder.bitcast(ptr, ir.IntType(32).as_pointer()))
        return types.uint32(arr, types.uint32), codegen

    def _f32_ptr(context, builder, arrty, arr, off, c):
        ary = context.make_array(arrty)(context, builder, arr)
        i64 = ir.IntType(64)
        base = builder.bitcast(ary.data, ir.IntType(8).as_pointer())
        ptr = builder.gep(base, [builder.zext(off, i64)], inbounds=True)
        ptr = builder.gep(ptr, [builder.zext(c, i64)], inbounds=True)
        return builder.bitcast(ptr, ir.FloatType().as_pointer())

    def _f32_array(arr):
        return isinstance(arr, types.Array) and arr.dtype == types.float32 and arr.ndim == 1

    @intrinsic
    def f32_at(typingctx, arr, off, c):
        """The float32 of the 1-D ``arr`` at byte offset ``off + c`` (uint32; ``c`` a
        constant: it folds into the load's immediate)."""
        if not _f32_array(arr):
            return None

        def codegen(context, builder, signature, args):
            return builder.load(_f32_ptr(context, builder, signature.args[0], *args))
        return types.float32(arr, types.uint32, types.uint32), codegen

    @intrinsic
    def set_f32_at(typingctx, arr, off, c, v):
        """Store the float32 ``v`` at byte offset ``off + c`` of the 1-D ``arr``."""
        if not _f32_array(arr):
            return None

        def codegen(context, builder, signature, args):
            builder.store(args[3], _f32_ptr(context, builder, signature.args[0], *args[:3]))
            return context.get_dummy_value()
        return types.none(arr, types.uint32, types.uint32, types.float32), codegen

    @intrinsic
    def exp2f(typingctx, x):
        """``ex2.approx.ftz.f32``: ``2 ** x`` in one MUFU instruction (``math.exp`` takes
        about eight: a range reduction around the same MUFU)."""
        def codegen(context, builder, signature, args):
            f32 = ir.FloatType()
            fn = ir.InlineAsm(ir.FunctionType(f32, [f32]), "ex2.approx.ftz.f32 $0, $1;", "=f,f")
            return builder.call(fn, args)
        return types.float32(types.float32), codegen


_fast_kernels: dict = {}
_counter = [0]


def _build(name, lines, env):
    src = "\n".join(lines) + "\n"
    _counter[0] += 1
    filename = f"<rotorq.cuda.attention:{name}:{_counter[0]}>"
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
    glb = {"np": np, "cuda": cuda, "numba": numba, "math": math, "half_bits": half_bits,
           "U32": np.uint32, "U64": np.uint64, "shr32": shr32, "shl32": shl32, "and32": and32,
           "fshr32": fshr32,
           "or32": or32, "add32": add32, "mul32": mul32, "min32": min32, "mulhi32": mulhi32,
           "exp2f": exp2f, "word_at": word_at, "f32_at": f32_at, "set_f32_at": set_f32_at,
           "half2_bits": half2_bits, "load_f2": load_f2, "store_f2": store_f2,
           "load_u4": load_u4, "load_u2": load_u2, "load_u1": load_u1, "U16": np.uint16,
           "half_float": half_float}
    if SIMULATOR:
        glb.update(mma_sim=mma_sim, lanes_max=lanes_max, lanes_sum=lanes_sum,
                   block_any=block_any)
    else:
        glb.update(mma16816=mma16816)
    glb.update(env)
    exec(compile(src, filename, "exec"), glb)
    kern = kernel(glb[name])
    kern.rotorq_source = src
    return kern


def _mma_scratch(warps):
    """Generated lines: the block-shared scratch of :func:`mma_sim` (simulator only)."""
    return [f"    sa = cuda.shared.array({warps * 128}, numba.uint32)",
            f"    sb = cuda.shared.array({warps * 64}, numba.uint32)"]


def _field(word, p, bits, shift=0, mulhi=False):
    """Expression (32-bit ops) of the ``bits``-bit field at bit ``p`` of the uint32 words
    ``{word}0, {word}1, …``, shifted left by ``shift``. ``mulhi``: a right shift as the
    high word of a multiplication (the FMA pipe instead of the ALU pipe)."""
    w, s = p // 32, p % 32
    mask = ((1 << bits) - 1) << shift
    if s + bits <= 32:
        if s == shift:
            return f"and32({word}{w}, U32({mask}))"
        if s > shift and mulhi:
            return f"and32(mulhi32({word}{w}, U32({1 << (32 - s + shift)})), U32({mask}))"
        if s > shift:
            return f"and32(shr32({word}{w}, U32({s - shift})), U32({mask}))"
        return f"and32(shl32({word}{w}, U32({shift - s})), U32({mask}))"
    if s >= shift and FAST_FUNNEL:  # across two words: one funnel shift puts it at `shift`
        return f"and32(fshr32({word}{w}, {word}{w + 1}, U32({s - shift})), U32({mask}))"
    both = f"or32(shr32({word}{w}, U32({s})), shl32({word}{w + 1}, U32({32 - s})))"
    if shift:
        both = f"shl32({both}, U32({shift}))"
    return f"and32({both}, U32({mask}))"


STATIC_SHARED = 48 * 1024
"""Static shared memory one block may declare."""
FAST_MULHI = 0
"""Tile layout: right shifts of the table-index fields done as ``mul.hi`` (FMA pipe) for
every lookup (1), every other one (2) or none (0), to unload the ALU pipe."""
FAST_PREFETCH = 1
"""Tiles in flight ahead of the one computed (tile layout; the row layout takes 1)."""
FAST_UNROLL = None
"""Tile layout: copies of the loop body per iteration; None: one per set of prefetch
registers (:data:`FAST_PREFETCH` + 1), so no register moves carry them across iterations."""
FAST_FUNNEL = True
"""A code field across two words as one funnel shift (``shf.r``); ``False``: two shifts and
an or (benchmarks compare)."""
FAST_FULL_TILES = True
"""Run the steps whose tiles every query row sees whole first, without the per-score mask,
then the last steps in a masked copy of the loop body; ``False``: one loop, every score
masked (benchmarks compare)."""
FAST_PAIRED = False
"""With :data:`FAST_FULL_TILES`: the unmasked loop runs only while all its body copies have
a full step, so no exit test separates them and one step's value MMAs and the next step's
key lookups fall in one basic block, where ptxas may interleave them (the masked loop takes
the rest); ``False``: an exit test before each copy (benchmarks compare)."""
FAST_RESCALE_SLACK = 4.0
"""Lazy rescaling (base-2 units, ≥ 0): when a score rises above a row's reference, the new
reference is the row's maximum plus this slack, so the running sums and accumulators are
rescaled again only once a score exceeds it; ``p = 2^(s − ref) ≤ 1`` still holds, and the
top score's ``p`` is at least ``2^−slack`` (its float16 ``p·ν`` keeps full precision while
``p·ν ≥ 2^−14``). ``max_out`` is then the reference, up to ``slack·ln 2`` above the
maximum: the partials' ``max_out + log(sum_out)`` and ``acc_out / sum_out`` are what the
general kernel gives. 0: the reference is the running maximum (benchmarks compare; H200,
1M tokens: 4 takes the attention kernel from 160 to 157 µs)."""
FAST_TABLE_COPIES = None
"""``(key, value)`` pair-table copies of the tensor-core kernel; None: :func:`table_copies`
(benchmarks compare)."""
REPLICAS = 32
"""Copies of a replicated pair table: entry ``e`` of lane ``l``'s copy is word ``32·e + l``,
in lane ``l``'s own bank, so a warp's lookup is one shared-memory wavefront whatever the
codes (a single 64-entry table takes two: its 2 entries per bank are both wanted in almost
every lookup of 32 random codes)."""


def _red_stride(big_dv):
    """Row stride (floats) of the warps' accumulator exchange: ≡ 4 (mod 16), so the stores
    of a warp's ``(row 2t[+1], coordinate 8j + g)`` fall in 32 distinct banks."""
    return big_dv + 4


def table_copies(big_dk, kbits, big_dv, vbits):
    """``(key table copies, value table copies)`` of :func:`attention_kernel` (each
    :data:`REPLICAS` or 1: replicate the smaller tables first) within
    :data:`STATIC_SHARED`, or None when even single tables do not fit."""
    lk2, lv2 = 1 << (2 * kbits), 1 << (2 * vbits)
    fixed = 4 * (FAST_WARPS * 128 + 2 * FAST_WARPS * 8 + FAST_WARPS * 8 * _red_stride(big_dv))
    options = [(REPLICAS, REPLICAS), (1, REPLICAS) if lv2 <= lk2 else (REPLICAS, 1),
               (REPLICAS, 1) if lv2 <= lk2 else (1, REPLICAS), (1, 1)]
    for ck, cv in options:
        if fixed + 4 * (lk2 * ck + lv2 * cv) <= STATIC_SHARED:
            return ck, cv
    return None


def fast_config(dk, kbits, dv, vbits, k_row_bytes, v_row_bytes):
    """``(DK, kbits, DV, vbits)`` for :func:`attention_kernel` if it applies, else None."""
    if dk % 128 or dv % 128 or not (0 < dk <= 512 and 0 < dv <= 512):
        return None
    if not (1 <= kbits <= 4 and 1 <= vbits <= 4):
        return None
    if k_row_bytes * 8 != dk * kbits or v_row_bytes * 8 != dv * vbits:
        return None
    if table_copies(dk, kbits, dv, vbits) is None:  # D_v = 384, 512: the general kernel
        return None
    return (int(dk), int(kbits), int(dv), int(vbits))


def attention_kernel(big_dk, kbits, big_dv, vbits, blocks=None, copies=None, bias=False,
                     tiled=False, depth=None):
    """Tensor-core decode attention: one MSE key part, one value part, ≤ 8 query rows.

    ``(q f32 (BH, R, DK), kc u32 (BH, cap·DK·kbits/32), kn f16 (BH, cap), kcent f32,
    vc u16 (BH, cap·DV·vbits/16), vn f16 (BH, cap), vcent f32, n_keys, n_q, causal_offset,
    chunk, acc_out f32 (BH, S, R, DV), max_out, sum_out f32 (BH, S, R))`` — the partials of
    the general kernel's contract. Grid ``(S, BH)``, :data:`FAST_WARPS` warps per block.

    Each warp takes 16 tokens per step. Scores: ``Sᵀ (16 tok × 8 rows) = K (16 × DK) · Qᵀ``
    with ``mma.m16n8k16`` (fp16 in, fp32 accumulate); lane ``(g, t) = (lane/4, lane%4)`` owns
    the contiguous coordinates ``[t·DK/4, (t+1)·DK/4)`` of its tokens ``g`` and ``g+8`` (the
    MMA's k-index is permuted to match, so every bit offset is a constant) and decodes two
    adjacent codes at once through a shared table of ``half2(c[a], c[b])`` pairs. The scores
    times the key norms, masked, go through the online softmax: only when a score of the warp
    exceeds its row's standing reference (one warp vote) are the row maxima reduced over the
    row's 8 lanes by shuffles, the reference set to the maximum plus
    :data:`FAST_RESCALE_SLACK`, and the running sums and accumulators rescaled; the running sum is
    kept per lane and reduced at the end. Values:
    ``accᵀ (DV × 8 rows) += Vᵀ (DV × 16 tok) · (p·ν)ᵀ`` with the M index permuted so that lane
    group ``g`` owns coordinates ``[g·DV/8, (g+1)·DV/8)``; ``p·ν`` is transposed to the B
    layout through a per-warp shared buffer. The block's warps merge in shared memory and
    write one partial per split.

    ``bias=True``: one more argument after ``vcent``, ``kbias`` f32 (BH, ≥ 8·n_keys): key
    ``j``'s 8 rows at ``8j … 8j+7`` (:func:`key_bias_kernel`'s layout), the
    RoPE-aware key-offset term of each key and row (:func:`key_bias_scores`), added to the
    scores.

    ``tiled=True``: the codes and norms are in the tile layout of :mod:`rotorq.tiles` —
    ``kc``, ``vc`` flat uint32 (BH·cap·D·bits/32,) and ``kn``, ``vn`` flat uint32
    (BH·cap/2,), the float16 norms of tokens ``g, g+8`` in one word, each fewer than 2^32
    words (32-bit offsets); ``chunk`` a multiple of 16. A lane's
    codes of a step are then a 16-byte and an 8-byte load per stream (coalesced across the
    warp) instead of 18 scattered ones, and the codes of tokens ``2t, 2t+1`` at each value
    coordinate are side by side, so a value pair lookup takes one field.

    The pair tables are replicated per lane where shared memory allows
    (:func:`table_copies`), so a lookup is one wavefront. Token indices are 32-bit; in the
    row layout each lane reads its words through a view that starts at its first word, in
    the tile layout through 32-bit word offsets into the flat arrays, so a load's address is
    one wide multiply-add onto the array's pointer. Tiles are prefetched ``depth`` steps
    ahead (:data:`FAST_PREFETCH`) and the loop body is written once per set of prefetch
    registers (:data:`FAST_UNROLL`), so no register moves carry them. Scores are kept in
    base 2 (the query carries log2 e; ``ex2.approx`` is one instruction) and turned back
    into base e for ``max_out``.
    """
    if blocks is None:  # wider heads keep more accumulators: capped, they would spill
        blocks = FAST_LAUNCH_BLOCKS if big_dk + big_dv <= 256 else 0
    blocks = blocks or None
    copies = FAST_TABLE_COPIES if copies is None else copies
    depth = depth or (FAST_PREFETCH if tiled else 1)
    mulhi = FAST_MULHI if tiled else 0
    unroll = (FAST_UNROLL or depth + 1) if tiled else 1
    full_tiles = bool(FAST_FULL_TILES)
    paired = full_tiles and bool(FAST_PAIRED) and unroll > 1
    slack = float(FAST_RESCALE_SLACK)
    if not (math.isfinite(slack) and slack >= 0):
        raise ValueError(f"FAST_RESCALE_SLACK must be finite and >= 0, got {slack!r}")
    key = (big_dk, kbits, big_dv, vbits, blocks, copies, bool(bias), bool(tiled), depth, mulhi,
           unroll, full_tiles, bool(FAST_FUNNEL), paired, slack)
    nlook = [0]

    def tfield(word, p, bits, shift):
        """:func:`_field`, every ``mulhi``-th right shift as a multiplication."""
        nlook[0] += 1
        return _field(word, p, bits, shift=shift,
                      mulhi=bool(mulhi) and nlook[0] % mulhi == 0)
    if key in _fast_kernels:
        return _fast_kernels[key]
    kw = big_dk * kbits // 128  # uint32 key words per lane (DK/4 coordinates)
    vw = big_dv * vbits // 128  # uint16 value words per lane group (DV/8 coordinates)
    nx = (vw + 1) // 2
    kch = big_dk // 16
    mtiles = big_dv // 16
    lk2, lv2 = 1 << (2 * kbits), 1 << (2 * vbits)
    W = FAST_WARPS
    sim = SIMULATOR
    ck, cv = copies or table_copies(big_dk, kbits, big_dv, vbits)
    S = _red_stride(big_dv)
    L = [f"def attn_fast(q, kc, kn, kcent, vc, vn, vcent, {'kbias, ' if bias else ''}"
         "n_keys, n_q, causal_offset, chunk,",
         "              acc_out, max_out, sum_out):",
         f"    tabk = cuda.shared.array({lk2 * ck}, numba.uint32)",
         f"    tabv = cuda.shared.array({lv2 * cv}, numba.uint32)",
         f"    pt = cuda.shared.array({W * 128}, numba.float32)",
         f"    red_m = cuda.shared.array({W * 8}, numba.float32)",
         f"    red_l = cuda.shared.array({W * 8}, numba.float32)",
         f"    red_a = cuda.shared.array({W * 8 * S}, numba.float32)"]
    if sim:
        L += _mma_scratch(W) + [f"    sx = cuda.shared.array({W * 32}, numba.float32)"]
    L += ["    tid = cuda.threadIdx.x",
          "    lane = tid & 31",
          "    warp = tid >> 5",
          "    g = lane >> 2",
          "    t = lane & 3",
          "    s = cuda.blockIdx.x",
          "    bh = cuda.blockIdx.y",
          "    n_rows = acc_out.shape[2]",
          "    neg_inf = np.float32(-math.inf)",
          "    one = np.float32(1.0)",
          "    lane4 = U32(4 * lane)",
          # the centroids as float16 bits in shared memory first: the (replicated) table
          # build then reads no global memory in its loop
          f"    if tid < {1 << kbits}:",
          "        pt[tid] = kcent[tid]",
          f"    elif tid - {1 << kbits} < {1 << vbits}:",
          f"        pt[tid] = vcent[tid - {1 << kbits}]",
          "    cuda.syncthreads()",
          "    e = tid",
          f"    while e < {lk2 * ck}:",
          f"        en = e // {ck}",
          f"        tabk[e] = half_bits(pt[en & {(1 << kbits) - 1}]) | "
          f"(half_bits(pt[en >> {kbits}]) << U32(16))",
          f"        e += {32 * W}",
          "    e = tid",
          f"    while e < {lv2 * cv}:",
          f"        en = e // {cv}",
          f"        tabv[e] = half_bits(pt[{1 << kbits} + (en & {(1 << vbits) - 1})]) | "
          f"(half_bits(pt[{1 << kbits} + (en >> {vbits})]) << U32(16))",
          f"        e += {32 * W}",
          "    qr = min(g, n_rows - 1)",
          # scores in base 2: the query carries log2(e), the softmax uses ex2 (one MUFU)
          f"    qz = np.float32({LOG2E!r}) if g < n_rows else np.float32(0.0)",
          f"    qo = t * {big_dk // 4}"]
    for c in range(kch):
        for h in range(2):
            o = 4 * c + 2 * h
            L.append(f"    qb{c}_{h} = half_bits(qz * q[bh, qr, qo + {o}]) | "
                     f"(half_bits(qz * q[bh, qr, qo + {o + 1}]) << U32(16))")
    L += ["    ra = 2 * t",
          "    rb = 2 * t + 1",
          "    t0 = s * chunk",
          "    t1 = min(n_keys, t0 + chunk, n_q + causal_offset)",
          "    last = U32(max(t1 - 1, 0))",
          "    m_a = neg_inf",
          "    m_b = neg_inf",
          "    ref_a = np.float32(0.0)",
          "    ref_b = np.float32(0.0)",
          "    l_a = np.float32(0.0)",
          "    l_b = np.float32(0.0)"]
    for mt in range(mtiles):
        for i in range(4):
            L.append(f"    o{mt}_{i} = np.float32(0.0)")
    L += [f"    ntile = (max(t1 - t0, 0) + {16 * W - 1}) // {16 * W}",
          "    cuda.syncthreads()",
          "    pst = U32(4 * (warp * 128 + g * 8 + 2 * t))",
          "    pld = U32(4 * (warp * 128 + 16 * t + g))",
          # 32-bit token indices; each lane's words as a view from its first word, so a row's
          # address is one wide multiply-add
          "    kcl = kc" if tiled else f"    kcl = kc[bh, t * {kw}:]",
          "    vcl = vc" if tiled else f"    vcl = vc[bh, g * {vw}:]",
          "    knb = kn" if tiled else "    knb = kn[bh]",
          "    vnb_ = vn" if tiled else "    vnb_ = vn[bh]"]
    if tiled:
        # 32-bit word offsets into the flat arrays (the caller keeps them below 2^32 words):
        # a load's address is then one wide multiply-add onto the array's pointer, a kernel
        # parameter, and no 64-bit row pointer is rematerialized in the loop
        L += ["    ltile = shr32(last, U32(4))",
              "    n_bh = q.shape[0]",
              "    ubh = U32(bh)",
              "    k16 = add32(mul32(ubh, U32(kc.shape[0] // n_bh)), lane4)",
              "    k8 = add32(mul32(ubh, U32(kc.shape[0] // n_bh)), U32(2 * lane))",
              "    v16 = add32(mul32(ubh, U32(vc.shape[0] // n_bh)), lane4)",
              "    v8 = add32(mul32(ubh, U32(vc.shape[0] // n_bh)), U32(2 * lane))",
              "    gw = add32(mul32(ubh, U32(kn.shape[0] // n_bh)), U32(g))"]
    if bias:  # the key-offset term of rows ra, rb (rows past n_rows are masked anyway)
        L += ["    kbl = kbias[bh]",
              "    rau = U64(ra)"]
    L += ["    gu = U32(g)",
          "    g8u = U32(g + 8)",
          "    ox0 = U32(2 * t)",
          "    ox1 = U32(2 * t + 1)",
          "    ox2 = U32(2 * t + 8)",
          "    ox3 = U32(2 * t + 9)",
          "    nbase = U32(t0 + warp * 16)"]
    krow, vrow_w = big_dk * kbits // 32, big_dv * vbits // 16

    def loads(ind, pre, base):
        """Loads of the tile at ``base`` (indices clamped into the split) into ``{pre}…``."""
        out = [f"{ind}{pre}ja = min32(add32({base}, gu), last)",
               f"{ind}{pre}jb = min32(add32({base}, g8u), last)"]
        for w in range(kw):
            out.append(f"{ind}{pre}ka{w} = kcl[U64({pre}ja) * U64({krow}) + U64({w})]")
            out.append(f"{ind}{pre}kb{w} = kcl[U64({pre}jb) * U64({krow}) + U64({w})]")
        # value words of tokens 2t, 2t+1, 2t+8, 2t+9 (x = 0..3)
        for x in range(4):
            out.append(f"{ind}jv = U64(min32(add32({base}, ox{x}), last)) * U64({vrow_w})")
            for w in range(vw):
                out.append(f"{ind}u{w} = U32(vcl[jv + U64({w})])")
            for i in range(nx):
                if 2 * i + 1 < vw:
                    out.append(f"{ind}{pre}v{x}_{i} = or32(u{2 * i}, shl32(u{2 * i + 1}, U32(16)))")
                else:
                    out.append(f"{ind}{pre}v{x}_{i} = u{2 * i}")
        if bias:
            out += [f"{ind}{pre}ba_a, {pre}bb_a = load_f2(kbl, U64({pre}ja) * U64(8) + rau)",
                    f"{ind}{pre}ba_b, {pre}bb_b = load_f2(kbl, U64({pre}jb) * U64(8) + rau)"]
        out += [f"{ind}{pre}na = np.float32(knb[U64({pre}ja)])",
                f"{ind}{pre}nb = np.float32(knb[U64({pre}jb)])",
                f"{ind}{pre}vna = np.float32(vnb_[U64({pre}ja)])",
                f"{ind}{pre}vnb = np.float32(vnb_[U64({pre}jb)])"]
        return out

    kslots = [f"ka{w}" for w in range(kw)] + [f"kb{w}" for w in range(kw)]
    vslots = [f"wa{w}" for w in range(vw)] + [f"wb{w}" for w in range(vw)]

    def vector_loads(ind, pre, arr, first, slots, o16, o8):
        """A lane's words ``slots`` of the tile at word ``first`` of the row (uint32):
        16-byte chunks at ``128c + 4·lane``, an 8-byte rest at ``128F + 2·lane``
        (:mod:`rotorq.tiles`); ``o16``, ``o8``: the row's first word plus the lane's."""
        out, full = [], len(slots) // 4
        for c in range(full):
            dst = ", ".join(pre + n for n in slots[4 * c:4 * c + 4])
            out.append(f"{ind}{dst} = load_u4({arr}, add32({first}, {o16}), U32({128 * c}))")
        if len(slots) % 4:
            dst = ", ".join(pre + n for n in slots[4 * full:])
            out.append(f"{ind}{dst} = load_u2({arr}, add32({first}, {o8}), "
                       f"U32({128 * full}))")
        return out

    def tiled_loads(ind, pre, base):
        """Loads of the tile at token ``base`` (a multiple of 16, clamped to the split's
        last tile) into ``{pre}…``."""
        out = [f"{ind}{pre}tt = min32(shr32({base}, U32(4)), ltile)"]
        out += vector_loads(ind, pre, "kcl", f"mul32({pre}tt, U32({16 * krow}))", kslots,
                            "k16", "k8")
        out += vector_loads(ind, pre, "vcl", f"mul32({pre}tt, U32({8 * vrow_w}))", vslots,
                            "v16", "v8")
        out += [f"{ind}{pre}nx = add32(shl32({pre}tt, U32(3)), gw)",
                f"{ind}{pre}nkw = load_u1(knb, {pre}nx, U32(0))",
                f"{ind}{pre}nvw = load_u1(vnb_, {pre}nx, U32(0))"]
        if bias:
            out += [f"{ind}{pre}ja = min32(add32({base}, gu), last)",
                    f"{ind}{pre}jb = min32(add32({base}, g8u), last)",
                    f"{ind}{pre}ba_a, {pre}bb_a = load_f2(kbl, U64({pre}ja) * U64(8) + rau)",
                    f"{ind}{pre}ba_b, {pre}bb_b = load_f2(kbl, U64({pre}jb) * U64(8) + rau)"]
        return out

    if tiled:
        loads = tiled_loads
        names = kslots + vslots + ["nkw", "nvw"]
    else:
        names = kslots + [f"v{x}_{i}" for x in range(4) for i in range(nx)] + [
            "na", "nb", "vna", "vnb"]
    names += ["ba_a", "bb_a", "ba_b", "bb_b"] if bias else []
    # software pipelining: the next `depth` tiles' codes are in flight while this one is
    # computed (prefetch sets n_, n1_, …; the loads past the split are clamped to its end)
    pre = ["n_"] + [f"n{i}_" for i in range(1, depth)]
    L += loads("    ", pre[0], "nbase")
    for i in range(1, depth):
        L += [f"    nbase{i} = add32(nbase, U32({16 * W * i}))"]
        L += loads("    ", pre[i], f"nbase{i}")
    # a 32-bit loop count, the same for the whole block (Numba's range counts in 64 bits)
    # tokens a row may see, as a count: ta < cnt (≤ t1) is the whole mask (computed after
    # the unmasked steps where there are: two registers fewer through them)
    counts = ["    cnt_a = U32(max(min(t1, ra % n_q + causal_offset + 1), 0)) if ra < n_rows "
              "else U32(0)",
              "    cnt_b = U32(max(min(t1, rb % n_q + causal_offset + 1), 0)) if rb < n_rows "
              "else U32(0)"]
    if not full_tiles:
        L += counts
    L += ["    ntu = U32(ntile)",
          "    it = U32(0)"]
    if full_tiles:  # steps whose 16·W tokens every row sees whole (row 0 sees the fewest)
        L += [f"    nfu = U32(min(ntile, max(min(t1, causal_offset + 1) - t0, 0) // {16 * W}))",
              f"    while add32(it, U32({unroll - 1})) < nfu:" if paired else "    while it < nfu:"]
    else:
        L += ["    while it < ntu:"]
    L += ["        it = add32(it, U32(1))"]
    body_at = len(L)
    ind = " " * 8
    L += [f"{ind}base = nbase",
          f"{ind}ta = add32(base, gu)",
          f"{ind}tb = add32(base, g8u)"]
    L += [f"{ind}{n} = n_{n}" for n in names]
    for i in range(1, depth):
        L += [f"{ind}{pre[i - 1]}{n} = {pre[i]}{n}" for n in names]
    if tiled:
        L += [f"{ind}na = half_float(U16(nkw))",
              f"{ind}nb = half_float(U16(shr32(nkw, U32(16))))",
              f"{ind}vna = half_float(U16(nvw))",
              f"{ind}vnb = half_float(U16(shr32(nvw, U32(16))))"]
    L.append(f"{ind}nbase = add32(base, U32({16 * W}))")
    if depth > 1:
        L.append(f"{ind}nbase{depth - 1} = add32(base, U32({16 * W * depth}))")
    L += loads(ind, pre[-1], f"nbase{depth - 1}" if depth > 1 else "nbase")
    L += [f"{ind}{v}{i} = np.float32(0.0)" for v in "sz" for i in range(4)]

    def mma(a, b, c):
        call = "mma_sim(sa, sb, " if sim else "mma16816("
        return f"{ind}{c} = {call}{a}, {b}, {c})"

    # table indices are built as byte offsets (an entry's field at bit 2, or at bit 7 in a
    # replicated table, whose lane term is added)
    kshift = 7 if ck > 1 else 2
    vshift = 7 if cv > 1 else 2

    def lookup(expr, copies):
        return f"or32({expr}, lane4)" if copies > 1 else expr

    for c in range(kch):
        p0, p1 = 4 * c * kbits, (4 * c + 2) * kbits  # pairs (4c, 4c+1) and (4c+2, 4c+3)
        L += [f"{ind}a{i} = word_at(tabk, {lookup(tfield(w, p, 2 * kbits, kshift), ck)})"
              for i, (w, p) in enumerate((("ka", p0), ("kb", p0), ("ka", p1), ("kb", p1)))]
        acc = "s0, s1, s2, s3" if c % 2 == 0 else "z0, z1, z2, z3"
        L.append(mma("a0, a1, a2, a3", f"qb{c}_0, qb{c}_1", acc))
    if kch > 1:
        L += [f"{ind}s{i} = s{i} + z{i}" for i in range(4)]
    add = ([f" + ba_a * np.float32({LOG2E!r})", f" + bb_a * np.float32({LOG2E!r})",
            f" + ba_b * np.float32({LOG2E!r})", f" + bb_b * np.float32({LOG2E!r})"]
           if bias else [""] * 4)
    scaled = [f"s0 * na{add[0]}", f"s1 * na{add[1]}", f"s2 * nb{add[2]}", f"s3 * nb{add[3]}"]
    masked = [f"{ind}s0 = {scaled[0]} if ta < cnt_a else neg_inf",
              f"{ind}s1 = {scaled[1]} if ta < cnt_b else neg_inf",
              f"{ind}s2 = {scaled[2]} if tb < cnt_a else neg_inf",
              f"{ind}s3 = {scaled[3]} if tb < cnt_b else neg_inf"]
    unmasked = [f"{ind}s{i} = {scaled[i]}" for i in range(4)]
    mask_at = len(L)
    L += unmasked if full_tiles else masked
    L += [f"{ind}x_a = max(s0, s2)",
          f"{ind}x_b = max(s1, s3)"]
    # the row maxima change only while some score of the warp exceeds them (rarely, past the
    # first tiles): only then the reduction over the row's lanes, the running-sum and
    # accumulator rescale; otherwise the scores are exponentiated against the standing maxima
    # (one uniform branch: the MMAs below need the warp converged)
    rise = "(x_a > m_a) | (x_b > m_b)"
    L.append(f"{ind}if {'block_any(sx, ' if sim else 'cuda.any_sync(0xFFFFFFFF, '}{rise}):")
    ind2 = ind + "    "
    if sim:
        L += [f"{ind2}x_a = lanes_max(sx, x_a)", f"{ind2}x_b = lanes_max(sx, x_b)"]
    else:
        for sh in (4, 8, 16):
            L += [f"{ind2}x_a = max(x_a, cuda.shfl_xor_sync(0xFFFFFFFF, x_a, {sh}))",
                  f"{ind2}x_b = max(x_b, cuda.shfl_xor_sync(0xFFFFFFFF, x_b, {sh}))"]
    for r in ("a", "b"):
        top = f"x_{r} + np.float32({slack!r})" if slack else f"x_{r}"
        L += [f"{ind2}mn = max(m_{r}, {top})",
              f"{ind2}al_{r} = exp2f(m_{r} - mn) if mn > m_{r} else one",
              f"{ind2}ref_{r} = mn if mn != neg_inf else np.float32(0.0)",
              f"{ind2}m_{r} = mn",
              f"{ind2}l_{r} *= al_{r}"]
    for mt in range(mtiles):
        L += [f"{ind2}o{mt}_0 *= al_a", f"{ind2}o{mt}_1 *= al_b",
              f"{ind2}o{mt}_2 *= al_a", f"{ind2}o{mt}_3 *= al_b"]
    L += [f"{ind}p0 = exp2f(s0 - ref_a)",
          f"{ind}p1 = exp2f(s1 - ref_b)",
          f"{ind}p2 = exp2f(s2 - ref_a)",
          f"{ind}p3 = exp2f(s3 - ref_b)",
          f"{ind}l_a += p0 + p2",
          f"{ind}l_b += p1 + p3"]
    # p·ν to the B layout through the warp's 128 floats; 32-bit byte offsets with constant
    # displacements (rows ra, rb = ra + 1; tokens g, g + 8 / 2t, 2t + 1, 2t + 8, 2t + 9)
    L += [f"{ind}set_f32_at(pt, pst, U32(0), p0 * vna)",
          f"{ind}set_f32_at(pt, pst, U32(4), p1 * vna)",
          f"{ind}set_f32_at(pt, pst, U32(256), p2 * vnb)",
          f"{ind}set_f32_at(pt, pst, U32(260), p3 * vnb)"]
    sync = "cuda.syncthreads()" if sim else "cuda.syncwarp(0xFFFFFFFF)"
    L += [f"{ind}{sync}",
          f"{ind}pb0 = half_bits(f32_at(pt, pld, U32(0))) | "
          f"(half_bits(f32_at(pt, pld, U32(32))) << U32(16))",
          f"{ind}pb1 = half_bits(f32_at(pt, pld, U32(256))) | "
          f"(half_bits(f32_at(pt, pld, U32(288))) << U32(16))",
          f"{ind}{sync}"]
    for mt in range(mtiles):
        if tiled:  # coordinate j's codes of tokens (2t, 2t+1) side by side: one field
            for i, (w, j) in enumerate((("wa", 2 * mt), ("wa", 2 * mt + 1), ("wb", 2 * mt),
                                        ("wb", 2 * mt + 1))):
                fld = tfield(w, 2 * j * vbits, 2 * vbits, vshift)
                L.append(f"{ind}a{i} = word_at(tabv, {lookup(fld, cv)})")
            L.append(mma("a0, a1, a2, a3", "pb0, pb1", f"o{mt}_0, o{mt}_1, o{mt}_2, o{mt}_3"))
            continue
        regs = []
        for x0, x1, j in ((0, 1, 2 * mt), (0, 1, 2 * mt + 1), (2, 3, 2 * mt), (2, 3, 2 * mt + 1)):
            lo = lookup(_field(f"v{x0}_", j * vbits, vbits, shift=vshift), cv)
            hi = _field(f"v{x1}_", j * vbits, vbits, shift=vbits + vshift)
            regs.append(f"word_at(tabv, or32({lo}, {hi}))")
        L += [f"{ind}a0 = {regs[0]}", f"{ind}a1 = {regs[1]}", f"{ind}a2 = {regs[2]}",
              f"{ind}a3 = {regs[3]}"]
        L.append(mma("a0, a1, a2, a3", "pb0, pb1", f"o{mt}_0, o{mt}_1, o{mt}_2, o{mt}_3"))
    # the body once per set of prefetch registers: each copy loads into the set the previous
    # copy computed from, so the loop carries them without register moves
    body = L[body_at:]
    stop = "nfu" if full_tiles else "ntu"
    for _ in range(1, unroll):
        test = [] if paired else [f"{ind}if it >= {stop}:", f"{ind}    break"]
        L += test + [f"{ind}it = add32(it, U32(1))"] + body
    if full_tiles:  # then the last steps (at most unroll + n_q/16·W), masked, one copy
        k = mask_at - body_at
        L += counts + ["    while it < ntu:", f"{ind}it = add32(it, U32(1))"]
        L += body[:k] + masked + body[k + len(unmasked):]
    # finish: per-lane sums over the row's 8 lanes, then the block's warps merge
    ind = " " * 4
    if sim:
        L += [f"{ind}l_a = lanes_sum(sx, l_a)", f"{ind}l_b = lanes_sum(sx, l_b)"]
    else:
        for sh in (4, 8, 16):
            L += [f"{ind}l_a += cuda.shfl_xor_sync(0xFFFFFFFF, l_a, {sh})",
                  f"{ind}l_b += cuda.shfl_xor_sync(0xFFFFFFFF, l_b, {sh})"]
    L += [f"{ind}if g == 0:",
          f"{ind}    red_m[warp * 8 + ra] = m_a",
          f"{ind}    red_m[warp * 8 + rb] = m_b",
          f"{ind}    red_l[warp * 8 + ra] = l_a",
          f"{ind}    red_l[warp * 8 + rb] = l_b",
          # coordinate g·DV/8 + j of a row is stored at 8j + g (conflict-free, see _red_stride)
          f"{ind}ob = warp * {8 * S} + g"]
    for mt in range(mtiles):
        L += [f"{ind}red_a[ob + ra * {S} + {16 * mt}] = o{mt}_0",
              f"{ind}red_a[ob + rb * {S} + {16 * mt}] = o{mt}_1",
              f"{ind}red_a[ob + ra * {S} + {16 * mt + 8}] = o{mt}_2",
              f"{ind}red_a[ob + rb * {S} + {16 * mt + 8}] = o{mt}_3"]
    L += [f"{ind}cuda.syncthreads()",
          f"{ind}u = tid",
          f"{ind}while u < n_rows * {big_dv + 1}:",
          f"{ind}    if u < n_rows * {big_dv}:",
          f"{ind}        r = u // {big_dv}",
          f"{ind}        cp = u - r * {big_dv}",
          f"{ind}        col = (cp % 8) * {big_dv // 8} + cp // 8",
          f"{ind}    else:",
          f"{ind}        r = u - n_rows * {big_dv}",
          f"{ind}    mx = neg_inf"]
    for w in range(W):
        L.append(f"{ind}    mx = max(mx, red_m[{8 * w} + r])")
    L += [f"{ind}    sf = mx if mx != neg_inf else np.float32(0.0)",
          f"{ind}    tot = np.float32(0.0)",
          f"{ind}    if u < n_rows * {big_dv}:"]
    for w in range(W):
        L.append(f"{ind}        tot += exp2f(red_m[{8 * w} + r] - sf) * "
                 f"red_a[{w * 8 * S} + r * {S} + cp]")
    L += [f"{ind}        acc_out[bh, s, r, col] = tot",
          f"{ind}    else:"]
    for w in range(W):
        L.append(f"{ind}        tot += exp2f(red_m[{8 * w} + r] - sf) * "
                 f"red_l[{8 * w} + r]")
    L += [f"{ind}        max_out[bh, s, r] = mx * np.float32({LN2!r})",  # back to base e
          f"{ind}        sum_out[bh, s, r] = tot",
          f"{ind}    u += {32 * W}"]
    kern = _build("attn_fast", L, {})
    if blocks:
        kern.launch_bounds = (32 * W, blocks)
    _fast_kernels[key] = kern
    return kern


# ------------------------------------------------------------- key-offset term on tensor cores

BIAS_WARPS = 4
"""Warps per block of :func:`key_bias_kernel`."""
BIAS_MAX_FREQ = 64
"""Most frequencies :func:`key_bias_kernel` takes (8 MMA k-steps); more go to the scalar
:func:`key_bias_scores`."""
BIAS_MAX_TILES = 128
"""Most 16-token tiles one warp of :func:`key_bias_kernel` walks: its coefficients are
rotated once per tile in float32, so their phase error grows with the count (the step
angle's float32 rounding, ≤ 2.4e-7 rad, times 128 steps: ≤ 3.1e-5 rad, against float16's
4.9e-4 relative)."""
BIAS_BLOCKS_PER_SM = 4
"""Launch bounds of :func:`key_bias_kernel`: 4 blocks of :data:`BIAS_WARPS` warps per SM,
128 registers (what it takes at 64 frequencies without spilling)."""
BIAS_SCALE = 8192.0
"""Each coefficient row is scaled to at most this before its float16 conversion (and the
scores scaled back): no float16 overflow or subnormals whatever the rows' magnitude."""

_bias_kernels: dict = {}


def key_bias_kernel(n_freq):
    """The RoPE-aware key-offset term on tensor cores: what :func:`key_bias_scores` computes
    (CPU twin :func:`rotorq.cpu.attention.key_bias_scores`), for ``n_freq ≤``
    :data:`BIAS_MAX_FREQ` and at most 8 rows.

    ``(kba f32 (BH, R, F), kbb f32 (BH, R, F), kfreq f64 (F,), kpos0, n_keys, tiles,
    out f32 (BH·stride·8,), stride)``: the term of row ``r`` of ``bh`` for key ``j`` goes to
    ``out[(bh·stride + j)·8 + r]``, a key's 8 rows side by side (rows past R get 0), so a
    warp's tile is two 256-byte runs of 8-byte stores. Grid ``(⌈warps / BIAS_WARPS⌉, BH)``
    of :data:`BIAS_WARPS` warps, each walking ``tiles`` tiles of 16 consecutive keys.

    The angle sum ``(p + o)θ`` splits the term of key ``p + o`` into
    ``Σ_f cos(oθ_f)·A'_f(p) + sin(oθ_f)·B'_f(p)`` with the coefficients rotated to the tile
    start ``p``: ``A' = A cos pθ + B sin pθ``, ``B' = B cos pθ − A sin pθ``. So a tile is one
    product ``(16 keys × 2F twiddles) · (2F × 8 rows)`` (``mma.m16n8k16``, fp16 in, fp32
    accumulate): the twiddles of offsets 0–15 are the same for every tile, and the
    coefficients move to the next tile by one complex multiply by ``e^{16iθ_f}`` in float32,
    instead of a sine and a cosine per key and frequency. The block computes the twiddles,
    the steps and each warp's start coefficients, rotated exactly (float64 angle reduction,
    as the CPU twin), in one loop into shared memory; each lane then loads its 96 values.

    Accuracy: float16 twiddles and coefficients (each row scaled to :data:`BIAS_SCALE`
    first), float32 accumulation: the term is within about ``1e-3 · Σ_f |(A_f, B_f)|`` of
    the CPU twin's, the same order as the tensor-core scores it is added to.
    """
    steps = -(-int(n_freq) // 8)
    if not 1 <= steps <= BIAS_MAX_FREQ // 8:
        raise ValueError(f"key_bias_kernel takes 1..{BIAS_MAX_FREQ} frequencies, got {n_freq}")
    if steps in _bias_kernels:
        return _bias_kernels[steps]
    W = BIAS_WARPS
    sim = SIMULATOR
    fp = 8 * steps  # frequencies, padded
    st = fp + 4  # row stride of the shared tables: lane (g, t) reads word 4g + t (mod 32)
    L = ["def key_bias_mma(kba, kbb, kfreq, kpos0, n_keys, tiles, out, stride):",
         # twiddles half2(cos oθ, sin oθ) of offsets o < 16, then (o = 16) the float32
         # tile step cos 16θ, sin 16θ
         f"    tw = cuda.shared.array({16 * st}, numba.uint32)",
         f"    stc = cuda.shared.array({fp}, numba.float32)",
         f"    sts = cuda.shared.array({fp}, numba.float32)",
         # cos, sin of each warp's start position; its rotated, scaled coefficient rows
         f"    pc = cuda.shared.array({W * fp}, numba.float32)",
         f"    ps = cuda.shared.array({W * fp}, numba.float32)",
         f"    wx = cuda.shared.array({W * 8 * st}, numba.float32)",
         f"    wy = cuda.shared.array({W * 8 * st}, numba.float32)",
         "    rsc = cuda.shared.array(8, numba.float32)",
         "    rinv = cuda.shared.array(8, numba.float32)",
         # the block's inputs staged first, so that no loop below waits on global memory
         f"    kf = cuda.shared.array({fp}, numba.float64)",
         f"    sa_ = cuda.shared.array({8 * fp}, numba.float32)",
         f"    sb_ = cuda.shared.array({8 * fp}, numba.float32)",
         f"    part = cuda.shared.array({32 * W}, numba.float32)"]
    if sim:
        L += _mma_scratch(W)
    L += ["    tid = cuda.threadIdx.x",
          "    lane = tid & 31",
          "    warp = tid >> 5",
          "    g = lane >> 2",
          "    t = lane & 3",
          "    bh = cuda.blockIdx.y",
          "    n_rows = kba.shape[1]",
          "    nf = kba.shape[2]",
          f"    blk_tile = cuda.blockIdx.x * {W} * tiles",
          "    e = tid",
          f"    while e < {8 * fp}:",
          f"        r = e // {fp}",
          f"        f = e % {fp}",
          "        ok = r < n_rows and f < nf",
          "        sa_[e] = kba[bh, r, f] if ok else np.float32(0.0)",
          "        sb_[e] = kbb[bh, r, f] if ok else np.float32(0.0)",
          f"        if e < {fp}:",
          "            kf[e] = kfreq[e] if e < nf else np.float64(0.0)",
          f"        e += {32 * W}",
          "    cuda.syncthreads()",
          # each row is scaled so that every rotated coefficient is at most BIAS_SCALE:
          # |A'|, |B'| ≤ max_f |(A_f, B_f)|; partial maxima of 4W threads per row first
          f"    e = (tid // {4 * W}) * {fp} + tid % {4 * W}",
          "    m = np.float32(0.0)",
          f"    while e < (tid // {4 * W} + 1) * {fp}:",
          "        m = max(m, math.sqrt(sa_[e] * sa_[e] + sb_[e] * sb_[e]))",
          f"        e += {4 * W}",
          "    part[tid] = m",
          # one loop for the block's angles: twiddles and steps (17 · fp), warp starts (W · fp)
          "    e = tid",
          f"    while e < {17 * fp + W * fp}:",
          f"        f = e % {fp}",
          "        fq = kf[f]",
          f"        o = e // {fp}",
          "        if o <= 16:",
          "            ang = np.float64(o) * fq",
          "        else:",
          "            ang = np.float64(kpos0 + (blk_tile + (o - 17) * tiles) * 16) * fq",
          f"        ang -= {_TWO_PI!r} * math.floor(ang * {_INV_TWO_PI!r})",
          "        a32 = np.float32(ang)",
          "        c = math.cos(a32)",
          "        sn = math.sin(a32)",
          "        if o < 16:",
          f"            tw[o * {st} + f] = half2_bits(c, sn)",
          "        elif o == 16:",
          "            stc[f] = c",
          "            sts[f] = sn",
          "        else:",
          f"            pc[(o - 17) * {fp} + f] = c",
          f"            ps[(o - 17) * {fp} + f] = sn",
          f"        e += {32 * W}",
          "    cuda.syncthreads()",
          "    if tid < 8:",
          "        m = np.float32(0.0)",
          f"        for k in range({4 * W}):",
          f"            m = max(m, part[tid * {4 * W} + k])",
          f"        rsc[tid] = np.float32({BIAS_SCALE!r}) / m if m > 0 else np.float32(0.0)",
          f"        rinv[tid] = m / np.float32({BIAS_SCALE!r})",
          "    cuda.syncthreads()",
          # the coefficients rotated to each warp's start: A' = A c + B s, B' = B c − A s
          "    e = tid",
          f"    while e < {W * 8 * fp}:",
          f"        f = e % {fp}",
          f"        r = (e // {fp}) % 8",
          f"        w = e // {8 * fp}",
          f"        ca = sa_[r * {fp} + f]",
          f"        cb = sb_[r * {fp} + f]",
          f"        c = pc[w * {fp} + f]",
          f"        sn = ps[w * {fp} + f]",
          f"        wx[(w * 8 + r) * {st} + f] = (ca * c + cb * sn) * rsc[r]",
          f"        wy[(w * 8 + r) * {st} + f] = (cb * c - ca * sn) * rsc[r]",
          f"        e += {32 * W}",
          "    cuda.syncthreads()",
          f"    wb = (warp * 8 + g) * {st} + t",
          f"    ta = g * {st} + t",
          f"    tb = (g + 8) * {st} + t"]
    for s in range(steps):
        for h in range(2):
            v, o = f"{s}_{h}", 8 * s + 4 * h
            L += [f"    x{v} = wx[wb + {o}]",
                  f"    y{v} = wy[wb + {o}]",
                  f"    dc{v} = stc[t + {o}]",
                  f"    ds{v} = sts[t + {o}]",
                  f"    a{s}_{2 * h} = tw[ta + {o}]",
                  f"    a{s}_{2 * h + 1} = tw[tb + {o}]"]
    L += ["    tile0 = blk_tile + warp * tiles"]
    if sim:  # every warp of the block takes the emulated MMAs' barriers as often
        L.append("    count = tiles")
    else:
        L.append("    count = min(tiles, max((n_keys + 15) // 16 - tile0, 0))")
    L += ["    ra = 2 * t",
          "    rb = 2 * t + 1",
          "    inv_a = rinv[ra]",
          "    inv_b = rinv[rb]",
          "    j = tile0 * 16 + g",
          # flat index of (key j, row ra); rb = ra + 1 beside it, key j + 8 at +64
          "    ia = U64((bh * stride + j) * 8 + ra)",
          "    for it in range(count):"]
    ind = " " * 8
    for s in range(steps):
        L += [f"{ind}b{s}_0 = half2_bits(x{s}_0, y{s}_0)",
              f"{ind}b{s}_1 = half2_bits(x{s}_1, y{s}_1)"]
    L += [f"{ind}{v}{i} = np.float32(0.0)" for v in "cz" for i in range(4)]
    for s in range(steps):  # two accumulator chains: independent MMAs in flight
        call = "mma_sim(sa, sb, " if sim else "mma16816("
        acc = "c0, c1, c2, c3" if s % 2 == 0 else "z0, z1, z2, z3"
        L.append(f"{ind}{acc} = {call}a{s}_0, a{s}_1, a{s}_2, a{s}_3, b{s}_0, b{s}_1, {acc})")
    for s in range(steps):
        for h in range(2):
            v = f"{s}_{h}"
            L += [f"{ind}xn = x{v} * dc{v} + y{v} * ds{v}",
                  f"{ind}y{v} = y{v} * dc{v} - x{v} * ds{v}",
                  f"{ind}x{v} = xn"]
    L += [f"{ind}if j + 8 < n_keys:",
          f"{ind}    store_f2(out, ia, (c0 + z0) * inv_a, (c1 + z1) * inv_b)",
          f"{ind}    store_f2(out, ia + U64(64), (c2 + z2) * inv_a, (c3 + z3) * inv_b)",
          f"{ind}elif j < n_keys:",
          f"{ind}    store_f2(out, ia, (c0 + z0) * inv_a, (c1 + z1) * inv_b)",
          f"{ind}ia += U64(128)",
          f"{ind}j += 16"]
    kern = _build("key_bias_mma", L, {})
    kern.launch_bounds = (32 * W, BIAS_BLOCKS_PER_SM)
    _bias_kernels[steps] = kern
    return kern


def bias_tiles(n_keys, n_bh, sm_count):
    """16-token tiles per warp of :func:`key_bias_kernel`: one wave of blocks
    (:data:`BIAS_BLOCKS_PER_SM` per SM; each block's setup is about 1300 sines and
    cosines), at least 8 tiles each, at most :data:`BIAS_MAX_TILES`."""
    n_tiles = -(-int(n_keys) // 16)
    resident = BIAS_BLOCKS_PER_SM * BIAS_WARPS * max(1, sm_count)
    want = -(-n_tiles * max(1, n_bh) // resident)
    return max(1, min(BIAS_MAX_TILES, max(8, want), n_tiles))
