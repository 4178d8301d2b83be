"""Generated RoPE-aware key-offset term on tensor cores (:class:`KeyBiasSpec`), for the
tensor-core attention kernel (:mod:`.attention`, ``bias=True``)."""

import math
from dataclasses import dataclass

from .._jit import SIMULATOR
from .build import Source, Spec, build
from .fields import mma_scratch

TWO_PI = 2.0 * math.pi
INV_TWO_PI = 1.0 / TWO_PI

BIAS_WARPS = 4
"""Warps per block of :class:`KeyBiasSpec`."""
BIAS_MAX_FREQ = 64
"""Most frequencies :class:`KeyBiasSpec` takes (8 MMA k-steps); more go to the scalar
:func:`rotorq.cuda.attention.key_bias_scores`."""
BIAS_MAX_TILES = 128
"""Most 16-token tiles one warp of :class:`KeyBiasSpec` walks: its coefficients are
rotated once per tile in float32, so their phase error grows with the count (the step
angle's float32 rounding, ≤ 2.4e-7 rad, times 128 steps: ≤ 3.1e-5 rad, against float16's
4.9e-4 relative)."""
BIAS_BLOCKS_PER_SM = 4
"""Launch bounds of :class:`KeyBiasSpec`: 4 blocks of :data:`BIAS_WARPS` warps per SM,
128 registers (what it takes at 64 frequencies without spilling)."""
BIAS_SCALE = 8192.0
"""Each coefficient row is scaled to at most this before its float16 conversion (and the
scores scaled back): no float16 overflow or subnormals whatever the rows' magnitude."""


@dataclass(frozen=True)
class KeyBiasSpec(Spec):
    """The RoPE-aware key-offset term on tensor cores: what
    :func:`rotorq.cuda.attention.key_bias_scores` computes (CPU twin
    :func:`rotorq.cpu.attention.key_bias_scores`), for up to
    ``8·steps ≤`` :data:`BIAS_MAX_FREQ` frequencies and at most 8 rows.

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

    steps: int
    """MMA k-steps: the frequencies padded to a multiple of 8, divided by 8."""

    def generate(self):
        return _generate(self.steps)


def spec(n_freq):
    """The :class:`KeyBiasSpec` of ``n_freq`` frequencies (1 to :data:`BIAS_MAX_FREQ`)."""
    steps = -(-int(n_freq) // 8)
    if not 1 <= steps <= BIAS_MAX_FREQ // 8:
        raise ValueError(f"the tensor-core key term takes 1..{BIAS_MAX_FREQ} frequencies, "
                         f"got {n_freq}")
    return KeyBiasSpec(steps)


def kernel(n_freq):
    """The compiled kernel of :func:`spec`."""
    return build(spec(n_freq))


def _generate(steps):
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
        L += mma_scratch(W)
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
          f"        ang -= {TWO_PI!r} * math.floor(ang * {INV_TWO_PI!r})",
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
    return Source("key_bias_mma", L, attrs={"launch_bounds": (32 * W, BIAS_BLOCKS_PER_SM)})


def bias_tiles(n_keys, n_bh, sm_count):
    """16-token tiles per warp of :class:`KeyBiasSpec`: one wave of blocks
    (:data:`BIAS_BLOCKS_PER_SM` per SM; each block's setup is about 1300 sines and
    cosines), at least 8 tiles each, at most :data:`BIAS_MAX_TILES`."""
    n_tiles = -(-int(n_keys) // 16)
    resident = BIAS_BLOCKS_PER_SM * BIAS_WARPS * max(1, sm_count)
    want = -(-n_tiles * max(1, n_bh) // resident)
    return max(1, min(BIAS_MAX_TILES, max(8, want), n_tiles))
