"""Generated tensor-core score kernel of 2–8 query rows per pass (e.g. a GQA group).

See :mod:`.score_tiles`. Each warp takes 16 keys per step: ``Sᵀ (16 keys × 8 rows) = K (16 × D)
· Qᵀ`` with ``mma.m16n8k16`` (fp16 inputs, fp32 accumulation); the A fragment is built from a
shared table of ``half2(c[a], c[b])`` centroid pairs, one field and one lookup per two
coordinates for all 8 rows.
"""

from dataclasses import dataclass

from .._jit import SIMULATOR
from . import intrinsics
from . import score_tiles as sct
from .build import Source, Spec, build
from .fields import field32


@dataclass(frozen=True)
class GroupSpec(Spec):
    """Tensor-core score kernel of 2–8 query rows per pass: ``(qrot f32 (Bq, M, D), qmap i64
    (B,), cw u32 (Bk·N·W,), norms f32 (Bk, N), kmap i64 (B,), centroids f32 (L,), out f32
    (B, M, N))``.

    Grid: x strides over tiles of ``16·warps·steps`` keys, y over output batches, z over
    chunks of 8 query rows; ``32·warps`` threads; ``early`` as in :class:`.scores_one.OneQuerySpec`
    (off by default: it measured slower, benchmarks/RESULTS.md, "One-query score kernel:
    table plans against the shared-memory model").
    """

    stored_dim: int
    bits: int
    warps: int = sct.WARPS
    steps: int = sct.STEPS
    early: bool = False

    def generate(self):
        return _generate(self.stored_dim, self.bits, self.warps, self.steps, self.early)


def spec(stored_dim, bits, warps=sct.WARPS, steps=sct.STEPS, early=False):
    """The :class:`GroupSpec` of a shape."""
    return GroupSpec(int(stored_dim), int(bits), int(warps), int(steps), bool(early))


def kernel(stored_dim, bits, warps=sct.WARPS, steps=sct.STEPS, early=False):
    """The compiled kernel of :func:`spec`."""
    return build(spec(stored_dim, bits, warps, steps, early))


