"""Generated tensor-core decode attention over packed keys and values (the fast path of
:func:`rotorq.cuda.api.decode_attention`).

One MSE key part, one value part, ``D % 128 == 0``, 1–4 bits, at most :data:`ROWS` query rows
per KV head: warp-level ``mma.sync.m16n8k16`` (fp16 inputs, fp32 accumulation) for the scores
and the values, the online softmax with lazy rescaling in between, partials per split in the
contract of the general kernel (:func:`rotorq.cuda.attention.decode_attention`), merged by
:func:`rotorq.cuda.merge.merge_splits`. See :class:`MmaAttentionSpec`.
"""

import math
from dataclasses import dataclass

import numpy as np

from .._jit import SIMULATOR
from .build import Source, Spec, build
from .fields import field32, mma_scratch

LOG2E = float(np.float32(1.0 / math.log(2.0)))
LN2 = float(np.float32(math.log(2.0)))

ROWS = 8
"""Query rows per KV head the tensor-core kernel takes (the MMA's N = 8)."""
WARPS = 4
"""Warps per block of the tensor-core kernel; each takes 16 tokens per step."""
SPLIT_BLOCKS_PER_SM = 4
"""Blocks per SM the split count aims at: the 4 that are resident at once (one wave; 8 were
slower: each block has a fixed cost)."""
LAUNCH_BLOCKS = 4
"""Resident blocks per SM the tensor-core kernel's registers are capped for (its
``launch_bounds``: 128 registers, no spills at D = 128; left to itself the compiler took 133
once the tables were replicated, and 3 blocks fit). Only for ``DK = DV = 128``: at 256 the
cap spills, so wider heads are left uncapped."""
PREFETCH = 1
"""Tiles in flight ahead of the one computed in the tile layout (the row layout takes 1)."""
RESCALE_SLACK = 4.0
"""Lazy rescaling (base-2 units): when a score rises above a row's reference, the new
reference is the row's maximum plus this slack, so the running sums and accumulators are
rescaled again only once a score exceeds it; ``p = 2^(s − ref) ≤ 1`` still holds, and the
top score's ``p`` is at least ``2^−slack`` (its float16 ``p·ν`` keeps full precision while
``p·ν ≥ 2^−14``). ``max_out`` is then the reference, up to ``slack·ln 2`` above the
maximum: the partials' ``max_out + log(sum_out)`` and ``acc_out / sum_out`` are what the
general kernel gives."""
STATIC_SHARED = 48 * 1024
"""Static shared memory one block may declare."""
REPLICAS = 32
"""Copies of a replicated pair table: entry ``e`` of lane ``l``'s copy is word ``32·e + l``,
in lane ``l``'s own bank, so a warp's lookup is one shared-memory wavefront whatever the
codes (a single 64-entry table takes two: its 2 entries per bank are both wanted in almost
every lookup of 32 random codes)."""


def _red_stride(value_dim):
    """Row stride (floats) of the warps' accumulator exchange: ≡ 4 (mod 16), so the stores
    of a warp's ``(row 2t[+1], coordinate 8j + g)`` fall in 32 distinct banks."""
    return value_dim + 4


def table_copies(key_dim, key_bits, value_dim, value_bits):
    """``(key table copies, value table copies)`` of :class:`MmaAttentionSpec` (each
    :data:`REPLICAS` or 1: replicate the smaller tables first) within
    :data:`STATIC_SHARED`, or None when even single tables do not fit."""
    lk2, lv2 = 1 << (2 * key_bits), 1 << (2 * value_bits)
    fixed = 4 * (WARPS * 128 + 2 * WARPS * 8 + WARPS * 8 * _red_stride(value_dim))
    options = [(REPLICAS, REPLICAS), (1, REPLICAS) if lv2 <= lk2 else (REPLICAS, 1),
               (REPLICAS, 1) if lv2 <= lk2 else (1, REPLICAS), (1, 1)]
    for ck, cv in options:
        if fixed + 4 * (lk2 * ck + lv2 * cv) <= STATIC_SHARED:
            return ck, cv
    return None


def config(key_dim, key_bits, value_dim, value_bits, key_row_bytes, value_row_bytes):
    """``(key_dim, key_bits, value_dim, value_bits)`` for :class:`MmaAttentionSpec` if the
    tensor-core kernel takes these dimensions, bit widths and packed row sizes, else None."""
    if key_dim % 128 or value_dim % 128 or not (0 < key_dim <= 512 and 0 < value_dim <= 512):
        return None
    if not (1 <= key_bits <= 4 and 1 <= value_bits <= 4):
        return None
    if key_row_bytes * 8 != key_dim * key_bits or value_row_bytes * 8 != value_dim * value_bits:
        return None
    if table_copies(key_dim, key_bits, value_dim, value_bits) is None:  # D_v = 384, 512
        return None
    return (int(key_dim), int(key_bits), int(value_dim), int(value_bits))


