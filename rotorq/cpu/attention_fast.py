"""Decode attention on packed keys and values, laid out for the CPU's vector units.

The same computation and contract as the CUDA kernel's CPU twin
(:func:`rotorq.cpu.attention.decode_attention`, whose module docstring states it); the
work is laid out differently, so sums run in another order and results agree with the
twin's within float32 rounding, not bit for bit. Fastmath stays off.

Tokens are taken ``TILE`` at a time (online softmax per tile). Each key or value part
runs in one of two modes (:func:`part_mode`):

- ``FUSED`` (``1 <= bits <= 4``, dimension a multiple of 64): the vector intrinsics of
  :mod:`rotorq.cpu.simd` decode and multiply in registers — the scores of 16 keys at a
  time (:func:`rotorq.cpu.simd.key_scores`, keys in vector lanes, query coordinates
  broadcast, 4 query rows per pass) and the value sums of a tile with the accumulators
  held in registers (:func:`rotorq.cpu.simd.value_sums`, coordinates in vector lanes, in
  the order :func:`rotorq.cpu.simd.value_position`).
- 0 (any other part): a tile is decoded by the twin's scalar decoder into a float32
  block, and ``Q Kᵀ`` or ``P V`` are ``np.dot`` calls (BLAS).

The QJL signs of prod-mode keys are 1-bit codes with the table ``(−1, +1)``, decoded
into a block by the permute decoder (:func:`rotorq.cpu.simd.decoder`, code ``c`` of
word ``w`` of block ``s`` at ``8·lanes·s + lanes·c + w``, :func:`permutation`; lanes 16
or 8, :func:`block_lanes`) or the scalar one, and multiplied by BLAS. The sketched query
rows come in that order (:func:`run` puts them so), and the kernel leaves the value
accumulators in natural order. The norms multiply the scores and the probabilities, not the decoded rows. The
threads running the kernel take the (batch·head, split) tasks from one shared counter.
"""

import functools
import math

import numpy as np

from . import simd
from ._jit import jit
from .attention import _bias_tile, decode_row

TILE = 64  # tokens per online-softmax step, a multiple of 16 (a decoded tile stays in L1)
TABLE = simd.TABLE
FUSED = 1

_DEC16 = tuple(simd.decoder(b, 16) for b in (1, 2, 3, 4))
_DEC8 = tuple(simd.decoder(b, 8) for b in (1, 2, 3, 4))
_D1_16, _D2_16, _D3_16, _D4_16 = _DEC16
_D1_8, _D2_8, _D3_8, _D4_8 = _DEC8
_KS1_4, _KS2_4, _KS3_4, _KS4_4 = (simd.key_scores(b, 4) for b in (1, 2, 3, 4))
_KS1_1, _KS2_1, _KS3_1, _KS4_1 = (simd.key_scores(b, 1) for b in (1, 2, 3, 4))
_VS1_4, _VS2_4, _VS3_4, _VS4_4 = (simd.value_sums(b, 4) for b in (1, 2, 3, 4))
_VS1_1, _VS2_1, _VS3_1, _VS4_1 = (simd.value_sums(b, 1) for b in (1, 2, 3, 4))


def block_lanes(dim, bits):
    """Words decoded together by the permute decoder for a part of ``dim`` coordinates at
    ``bits`` bits: 16 or 8, or 0 where it does not apply (natural order)."""
    if not 1 <= bits <= 4:
        return 0
    if dim % 128 == 0:
        return 16
    if dim % 64 == 0:
        return 8
    return 0


def part_mode(dim, bits, rows):
    """``FUSED`` or 0: how a part of ``dim`` coordinates and ``bits``-bit codes is read
    for ``rows`` query rows (module docstring)."""
    if 1 <= bits <= 4 and dim % simd.BLOCK == 0 and rows > 0:
        return FUSED
    return 0


def permutation(dim, lanes):
    """``perm`` (dim,) int64: position ``i`` of a row decoded by the permute decoder with
    ``lanes`` words per block holds coordinate ``perm[i]`` (identity for ``lanes = 0``)."""
    if lanes == 0:
        return np.arange(dim, dtype=np.int64)
    pos = np.arange(dim, dtype=np.int64)
    block, rest = np.divmod(pos, 8 * lanes)
    c, g = np.divmod(rest, lanes)
    return 8 * (lanes * block + g) + c


