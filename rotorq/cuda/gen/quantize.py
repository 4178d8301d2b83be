"""Generated tiled fused Hadamard MSE quantize (on the skeleton of :mod:`.row_tiles`).

The kernel keeps the CPU twin's WHT, decision (the number of boundaries ``<= y``,
:mod:`.decide`) and LSB-first packing. Lanes of 8 rows × 4 parts with unpadded,
vector-aligned rows (:func:`.row_tiles.vec_strides`): the first phase's fp16 reads and float
writes and the decision's reads are 128-bit accesses, and the last WHT phase takes the groups
``2q, 2q + 1`` (adjacent coordinates: 64-bit reads and writes).

For float32 rows it keeps the CPU's scaling ``float32(float64(x)·inv_n)·sign`` too; for fp16
rows it transforms the unscaled ``x·sign`` (fp16 values are exact in float32) and compares with
``boundary·float32(n·sqrt(D))`` per row instead of scaling every coordinate (a zero row compares
0 with the boundaries, as the CPU does): 3–4 instructions fewer per coordinate, two of them
float64 conversions, and the boundaries, no longer uniform, need no copies out of uniform
registers. The two sides then round differently: a code differs from the CPU's only where the
coordinate lies within a few float32 ulps of a boundary (the documented rounding flips; the
simulator tests, fixed seeds, see none). The float64 sums (``‖x‖²`` and, with
``norm_correction``, ``‖c[idx]‖²``) run in another order: each thread sums its 16 coordinates in
order, then the ``P`` partial sums are added in order. Those sums are exact for fp16 input of
moderate range; otherwise they can differ from the CPU's in the last bit of a float64, which
changes a code only when a coordinate lies within ~1e-16 of a boundary (the documented rounding
flips). For fp16 rows the sums are float32 (the squares are exact): each thread's 16 squares,
then the ``P`` partials, and so is the square root: the stored norm can differ from the CPU's
``float32(sqrt(‖x‖²))`` by at most ``(14 + P)·2^-25`` relative plus one ulp (``P = D/16``;
6.6e-7 at D = 128).

fp16 rows of 2 to :data:`.decide.SYM_BITS` bits decide by sign and magnitude
(:func:`.decide.symmetric_decide`): the codebooks are symmetric about 0, so a bisection of
``|y|`` over the positive half of the boundaries, one level shorter, gives the code; it counts
a boundary that ``-y`` equals exactly one lower than the CPU (a rounding flip of the same
kind).

Fewer instructions per code: up to :data:`.decide.REG_BITS` bits (fp16 rows: up to
:data:`.decide.SYM_BITS`) the boundaries are loaded once into registers and each code is a
register bisection whose decided bits go straight into the packed words, one select of
``1 << s`` per bit (without ``norm_correction``, which needs the code itself); the row's norm
is stored as soon as it is known (with ``norm_correction``: after the correction), which frees
its registers for the decision; when ``threads`` is a multiple of the input words per row, a
thread stages words of one column only, so its staging address is one hoisted base plus
constants and the rotation's signs are applied there (an XOR of the fp16 sign bits, a multiply
for fp32; for fp32 this equals the CPU's ``float32(float64(x)·inv_n)·sign``: rounding is
sign-symmetric); and every tile but the last is prefetched without bound checks (the last one:
a thread's first ``nl`` loads, one 32-bit compare each). Thread and tile indices are
zero-extended 32-bit values, so most of the uint64 index arithmetic compiles to 32-bit
instructions.
"""

import math
from dataclasses import dataclass

import numpy as np

from .._jit import SIMULATOR
from . import decide
from . import row_tiles as rt
from .build import Source, Spec, build

THREADS = rt.THREADS


def applies(kind, d, stored_dim, bits, dtype, sketch_rows):
    """Whether the tiled Hadamard quantize handles this call (MSE mode, fp16 rows of even
    ``d`` or float32 rows, a stored dimension the tiles take, 1–4 bits)."""
    if kind != "hadamard" or sketch_rows or not rt.applies(stored_dim) or not 1 <= bits <= 4:
        return False
    return dtype == np.float32 or (dtype == np.float16 and d % 2 == 0)


