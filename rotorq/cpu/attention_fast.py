"""Decode attention on packed keys and values, tiled for the CPU's vector units and BLAS.

The same computation and contract as the CUDA kernel's CPU twin
(:func:`rotorq.cpu.attention.decode_attention`, whose module docstring states it), with
three differences in how the work is laid out:

- **Coordinate order.** Codes are cut from words of eight codes (``bits`` bytes each) and
  ``lanes`` words at a time, so code ``c`` of word ``g`` of block ``s`` lands at position
  ``8·lanes·s + lanes·c + g`` of the decoded row (:func:`permutation`). Every part whose
  dimension is a multiple of ``8·lanes`` and whose codes have at most 4 bits is decoded
  this way; the caller permutes the query rows of a key part the same way and un-permutes
  the value accumulators of a value part (dot products and linear sums do not care about
  the order). Other parts (``lanes = 0``) keep the natural order.
- **Decoding.** One block (``8·lanes`` codes) is a vector load of ``bits·lanes`` bytes,
  shifts and masks, and a variable permute of the centroid table held in a vector
  register (LLVM lowers the table lookup of :func:`_decoder` to ``vpermps`` where the CPU
  has it). The norms multiply the scores and the probabilities, not the decoded rows.
- **Products.** A tile of ``TILE`` tokens is decoded into a float32 block; the scores
  ``Q Kᵀ`` of the group's rows and the value sums ``P V`` are ``np.dot`` calls (BLAS).

Sums therefore run in another order than in the twin: results agree within float32
rounding, not bit for bit. Fastmath stays off.
"""

import math

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from ._jit import jit
from .attention import _bias_tile, decode_row

TILE = 64  # tokens decoded per step: a decoded (TILE, 128) float32 block stays in L1
TABLE = 16  # centroid table entries held in one vector (codes of at most 4 bits)


def block_lanes(dim, bits):
    """Words of eight codes decoded together for a part of ``dim`` coordinates at
    ``bits`` bits: 16 or 8, or 0 where the vector decoder does not apply (natural order)."""
    if not 1 <= bits <= 4:
        return 0
    if dim % 128 == 0:
        return 16
    if dim % 64 == 0:
        return 8
    return 0


def permutation(dim, lanes):
    """``perm`` (dim,) int64: decoded position ``i`` holds coordinate ``perm[i]``."""
    if lanes == 0:
        return np.arange(dim, dtype=np.int64)
    pos = np.arange(dim, dtype=np.int64)
    block, rest = np.divmod(pos, 8 * lanes)
    c, g = np.divmod(rest, lanes)
    return 8 * (lanes * block + g) + c