@dataclass(frozen=True)
class MmaAttentionSpec(Spec):
    """Tensor-core decode attention: one MSE key part, one value part, ≤ 8 query rows.

    ``(q f32 (BH, R, DK), kc u32 (BH, cap·DK·key_bits/32), kn f16 (BH, cap), kcent f32,
    vc u16 (BH, cap·DV·value_bits/16), vn f16 (BH, cap), vcent f32, n_keys, n_q, causal_offset,
    chunk, acc_out f32 (BH, S, R, DV), max_out, sum_out f32 (BH, S, R))`` — the partials of
    the general kernel's contract. Grid ``(S, BH)``, :data:`WARPS` warps per block.

    Each warp takes 16 tokens per step. Scores: ``Sᵀ (16 tok × 8 rows) = K (16 × DK) · Qᵀ``
    with ``mma.m16n8k16`` (fp16 in, fp32 accumulate); lane ``(g, t) = (lane/4, lane%4)`` owns
    the contiguous coordinates ``[t·DK/4, (t+1)·DK/4)`` of its tokens ``g`` and ``g+8`` (the
    MMA's k-index is permuted to match, so every bit offset is a constant) and decodes two
    adjacent codes at once through a shared table of ``half2(c[a], c[b])`` pairs. The scores
    times the key norms, masked, go through the online softmax: only when a score of the warp
    exceeds its row's standing reference (one warp vote) are the row maxima reduced over the
    row's 8 lanes by shuffles, the reference set to the maximum plus
    :data:`RESCALE_SLACK`, and the running sums and accumulators rescaled; the running sum is
    kept per lane and reduced at the end. The steps whose tokens every query row sees whole
    run first, without the per-score mask; the last steps run in a masked copy of the loop
    body. Values:
    ``accᵀ (DV × 8 rows) += Vᵀ (DV × 16 tok) · (p·ν)ᵀ`` with the M index permuted so that lane
    group ``g`` owns coordinates ``[g·DV/8, (g+1)·DV/8)``; ``p·ν`` is transposed to the B
    layout through a per-warp shared buffer. The block's warps merge in shared memory and
    write one partial per split.

    ``bias=True``: one more argument after ``vcent``, ``kbias`` f32 (BH, ≥ 8·n_keys): key
    ``j``'s 8 rows at ``8j … 8j+7`` (the layout of :mod:`.key_bias`), the RoPE-aware
    key-offset term of each key and row (:func:`rotorq.cuda.attention.key_bias_scores`),
    added to the scores.

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
    one wide multiply-add onto the array's pointer. Tiles are prefetched ``prefetch`` steps
    ahead (tile layout) and the loop body is written once per set of prefetch registers
    (``prefetch + 1`` copies), so no register moves carry them. Scores are kept in
    base 2 (the query carries log2 e; ``ex2.approx`` is one instruction) and turned back
    into base e for ``max_out``.
    """

    key_dim: int
    key_bits: int
    value_dim: int
    value_bits: int
    bias: bool
    tiled: bool
    launch_blocks: int | None
    key_copies: int
    value_copies: int
    prefetch: int

    def generate(self):
        return _generate(self.key_dim, self.key_bits, self.value_dim, self.value_bits,
                         self.launch_blocks, (self.key_copies, self.value_copies), self.bias,
                         self.tiled, self.prefetch)


def spec(key_dim, key_bits, value_dim, value_bits, *, bias=False, tiled=False, blocks=None,
         copies=None, prefetch=None):
    """The :class:`MmaAttentionSpec` of a shape. ``blocks``: resident blocks per SM the
    registers are capped for (None: :data:`LAUNCH_BLOCKS` where ``DK + DV ≤ 256``, else
    uncapped; 0: uncapped); ``copies``: ``(key, value)`` pair-table copies (None:
    :func:`table_copies`); ``prefetch``: tiles in flight in the tile layout (None:
    :data:`PREFETCH`; the row layout takes 1)."""
    if blocks is None:  # wider heads keep more accumulators: capped, they would spill
        blocks = LAUNCH_BLOCKS if key_dim + value_dim <= 256 else 0
    ck, cv = copies or table_copies(key_dim, key_bits, value_dim, value_bits)
    prefetch = (prefetch or PREFETCH) if tiled else 1
    return MmaAttentionSpec(int(key_dim), int(key_bits), int(value_dim), int(value_bits),
                            bool(bias), bool(tiled), int(blocks) or None, int(ck), int(cv),
                            int(prefetch))


def kernel(key_dim, key_bits, value_dim, value_bits, *, bias=False, tiled=False, blocks=None,
           copies=None, prefetch=None):
    """The compiled kernel of :func:`spec`."""
    return build(spec(key_dim, key_bits, value_dim, value_bits, bias=bias, tiled=tiled,
                      blocks=blocks, copies=copies, prefetch=prefetch))