def _generate(stored_dim, bits, warps, steps, early):
    threads = 32 * warps
    keys = 16 * warps * steps
    W = stored_dim * bits // 32
    KW = W // 4  # words per lane and key
    chunks = stored_dim // 16
    l2 = 1 << (2 * bits)
    lmask = (1 << bits) - 1

    def reads(s):
        out = []
        for w in range(KW):
            for half in (0, 8):
                out.append([(ln // 4 + half) * s + (ln % 4) * KW + w for ln in range(32)])
        return out

    S = sct.pick_stride(W, reads)
    fetch, store = sct.stage_lines(W, threads, keys, S)
    sim = SIMULATOR
    L = ["def score_group_tiled(qrot, qmap, cw, norms, kmap, centroids, out):",
         f"    tabk = cuda.shared.array({l2}, numba.uint32)",
         f"    ct = cuda.shared.array({keys * S}, numba.uint32)",
         f"    qm = cuda.shared.array({sct.MAX_ROWS}, numba.float32)",
         f"    qsh = cuda.shared.array(({sct.MAX_ROWS}, {stored_dim}), numba.float32)",
         f"    part = cuda.shared.array(({sct.MAX_ROWS}, 16), numba.float32)"]
    if sim:
        L += [f"    sa = cuda.shared.array({threads * 4}, numba.uint32)",
              f"    sb = cuda.shared.array({threads * 2}, numba.uint32)"]
    L += ["    tid = cuda.threadIdx.x",
          "    lane = tid & 31",
          "    warp = tid >> 5",
          "    g = lane >> 2",
          "    t = lane & 3",
          "    n_b, n_m, n_keys = out.shape",
          f"    total = n_keys * {W}",
          f"    n_tiles = (n_keys + {keys - 1}) // {keys}",
          f"    first = cuda.blockIdx.z * {sct.MAX_ROWS}",
          f"    count = min({sct.MAX_ROWS}, n_m - first)",
          "    e = tid",
          f"    while e < {l2}:",
          f"        tabk[e] = half_bits(centroids[e & {lmask}]) | "
          f"(half_bits(centroids[e >> {bits}]) << U32(16))",
          f"        e += {threads}"]
    first_tile = sct.first_tile(fetch)
    L += sct.batch_loop(first_tile if early else [])
    L += ["        cuda.syncthreads()",
          # the chunk's query rows in shared memory (coalesced, zeros past count), then
          # max|q| per row in 16 partial maxima: no serial chain of global loads per launch
          "        e = tid",
          f"        while e < {sct.MAX_ROWS * stored_dim}:",
          f"            r = e // {stored_dim}",
          f"            k = e % {stored_dim}",
          "            qsh[r, k] = qrot[qb, first + r, k] if r < count else np.float32(0.0)",
          f"            e += {threads}",
          "        cuda.syncthreads()",
          "        e = tid",
          f"        while e < {sct.MAX_ROWS * 16}:",
          "            r = e >> 4",
          "            m = np.float32(0.0)",
          f"            for k in range(e & 15, {stored_dim}, 16):",
          "                m = max(m, abs(qsh[r, k]))",
          "            part[r, e & 15] = m",
          f"            e += {threads}",
          "        cuda.syncthreads()",
          f"        if tid < {sct.MAX_ROWS}:",
          "            m = np.float32(0.0)",
          "            for k in range(16):",
          "                m = max(m, part[tid, k])",
          "            qm[tid] = m",
          "        cuda.syncthreads()",
          "        mg = qm[g]",
          "        sg = np.float32(1.0) / mg if mg > np.float32(0.0) else np.float32(0.0)",
          "        qr = min(g, count - 1)",
          f"        qo = t * {stored_dim // 4}",
          "        ma = qm[2 * t]",
          "        mb = qm[2 * t + 1]",
          "        ra = first + 2 * t",
          "        rb_ = ra + 1"]
    for c in range(chunks):
        for h in range(2):
            o = 4 * c + 2 * h
            L.append(f"        qb{c}_{h} = half_bits(sg * qsh[qr, qo + {o}]) | "
                     f"(half_bits(sg * qsh[qr, qo + {o + 1}]) << U32(16))")
    if not early:
        L += first_tile
    L += ["        while tile < n_tiles:"]
    L += store("            ")
    L += ["            cuda.syncthreads()",
          "            nxt = tile + cuda.gridDim.x"]
    L += fetch("            ", "nxt")
    ind = " " * 12
    for st in range(steps):
        L += [f"{ind}kr = warp * {16 * steps} + {16 * st} + g",
              f"{ind}ba = kr * {S} + t * {KW}",
              f"{ind}bb = ba + {8 * S}"]
        for w in range(KW):
            L += [f"{ind}ka{st}_{w} = ct[ba + {w}]", f"{ind}kb{st}_{w} = ct[bb + {w}]"]
        L += [f"{ind}c{st}_{i} = np.float32(0.0)" for i in range(4)]
    for c in range(chunks):
        p0, p1 = 4 * c * bits, (4 * c + 2) * bits
        for st in range(steps):
            a = [f"tabk[{field32(f'ka{st}_', p0, 2 * bits)}]",
                 f"tabk[{field32(f'kb{st}_', p0, 2 * bits)}]",
                 f"tabk[{field32(f'ka{st}_', p1, 2 * bits)}]",
                 f"tabk[{field32(f'kb{st}_', p1, 2 * bits)}]"]
            acc = ", ".join(f"c{st}_{i}" for i in range(4))
            call = "mma_k(sa, sb, " if sim else "mma_k("
            L.append(f"{ind}{acc} = {call}{', '.join(a)}, qb{c}_0, qb{c}_1, {acc})")
    for st in range(steps):
        L += [f"{ind}ja = tile * {keys} + warp * {16 * steps} + {16 * st} + g",
              f"{ind}jb = ja + 8",
              f"{ind}if ja < n_keys:",
              f"{ind}    na = np.float32(norms[kb, ja])",
              f"{ind}    if 2 * t < count:",
              f"{ind}        out[b, ra, ja] = c{st}_0 * (na * ma)",
              f"{ind}    if 2 * t + 1 < count:",
              f"{ind}        out[b, rb_, ja] = c{st}_1 * (na * mb)",
              f"{ind}if jb < n_keys:",
              f"{ind}    nb = np.float32(norms[kb, jb])",
              f"{ind}    if 2 * t < count:",
              f"{ind}        out[b, ra, jb] = c{st}_2 * (nb * ma)",
              f"{ind}    if 2 * t + 1 < count:",
              f"{ind}        out[b, rb_, jb] = c{st}_3 * (nb * mb)"]
    L += ["            cuda.syncthreads()",
          "            tile = nxt",
          "        b += cuda.gridDim.y",
          f"# launch bounds ({threads}, {sct.GROUP_BLOCKS_PER_SM})"]
    return Source("score_group_tiled", L, {"mma_k": intrinsics.mma}, {
        "keys_per_tile": keys, "threads": threads,
        "launch_bounds": (threads, sct.GROUP_BLOCKS_PER_SM)})