@dataclass(frozen=True)
class QuantizeSpec(Spec):
    """Tiled fused Hadamard MSE quantize of fp16 or fp32 rows of ``d`` ≤ ``stored_dim``
    coordinates.

    ``(x, signs, boundaries, centroids, codes, norms)``: ``x`` flat (n·d/2,) uint32 fp16 pairs
    if ``half`` else (n·d,) float32; ``signs`` (D,) float32 ±1; ``codes`` flat (n·W,) uint32
    if ``word_out`` else (n·nbytes,) uint8; ``norms`` (n,) float32. Launch ``threads`` threads
    per block, any grid. ``blocks``: resident blocks per SM the registers are capped for (the
    launch bounds, :func:`spec` picks the default).
    """

    d: int
    stored_dim: int
    bits: int
    half: bool
    norm_correction: bool
    word_out: bool
    threads: int
    blocks: int

    def generate(self):
        return _generate(self.d, self.stored_dim, self.bits, self.half, self.norm_correction,
                         self.word_out, self.threads, self.blocks)


def spec(d, stored_dim, bits, half, norm_correction, word_out, threads=THREADS, blocks=None):
    """The :class:`QuantizeSpec` of one call shape; ``blocks=None``: 5 resident blocks for fp16
    rows without norm correction whose staged words keep to one column per thread (fewer
    registers are needed there; more warps hide more latency), else 3 (64 registers would
    spill: fp32's 16 prefetched words, norm correction, d = 96 rows)."""
    if blocks is None:
        col_sign = threads % (d // 2 if half else d) == 0
        blocks = 5 if half and not norm_correction and col_sign else 3
    return QuantizeSpec(int(d), int(stored_dim), int(bits), bool(half), bool(norm_correction),
                        bool(word_out), int(threads), int(blocks))


def kernel(d, stored_dim, bits, half, norm_correction, word_out, threads=THREADS, blocks=None):
    """The compiled kernel of :func:`spec`."""
    return build(spec(d, stored_dim, bits, half, norm_correction, word_out, threads, blocks))


def _generate(d, stored_dim, bits, half, norm_correction, word_out, threads, blocks):
    gen = rt.RowTiles(stored_dim, threads, half, d, vec=True)
    rt.vec_strides(gen)
    R, T, P = gen.R, threads, gen.P
    PP = P + 2 if P % 2 == 0 and P >= 4 else P  # row stride of the float64 partials
    levels = 1 << bits
    halves = stored_dim * bits // 16  # uint16 per row of codes
    SC = halves + 2 if halves % 4 == 0 else halves  # an odd number of words per row
    nbytes = stored_dim * bits // 8
    w_out = nbytes // 4 if word_out else nbytes
    L = gen.L
    L.append("def quantize_tiled(x, signs, boundaries, centroids, codes, norms):")
    al = "" if SIMULATOR else ", alignment=16"  # vector accesses; no alignment in cudasim
    if half:
        gen.add(4, f"raw = cuda.shared.array({R * gen.SW}, numba.uint32{al})")
    decision = decide.decision(bits, half)
    in_regs = decision != "heap"
    scaled = half and in_regs  # fp16 rows: compare the unscaled WHT with n·sqrt(D)·boundaries
    # fp16 rows: float32 partials, rows 16-byte aligned (vector loads) and an odd multiple of 4
    # words apart (8 rows × 4 parts of a warp store to distinct banks)
    PQ = -(-P // 4) * 4
    PQ += 4 * (PQ % 8 == 0)
    gen.add(4, f"ft = cuda.shared.array({R * gen.S}, numba.float32{al})",
            f"part = cuda.shared.array({R * PQ}, numba.float32{al})" if scaled else
            f"part = cuda.shared.array({R * PP}, numba.float64)",
            f"cst = cuda.shared.array({R * SC}, numba.uint16)")
    col_sign = gen.uniform_column()
    if not in_regs:
        gen.add(4, f"bs = cuda.shared.array({levels}, numba.float32)")
    if not col_sign:
        gen.add(4, f"sg = cuda.shared.array({stored_dim + stored_dim // rt.E}, numba.float32)")
    if norm_correction:
        gen.add(4, f"part2 = cuda.shared.array({R * PP}, numba.float64)",
                f"cs = cuda.shared.array({levels}, numba.float32)")
    if norm_correction or not in_regs:
        gen.add(4, "t = cuda.threadIdx.x", f"while t < {levels - 1}:")
        if not in_regs:
            gen.add(4, "    bs[t + 1] = boundaries[HEAP[t]]")  # heap order
        if norm_correction:
            gen.add(4, "    cs[t] = centroids[t]",
                    f"    if t == {levels - 2}:",
                    f"        cs[{levels - 1}] = centroids[{levels - 1}]")
        gen.add(4, f"    t += {T}")
    reg_bd = decide.register_boundaries(bits, decision) if in_regs else []
    # the decision boundaries live in registers for the whole kernel
    gen.add(4, *[f"{'bq' if scaled else 'bd'}{i} = boundaries[{j}]" for i, j in enumerate(reg_bd)])
    gen.prologue()
    gen.add(4, "n_rows = U64(norms.shape[0])", "total_out = U64(codes.shape[0])")
    sign = None
    if col_sign:  # every word this thread stages is of column tid % w_in: one sign (pair)
        gen.add(4, f"col = tid % U64({gen.w_in})")
        if half:
            gen.add(4, "sm = U32(U32(signs[U64(2) * col] < np.float32(0.0)) << U32(15)) | "
                       "U32(U32(signs[U64(2) * col + U64(1)] < np.float32(0.0)) << U32(31))")
            sign = "({a} ^ sm)"
        else:
            gen.add(4, "sgn = signs[col]")
            sign = "({a} * sgn)"
    else:
        gen.add(4, "t = tid",
                f"while t < U64({stored_dim}):",
                "    sg[t + (t >> U64(4))] = signs[t]",
                f"    t += U64({T})",
                "sb = U64(17) * p")
    gen.stage(sign)
    gen.first_phase_load("v")
    # ‖x‖: this thread's 16 coordinates in order, then the row's P partials in order
    gen.add(8, f"pb = r * U64({PP})")
    if scaled:  # fp16 squares are exact in float32: the sums in float32, rounded
        gen.add(8, "acc = np.float32(0.0)", *[f"acc += v{k} * v{k}" for k in range(rt.E)],
                f"pq = r * U64({PQ})", "part[pq + p] = acc", "cuda.syncthreads()",
                "acc = part[pq]", *[f"acc += part[pq + U64({q})]" for q in range(1, P)])
    else:
        gen.add(8, "acc = 0.0")
        for k in range(rt.E):
            gen.add(8, f"f = np.float64(v{k})", "acc += f * f")
        gen.add(8, "part[pb + p] = acc", "cuda.syncthreads()", "acc = part[pb]",
                *[f"acc += part[pb + U64({q})]" for q in range(1, P)])
    if scaled:  # a zero row transforms to 0 whatever the scale: compare it with the boundaries
        gen.add(8, "n = math.sqrt(acc)",  # float32: may differ by one ulp
                f"scf = n * np.float32({math.sqrt(stored_dim)!r}) if n > np.float32(0.0) "
                "else np.float32(1.0)",  # one float32 multiply per boundary and row
                *[f"bd{i} = bq{i} * scf" for i in range(len(reg_bd))])
    else:
        gen.add(8, "n = math.sqrt(acc)", "inv_n = 1.0 / n if n > 0.0 else 0.0")
    if not norm_correction:  # final norm: store it now (frees its registers for the decision)
        gen.add(8, f"row = tile * U64({R}) + r",
                "if p == U64(0) and row < n_rows:",
                "    norms[row] = n")
    first = [f"v{k}" for k in range(rt.E)]
    for k in range(rt.E):
        sg = "" if col_sign else f" * sg[sb + U64({k})]"
        if not scaled:
            gen.add(8, f"v{k} = np.float32(np.float64(v{k}) * inv_n){sg}")
        elif sg:
            gen.add(8, f"v{k} = v{k}{sg}")
    groups = gen.run_phases(first, False, pair_last=True, scale=not scaled)
    if groups is not None:  # the WHT result went back to the float tile: read 16 consecutive
        for k in range(rt.E):
            gen.add(8, f"v{k} = ft[fb + U64({rt.offset(k, gen.SH)})]")
    decide_lines = decide.LINES[decision]
    for k in range(rt.E):
        gen.add(8, *decide_lines(f"v{k}", f"c{k}", bits))
    if norm_correction:
        gen.add(8, "cn = 0.0")
        for k in range(rt.E):
            gen.add(8, f"f = np.float64(cs[c{k}])", "cn += f * f")
        gen.add(8, "part2[pb + p] = cn", "cuda.syncthreads()", "cn = part2[pb]")
        for q in range(1, P):
            gen.add(8, f"cn += part2[pb + U64({q})]")
        gen.add(8, "if cn > 0.0:", "    n = n / math.sqrt(cn)")
    # pack this thread's 16 codes (16·bits bits, LSB first) and stage them as uint16
    nw = (rt.E * bits + 31) // 32
    for w in range(nw):
        gen.add(8, f"o{w} = U32(0)")
    for k in range(rt.E):
        for lv in range(bits):
            pos = k * bits + lv
            w, s = pos >> 5, pos & 31
            if in_regs and not norm_correction:  # each decided bit straight into its word
                gen.add(8, f"o{w} |= (U32({1 << s}) if c{k}_{lv} else U32(0))")
            elif lv == 0:
                gen.add(8, f"o{w} |= U32(c{k} << U32({s}))" if s else f"o{w} |= c{k}")
                if s + bits > 32:
                    gen.add(8, f"o{w + 1} |= U32(c{k} >> U32({32 - s}))")
    gen.add(8, f"hb = r * U64({SC}) + U64({bits}) * p")
    for h in range(bits):
        gen.add(8, f"cst[hb + U64({h})] = np.uint16((o{h >> 1} >> U32({16 * (h & 1)})) & U32(65535))")
    if norm_correction:
        gen.add(8, f"row = tile * U64({R}) + r",
                "if p == U64(0) and row < n_rows:",
                "    norms[row] = n")
    gen.add(8, "cuda.syncthreads()")
    tile_out = R * w_out
    gen.add(8, f"g = tile * U64({tile_out}) + tid")
    for i in range(-(-tile_out // T)):
        ind = 8
        if (i + 1) * T > tile_out:
            gen.add(8, f"if tid < U64({tile_out - i * T}):")
            ind = 12
        gen.add(ind, f"w = tid + U64({i * T})", f"rr = w // U64({w_out})", f"c = w % U64({w_out})")
        if word_out:
            gen.add(ind, f"hh = rr * U64({SC}) + U64(2) * c",
                    "val = U32(cst[hh]) | (U32(cst[hh + U64(1)]) << U32(16))")
        else:
            gen.add(ind, f"hw = cst[rr * U64({SC}) + (c >> U64(1))]",
                    "val = np.uint8((U32(hw) >> U32(U64(8) * (c & U64(1)))) & U32(255))")
        gen.add(ind, f"if g + U64({i * T}) < total_out:", f"    codes[g + U64({i * T})] = val")
    gen.add(8, "tile = nxt")
    rt.launch_comment(L, R, threads, blocks)
    return Source("quantize_tiled", L, {"HEAP": decide.heap_order(bits)},
                  rt.launch_attrs(R, threads, blocks))