@functools.lru_cache(maxsize=64)
def order(dim, mode, value):
    """Coordinate at each position of a row in ``mode`` (``value``: a value part's
    accumulator row, else a key part's query row); read-only."""
    if mode == FUSED:
        out = simd.value_position(dim) if value else np.arange(dim, dtype=np.int64)
    else:
        out = permutation(dim, mode)
    out.setflags(write=False)
    return out


@jit
def _decode_tile(codes, bh, j0, nt, bits, lanes, table, cent, big_d, idx, out):
    """Rows ``j0 … j0+nt−1`` of ``codes[bh]`` decoded to centroid values into
    ``out[:nt·big_d]`` (row-major (nt, big_d), in :func:`permutation` order)."""
    simd.out_of_line()
    cap = codes.shape[1]
    nb = codes.shape[2]
    if lanes == 16:
        step = 16 * bits
        for jj in range(nt):
            off = ((bh * cap) + j0 + jj) * nb
            o = jj * big_d
            for s in range(big_d // 128):
                if bits == 4:
                    _D4_16(codes, off + s * step, table, out, o + 128 * s)
                elif bits == 3:
                    _D3_16(codes, off + s * step, table, out, o + 128 * s)
                elif bits == 2:
                    _D2_16(codes, off + s * step, table, out, o + 128 * s)
                else:
                    _D1_16(codes, off + s * step, table, out, o + 128 * s)
    elif lanes == 8:
        step = 8 * bits
        for jj in range(nt):
            off = ((bh * cap) + j0 + jj) * nb
            o = jj * big_d
            for s in range(big_d // 64):
                if bits == 4:
                    _D4_8(codes, off + s * step, table, out, o + 64 * s)
                elif bits == 3:
                    _D3_8(codes, off + s * step, table, out, o + 64 * s)
                elif bits == 2:
                    _D2_8(codes, off + s * step, table, out, o + 64 * s)
                else:
                    _D1_8(codes, off + s * step, table, out, o + 64 * s)
    else:
        for jj in range(nt):
            decode_row(codes[bh, j0 + jj], bits, big_d, cent, np.float32(1.0), idx,
                       out[jj * big_d:(jj + 1) * big_d])


@jit
def _key_groups(bits, codes, off0, nb, n_groups, n_blk, q, qoff, n_rows, dq, table, scale,
                out, ostride, col0):
    """:func:`rotorq.cpu.simd.key_scores` of ``n_groups`` groups of 16 keys (group ``g`` at
    byte ``off0 + 16·g·nb``, its scales and scores at column ``col0 + 16·g``) for
    ``n_rows`` query rows from ``q.flat[qoff:]`` (4 rows per call, then single rows)."""
    simd.out_of_line()
    for g in range(n_groups):
        off = off0 + 16 * g * nb
        col = col0 + 16 * g
        r0 = 0
        while r0 < n_rows:
            four = r0 + 4 <= n_rows
            args = (codes, off, nb, n_blk, q, qoff + r0 * dq, dq, table, scale, col, out,
                    r0 * ostride + col, ostride)
            if four:
                if bits == 4:
                    _KS4_4(*args)
                elif bits == 3:
                    _KS3_4(*args)
                elif bits == 2:
                    _KS2_4(*args)
                else:
                    _KS1_4(*args)
                r0 += 4
            else:
                if bits == 4:
                    _KS4_1(*args)
                elif bits == 3:
                    _KS3_1(*args)
                elif bits == 2:
                    _KS2_1(*args)
                else:
                    _KS1_1(*args)
                r0 += 1


@jit
def _value_groups(bits, codes, off, nb, nt, n_blk, table, p, pstride, scale, acc, n_rows, dv):
    """:func:`rotorq.cpu.simd.value_sums` of ``nt`` value rows from byte ``off`` for
    ``n_rows`` rows of ``p`` (stride ``pstride``) into ``acc.flat`` (stride ``dv``; 4 rows
    per call, then single rows)."""
    simd.out_of_line()
    r0 = 0
    while r0 < n_rows:
        args = (codes, off, nb, nt, n_blk, table, p, r0 * pstride, pstride, scale, acc, r0 * dv,
                dv)
        if r0 + 4 <= n_rows:
            if bits == 4:
                _VS4_4(*args)
            elif bits == 3:
                _VS3_4(*args)
            elif bits == 2:
                _VS2_4(*args)
            else:
                _VS1_4(*args)
            r0 += 4
        else:
            if bits == 4:
                _VS4_1(*args)
            elif bits == 3:
                _VS3_1(*args)
            elif bits == 2:
                _VS2_1(*args)
            else:
                _VS1_1(*args)
            r0 += 1


@jit
def _half(h):
    """float32 value of the float16 bit pattern ``h`` (int32), branch-free (vectorizes)."""
    sign = (h & 0x8000) << 16
    e = h & 0x7C00
    mant = h & 0x3FF
    normal = simd.f32_bits(sign | (((h & 0x7FFF) << 13) + 0x38000000))
    special = simd.f32_bits(sign | 0x7F800000 | (mant << 13))
    sub = np.float32(mant) * np.float32(5.9604644775390625e-08)  # mant · 2^-24, exact
    sub = -sub if sign != 0 else sub
    return sub if e == 0 else (special if e == 0x7C00 else normal)


@jit
def _norms(bits16, bh, j0, nt, out):
    """``out[:nt]`` = the float16 bit patterns ``bits16[bh, j0 : j0+nt]`` as float32;
    zeros up to the next multiple of 16."""
    base = bh * bits16.shape[1] + j0
    n16 = nt & ~15
    for jj in range(0, n16, 16):
        simd.halves16(bits16, base + jj, out, jj)
    for jj in range(n16, nt):
        out[jj] = _half(np.int32(bits16[bh, j0 + jj]))
    for jj in range(nt, min(out.shape[0], (nt + 15) & ~15)):
        out[jj] = 0.0


@jit
def _exp(x):
    """``exp(x)`` in float32 for ``x <= 0`` (NaN stays NaN), within 2 ulp above
    ``-87``, 0 below: Cephes' ``expf`` (range reduction by ln 2, degree-5 polynomial),
    written without calls so that loops over it vectorize."""
    under = x < np.float32(-87.0)
    xc = np.float32(-87.0) if under else x
    n = np.floor(xc * np.float32(1.44269504088896341) + np.float32(0.5))
    r = xc - n * np.float32(0.693359375) - n * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * (r * r) + r + np.float32(1.0)
    val = p * simd.f32_bits((np.int32(n) + 127) << 23)
    return np.float32(0.0) if under else val


@jit
def _row_max(sc, r, lo, hi):
    """Largest of ``sc[r, lo:hi]`` under ``>`` (NaN never chosen; ``-inf`` if nothing is
    larger), for the last elements of a row that :func:`rotorq.cpu.simd.max16` leaves."""
    mt = np.float32(-np.inf)
    for j in range(lo, hi):
        mt = sc[r, j] if sc[r, j] > mt else mt
    return mt


@jit
def _exp_sum(sc, r, lo, hi, mx):
    """``sc[r, j] = exp(sc[r, j] − mx)`` for ``lo <= j < hi``; returns their sum (the
    elements that :func:`rotorq.cpu.simd.exp_sum16` leaves)."""
    tot = np.float32(0.0)
    for j in range(lo, hi):
        sc[r, j] = _exp(sc[r, j] - mx)
        tot += sc[r, j]
    return tot


@jit
def _softmax_step(sc, nt, j0, n_q, causal_offset, m, lsum, acc0, acc1):
    """One online-softmax step over the scores ``sc[:, :nt]`` of tokens ``j0 …``: the
    causal mask (row ``r`` sees a prefix of the tile), the running max ``m`` and sum
    ``lsum`` (accumulators rescaled when the max rises), and ``sc`` replaced by
    ``exp(s − m)`` (0 where masked)."""
    for r in range(sc.shape[0]):
        nv = min(nt, max(0, r % n_q + causal_offset - j0 + 1))
        for jj in range(nv, nt):
            sc[r, jj] = 0.0
        if nv == 0:
            continue
        n16 = nv >> 4
        base = r * sc.shape[1]
        mt = simd.max16(sc, base, n16)
        if nv & 15:
            rest = _row_max(sc, r, n16 * 16, nv)
            mt = rest if rest > mt else mt
        if mt > m[r]:
            alpha = np.float32(math.exp(m[r] - mt))
            lsum[r] *= alpha
            for k in range(acc0.shape[1]):
                acc0[r, k] *= alpha
            for k in range(acc1.shape[1]):
                acc1[r, k] *= alpha
            m[r] = mt
        tot = simd.exp_sum16(sc, base, n16, m[r])
        if nv & 15:
            tot += _exp_sum(sc, r, n16 * 16, nv, m[r])
        lsum[r] += tot


@jit
def _dot_rows(a, b, out):
    """``out = a @ b`` (C-contiguous ``a`` and ``out``) as BLAS calls on blocks of rows small
    enough (under 2^17 multiply-adds) that OpenBLAS runs each on the calling thread: a
    threaded BLAS call from every kernel thread would oversubscribe the cores."""
    n_rows, inner = a.shape
    cols = b.shape[1]
    block = max(1, (1 << 17) // max(1, inner * cols))
    fa = a.reshape(a.size)
    fo = out.reshape(out.size)
    for r0 in range(0, n_rows, block):
        r1 = min(n_rows, r0 + block)
        np.dot(fa[r0 * inner:r1 * inner].reshape((r1 - r0, inner)), b,
               fo[r0 * cols:r1 * cols].reshape((r1 - r0, cols)))


@jit
def _key_part(q, qs, kc, kn, ks, kg, table, cent, bits, qscale, mode, slanes, bh, j0, nt,
              idx, kf, kv_n, tail, flat, sc):
    """``sc[:, :nt]`` (R, TILE) = the scores of key part tokens ``j0 … j0+nt−1`` for the
    rows of ``bh`` (``flat``: scratch of R·TILE float32; ``tail``: uint8 (1, 16, ≥ row
    bytes), room for 16 rows of codes)."""
    simd.out_of_line()
    n_rows = q.shape[1]
    big_d = q.shape[2]
    _norms(kn, bh, j0, nt, kv_n)
    if mode == FUSED:
        nb = kc.shape[2]
        n_blk = big_d // simd.BLOCK
        off0 = (bh * kc.shape[1] + j0) * nb
        full = nt >> 4
        _key_groups(bits, kc, off0, nb, full, n_blk, q, bh * n_rows * big_d, n_rows, big_d,
                    table, kv_n, sc, sc.shape[1], 0 * nb)
        if nt & 15:  # the last keys of the tile: 16 rows from a zero-padded copy
            flat_tail = tail.reshape(tail.size)
            flat_tail[:16 * nb] = 0
            for t in range(nt & 15):
                flat_tail[t * nb:(t + 1) * nb] = kc[bh, j0 + 16 * full + t]
            _key_groups(bits, tail, 0 * nb, nb, (nt + 15) // 16 - full, n_blk, q,
                        bh * n_rows * big_d, n_rows, big_d, table, kv_n, sc, sc.shape[1],
                        16 * full)
    else:
        _decode_tile(kc, bh, j0, nt, bits, mode, table, cent, big_d, idx, kf)
        out = flat[:n_rows * nt].reshape((n_rows, nt))
        _dot_rows(q[bh], kf[:nt * big_d].reshape((nt, big_d)).T, out)
        for r in range(n_rows):
            for jj in range(nt):
                sc[r, jj] = out[r, jj] * kv_n[jj]
    m = qs.shape[2]
    if m > 0:
        signs = np.empty(TABLE, np.float32)
        for i in range(TABLE):
            signs[i] = np.float32(2 * (i & 1) - 1)  # the table (−1, +1), repeated
        _decode_tile(ks, bh, j0, nt, 1, slanes, signs, signs, m, idx, kf)
        out = flat[:n_rows * nt].reshape((n_rows, nt))
        _dot_rows(qs[bh], kf[:nt * m].reshape((nt, m)).T, out)
        _norms(kg, bh, j0, nt, kv_n)
        for jj in range(nt):
            kv_n[jj] = np.float32(qscale * kv_n[jj])
        for r in range(n_rows):
            for jj in range(nt):
                sc[r, jj] += kv_n[jj] * out[r, jj]


@jit
def _value_part(vc, vn, table, cent, bits, mode, bh, j0, nt, idx, vf, kv_n, sc, pbuf, tmp,
                acc):
    """``acc`` (R, Dv) += Σ_j sc[r, j] · ν_j · c[jdx_j] over tokens ``j0 … j0+nt−1``."""
    simd.out_of_line()
    n_rows, big_d = acc.shape
    _norms(vn, bh, j0, nt, kv_n)
    if mode == FUSED:
        _value_groups(bits, vc, (bh * vc.shape[1] + j0) * vc.shape[2], vc.shape[2], nt,
                      big_d // simd.BLOCK, table, sc, sc.shape[1], kv_n, acc, n_rows, big_d)
        return
    _decode_tile(vc, bh, j0, nt, bits, mode, table, cent, big_d, idx, vf)
    pv = pbuf[:n_rows * nt].reshape((n_rows, nt))
    for r in range(n_rows):
        for jj in range(nt):
            pv[r, jj] = sc[r, jj] * kv_n[jj]
    _dot_rows(pv, vf[:nt * big_d].reshape((nt, big_d)), tmp)
    for r in range(n_rows):
        for k in range(big_d):
            acc[r, k] += tmp[r, k]


@jit
def _natural_order(acc, order_, tmp):
    """Rows of ``acc`` whose position ``i`` holds coordinate ``order_[i]``, rewritten in
    natural order (``tmp``: scratch of ``acc``'s shape)."""
    for r in range(acc.shape[0]):
        for i in range(acc.shape[1]):
            tmp[r, order_[i]] = acc[r, i]
        for i in range(acc.shape[1]):
            acc[r, i] = tmp[r, i]


@jit
def _scratch(q0, q1, qs0, qs1, kc0, kc1, kfreq, acc0_out, acc1_out):
    """Working arrays of one thread's tasks: code indices, a decoded tile, norms, 16 rows
    of codes, scores and products, the key bias's cosines and sines."""
    n_rows = acc0_out.shape[2]
    dmax = max(q0.shape[2], q1.shape[2], acc0_out.shape[3], acc1_out.shape[3], qs0.shape[2],
               qs1.shape[2])
    return (np.empty(dmax, np.uint8), np.empty(TILE * dmax, np.float32),
            np.empty(TILE, np.float32),
            np.empty((1, 16, max(kc0.shape[2], kc1.shape[2])), np.uint8),
            np.empty(n_rows * TILE, np.float32), np.empty(n_rows * TILE, np.float32),
            np.empty((n_rows, TILE), np.float32),
            np.empty((n_rows if q1.shape[2] > 0 else 0, TILE), np.float32),
            np.empty((n_rows, acc0_out.shape[3]), np.float32),
            np.empty((n_rows, acc1_out.shape[3]), np.float32),
            np.empty((TILE, kfreq.shape[0]), np.float32),
            np.empty((TILE, kfreq.shape[0]), np.float32))


@jit
def _table(cent):
    """The centroids repeated to ``TABLE`` entries (a longer codebook as it is)."""
    n = cent.shape[0]
    out = np.empty(max(TABLE, n), np.float32)
    for i in range(out.shape[0]):
        out[i] = cent[i % n]
    return out


@jit
def _split_task(bh, s, q0, q1, qs0, qs1, kba, kbb, kfreq, kpos0,
                kc0, kn0, ks0, kg0, kcent0, ktab0, kbits0, kscale0, kmode0, slanes0,
                kc1, kn1, ks1, kg1, kcent1, ktab1, kbits1, kscale1, kmode1, slanes1,
                vc0, vn0, vcent0, vtab0, vbits0, vmode0, vorder0,
                vc1, vn1, vcent1, vtab1, vbits1, vmode1, vorder1,
                n_keys, n_q, causal_offset, chunk,
                acc0_out, acc1_out, max_out, sum_out, scratch):
    """Online softmax over the tokens of split ``s`` for the rows of ``bh`` (``scratch``:
    the arrays of :func:`_scratch`)."""
    idx, kf, kv_n, tail, flat, pbuf, sc, sc1, tmp0, tmp1, tcos, tsin = scratch
    n_rows = acc0_out.shape[2]
    dk1 = q1.shape[2]
    dv0 = acc0_out.shape[3]
    dv1 = acc1_out.shape[3]
    n_freq = kfreq.shape[0]
    neg_inf = np.float32(-np.inf)
    t0 = s * chunk
    t1 = min(n_keys, t0 + chunk, n_q + causal_offset)  # no row sees a key past n_q-1+offset
    acc0 = acc0_out[bh, s]
    acc1 = acc1_out[bh, s]
    m = max_out[bh, s]
    lsum = sum_out[bh, s]
    for r in range(n_rows):
        m[r] = neg_inf
        lsum[r] = 0.0
        for k in range(dv0):
            acc0[r, k] = 0.0
        for k in range(dv1):
            acc1[r, k] = 0.0
    kbase = bh * kc0.shape[1]  # row of token 0 of bh in the codes and norms
    vbase = bh * vc0.shape[1]
    for j0 in range(t0, t1, TILE):
        nt = min(t1, j0 + TILE) - j0
        if kmode0 == FUSED and qs0.shape[2] == 0 and nt == TILE:  # the common case, inline
            for jj in range(0, TILE, 16):
                simd.halves16(kn0, kbase + j0 + jj, kv_n, jj)
            _key_groups(kbits0, kc0, (kbase + j0) * kc0.shape[2], kc0.shape[2], nt >> 4,
                        q0.shape[2] // simd.BLOCK, q0, bh * n_rows * q0.shape[2], n_rows,
                        q0.shape[2], ktab0, kv_n, sc, sc.shape[1], 0 * nt)
        else:
            _key_part(q0, qs0, kc0, kn0, ks0, kg0, ktab0, kcent0, kbits0, kscale0, kmode0,
                      slanes0, bh, j0, nt, idx, kf, kv_n, tail, flat, sc)
        if dk1 > 0:
            _key_part(q1, qs1, kc1, kn1, ks1, kg1, ktab1, kcent1, kbits1, kscale1, kmode1,
                      slanes1, bh, j0, nt, idx, kf, kv_n, tail, flat, sc1)
            for r in range(n_rows):
                for jj in range(nt):
                    sc[r, jj] += sc1[r, jj]
        if n_freq > 0:
            _bias_tile(kba, kbb, kfreq, kpos0, bh, j0, nt, tcos, tsin, sc)
        _softmax_step(sc, nt, j0, n_q, causal_offset, m, lsum, acc0, acc1)
        if vmode0 == FUSED and nt == TILE:
            for jj in range(0, TILE, 16):
                simd.halves16(vn0, vbase + j0 + jj, kv_n, jj)
            _value_groups(vbits0, vc0, (vbase + j0) * vc0.shape[2], vc0.shape[2], nt,
                          dv0 // simd.BLOCK, vtab0, sc, sc.shape[1], kv_n, acc0, n_rows, dv0)
        else:
            _value_part(vc0, vn0, vtab0, vcent0, vbits0, vmode0, bh, j0, nt, idx, kf, kv_n,
                        sc, pbuf, tmp0, acc0)
        if dv1 > 0:
            _value_part(vc1, vn1, vtab1, vcent1, vbits1, vmode1, bh, j0, nt, idx, kf, kv_n,
                        sc, pbuf, tmp1, acc1)
    if vmode0 != 0:
        _natural_order(acc0, vorder0, tmp0)
    if vmode1 != 0:
        _natural_order(acc1, vorder1, tmp1)


@jit
def decode_attention(task_lo, task_hi, q0, q1, qs0, qs1, kba, kbb, kfreq, kpos0,
                     kc0, kn0, ks0, kg0, kcent0, kbits0, kscale0, kmode0, slanes0,
                     kc1, kn1, ks1, kg1, kcent1, kbits1, kscale1, kmode1, slanes1,
                     vc0, vn0, vcent0, vbits0, vmode0, vorder0,
                     vc1, vn1, vcent1, vbits1, vmode1, vorder1,
                     n_keys, n_q, causal_offset, chunk,
                     acc0_out, acc1_out, max_out, sum_out, counter):
    """Split-K attention over packed keys/values: the tasks ``task_lo … task_hi − 1``, or,
    when ``counter`` (int64, shared by the threads running this kernel) has an element,
    every task below ``task_hi`` that ``counter`` hands out (the next free one each time).

    The arguments of :func:`rotorq.cpu.attention.decode_attention`, plus per part its
    :func:`part_mode` (``kmode_p``, ``vmode_p``; ``slanes_p``: the :func:`block_lanes` of
    the QJL signs). The rows ``q_p`` and ``qs_p`` come in the :func:`order` of their part's
    mode (of ``slanes_p`` for ``qs_p``); each value part is accumulated in the order of its
    mode, given by ``vorder_p`` (int64), and ``acc_out`` is left in natural order.
    C-contiguous arrays only.
    """
    n_split = acc0_out.shape[1]
    n_tasks = acc0_out.shape[0] * n_split
    ktab0, ktab1, vtab0, vtab1 = _table(kcent0), _table(kcent1), _table(vcent0), _table(vcent1)
    scratch = _scratch(q0, q1, qs0, qs1, kc0, kc1, kfreq, acc0_out, acc1_out)
    task = task_lo
    while True:
        if counter.shape[0] > 0:
            task = simd.fetch_add(counter, 1)
            if task >= n_tasks:
                break
        elif task >= task_hi:
            break
        bh = task // n_split
        _split_task(bh, task - bh * n_split, q0, q1, qs0, qs1, kba, kbb, kfreq, kpos0,
                    kc0, kn0, ks0, kg0, kcent0, ktab0, kbits0, kscale0, kmode0, slanes0,
                    kc1, kn1, ks1, kg1, kcent1, ktab1, kbits1, kscale1, kmode1, slanes1,
                    vc0, vn0, vcent0, vtab0, vbits0, vmode0, vorder0,
                    vc1, vn1, vcent1, vtab1, vbits1, vmode1, vorder1,
                    n_keys, n_q, causal_offset, chunk,
                    acc0_out, acc1_out, max_out, sum_out, scratch)
        task += 1


def _in_order(x, lanes):
    """``x`` (BH, R, D) float32, C-contiguous, coordinates in :func:`permutation` order."""
    if lanes:
        return np.ascontiguousarray(x[..., order(x.shape[2], lanes, False)])
    return np.ascontiguousarray(x)


def run(run_tasks, n_tasks, args):
    """Run :func:`decode_attention` on the arguments ``args`` of the twin
    (:func:`rotorq.cpu.attention.decode_attention` without the task range) with
    ``run_tasks(kernel, n_tasks, args, shared=True)``, which calls ``kernel(lo, hi,
    *args)`` once per thread: the calls share the tasks through one counter (a thread
    slowed by other work takes fewer), whatever ranges they are given. The query rows are
    put in order; the outputs ``args[34:38]`` are written as the twin writes them."""
    q0, q1, qs0, qs1, kba, kbb, kfreq, kpos0 = args[:8]
    kparts = (args[8:15], args[15:22])
    vparts = (args[22:26], args[26:30])
    n_keys, n_q, causal_offset, chunk, acc0, acc1, mx, sm = args[30:]
    n_rows = q0.shape[1]
    out = [None, None, None, None, kba, kbb, kfreq, kpos0]
    for i, (q, qs, (kc, kn, ks, kg, cent, bits, scale)) in enumerate(
            zip((q0, q1), (qs0, qs1), kparts, strict=True)):
        mode = part_mode(q.shape[2], bits, n_rows) if q.shape[2] else 0
        slanes = block_lanes(qs.shape[2], 1) if qs.shape[2] else 0
        out[i] = _in_order(q, mode if mode != FUSED else 0)
        out[2 + i] = _in_order(qs, slanes)
        out += [np.ascontiguousarray(kc), kn, np.ascontiguousarray(ks), kg, cent, bits, scale,
                mode, slanes]
    for acc, (vc, vn, cent, bits) in zip((acc0, acc1), vparts, strict=True):
        mode = part_mode(acc.shape[3], bits, n_rows) if acc.shape[3] else 0
        out += [np.ascontiguousarray(vc), vn, cent, bits, mode, order(acc.shape[3], mode, True)]
    out += [n_keys, n_q, causal_offset, chunk, acc0, acc1, mx, sm, np.zeros(1, np.int64)]
    run_tasks(decode_attention, n_tasks, tuple(out), shared=True)
