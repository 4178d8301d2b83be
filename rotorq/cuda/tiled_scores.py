"""Tiled MSE score kernels: codes staged through shared memory with coalesced loads.

Both kernels run a persistent grid over tiles of ``K`` keys of one key batch. The tile's code
words are one contiguous range of the flat (Bk·N·W,) uint32 code array: consecutive threads load
consecutive words (each warp load is a full 128-byte line), prefetched into registers one
tile ahead, and stored into a shared tile whose rows are padded (stride ``S`` words, picked by
a bank model) so that the reads of the scoring phase are conflict-free.

* :func:`one_query_kernel` (one query row): a per-block table of sums over groups of ``G``
  adjacent coordinates, ``T[p][e] = Σ_j q[G·p + j]·c[(e >> j·bits) & (L−1)]``. The
  ``G·bits``-bit field of adjacent codes is the table index, so a thread (one key) costs per
  group one field extraction, one shared load and one add. The lookups are random, so a
  group's table is kept within 128 bytes (the 32 banks' width): then a warp's lookup is one
  shared-memory wavefront; a 64-entry float32 table spans each bank twice and costs two, and
  these lookups, not the code bytes, bound the kernel (:func:`table_plan`). 2 bits: float32
  tables of coordinate pairs (16 entries); 4 bits: float32 per coordinate (16 entries); 3 bits:
  **float16** tables of coordinate pairs (64 entries, read with 16-bit loads) of the query
  scaled by ``1/max|q|`` — scores within ~1e-3 of the float32 path relative to the largest
  score (as :func:`group_kernel`); float32 tables are within 2e-5 (sums in another order than
  the CPU's). :func:`tolerance` says which.
* :func:`group_kernel` (2–8 query rows, e.g. a GQA group of 8 heads sharing one KV head):
  tensor cores. Each warp takes 16 keys per step: ``Sᵀ (16 keys × 8 rows) = K (16 × D) · Qᵀ``
  with ``mma.m16n8k16`` (fp16 inputs, fp32 accumulation), as in
  :func:`rotorq.cuda.attention.attention_kernel`: lane ``(g, t)`` owns the contiguous
  coordinates ``[t·D/4, (t+1)·D/4)`` of keys ``g`` and ``g+8`` (the MMA's k-index is permuted to
  match) and builds its A fragment from a shared table of ``half2(c[a], c[b])`` pairs — one
  field extraction and one shared load per two coordinates for all 8 query rows, ~0.25
  instructions per (key, coordinate, row) instead of ~1.75. Query rows are scaled by ``1/max|q|``
  before rounding to fp16 (and the scores scaled back), so neither range nor subnormals limit
  precision. Error: fp16 rounding of the centroids and of the scaled queries (relative 2^-12
  each, summed in float32), measured max |Δ| / max |score| ≈ 2–4e-4 for D = 128 (tests allow
  1e-3). Without warp shuffles; under the simulator the MMA is emulated through shared memory
  (:func:`rotorq.cuda.attention.mma_sim`).

:mod:`rotorq.cuda.api` uses these kernels from ``FAST_MIN_KEYS`` keys when ``TILED_SCORES`` is
on (default; ``ROTORQ_CUDA_TILED_SCORES=0`` selects the kernels of :mod:`rotorq.cuda.fast`).
"""

import functools

import numpy as np

from ._jit import SIMULATOR
from .attention import _field, and32, fshr32, half_bits, half_float, or32, shl32, shr32
from .fast import _build

if SIMULATOR:
    from .attention import mma_sim as _mma
else:
    from .attention import mma16816 as _mma

THREADS = 128
"""Threads per block of :func:`group_kernel`."""
ONE_THREADS = {2: 256, 3: 256, 4: 128}
"""Threads per block of :func:`one_query_kernel` by bits. Blocks of 256 threads (then 3 per
SM) build half as many tables per SM as blocks of 128 (6 per SM): for 2^20 keys on an H200 3
bits took 27.9 instead of 30.3 µs, 2 bits 21.8 instead of 22.0, 4 bits 37.9 instead of 36.2
(``benchmarks/gpu_score_tables.py``)."""
WARPS = THREADS // 32
"""Warps per block of :func:`group_kernel`."""
STEPS = 2
"""16-key steps per warp and tile of :func:`group_kernel` (independent MMA chains)."""
BLOCKS_PER_SM = 6
"""Resident blocks of 128 threads per SM the launch bounds of :func:`one_query_kernel` allow
for D > 128 (at most 80 registers per thread); blocks of other sizes keep the same threads
per SM."""
BLOCKS_PER_SM_SMALL = 8
"""Same for D ≤ 128: at most 64 registers per thread, which ptxas fits without spills there
(2–4 bits; the loop over tiles keeps its instruction count), so a third more warps hide the
latency of the lookups; at D = 256 they spill. H200, D = 128, against 6 (same run): 2^22
keys 85.1 instead of 88.4 µs at 3 bits, 70.4 / 71.6 at 2, 123.2 / 126.1 at 4; 2^20 keys
within 0.4 µs either way (28.2 / 28.0 at 3 bits)."""
GROUP_BLOCKS_PER_SM = 5
"""Same for :func:`group_kernel` (at most 96 registers: the 16 query fragment registers, 2×4
accumulators and the prefetched words fit without spills)."""
TABLE_ROW_BYTES = 128
"""Largest table of one coordinate group of :func:`one_query_kernel`: random lookups into it
are one shared-memory wavefront per warp (32 banks × 4 bytes)."""
MAX_ROWS = 8
"""Query rows per pass of :func:`group_kernel` (the MMA's N)."""

