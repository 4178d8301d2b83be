"""What the tiled MSE score kernels share: the shapes they take, their table plans and the
source of the code staging (codes through shared memory with coalesced loads).

Both kernels run a persistent grid over tiles of ``K`` keys of one key batch. The tile's code
words are one contiguous range of the flat (Bk·N·W,) uint32 code array: consecutive threads load
consecutive words (each warp load is a full 128-byte line), prefetched into registers one
tile ahead, and stored into a shared tile whose rows are padded (stride ``S`` words, picked by
a bank model) so that the reads of the scoring phase are conflict-free.

* :mod:`.scores_one` (one query row): a per-block table of sums over groups of ``G``
  adjacent coordinates, ``T[p][e] = Σ_j q[G·p + j]·c[(e >> j·bits) & (L−1)]``. The
  ``G·bits``-bit field of adjacent codes is the table index, so a thread (one key) costs per
  group one field extraction, one shared load and one add. The lookups are random, so a
  group's table is kept within 128 bytes (the 32 banks' width): then a warp's lookup is one
  shared-memory wavefront; a 64-entry float32 table spans each bank twice and costs two, and
  these lookups, not the code bytes, bound the kernel (:func:`table_plan`). 2 bits: float32
  tables of coordinate pairs (16 entries); 4 bits: float32 per coordinate (16 entries); 3 bits:
  **float16** tables of coordinate pairs (64 entries, read with 16-bit loads) of the query
  scaled by ``1/max|q|`` — scores within ~1e-3 of the float32 path relative to the largest
  score (as :mod:`.scores_group`); float32 tables are within 2e-5 (sums in another order than
  the CPU's). :func:`tolerance` says which.
* :mod:`.scores_group` (2–8 query rows, e.g. a GQA group of 8 heads sharing one KV head):
  tensor cores. Each warp takes 16 keys per step: ``Sᵀ (16 keys × 8 rows) = K (16 × D) · Qᵀ``
  with ``mma.m16n8k16`` (fp16 inputs, fp32 accumulation), as in
  :mod:`rotorq.cuda.gen.attention`: lane ``(g, t)`` owns the contiguous
  coordinates ``[t·D/4, (t+1)·D/4)`` of keys ``g`` and ``g+8`` (the MMA's k-index is permuted to
  match) and builds its A fragment from a shared table of ``half2(c[a], c[b])`` pairs — one
  field extraction and one shared load per two coordinates for all 8 query rows, ~0.25
  instructions per (key, coordinate, row) instead of ~1.75. Query rows are scaled by ``1/max|q|``
  before rounding to fp16 (and the scores scaled back), so neither range nor subnormals limit
  precision. Error: fp16 rounding of the centroids and of the scaled queries (relative 2^-12
  each, summed in float32), measured max |Δ| / max |score| ≈ 2–4e-4 for D = 128 (tests allow
  1e-3). Without warp shuffles; under the simulator the MMA is emulated through shared memory
  (:func:`.intrinsics.mma_sim`).

"""

import functools

from .fields import wavefronts

THREADS = 128
"""Threads per block of :mod:`.scores_group`."""
ONE_THREADS = {2: 256, 3: 256, 4: 128}
"""Threads per block of :mod:`.scores_one` by bits. Blocks of 256 threads build half as many
tables per SM as blocks of 128: faster at 2 and 3 bits, slower at 4 (benchmarks/RESULTS.md,
"One-query score kernel: table plans against the shared-memory model")."""
WARPS = THREADS // 32
"""Warps per block of :mod:`.scores_group`."""
STEPS = 2
"""16-key steps per warp and tile of :mod:`.scores_group` (independent MMA chains)."""
BLOCKS_PER_SM = 6
"""Resident blocks of 128 threads per SM the launch bounds of :mod:`.scores_one` allow
for D > 128 (at most 80 registers per thread); blocks of other sizes keep the same threads
per SM."""
BLOCKS_PER_SM_SMALL = 8
"""Same for D ≤ 128: at most 64 registers per thread, which ptxas fits without spills there
(2–4 bits; the loop over tiles keeps its instruction count), so a third more warps hide the
latency of the lookups; at D = 256 they spill."""
GROUP_BLOCKS_PER_SM = 5
"""Same for :mod:`.scores_group` (at most 96 registers: the 16 query fragment registers, 2×4
accumulators and the prefetched words fit without spills)."""
TABLE_ROW_BYTES = 128
"""Largest table of one coordinate group of :mod:`.scores_one`: random lookups into it
are one shared-memory wavefront per warp (32 banks × 4 bytes)."""
MAX_ROWS = 8
"""Query rows per pass of :mod:`.scores_group` (the MMA's N)."""


