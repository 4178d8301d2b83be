"""Fused decode attention on packed TurboQuant keys and values (flash-decoding, split-K).

One pass over the compressed part of a KV cache computes, for every query row,

    s_t  = ⟨Π_k q, n_t · c_k[idx_t]⟩ (+ γ_t · √(π/2)/m · ⟨S Π_k q, signs_t⟩ in prod mode)
    acc  = Σ_t exp(s_t − m) · ν_t · c_v[jdx_t]          (in the value rotation's domain)
    m    = max_t s_t,   l = Σ_t exp(s_t − m)

without ever materialising a key or value: each packed key and value row is unpacked once
per (batch · KV head) and serves all ``R = group · n_q`` query rows of that GQA group.
The tokens are split into chunks (split-K); every (batch · KV head, chunk) task keeps an
online softmax (running max ``m``, running sum ``l``, un-normalized ``acc``) over tiles of
``TILE`` tokens and writes one partial. The caller merges the partials and, outside this
kernel, the full-precision window and the inverse value rotation (linear, so it is applied
once to each output row).

Keys and values may each come in two *parts* (normal channels and outlier channels, each
with its own quantizer, rotation and codebook): the key parts' scores add up before the
softmax; the value parts accumulate separately, each in its own rotated domain.

Contract shared with the CUDA twin (``rotorq/cuda/attention.py: decode_attention``, same
name and argument order; cupy / device arrays instead of numpy)
------------------------------------------------------------------------------------------
q0, q1 : float32 (BH, R, Dk0), (BH, R, Dk1)
    Rotated query rows of key part 0 and part 1, already multiplied by the softmax scale.
    Row ``r`` is query ``r % n_q`` of the group's query head ``r // n_q``. ``Dk1 = 0``:
    no part 1 (its other arrays are then 1-element placeholders and never read).
qs0, qs1 : float32 (BH, R, m0), (BH, R, m1)
    ``q_p @ sketch_pᵀ`` for prod-mode keys; ``m_p = 0`` for MSE keys.
kba, kbb : float32 (BH, R, h)
    Per-key score bias ``Σ_i A_ri cos(p_t θ_i) + B_ri sin(p_t θ_i)`` added to every
    score (already scaled), ``p_t = kpos0 + t``: the term ``q·RoPE_t(μ)`` of a RoPE-aware
    key offset (:mod:`rotorq.kvprep`). ``h = 0``: no bias.
kfreq : float64 (h,)                   the angles ``θ_i``;  ``kpos0`` : int
kc_p : uint8 (BH, cap, nbytes)        packed key codes (``kbits_p`` bits, LSB first)
kn_p : uint16 (BH, cap)               key norms as IEEE float16 bit patterns
ks_p : uint8 (BH, cap, ceil(m_p/8))   packed QJL signs (prod mode)
kg_p : uint16 (BH, cap)               QJL residual norms, float16 bit patterns (prod mode)
kcent_p : float32 (2**kbits_p,)       key centroids (already scaled to rotated coordinates)
kbits_p : int;  kscale_p : float      QJL factor √(π/2)/m (0.0 in MSE mode)
vc_p, vn_p, vcent_p, vbits_p          the same for value part ``p`` (MSE codes only)
n_keys : int
    Number of valid tokens in the buffers (``cap`` may be larger: growth buffers).
n_q : int
    Queries per query head; ``R = group · n_q``.
causal_offset : int
    Key ``t`` is visible to row ``r`` iff ``t <= r % n_q + causal_offset`` (pass ``n_keys``
    or more for no mask).
chunk : int
    Tokens per split; ``S = ceil(n_keys / chunk)`` splits.
acc0_out, acc1_out : float32 (BH, S, R, Dv0), (BH, S, R, Dv1)
    Un-normalized value accumulators per split (``Dv1 = 0``: no value part 1).
max_out, sum_out : float32 (BH, S, R)
    Running max ``m`` (``-inf`` where a split saw no visible key; then ``l = 0`` and
    ``acc = 0``) and sum ``l`` per split.

Numerics: float32 throughout, exp(s − m) with the running max, so no overflow for any
score magnitude. Fastmath stays off (parity with the CUDA twin).
"""

