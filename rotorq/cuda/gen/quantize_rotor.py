"""Generated tiled fused rotor quantize (RotorQuant, MSE mode) for batches of rows.

The same results as :func:`rotorq.cpu.quantize.quantize_rotor` (its CPU twin, up to the
documented rounding flips: NVVM contracts the 3×3 products into FMAs, as in
:func:`rotorq.cuda.rotate.rotor_row`), laid out like :mod:`rotorq.cuda.gen.quantize`
so that global memory sees only whole lines.

A block of ``T = R·P`` threads owns a tile of ``R`` rows (32 on the GPU: the lanes of a warp
are 32 rows). Thread ``(r, p) = (tid % R, tid // R)`` works on row ``r`` and the ``Q``
consecutive 3-groups ``Q·p … Q·p + Q − 1`` (fewer in the last part), ``Q = 8``: 24 codes
fill whole bytes at every bit width, so the thread's codes are the ``B = 3·bits`` bytes of the
packed row at byte ``B·p`` and its coordinates whole input words. (At 3 bits 8 groups is the
least that fills whole bytes; fewer groups at 2 and 4 bits cost more SASS instructions per
coordinate — staging, the norm's partial sums over more parts and the store pass are work
per thread and tile: 72 per coordinate at 4 bits with 2 groups against 46 with 8.) Each
iteration of the grid-stride loop over tiles:

1. stores the tile's input words (prefetched into registers during the previous iteration,
   consecutive threads on consecutive words) into a shared tile whose rows are padded with
   zero words up to the ``3QP`` coordinates of the parts (the rotor's padding coordinates);
   the row stride is odd, so the lanes of a warp (different rows) hit different banks;
2. sums the squares of the thread's coordinates in float64; after a barrier each thread adds
   its row's ``P`` partial sums in order (so ``‖x‖²`` is the CPU's but for the order of the
   float64 additions; for fp16 rows its square root is float32, within one ulp of the CPU's
   ``‖x‖``);
3. rotates each group by its 3×3 matrix, read from shared memory (every lane of a warp reads
   the same matrix: broadcasts) — for float32 rows the CPU's scaled
   ``v = float32(float64(x)·inv_n)``, for fp16 rows the unscaled ``x`` (exact in float32),
   compared with ``boundary·float32(n)`` per row as in
   :mod:`rotorq.cuda.gen.quantize` (rare extra rounding flips, 13% fewer
   instructions) — decides the codes as that kernel does (a register bisection, by sign and
   magnitude for fp16 rows of 2–4 bits; a heap bisection in shared memory for float32 rows of
   4 bits) and packs them with constant shifts into a shared code tile laid out as the output
   rows;
4. the block stores the code tile, consecutive threads on consecutive 32-bit words: the tile's
   rows lie back to back in shared memory as they do in ``codes`` (``rows·nbytes`` bytes, a
   whole number of words as ``rows`` is a multiple of 4), and ``codes`` has room for whole
   tiles (:func:`padded_rows`), so no store is guarded.
"""

from dataclasses import dataclass

import numpy as np

from .._jit import SIMULATOR
from . import decide
from . import row_tiles as rt
from .build import Source, Spec, build

ROWS = 32
"""Rows per tile (the lanes of a warp) used by :mod:`rotorq.cuda.api`."""
GROUPS = 8
"""``Q``: 3-groups per thread at every bit width (``3Q·bits`` code bits are whole bytes)."""
REGS_HALF = 56
"""Register budget per thread for fp16 rows, which sets the resident blocks (launch bounds):
at d = 128 (192 threads) 6 blocks, 48 registers used, no spills; the fastest of 5, 6 and 8
blocks (benchmarks/RESULTS.md, "Launch bounds of the tiled quantize kernels")."""
MAT = 12
"""Floats per 3×3 matrix in shared memory (9 used; 48 bytes keeps each 16-byte aligned)."""


