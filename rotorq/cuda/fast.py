"""Specialized, fully unrolled kernels for the hot paths (one vector or key per thread).

The generic kernels of this package loop over a runtime dimension and share each row among
lanes through shared memory and block barriers; on an H100 they are instruction-bound (PERFORMANCE.md). The
kernels here are generated as Python source per compile-time shape — ``D``, ``bits``, input
dtype, query rows per pass — and compiled by Numba, so every coordinate index, bit offset and
shift is a constant: a row lives in registers, the WHT runs there (7 stages of register
butterflies for D = 128, no barriers), the codebook decision is a compare chain and the bit
packing a sequence of constant shifts into 32-bit words.

Same results as the CPU twins:

* :func:`quantize_kernel` — the norm is the CPU's sequential float64 sum, the scaling
  ``float32(float64(x)·inv_n)·sign`` and the WHT's additions are the CPU's, in the CPU's order
  (the ±1 sign product is exact, so an FMA contraction cannot change it). Rotor rows use the
  3×3 products of :mod:`rotorq.cuda.rotate` (FMA-contracted, as there). The decision counts
  the boundaries ``<= y``, which equals the CPU's binary search over sorted boundaries.
* :func:`score_kernel` — per (block, query chunk) a table ``T[i][k][c] = q_i[k]·centroid[c]``
  in shared memory; a key's score is ``norm · Σ_k T[i][k][code_k]``: one shared load and one add
  per coordinate and query, the code extracted once per coordinate for all queries. float32
  sums in another order than the CPU's (within the score tests' 2e-5 relative tolerance).

Compile time is the price: the quantize kernel for D = 128 is ~1,800 generated statements and
takes Numba + NVVM 1–4 minutes (the score and WHT kernels 10–40 s), once per shape and
process. :mod:`rotorq.cuda.api` therefore uses these kernels only from
``FAST_MIN_ROWS``/``FAST_MIN_KEYS`` rows, and :func:`rotorq.cuda._launch.compile_ptx` keeps
their PTX in ``$ROTORQ_PTX_CACHE`` when that is set (``benchmarks/gpu_bench.py
--precompile-only`` fills it in parallel).

fp16 rows travel as uint32 words (two halves each) and are split with :func:`half_lo` /
:func:`half_hi`, which avoids Numba's scalar fp16 loads (capped near 1.9 TB/s). Under the CUDA
simulator those helpers are numpy functions.
"""

import linecache
import math

import numba
import numpy as np
from numba import cuda, types

from ._jit import SIMULATOR, kernel

MAX_UNROLL_DIM = 512
"""Largest stored dimension given an unrolled kernel (code size grows with D)."""
SCORE_SHARED = 48 * 1024
"""Shared memory budget of a score table (bytes)."""

if SIMULATOR:
    def half_lo(u):
        """float32 of the float16 in the low 16 bits of ``u``."""
        return np.float32(np.array(int(u) & 0xFFFF, np.uint16).view(np.float16))

    def half_hi(u):
        """float32 of the float16 in bits 16–31 of ``u``."""
        return np.float32(np.array((int(u) >> 16) & 0xFFFF, np.uint16).view(np.float16))

    def half_bits(f):
        """The float16 bits (uint32, round to nearest even) of the float32 ``f``."""
        return np.uint32(np.array(np.float16(f)).view(np.uint16))
else:
    from llvmlite import ir
    from numba.cuda.extending import intrinsic

    def _half_of(shift):
        def impl(typingctx, u):
            def codegen(context, builder, signature, args):
                v = args[0]
                if shift:
                    v = builder.lshr(v, ir.Constant(v.type, shift))
                h = builder.bitcast(builder.trunc(v, ir.IntType(16)), ir.HalfType())
                return builder.fpext(h, ir.FloatType())
            return types.float32(u), codegen
        return impl

    half_lo = intrinsic(_half_of(0))
    half_hi = intrinsic(_half_of(16))

    @intrinsic
    def half_bits(typingctx, f):
        def codegen(context, builder, signature, args):
            h = builder.fptrunc(args[0], ir.HalfType())
            return builder.zext(builder.bitcast(h, ir.IntType(16)), ir.IntType(32))
        return types.uint32(f), codegen


