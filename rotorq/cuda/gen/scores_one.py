"""Generated tiled score kernel of one query row (lookup tables of query × centroid sums).

See :mod:`.score_tiles` for the code staging and the table plans. Each thread scores one key:
per group of ``G`` adjacent coordinates one field of the key's codes (64-bit code words, so
every field is one funnel shift and one AND), one shared-memory table lookup and one add.
"""

from dataclasses import dataclass

from . import score_tiles as sct
from .build import Source, Spec, build


@dataclass(frozen=True)
class OneQuerySpec(Spec):
    """Score kernel of one query row: ``(qrot f32 (Bq, M, D), qmap i64 (B,), cw u32 (Bk·N·W,),
    norms f32 (Bk, N), kmap i64 (B,), centroids f32 (L,), out f32 (B, 1, N))``.

    Grid: x strides over tiles of ``threads`` keys (one key per thread), y over output
    batches. ``group``, ``half_table``: the table plan (coordinates per lookup, float16
    entries); ``early``: issue the loads of the block's first code tile before the table
    build, which then hides their latency; ``per_sm``: resident blocks of 128 threads per SM
    the launch bounds allow (blocks of other sizes keep the same threads per SM).
    """

    stored_dim: int
    bits: int
    threads: int
    group: int
    half_table: bool
    early: bool
    per_sm: int

    def generate(self):
        return _generate(self.stored_dim, self.bits, self.threads, (self.group, self.half_table),
                         self.early, self.per_sm)


def spec(stored_dim, bits, threads=None, plan=None, early=True, per_sm=None):
    """The :class:`OneQuerySpec` of a shape: by default the threads and plan of
    :func:`.score_tiles.one_query_config` (else :data:`.score_tiles.THREADS` and
    :func:`.score_tiles.table_plan`), and :data:`.score_tiles.BLOCKS_PER_SM_SMALL` resident
    blocks per SM for D ≤ 128, else :data:`.score_tiles.BLOCKS_PER_SM`."""
    default = sct.one_query_config(stored_dim, bits) or (sct.THREADS,
                                                         sct.table_plan(stored_dim, bits))
    g, half = plan or default[1]
    per_sm = per_sm or (sct.BLOCKS_PER_SM_SMALL if stored_dim <= 128 else sct.BLOCKS_PER_SM)
    return OneQuerySpec(int(stored_dim), int(bits), int(threads or default[0]), int(g),
                        bool(half), bool(early), int(per_sm))


def kernel(stored_dim, bits, threads=None, plan=None, early=True, per_sm=None):
    """The compiled kernel of :func:`spec`."""
    return build(spec(stored_dim, bits, threads, plan, early, per_sm))