def applies(kind, d, stored_dim, bits, dtype, sketch_rows):
    """Whether the tiled rotor quantize handles this call (MSE mode, fp16 rows of even ``d`` or
    float32 rows, at most 32 parts per row)."""
    if kind != "rotor" or sketch_rows or not 1 <= bits <= 4 or stored_dim != 3 * (-(-d // 3)):
        return False
    if -(-(stored_dim // 3) // GROUPS) * ROWS > 1024:
        return False
    return dtype == np.float32 or (dtype == np.float16 and d % 2 == 0)


def padded_rows(n, rows=ROWS):
    """Rows of the ``codes`` buffer the kernel writes for ``n`` rows: whole tiles."""
    return -(-n // rows) * rows


@dataclass(frozen=True)
class RotorQuantizeSpec(Spec):
    """Tiled fused rotor MSE quantize of rows of ``d`` coordinates (fp16 or float32).

    ``(x, mats, boundaries, centroids, codes, norms)``: ``x`` flat (n·d/2,) uint32 fp16 pairs
    if ``half`` else (n·d,) float32; ``mats`` flat (G·9,) float32 (the (G, 3, 3) rotor
    matrices); ``codes`` the packed rows as flat uint32 words, with room for
    :func:`padded_rows` rows (``padded_rows(n)·nbytes / 4`` words; the rows past ``n`` get
    codes of zero rows); ``norms`` (n,) float32. ``rows`` must be a multiple of 4. ``regs``:
    the register budget per thread that sets the resident blocks. Launch
    ``kern.threads`` threads per block, any grid (blocks stride over tiles of ``rows`` rows).
    """

    d: int
    bits: int
    half: bool
    norm_correction: bool
    rows: int
    regs: int

    def generate(self):
        return _generate(self.d, self.bits, self.half, self.norm_correction, self.rows,
                         self.regs)


def spec(d, bits, half, norm_correction, rows=ROWS, regs=None):
    """The :class:`RotorQuantizeSpec` of one call shape; ``regs=None``: :data:`REGS_HALF` for
    fp16 rows, 80 for float32 rows (twice the prefetched words; 64 spilled at 4 bits)."""
    if rows % 4:
        raise ValueError(f"rows per tile must be a multiple of 4, got {rows}")
    if regs is None:
        regs = REGS_HALF if half else 80
    return RotorQuantizeSpec(int(d), int(bits), bool(half), bool(norm_correction), int(rows),
                             int(regs))


def kernel(d, bits, half, norm_correction, rows=ROWS, regs=None):
    """The compiled kernel of :func:`spec`."""
    return build(spec(d, bits, half, norm_correction, rows, regs))


def _generate(d, bits, half, norm_correction, rows, regs):
    n_groups = -(-d // 3)
    stored_dim = 3 * n_groups
    q_n = GROUPS
    p_n = -(-n_groups // q_n)
    q_last = n_groups - q_n * (p_n - 1)  # groups of the last part
    threads = rows * p_n
    gen = rt.RowTiles(16 * p_n, threads, half, d)  # (r, p) = (tid % rows, tid // rows)
    assert gen.R == rows
    wq = 3 * q_n // 2 if half else 3 * q_n  # input words per part
    sw = wq * p_n | 1
    if half:
        gen.SW, gen.SHW, gen.S, gen.SH = sw, None, sw, None
    else:
        gen.S, gen.SH = sw, None
    w_in = gen.w_in
    pp = p_n | 1  # float64 partials per row
    n_bytes = -(-stored_dim * bits // 8)
    b_n = 3 * q_n * bits // 8  # code bytes per part
    tile_words = rows * n_bytes // 4
    levels = 1 << bits
    decision = decide.decision(bits, half)
    in_regs = decision != "heap"
    tile_name = "raw" if half else "ft"
    L = gen.L
    L.append("def quantize_rotor_tiled(x, mats, boundaries, centroids, codes, norms):")
    al = "" if SIMULATOR else ", alignment=16"
    gen.add(4, f"{tile_name} = cuda.shared.array({rows * sw}, "
               f"numba.{'uint32' if half else 'float32'})",
            f"ms = cuda.shared.array({q_n * p_n * MAT}, numba.float32{al})",
            f"part = cuda.shared.array({rows * pp}, numba.float64)",
            f"cst = cuda.shared.array({4 * tile_words}, numba.uint8{al})")
    if not in_regs:
        gen.add(4, f"bs = cuda.shared.array({levels}, numba.float32)")
    if norm_correction:
        gen.add(4, f"part2 = cuda.shared.array({rows * pp}, numba.float64)",
                f"cs = cuda.shared.array({levels}, numba.float32)")
    # once: the matrices (zero past the last group) and the zero pad words of the input rows
    zero = "U32(0)" if half else "np.float32(0.0)"
    gen.add(4, "t = U64(U32(cuda.threadIdx.x))",
            f"while t < U64({q_n * p_n * MAT}):",
            f"    gg = t // U64({MAT})",
            f"    kk = t % U64({MAT})",
            f"    ms[t] = mats[gg * U64(9) + kk] if gg < U64({n_groups}) and kk < U64(9) "
            "else np.float32(0.0)",
            f"    t += U64({threads})")
    if sw > w_in:
        gen.add(4, "t = U64(U32(cuda.threadIdx.x))",
                f"while t < U64({rows * (sw - w_in)}):",
                f"    {tile_name}[(t // U64({sw - w_in})) * U64({sw}) + U64({w_in}) + "
                f"t % U64({sw - w_in})] = {zero}",
                f"    t += U64({threads})")
    if norm_correction or not in_regs:
        gen.add(4, "t = cuda.threadIdx.x", f"while t < {levels}:")
        if not in_regs:
            gen.add(4, f"    if t < {levels - 1}:", "        bs[t + 1] = boundaries[HEAP[t]]")
        if norm_correction:
            gen.add(4, "    cs[t] = centroids[t]")
        gen.add(4, f"    t += {threads}")
    scaled = half and in_regs  # fp16 rows: compare unscaled rotations with n·boundaries
    reg_bd = decide.register_boundaries(bits, decision) if in_regs else []
    gen.add(4, *[f"{'bq' if scaled else 'bd'}{i} = boundaries[{j}]" for i, j in enumerate(reg_bd)])
    gen.prologue()
    gen.add(4, "n_rows = U64(norms.shape[0])", "total_out = U64(codes.shape[0])",
            f"xb = r * U64({sw}) + U64({wq}) * p", f"pb = r * U64({pp})",
            f"mb = U64({q_n * MAT}) * p", f"cb = r * U64({n_bytes}) + U64({b_n}) * p")
    gen.stage()
    n_c = 3 * q_n
    def coords(ind, ks):  # read this thread's coordinates ks from the shared tile
        for k in ks:
            if not half:
                gen.add(ind, f"x{k} = ft[xb + U64({k})]")
            elif k % 2 == 0 or k - 1 not in ks:
                gen.add(ind, f"u = raw[xb + U64({k // 2})]", f"x{k} = half_{'hi' if k % 2 else 'lo'}(u)")
            else:
                gen.add(ind, f"x{k} = half_hi(u)")

    # ‖x‖² of this thread's 3Q coordinates (read again for the rotation: fewer live registers)
    gen.add(8, "acc = 0.0")
    for k in range(n_c):
        coords(8, [k])
        gen.add(8, f"f = np.float64(x{k})", "acc += f * f")
    gen.add(8, "part[pb + p] = acc", "cuda.syncthreads()", "acc = part[pb]")
    for q in range(1, p_n):
        gen.add(8, f"acc += part[pb + U64({q})]")
    gen.add(8, f"row = tile * U64({rows}) + r")
    if scaled:  # a zero row rotates to 0 whatever the scale: compare it with the boundaries
        gen.add(8, "n = math.sqrt(np.float32(acc))",  # float32: may differ by one ulp
                "scf = n if n > np.float32(0.0) else np.float32(1.0)",
                *[f"bd{i} = bq{i} * scf" for i in range(len(reg_bd))])
    else:
        gen.add(8, "n = math.sqrt(acc)", "inv_n = 1.0 / n if n > 0.0 else 0.0")
    if not norm_correction:
        gen.add(8, "if p == U64(0) and row < n_rows:", "    norms[row] = n")
    decide_lines = decide.LINES[decision]
    n_w = (n_c * bits + 31) // 32
    gen.add(8, *[f"o{w} = U32(0)" for w in range(n_w)])
    if norm_correction:
        gen.add(8, "cn = 0.0")
    for q in range(q_n):
        ind = 8
        if q >= q_last:  # a group the last part does not have
            if p_n == 1:
                continue
            gen.add(8, f"if p < U64({p_n - 1}):")
            ind = 12
        coords(ind, [3 * q, 3 * q + 1, 3 * q + 2])
        if scaled:
            gen.add(ind, *[f"v{k} = x{3 * q + k}" for k in range(3)])
        else:
            gen.add(ind, *[f"v{k} = np.float32(np.float64(x{3 * q + k}) * inv_n)"
                           for k in range(3)])
        gen.add(ind, *[f"m{i} = ms[mb + U64({MAT * q + i})]" for i in range(9)])
        for k in range(3):
            gen.add(ind, f"y{k} = m{3 * k} * v0 + m{3 * k + 1} * v1 + m{3 * k + 2} * v2")
        for k in range(3):
            c = f"c{3 * q + k}"
            gen.add(ind, *decide_lines(f"y{k}", c, bits))
            if norm_correction:
                gen.add(ind, f"f = np.float64(cs[{c}])", "cn += f * f")
            pos = (3 * q + k) * bits
            w, s = pos >> 5, pos & 31
            if in_regs and not norm_correction:  # each decided bit straight into its word
                for lv in range(bits):
                    wl, sl = (pos + lv) >> 5, (pos + lv) & 31
                    gen.add(ind, f"o{wl} |= (U32({1 << sl}) if {c}_{lv} else U32(0))")
            else:
                gen.add(ind, f"o{w} |= U32({c} << U32({s}))" if s else f"o{w} |= {c}")
                if s + bits > 32:
                    gen.add(ind, f"o{w + 1} |= U32({c} >> U32({32 - s}))")
    b_last = n_bytes - b_n * (p_n - 1)  # bytes of the last part
    for b in range(b_n):
        ind = 8
        if b >= b_last:  # past the row: the last part has no such byte
            gen.add(8, f"if p < U64({p_n - 1}):")
            ind = 12
        gen.add(ind, f"cst[cb + U64({b})] = np.uint8((o{b >> 2} >> U32({8 * (b & 3)})) & U32(255))")
    if norm_correction:
        gen.add(8, "part2[pb + p] = cn", "cuda.syncthreads()", "cn = part2[pb]")
        for q in range(1, p_n):
            gen.add(8, f"cn += part2[pb + U64({q})]")
        gen.add(8, "if cn > 0.0:", "    n = n / math.sqrt(cn)",
                "if p == U64(0) and row < n_rows:", "    norms[row] = n")
    gen.add(8, "cuda.syncthreads()")
    gen.add(8, "cw = cst.view(np.uint32)", f"g = tile * U64({tile_words}) + tid")
    for i in range(-(-tile_words // threads)):
        ind = 8
        if (i + 1) * threads > tile_words:
            gen.add(8, f"if tid < U64({tile_words - i * threads}):")
            ind = 12
        gen.add(ind, f"codes[g + U64({i * threads})] = cw[tid + U64({i * threads})]")
    gen.add(8, "tile = nxt")
    blocks = max(1, min(32, 2048 // threads, 65536 // (regs * threads)))
    L.append(f"# rows per tile {rows}, launch bounds ({threads}, {blocks})")
    return Source("quantize_rotor_tiled", L, {"HEAP": decide.heap_order(bits)},
                  rt.launch_attrs(rows, threads, blocks))