import math

import numpy as np

from ._jit import jit
from .bits import unpack_row
from .qjl import sign_dot

TILE = 32  # tokens per online-softmax step: scores of a tile are computed, then one rescale


@jit
def half_to_float(bits16, u32, f32):
    """float32 value of the IEEE float16 bit pattern ``bits16``.

    ``u32``/``f32`` are a 1-element uint32 array and its float32 view (scratch for the
    bit cast; Numba's CPU target has no float16 type).
    """
    h = np.uint32(bits16)
    sign = h >> np.uint32(15)
    e = (h >> np.uint32(10)) & np.uint32(0x1F)
    mant = h & np.uint32(0x3FF)
    if e == 0:
        v = np.float32(math.ldexp(float(mant), -24))  # zero or subnormal
        return -v if sign else v
    if e == 31:
        u32[0] = (sign << np.uint32(31)) | np.uint32(0x7F800000) | (mant << np.uint32(13))
    else:
        u32[0] = (sign << np.uint32(31)) | ((e + np.uint32(112)) << np.uint32(23)) \
            | (mant << np.uint32(13))
    return f32[0]


@jit
def _decode_groups(row, bits, count, centroids, scale, out):
    mask = np.uint64((1 << bits) - 1)
    for g in range(count >> 3):
        w = np.uint64(0)
        base = g * bits
        for b in range(bits):
            w |= np.uint64(row[base + b]) << np.uint64(8 * b)
        for c in range(8):
            out[8 * g + c] = scale * centroids[(w >> np.uint64(c * bits)) & mask]


@jit
def decode_row(row, bits, count, centroids, scale, idx, out):
    """``out[k] = scale · centroids[code k of row]`` for ``k < count``.

    Eight codes span exactly ``bits`` bytes, so when ``count`` is a multiple of 8 the codes
    are cut from one 64-bit word per group, with the common widths compiled as constants;
    otherwise this is :func:`rotorq.cpu.bits.unpack_row` followed by the centroid gather.
    """
    if count & 7 == 0:
        if bits == 4:
            _decode_groups(row, 4, count, centroids, scale, out)
        elif bits == 3:
            _decode_groups(row, 3, count, centroids, scale, out)
        elif bits == 2:
            _decode_groups(row, 2, count, centroids, scale, out)
        else:
            _decode_groups(row, bits, count, centroids, scale, out)
    else:
        unpack_row(row, bits, count, idx)
        for k in range(count):
            out[k] = scale * centroids[idx[k]]


@jit
def _decode_groups_t(row, bits, count, centroids, scale, kvt, col):
    """:func:`_decode_groups` into column ``col`` of the transposed tile ``kvt`` (D, TILE)."""
    mask = np.uint64((1 << bits) - 1)
    for g in range(count >> 3):
        w = np.uint64(0)
        base = g * bits
        for b in range(bits):
            w |= np.uint64(row[base + b]) << np.uint64(8 * b)
        for c in range(8):
            kvt[8 * g + c, col] = scale * centroids[(w >> np.uint64(c * bits)) & mask]


