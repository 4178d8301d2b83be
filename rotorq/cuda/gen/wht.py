"""Generated tiled orthonormal WHT (the skeleton of :mod:`rotorq.cuda.gen.row_tiles`).

Every butterfly pairs the same two coordinates, in the same stage order, as
:func:`rotorq.cpu.wht.fwht_row`, and the scale by ``1/sqrt(D)`` is the CPU's, so the kernel is
bit-identical to the CPU twin (fp16 output: the CPU's float32 result rounded once). Rows are
spread over consecutive threads with padded shared rows (:func:`row_tiles.padded_strides`):
for D = 128 every warp access to shared memory is one wavefront.
"""

from dataclasses import dataclass

from . import row_tiles as rt
from .build import Source, Spec, build

THREADS = rt.THREADS


@dataclass(frozen=True)
class WhtSpec(Spec):
    """Tiled orthonormal WHT of rows of ``stored_dim`` coordinates (a power of two, 16–512):
    ``(x, out)``, both flat (rows·words,) — uint32 fp16 pairs when half, else float32. Launch
    ``threads`` threads per block, any grid (blocks stride over tiles of
    :func:`row_tiles.rows_per_tile` rows)."""

    stored_dim: int
    half_in: bool
    half_out: bool
    threads: int = THREADS

    def generate(self):
        return _generate(self.stored_dim, self.half_in, self.half_out, self.threads)


def spec(stored_dim, half_in, half_out, threads=THREADS):
    """The :class:`WhtSpec` of one shape (``threads`` per block)."""
    return WhtSpec(int(stored_dim), bool(half_in), bool(half_out), int(threads))


def kernel(stored_dim, half_in, half_out, threads=THREADS):
    """The compiled kernel of :func:`spec` (:func:`rotorq.cuda.gen.build.build`)."""
    return build(spec(stored_dim, half_in, half_out, threads))


def _generate(stored_dim, half_in, half_out, threads):
    gen = rt.RowTiles(stored_dim, threads, half_in, stored_dim)
    phases = rt.phases(stored_dim)
    single = len(phases) == 1
    lo, hi = phases[-1]
    paired = half_out and not single and rt.E >> (hi - lo) >= 2
    via_ot = half_out and (single or paired)  # else fp16 pairs are read from the float tile
    rt.padded_strides(gen, paired)
    w_out = stored_dim // 2 if half_out else stored_dim
    if via_ot:
        gen.SO, gen.SHO = rt.pick_layout(w_out, lambda lay: rt.out_cost(gen, lay, paired))
    R, T = gen.R, threads
    L = gen.L
    L.append("def wht_tiled(x, out):")
    if half_in:
        gen.add(4, f"raw = cuda.shared.array({R * gen.SW}, numba.uint32)")
    gen.add(4, f"ft = cuda.shared.array({R * gen.S}, numba.float32)")
    if via_ot:
        gen.add(4, f"ot = cuda.shared.array({R * gen.SO}, numba.uint32)")
    gen.prologue()
    gen.add(4, "total_out = U64(out.shape[0])")
    if via_ot:
        gen.add(4, f"ro = r * U64({gen.SO})")
    gen.stage()
    first = [f"v{k}" for k in range(rt.E)]
    gen.first_phase_load("v")
    groups = gen.run_phases(first, "paired" if paired else (single and via_ot))
    if via_ot and single:  # 16 consecutive coordinates: 8 words
        gen.add(8, "q8 = U64(8) * p", f"ob = ro + q8 + (q8 >> U64({gen.SHO}))")
        for k in range(rt.E // 2):
            gen.add(8, f"ot[ob + U64({rt.offset(k, gen.SHO)})] = half_bits(v{2 * k}) | "
                       f"(half_bits(v{2 * k + 1}) << U32(16))")
    elif via_ot:
        for i in range(0, len(groups), 2):
            _, _, a, gb = groups[i]
            b = groups[i + 1][2]
            gen.add(8, f"cb = {gb} >> U64(1)", f"ob = ro + cb + (cb >> U64({gen.SHO}))")
            for k in range(len(a)):
                gen.add(8, f"ot[ob + U64({rt.offset(k << (lo - 1), gen.SHO)})] = half_bits({a[k]}) | "
                           f"(half_bits({b[k]}) << U32(16))")
    elif single:
        for k in range(rt.E):
            gen.add(8, f"ft[fb + U64({k})] = v{k}")
    gen.add(8, "cuda.syncthreads()")
    # store pass: consecutive threads store consecutive words of the tile
    tile_out = R * w_out
    gen.add(8, f"g = tile * U64({tile_out}) + tid")
    for i in range(-(-tile_out // T)):
        ind = 8
        if (i + 1) * T > tile_out:
            gen.add(8, f"if tid + U64({i * T}) < U64({tile_out}):")
            ind = 12
        gen.add(ind, f"w = tid + U64({i * T})", f"rr = w // U64({w_out})", f"c = w % U64({w_out})",
                f"if g + U64({i * T}) < total_out:")
        if via_ot:
            src = f"ot[rr * U64({gen.SO}) + c + (c >> U64({gen.SHO}))]"
        elif half_out:
            gen.add(ind + 4, f"fa = rr * U64({gen.S}) + U64(2) * c + ((U64(2) * c) >> U64({gen.SH}))")
            src = "half_bits(ft[fa]) | (half_bits(ft[fa + U64(1)]) << U32(16))"
        else:
            src = f"ft[rr * U64({gen.S}) + c + (c >> U64({gen.SH}))]"
        gen.add(ind + 4, f"out[g + U64({i * T})] = {src}")
    if not half_in and not via_ot:
        gen.add(8, "cuda.syncthreads()")  # the next staging overwrites the float tile
    gen.add(8, "tile = nxt")
    blocks = (5 if half_out else 4) if half_in else 3  # fp32 input: 16 prefetched words
    rt.launch_comment(L, R, threads, blocks)
    return Source("wht_tiled", L, attrs=rt.launch_attrs(R, threads, blocks))

