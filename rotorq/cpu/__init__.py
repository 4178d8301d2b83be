"""CPU backend: Numba ``@njit`` kernels behind the same functions as :mod:`rotorq.cuda`.

Every function takes and returns numpy arrays; the public API validated them already.
Inputs are float32/float64, C-contiguous, 2-D (rows) unless said otherwise. Functions that
launch ``parallel=True`` kernels are :func:`._threads.serialized` (safe from several threads
under every Numba threading layer).
"""

from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

from .. import tiles
from .._ops import Partial
from . import _threads
from . import attention as _att
from . import bits as _bits
from . import dequantize as _dq
from . import qjl as _qjl
from . import quantize as _q
from . import rotate as _rot
from . import rotor as _rotor
from . import scores as _sc
from . import wht as _wht

xp = np
name = "cpu"

_EMPTY_SKETCH = np.empty((0, 1), np.float32)


def _rows(x):
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float32)
    return np.ascontiguousarray(x)


@_threads.serialized
def rotate(x, rot, scale=1.0):
    """Rows ``x`` (n, d) → rotated rows (n, D) float32, times ``scale`` (applied to the
    input rows in float64 by the kernels: no extra pass)."""
    x = _rows(x)
    p = rot.params(np)
    if rot.kind == "dense":
        out = np.ascontiguousarray(x.astype(np.float32, copy=False) @ p["matrix"].T)
        if scale != 1.0:
            out *= np.float32(scale)
        return out
    out = np.empty((x.shape[0], rot.stored_dim), np.float32)
    if rot.kind == "hadamard":
        _rot.rotate_hadamard(x, p["signs"], float(scale), out)
    else:
        _rot.rotate_rotor(x, p["mats"], float(scale), out)
    return out


@_threads.serialized
def unrotate(y, rot):
    """Rotated rows ``y`` (n, D) → rows (n, d) float32."""
    y = _rows(y).astype(np.float32, copy=False)
    p = rot.params(np)
    if rot.kind == "dense":
        return np.ascontiguousarray(y @ p["matrix"])
    out = np.empty((y.shape[0], rot.dim), np.float32)
    if rot.kind == "hadamard":
        _rot.unrotate_hadamard(y, p["signs"], out)
    else:
        _rot.unrotate_rotor(y, p["mats"], out)
    return out


