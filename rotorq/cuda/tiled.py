"""Tiled kernels for the memory-bound row paths: the WHT and the Hadamard quantize.

A block of ``T`` threads owns a tile of ``R = T / P`` rows, ``P = D / 16`` threads per row.
Each iteration of its grid-stride loop over tiles:

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

In :func:`wht_kernel` rows are spread over consecutive threads (``r = tid % R``,
``p = tid // R``) and shared rows are padded (a word after every ``2^sh`` words, and a row
stride, both picked by :func:`_pick_layout` from a bank model of the accesses): for D = 128
every warp access to shared memory is one wavefront. :func:`quantize_kernel` (when ``R`` is a
multiple of 8 and ``P`` of 4) gives each warp 8 rows × 4 parts instead and keeps rows unpadded,
their stride 4 words past a multiple of 32 (float tile) or of 8 (fp16 word tile,
:func:`_vec_strides`): a thread's 16 consecutive coordinates are 16-byte aligned, so the first
phase's fp16 reads and float writes and the decision's reads are 128-bit accesses, and its last
WHT phase takes the groups ``2q, 2q + 1`` (adjacent coordinates: 64-bit reads and writes);
every such warp access still costs the minimum, one wavefront per 128 bytes.

Every butterfly pairs the same two coordinates, in the same stage order, as
:func:`rotorq.cpu.wht.fwht_row`, and the scale by ``1/sqrt(D)`` is the CPU's, so
:func:`wht_kernel` is bit-identical to the CPU twin. :func:`quantize_kernel` keeps the CPU's
WHT, decision (number of boundaries ``<= y``) and LSB-first packing. For float32 rows it keeps
the CPU's scaling ``float32(float64(x)·inv_n)·sign`` too; for fp16 rows it transforms the
unscaled ``x·sign`` (fp16 values are exact in float32) and compares with
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
then the ``P`` partials (16 instructions fewer than the float64 conversions and fused
multiply-adds, vector loads of the partials), and so is the square root (8 fewer): the stored
norm can differ from the CPU's ``float32(sqrt(‖x‖²))`` by at most ``(14 + P)·2^-25`` relative
plus one ulp (``P = D/16``; 6.6e-7 at D = 128).

fp16 rows of 2 to :data:`SYM_BITS` bits decide by sign and magnitude (:func:`_sym_decide`): the
codebooks are symmetric about 0, so a bisection of ``|y|`` over the positive half of the
boundaries, one level shorter, gives the code; it counts a boundary that ``-y`` equals exactly
one lower than the CPU (a rounding flip of the same kind).

Instruction count of :func:`quantize_kernel`: up to :data:`REG_BITS` bits (fp16 rows: up to
:data:`SYM_BITS`) the boundaries are loaded once into registers and each code is a register
bisection (compares and selects, no shared-memory lookups) whose decided bits go straight into
the packed words, one select of
``1 << s`` per bit (without ``norm_correction``, which needs the code itself); the row's norm
is stored as soon as it is known (with ``norm_correction``: after the correction), which frees
its registers for the decision; when ``threads`` is a multiple of the input words per row, a
thread stages words of one column only, so its staging address is one hoisted base plus
constants and the rotation's signs are applied there (an XOR of the fp16 sign bits, a multiply for fp32;
for fp32 this equals the CPU's ``float32(float64(x)·inv_n)·sign``: rounding is sign-symmetric);
and every tile but the last is prefetched without bound checks (the last one: a thread's
first ``nl`` loads, one 32-bit compare each). Thread and tile indices are zero-extended 32-bit
values, so most of the uint64 index arithmetic compiles to 32-bit instructions.

Compared with :mod:`rotorq.cuda.fast` (one row per thread: 256-byte strided loads, 255
registers), a thread here holds 16 coordinates, and global memory sees only full lines.
"""

import math

import numpy as np

from ._jit import SIMULATOR
from .fast import _build

E = 16
"""Coordinates per thread in every phase (a phase is at most log2(E) butterfly stages)."""
MIN_DIM, MAX_DIM = 16, 512
"""Stored dimensions handled here (powers of two)."""
THREADS = 256
"""Threads per block used by :mod:`rotorq.cuda.api`."""
REG_BITS = 3
"""Up to this many bits the quantize kernel keeps its ``2^bits − 1`` decision boundaries in
registers and counts the boundaries ``<= y`` with branch-free compares; above (15 boundaries
would not fit the register cap), a bisection over boundaries in shared memory, stored in heap
order (:func:`_heap_decide`) — except for fp16 rows up to :data:`SYM_BITS` bits."""

