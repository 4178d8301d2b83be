"""Generated MSE score kernel with one key per thread, fully unrolled over the coordinates.

Per (block, query chunk) a table in shared memory; a key's score is ``norm · Σ_k T[k][code_k]``
(one query: ``T[k][c] = q[k]·centroid[c]``, one shared load and one add per coordinate) or
``Σ_k q_i[k]·centroid[code_k]`` for 2–8 query rows (the queries ``[k][i]`` and the centroids in
shared memory, two keys per thread); every bit offset and shift is a constant of the generated
source. float32 sums in another order than the CPU's (within the score tests' 2e-5 relative
tolerance).

:mod:`rotorq.cuda.api` runs it from ``GENERATED_MIN_KEYS`` keys for the MSE shapes the tiled
score kernels (:mod:`.score_tiles`) do not take — 1-bit codes, and 2–8 query rows where
``D·bits`` is not a multiple of 128 (e.g. D = 64 at 3 bits) — where it replaced the generic
kernel of :mod:`rotorq.cuda.scores`, which it outran several times over (the results page
as of commit c64595d, "GPU targets missed, and why"); where both apply the tiled kernels are
the faster (benchmarks/RESULTS.md, "GPU kernels"), so they take those shapes.
"""

from dataclasses import dataclass

from .._jit import SIMULATOR
from .build import Source, Spec, build
from .fields import code_field

MAX_UNROLL_DIM = 512
"""Largest stored dimension given an unrolled kernel (code size grows with D)."""
SCORE_SHARED = 48 * 1024
"""Shared memory budget of a score table (bytes)."""


def score_queries(stored_dim, bits, n_m):
    """Query rows per pass (1, 2, 4 or 8) of :class:`ScoresRowsSpec` for ``n_m`` query rows,
    or 0 when the unrolled kernel does not apply (the generic kernel of
    :mod:`rotorq.cuda.scores` does)."""
    if stored_dim > MAX_UNROLL_DIM or stored_dim % 32 or not 1 <= bits <= 4:
        return 0
    if n_m == 1:
        return 1 if stored_dim * (1 << bits) * 4 <= SCORE_SHARED else 0
    q = 2
    while q < min(n_m, 8):
        q *= 2
    return q


@dataclass(frozen=True)
class ScoresRowsSpec(Spec):
    """MSE score kernel for stored dimension ``stored_dim``, ``bits`` per code, ``queries``
    rows per block (a power of two).

    ``(qrot f32 (Bq, M, D), qmap i64 (B,), codes u32 (Bk, N, W), norms f32 (Bk, N),
    kmap i64 (B,), centroids f32 (L,), out f32 (B, M, N))``. Grid: x strides over key tiles
    (persistent), y over output batches, z over chunks of ``queries`` rows. Codes are read in
    groups of 32 (``bits`` words). One query: a table ``T[k][c] = q[k]·centroid[c]`` (one shared
    load + add per coordinate). Several: the queries ``[k][i]`` and the centroids in shared
    memory, two keys per thread (``KPT``), ``centroid[code]·q_i[k]`` FMAs (shared-memory
    wavefronts, not the FMAs, bound a per-query table there).
    """

    stored_dim: int
    bits: int
    queries: int

    def generate(self):
        return _generate(self.stored_dim, self.bits, self.queries)


def spec(stored_dim, bits, queries):
    """The :class:`ScoresRowsSpec` of a shape (``queries`` from :func:`score_queries`)."""
    return ScoresRowsSpec(int(stored_dim), int(bits), int(queries))


def kernel(stored_dim, bits, queries):
    """The compiled kernel of :func:`spec`."""
    return build(spec(stored_dim, bits, queries))


def _generate(stored_dim, bits, queries):
    levels = 1 << bits
    groups = stored_dim // 32
    one = queries == 1
    kpt = 1 if one else 2
    size = stored_dim * levels if one else stored_dim * queries
    parts = 4 if one else 1  # accumulators per (key, query)
    L = ["def score_fast(qrot, qmap, codes, norms, kmap, centroids, out):",
         "    n_b, n_m, n_keys = out.shape",
         "    tab = cuda.shared.array(SIZE, numba.float32"
         + (")" if SIMULATOR else ", alignment=16)"),  # vector loads; no alignment in cudasim
         "    cs = cuda.shared.array(LEVELS, numba.float32)",
         "    tid = cuda.threadIdx.x",
         "    threads = cuda.blockDim.x",
         "    first = cuda.blockIdx.z * Q",
         "    count = min(Q, n_m - first)",
         "    t = tid",
         "    while t < LEVELS:",
         "        cs[t] = centroids[t]",
         "        t += threads",
         "    b = cuda.blockIdx.y",
         "    while b < n_b:",
         "        qb = qmap[b]",
         "        kb = kmap[b]",
         "        t = tid",
         "        while t < SIZE:"]
    if one:
        L += [f"            v = qrot[qb, first, t // {levels}] * centroids[t % {levels}]"]
    else:
        L += [f"            i = t % {queries}",
              "            v = np.float32(0.0)",
              "            if i < count:",
              f"                v = qrot[qb, first + i, t // {queries}]"]
    L += ["            tab[t] = v",
          "            t += threads",
          "        cuda.syncthreads()",
          f"        j = cuda.blockIdx.x * (threads * {kpt}) + tid",
          "        while j < n_keys:"]
    ind = " " * 12
    for kk in range(kpt):
        jx = "j" if kk == 0 else f"min(j + {kk} * threads, n_keys - 1)"
        L.append(f"{ind}r{kk} = codes[kb, {jx}]")
        for i in range(queries):
            for p in range(parts):
                L.append(f"{ind}a{kk}_{i}_{p} = np.float32(0.0)")
    L.append(f"{ind}for g in range({groups}):")
    ind2 = ind + "    "
    for kk in range(kpt):
        for w in range(bits):
            L.append(f"{ind2}w{kk}_{w} = r{kk}[g * {bits} + {w}]")
    if one:
        L.append(f"{ind2}base = U32(g * {32 * levels})")
    else:
        L.append(f"{ind2}base = U32(g * {32 * queries})")
    for t in range(32):
        for kk in range(kpt):
            L.append(f"{ind2}e{kk} = {code_field(f'w{kk}_', t * bits, bits, levels - 1)}")
        if one:
            L.append(f"{ind2}a0_0_{t % parts} += tab[base + e0 + U32({t * levels})]")
        else:
            for kk in range(kpt):
                L.append(f"{ind2}c{kk} = cs[e{kk}]")
            for i in range(queries):
                L.append(f"{ind2}qv = tab[base + U32({t * queries + i})]")
                for kk in range(kpt):
                    L.append(f"{ind2}a{kk}_{i}_0 += qv * c{kk}")
    for kk in range(kpt):
        jx = "j" if kk == 0 else f"j + {kk} * threads"
        L.append(f"{ind}jj = {jx}")
        L.append(f"{ind}if jj < n_keys:")
        L.append(f"{ind}    nrm = norms[kb, jj]")
        for i in range(queries):
            s = " + ".join(f"a{kk}_{i}_{p}" for p in range(parts))
            L.append(f"{ind}    if {i} < count:")
            L.append(f"{ind}        out[b, first + {i}, jj] = nrm * ({s})")
    L += [f"{ind}j += cuda.gridDim.x * threads * {kpt}",
          "        cuda.syncthreads()",
          "        b += cuda.gridDim.y"]
    return Source("score_fast", L, {"SIZE": size, "Q": queries, "LEVELS": levels},
                  {"keys_per_thread": kpt})