def _decoder(bits, lanes):
    """Intrinsic ``dec(codes, off, table, out, o0)``: decode the ``8·lanes`` codes of
    ``bits`` bits at byte ``off`` of the C-contiguous array ``codes`` into
    ``out.flat[o0 : o0 + 8·lanes]`` (block order of :func:`permutation`), each code
    replaced by ``table[code]`` (``table``: at least ``TABLE`` float32)."""
    nbytes = bits * lanes
    tsize = TABLE if (bits == 4 or lanes == 16) else 8

    @intrinsic
    def dec(typingctx, codes, off, table, out, o0):
        sig = types.void(codes, off, table, out, o0)

        def codegen(context, builder, signature, args):
            codes_a = context.make_array(signature.args[0])(context, builder, args[0])
            table_a = context.make_array(signature.args[2])(context, builder, args[2])
            out_a = context.make_array(signature.args[3])(context, builder, args[3])
            i8, i32, f32 = ir.IntType(8), ir.IntType(32), ir.FloatType()
            v_bytes = ir.VectorType(i8, nbytes)
            v_words = ir.VectorType(i32, lanes)
            v_out = ir.VectorType(f32, lanes)
            src = builder.load(builder.bitcast(builder.gep(codes_a.data, [args[1]]),
                                               v_bytes.as_pointer()), align=1)
            # word g: bytes g·bits … g·bits+bits−1 of the block, zero-extended to 32 bits
            mask = [g * bits + k if k < bits else nbytes
                    for g in range(lanes) for k in range(4)]
            w8 = builder.shuffle_vector(src, ir.Constant(v_bytes, [0] * nbytes),
                                        ir.Constant(ir.VectorType(i32, 4 * lanes), mask))
            words = builder.bitcast(w8, v_words)
            tab = builder.load(builder.bitcast(table_a.data,
                                               ir.VectorType(f32, tsize).as_pointer()),
                               align=4)
            code_mask = ir.Constant(v_words, [(1 << bits) - 1] * lanes)
            for c in range(8):
                idx = builder.and_(builder.lshr(words, ir.Constant(v_words, [bits * c] * lanes)),
                                   code_mask)
                res = ir.Constant(v_out, None)
                for lane in range(lanes):
                    e = builder.extract_element(idx, ir.Constant(i32, lane))
                    res = builder.insert_element(res, builder.extract_element(tab, e),
                                                 ir.Constant(i32, lane))
                o = builder.add(args[4], ir.Constant(args[4].type, c * lanes))
                builder.store(res, builder.bitcast(builder.gep(out_a.data, [o]),
                                                   v_out.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return dec


_D4_16, _D3_16, _D2_16, _D1_16 = (_decoder(b, 16) for b in (4, 3, 2, 1))
_D4_8, _D3_8, _D2_8, _D1_8 = (_decoder(b, 8) for b in (4, 3, 2, 1))


@jit
def _decode_tile(codes, bh, j0, nt, bits, lanes, table, cent, big_d, idx, out):
    """Rows ``j0 … j0+nt−1`` of ``codes[bh]`` decoded to centroid values into
    ``out[:nt·big_d]`` (row-major (nt, big_d), the order :func:`permutation` gives)."""
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


@intrinsic
def _f32_bits(typingctx, bits):
    """The float32 whose IEEE bit pattern is the low 32 bits of the integer ``bits``."""
    if not isinstance(bits, types.Integer):
        return None
    sig = types.float32(bits)

    def codegen(context, builder, signature, args):
        v = args[0]
        if v.type.width > 32:
            v = builder.trunc(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return sig, codegen


@jit
def _half(h):
    """float32 value of the float16 bit pattern ``h`` (int32), branch-free (vectorizes)."""
    sign = (h & 0x8000) << 16
    e = h & 0x7C00
    mant = h & 0x3FF
    normal = _f32_bits(sign | (((h & 0x7FFF) << 13) + 0x38000000))
    special = _f32_bits(sign | 0x7F800000 | (mant << 13))
    sub = np.float32(mant) * np.float32(5.9604644775390625e-08)  # mant · 2^-24, exact
    sub = -sub if sign != 0 else sub
    return sub if e == 0 else (special if e == 0x7C00 else normal)


@jit
def _norms(bits16, bh, j0, nt, out):
    """``out[:nt]`` = the float16 bit patterns ``bits16[bh, j0 : j0+nt]`` as float32."""
    row = bits16[bh]
    for jj in range(nt):
        out[jj] = _half(np.int32(row[j0 + jj]))


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
    val = p * _f32_bits((np.int32(n) + 127) << 23)
    return np.float32(0.0) if under else val


@jit
def _row_max(row, n):
    """Largest of ``row[:n]`` (``n >= 1``), eight running maxima (NaN: as ``>`` finds)."""
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = row[0]
    n8 = n & ~7
    for j in range(0, n8, 8):
        m0 = row[j] if row[j] > m0 else m0
        m1 = row[j + 1] if row[j + 1] > m1 else m1
        m2 = row[j + 2] if row[j + 2] > m2 else m2
        m3 = row[j + 3] if row[j + 3] > m3 else m3
        m4 = row[j + 4] if row[j + 4] > m4 else m4
        m5 = row[j + 5] if row[j + 5] > m5 else m5
        m6 = row[j + 6] if row[j + 6] > m6 else m6
        m7 = row[j + 7] if row[j + 7] > m7 else m7
    for j in range(n8, n):
        m0 = row[j] if row[j] > m0 else m0
    for v in (m1, m2, m3, m4, m5, m6, m7):
        m0 = v if v > m0 else m0
    return m0


@jit
def _exp_sum(row, n, mx):
    """``row[j] = exp(row[j] − mx)`` for ``j < n``; returns their sum (eight partial sums)."""
    for j in range(n):
        row[j] = _exp(row[j] - mx)
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = np.float32(0.0)
    n8 = n & ~7
    for j in range(0, n8, 8):
        s0 += row[j]
        s1 += row[j + 1]
        s2 += row[j + 2]
        s3 += row[j + 3]
        s4 += row[j + 4]
        s5 += row[j + 5]
        s6 += row[j + 6]
        s7 += row[j + 7]
    for j in range(n8, n):
        s0 += row[j]
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@jit
def _key_scores(q, qs, kc, kn, ks, kg, table, cent, bits, qscale, lanes, slanes, bh, j0,
                nt, idx, kf, kv_n, sc, sc2):
    """``sc`` (R, nt) = key part scores of tokens ``j0 … j0+nt−1`` for the rows of ``bh``
    (``sc2``: scratch of the same shape, for the QJL term)."""
    big_d = q.shape[2]
    _decode_tile(kc, bh, j0, nt, bits, lanes, table, cent, big_d, idx, kf)
    np.dot(q[bh], kf[:nt * big_d].reshape((nt, big_d)).T, sc)
    _norms(kn, bh, j0, nt, kv_n)
    n_rows = sc.shape[0]
    for r in range(n_rows):
        for jj in range(nt):
            sc[r, jj] *= kv_n[jj]
    m = qs.shape[2]
    if m > 0:
        signs = np.zeros(TABLE, np.float32)
        signs[0] = -1.0
        signs[1] = 1.0
        _decode_tile(ks, bh, j0, nt, 1, slanes, signs, signs, m, idx, kf)
        np.dot(qs[bh], kf[:nt * m].reshape((nt, m)).T, sc2)
        _norms(kg, bh, j0, nt, kv_n)
        for jj in range(nt):
            kv_n[jj] = np.float32(qscale * kv_n[jj])
        for r in range(n_rows):
            for jj in range(nt):
                sc[r, jj] += kv_n[jj] * sc2[r, jj]


@jit
def _value_sums(vc, vn, table, cent, bits, lanes, bh, j0, nt, idx, vf, kv_n, p, pv, tmp,
                acc):
    """``acc`` (R, Dv) += Σ_j p[r, j] · ν_j · c[jdx_j] over tokens ``j0 … j0+nt−1``."""
    n_rows, big_d = acc.shape
    _decode_tile(vc, bh, j0, nt, bits, lanes, table, cent, big_d, idx, vf)
    _norms(vn, bh, j0, nt, kv_n)
    for r in range(n_rows):
        for jj in range(nt):
            pv[r, jj] = p[r, jj] * kv_n[jj]
    np.dot(pv, vf[:nt * big_d].reshape((nt, big_d)), tmp)
    for r in range(n_rows):
        for k in range(big_d):
            acc[r, k] += tmp[r, k]


@jit
def _split_task(bh, s, q0, q1, qs0, qs1, kba, kbb, kfreq, kpos0,
                kc0, kn0, ks0, kg0, kcent0, ktab0, kbits0, kscale0, klanes0, slanes0,
                kc1, kn1, ks1, kg1, kcent1, ktab1, kbits1, kscale1, klanes1, slanes1,
                vc0, vn0, vcent0, vtab0, vbits0, vlanes0,
                vc1, vn1, vcent1, vtab1, vbits1, vlanes1,
                n_keys, n_q, causal_offset, chunk,
                acc0_out, acc1_out, max_out, sum_out):
    """Online softmax over the tokens of split ``s`` for the rows of ``bh``."""
    n_rows = acc0_out.shape[2]
    dk1 = q1.shape[2]
    dv0 = acc0_out.shape[3]
    dv1 = acc1_out.shape[3]
    dmax = max(q0.shape[2], dk1, dv0, dv1, qs0.shape[2], qs1.shape[2])
    neg_inf = np.float32(-np.inf)
    t0 = s * chunk
    t1 = min(n_keys, t0 + chunk, n_q + causal_offset)  # no row sees a key past n_q-1+offset
    idx = np.empty(dmax, np.uint8)
    kf = np.empty(TILE * dmax, np.float32)
    kv_n = np.empty(TILE, np.float32)
    sc_buf = np.empty(n_rows * TILE, np.float32)
    sc2_buf = np.empty(n_rows * TILE, np.float32)
    sc3_buf = np.empty(n_rows * TILE if dk1 > 0 else 0, np.float32)
    tmp0 = np.empty((n_rows, dv0), np.float32)
    tmp1 = np.empty((n_rows, dv1), np.float32)
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
        nt = min(t1, j0 + TILE) - j0
        sc = sc_buf[:n_rows * nt].reshape((n_rows, nt))
        sc2 = sc2_buf[:n_rows * nt].reshape((n_rows, nt))
        _key_scores(q0, qs0, kc0, kn0, ks0, kg0, ktab0, kcent0, kbits0, kscale0, klanes0,
                    slanes0, bh, j0, nt, idx, kf, kv_n, sc, sc2)
        if dk1 > 0:
            sc3 = sc3_buf[:n_rows * nt].reshape((n_rows, nt))
            _key_scores(q1, qs1, kc1, kn1, ks1, kg1, ktab1, kcent1, kbits1, kscale1,
                        klanes1, slanes1, bh, j0, nt, idx, kf, kv_n, sc3, sc2)
            for r in range(n_rows):
                for jj in range(nt):
                    sc[r, jj] += sc3[r, jj]
        if n_freq > 0:
            _bias_tile(kba, kbb, kfreq, kpos0, bh, j0, nt, tcos, tsin, sc)
        # causal mask (row r sees a prefix of the tile), then the online-softmax step
        for r in range(n_rows):
            row = sc[r]
            nv = min(nt, max(0, r % n_q + causal_offset - j0 + 1))
            for jj in range(nv, nt):
                row[jj] = 0.0
            if nv == 0:
                continue
            mt = _row_max(row, nv)
            if mt > m[r]:
                alpha = np.float32(math.exp(m[r] - mt))
                lsum[r] *= alpha
                for k in range(dv0):
                    acc0[r, k] *= alpha
                for k in range(dv1):
                    acc1[r, k] *= alpha
                m[r] = mt
            lsum[r] += _exp_sum(row, nv, m[r])
        _value_sums(vc0, vn0, vtab0, vcent0, vbits0, vlanes0, bh, j0, nt, idx, kf, kv_n,
                    sc, sc2, tmp0, acc0)
        if dv1 > 0:
            _value_sums(vc1, vn1, vtab1, vcent1, vbits1, vlanes1, bh, j0, nt, idx, kf,
                        kv_n, sc, sc2, tmp1, acc1)


@jit
def decode_attention(task_lo, task_hi, q0, q1, qs0, qs1, kba, kbb, kfreq, kpos0,
                     kc0, kn0, ks0, kg0, kcent0, ktab0, kbits0, kscale0, klanes0, slanes0,
                     kc1, kn1, ks1, kg1, kcent1, ktab1, kbits1, kscale1, klanes1, slanes1,
                     vc0, vn0, vcent0, vtab0, vbits0, vlanes0,
                     vc1, vn1, vcent1, vtab1, vbits1, vlanes1,
                     n_keys, n_q, causal_offset, chunk,
                     acc0_out, acc1_out, max_out, sum_out):
    """Split-K attention over packed keys/values, tasks ``task_lo … task_hi − 1``.

    The arguments of :func:`rotorq.cpu.attention.decode_attention`, plus per part its
    centroid table padded to ``TABLE`` float32 (``ktab_p``, ``vtab_p``) and its
    :func:`block_lanes` (``klanes_p``, ``vlanes_p``; ``slanes_p`` for the QJL signs, read
    as 1-bit codes with the table ``(−1, +1)``). The rows ``q_p`` come with part ``p``'s
    coordinates in :func:`permutation` order for ``klanes_p``, the sketched rows ``qs_p``
    in that order for ``slanes_p``, and each value part's ``acc_out`` is returned in that
    order for ``vlanes_p``. C-contiguous arrays only.
    """
    n_split = acc0_out.shape[1]
    for task in range(task_lo, task_hi):
        bh = task // n_split
        _split_task(bh, task - bh * n_split, q0, q1, qs0, qs1, kba, kbb, kfreq, kpos0,
                    kc0, kn0, ks0, kg0, kcent0, ktab0, kbits0, kscale0, klanes0, slanes0,
                    kc1, kn1, ks1, kg1, kcent1, ktab1, kbits1, kscale1, klanes1, slanes1,
                    vc0, vn0, vcent0, vtab0, vbits0, vlanes0,
                    vc1, vn1, vcent1, vtab1, vbits1, vlanes1,
                    n_keys, n_q, causal_offset, chunk,
                    acc0_out, acc1_out, max_out, sum_out)

def _table(cent):
    tab = np.zeros(max(TABLE, cent.shape[0]), np.float32)
    tab[:cent.shape[0]] = cent
    return tab


def run(run_tasks, n_tasks, args):
    """Run :func:`decode_attention` on the arguments ``args`` of the twin
    (:func:`rotorq.cpu.attention.decode_attention` without the task range) with
    ``run_tasks(kernel, n_tasks, args)``: the query rows are permuted, the tables padded,
    and the value accumulators ``args[34]``, ``args[35]`` come back in natural order, as
    the twin writes them."""
    q0, q1, qs0, qs1, kba, kbb, kfreq, kpos0 = args[:8]
    kparts = (args[8:15], args[15:22])
    vparts = (args[22:26], args[26:30])
    n_keys, n_q, causal_offset, chunk, acc0, acc1, mx, sm = args[30:]
    out = [None, None, None, None, kba, kbb, kfreq, kpos0]
    for i, (q, qs, (kc, kn, ks, kg, cent, bits, scale)) in enumerate(
            zip((q0, q1), (qs0, qs1), kparts)):
        lanes = block_lanes(q.shape[2], bits) if q.shape[2] else 0
        slanes = block_lanes(qs.shape[2], 1) if qs.shape[2] else 0
        out[i] = np.ascontiguousarray(q[..., permutation(q.shape[2], lanes)])
        out[2 + i] = np.ascontiguousarray(qs[..., permutation(qs.shape[2], slanes)])
        out += [np.ascontiguousarray(kc), kn, np.ascontiguousarray(ks), kg, cent, _table(cent),
                bits, scale, lanes, slanes]
    for acc, (vc, vn, cent, bits) in zip((acc0, acc1), vparts):
        lanes = block_lanes(acc.shape[3], bits) if acc.shape[3] else 0
        out += [np.ascontiguousarray(vc), vn, cent, _table(cent), bits, lanes]
    out += [n_keys, n_q, causal_offset, chunk, acc0, acc1, mx, sm]
    run_tasks(decode_attention, n_tasks, tuple(out))
    for acc, (_, _, _, bits) in zip((acc0, acc1), vparts):
        lanes = block_lanes(acc.shape[3], bits) if acc.shape[3] else 0
        if lanes:
            acc[..., permutation(acc.shape[3], lanes)] = acc.copy()