_kernels: dict = {}
_counter = [0]


def _build(name, lines, env):
    """Compile the generated source ``lines`` defining ``name`` into a ``@cuda.jit`` kernel."""
    src = "\n".join(lines) + "\n"
    _counter[0] += 1
    filename = f"<rotorq.cuda.fast:{name}:{_counter[0]}>"
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
    glb = {"np": np, "cuda": cuda, "numba": numba, "math": math, "half_lo": half_lo,
           "half_hi": half_hi, "half_bits": half_bits, "U32": np.uint32}
    glb.update(env)
    exec(compile(src, filename, "exec"), glb)
    kern = kernel(glb[name])
    kern.rotorq_source = src
    return kern


def _code_expr(word, p, bits, mask):
    """Expression of the ``bits``-bit field at bit ``p`` of the words ``{word}0, {word}1, …``."""
    w, s = p >> 5, p & 31
    if s + bits <= 32:
        return f"((({word}{w} >> U32({s})) & U32({mask})))"
    return (f"((({word}{w} >> U32({s})) | ({word}{w + 1} << U32({32 - s}))) & U32({mask}))")


# ---------------------------------------------------------------------------------- scores

def score_queries(big_d, bits, n_m):
    """Query rows per pass (1, 2, 4 or 8) of :func:`score_kernel` for ``n_m`` query rows, or
    0 when the fast kernel does not apply (then use :mod:`rotorq.cuda.scores`)."""
    if big_d > MAX_UNROLL_DIM or big_d % 32 or not 1 <= bits <= 4:
        return 0
    if n_m == 1:
        return 1 if big_d * (1 << bits) * 4 <= SCORE_SHARED else 0
    q = 2
    while q < min(n_m, 8):
        q *= 2
    return q


def score_kernel(big_d, bits, queries):
    """MSE score kernel for stored dimension ``big_d``, ``bits`` per code, ``queries`` rows per
    block (a power of two).

    ``(qrot f32 (Bq, M, D), qmap i64 (B,), codes u32 (Bk, N, W), norms f32 (Bk, N),
    kmap i64 (B,), centroids f32 (L,), out f32 (B, M, N))``. Grid: x strides over key tiles
    (persistent), y over output batches, z over chunks of ``queries`` rows. Codes are read in
    groups of 32 (``bits`` words). One query: a table ``T[k][c] = q[k]·centroid[c]`` (one shared
    load + add per coordinate). Several: the queries ``[k][i]`` and the centroids in shared
    memory, two keys per thread (``KPT``), ``centroid[code]·q_i[k]`` FMAs (shared-memory
    wavefronts, not the FMAs, bound a per-query table there).
    """
    key = ("score", big_d, bits, queries)
    if key in _kernels:
        return _kernels[key]
    levels = 1 << bits
    groups = big_d // 32
    one = queries == 1
    kpt = 1 if one else 2
    size = big_d * levels if one else big_d * queries
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
            L.append(f"{ind2}e{kk} = {_code_expr(f'w{kk}_', t * bits, bits, levels - 1)}")
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
    kern = _build("score_fast", L, {"SIZE": size, "Q": queries, "LEVELS": levels})
    kern.keys_per_thread = kpt
    _kernels[key] = kern
    return kern


# -------------------------------------------------------------------------------- quantize

def quantize_applies(kind, d, big_d, bits, dtype, sketch_rows):
    """Whether :func:`quantize_kernel` handles this call (else the generic kernels do)."""
    if sketch_rows or big_d > MAX_UNROLL_DIM or not 1 <= bits <= 4:
        return False
    if kind not in ("hadamard", "rotor"):
        return False
    return dtype == np.float32 or (dtype == np.float16 and d % 2 == 0)


