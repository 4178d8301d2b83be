"""Plain numpy reference of every method: the test oracle, in float64, no Numba.

It follows the formulas of docs/math.md literally (explicit rotation matrices, searchsorted
encoding, numpy bit packing) so that the kernels can be checked against it.
"""

from __future__ import annotations

import numpy as np


def pack_bits(idx, bits):
    """Pack codes ``idx (n, D)`` (< 2**bits) into LSB-first byte rows ``(n, ceil(D*bits/8))``.

    Examples
    --------
    >>> import numpy as np
    >>> from rotorq.reference import pack_bits
    >>> pack_bits(np.array([[1, 2, 3]]), 3).tolist()   # 001 010 011 → 0b11010001, 0b0
    [[209, 0]]
    """
    idx = np.asarray(idx, dtype=np.uint16)
    planes = (idx[..., None] >> np.arange(bits)) & 1
    flat = planes.reshape(idx.shape[0], -1).astype(np.uint8)
    return np.packbits(flat, axis=1, bitorder="little")


def unpack_bits(codes, bits, count):
    """Inverse of :func:`pack_bits`."""
    flat = np.unpackbits(codes, axis=1, bitorder="little")[:, : count * bits]
    planes = flat.reshape(codes.shape[0], count, bits).astype(np.uint16)
    return (planes << np.arange(bits)).sum(-1).astype(np.uint8)


def quantize(tq, x):
    """Reference TurboQuant encoding of rows ``x (n, dim)``.

    Returns a dict with ``idx (n, D)``, ``norms``, the unit-scale rotated rows ``y``, and in
    prod mode ``signs (n, m)`` bool and ``qjl_norms`` — all unpacked, float64.
    """
    x = np.asarray(x, dtype=np.float64)
    m = tq.rotation.matrix()
    n = np.linalg.norm(x, axis=1)
    y = (x @ m.T) / np.where(n > 0, n, 1.0)[:, None]
    idx = np.searchsorted(tq.boundaries.astype(np.float64), y, side="right")
    c = tq.centroids.astype(np.float64)[idx]
    stored = n.copy()
    if tq.norm_correction:
        cn = np.linalg.norm(c, axis=1)
        stored = np.where(cn > 0, n / np.where(cn > 0, cn, 1.0), n)
    out = {"idx": idx.astype(np.uint8), "norms": stored, "y": y}
    if tq.mode == "prod":
        r = n[:, None] * y - stored[:, None] * c
        out["signs"] = (r @ tq.sketch.astype(np.float64).T) >= 0
        out["qjl_norms"] = np.linalg.norm(r, axis=1)
    return out


def reconstruct_rotated(tq, enc):
    """Rotated-domain reconstructions ``norm · c[idx]`` (n, D)."""
    return enc["norms"][:, None] * tq.centroids.astype(np.float64)[enc["idx"]]


def dequantize(tq, enc):
    """Reference reconstruction (n, dim), including the QJL term in prod mode."""
    y = reconstruct_rotated(tq, enc)
    if tq.mode == "prod":
        pm = np.where(enc["signs"], 1.0, -1.0)
        y = y + tq.qjl_scale * enc["qjl_norms"][:, None] * (pm @ tq.sketch.astype(np.float64))
    return y @ tq.rotation.matrix()


def scores(tq, queries, enc):
    """Reference scores of ``queries (m, dim)`` against encoded keys → ``(m, n)``."""
    q = np.asarray(queries, dtype=np.float64)
    qrot = q @ tq.rotation.matrix().T
    s = qrot @ reconstruct_rotated(tq, enc).T
    if tq.mode == "prod":
        pm = np.where(enc["signs"], 1.0, -1.0)
        s = s + tq.qjl_scale * (qrot @ tq.sketch.astype(np.float64).T) @ (pm * enc["qjl_norms"][:, None]).T
    return s


def qjl_quantize(qjl, x):
    """Reference QJL: ``sign(S x) >= 0`` as bool (n, m) and norms."""
    x = np.asarray(x, dtype=np.float64)
    return (x @ qjl.sketch.astype(np.float64).T) >= 0, np.linalg.norm(x, axis=1)


def qjl_scores(qjl, queries, signs, norms):
    """Reference QJL estimator ``√(π/2)/m · ‖k‖ · ⟨S q, sign(S k)⟩`` → (m_q, n)."""
    qs = np.asarray(queries, dtype=np.float64) @ qjl.sketch.astype(np.float64).T
    return qjl.scale * (qs @ np.where(signs, 1.0, -1.0).T) * norms[None, :]


def public_reference_quantize(x, rotation_matrix, centroids):
    """The public PyTorch reference approach in numpy: dense matmul, argmin over centroids,
    uint8 indices (used as a speed anchor in benchmarks)."""
    n = np.linalg.norm(x, axis=1, keepdims=True)
    y = (x / np.where(n > 0, n, 1)) @ rotation_matrix.T
    idx = np.abs(y[..., None] - centroids).argmin(-1).astype(np.uint8)
    return idx, n


def exact_attention(xp, q, ke, ve, pos, scale, n_q, offset, causal, partial=None):
    """Softmax attention of query rows over uncompressed keys and values, merged with the
    compressed part's partial sums: the oracle of the backends' ``exact_attention``.

    ``q`` (BH, R, d), ``ke`` (BH, E, d), ``ve`` (BH, E, dv) float32, ``pos`` (E,) the tokens'
    positions; row ``r`` sees position ``p`` iff not ``causal`` or ``p <= r % n_q +
    offset``. ``partial``: ``(acc (BH, R, dv), m (BH, R), l (BH, R))`` of the compressed
    tokens (``acc = Σ exp(s − m) v``, ``l = Σ exp(s − m)``) or None. Returns the normalized
    output (BH, R, dv) float32. Works on numpy or cupy (``xp``), in float32 as the
    backends do.
    """
    s = (q @ xp.swapaxes(ke, 1, 2)) * np.float32(scale)
    if causal:
        limit = xp.arange(q.shape[1]) % n_q + offset
        s = xp.where(pos[None, None, :] <= limit[None, :, None], s, np.float32(-np.inf))
    m_e = s.max(axis=2)
    safe = xp.where(xp.isfinite(m_e), m_e, np.float32(0.0))
    p = xp.exp(s - safe[:, :, None])
    l_e = p.sum(axis=2)
    acc_e = p @ ve
    if partial is None:
        return (acc_e / l_e[:, :, None]).astype(np.float32)
    acc_c, m_c, l_c = partial
    m = xp.maximum(m_c, m_e)
    a = xp.exp(m_c - m)
    b = xp.exp(m_e - m)
    out = (acc_c * a[:, :, None] + acc_e * b[:, :, None]) / (a * l_c + b * l_e)[:, :, None]
    return out.astype(np.float32)