def table_plan(stored_dim, bits):
    """``(G, half)`` of :mod:`.scores_one`: coordinates per table lookup and whether its
    tables are float16. The largest ``G`` (dividing ``stored_dim``) whose group table fits 128 bytes
    in float32 (one wavefront per warp lookup), unless float16 entries fit a larger ``G``
    there: 2 bits → (2, False), 3 bits → (2, True), 4 bits → (1, False). (0, False) where none
    fits."""
    best = (0, False)
    for half, size in ((False, 4), (True, 2)):
        for g in (4, 3, 2, 1):
            if g * bits <= 8 and stored_dim % g == 0 and (size << (g * bits)) <= TABLE_ROW_BYTES:
                if g > best[0]:
                    best = (g, half)
                break
    return best


def group_size(stored_dim, bits):
    """Coordinates per table lookup of :mod:`.scores_one` (4, 3, 2 or 1; 0: none)."""
    return table_plan(stored_dim, bits)[0]


STATIC_SHARED = 48 * 1024
"""Static shared memory a kernel may declare (more needs a dynamic opt-in)."""


def one_shared_bytes(stored_dim, bits, threads, plan):
    """Static shared memory of :mod:`.scores_one` for ``threads`` and ``plan``."""
    g, half = plan
    w = stored_dim * bits // 32
    stride = pick_stride(w, lambda s: [[t * s + k for t in range(32)] for k in range(w)])
    table = (stored_dim // g) * (2 if half else 4) << (g * bits)
    reduce = 4 * (threads + min(32, threads)) if half else 0
    return table + 4 * (threads * stride + (1 << bits) + stored_dim) + reduce


@functools.cache
def one_query_config(stored_dim, bits):
    """``(threads, (G, half))`` of :mod:`.scores_one` for this shape: :func:`table_plan`
    in blocks of :data:`ONE_THREADS`, else in blocks of 128 threads, else smaller float32
    tables — the first whose shared memory fits :data:`STATIC_SHARED`; None when none does."""
    first = table_plan(stored_dim, bits)
    plans = [first] + [(g, False) for g in (2, 1) if g < first[0] or first[1]]
    for plan in plans:
        g = plan[0]
        if not g or g * bits > 8 or stored_dim % g:
            continue
        for threads in dict.fromkeys((ONE_THREADS.get(bits, THREADS), THREADS)):
            if one_shared_bytes(stored_dim, bits, threads, plan) <= STATIC_SHARED:
                return threads, plan
    return None


def tolerance(stored_dim, bits, n_m):
    """Largest error of the tiled kernels' scores, relative to the largest score, against the
    float32 CPU path: 2e-5 for float32 tables, 1e-3 for float16 ones and tensor cores."""
    if n_m == 1 and not (one_query_config(stored_dim, bits) or (0, (0, False)))[1][1]:
        return 2e-5
    return 1e-3


def applies(stored_dim, bits, n_m):
    """Whether a tiled kernel scores ``n_m`` query rows of stored dimension ``stored_dim``."""
    if not 2 <= bits <= 4 or stored_dim > 512 or stored_dim * bits % 32:
        return False
    if n_m == 1:
        return one_query_config(stored_dim, bits) is not None
    return n_m >= 2 and stored_dim % 16 == 0 and stored_dim * bits % 128 == 0


def pick_stride(words, lane_addrs):
    """Row stride (words, ≥ ``words``) of the shared code tile with the fewest wavefronts of
    the reads ``lane_addrs(stride)`` (a list of warp accesses), then the smallest."""
    return min(range(words, words + 16),
               key=lambda s: (sum(wavefronts(a) for a in lane_addrs(s)), s))


def stage_lines(gen_w, threads, keys, stride):
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


def batch_loop(first_tile):
    """Source of the grid-stride loop over output batches: their query and key batches,
    then ``first_tile`` (the first tile's prefetch, when issued before the setup)."""
    return ["    b = cuda.blockIdx.y",
            "    while b < n_b:",
            "        qb = qmap[b]",
            "        kb = kmap[b]"] + first_tile


def first_tile(fetch):
    """Source of the prefetch of a block's first tile (``tile``, ``cb``, ``lim``, ``a*``)."""
    return (["        tile = cuda.blockIdx.x",
             "        cb = U64(kb) * U64(total)", "        lim = cb + U64(total)"]
            + fetch("        ", "tile"))