@_threads.serialized
def quantize(x, rot, boundaries, centroids, bits, norm_correction, sketch):
    """Fused quantization of rows ``x``; ``sketch`` (m, D) float32 or None.

    Returns ``codes, norms, qjl_signs, qjl_norms`` (the last two empty without a sketch).
    """
    x = _rows(x)
    n = x.shape[0]
    stored_dim = rot.stored_dim
    sk = _EMPTY_SKETCH if sketch is None else sketch
    m = sk.shape[0]
    codes = np.empty((n, (stored_dim * bits + 7) // 8), np.uint8)
    norms = np.empty(n, np.float32)
    signs = np.empty((n, (m + 7) // 8), np.uint8)
    qjl_norms = np.empty(n, np.float32)
    p = rot.params(np)
    args = (boundaries, centroids, bits, norm_correction, sk, codes, norms, signs, qjl_norms)
    if rot.kind == "hadamard":
        _q.quantize_hadamard(x, p["signs"], *args)
    elif rot.kind == "rotor":
        _q.quantize_rotor(x, p["mats"], *args)
    else:
        _q.quantize_rotated(rotate(x, rot), *args)
    return codes, norms, signs, qjl_norms


@_threads.serialized
def dequantize(codes, norms, rot, centroids, bits):
    """Reconstruct rows (n, d) float32 from packed codes and norms."""
    n = codes.shape[0]
    p = rot.params(np)
    if rot.kind == "hadamard":
        out = np.empty((n, rot.dim), np.float32)
        _dq.dequantize_hadamard(codes, norms, p["signs"], centroids, bits, out)
        return out
    if rot.kind == "rotor":
        out = np.empty((n, rot.dim), np.float32)
        _dq.dequantize_rotor(codes, norms, p["mats"], centroids, bits, out)
        return out
    return unrotate(dequantize_rotated(codes, norms, rot.stored_dim, centroids, bits), rot)


@_threads.serialized
def dequantize_rotated(codes, norms, stored_dim, centroids, bits):
    """Reconstructions in the rotated domain, (n, D) float32."""
    out = np.empty((codes.shape[0], stored_dim), np.float32)
    _dq.dequantize_rotated(codes, norms, centroids, bits, out)
    return out


@_threads.serialized
def scores(qrot, qsketch, qmap, codes, norms, signs, qjl_norms, kmap, centroids, bits,
           qjl_scale):
    """Scores (B, M, N) of rotated queries (Bq, M, D) against packed keys (Bk, N, ·)."""
    out = np.empty((qmap.shape[0], qrot.shape[1], codes.shape[1]), np.float32)
    if qsketch is None:
        _sc.scores_mse(qrot, qmap, codes, norms, kmap, centroids, bits, out)
    else:
        _sc.scores_prod(qrot, qsketch, qmap, codes, norms, signs, qjl_norms, kmap,
                        centroids, bits, qjl_scale, out)
    return out


@_threads.serialized
def qjl_quantize(x, sketch):
    """Packed ``sign(sketch @ x)`` and norms of rows ``x``."""
    x = _rows(x)
    signs = np.empty((x.shape[0], (sketch.shape[0] + 7) // 8), np.uint8)
    norms = np.empty(x.shape[0], np.float32)
    _qjl.qjl_quantize(x, sketch, signs, norms)
    return signs, norms


@_threads.serialized
def qjl_scores(qsketch, qmap, signs, norms, kmap, scale):
    """QJL estimates (B, M, N) from sketched queries (Bq, M, m) and packed signs."""
    out = np.empty((qmap.shape[0], qsketch.shape[1], signs.shape[1]), np.float32)
    _qjl.qjl_scores(qsketch, qmap, signs, norms, kmap, scale, out)
    return out


@_threads.serialized
def wht(x, out_dtype=None):
    """Orthonormal WHT of rows (n, D), D a power of two; float32 out unless ``out_dtype``."""
    x = _rows(x)
    out = np.empty(x.shape, np.float32)
    _wht.wht(x, out)
    return out if out_dtype is None else out.astype(out_dtype, copy=False)


def prepare_scores(queries, rows, rot, sketch, qmap, codes, norms, signs, qjl_norms, kmap,
                   centroids, bits, qjl_scale, out_shape):
    """None: on a CPU a call costs no launches, so there is nothing to prepare
    (:meth:`rotorq.TurboQuant.prepare_scores` then checks and runs :func:`scores`)."""
    return None


@_threads.serialized
def unpack_codes(codes, bits, count):
    """Unpack rows of packed codes into uint8 (n, count)."""
    out = np.empty((codes.shape[0], count), np.uint8)
    _bits.unpack_codes(codes, bits, count, out)
    return out


_U8 = np.zeros((1, 1, 1), np.uint8)
_U16 = np.zeros((1, 1), np.uint16)
_F32 = np.zeros(1, np.float32)


_POOL = None
_POOL_SIZE = 0


def _run_tasks(kernel, n_tasks, args, shared=False):
    """Run ``kernel(lo, hi, *args)`` over ``range(n_tasks)`` on Numba's thread count.

    The kernel is ``nogil``, so the ranges run in parallel: the last one in the calling
    thread, the others on a small thread pool. ``shared``: the kernel calls share the
    tasks out among themselves (whatever range they are given), so once the calling
    thread's call returns, every task has been taken, and calls still waiting for a pool
    thread (one held up by other load) are cancelled instead of awaited.
    """
    global _POOL, _POOL_SIZE
    threads = min(numba.get_num_threads(), n_tasks)
    if threads <= 1:
        kernel(0, n_tasks, *args)
        return
    if _POOL_SIZE < threads - 1:
        _POOL = ThreadPoolExecutor(max_workers=threads - 1, thread_name_prefix="rotorq")
        _POOL_SIZE = threads - 1
    bounds = [n_tasks * i // threads for i in range(threads + 1)]
    futures = [_POOL.submit(kernel, bounds[i], bounds[i + 1], *args)
               for i in range(threads - 1)]
    try:
        kernel(bounds[-2], bounds[-1], *args)
    finally:
        for f in futures:
            if not (shared and f.cancel()):
                f.result()


def _split_chunk(n_keys, n_bh):
    """Tokens per split: ~64 (batch·head, split) tasks, at least 256 tokens each; depends
    only on the shapes (not the thread count), so results are reproducible."""
    splits = max(1, min(-(-n_keys // 256), -(-64 // max(1, n_bh))))
    chunk = -(-n_keys // splits)
    return -(-chunk // _att.TILE) * _att.TILE


def attention_layout(key_dim, key_bits, key_mode, value_dim, value_bits):
    """Storage layout of a KV cache's packed codes for :func:`decode_attention`: always
    "rows" on the CPU (the tile layout, :mod:`rotorq.tiles`, serves the GPU's tensor-core
    kernel; :func:`decode_attention` reads it too)."""
    return "rows"


def decode_attention(queries, keys, values, n_keys, n_q, causal_offset, key_bias=None,
                     layout="rows"):
    """Fused attention of rotated queries over packed keys and values (split-K, then the
    splits merged with the log-sum-exp rule); the contract is
    :func:`rotorq._ops.decode_attention`. Tiles of keys and values are decoded into float
    blocks and multiplied by BLAS (:mod:`rotorq.cpu.attention_fast`); the tile layout
    (:mod:`rotorq.tiles`) is converted to rows first."""
    if layout not in ("rows", "tiles"):
        raise ValueError(f"layout must be 'rows' or 'tiles', got {layout!r}")
    if layout == "tiles":
        keys, values = tiles.attention_rows(np, keys, values, n_keys,
                                            queries[0].rotated.shape[2])
    q0, qs0 = queries[0].rotated, queries[0].sketch
    n_bh, n_rows = q0.shape[0], q0.shape[1]
    empty_q = np.zeros((n_bh, n_rows, 0), np.float32)
    q1, qs1 = (queries[1].rotated, queries[1].sketch) if len(queries) > 1 else (empty_q, None)

    def kpart(i):  # the kernel's arguments of key part i (placeholders if absent)
        if i >= len(keys):
            return _U8, _U16, _U8, _U16, _F32, 1, 0.0
        k = keys[i]
        if not k.prod:
            return k.codes, k.norms.view(np.uint16), _U8, _U16, k.centroids, int(k.bits), 0.0
        return (k.codes, k.norms.view(np.uint16), k.signs, k.qjl_norms.view(np.uint16),
                k.centroids, int(k.bits), float(k.qjl_scale))

    def vpart(i):
        if i >= len(values):
            return _U8, _U16, _F32, 1, 0
        v = values[i]
        return v.codes, v.norms.view(np.uint16), v.centroids, int(v.bits), int(v.stored_dim)

    chunk = _split_chunk(n_keys, n_bh)
    n_split = max(1, -(-n_keys // chunk))
    v0, v1 = vpart(0), vpart(1)
    if key_bias is None:
        bias = (empty_q, empty_q, np.zeros(0, np.float64), 0)
    else:
        bias = (np.ascontiguousarray(key_bias.cos_coef, np.float32),
                np.ascontiguousarray(key_bias.sin_coef, np.float32),
                np.ascontiguousarray(key_bias.freqs, np.float64), int(key_bias.pos0))
    acc0 = np.empty((n_bh, n_split, n_rows, v0[4]), np.float32)
    acc1 = np.empty((n_bh, n_split, n_rows, v1[4]), np.float32)
    mx = np.empty((n_bh, n_split, n_rows), np.float32)
    sm = np.empty((n_bh, n_split, n_rows), np.float32)
    args = (np.ascontiguousarray(q0, np.float32), np.ascontiguousarray(q1, np.float32),
            empty_q if qs0 is None else np.ascontiguousarray(qs0, np.float32),
            empty_q if qs1 is None else np.ascontiguousarray(qs1, np.float32), *bias,
            *kpart(0), *kpart(1), *v0[:4], *v1[:4],
            int(n_keys), int(n_q), int(causal_offset), int(chunk), acc0, acc1, mx, sm)
    from . import attention_fast as _fast  # the twin's arguments and outputs, tiled for BLAS
    _fast.run(_run_tasks, n_bh * n_split, args)
    m = mx.max(axis=1)
    safe = np.where(np.isfinite(m), m, np.float32(0.0))
    w = np.exp(mx - safe[:, None, :])  # 0 for splits that saw nothing
    l_sum = (w * sm).sum(axis=1)
    accs = tuple(np.einsum("bsr,bsrd->brd", w, a) for a in (acc0, acc1)[:len(values)])
    return Partial(accs, m, l_sum)


def exact_attention(q, ke, ve, pos, scale, n_q, offset, causal, partial=None):
    """Attention of the rows ``q`` (BH, R, d) over uncompressed keys ``ke`` (BH, E, d) and
    values ``ve`` (BH, E, dv) at positions ``pos`` (E,), merged with the compressed part's
    :class:`~rotorq._ops.Partial` (one accumulator) or None: the normalized output
    (BH, R, dv) float32. On a CPU the array operations of
    :func:`rotorq.reference.exact_attention` (BLAS products) run; :func:`exact_attention_twin`
    runs the ``@njit`` twin of the CUDA kernel instead."""
    from ..reference import exact_attention as ref
    merged = None if partial is None else (partial.accs[0], partial.max, partial.sum)
    return ref(np, q, ke, ve, pos, scale, n_q, offset, causal, merged)


def exact_attention_twin(q, ke, ve, pos, scale, n_q, offset, causal, partial=None):
    """:func:`exact_attention` by the ``@njit`` twin of the CUDA kernel
    (:func:`rotorq.cpu.attention.exact_attention`: scalar float32 sums in the kernel's
    order), for parity tests; not part of the backend contract."""
    q = np.ascontiguousarray(q, np.float32)
    ke = np.ascontiguousarray(ke, np.float32)
    ve = np.ascontiguousarray(ve, np.float32)
    n_bh, n_rows = q.shape[:2]
    if partial is None:
        acc_c, m_c, l_c, has_c = _F32.reshape(1, 1, 1), _F32.reshape(1, 1), \
            _F32.reshape(1, 1), False
    else:
        acc_c, m_c, l_c = (np.ascontiguousarray(a, np.float32)
                           for a in (partial.accs[0], partial.max, partial.sum))
        has_c = True
    out = np.empty((n_bh, n_rows, ve.shape[2]), np.float32)
    _att.exact_attention(q, ke, ve, np.ascontiguousarray(pos, np.int64), ke.shape[1],
                         np.float32(scale), int(n_q), int(offset), bool(causal), acc_c, m_c,
                         l_c, has_c, np.empty(max(1, ke.shape[1]), np.float32), out)
    return out


@_threads.serialized
def rotor_roundtrip(x, rot, boundaries, centroids, norm_correction):
    """Rotor-quantized reconstructions (n, d) float32 of rows ``x``, in one fused pass."""
    x = _rows(x)
    out = np.empty((x.shape[0], rot.dim), np.float32)
    _rotor.rotor_roundtrip(x, rot.params(np)["mats"], boundaries, centroids, norm_correction,
                           out)
    return out