def _generate(stored_dim, bits, threads, plan, early, per_sm):
    G, half = plan
    gb = G * bits
    groups = stored_dim // G
    size = groups << gb
    levels = 1 << bits
    W = stored_dim * bits // 32
    S = sct.pick_stride(W, lambda s: [[t * s + w for t in range(32)] for w in range(W)])
    parts = 4
    red = min(32, threads)
    blocks = max(1, min(32, per_sm * sct.THREADS // threads))  # same registers per thread
    fetch, store = sct.stage_lines(W, threads, threads, S)
    L = ["def score_one_tiled(qrot, qmap, cw, norms, kmap, centroids, out):",
         f"    tab = cuda.shared.array(({groups}, {1 << gb}), "
         f"numba.{'uint16' if half else 'float32'})",
         f"    ct = cuda.shared.array({threads * S}, numba.uint32)",
         f"    cs = cuda.shared.array({levels}, numba.float32)",
         f"    qs = cuda.shared.array({stored_dim}, numba.float32)"]
    if half:
        L += [f"    part = cuda.shared.array({threads}, numba.float32)",
              f"    part2 = cuda.shared.array({red}, numba.float32)"]
    L += ["    tid = cuda.threadIdx.x",
          "    n_b = out.shape[0]",
          "    n_keys = out.shape[2]",
          f"    total = n_keys * {W}",
          f"    n_tiles = (n_keys + {threads - 1}) // {threads}",
          "    t = tid",
          f"    while t < {levels}:",
          "        cs[t] = centroids[t]",
          f"        t += {threads}"]
    first_tile = sct.first_tile(fetch)
    L += sct.batch_loop(first_tile if early else [])
    L += ["        cuda.syncthreads()",  # cs ready; the previous batch's table no longer read
          # the query row in shared memory first: the table loop then waits on no global load
          "        t = tid",
          "        m = np.float32(0.0)",
          f"        while t < {stored_dim}:",
          "            v = qrot[qb, 0, t]",
          "            qs[t] = v",
          "            m = max(m, abs(v))",
          f"            t += {threads}"]
    if half:
        # max|q| of the row (two shared stages), so that the float16 entries are at most G
        # in magnitude (|c| ≤ 1) whatever the query's scale
        L += ["        part[tid] = m",
              "        cuda.syncthreads()",
              f"        if tid < {red}:",
              "            m = part[tid]",
              f"            for k in range(tid + {red}, {threads}, {red}):",
              "                m = max(m, part[k])",
              "            part2[tid] = m",
              "        cuda.syncthreads()",
              "        m = part2[0]",
              f"        for k in range(1, {red}):",
              "            m = max(m, part2[k])",
              "        sq = np.float32(1.0) / m if m > np.float32(0.0) else np.float32(0.0)"]
    else:
        L += ["        cuda.syncthreads()"]

    def qv(j):
        return f"(qs[{G} * p + {j}] * sq)" if half else f"qs[{G} * p + {j}]"

    entry = "U16(half_bits(v))" if half else "v"
    per = 1 << gb
    if threads % per == 0 and groups % (threads // per) == 0:
        # a thread's entries share their column (its centroids, scaled once) across groups
        rows = threads // per
        L += [f"        col = tid & {per - 1}",
              f"        p = tid >> {gb}"]
        for j in range(G):
            c = f"cs[(col >> {j * bits}) & {levels - 1}]"
            L.append(f"        c{j} = {c} * sq" if half else f"        c{j} = {c}")
        L += [f"        for i in range({groups // rows}):",
              f"            v = qs[{G} * p] * c0"]
        L += [f"            v += qs[{G} * p + {j}] * c{j}" for j in range(1, G)]
        L += [f"            tab[p, col] = {entry}",
              f"            p += {rows}"]
    else:
        L += ["        e = tid",
              f"        while e < {size}:",
              f"            p = e >> {gb}",
              f"            v = {qv(0)} * cs[e & {levels - 1}]"]
        for j in range(1, G):
            L.append(f"            v += {qv(j)} * cs[(e >> {j * bits}) & {levels - 1}]")
        L += [f"            tab[p, e & {per - 1}] = {entry}",
              f"            e += {threads}"]
    if not early:
        L += first_tile
    L += ["        while tile < n_tiles:"]
    L += store("            ")
    L += ["            cuda.syncthreads()",
          "            nxt = tile + cuda.gridDim.x"]
    L += fetch("            ", "nxt")
    L += [f"            j = tile * {threads} + tid",
          "            if j < n_keys:",
          f"                rb = U32(tid) * U32({S})"]
    ind = " " * 16
    for w in range(W):
        L.append(f"{ind}r{w} = ct[rb + U32({w})]")
    for p in range(parts):
        L.append(f"{ind}s{p} = np.float32(0.0)")
    # 64-bit words: every field is one funnel shift and one AND, and the table row's offset
    # (a constant) folds into the shared load's immediate address
    for k in range(W // 2):
        L.append(f"{ind}q{k} = U64(r{2 * k}) | (U64(r{2 * k + 1}) << U64(32))")
    if W % 2:
        L.append(f"{ind}q{W // 2} = U64(r{W - 1})")
    fmask = (1 << gb) - 1
    for p in range(groups):
        k, sh = divmod(p * gb, 64)
        f = f"(q{k} >> U64({sh}))"
        if sh + gb > 64:
            f = f"({f} | (q{k + 1} << U64({64 - sh})))"
        look = f"tab[{p}, {f} & U64({fmask})]"
        L.append(f"{ind}s{p % parts} += {f'half_float({look})' if half else look}")
    scale = " * m" if half else ""
    L += [f"{ind}out[b, 0, j] = (np.float32(norms[kb, j]){scale}) * ((s0 + s1) + (s2 + s3))",
          "            cuda.syncthreads()",
          "            tile = nxt",
          "        b += cuda.gridDim.y",
          f"# launch bounds ({threads}, {blocks})"]
    return Source("score_one_tiled", L, attrs={
        "keys_per_tile": threads, "threads": threads, "launch_bounds": (threads, blocks),
        "table_group": G, "table_half": half})
