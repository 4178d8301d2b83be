"""The split merge of decode attention and the exact attention over uncompressed tokens.

:func:`merge_splits` combines the per-split partials of :func:`rotorq.cuda.attention.decode_attention`
(or of the tensor-core kernel, :mod:`rotorq.cuda.gen.attention`) on the device: the CPU
backend's log-sum-exp merge. :func:`exact_attention` attends over the uncompressed window of a
KV cache and merges the compressed part's partial sums in the same launch (twin of
:func:`rotorq.cpu.attention.exact_attention`).
"""

import math

import numba
import numpy as np
from numba import cuda

from ._jit import SIMULATOR, device, kernel

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
    operations (each a launch, with its host cost) of the window part of
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
