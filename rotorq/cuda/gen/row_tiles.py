"""The loop skeleton and shared-memory layout of the tiled row kernels (WHT, quantize).

A block of ``T`` threads owns a tile of ``R = T / P`` rows, ``P = D / 16`` threads per row
(``D`` the stored dimension). Each iteration of its grid-stride loop over tiles:

1. stores the tile's input words (prefetched into registers during the previous iteration)
   into shared memory — consecutive threads load consecutive 4-byte words of the tile, so
   every warp load is one contiguous 128-byte line — and issues the loads of its next tile;
2. runs the WHT in phases of up to four butterfly stages (``h = 1…8``, ``16…128``, …): a
   thread reads 16 coordinates of its row from shared memory into registers (in the first
   phase 16 consecutive ones, later groups strided by ``2^lo``), applies the stages there and
   writes them back, one block barrier per phase (no warp shuffles, so the CUDA simulator
   runs them);
3. writes the results into a shared output tile, which the block stores with the same
   coalesced word pattern.

:class:`RowTiles` writes the source of that skeleton; the kernels of
:mod:`rotorq.cuda.gen.wht`, :mod:`rotorq.cuda.gen.quantize` and
:mod:`rotorq.cuda.gen.quantize_rotor` fill in the rest. Two layouts of a tile's rows in
shared memory: padded rows (a word after every ``2^sh`` words, and a row stride, both picked by
:func:`pick_layout` from a bank model of the accesses, :func:`padded_strides`), with rows
spread over consecutive threads (``r = tid % R``, ``p = tid // R``); or, with ``vec`` and when
``R`` is a multiple of 8 and ``P`` of 4, lanes of 8 rows × 4 parts and unpadded rows whose
stride is 4 words past a multiple of 32 (float tile) or of 8 (fp16 word tile,
:func:`vec_strides`), so that a thread's 16 consecutive coordinates are 16-byte aligned.
"""

import math

E = 16
"""Coordinates per thread in every phase (a phase is at most log2(E) butterfly stages)."""
MIN_DIM, MAX_DIM = 16, 512
"""Stored dimensions handled here (powers of two)."""
THREADS = 256
"""Threads per block of the tiled row kernels as :mod:`rotorq.cuda.api` launches them."""


def applies(stored_dim):
    """Whether the tiled kernels handle rows of stored dimension ``stored_dim``."""
    return MIN_DIM <= stored_dim <= MAX_DIM and stored_dim & (stored_dim - 1) == 0


def rows_per_tile(stored_dim, threads):
    """Rows of a tile: ``threads / (stored_dim / 16)``."""
    return threads // (stored_dim // E)


def phases(stored_dim):
    m = stored_dim.bit_length() - 1
    return [(lo, min(lo + 4, m)) for lo in range(0, m, 4)]


def _addr(r, j, lay):
    """Word address of element ``j`` of row ``r`` in a tile of layout ``lay = (stride, sh)``:
    one pad word after every ``2^sh`` elements."""
    s, sh = lay
    return r * s + j + (j >> sh)


def offset(k, sh):
    """``_addr`` of element ``base + k`` minus that of ``base`` when their bits are disjoint
    (``sh`` None: rows without pad words)."""
    return k if sh is None else k + (k >> sh)


def _padded(var, sh):
    """Source of the word offset of element ``{var}`` of a row (pad words every ``2^sh``)."""
    return var if sh is None else f"{var} + ({var} >> U64({sh}))"


def _group_base(g, lo, hi):
    """First coordinate of butterfly group ``g`` of the phase of stages ``[lo, hi)``."""
    return (g & ((1 << lo) - 1)) | ((g >> lo) << hi)


