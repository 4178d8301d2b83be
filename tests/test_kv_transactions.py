"""KVCache.append is a transaction: refused or interrupted appends leave the cache as it was.

A ``hypothesis.stateful`` machine drives a cache and two references through random valid
appends, refused appends (NaN, Inf, norms beyond float16, wrong shapes and dtypes),
appends interrupted at a random point (a ``KeyboardInterrupt`` or ``RuntimeError`` raised
inside a tier, the quantizer or a backend function, before or after its work), and
attends. The references: a twin cache that only ever sees the appends that succeeded
(``len``, ``nbytes``, ``attend`` and ``scores`` must equal it bit for bit), and the list of
accepted tokens, stored by a fresh cache in one prefill (equal too: row-wise rotations,
explicit outlier channels).
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import rotorq
import rotorq.cpu
import rotorq.turboquant
from rotorq.kv import checks, codes, keys, store, tiers, window

H, D, G = 2, 16, 2
CONFIGS = {
    "default": dict(),
    "float-window": dict(residual_bits=None, sink_tokens=2),
    "prod-outliers-rope": dict(key_mode="prod", outlier_channels=np.array([1, 5]),
                               rope_base=100.0, key_bits=3),
    "rotor-no-offset": dict(rotation="rotor", key_offset=False, sink_tokens=0,
                            key_scales=np.linspace(0.5, 2.0, H * D).reshape(H, D)),
    "float-window-scales": dict(residual_bits=None, sink_tokens=0, block_tokens=2,
                                key_scales=np.linspace(2.0, 0.5, H * D).reshape(H, D)),
}
COMMON = dict(residual_tokens=6, offset_tokens=8)

# where an append may be interrupted: (owner, attribute)
TARGETS = [
    (rotorq.cpu, "quantize"), (rotorq.cpu, "dequantize"), (rotorq.cpu, "attention_layout"),
    (rotorq.turboquant.TurboQuant, "_quantize"),
    (codes.Codes, "extended"), (codes.Codes, "dropped"), (codes.Codes, "decode"),
    (codes.Compressed, "extended"), (tiers.Pending, "extended"), (tiers.Sinks, "extended"),
    (window.QuantizedWindow, "advance"), (window.FloatWindow, "advance"),
    (window.FloatWindow, "_extended"), (keys.KeyFrame, "fit"), (keys.KeyFrame, "prep"),
    (checks.Checks, "verify"), (store, "_stored"),
]


class Injected(KeyboardInterrupt):
    """The interrupt this test raises (told apart from a real Ctrl-C)."""


class InjectedError(RuntimeError):
    """The error this test raises."""


def _interrupting(func, n_call, after, exc):
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] != n_call:
            return func(*args, **kwargs)
        if after:
            func(*args, **kwargs)
        raise exc("injected")

    return wrapper


class CacheMachine(RuleBasedStateMachine):
    @initialize(name=st.sampled_from(sorted(CONFIGS)), seed=st.integers(0, 2**32 - 1))
    def start(self, name, seed):
        self.kwargs = COMMON | CONFIGS[name]
        self.cache = rotorq.KVCache(H, D, **self.kwargs)
        self.twin = rotorq.KVCache(H, D, **self.kwargs)
        self.rng = np.random.default_rng(seed)
        self.accepted_k, self.accepted_v = [], []

    def tokens(self, size):
        k = self.rng.standard_normal((H, size, D)).astype(np.float32) + 2.0
        v = self.rng.standard_normal((H, size, D)).astype(np.float32)
        return k, v

    def accept(self, k, v):
        self.twin.append(k, v)
        self.accepted_k.append(k)
        self.accepted_v.append(v)

    @rule(size=st.sampled_from([0, 1, 1, 1, 2, 3, 5, 9, 17]))
    def append(self, size):
        k, v = self.tokens(size)
        self.cache.append(k, v)
        self.accept(k, v)

    @rule(size=st.integers(1, 9), data=st.data(),
          kind=st.sampled_from(["nan_k", "inf_v", "big_k", "big_v", "huge_v", "heads", "dim",
                                "mismatch", "int", "dtype"]))
    def append_refused(self, size, data, kind):
        k, v = self.tokens(size)
        pos = data.draw(st.integers(0, size - 1))
        head = data.draw(st.integers(0, H - 1))
        error = ValueError
        if kind == "nan_k":
            k[head, pos, 3] = np.nan
        elif kind == "inf_v":
            v[head, pos, 0] = -np.inf
        elif kind in ("big_k", "big_v", "huge_v"):  # finite, norms beyond float16
            (k if kind == "big_k" else v)[head, pos] *= np.float32(3e37 if kind == "huge_v"
                                                                   else 1e5)
            if len(self.twin) + pos < self.kwargs.get("sink_tokens", 1):
                self.cache.append(k, v)  # a sink is kept as it comes (float32)
                self.accept(k, v)
                return
            with pytest.raises(ValueError, match="beyond float16's range"):
                self.cache.append(k, v)
            return
        elif kind == "heads":
            k, v = np.concatenate([k, k[:1]]), np.concatenate([v, v[:1]])
        elif kind == "dim":
            k, v = k[..., :-1], v[..., :-1]
        elif kind == "mismatch":
            v = v[:, :-1] if size > 1 else v[:, :, :-1]
        elif kind == "int":
            k, error = k.astype(np.int32), TypeError
        elif kind == "dtype":
            if len(self.twin) == 0:
                return
            k, v, error = k.astype(np.float64), v.astype(np.float64), TypeError
        with pytest.raises(error):
            self.cache.append(k, v)

    @rule(size=st.sampled_from([1, 1, 2, 5, 9, 17]), where=st.sampled_from(TARGETS),
          n_call=st.integers(1, 2), after=st.booleans(),
          exc=st.sampled_from([Injected, InjectedError]))
    def append_interrupted(self, size, where, n_call, after, exc):
        self.interrupted(size, where, n_call, after, exc)

    @rule(where=st.sampled_from(TARGETS), n_call=st.integers(1, 2), after=st.booleans(),
          exc=st.sampled_from([Injected, InjectedError]))
    def decode_step_interrupted(self, where, n_call, after, exc):
        self.interrupted(1, where, n_call, after, exc)

    def interrupted(self, size, where, n_call, after, exc):
        owner, name = where
        k, v = self.tokens(size)
        original = vars(owner)[name]
        setattr(owner, name, _interrupting(getattr(owner, name), n_call, after, exc))
        try:
            self.cache.append(k, v)
        except exc:
            event(f"interrupted in {owner.__name__}.{name}")
            return  # the invariants compare the cache with the twin
        finally:
            setattr(owner, name, original)
        self.accept(k, v)  # the append ended before the n-th call: it happened

    @rule(n_q=st.sampled_from([0, 1, 3]), causal=st.booleans())
    def attend(self, n_q, causal):
        if len(self.twin) == 0:
            with pytest.raises(ValueError, match="empty"):
                self.cache.attend(np.zeros((H * G, D), np.float32))
            return
        if causal and n_q > len(self.twin):
            return
        q = self.rng.standard_normal((H * G, n_q, D)).astype(np.float32)
        got = self.cache.attend(q, causal=causal)
        assert got.shape == (H * G, n_q, D)
        np.testing.assert_array_equal(got, self.twin.attend(q, causal=causal))
        np.testing.assert_array_equal(self.cache.scores(q), self.twin.scores(q))

    @rule()
    def equals_one_prefill(self):
        if len(self.twin) == 0:
            return
        fresh = rotorq.KVCache(H, D, **self.kwargs)
        fresh.append(np.concatenate(self.accepted_k, axis=1),
                     np.concatenate(self.accepted_v, axis=1))
        q = self.rng.standard_normal((H * G, 2, D)).astype(np.float32)
        assert (len(fresh), fresh.nbytes) == (len(self.cache), self.cache.nbytes)
        np.testing.assert_array_equal(self.cache.attend(q), fresh.attend(q))

    @invariant()
    def same_as_twin(self):
        if not hasattr(self, "cache"):
            return
        c, t = self.cache, self.twin
        assert len(c) == len(t) == sum(x.shape[1] for x in self.accepted_k)
        assert (c.pending_tokens, c.sink_count, c.compressed_tokens, c.window_tokens) \
            == (t.pending_tokens, t.sink_count, t.compressed_tokens, t.window_tokens)
        assert c.nbytes == t.nbytes
        if len(t):
            q = self.rng.standard_normal((H * G, D)).astype(np.float32)
            np.testing.assert_array_equal(c.attend(q), t.attend(q))


CacheMachine.TestCase.settings = settings(
    max_examples=30, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_append_is_a_transaction = CacheMachine.TestCase


def test_issue_reproduction_refused_overflow_keeps_the_cache(rng):
    """The report: finite keys whose norms exceed float16, appended while 100 tokens wait
    for the key offset, were refused only after wiping the cache to 1 token."""
    k = rng.standard_normal((2, 400, 64)).astype(np.float32)
    cache, clean = rotorq.KVCache(2, 64), rotorq.KVCache(2, 64)
    for c in (cache, clean):
        c.append(k[:, :100], k[:, :100])
    with pytest.raises(ValueError, match="beyond float16"):
        cache.append(k[:, 100:129] * 2e4, k[:, 100:129])
    assert len(cache) == 100 and cache.nbytes == clean.nbytes
    q = rng.standard_normal((4, 64)).astype(np.float32)
    np.testing.assert_array_equal(cache.attend(q), clean.attend(q))
    for c in (cache, clean):
        c.append(k[:, 100:400], k[:, 100:400])
    np.testing.assert_array_equal(cache.attend(q), clean.attend(q))