_kernels: dict = {}


def table_plan(big_d, bits):
    """``(G, half)`` of :func:`one_query_kernel`: coordinates per table lookup and whether its
    tables are float16. The largest ``G`` (dividing ``big_d``) whose group table fits 128 bytes
    in float32 (one wavefront per warp lookup), unless float16 entries fit a larger ``G``
    there: 2 bits → (2, False), 3 bits → (2, True), 4 bits → (1, False). (0, False) where none
    fits."""
    best = (0, False)
    for half, size in ((False, 4), (True, 2)):
        for g in (4, 3, 2, 1):
            if g * bits <= 8 and big_d % g == 0 and (size << (g * bits)) <= TABLE_ROW_BYTES:
                if g > best[0]:
                    best = (g, half)
                break
    return best


def group_size(big_d, bits):
    """Coordinates per table lookup of :func:`one_query_kernel` (4, 3, 2 or 1; 0: none)."""
    return table_plan(big_d, bits)[0]


STATIC_SHARED = 48 * 1024
"""Static shared memory a kernel may declare (more needs a dynamic opt-in)."""


def _one_shared_bytes(big_d, bits, threads, plan):
    """Static shared memory of :func:`one_query_kernel` for ``threads`` and ``plan``."""
    g, half = plan
    w = big_d * bits // 32
    stride = _pick_stride(w, lambda s: [[t * s + k for t in range(32)] for k in range(w)])
    table = (big_d // g) * (2 if half else 4) << (g * bits)
    reduce = 4 * (threads + min(32, threads)) if half else 0
    return table + 4 * (threads * stride + (1 << bits) + big_d) + reduce


@functools.cache
def one_query_config(big_d, bits):
    """``(threads, (G, half))`` of :func:`one_query_kernel` for this shape: :func:`table_plan`
    in blocks of :data:`ONE_THREADS`, else in blocks of 128 threads, else smaller float32
    tables — the first whose shared memory fits :data:`STATIC_SHARED`; None when none does."""
    first = table_plan(big_d, bits)
    plans = [first] + [(g, False) for g in (2, 1) if g < first[0] or first[1]]
    for plan in plans:
        g = plan[0]
        if not g or g * bits > 8 or big_d % g:
            continue
        for threads in dict.fromkeys((ONE_THREADS.get(bits, THREADS), THREADS)):
            if _one_shared_bytes(big_d, bits, threads, plan) <= STATIC_SHARED:
                return threads, plan
    return None


def tolerance(big_d, bits, n_m):
    """Largest error of the tiled kernels' scores, relative to the largest score, against the
    float32 CPU path: 2e-5 for float32 tables, 1e-3 for float16 ones and tensor cores."""
    if n_m == 1 and not (one_query_config(big_d, bits) or (0, (0, False)))[1][1]:
        return 2e-5
    return 1e-3


def applies(big_d, bits, n_m):
    """Whether a tiled kernel scores ``n_m`` query rows of stored dimension ``big_d``."""
    if not 2 <= bits <= 4 or big_d > 512 or big_d * bits % 32:
        return False
    if n_m == 1:
        return one_query_config(big_d, bits) is not None
    return n_m >= 2 and big_d % 16 == 0 and big_d * bits % 128 == 0


def _wavefronts(addrs):
    banks: dict = {}
    for a in addrs:
        banks.setdefault(a % 32, set()).add(a)
    return max(len(v) for v in banks.values())


def _pick_stride(words, lane_addrs):
    """Row stride (words, ≥ ``words``) of the shared code tile with the fewest wavefronts of
    the reads ``lane_addrs(stride)`` (a list of warp accesses), then the smallest."""
    return min(range(words, words + 16),
               key=lambda s: (sum(_wavefronts(a) for a in lane_addrs(s)), s))


def _stage_lines(gen_w, threads, keys, stride):
    """Source of the tile prologue / staging (``cw``: the key batch's flat code words)."""
    tile_words = keys * gen_w
    loads = -(-tile_words // threads)

    def fetch(ind, tile):
        # unsigned indices: Numba's signed ones wrap negative values (a select per load)
        # words of this thread left in the batch, clamped to the tile: one 32-bit compare
        # per load instead of a 64-bit add and compare
        out = [f"{ind}g0 = cb + U64({tile}) * U64({tile_words}) + U64(tid)",
               f"{ind}rm = U32(min(lim - g0, U64({tile_words}))) if g0 < lim else U32(0)"]
        for i in range(loads):
            gi = f"g0 + U64({i * threads})" if i else "g0"
            out.append(f"{ind}a{i} = cw[{gi}] if U32({i * threads}) < rm else U32(0)")
        return out

    def store(ind):
        out = []
        for i in range(loads):
            sub = ind
            if (i + 1) * threads > tile_words:
                out.append(f"{ind}if tid + {i * threads} < {tile_words}:")
                sub = ind + "    "
            out += [f"{sub}w = tid + {i * threads}",
                    f"{sub}ct[(w // {gen_w}) * {stride} + w % {gen_w}] = a{i}"]
        return out
    return fetch, store


def _batch_loop(first_tile):
    """Source of the grid-stride loop over output batches: their query and key batches,
    then ``first_tile`` (the first tile's prefetch, when issued before the setup)."""
    return ["    b = cuda.blockIdx.y",
            "    while b < n_b:",
            "        qb = qmap[b]",
            "        kb = kmap[b]"] + first_tile


def _first_tile(fetch):
    """Source of the prefetch of a block's first tile (``tile``, ``cb``, ``lim``, ``a*``)."""
    return (["        tile = cuda.blockIdx.x",
             "        cb = U64(kb) * U64(total)", "        lim = cb + U64(total)"]
            + fetch("        ", "tile"))


def one_query_kernel(big_d, bits, threads=None, plan=None, early=True, per_sm=None):
    """Score kernel of one query row: ``(qrot f32 (Bq, M, D), qmap i64 (B,), cw u32 (Bk·N·W,),
    norms f32 (Bk, N), kmap i64 (B,), centroids f32 (L,), out f32 (B, 1, N))``.

    Grid: x strides over tiles of ``threads`` keys (one key per thread; default
    :data:`ONE_THREADS`), y over output batches. ``plan``: ``(G, half)`` instead of
    :func:`table_plan`'s; ``early``: issue the loads of the block's first code tile before
    the table build, which then hides their latency (benchmarks compare both); ``per_sm``:
    resident blocks of 128 threads per SM the launch bounds allow instead of
    :data:`BLOCKS_PER_SM_SMALL` (D ≤ 128) or :data:`BLOCKS_PER_SM`. See the module docstring.
    """
    key = ("one", big_d, bits, threads, plan, early, per_sm)  # looked up on every call
    if key in _kernels:
        return _kernels[key]
    default = one_query_config(big_d, bits) or (THREADS, table_plan(big_d, bits))
    threads = threads or default[0]
    G, half = plan or default[1]
    gb = G * bits
    groups = big_d // G
    size = groups << gb
    levels = 1 << bits
    W = big_d * bits // 32
    S = _pick_stride(W, lambda s: [[t * s + w for t in range(32)] for w in range(W)])
    parts = 4
    red = min(32, threads)
    per_sm = per_sm or (BLOCKS_PER_SM_SMALL if big_d <= 128 else BLOCKS_PER_SM)
    blocks = max(1, min(32, per_sm * THREADS // threads))  # same registers per thread
    fetch, store = _stage_lines(W, threads, threads, S)
    L = ["def score_one_tiled(qrot, qmap, cw, norms, kmap, centroids, out):",
         f"    tab = cuda.shared.array(({groups}, {1 << gb}), "
         f"numba.{'uint16' if half else 'float32'})",
         f"    ct = cuda.shared.array({threads * S}, numba.uint32)",
         f"    cs = cuda.shared.array({levels}, numba.float32)",
         f"    qs = cuda.shared.array({big_d}, numba.float32)"]
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
    first_tile = _first_tile(fetch)
    L += _batch_loop(first_tile if early else [])
    L += ["        cuda.syncthreads()",  # cs ready; the previous batch's table no longer read
          # the query row in shared memory first: the table loop then waits on no global load
          "        t = tid",
          "        m = np.float32(0.0)",
          f"        while t < {big_d}:",
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
    kern = _build("score_one_tiled", L, {"U64": np.uint64, "U16": np.uint16,
                                          "half_bits": half_bits, "half_float": half_float})
    kern.keys_per_tile = threads
    kern.threads = threads
    kern.launch_bounds = (threads, blocks)
    kern.table_group = G
    kern.table_half = half
    _kernels[key] = kern
    return kern


def group_kernel(big_d, bits, warps=WARPS, steps=STEPS, early=False):
    """Tensor-core score kernel of 2–8 query rows per pass: ``(qrot f32 (Bq, M, D), qmap i64
    (B,), cw u32 (Bk·N·W,), norms f32 (Bk, N), kmap i64 (B,), centroids f32 (L,), out f32
    (B, M, N))``.

    Grid: x strides over tiles of ``16·warps·steps`` keys, y over output batches, z over
    chunks of 8 query rows; ``32·warps`` threads; ``early`` as in :func:`one_query_kernel`
    (off: measured 0.2–1.2 µs slower at 2^20–2^22 keys on an H200). See the module docstring.
    """
    key = ("group", big_d, bits, warps, steps, early)
    if key in _kernels:
        return _kernels[key]
    threads = 32 * warps
    keys = 16 * warps * steps
    W = big_d * bits // 32
    KW = W // 4  # words per lane and key
    chunks = big_d // 16
    l2 = 1 << (2 * bits)
    lmask = (1 << bits) - 1

    def reads(s):
        out = []
        for w in range(KW):
            for half in (0, 8):
                out.append([(ln // 4 + half) * s + (ln % 4) * KW + w for ln in range(32)])
        return out

    S = _pick_stride(W, reads)
    fetch, store = _stage_lines(W, threads, keys, S)
    sim = SIMULATOR
    L = ["def score_group_tiled(qrot, qmap, cw, norms, kmap, centroids, out):",
         f"    tabk = cuda.shared.array({l2}, numba.uint32)",
         f"    ct = cuda.shared.array({keys * S}, numba.uint32)",
         f"    qm = cuda.shared.array({MAX_ROWS}, numba.float32)",
         f"    qsh = cuda.shared.array(({MAX_ROWS}, {big_d}), numba.float32)",
         f"    part = cuda.shared.array(({MAX_ROWS}, 16), numba.float32)"]
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
          f"    first = cuda.blockIdx.z * {MAX_ROWS}",
          f"    count = min({MAX_ROWS}, n_m - first)",
          "    e = tid",
          f"    while e < {l2}:",
          f"        tabk[e] = half_bits(centroids[e & {lmask}]) | "
          f"(half_bits(centroids[e >> {bits}]) << U32(16))",
          f"        e += {threads}"]
    first_tile = _first_tile(fetch)
    L += _batch_loop(first_tile if early else [])
    L += ["        cuda.syncthreads()",
          # the chunk's query rows in shared memory (coalesced, zeros past count), then
          # max|q| per row in 16 partial maxima: no serial chain of global loads per launch
          "        e = tid",
          f"        while e < {MAX_ROWS * big_d}:",
          f"            r = e // {big_d}",
          f"            k = e % {big_d}",
          "            qsh[r, k] = qrot[qb, first + r, k] if r < count else np.float32(0.0)",
          f"            e += {threads}",
          "        cuda.syncthreads()",
          "        e = tid",
          f"        while e < {MAX_ROWS * 16}:",
          "            r = e >> 4",
          "            m = np.float32(0.0)",
          f"            for k in range(e & 15, {big_d}, 16):",
          "                m = max(m, abs(qsh[r, k]))",
          "            part[r, e & 15] = m",
          f"            e += {threads}",
          "        cuda.syncthreads()",
          f"        if tid < {MAX_ROWS}:",
          "            m = np.float32(0.0)",
          "            for k in range(16):",
          "                m = max(m, part[tid, k])",
          "            qm[tid] = m",
          "        cuda.syncthreads()",
          "        mg = qm[g]",
          "        sg = np.float32(1.0) / mg if mg > np.float32(0.0) else np.float32(0.0)",
          "        qr = min(g, count - 1)",
          f"        qo = t * {big_d // 4}",
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
            a = [f"tabk[{_field(f'ka{st}_', p0, 2 * bits)}]",
                 f"tabk[{_field(f'kb{st}_', p0, 2 * bits)}]",
                 f"tabk[{_field(f'ka{st}_', p1, 2 * bits)}]",
                 f"tabk[{_field(f'kb{st}_', p1, 2 * bits)}]"]
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
          f"# launch bounds ({threads}, {GROUP_BLOCKS_PER_SM})"]
    kern = _build("score_group_tiled", L, {"mma_k": _mma, "half_bits": half_bits,
                                            "shr32": shr32, "shl32": shl32, "and32": and32,
                                            "or32": or32, "fshr32": fshr32, "U64": np.uint64})
    kern.keys_per_tile = keys
    kern.threads = threads
    kern.launch_bounds = (threads, GROUP_BLOCKS_PER_SM)
    _kernels[key] = kern
    return kern
