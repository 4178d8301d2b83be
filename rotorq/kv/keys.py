"""The key preparation of a KV cache: key offset, channel scales, outlier permutations.

Keys are stored as ``s ⊙ (k_t − m_t)`` (:mod:`rotorq.kv.prep` explains each transform):
``m_t`` the per-sequence key offset (a post-RoPE mean ``μ``, or with ``rope_base`` the
pre-RoPE mean rotated to position ``t``), ``s`` calibrated channel scales (``1/s`` goes to
the queries). With outlier channels, each sequence·KV head's channels are permuted so that
the normal channels come first and the outlier channels last, for keys and values apart.

A :class:`KeyFrame` is fitted once, when the cache leaves its pending phase, and never
changes; it lives on the device of the cache.
"""

from __future__ import annotations

import numpy as np

from .prep import _host, _mean_key


class KeyFrame:
    """The fitted key offset, channel scales and channel permutations of one cache.

    Attributes (device arrays or None)
    ----------------------------------
    mu : (BH, d) float32
        The key offset (post-RoPE, or pre-RoPE with RoPE frequencies), rounded once to
        float16.
    freqs : (d/2,) float64
        RoPE angles ``θ_i`` of a RoPE-aware offset.
    scales : (BH, d) float32
        Key channel scales.
    kperm, vperm : (BH, d) int64
        Channel order of keys and values: normal channels, then outlier channels.
    kinv, vinv : (BH, d) int64
        Their inverses.
    """

    __slots__ = ("freqs", "head_dim", "kinv", "kperm", "mu", "scales", "vinv", "vperm", "xp")

    def __init__(self, xp, head_dim, mu=None, freqs=None, scales=None, kperm=None, vperm=None):
        self.xp, self.head_dim = xp, head_dim
        self.mu, self.freqs, self.scales = mu, freqs, scales
        self.kperm, self.vperm = kperm, vperm
        self.kinv = None if kperm is None else xp.argsort(kperm, axis=1)
        self.vinv = None if vperm is None else xp.argsort(vperm, axis=1)

    @classmethod
    def fit(cls, xp, k, v, *, heads, sink_tokens, key_offset, offset_tokens, rope_base,
            key_scales, n_outliers, outliers):
        """Fit the frame on the first tokens ``k``, ``v`` (BH, T, d) float32 of the cache.

        The offset is the mean of tokens ``sink_tokens … sink_tokens + offset_tokens − 1``
        (un-rotated first with ``rope_base``); automatic outlier channels (``outliers``
        None, ``n_outliers > 0``) are the ``n_outliers`` channels of largest RMS per KV
        head over every sequence and (up to 8192 evenly spaced) tokens after the sinks, of
        the prepared keys and of the values; ``outliers`` (heads, k): given channels.
        """
        n_bh, _, d = k.shape
        s0 = sink_tokens
        mu = freqs = scales = None
        if key_offset:
            block = _host(k[:, s0:s0 + offset_tokens])
            mean = _mean_key(block, np.arange(s0, s0 + block.shape[1]), rope_base)
            with np.errstate(over="ignore"):  # an offset beyond float16 makes inf norms:
                mean = mean.astype(np.float16)  # the append is refused by its checks
            mu = xp.asarray(mean.astype(np.float32))  # rounded once, to float16
            if rope_base is not None:
                freqs = xp.asarray(rope_base ** (-np.arange(0, d, 2, dtype=np.float64) / d))
        if key_scales is not None:
            scales = xp.asarray(np.tile(key_scales, (n_bh // heads, 1)))
        frame = cls(xp, d, mu, freqs, scales)

        def perm_for(x):
            if not n_outliers:
                return None
            if outliers is not None:
                out = outliers
            else:
                sub = x[:, ::max(1, x.shape[1] // 8192)]
                rms = _host(xp.einsum("btd,btd->bd", sub, sub).reshape(-1, heads, d).sum(axis=0))
                out = np.sort(np.argsort(-rms, axis=1, kind="stable")[:, :n_outliers], axis=1)
            normal = np.array([np.setdiff1d(np.arange(d), o) for o in out])
            perm = np.concatenate([normal, out], axis=1)
            return xp.asarray(np.tile(perm, (n_bh // heads, 1)))

        first = s0 if k.shape[1] > s0 else 0
        return cls(xp, d, mu, freqs, scales, perm_for(frame.prep(k[:, first:], first)),
                   perm_for(v[:, first:]))

    # -- the key transform --------------------------------------------------------------
    @property
    def post_rope_offset(self) -> bool:
        """Whether the offset is one post-RoPE vector (no RoPE frequencies): its term ``q·μ``
        is the same for every key of a query, so the cache leaves it out of the exact part's
        keys as well (softmax ignores it)."""
        return self.mu is not None and self.freqs is None

    def offsets(self, p0, n):
        """The key offsets ``m_t`` of positions ``p0 … p0 + n − 1``: (BH, n or 1, d) float32."""
        xp, mu = self.xp, self.mu
        if self.freqs is None:
            return mu[:, None, :]
        ang = xp.arange(p0, p0 + n, dtype=xp.float64)[:, None] * self.freqs[None, :]
        cos, sin = xp.cos(ang).astype(xp.float32), xp.sin(ang).astype(xp.float32)
        h = self.head_dim // 2
        m1, m2 = mu[:, None, :h], mu[:, None, h:]
        return xp.concatenate([m1 * cos - m2 * sin, m2 * cos + m1 * sin], axis=2)

    def prep(self, k, p0):
        """``s ⊙ (k − m_t)`` for keys ``(BH, n, d)`` at positions ``p0 …``."""
        if self.mu is not None:
            k = k - self.offsets(p0, k.shape[1])
        if self.scales is not None:
            k = k * self.scales[:, None, :]
        return k

    def restore(self, kp, p0, offset=True):
        """Inverse of :meth:`prep` (``offset=False``: the key offset left out)."""
        if self.scales is not None:
            kp = kp / self.scales[:, None, :]
        if self.mu is not None and offset:
            kp = kp + self.offsets(p0, kp.shape[1])
        return kp

    # -- the query side -----------------------------------------------------------------
    def bias_coefficients(self, q):
        """``(A, B)`` (BH, R, d/2) of the RoPE-aware offset term ``q·RoPE_t(μ) =
        Σ_i A_i cos(tθ_i) + B_i sin(tθ_i)`` for query rows ``q`` (BH, R, d)."""
        h = self.head_dim // 2
        mu = self.mu[:, None, :]
        q1, q2 = q[..., :h], q[..., h:]
        a = q1 * mu[..., :h] + q2 * mu[..., h:]
        b = q2 * mu[..., :h] - q1 * mu[..., h:]
        return self.xp.ascontiguousarray(a), self.xp.ascontiguousarray(b)

    def offset_scores(self, q, p0, n):
        """``q·m_t`` for positions ``p0 … p0 + n − 1``: (BH, R, n) (or (BH, R, 1) for a
        post-RoPE offset)."""
        xp = self.xp
        if self.freqs is None:
            return q @ self.mu[:, :, None]
        a, b = self.bias_coefficients(q)
        out = xp.empty(q.shape[:2] + (n,), xp.float32)
        step = 1 << 14
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            ang = xp.arange(p0 + lo, p0 + hi, dtype=xp.float64)[None, :] * self.freqs[:, None]
            out[:, :, lo:hi] = a @ xp.cos(ang).astype(xp.float32) \
                + b @ xp.sin(ang).astype(xp.float32)
        return out

    def query_rows(self, q):
        """Query rows (BH, R, d) in the keys' stored frame: divided by the scales, channels
        permuted like the keys."""
        if self.scales is not None:
            q = q / self.scales[:, None, :]
        if self.kperm is not None:
            q = self.xp.take_along_axis(q, self.kperm[:, None, :], axis=2)
        return q


def outlier_channels(perm, heads, n_outliers):
    """The outlier channels per KV head, (heads, k) sorted, of a channel order ``perm``."""
    if perm is None or not n_outliers:
        return None
    d = perm.shape[1]
    return np.sort(_host(perm[:heads, d - n_outliers:]), axis=1)