@jit
def _key_tile(q, qs, kc, kn, ks, kg, cent, bits, qscale, bh, j0, j1, idx, vv, kvt, u32, f32, sc):
    """Add key part scores of tokens ``j0..j1`` to ``sc[:, :j1-j0]`` for every row."""
    n_rows = q.shape[1]
    big_d = q.shape[2]
    nt = j1 - j0
    for j in range(j0, j1):
        w = half_to_float(kn[bh, j], u32, f32)
        # decode straight into the transposed tile, 4 and 3 bits as compile-time constants
        # (one more specialised branch here costs ~30% speed: LLVM stops inlining)
        if big_d & 7 == 0 and bits == 4:
            _decode_groups_t(kc[bh, j], 4, big_d, cent, w, kvt, j - j0)
        elif big_d & 7 == 0 and bits == 3:
            _decode_groups_t(kc[bh, j], 3, big_d, cent, w, kvt, j - j0)
        else:
            decode_row(kc[bh, j], bits, big_d, cent, w, idx, vv)
            for k in range(big_d):
                kvt[k, j - j0] = vv[k]
    for r in range(n_rows):
        for k in range(big_d):
            qv = q[bh, r, k]
            for jj in range(nt):
                sc[r, jj] += qv * kvt[k, jj]
    if qs.shape[2] > 0:
        for j in range(j0, j1):
            g = np.float32(qscale * half_to_float(kg[bh, j], u32, f32))
            for r in range(n_rows):
                sc[r, j - j0] += g * sign_dot(qs[bh, r], ks[bh, j])


@jit
def _bias_tile(kba, kbb, kfreq, kpos0, bh, j0, nt, tcos, tsin, sc):
    """``sc[r, jj] += Σ_i A_ri cos(p θ_i) + B_ri sin(p θ_i)``, ``p = kpos0 + j0 + jj``.

    The angles are exact (float64) at the tile's first token and advance by one rotation
    ``e^{iθ_i}`` per token (float64), so the tile costs ``nt·n_freq`` complex products
    instead of as many sines and cosines.
    """
    n_rows = sc.shape[0]
    for i in range(kfreq.shape[0]):
        th = kfreq[i]
        ang = float(kpos0 + j0) * th
        c = math.cos(ang)
        sn = math.sin(ang)
        dc = math.cos(th)
        ds = math.sin(th)
        for jj in range(nt):
            tcos[jj, i] = c
            tsin[jj, i] = sn
            c, sn = c * dc - sn * ds, sn * dc + c * ds
    for r in range(n_rows):
        a = kba[bh, r]
        b = kbb[bh, r]
        for jj in range(nt):
            tot = np.float32(0.0)
            for i in range(kfreq.shape[0]):
                tot += a[i] * tcos[jj, i] + b[i] * tsin[jj, i]
            sc[r, jj] += tot


@jit
def _value_tile(vc, vn, cent, bits, bh, j0, j1, idx, vv, u32, f32, sc, acc):
    """``acc[r] += Σ_j sc[r, j] · ν_j · c[jdx_j]`` over tokens ``j0..j1``."""
    n_rows = acc.shape[0]
    big_d = acc.shape[1]
    for j in range(j0, j1):
        w = half_to_float(vn[bh, j], u32, f32)
        decode_row(vc[bh, j], bits, big_d, cent, w, idx, vv)
        for r in range(n_rows):
            p = sc[r, j - j0]
            if p != 0.0:
                for k in range(big_d):
                    acc[r, k] += p * vv[k]


