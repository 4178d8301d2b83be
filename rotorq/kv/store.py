"""The state of a KV cache and how one append builds the next state.

A :class:`State` is a value made of the tiers' values (:mod:`rotorq.kv.tiers`,
:mod:`rotorq.kv.codes`, :mod:`rotorq.kv.window`) and the fitted key frame
(:mod:`rotorq.kv.keys`). :func:`appended` computes the state after an append without
changing the one it starts from — new tokens go past the live ranges of shared buffers or
into new buffers — and the cache commits it with one assignment: an append that raises,
whatever the exception and wherever it comes, leaves the cache exactly as it was.

Tokens are checked by the tier they end the append in (:class:`rotorq.kv.checks.Checks`,
one synchronization per check point): NaN or Inf anywhere; then norms beyond float16's
range — as stored, for tokens quantized in this append; the prepared keys' and the
values' vector norms, for tokens entering a float32 window; the keys' and values' vector
norms, for tokens held pending (their stored norms depend on the key offset not yet
fitted). Sinks are kept as they come (float32 where float16 is too small).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .checks import Checks
from .codes import Compressed
from .keys import KeyFrame
from .tiers import Pending, Sinks
from .window import FloatWindow, QuantizedWindow


@dataclasses.dataclass(frozen=True)
class Setup:
    """What the first non-empty append fixes: the input's origin (framework and device),
    its backend module and array namespace, the keys' and values' dtype names, the batch
    size (None: unbatched) and the number of sequence·KV head rows."""

    origin: Any
    be: Any
    xp: Any
    dtypes: tuple
    batch: int | None
    n_bh: int


@dataclasses.dataclass(frozen=True)
class Plan:
    """The fixed configuration of a cache that storing needs (:class:`rotorq.KVCache`'s
    arguments, checked), with its empty base tier and window."""

    heads: int
    head_dim: int
    sink_tokens: int
    residual_tokens: int
    block_tokens: int
    key_offset: bool
    offset_tokens: int
    rope_base: float | None
    key_scales: Any
    n_outliers: int
    outliers: Any  # explicit outlier channels (heads, k), or None: chosen at the fit
    check_finite: bool
    base: Compressed
    window: QuantizedWindow | FloatWindow


@dataclasses.dataclass(frozen=True)
class State:
    """Everything a cache holds: ``pending`` tokens until the key ``frame`` is fitted,
    then ``sinks``, the ``base`` tier and the ``window``, in token order."""

    setup: Setup | None
    frame: KeyFrame | None
    pending: Pending
    sinks: Sinks
    base: Compressed
    window: QuantizedWindow | FloatWindow

    def __len__(self):
        return self.pending.count + self.sinks.count + self.base.count + self.window.count


def initial_state(plan: Plan) -> State:
    """The state of an empty cache."""
    return State(None, None, Pending(), Sinks(), plan.base, plan.window)


def appended(plan: Plan, state: State, setup: Setup, k, v) -> State:
    """The state after appending tokens ``k``, ``v`` (BH, t, d) float32 (``t > 0``) to
    ``state``; raises ``ValueError`` for refused input, leaving ``state`` unchanged."""
    xp = setup.xp
    checks = Checks(xp, plan.check_finite, k, v)
    if state.frame is None:
        # before the key offset is fitted every token waits in float32
        before = state.pending.count
        pending = state.pending.extended(xp, k, v)
        if plan.key_offset and pending.count < plan.sink_tokens + plan.offset_tokens:
            checks.finite()
            first = max(0, plan.sink_tokens - before)  # tokens that will not be sinks
            checks.norms(k[:, first:], "keys", " (held pending until the key offset is fitted)")
            checks.norms(v[:, first:], "values")
            checks.verify()
            return dataclasses.replace(state, setup=setup, pending=pending)
        checks.finite()
        checks.verify()
        pk, pv = pending.tokens()
        frame = KeyFrame.fit(xp, pk, pv, heads=plan.heads, sink_tokens=plan.sink_tokens,
                             key_offset=plan.key_offset, offset_tokens=plan.offset_tokens,
                             rope_base=plan.rope_base, key_scales=plan.key_scales,
                             n_outliers=plan.n_outliers, outliers=plan.outliers)
        base = plan.base
        if len(base.keys.parts) == 1 and len(base.values.parts) == 1:
            kq, vq = base.keys.parts[0].tq, base.values.parts[0].tq
            base = base.with_layout(setup.be.attention_layout(
                kq.stored_dim, kq.mse_bits, kq.mode, vq.stored_dim, vq.mse_bits))
        fitted = State(setup, frame, Pending(), Sinks(), base, plan.window)
        return _stored(plan, fitted, pk, pv, 0, checks)
    # once every new token is quantized as it comes (past the sinks, with a quantized
    # window), NaN or Inf make non-finite norms, which the window's check refuses
    if not (isinstance(state.window, QuantizedWindow) and len(state) >= plan.sink_tokens):
        checks.finite()
    return _stored(plan, state, k, v, len(state), checks)


def _stored(plan: Plan, state: State, k, v, p0, checks) -> State:
    """``state`` (fitted) with tokens ``k``, ``v`` (BH, t, d) at positions ``p0 …``."""
    setup = state.setup
    xp = setup.xp
    sinks = state.sinks
    n_s = max(0, min(k.shape[1], plan.sink_tokens - p0))
    if n_s:
        sinks = sinks.extended(xp, k[:, :n_s], v[:, :n_s], plan.sink_tokens)
        k, v, p0 = k[:, n_s:], v[:, n_s:], p0 + n_s
    t = k.shape[1]
    base, window = state.base, state.window
    if t:
        r_tok, blk = plan.residual_tokens, plan.block_tokens
        c = base.count
        target = max(0, (c + window.count + t - r_tok) // blk * blk)
        base, window = window.advance(xp, setup.be, state.frame, base, k, v, p0, target - c,
                                      checks, 4 * (r_tok + blk))
    checks.verify()
    return dataclasses.replace(state, sinks=sinks, base=base, window=window)