def _generate(key_dim, key_bits, value_dim, value_bits, blocks, copies, bias, tiled, depth):
    unroll = depth + 1 if tiled else 1
    slack = RESCALE_SLACK
    kw = key_dim * key_bits // 128  # uint32 key words per lane (DK/4 coordinates)
    vw = value_dim * value_bits // 128  # uint16 value words per lane group (DV/8 coordinates)
    nx = (vw + 1) // 2
    kch = key_dim // 16
    mtiles = value_dim // 16
    lk2, lv2 = 1 << (2 * key_bits), 1 << (2 * value_bits)
    W = WARPS
    sim = SIMULATOR
    ck, cv = copies
    S = _red_stride(value_dim)
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
        L += mma_scratch(W) + [f"    sx = cuda.shared.array({W * 32}, numba.float32)"]
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
          f"    if tid < {1 << key_bits}:",
          "        pt[tid] = kcent[tid]",
          f"    elif tid - {1 << key_bits} < {1 << value_bits}:",
          f"        pt[tid] = vcent[tid - {1 << key_bits}]",
          "    cuda.syncthreads()",
          "    e = tid",
          f"    while e < {lk2 * ck}:",
          f"        en = e // {ck}",
          f"        tabk[e] = half_bits(pt[en & {(1 << key_bits) - 1}]) | "
          f"(half_bits(pt[en >> {key_bits}]) << U32(16))",
          f"        e += {32 * W}",
          "    e = tid",
          f"    while e < {lv2 * cv}:",
          f"        en = e // {cv}",
          f"        tabv[e] = half_bits(pt[{1 << key_bits} + (en & {(1 << value_bits) - 1})]) | "
          f"(half_bits(pt[{1 << key_bits} + (en >> {value_bits})]) << U32(16))",
          f"        e += {32 * W}",
          "    qr = min(g, n_rows - 1)",
          # scores in base 2: the query carries log2(e), the softmax uses ex2 (one MUFU)
          f"    qz = np.float32({LOG2E!r}) if g < n_rows else np.float32(0.0)",
          f"    qo = t * {key_dim // 4}"]
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
    krow, vrow_w = key_dim * key_bits // 32, value_dim * value_bits // 16

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
    L += ["    ntu = U32(ntile)",
          "    it = U32(0)"]
    # first the steps whose 16·W tokens every row sees whole (row 0 sees the fewest), unmasked
    L += [f"    nfu = U32(min(ntile, max(min(t1, causal_offset + 1) - t0, 0) // {16 * W}))",
          "    while it < nfu:"]
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
        p0, p1 = 4 * c * key_bits, (4 * c + 2) * key_bits  # pairs (4c, 4c+1) and (4c+2, 4c+3)
        L += [f"{ind}a{i} = word_at(tabk, {lookup(field32(w, p, 2 * key_bits, kshift), ck)})"
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
    L += unmasked
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
        top = f"x_{r} + np.float32({slack!r})"
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
                fld = field32(w, 2 * j * value_bits, 2 * value_bits, vshift)
                L.append(f"{ind}a{i} = word_at(tabv, {lookup(fld, cv)})")
            L.append(mma("a0, a1, a2, a3", "pb0, pb1", f"o{mt}_0, o{mt}_1, o{mt}_2, o{mt}_3"))
            continue
        regs = []
        for x0, x1, j in ((0, 1, 2 * mt), (0, 1, 2 * mt + 1), (2, 3, 2 * mt), (2, 3, 2 * mt + 1)):
            lo = lookup(field32(f"v{x0}_", j * value_bits, value_bits, shift=vshift), cv)
            hi = field32(f"v{x1}_", j * value_bits, value_bits, shift=value_bits + vshift)
            regs.append(f"word_at(tabv, or32({lo}, {hi}))")
        L += [f"{ind}a0 = {regs[0]}", f"{ind}a1 = {regs[1]}", f"{ind}a2 = {regs[2]}",
              f"{ind}a3 = {regs[3]}"]
        L.append(mma("a0, a1, a2, a3", "pb0, pb1", f"o{mt}_0, o{mt}_1, o{mt}_2, o{mt}_3"))
    # the body once per set of prefetch registers: each copy loads into the set the previous
    # copy computed from, so the loop carries them without register moves
    body = L[body_at:]
    for _ in range(1, unroll):
        L += [f"{ind}if it >= nfu:", f"{ind}    break", f"{ind}it = add32(it, U32(1))"] + body
    # then the last steps (at most unroll + n_q/16·W), masked, one copy
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
          f"{ind}while u < n_rows * {value_dim + 1}:",
          f"{ind}    if u < n_rows * {value_dim}:",
          f"{ind}        r = u // {value_dim}",
          f"{ind}        cp = u - r * {value_dim}",
          f"{ind}        col = (cp % 8) * {value_dim // 8} + cp // 8",
          f"{ind}    else:",
          f"{ind}        r = u - n_rows * {value_dim}",
          f"{ind}    mx = neg_inf"]
    for w in range(W):
        L.append(f"{ind}    mx = max(mx, red_m[{8 * w} + r])")
    L += [f"{ind}    sf = mx if mx != neg_inf else np.float32(0.0)",
          f"{ind}    tot = np.float32(0.0)",
          f"{ind}    if u < n_rows * {value_dim}:"]
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
    return Source("attn_fast", L, attrs={"launch_bounds": (32 * W, blocks)} if blocks else {})


