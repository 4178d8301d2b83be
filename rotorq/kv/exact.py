"""The exact part of attention: the sinks and the window as float32 rows, kept decoded.

Attention over the tokens outside the base tier's codes runs on float32 keys and values
(:func:`rotorq.reference.exact_attention`). :class:`ExactRows` keeps them decoded across
calls — a call decodes only the window tokens that arrived since the last one — as a
cache of the committed state: it is rebuilt from that state whenever it does not match,
and it marks itself empty before it changes its rows, so an interrupted refresh leaves it
merely empty.
"""

from __future__ import annotations


class ExactRows:
    """Keys, values (BH, E, d) float32 and positions (E,) of the sinks and the window.

    Rows ``0 … n_sinks`` hold the sinks, then rows of window tokens from position
    ``first`` on (``n_window`` of them, decoded and restored; minus the key offset where
    the frame leaves it out, :attr:`rotorq.kv.keys.KeyFrame.post_rope_offset`)."""

    def __init__(self, min_capacity):
        self.min_capacity = min_capacity
        self.keys = self.values = self.positions = None
        self.n_sinks = self.n_window = 0
        self.first = 0

    def rows(self, state):
        """``(keys, values, positions)`` of ``state``'s tokens outside the base tier's codes:
        the pending tokens, or the sinks and the window; None when there are none."""
        xp = state.setup.xp
        if state.pending.count:
            k, v = state.pending.tokens()
            return k, v, xp.arange(state.pending.count)
        sinks, window, frame = state.sinks, state.window, state.frame
        n_s, w = sinks.count, window.count
        e = n_s + w
        if not e:
            return None
        first = n_s + state.base.count  # position of the window's first token
        n_bh, d = state.setup.n_bh, frame.head_dim
        if self.keys is None or self.keys.shape[1] < e or self.keys.shape[0] != n_bh:
            cap = max(e, n_s + self.min_capacity,
                      2 * (0 if self.keys is None else self.keys.shape[1]))
            self.n_sinks = self.n_window = 0
            self.keys = xp.empty((n_bh, cap, d), xp.float32)
            self.values = xp.empty((n_bh, cap, d), xp.float32)
            self.positions = xp.empty(cap, xp.int64)
        minus_offset = frame.post_rope_offset
        if self.n_sinks != n_s:  # the window's rows start after the sinks: all stale
            self.n_sinks = self.n_window = 0
            self.keys[:, :n_s] = sinks.keys[:, :n_s]
            if minus_offset:
                self.keys[:, :n_s] -= frame.mu[:, None, :]
            self.values[:, :n_s] = sinks.values[:, :n_s]
            self.positions[:n_s] = xp.arange(n_s)
            self.n_sinks, self.first = n_s, first
        if self.first != first:  # tokens left the window for the codes
            gone, keep = first - self.first, self.n_window - (first - self.first)
            self.n_window = 0
            if gone > 0 and keep > 0:
                a = n_s
                for buf in (self.keys, self.values):
                    buf[:, a:a + keep] = buf[:, a + gone:a + gone + keep].copy()
                self.positions[a:a + keep] = self.positions[a + gone:a + gone + keep].copy()
            else:
                keep = 0
            self.first = first
            self.n_window = keep
        lo = self.n_window
        if lo < w:
            kd, vd = window.decoded(xp, state.setup.be, frame, lo, w, first,
                                    with_offset=not minus_offset)
            self.keys[:, n_s + lo:e] = kd
            self.values[:, n_s + lo:e] = vd
            self.positions[n_s + lo:e] = xp.arange(first + lo, first + w)
            self.n_window = w
        return self.keys[:, :e], self.values[:, :e], self.positions[:e]