@jit
def _split_task(bh, s, q0, q1, qs0, qs1, kba, kbb, kfreq, kpos0,
                kc0, kn0, ks0, kg0, kcent0, kbits0, kscale0,
                kc1, kn1, ks1, kg1, kcent1, kbits1, kscale1,
                vc0, vn0, vcent0, vbits0,
                vc1, vn1, vcent1, vbits1,
                n_keys, n_q, causal_offset, chunk,
                acc0_out, acc1_out, max_out, sum_out):
    """Online softmax over the tokens of split ``s`` for the rows of ``bh``."""
    n_rows = acc0_out.shape[2]
    dv0 = acc0_out.shape[3]
    dv1 = acc1_out.shape[3]
    dk1 = q1.shape[2]
    dmax = max(q0.shape[2], dk1, dv0, dv1)
    neg_inf = np.float32(-np.inf)
    t0 = s * chunk
    t1 = min(n_keys, t0 + chunk, n_q + causal_offset)  # no row sees a key past n_q-1+offset
    u32 = np.zeros(1, np.uint32)
    f32 = u32.view(np.float32)
    idx = np.empty(dmax, np.uint8)
    kvt = np.empty((dmax, TILE), np.float32)
    vv = np.empty(dmax, np.float32)
    sc = np.empty((n_rows, TILE), np.float32)
    n_freq = kfreq.shape[0]
    tcos = np.empty((TILE, n_freq), np.float32)
    tsin = np.empty((TILE, n_freq), np.float32)
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
    for j0 in range(t0, t1, TILE):
        j1 = min(t1, j0 + TILE)
        nt = j1 - j0
        for r in range(n_rows):
            for jj in range(nt):
                sc[r, jj] = 0.0
        _key_tile(q0, qs0, kc0, kn0, ks0, kg0, kcent0, kbits0, kscale0, bh, j0, j1,
                  idx, vv, kvt, u32, f32, sc)
        if dk1 > 0:
            _key_tile(q1, qs1, kc1, kn1, ks1, kg1, kcent1, kbits1, kscale1, bh, j0, j1,
                      idx, vv, kvt, u32, f32, sc)
        if n_freq > 0:
            _bias_tile(kba, kbb, kfreq, kpos0, bh, j0, nt, tcos, tsin, sc)
        # causal mask, then the online-softmax step of this tile
        for r in range(n_rows):
            limit = r % n_q + causal_offset
            mt = neg_inf
            for jj in range(nt):
                if j0 + jj > limit:
                    sc[r, jj] = neg_inf
                elif sc[r, jj] > mt:
                    mt = sc[r, jj]
            if mt == neg_inf:
                for jj in range(nt):
                    sc[r, jj] = 0.0
                continue
            if mt > m[r]:
                alpha = np.float32(math.exp(m[r] - mt))
                lsum[r] *= alpha
                for k in range(dv0):
                    acc0[r, k] *= alpha
                for k in range(dv1):
                    acc1[r, k] *= alpha
                m[r] = mt
            mr = m[r]
            tot = np.float32(0.0)
            for jj in range(nt):
                p = np.float32(math.exp(sc[r, jj] - mr))
                sc[r, jj] = p
                tot += p
            lsum[r] += tot
        _value_tile(vc0, vn0, vcent0, vbits0, bh, j0, j1, idx, vv, u32, f32, sc, acc0)
        if dv1 > 0:
            _value_tile(vc1, vn1, vcent1, vbits1, bh, j0, j1, idx, vv, u32, f32, sc, acc1)


@jit
def decode_attention(task_lo, task_hi, q0, q1, qs0, qs1, kba, kbb, kfreq, kpos0,
                     kc0, kn0, ks0, kg0, kcent0, kbits0, kscale0,
                     kc1, kn1, ks1, kg1, kcent1, kbits1, kscale1,
                     vc0, vn0, vcent0, vbits0,
                     vc1, vn1, vcent1, vbits1,
                     n_keys, n_q, causal_offset, chunk,
                     acc0_out, acc1_out, max_out, sum_out):
    """Split-K fused attention over packed keys/values; see the module docstring.

    Runs the (batch·KV head, split) tasks ``task_lo .. task_hi - 1`` (task = bh·S + s);
    each writes its partial ``acc*_out[bh, s]``, ``max_out[bh, s]``, ``sum_out[bh, s]``.
    Compiled ``nogil``: the backend wrapper runs disjoint task ranges on several threads
    (cheaper to compile than a ``prange`` around this body, which Numba compiles twice).
    """
    n_split = acc0_out.shape[1]
    for task in range(task_lo, task_hi):
        bh = task // n_split
        _split_task(bh, task - bh * n_split, q0, q1, qs0, qs1, kba, kbb, kfreq, kpos0,
                    kc0, kn0, ks0, kg0, kcent0, kbits0, kscale0,
                    kc1, kn1, ks1, kg1, kcent1, kbits1, kscale1,
                    vc0, vn0, vcent0, vbits0,
                    vc1, vn1, vcent1, vbits1,
                    n_keys, n_q, causal_offset, chunk,
                    acc0_out, acc1_out, max_out, sum_out)