_kernels: dict = {}


def applies(big_d):
    """Whether the tiled kernels handle rows of stored dimension ``big_d``."""
    return MIN_DIM <= big_d <= MAX_DIM and big_d & (big_d - 1) == 0


def rows_per_tile(big_d, threads):
    """Rows of a tile: ``threads / (big_d / 16)``."""
    return threads // (big_d // E)


def _phases(big_d):
    m = big_d.bit_length() - 1
    return [(lo, min(lo + 4, m)) for lo in range(0, m, 4)]


# --------------------------------------------------------------- shared-memory address model

def _addr(r, j, lay):
    """Word address of element ``j`` of row ``r`` in a tile of layout ``lay = (stride, sh)``:
    one pad word after every ``2^sh`` elements."""
    s, sh = lay
    return r * s + j + (j >> sh)


def _off(k, sh):
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


def _cost(big_d, threads, lay, half_out_paired, width_words=None, word_tile=False):
    """Wavefronts of the first warp over every float-tile (or word-tile) access of a tile."""
    p_n = big_d // E
    rows = rows_per_tile(big_d, threads)
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
    phases = _phases(big_d)
    for n, (lo, hi) in enumerate(phases[1:]):
        paired = half_out_paired and n == len(phases) - 2
        for i in range(E >> (hi - lo)):
            for k in range(1 << (hi - lo)):
                total += _wavefronts([
                    _addr(t % rows, _group_base(_slots(t // rows, p_n, lo, hi, paired)[i], lo, hi)
                          + (k << lo), lay) for t in lanes])
    for i in range(-(-rows_per_tile(big_d, threads) * big_d // threads)):  # store pass
        total += _wavefronts([_addr((t + i * threads) // big_d, (t + i * threads) % big_d, lay)
                              for t in lanes])
    return total


def _out_cost(gen, lay, paired):
    """Wavefronts of the first warp writing and reading the fp16 output word tile."""
    p_n, lanes, total = gen.P, range(min(32, gen.T)), 0
    lo, hi = _phases(gen.D)[-1]
    if paired:
        for i in range(0, E >> (hi - lo), 2):
            for k in range(1 << (hi - lo)):
                total += _wavefronts([
                    _addr(t % gen.R, (_group_base(_slots(t // gen.R, p_n, lo, hi, True)[i], lo, hi)
                                       >> 1) + (k << (lo - 1)), lay) for t in lanes])
    w = gen.D // 2
    for i in range(-(-gen.R * w // gen.T)):
        total += _wavefronts([_addr((t + i * gen.T) // w, (t + i * gen.T) % w, lay)
                              for t in lanes])
    return total


def _pick_layout(width, cost):
    """Tile layout ``(stride, sh)`` of rows of ``width`` words with the fewest wavefronts under
    ``cost`` (then the least memory): a pad word every ``2^sh`` words, stride padded further
    by up to 31 words."""
    options = []
    for sh in (3, 4, 5, 6):
        base = width + (width >> sh)
        options += [(s, sh) for s in range(base, base + 32)]
    return min(options, key=lambda lay: (cost(lay), lay[0], -lay[1]))


# ------------------------------------------------------------------------- code generation

class _Gen:
    """Source lines of a tiled kernel: the loop skeleton shared by WHT and quantize."""

    def __init__(self, big_d, threads, half_in, d, vec=False):
        self.D, self.T, self.half_in, self.d = big_d, threads, half_in, d
        self.P = big_d // E
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
        pad = self.d < self.D
        self.add(8, "q16 = U64(16) * p", f"fb = rf + {_padded('q16', self.SH)}")
        if self.half_in:
            self.add(8, "q8 = U64(8) * p", f"wb = rw + {_padded('q8', self.SHW)}")
            for k in range(E // 2):
                src = f"raw[wb + U64({_off(k, self.SHW)})]"
                if pad:
                    src = f"({src} if U64(8) * p + U64({k}) < U64({self.w_in}) else U32(0))"
                self.add(8, f"u = {src}", f"{var}{2 * k} = half_lo(u)",
                         f"{var}{2 * k + 1} = half_hi(u)")
        else:
            for k in range(E):
                src = f"ft[fb + U64({_off(k, self.SH)})]"
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
        self.add(8, f"sc = np.float32({1.0 / math.sqrt(self.D)!r})")
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
            out.append((f"ab{i}", [_off(k << lo, self.SH) for k in range(size)],
                        [f"y{i}_{k}" for k in range(size)], f"gb{i}"))
        return out

    def run_phases(self, first_names, keep_last, pair_last=False, scale=True):
        """All WHT phases after the first-phase butterflies on ``first_names``, the scale by
        ``1/sqrt(D)`` included when ``scale``.

        Returns the last phase's groups (None: single phase, result in ``first_names``); with
        ``keep_last`` false the last phase is written back to the float tile (``pair_last``:
        by groups ``2q, 2q + 1``, adjacent coordinates in one thread).
        """
        phases = _phases(self.D)
        self.butterflies(first_names)
        if len(phases) == 1:
            if scale:
                self.scale(first_names)
            return None
        for k, nm in enumerate(first_names):
            self.add(8, f"ft[fb + U64({_off(k, self.SH)})] = {nm}")
        self.add(8, "cuda.syncthreads()")
        groups = None
        for n, (lo, hi) in enumerate(phases[1:]):
            last = n == len(phases) - 2
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


def _strides(gen, half_out_paired):
    gen.S, gen.SH = _pick_layout(gen.D, lambda lay: _cost(gen.D, gen.T, lay, half_out_paired))
    if gen.half_in:
        gen.SW, gen.SHW = _pick_layout(
            gen.D // 2, lambda lay: _cost(gen.D, gen.T, lay, False, gen.w_in, True))


def _vec_strides(gen):
    """Unpadded rows whose stride is 4 words past a multiple of 32 (float tile) or of 8 (fp16
    word tile): a thread's 16 consecutive coordinates are 16-byte aligned (vector accesses),
    and with lanes of 8 rows × 4 parts (:class:`_Gen` ``vec``) every warp access is one
    wavefront per 128 bytes."""
    gen.S, gen.SH = gen.D + (4 - gen.D) % 32, None
    if gen.half_in:
        gen.SW, gen.SHW = gen.w_in + (4 - gen.w_in) % 8, None


def _finish(lines, rows, threads, blocks):
    """Record the launch geometry in the source (the PTX cache is keyed by it)."""
    lines.append(f"# rows per tile {rows}, launch bounds ({threads}, {blocks})")


def _attach(kern, rows, threads, blocks):
    """Launch attributes: ``rows_per_tile``, ``threads``, ``blocks_per_sm`` and the
    ``launch_bounds`` passed to :func:`numba.cuda.compile_ptx` (``blocks`` resident blocks of
    ``threads`` per SM: at most 64 registers per thread at 4 blocks of 256, 48 at 5; ptxas
    reports no spills for D = 128, 3 bits)."""
    kern.rows_per_tile = rows
    kern.threads = threads
    kern.blocks_per_sm = blocks
    kern.launch_bounds = (threads, blocks)


def wht_kernel(big_d, half_in, half_out, threads=THREADS):
    """Tiled orthonormal WHT of rows of length ``big_d``: ``(x, out)``, both flat (rows·words,)
    — uint32 fp16 pairs when half, else float32. Launch ``threads`` threads per block, any
    grid (blocks stride over tiles of :func:`rows_per_tile` rows)."""
    key = ("wht", big_d, half_in, half_out, threads)
    if key in _kernels:
        return _kernels[key]
    gen = _Gen(big_d, threads, half_in, big_d)
    phases = _phases(big_d)
    single = len(phases) == 1
    lo, hi = phases[-1]
    paired = half_out and not single and E >> (hi - lo) >= 2
    via_ot = half_out and (single or paired)  # else fp16 pairs are read from the float tile
    _strides(gen, paired)
    w_out = big_d // 2 if half_out else big_d
    if via_ot:
        gen.SO, gen.SHO = _pick_layout(w_out, lambda lay: _out_cost(gen, lay, paired))
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
    first = [f"v{k}" for k in range(E)]
    gen.first_phase_load("v")
    groups = gen.run_phases(first, "paired" if paired else (single and via_ot))
    if via_ot and single:  # 16 consecutive coordinates: 8 words
        gen.add(8, "q8 = U64(8) * p", f"ob = ro + q8 + (q8 >> U64({gen.SHO}))")
        for k in range(E // 2):
            gen.add(8, f"ot[ob + U64({_off(k, gen.SHO)})] = half_bits(v{2 * k}) | (half_bits(v{2 * k + 1})"
                       " << U32(16))")
    elif via_ot:
        for i in range(0, len(groups), 2):
            _, _, a, gb = groups[i]
            b = groups[i + 1][2]
            gen.add(8, f"cb = {gb} >> U64(1)", f"ob = ro + cb + (cb >> U64({gen.SHO}))")
            for k in range(len(a)):
                gen.add(8, f"ot[ob + U64({_off(k << (lo - 1), gen.SHO)})] = half_bits({a[k]}) | "
                           f"(half_bits({b[k]}) << U32(16))")
    elif single:
        for k in range(E):
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
    _finish(L, R, threads, blocks)
    kern = _build("wht_tiled", L, {"U64": np.uint64})
    _attach(kern, R, threads, blocks)
    _kernels[key] = kern
    return kern


def _reg_decide(y, c, bits):
    """``{c}`` (uint32) = the number of boundaries ``bd0 … bd{L-2}`` (registers) that are
    ``<= {y}``, by bisection: level ``l`` compares with ``bd[prefix·2^(l+1) + 2^l − 1]``, the
    boundary picked by selects on the decided bits ``prefix`` (no shared memory, no branch
    after NVVM). Over sorted boundaries this is the CPU's count, ties (``y`` equal to a
    boundary counts it) and NaN (code 0) included."""
    out, preds = [], []
    def pick(level, prefix, depth):
        if depth == len(preds):
            return f"bd{(prefix << (level + 1)) + (1 << level) - 1}"
        hi, lo = pick(level, 2 * prefix + 1, depth + 1), pick(level, 2 * prefix, depth + 1)
        return f"({hi} if {preds[depth]} else {lo})"

    for level in range(bits - 1, -1, -1):
        out.append(f"{c}_{level} = {y} >= {pick(level, 0, 0)}")
        preds.append(f"{c}_{level}")
    out.append(f"{c} = " + " | ".join(f"(U32({c}_{lv}) << U32({lv}))" for lv in range(bits)))
    return out


SYM_BITS = 4
"""fp16 rows of 2 to this many bits decide in registers on the unscaled transform by sign and
magnitude (:func:`_sym_decide`: half the boundaries in registers, one bisection level fewer).
SASS loop of the quantize kernels at d = 128 (``benchmarks/sass_count.py``), against the
register bisection of every boundary (2, 3 bits) or the heap bisection on scaled coordinates
(4 bits): Hadamard 476 → 459, 557 → 538, 858 → 642; rotor 548 → 520, 677 → 654, 1062 → 792."""


def _decision(bits, half):
    """How a kernel decides its codes: ``"regs"`` (:func:`_reg_decide`), ``"sym"``
    (:func:`_sym_decide`: fp16 rows at :data:`SYM_BITS`) or ``"heap"`` (:func:`_heap_decide`)."""
    if half and 2 <= bits <= SYM_BITS:
        return "sym"
    return "regs" if bits <= REG_BITS else "heap"


def _reg_boundaries(bits, decision):
    """Indices into ``boundaries`` of the registers ``bd0, bd1, …`` a decision compares with:
    every boundary, or for ``"sym"`` the positive half (above the middle one, which is 0)."""
    if decision == "sym":
        return list(range(1 << (bits - 1), (1 << bits) - 1))
    return list(range((1 << bits) - 1))


def _sym_decide(y, c, bits):
    """``{c}`` (uint32) and its bits ``{c}_l``: the code of ``{y}`` for a codebook symmetric
    about 0 (``boundaries[i] == -boundaries[L - 2 - i]``, the middle one 0: every rotorq
    codebook is symmetrized so), from the sign ``s = y >= 0`` and the count ``m`` of positive
    boundaries ``bd0 … bd{L/2-2}`` (registers) that are ``<= |y|``, by the bisection of
    :func:`_reg_decide` with one level fewer: the code is ``L/2 + m`` for ``s``, else
    ``L/2 - 1 - m`` — bit ``l < bits - 1`` is ``m_l == s``, the top bit ``s``. This is the
    count of boundaries ``<= y`` except where ``-y`` equals a boundary exactly (the count
    excludes it there): only fp16 rows use it, compared unscaled with per-row boundaries, whose
    codes already differ from the CPU's within float32 rounding of a boundary (the documented
    flips). NaN is not refused here (the public API refuses non-finite rows)."""
    out = [f"{c}_s = {y} >= np.float32(0.0)", f"{c}_a = abs({y})"]
    out += _reg_decide(f"{c}_a", f"{c}_m", bits - 1)[:-1]
    out += [f"{c}_{lv} = {c}_m_{lv} == {c}_s" for lv in range(bits - 1)]
    out.append(f"{c}_{bits - 1} = {c}_s")
    out.append(f"{c} = " + " | ".join(f"(U32({c}_{lv}) << U32({lv}))" for lv in range(bits)))
    return out


def _heap_order(bits):
    """Boundary index of each node ``j = 1 … 2^bits − 1`` of the bisection tree in heap order
    (children ``2j, 2j + 1``): node ``2^depth + prefix`` is the boundary
    ``prefix·2^(l+1) + 2^l − 1`` that level ``l = bits − 1 − depth`` compares with."""
    out = []
    for j in range(1, 1 << bits):
        depth = j.bit_length() - 1
        lv = bits - 1 - depth
        out.append(((j - (1 << depth)) << (lv + 1)) + (1 << lv) - 1)
    return tuple(out)


def _heap_decide(y, c, bits):
    """``{c}`` (uint32) = the number of boundaries ``<= {y}``, by the bisection of
    :func:`_reg_decide` over boundaries in shared memory in heap order (``bs[j]``, node
    ``j`` as :func:`_heap_order`): per level one load, one compare and ``j = 2j + (y >= bs[j])``
    (no index arithmetic beyond that). NaN compares false at every level: code 0."""
    out = [f"{c} = U32(2) | U32({y} >= bs[1])"]
    for _ in range(bits - 1):
        out.append(f"{c} = U32({c} + {c} + U32({y} >= bs[{c}]))")
    out.append(f"{c} = {c} & U32({(1 << bits) - 1})")
    return out


def quantize_applies(kind, d, big_d, bits, dtype, sketch_rows):
    """Whether :func:`quantize_kernel` handles this call."""
    if kind != "hadamard" or sketch_rows or not applies(big_d) or not 1 <= bits <= 4:
        return False
    return dtype == np.float32 or (dtype == np.float16 and d % 2 == 0)


def quantize_kernel(d, big_d, bits, half, norm_correction, word_out, threads=THREADS,
                    blocks=None):
    """Tiled fused Hadamard MSE quantize (fp16 or fp32 rows of ``d`` ≤ ``big_d`` coordinates).

    ``(x, signs, boundaries, centroids, codes, norms)``: ``x`` flat (n·d/2,) uint32 fp16 pairs
    if ``half`` else (n·d,) float32; ``signs`` (D,) float32 ±1; ``codes`` flat (n·W,) uint32
    if ``word_out`` else (n·nbytes,) uint8; ``norms`` (n,) float32. Launch ``threads`` threads
    per block, any grid. ``blocks``: resident blocks per SM the registers are capped for
    (launch bounds; default as chosen below, ``benchmarks/gpu_launch_bounds.py`` compares).
    """
    key = ("quantize", d, big_d, bits, half, bool(norm_correction), word_out, threads, blocks)
    if key in _kernels:
        return _kernels[key]
    gen = _Gen(big_d, threads, half, d, vec=True)
    _vec_strides(gen)
    R, T, P = gen.R, threads, gen.P
    PP = P + 2 if P % 2 == 0 and P >= 4 else P  # row stride of the float64 partials
    levels = 1 << bits
    halves = big_d * bits // 16  # uint16 per row of codes
    SC = halves + 2 if halves % 4 == 0 else halves  # an odd number of words per row
    nbytes = big_d * bits // 8
    w_out = nbytes // 4 if word_out else nbytes
    L = gen.L
    L.append("def quantize_tiled(x, signs, boundaries, centroids, codes, norms):")
    al = "" if SIMULATOR else ", alignment=16"  # vector accesses; no alignment in cudasim
    if half:
        gen.add(4, f"raw = cuda.shared.array({R * gen.SW}, numba.uint32{al})")
    decision = _decision(bits, half)
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
        gen.add(4, f"sg = cuda.shared.array({big_d + big_d // E}, numba.float32)")
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
    reg_bd = _reg_boundaries(bits, decision) if in_regs else []
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
                f"while t < U64({big_d}):",
                "    sg[t + (t >> U64(4))] = signs[t]",
                f"    t += U64({T})",
                "sb = U64(17) * p")
    gen.stage(sign)
    gen.first_phase_load("v")
    # ‖x‖: this thread's 16 coordinates in order, then the row's P partials in order
    gen.add(8, f"pb = r * U64({PP})")
    if scaled:  # fp16 squares are exact in float32: the sums in float32, rounded
        gen.add(8, "acc = np.float32(0.0)", *[f"acc += v{k} * v{k}" for k in range(E)],
                f"pq = r * U64({PQ})", "part[pq + p] = acc", "cuda.syncthreads()",
                "acc = part[pq]", *[f"acc += part[pq + U64({q})]" for q in range(1, P)])
    else:
        gen.add(8, "acc = 0.0")
        for k in range(E):
            gen.add(8, f"f = np.float64(v{k})", "acc += f * f")
        gen.add(8, "part[pb + p] = acc", "cuda.syncthreads()", "acc = part[pb]",
                *[f"acc += part[pb + U64({q})]" for q in range(1, P)])
    if scaled:  # a zero row transforms to 0 whatever the scale: compare it with the boundaries
        gen.add(8, "n = math.sqrt(acc)",  # float32: may differ by one ulp
                f"scf = n * np.float32({math.sqrt(big_d)!r}) if n > np.float32(0.0) "
                "else np.float32(1.0)",  # one float32 multiply per boundary and row
                *[f"bd{i} = bq{i} * scf" for i in range(len(reg_bd))])
    else:
        gen.add(8, "n = math.sqrt(acc)", "inv_n = 1.0 / n if n > 0.0 else 0.0")
    if not norm_correction:  # final norm: store it now (frees its registers for the decision)
        gen.add(8, f"row = tile * U64({R}) + r",
                "if p == U64(0) and row < n_rows:",
                "    norms[row] = n")
    first = [f"v{k}" for k in range(E)]
    for k in range(E):
        sg = "" if col_sign else f" * sg[sb + U64({k})]"
        if not scaled:
            gen.add(8, f"v{k} = np.float32(np.float64(v{k}) * inv_n){sg}")
        elif sg:
            gen.add(8, f"v{k} = v{k}{sg}")
    groups = gen.run_phases(first, False, pair_last=True, scale=not scaled)
    if groups is not None:  # the WHT result went back to the float tile: read 16 consecutive
        for k in range(E):
            gen.add(8, f"v{k} = ft[fb + U64({_off(k, gen.SH)})]")
    decide = {"regs": _reg_decide, "sym": _sym_decide, "heap": _heap_decide}[decision]
    for k in range(E):
        gen.add(8, *decide(f"v{k}", f"c{k}", bits))
    if norm_correction:
        gen.add(8, "cn = 0.0")
        for k in range(E):
            gen.add(8, f"f = np.float64(cs[c{k}])", "cn += f * f")
        gen.add(8, "part2[pb + p] = cn", "cuda.syncthreads()", "cn = part2[pb]")
        for q in range(1, P):
            gen.add(8, f"cn += part2[pb + U64({q})]")
        gen.add(8, "if cn > 0.0:", "    n = n / math.sqrt(cn)")
    # pack this thread's 16 codes (16·bits bits, LSB first) and stage them as uint16
    nw = (E * bits + 31) // 32
    for w in range(nw):
        gen.add(8, f"o{w} = U32(0)")
    for k in range(E):
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
    # fp16 rows: 5 blocks of 256 (51 registers; 48 used at D = 128, 3 bits, no spills) —
    # 179.8 µs at N = 2^20 against 185.0 with 4 blocks and 183.2 with 6 (H200, more warps
    # hide more latency, at 518 loop instructions against 507 and 521); else 3 (64 registers
    # spill: fp32's 16 prefetched words, norm correction, d = 96 rows)
    if blocks is None:
        blocks = 5 if half and not norm_correction and col_sign else 3
    _finish(L, R, threads, blocks)
    kern = _build("quantize_tiled", L, {"U64": np.uint64, "HEAP": _heap_order(bits)})
    _attach(kern, R, threads, blocks)
    _kernels[key] = kern
    return kern
