"""CPU backend: Numba ``@njit`` kernels behind the same functions as :mod:`rotorq.cuda`.

Every function takes and returns numpy arrays; the public API validated them already.
Inputs are float32/float64, C-contiguous, 2-D (rows) unless said otherwise.
"""

import numpy as np

from . import bits, dequantize as _dq, qjl as _qjl, quantize as _q, rotate as _rot, scores as _sc
from . import wht as _wht

xp = np
name = "cpu"

_EMPTY_SKETCH = np.empty((0, 1), np.float32)


def _rows(x):
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float32)
    return np.ascontiguousarray(x)


def rotate(x, rot):
    """Rows ``x`` (n, d) → rotated rows (n, D) float32."""
    x = _rows(x)
    p = rot.params(np)
    if rot.kind == "dense":
        return np.ascontiguousarray(x.astype(np.float32, copy=False) @ p["matrix"].T)
    out = np.empty((x.shape[0], rot.stored_dim), np.float32)
    if rot.kind == "hadamard":
        _rot.rotate_hadamard(x, p["signs"], out)
    else:
        _rot.rotate_rotor(x, p["mats"], out)
    return out


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


def quantize(x, rot, boundaries, centroids, nbits, norm_correction, sketch):
    """Fused quantization of rows ``x``; ``sketch`` (m, D) float32 or None.

    Returns ``codes, norms, qjl_signs, qjl_norms`` (the last two empty without a sketch).
    """
    x = _rows(x)
    n = x.shape[0]
    big_d = rot.stored_dim
    sk = _EMPTY_SKETCH if sketch is None else sketch
    m = sk.shape[0]
    codes = np.empty((n, (big_d * nbits + 7) // 8), np.uint8)
    norms = np.empty(n, np.float32)
    signs = np.empty((n, (m + 7) // 8), np.uint8)
    qjl_norms = np.empty(n, np.float32)
    p = rot.params(np)
    args = (boundaries, centroids, nbits, norm_correction, sk, codes, norms, signs, qjl_norms)
    if rot.kind == "hadamard":
        _q.quantize_hadamard(x, p["signs"], *args)
    elif rot.kind == "rotor":
        _q.quantize_rotor(x, p["mats"], *args)
    else:
        _q.quantize_rotated(rotate(x, rot), *args)
    return codes, norms, signs, qjl_norms


def dequantize(codes, norms, rot, centroids, nbits):
    """Reconstruct rows (n, d) float32 from packed codes and norms."""
    n = codes.shape[0]
    p = rot.params(np)
    if rot.kind == "hadamard":
        out = np.empty((n, rot.dim), np.float32)
        _dq.dequantize_hadamard(codes, norms, p["signs"], centroids, nbits, out)
        return out
    if rot.kind == "rotor":
        out = np.empty((n, rot.dim), np.float32)
        _dq.dequantize_rotor(codes, norms, p["mats"], centroids, nbits, out)
        return out
    return unrotate(dequantize_rotated(codes, norms, rot.stored_dim, centroids, nbits), rot)


def dequantize_rotated(codes, norms, big_d, centroids, nbits):
    """Reconstructions in the rotated domain, (n, D) float32."""
    out = np.empty((codes.shape[0], big_d), np.float32)
    _dq.dequantize_rotated(codes, norms, centroids, nbits, out)
    return out


def scores(qrot, qsketch, qmap, codes, norms, signs, qjl_norms, kmap, centroids, nbits,
           qjl_scale):
    """Scores (B, M, N) of rotated queries (Bq, M, D) against packed keys (Bk, N, ·)."""
    out = np.empty((qmap.shape[0], qrot.shape[1], codes.shape[1]), np.float32)
    if qsketch is None:
        _sc.scores_mse(qrot, qmap, codes, norms, kmap, centroids, nbits, out)
    else:
        _sc.scores_prod(qrot, qsketch, qmap, codes, norms, signs, qjl_norms, kmap,
                        centroids, nbits, qjl_scale, out)
    return out


def qjl_quantize(x, sketch):
    """Packed ``sign(sketch @ x)`` and norms of rows ``x``."""
    x = _rows(x)
    signs = np.empty((x.shape[0], (sketch.shape[0] + 7) // 8), np.uint8)
    norms = np.empty(x.shape[0], np.float32)
    _qjl.qjl_quantize(x, sketch, signs, norms)
    return signs, norms


def qjl_scores(qsketch, qmap, signs, norms, kmap, scale):
    """QJL estimates (B, M, N) from sketched queries (Bq, M, m) and packed signs."""
    out = np.empty((qmap.shape[0], qsketch.shape[1], signs.shape[1]), np.float32)
    _qjl.qjl_scores(qsketch, qmap, signs, norms, kmap, scale, out)
    return out


def wht(x):
    """Orthonormal WHT of rows (n, D), D a power of two, float32 out."""
    x = _rows(x)
    out = np.empty(x.shape, np.float32)
    _wht.wht(x, out)
    return out


def unpack_codes(codes, nbits, count):
    """Unpack rows of packed codes into uint8 (n, count)."""
    out = np.empty((codes.shape[0], count), np.uint8)
    bits.unpack_codes(codes, nbits, count, out)
    return out