def _slots(p, n_threads, lo, hi, paired):
    """Groups of thread ``p`` in a phase: ``p, p + P, …`` or, ``paired``, pairs ``2q, 2q + 1``
    (for fp16 output: adjacent coordinates in one thread)."""
    m = E >> (hi - lo)
    if paired:
        return [2 * (p + n_threads * (i // 2)) + (i & 1) for i in range(m)]
    return [p + n_threads * i for i in range(m)]


def _wavefronts(addrs):
    """Shared-memory wavefronts of one warp access to 4-byte words ``addrs`` (one per lane)."""
    banks: dict = {}
    for a in addrs:
        banks.setdefault(a % 32, set()).add(a)
    return max(len(v) for v in banks.values())


def _rp(t, rows, width, base, k):
    """(row, element) of thread ``t``'s ``k``-th of ``width`` consecutive elements: rows are
    spread over consecutive threads (``r = t % rows``, ``p = t // rows``)."""
    return t % rows, width * (t // rows) + base + k


def tile_cost(stored_dim, threads, lay, half_out_paired, width_words=None, word_tile=False):
    """Wavefronts of the first warp over every float-tile (or word-tile) access of a tile."""
    p_n = stored_dim // E
    rows = rows_per_tile(stored_dim, threads)
    lanes = range(min(32, threads))
    total = 0
    if word_tile:  # fp16 input tile: staging writes and the first phase's 8 word reads
        w = width_words
        for i in range(-(-rows * w // threads)):
            total += _wavefronts([_addr((t + i * threads) // w, (t + i * threads) % w, lay)
                                  for t in lanes])
        for k in range(E // 2):
            total += _wavefronts([_addr(*_rp(t, rows, 8, 0, k), lay) for t in lanes])
        return total
    for k in range(E):  # first phase / decision: 16 consecutive coordinates
        total += _wavefronts([_addr(*_rp(t, rows, E, 0, k), lay) for t in lanes])
    stages = phases(stored_dim)
    for n, (lo, hi) in enumerate(stages[1:]):
        paired = half_out_paired and n == len(stages) - 2
        for i in range(E >> (hi - lo)):
            for k in range(1 << (hi - lo)):
                total += _wavefronts([
                    _addr(t % rows, _group_base(_slots(t // rows, p_n, lo, hi, paired)[i], lo, hi)
                          + (k << lo), lay) for t in lanes])
    for i in range(-(-rows_per_tile(stored_dim, threads) * stored_dim // threads)):  # store pass
        total += _wavefronts([_addr((t + i * threads) // stored_dim, (t + i * threads) % stored_dim, lay)
                              for t in lanes])
    return total


def out_cost(gen, lay, paired):
    """Wavefronts of the first warp writing and reading the fp16 output word tile."""
    p_n, lanes, total = gen.P, range(min(32, gen.T)), 0
    lo, hi = phases(gen.stored_dim)[-1]
    if paired:
        for i in range(0, E >> (hi - lo), 2):
            for k in range(1 << (hi - lo)):
                total += _wavefronts([
                    _addr(t % gen.R, (_group_base(_slots(t // gen.R, p_n, lo, hi, True)[i], lo, hi)
                                       >> 1) + (k << (lo - 1)), lay) for t in lanes])
    w = gen.stored_dim // 2
    for i in range(-(-gen.R * w // gen.T)):
        total += _wavefronts([_addr((t + i * gen.T) // w, (t + i * gen.T) % w, lay)
                              for t in lanes])
    return total


def pick_layout(width, cost):
    """Tile layout ``(stride, sh)`` of rows of ``width`` words with the fewest wavefronts under
    ``cost`` (then the least memory): a pad word every ``2^sh`` words, stride padded further
    by up to 31 words."""
    options = []
    for sh in (3, 4, 5, 6):
        base = width + (width >> sh)
        options += [(s, sh) for s in range(base, base + 32)]
    return min(options, key=lambda lay: (cost(lay), lay[0], -lay[1]))


# ------------------------------------------------------------------------- code generation

class RowTiles:
    """Source lines of a tiled kernel: the loop skeleton shared by WHT and quantize."""

    def __init__(self, stored_dim, threads, half_in, d, vec=False):
        self.stored_dim, self.T, self.half_in, self.d = stored_dim, threads, half_in, d
        self.P = stored_dim // E
        if threads % self.P or threads < self.P:
            raise ValueError(f"threads ({threads}) must be a multiple of D/16 ({self.P})")
        self.R = threads // self.P
        # thread → (row, part): lanes of A rows × B parts (vec), else rows over consecutive threads
        # (powers of two: R = T / P is one when T is)
        self.A, self.B = (8, 4) if vec and self.R % 8 == 0 and self.P % 4 == 0 and threads & (
            threads - 1) == 0 else (self.R, 1)
        self.w_in = d // 2 if half_in else d  # input words per row
        self.S = None
        self.SW = None
        self.L = []

    def add(self, ind, *lines):
        self.L += [" " * ind + s for s in lines]

    def prologue(self):
        """Thread coordinates, tile count and the first tile's prefetch.

        Indices are uint64 (``U64``) throughout: Numba wraps signed indices around (a select
        per access), which keeps NVVM from folding constant offsets into one base address.
        """
        tile_words = self.R * self.w_in
        self.loads = -(-tile_words // self.T)
        self.add(4, "tid = U64(U32(cuda.threadIdx.x))")
        A, B, R = self.A, self.B, self.R
        if A == R:
            self.add(4, f"r = tid % U64({R})", f"p = tid // U64({R})")
        else:
            la, lb = A.bit_length() - 1, B.bit_length() - 1
            lab, lrb = (A * B).bit_length() - 1, (R * B).bit_length() - 1
            self.add(4, f"r = (tid & U64({A - 1})) | (((tid >> U64({lab})) & U64({R // A - 1}))"
                        f" << U64({la}))",
                     f"p = ((tid >> U64({la})) & U64({B - 1})) | ((tid >> U64({lrb})) << U64({lb}))")
        self.add(4, f"rf = r * U64({self.S})",
                 "total = U64(x.shape[0])",
                 f"n_tiles = (total + U64({tile_words - 1})) // U64({tile_words})",
                 "tile = U64(U32(cuda.blockIdx.x))",
                 "grid = U64(U32(cuda.gridDim.x))")
        if self.half_in:
            self.add(4, f"rw = r * U64({self.SW})")
        self._fetch(4, "tile")

    def _fetch(self, ind, tile):
        """Loads of tile ``{tile}``: unguarded when the whole tile lies inside ``x`` (every tile
        but the last), else each word guarded by the bound."""
        zero = "U32(0)" if self.half_in else "np.float32(0.0)"
        tw = self.R * self.w_in
        self.add(ind, f"g = {tile} * U64({tw}) + tid", f"if {tile} * U64({tw}) + U64({tw}) <= total:")
        for i in range(self.loads):
            gi = f"g + U64({i * self.T})" if i else "g"
            if (i + 1) * self.T > tw:
                self.add(ind + 4, f"a{i} = x[{gi}] if tid + U64({i * self.T}) < U64({tw}) else {zero}")
            else:
                self.add(ind + 4, f"a{i} = x[{gi}]")
        # the last tile: fewer than tw words left, this thread's first nl loads are inside x
        self.add(ind, "else:")
        self.add(ind + 4, f"lim = U64(U32(total - {tile} * U64({tw})) if {tile} * U64({tw}) < total"
                          " else U32(0))", f"nl = U32((lim + U64({self.T - 1}) - tid) // U64({self.T}))")
        for i in range(self.loads):
            gi = f"g + U64({i * self.T})" if i else "g"
            self.add(ind + 4, f"a{i} = x[{gi}] if nl > U32({i}) else {zero}")

    def uniform_column(self):
        """Whether every staged word of a thread lies in one column (``T`` a multiple of the
        input words per row): then its shared address is one base plus constants."""
        return self.T % self.w_in == 0

    def stage(self, sign=None):
        """Loop head: prefetched words → shared tile, barrier, prefetch of the next tile.

        ``sign``: the expression applying this thread's column sign to a staged word ``{a}``
        (only with :meth:`uniform_column`), or None.
        """
        w = self.w_in
        tile_s, sw, shw = ("raw", self.SW, self.SHW) if self.half_in else ("ft", self.S, self.SH)
        if self.uniform_column():
            self.add(4, f"sc0 = tid % U64({w})",
                     f"sa = (tid // U64({w})) * U64({sw}) + {_padded('sc0', shw)}")
        self.add(4, "while tile < n_tiles:")
        for i in range(self.loads):
            val = sign.format(a=f"a{i}") if sign else f"a{i}"
            guard = (i + 1) * self.T > self.R * w
            ind = 8
            if guard:
                self.add(8, f"if tid < U64({self.R * w - i * self.T}):")
                ind = 12
            if self.uniform_column():
                self.add(ind, f"{tile_s}[sa + U64({i * self.T // w * sw})] = {val}")
                continue
            self.add(ind, f"w = tid + U64({i * self.T})", f"rr = w // U64({w})", f"c = w % U64({w})",
                     f"{tile_s}[rr * U64({sw}) + {_padded('c', shw)}] = {val}")
        self.add(8, "cuda.syncthreads()", "nxt = tile + grid")
        self._fetch(8, "nxt")

    def first_phase_load(self, var):
        """``{var}0 … {var}15`` (float32): this thread's 16 consecutive input coordinates (0
        past ``d``)."""
        pad = self.d < self.stored_dim
        self.add(8, "q16 = U64(16) * p", f"fb = rf + {_padded('q16', self.SH)}")
        if self.half_in:
            self.add(8, "q8 = U64(8) * p", f"wb = rw + {_padded('q8', self.SHW)}")
            for k in range(E // 2):
                src = f"raw[wb + U64({offset(k, self.SHW)})]"
                if pad:
                    src = f"({src} if U64(8) * p + U64({k}) < U64({self.w_in}) else U32(0))"
                self.add(8, f"u = {src}", f"{var}{2 * k} = half_lo(u)",
                         f"{var}{2 * k + 1} = half_hi(u)")
        else:
            for k in range(E):
                src = f"ft[fb + U64({offset(k, self.SH)})]"
                if pad:
                    src = f"({src} if U64(16) * p + U64({k}) < U64({self.d}) else np.float32(0.0))"
                self.add(8, f"{var}{k} = {src}")

    def butterflies(self, names):
        """In-register butterflies over ``names`` (a group of 2^s coordinates, stride 1)."""
        h = 1
        while h < len(names):
            for j in range(len(names)):
                if j & h == 0:
                    a, b = names[j], names[j + h]
                    self.add(8, f"{a}, {b} = {a} + {b}, {a} - {b}")
            h <<= 1

    def scale(self, names):
        self.add(8, f"sc = np.float32({1.0 / math.sqrt(self.stored_dim)!r})")
        for nm in names:
            self.add(8, f"{nm} = {nm} * sc")

    def phase_groups(self, lo, hi, paired):
        """``[(base address var, offsets, names, group base var)]`` of this thread's groups in
        the phase of stages ``[lo, hi)``."""
        size = 1 << (hi - lo)
        out = []
        for i, _ in enumerate(_slots(0, self.P, lo, hi, paired)):
            if paired:
                g = f"(U64(2) * (p + U64({self.P * (i // 2)})) + U64({i & 1}))"
            else:
                g = f"(p + U64({self.P * i}))"
            if paired and i & 1:  # the odd group of a pair: its even partner's coordinates + 1
                self.add(8, f"gb{i} = gb{i - 1} + U64(1)", f"ab{i} = ab{i - 1} + U64(1)")
            else:
                self.add(8, f"gb{i} = ({g} & U64({(1 << lo) - 1})) | (({g} >> U64({lo})) << U64({hi}))",
                         f"ab{i} = rf + {_padded(f'gb{i}', self.SH)}")
            out.append((f"ab{i}", [offset(k << lo, self.SH) for k in range(size)],
                        [f"y{i}_{k}" for k in range(size)], f"gb{i}"))
        return out

    def run_phases(self, first_names, keep_last, pair_last=False, scale=True):
        """All WHT phases after the first-phase butterflies on ``first_names``, the scale by
        ``1/sqrt(D)`` included when ``scale``.

        Returns the last phase's groups (None: single phase, result in ``first_names``); with
        ``keep_last`` false the last phase is written back to the float tile (``pair_last``:
        by groups ``2q, 2q + 1``, adjacent coordinates in one thread).
        """
        stages = phases(self.stored_dim)
        self.butterflies(first_names)
        if len(stages) == 1:
            if scale:
                self.scale(first_names)
            return None
        for k, nm in enumerate(first_names):
            self.add(8, f"ft[fb + U64({offset(k, self.SH)})] = {nm}")
        self.add(8, "cuda.syncthreads()")
        groups = None
        for n, (lo, hi) in enumerate(stages[1:]):
            last = n == len(stages) - 2
            groups = self.phase_groups(lo, hi, last and (keep_last == "paired" or (
                pair_last and E >> (hi - lo) >= 2)))
            for ab, offs, names, _ in groups:
                for k, nm in enumerate(names):
                    self.add(8, f"{nm} = ft[{ab} + U64({offs[k]})]")
                self.butterflies(names)
            if last and scale:
                self.scale([nm for g in groups for nm in g[2]])
            if last and keep_last:
                break
            # coordinate by coordinate across groups: a pair's two stores are adjacent (one
            # vector store when paired)
            for k in range(len(groups[0][2])):
                for ab, offs, names, _ in groups:
                    self.add(8, f"ft[{ab} + U64({offs[k]})] = {names[k]}")
            self.add(8, "cuda.syncthreads()")
        return groups


def padded_strides(gen, half_out_paired):
    gen.S, gen.SH = pick_layout(gen.stored_dim,
                                lambda lay: tile_cost(gen.stored_dim, gen.T, lay, half_out_paired))
    if gen.half_in:
        gen.SW, gen.SHW = pick_layout(
            gen.stored_dim // 2, lambda lay: tile_cost(gen.stored_dim, gen.T, lay, False, gen.w_in, True))


def vec_strides(gen):
    """Unpadded rows whose stride is 4 words past a multiple of 32 (float tile) or of 8 (fp16
    word tile): a thread's 16 consecutive coordinates are 16-byte aligned (vector accesses),
    and with lanes of 8 rows × 4 parts (:class:`RowTiles` ``vec``) every warp access is one
    wavefront per 128 bytes."""
    gen.S, gen.SH = gen.stored_dim + (4 - gen.stored_dim) % 32, None
    if gen.half_in:
        gen.SW, gen.SHW = gen.w_in + (4 - gen.w_in) % 8, None


def launch_comment(lines, rows, threads, blocks):
    """Record the launch geometry in the source (the PTX cache is keyed by it)."""
    lines.append(f"# rows per tile {rows}, launch bounds ({threads}, {blocks})")


def launch_attrs(rows, threads, blocks):
    """Launch attributes of a tiled row kernel: ``rows_per_tile``, ``threads``,
    ``blocks_per_sm`` and the ``launch_bounds`` passed to :func:`numba.cuda.compile_ptx`
    (``blocks`` resident blocks of ``threads`` per SM cap the registers per thread)."""
    return {"rows_per_tile": rows, "threads": threads, "blocks_per_sm": blocks,
            "launch_bounds": (threads, blocks)}
