"""The tiers of a KV cache that hold tokens as numbers, not codes: pending, sinks, window.

- :class:`Pending`: every token, in float32, until the key offset is fitted.
- :class:`Sinks`: the first ``sink_tokens`` tokens of the sequence, in float16 (float32
  once a value exceeds float16's range), never compressed.

(The recent window is in :mod:`rotorq.kv.window`.) Like :class:`~rotorq.kv.codes.Codes`,
each is a value: ``extended`` returns a new one, writing new tokens past the live range of
a shared buffer or into a new buffer, so the tokens an older value holds never change.
"""

from __future__ import annotations

import numpy as np

FP16_MAX = float(np.finfo(np.float16).max)


class Pending:
    """Tokens held in float32 while the key offset waits for its tokens.

    Invariant: ``keys[:, :count]``, ``values[:, :count]`` are the cache's tokens 0 … count − 1
    as appended (float32, (BH, capacity, d))."""

    __slots__ = ("count", "keys", "values")

    def __init__(self, keys=None, values=None, count=0):
        self.keys, self.values, self.count = keys, values, count

    def extended(self, xp, k, v):
        """These tokens followed by ``k``, ``v`` (BH, t, d) float32."""
        p, t = self.count, k.shape[1]
        keys = _room(xp, self.keys, p + t, p, k, 64)
        values = _room(xp, self.values, p + t, p, v, 64)
        keys[:, p:p + t] = k
        values[:, p:p + t] = v
        return Pending(keys, values, p + t)

    def tokens(self):
        """``(keys, values)`` (BH, count, d): views of the live tokens."""
        return self.keys[:, :self.count], self.values[:, :self.count]

    def nbytes(self, n_bh_d):
        """Bytes held (float32 keys and values; ``n_bh_d``: heads · head_dim per sequence)."""
        return self.count * n_bh_d * 2 * 4


class Sinks:
    """The first tokens of the sequence, kept as they came (attention sinks).

    Invariant: ``keys[:, :count]``, ``values[:, :count]`` are tokens 0 … count − 1, float16
    unless a value of the stream exceeded float16's range (then float32); capacity
    ``sink_tokens``."""

    __slots__ = ("count", "keys", "values")

    def __init__(self, keys=None, values=None, count=0):
        self.keys, self.values, self.count = keys, values, count

    def extended(self, xp, k, v, capacity):
        """These sinks followed by ``k``, ``v`` (BH, n, d) float32 (count + n ≤ capacity)."""
        p0 = self.count
        keys = _sink_store(xp, self.keys, k, p0, capacity)
        values = _sink_store(xp, self.values, v, p0, capacity)
        return Sinks(keys, values, p0 + k.shape[1])

    def nbytes(self, n_bh_d):
        """Bytes held by one sequence's sinks (``n_bh_d``: heads · head_dim)."""
        if not self.count:
            return 0
        return self.count * n_bh_d * (self.keys.itemsize + self.values.itemsize)


def _room(xp, buf, need, used, like, first_cap):
    """``buf``, or a new float32 (BH, cap, d) buffer holding its first ``used`` tokens, with
    room for ``need`` tokens."""
    if buf is not None and buf.shape[1] >= need:
        return buf
    cap = max(need, first_cap if buf is None else 2 * buf.shape[1])
    new = xp.empty((like.shape[0], cap, like.shape[2]), xp.float32)
    if buf is not None and used:
        new[:, :used] = buf[:, :used]
    return new


def _sink_store(xp, buf, x, p0, capacity):
    """``buf`` with sink tokens ``x`` (BH, n, d) written at ``p0`` (a new float32 buffer when
    ``x`` exceeds float16's range and ``buf`` is float16)."""
    if buf is None:
        buf = xp.empty((x.shape[0], capacity, x.shape[2]), xp.float16)
    if buf.dtype == xp.float16 and x.size and float(xp.abs(x).max()) > FP16_MAX:
        buf = buf.astype(xp.float32)
    buf[:, p0:p0 + x.shape[1]] = x
    return buf