def _decide_lines(y, c, bits, ind):
    """``{c}`` (uint32) = the number of boundaries ``bs[0] … bs[L-2]`` that are ``<= {y}``, by
    bisection: level ``l`` compares with ``bs[prefix·2^(l+1) + 2^l − 1]``, ``prefix`` the bits
    decided above. Branch-free: the boundaries are indexed in shared memory rather than
    selected by Python conditionals (each a branch, which costs Numba minutes of compile
    time over a 128-wide row)."""
    top = bits - 1
    out = [f"{ind}{c} = U32({y} >= bs[{(1 << top) - 1}])"]
    for level in range(top - 1, -1, -1):
        out.append(f"{ind}{c} = ({c} << U32(1)) | U32({y} >= bs[({c} << U32({level + 1})) + "
                   f"U32({(1 << level) - 1})])")
    return out


def _load_lines(d, half, ind, var="v"):
    """``{var}0 … {var}{d-1}`` (float32) of row ``r`` of ``x`` (uint32 half pairs or float32)."""
    out = []
    if half:
        for w in range(d // 2):
            out.append(f"{ind}u = x[r, {w}]")
            out.append(f"{ind}{var}{2 * w} = half_lo(u)")
            out.append(f"{ind}{var}{2 * w + 1} = half_hi(u)")
    else:
        for j in range(d):
            out.append(f"{ind}{var}{j} = x[r, {j}]")
    return out


def _wht_lines(n, ind, var="y"):
    """In-register orthonormal WHT of ``{var}0 … {var}{n-1}``, stage by stage as the CPU's."""
    out = []
    h = 1
    while h < n:
        for j in range(n):
            if j & h == 0:
                out.append(f"{ind}{var}{j}, {var}{j + h} = {var}{j} + {var}{j + h}, "
                           f"{var}{j} - {var}{j + h}")
        h <<= 1
    out.append(f"{ind}sc = np.float32({1.0 / math.sqrt(n)!r})")
    for j in range(n):
        out.append(f"{ind}{var}{j} = {var}{j} * sc")
    return out


def quantize_kernel(kind, d, big_d, bits, half, norm_correction, word_out):
    """Fused MSE quantize kernel, one row per thread (grid-stride).

    ``(x, rot, boundaries, centroids, codes, norms)``: ``x`` (n, d/2) uint32 fp16 pairs if
    ``half`` else (n, d) float32; ``rot`` the ±1 signs (D,) float32 (hadamard) or the rotor
    matrices (G, 3, 3); ``codes`` (n, W) uint32 if ``word_out`` else (n, nbytes) uint8.
    """
    key = ("quantize", kind, d, big_d, bits, half, bool(norm_correction), word_out)
    if key in _kernels:
        return _kernels[key]
    levels = 1 << bits
    nbytes = (big_d * bits + 7) // 8
    nwords = (nbytes + 3) // 4
    rsize = big_d if kind == "hadamard" else 9 * (big_d // 3)
    L = ["def quantize_fast(x, rot, boundaries, centroids, codes, norms):",
         "    rs = cuda.shared.array(RSIZE, numba.float32)",
         "    tid = cuda.threadIdx.x",
         "    t = tid",
         "    while t < RSIZE:"]
    if kind == "hadamard":
        L.append("        rs[t] = rot[t]")
    else:
        L.append("        rs[t] = rot[t // 9, (t // 3) % 3, t % 3]")
    L += ["        t += cuda.blockDim.x",
          "    cuda.syncthreads()"]
    L += ["    bs = cuda.shared.array(LEVELS, numba.float32)",  # boundaries (L-1 used)
          "    t = tid",
          "    while t < LEVELS - 1:",
          "        bs[t] = boundaries[t]",
          "        t += cuda.blockDim.x",
          "    cuda.syncthreads()"]
    L += ["    n_rows = norms.shape[0]",
          "    r = cuda.blockIdx.x * cuda.blockDim.x + tid",
          "    while r < n_rows:"]
    ind = " " * 8
    L += _load_lines(d, half, ind)
    L.append(f"{ind}acc = 0.0")
    for j in range(d):
        L.append(f"{ind}f = np.float64(v{j})")
        L.append(f"{ind}acc += f * f")
    L += [f"{ind}n = math.sqrt(acc)",
          f"{ind}inv_n = 1.0 / n if n > 0.0 else 0.0"]
    if kind == "hadamard":
        for j in range(big_d):
            if j < d:
                L.append(f"{ind}y{j} = np.float32(np.float64(v{j}) * inv_n) * rs[{j}]")
            else:
                L.append(f"{ind}y{j} = np.float32(0.0)")
        L += _wht_lines(big_d, ind)
    else:
        for j in range(d):
            L.append(f"{ind}s{j} = np.float32(np.float64(v{j}) * inv_n)")
        for j in range(d, big_d):
            L.append(f"{ind}s{j} = np.float32(0.0)")
        for g in range(big_d // 3):
            for k in range(3):
                m = 9 * g + 3 * k
                L.append(f"{ind}y{3 * g + k} = rs[{m}] * s{3 * g} + rs[{m + 1}] * s{3 * g + 1}"
                         f" + rs[{m + 2}] * s{3 * g + 2}")
    # decision: a branchless bisection over the sorted boundaries (= the CPU's binary search)
    for j in range(big_d):
        L += _decide_lines(f"y{j}", f"c{j}", bits, ind)
    if norm_correction:
        L.append(f"{ind}cn = 0.0")
        for j in range(big_d):
            L.append(f"{ind}f = np.float64(centroids[c{j}])")
            L.append(f"{ind}cn += f * f")
        L += [f"{ind}if cn > 0.0:",
              f"{ind}    n = n / math.sqrt(cn)"]
    # pack LSB first into 32-bit words
    for w in range(nwords):
        L.append(f"{ind}o{w} = U32(0)")
    for j in range(big_d):
        p = j * bits
        w, s = p >> 5, p & 31
        L.append(f"{ind}o{w} |= U32(c{j} << U32({s}))" if s else f"{ind}o{w} |= c{j}")
        if s + bits > 32:
            L.append(f"{ind}o{w + 1} |= U32(c{j} >> U32({32 - s}))")
    if word_out:
        for w in range(nwords):
            L.append(f"{ind}codes[r, {w}] = o{w}")
    else:
        for byte in range(nbytes):
            L.append(f"{ind}codes[r, {byte}] = np.uint8((o{byte >> 2} >> U32({8 * (byte & 3)}))"
                     f" & U32(255))")
    L += [f"{ind}norms[r] = n",
          f"{ind}r += cuda.gridDim.x * cuda.blockDim.x"]
    kern = _build("quantize_fast", L, {"RSIZE": rsize, "LEVELS": levels})
    _kernels[key] = kern
    return kern


# ------------------------------------------------------------------------------------- WHT

def wht_kernel(n, half_in, half_out):
    """Orthonormal WHT of rows of length ``n``, one row per thread: ``(x, out)``, each (rows, n/2)
    uint32 fp16 pairs when half, else (rows, n) float32."""
    key = ("wht", n, half_in, half_out)
    if key in _kernels:
        return _kernels[key]
    L = ["def wht_fast(x, out):",
         "    r = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x",
         "    while r < out.shape[0]:"]
    ind = " " * 8
    L += _load_lines(n, half_in, ind, "y")
    L += _wht_lines(n, ind)
    if half_out:
        for w in range(n // 2):
            L.append(f"{ind}out[r, {w}] = half_bits(y{2 * w}) | (half_bits(y{2 * w + 1})"
                     " << U32(16))")
    else:
        for j in range(n):
            L.append(f"{ind}out[r, {j}] = y{j}")
    L.append(f"{ind}r += cuda.gridDim.x * cuda.blockDim.x")
    kern = _build("wht_fast", L, {})
    _kernels[key] = kern
    return kern