@jit
def exact_attention(q, ke, ve, pos, n_e, scale, n_q, offset, causal, acc_c, m_c, l_c, has_c,
                    s, out):
    """Softmax attention of the rows ``q`` (BH, R, d) over the first ``n_e`` uncompressed
    keys/values ``ke`` (BH, cap, d), ``ve`` (BH, cap, dv) at positions ``pos`` (≥ n_e,),
    merged with the compressed part's ``(acc_c, m_c, l_c)`` when ``has_c``:
    ``out`` (BH, R, dv) is the normalized output. ``s`` (≥ n_e,) float32 scratch.
    Contract and oracle: :func:`rotorq.reference.exact_attention`; CUDA twin
    :func:`rotorq.cuda.attention.exact_attention` (same sums in the same order, except the
    block-tree reductions of the row max and sum)."""
    n_bh, n_rows, d = q.shape
    dv = ve.shape[2]
    neg_inf = np.float32(-np.inf)
    for bh in range(n_bh):
        for r in range(n_rows):
            lim = r % n_q + offset
            mx = neg_inf
            for j in range(n_e):
                v = neg_inf
                if not causal or pos[j] <= lim:
                    acc = np.float32(0.0)
                    for k in range(d):
                        acc += q[bh, r, k] * ke[bh, j, k]
                    v = acc * scale
                s[j] = v
                mx = max(mx, v)
            safe = mx if mx != neg_inf else np.float32(0.0)
            lsum = np.float32(0.0)
            for j in range(n_e):
                p = np.float32(math.exp(s[j] - safe))
                s[j] = p
                lsum += p
            a = np.float32(0.0)
            b = np.float32(1.0)
            if has_c:
                m = max(m_c[bh, r], mx)
                a = np.float32(math.exp(m_c[bh, r] - m))
                b = np.float32(math.exp(mx - m))
            den = b * lsum
            if has_c:
                den += a * l_c[bh, r]
            for c in range(dv):
                acc = np.float32(0.0)
                for j in range(n_e):
                    acc += s[j] * ve[bh, j, c]
                num = b * acc
                if has_c:
                    num += a * acc_c[bh, r, c]
                out[bh, r, c] = num / den


@jit
def key_bias_scores(kba, kbb, kfreq, kpos0, n_keys, out):
    """``out[bh, j, r] = Σ_f A[bh, r, f] cos(p θ_f) + B[bh, r, f] sin(p θ_f)`` at
    ``p = kpos0 + j`` for ``j < n_keys`` and the rows ``r < R`` (``out`` (BH, ≥ n_keys, ≥ R):
    a key's rows side by side): the RoPE-aware key-offset term of every compressed
    key, for the tensor-core kernel, which adds it to its scores. The angle is reduced
    modulo 2π in float64 and its float32 cosine and sine are taken (as the general CUDA
    kernel does). CUDA twin: :func:`rotorq.cuda.attention.key_bias_scores`."""
    n_bh, n_rows, nf = kba.shape
    two_pi = 2.0 * math.pi
    inv_two_pi = 1.0 / two_pi
    cs = np.empty(nf, np.float32)
    sn = np.empty(nf, np.float32)
    for bh in range(n_bh):
        for j in range(n_keys):
            pos = np.float64(kpos0 + j)
            for f in range(nf):
                ang = pos * kfreq[f]
                ang -= two_pi * math.floor(ang * inv_two_pi)
                a32 = np.float32(ang)
                cs[f] = np.float32(math.cos(a32))
                sn[f] = np.float32(math.sin(a32))
            for r in range(n_rows):
                tot = np.float32(0.0)
                for f in range(nf):
                    tot += kba[bh, r, f] * cs[f] + kbb[bh, r, f] * sn[f]
                out[bh, j, r] = tot
