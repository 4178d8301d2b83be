"""The recent window of a KV cache, in its two modes, and how tokens leave it for the codes.

After ``T`` tokens (once the key offset is fitted) the base tier holds the oldest
``max(0, ⌊(T − sinks − R) / B⌋ · B)`` tokens after the sinks (``R = residual_tokens``,
``B = block_tokens``); the window holds the rest, ``R`` to ``R + B − 1`` tokens.

- :class:`QuantizedWindow` (``residual_bits`` an int): every token enters the window
  quantized at ``residual_bits`` (MSE mode, the window's own rotations); leaving it, it is
  decoded and re-quantized at the base bits from those codes — the same path for a prefill
  and for one token at a time.
- :class:`FloatWindow` (``residual_bits=None``): the window keeps tokens as appended, in
  float32; leaving it, they are quantized at the base bits.

Each window is a value: :meth:`advance` returns the next base tier and window and changes
neither the old ones nor the tokens they hold.
"""

from __future__ import annotations

from .codes import Codes, Compressed


class QuantizedWindow:
    """The window's keys (prepared and permuted like the base tier's) and values as codes
    at ``residual_bits``: two :class:`~rotorq.kv.codes.Codes` of equal ``count``."""

    __slots__ = ("keys", "values")

    def __init__(self, keys: Codes, values: Codes):
        self.keys, self.values = keys, values

    @property
    def count(self) -> int:
        """Tokens in the window."""
        return self.keys.count

    @property
    def row_bytes(self) -> int:
        """Stored bytes of one window token of one sequence·KV head."""
        return self.keys.row_bytes + self.values.row_bytes

    def advance(self, xp, be, frame, base: Compressed, k, v, p0, n_out, checks, limit):
        """Add tokens ``k``, ``v`` (BH, t, d) float32 at positions ``p0 …``, then move the
        window's oldest ``n_out`` tokens to ``base``; returns ``(base, window)``.

        The new tokens' stored norms (and with them NaN or Inf input) are checked with one
        synchronization before anything is written; the base tier checks its own."""
        new_k = self.keys.quantize(xp, frame.prep(k, p0), frame.kperm, checks, "keys")
        new_v = self.values.quantize(xp, v, frame.vperm, checks, "values")
        checks.verify()
        keys, values = self.keys.extended(xp, new_k), self.values.extended(xp, new_v)
        if n_out:
            kd = keys.decode(xp, be, frame.kinv, 0, n_out)
            vd = values.decode(xp, be, frame.vinv, 0, n_out)
            base = base.extended(xp, frame, kd, vd, checks)
            keys, values = keys.dropped(xp, n_out, limit), values.dropped(xp, n_out, limit)
        return base, QuantizedWindow(keys, values)

    def decoded(self, xp, be, frame, lo, hi, first, with_offset):
        """Float32 keys (restored; ``with_offset``: the key offset added back) and values
        (BH, hi − lo, d) of window tokens ``lo … hi`` (``first``: the window's position)."""
        kd = frame.restore(self.keys.decode(xp, be, frame.kinv, lo, hi), first + lo,
                           offset=with_offset)
        return kd, self.values.decode(xp, be, frame.vinv, lo, hi)


class FloatWindow:
    """The window in float32: ``keys[:, start:start + count]``, ``values[:, start:start +
    count]`` are its tokens in order, as appended (keys before the key transform)."""

    __slots__ = ("capacity", "count", "keys", "start", "values")

    def __init__(self, capacity, keys=None, values=None, start=0, count=0):
        self.capacity = capacity  # tokens a new buffer holds at least
        self.keys, self.values, self.start, self.count = keys, values, start, count

    row_bytes = None  # no codes: float32 keys and values

    def tokens(self, lo=0, hi=None):
        """``(keys, values)`` of window tokens ``lo … hi`` (views)."""
        hi = self.count if hi is None else hi
        a = self.start
        return self.keys[:, a + lo:a + hi], self.values[:, a + lo:a + hi]

    def advance(self, xp, be, frame, base: Compressed, k, v, p0, n_out, checks, limit):
        """Add tokens ``k``, ``v`` (BH, t, d) float32 at positions ``p0 …`` and move the
        oldest ``n_out`` tokens (of the window, then of the new ones) to ``base``; returns
        ``(base, window)``.

        The tokens that stay are checked to fit float16 norms once quantized (their
        prepared keys' and their values' vector norms), with the base tier's check."""
        w = self.count
        from_win = min(n_out, w)
        from_new = n_out - from_win
        stay_k, stay_v = k[:, from_new:], v[:, from_new:]
        if checks.enabled:
            checks.norms(frame.prep(stay_k, p0 + from_new), "keys",
                         " (after the key offset and channel scales)")
            checks.norms(stay_v, "values")
        if n_out:
            old_k, old_v = self.tokens(0, from_win) if from_win else (None, None)
            blocks = []
            for old, new in ((old_k, k), (old_v, v)):
                blocks.append(old if from_new == 0 else (
                    new[:, :from_new] if from_win == 0
                    else xp.concatenate([old, new[:, :from_new]], axis=1)))
            base = base.extended(xp, frame, frame.prep(blocks[0], p0 - w), blocks[1], checks)
        return base, self._dropped(from_win)._extended(xp, stay_k, stay_v)

    def _dropped(self, n):
        return FloatWindow(self.capacity, self.keys, self.values, self.start + n,
                           self.count - n)

    def _extended(self, xp, k, v):
        t = k.shape[1]
        if t == 0:
            return self
        keys, values, start, n = self.keys, self.values, self.start, self.count
        if keys is None or start + n + t > keys.shape[1]:
            cap = max(self.capacity, 2 * (n + t))
            keys, values = (_moved(xp, buf, start, n, cap, like)
                            for buf, like in ((keys, k), (values, v)))
            start = 0
        keys[:, start + n:start + n + t] = k
        values[:, start + n:start + n + t] = v
        return FloatWindow(self.capacity, keys, values, start, n + t)

    def decoded(self, xp, be, frame, lo, hi, first, with_offset):
        """Float32 keys (minus the key offset unless ``with_offset``) and values of window
        tokens ``lo … hi``."""
        kd, vd = self.tokens(lo, hi)
        if not with_offset and frame.mu is not None:
            kd = kd - frame.offsets(first + lo, hi - lo)
        return kd, vd


def _moved(xp, buf, start, n, cap, like):
    """A new float32 (BH, cap, d) buffer holding tokens ``start … start + n`` of ``buf``."""
    new = xp.empty((like.shape[0], cap, like.shape[2]), xp.float32)
    if buf is not None and n:
        new[:, :n] = buf[:, start:start + n]
    return new
