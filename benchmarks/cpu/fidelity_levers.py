"""Fidelity levers for 2–4-bit KV caches on a real model (SmolLM2-135M, numpy).

Every layer's post-RoPE keys and values are passed through rotorq before causal attention
(:mod:`benchmarks.cpu.smollm2`'s ``kv_hook``), and the perplexity and the KL divergence from
the exact model are measured on the first ``--tokens`` tokens of two texts (GPL-3 and
Python's pydoc topics). Plain TurboQuant (Hadamard rotation, Gaussian Lloyd-Max codebook,
float16 norm, every token quantized) is measured in the same run as the baseline; then
each lever alone, the levers stacked, and the best stack at honest bit budgets.

Stored bits are counted per coordinate, averaged over keys and values, for the whole
sequence (:func:`rotorq.kvprep.kv_bits_per_coordinate`): codes, one float16 norm per
vector and part (two with an outlier split or in prod mode), float16 full-precision
tokens (attention sinks, a recent window), and the key offset μ fitted on the first
``MEAN_BLOCK`` tokens of each sequence (float16, per layer and KV head). Per-model
constants — rotation seeds, channel scales calibrated once — are not per-sequence storage.

Calibration is done once, on GPL-3 tokens 512–1023 (disjoint from the evaluated span):
channel scales from real keys and queries, outlier-channel order, and the per-layer
sensitivities that drive the bit allocation. Pydoc is evaluated with the same settings
(no retuning).

The levers (see :mod:`rotorq.kvprep`):

- key mean: ``post`` (constant post-RoPE mean; softmax-invariant) or ``rope`` (mean of the
  un-rotated keys, rotated to each key's position; adds ``q·RoPE_t(μ)`` to the scores);
- channel scales ``s = (σq/σk)^½`` on keys, ``1/s`` on queries (exact);
- norm correction, Beta codebook, dense rotation, prod (QJL) keys;
- outlier split: the 32 channels of largest calibrated RMS at one more bit (two parts);
- attention sinks (first tokens) and a recent window at full precision;
- keys at more bits than values, and per-layer bits from measured sensitivity.

Run ``python -m benchmarks.cpu.fidelity_levers`` (about 16 minutes on 2 cores) or
``--quick`` (256 tokens, one seed, fewer rows; about 4 minutes). Results go to stdout and,
for a full run, to the ``cpu:fidelity-levers`` section of ``benchmarks/results/cpu.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import time
from dataclasses import dataclass, field
from unittest import mock

import numpy as np

import rotorq
from benchmarks.cpu import smollm2
from benchmarks.cpu.realkv_perplexity import windowed_attention
from benchmarks.tools.report import (
    CPU_TABLES,
    Progress,
    environment,
    environment_markdown,
    markdown_table,
    write_sections,
)
from rotorq.kvprep import KeyPrep, allocate_bits, channel_scales, kv_bits_per_coordinate

RESULTS_SECTION = "cpu:fidelity-levers"   # the section of benchmarks/results/cpu.md it writes
CALIB_SPAN = (512, 1024)     # GPL-3 tokens used for calibration (disjoint from the eval span)
SENS_TOKENS = 256            # tokens of the calibration span used for the sensitivities
MEAN_BLOCK = 128             # the key offset μ is fitted on the first tokens of a sequence
OUTLIERS = 32                # channels of the outlier part (both parts stay powers of two)
NORM_BITS = 16
FULL_BITS = 16


# -- configurations ---------------------------------------------------------------------
@dataclass(frozen=True)
class Stream:
    """How one stream (keys or values) is stored.

    Attributes
    ----------
    bits : int or tuple of int
        Bits per coordinate (prod mode: total, 1 of them QJL); a tuple gives one width per
        layer, ``0`` meaning that layer's stream stays exact.
    mean : {"none", "post", "rope"}
        Offset removed before quantizing (fitted on the first ``MEAN_BLOCK`` tokens).
    scale : bool
        Channel scales (keys: ``(σq/σk)^½`` with ``1/s`` on queries; values:
        ``(‖W_o row‖/σv)^½`` with ``1/s`` on ``W_o``).
    norm_correction, codebook, rotation, mode
        :class:`rotorq.TurboQuant` options.
    outliers : bool
        Split off the ``OUTLIERS`` channels of largest calibrated RMS at one more bit.
    """

    bits: int | tuple = 3
    mean: str = "none"
    scale: bool = False
    norm_correction: bool = False
    codebook: str = "gaussian"
    rotation: str = "hadamard"
    mode: str = "mse"
    outliers: bool = False

    def layer_bits(self, layer):
        return self.bits[layer] if isinstance(self.bits, tuple) else self.bits

    def code_bits(self, n_layers, dim):
        """Mean code bits per coordinate over the layers."""
        per = [self.layer_bits(i) for i in range(n_layers)]
        extra = OUTLIERS / dim if self.outliers else 0.0
        return float(np.mean([b + extra if b else FULL_BITS for b in per]))

    @property
    def norms(self):
        return (2 if self.outliers else 1) * (2 if self.mode == "prod" else 1)

    def short(self, n_layers, dim):
        b = self.code_bits(n_layers, dim)
        return f"{b:g}" if isinstance(self.bits, int) and not self.outliers else f"{b:.2f}"


@dataclass(frozen=True)
class Config:
    """One row: keys, values, attention sinks and the recent window.

    Attributes
    ----------
    sinks : int
        First tokens kept at full precision (float16).
    window : int
        Most recent tokens (per query) stored better than the rest.
    window_bits : int
        ``0``: the window is full precision (float16); ``b > 0``: the window tokens are
        quantized with the same recipe at ``b`` bits, and a token leaving the window is
        re-quantized from those codes to the stream's bits (a two-tier cache).
    """

    label: str
    key: Stream
    value: Stream
    sinks: int = 0
    window: int = 0
    window_bits: int = 0
    group: str = field(default="", compare=False)

    def bits(self, n_tokens, n_layers, dim):
        """Honest stored bits per coordinate (see the module docstring)."""
        full = min(n_tokens, self.sinks + (self.window if not self.window_bits else 0))
        tiered = min(n_tokens - full, self.window) if self.window_bits else 0
        side = NORM_BITS * dim if self.key.mean != "none" else 0
        vside = NORM_BITS * dim if self.value.mean != "none" else 0
        code = []
        for st in (self.key, self.value):
            b = st.code_bits(n_layers, dim)
            q_tok = n_tokens - full
            code.append((b * (q_tok - tiered) + self.window_bits * tiered) / max(q_tok, 1))
        return kv_bits_per_coordinate(
            n_tokens, dim, code[0], code[1],
            norm_bits=NORM_BITS, key_norms=self.key.norms, value_norms=self.value.norms,
            full_tokens=full, full_bits=FULL_BITS, key_side_bits=side, value_side_bits=vside)

    @property
    def window_label(self):
        if not self.window:
            return ""
        return f"W{self.window}" + (f"@{self.window_bits}" if self.window_bits else " fp16")


def plain(kb, vb, **kw):
    return Config(f"plain TurboQuant K{kb}/V{vb}", Stream(kb), Stream(vb), **kw)


def stack_key(bits, **kw):
    """The best key recipe found: RoPE-aware mean, channel scales, norm correction."""
    return Stream(bits, mean="rope", scale=True, norm_correction=True, **kw)


def stack_value(bits, **kw):
    """The best value recipe found: norm correction (the other levers did not pay)."""
    return Stream(bits, norm_correction=True, **kw)


def best(kb, vb, label=None, **kw):
    kw.setdefault("sinks", 1)
    return Config(label or f"stack K{kb}/V{vb}", stack_key(kb), stack_value(vb), **kw)


def lever_configs(quick=False):
    """Baselines, levers alone (on plain K3/V3), and the cumulative stack."""
    rows = [plain(4, 4, group="baseline"), plain(4, 3, group="baseline"),
            plain(3, 3, group="baseline"), plain(2, 2, group="baseline")]
    if quick:
        rows = [plain(3, 3, group="baseline")]
    p3 = Stream(3)
    alone = [
        ("key mean (post-RoPE, per-sequence μ)", dict(key=Stream(3, mean="post"))),
        ("key mean (RoPE-aware, per-sequence μ)", dict(key=Stream(3, mean="rope"))),
        ("key channel scales only", dict(key=Stream(3, scale=True))),
        ("norm correction (K and V)", dict(key=Stream(3, norm_correction=True),
                                           value=Stream(3, norm_correction=True))),
        ("Beta codebook (K and V)", dict(key=Stream(3, codebook="beta"),
                                         value=Stream(3, codebook="beta"))),
        ("dense Haar rotation (K and V)", dict(key=Stream(3, rotation="dense"),
                                               value=Stream(3, rotation="dense"))),
        ("prod (QJL) keys, 2+1 bits", dict(key=Stream(3, mode="prod"))),
        ("outlier split K+V: 32 ch @4 + 32 @3", dict(key=Stream(3, outliers=True),
                                                     value=Stream(3, outliers=True))),
        ("1 attention-sink token", dict(sinks=1)),
        ("4 attention-sink tokens", dict(sinks=4)),
        ("recent window of 4 tokens (fp16)", dict(window=4)),
        ("recent window of 32 tokens at 5 bits", dict(window=32, window_bits=5)),
        ("value mean (per-sequence)", dict(value=Stream(3, mean="post"))),
        ("value channel scales (W_o)", dict(value=Stream(3, scale=True))),
    ]
    if quick:
        alone = alone[1:2] + alone[3:4] + alone[8:9] + alone[11:12]
    for label, kw in alone:
        args = dict(key=p3, value=p3)
        args.update(kw)
        rows.append(Config(label, group="alone", **args))
    # cumulative stack at K3/V3
    steps = [
        ("+ RoPE-aware key mean", dict(key=Stream(3, mean="rope"))),
        ("+ key channel scales", dict(key=Stream(3, mean="rope", scale=True))),
        ("+ norm correction (K and V)", dict(key=stack_key(3), value=stack_value(3))),
        ("+ 1 sink token", dict(key=stack_key(3), value=stack_value(3), sinks=1)),
        ("+ window of 32 tokens at 5 bits", dict(key=stack_key(3), value=stack_value(3),
                                                 sinks=1, window=32, window_bits=5)),
    ]
    for label, kw in steps:
        args = dict(key=p3, value=p3)
        args.update(kw)
        rows.append(Config(label, group="stack", **args))
    if not quick:
        rows += [
            Config("stack, prod (QJL) keys 2+1", stack_key(3, mode="prod"), stack_value(3),
                   sinks=1, group="variants"),
            Config("stack, post-RoPE key mean", Stream(3, mean="post", scale=True,
                                                       norm_correction=True),
                   stack_value(3), sinks=1, group="variants"),
            Config("stack + outlier split K+V", stack_key(3, outliers=True),
                   stack_value(3, outliers=True), sinks=1, group="variants"),
            Config("stack + window 4 fp16", stack_key(3), stack_value(3), sinks=1, window=4,
                   group="variants"),
            Config("stack + window 16 fp16", stack_key(3), stack_value(3), sinks=1,
                   window=16, group="variants"),
            Config("stack + window 16 at 5 bits", stack_key(3), stack_value(3), sinks=1,
                   window=16, window_bits=5, group="variants"),
            Config("stack + window 64 at 5 bits", stack_key(3), stack_value(3), sinks=1,
                   window=64, window_bits=5, group="variants"),
            best(4, 4, group="variants"), best(4, 3, group="variants"),
            best(3, 4, group="variants"), best(4, 2, group="variants"),
            best(3, 2, group="variants"), best(2, 2, group="variants"),
        ]
    return rows


# -- calibration ------------------------------------------------------------------------
@dataclass
class Calibration:
    """Per-model constants fitted once on the calibration span.

    Attributes
    ----------
    key_scales : dict
        mean kind → ``(L, H, d)`` channel scales of the keys.
    key_order, value_order : dict / ndarray
        Channel permutations ``(L, H, d)``, normal channels first, the ``OUTLIERS`` of
        largest RMS last.
    value_scales : ndarray
        ``(L, H, d)`` value scales from ``W_o``.
    """

    key_scales: dict
    key_order: dict
    value_scales: np.ndarray
    value_order: np.ndarray


def _order(rms):
    """Permutation per (L, H): normal channels (ascending index) then outliers."""
    d = rms.shape[-1]
    out = np.sort(np.argsort(-rms, axis=-1)[..., :OUTLIERS], axis=-1)
    order = np.empty(rms.shape, np.int64)
    for idx in np.ndindex(rms.shape[:-1]):
        normal = np.setdiff1d(np.arange(d), out[idx])
        order[idx] = np.concatenate([normal, out[idx]])
    return order


def calibrate(model, tokens) -> Calibration:
    """Fit channel scales and outlier orders on the exact keys/queries of ``tokens``."""
    cfg = model.config
    _, cap = smollm2.forward(model, tokens, capture=True)
    q, k, v = cap["q"], cap["k"], cap["v"]
    pos = np.arange(k.shape[2])
    key_scales, key_order = {}, {}
    for kind in ("none", "post", "rope"):
        sc = np.ones((cfg.n_layers, cfg.n_kv_heads, cfg.head_dim), np.float32)
        rms_raw = np.zeros_like(sc)
        rms_prep = np.zeros_like(sc)
        for layer in range(cfg.n_layers):
            base = cfg.rope_base if kind == "rope" else None
            prep = KeyPrep.fit(k[layer][:, :MEAN_BLOCK], positions=pos[:MEAN_BLOCK],
                               rope_base=base, mean=kind != "none")
            resid = prep.keys(k[layer].astype(np.float64), pos)
            qg = q[layer].reshape(cfg.n_kv_heads, -1, cfg.head_dim)
            sc[layer] = channel_scales(np.sqrt((resid ** 2).mean(1)),
                                       np.sqrt((qg.astype(np.float64) ** 2).mean(1)))
            rms_raw[layer] = np.sqrt((resid ** 2).mean(1))
            rms_prep[layer] = rms_raw[layer] * sc[layer]
        key_scales[kind] = sc
        key_order[(kind, False)] = _order(rms_raw)
        key_order[(kind, True)] = _order(rms_prep)
    wo = model.wo.reshape(cfg.n_layers, cfg.n_heads, cfg.head_dim, cfg.hidden)
    wo_rms = np.sqrt((wo ** 2).sum(-1).reshape(cfg.n_layers, cfg.n_kv_heads, -1,
                                                cfg.head_dim).mean(2))
    v_rms = np.sqrt((v.astype(np.float64) ** 2).mean(2))
    value_scales = channel_scales(v_rms, wo_rms)
    return Calibration(key_scales, key_order, value_scales, _order(v_rms))


# -- the quantized cache as a kv_hook ---------------------------------------------------
def _roundtrip(x, tqs, order):
    """Quantize-dequantize ``x (H, T, d)``; ``order (H, d)`` splits channels into parts."""
    if len(tqs) == 1:
        tq = tqs[0]
        return tq.dequantize(tq.quantize(np.ascontiguousarray(x, np.float32)))
    xp = np.take_along_axis(x, order[:, None, :], axis=2)
    n = tqs[0].dim
    parts = [xp[..., :n], xp[..., n:]]
    out = np.concatenate([tq.dequantize(tq.quantize(np.ascontiguousarray(p, np.float32)))
                          for tq, p in zip(tqs, parts, strict=True)], axis=2)
    inv = np.argsort(order, axis=1)
    return np.take_along_axis(out, inv[:, None, :], axis=2)


class CacheSim:
    """``kv_hook``: the keys and values of each layer as a quantized cache returns them.

    Parameters
    ----------
    config : Config
    model_config : benchmarks.cpu.smollm2.Config
    calib : Calibration
    seed : int
        Base seed; layer ``l`` uses ``seed·1000 + 8l + i`` for its quantizers.
    only : tuple, optional
        ``(layer, "k" | "v")``: quantize that stream of that layer only (sensitivities).
    """

    def __init__(self, config, model_config, calib, seed=0, only=None):
        self.cfg, self.mc, self.calib, self.only = config, model_config, calib, only
        self.tqs, self.tqs_hi = {}, {}
        for layer in range(model_config.n_layers):
            for j, (name, st) in enumerate((("k", config.key), ("v", config.value))):
                b = st.layer_bits(layer)
                if not b or (only is not None and only != (layer, name)):
                    continue
                s = seed * 1000 + 8 * layer + 4 * j
                self.tqs[layer, name] = self._quantizers(st, b, s)
                if config.window and config.window_bits:
                    self.tqs_hi[layer, name] = self._quantizers(st, config.window_bits, s + 2)

    def _quantizers(self, st, bits, seed):
        d = self.mc.head_dim
        kw = dict(mode=st.mode, rotation=st.rotation, codebook=st.codebook,
                  norm_correction=st.norm_correction)
        if st.outliers:
            return [rotorq.TurboQuant(d - OUTLIERS, bits, seed=seed, **kw),
                    rotorq.TurboQuant(OUTLIERS, min(8, bits + 1), seed=seed + 1, **kw)]
        return [rotorq.TurboQuant(d, bits, seed=seed, **kw)]

    def _tiers(self, x, layer, name, order):
        """(window tier, older tokens) of the prepared stream ``x``."""
        lo = self.tqs[layer, name]
        if (layer, name) in self.tqs_hi:
            hi = _roundtrip(x, self.tqs_hi[layer, name], order)
            return hi, _roundtrip(hi, lo, order)   # demoted from the window's codes
        return x, _roundtrip(x, lo, order)

    def keys(self, layer, k):
        """``(k_window, k_old)``: what the cache returns for recent and older keys."""
        st, mc = self.cfg.key, self.mc
        if (layer, "k") not in self.tqs:
            return k, k
        pos = np.arange(k.shape[1])
        scales = self.calib.key_scales[st.mean][layer] if st.scale else None
        mean = None
        base = mc.rope_base if st.mean == "rope" else None
        if st.mean != "none":
            mean = KeyPrep.offset_of(k[:, :MEAN_BLOCK], pos[:MEAN_BLOCK], base)
        prep = KeyPrep(mc.n_kv_heads, mc.head_dim, scales=scales, mean=mean, rope_base=base)
        order = self.calib.key_order[(st.mean, st.scale)][layer]
        tiers = self._tiers(prep.keys(k, pos), layer, "k", order)
        return tuple(self._sinks(prep.restore(t, pos), k) for t in tiers)

    def values(self, layer, v):
        """``(v_window, v_old)``."""
        st = self.cfg.value
        if (layer, "v") not in self.tqs:
            return v, v
        mu = v[:, :MEAN_BLOCK].mean(1, keepdims=True) if st.mean != "none" else 0.0
        s = self.calib.value_scales[layer][:, None, :] if st.scale else 1.0
        tiers = self._tiers((v - mu) * s, layer, "v", self.calib.value_order[layer])
        return tuple(self._sinks(t / s + mu, v) for t in tiers)

    def _sinks(self, out, x):
        n = self.cfg.sinks
        out = np.array(out, dtype=np.float32)
        if n:
            out[:, :n] = x[:, :n]
        return out

    def attend(self, layer, q, k, v):
        """Causal attention of layer ``layer`` on the simulated cache."""
        k_win, k_old = self.keys(layer, k)
        v_win, v_old = self.values(layer, v)
        if self.cfg.window:
            return windowed_attention(q, k_win, v_win, k_old, v_old, self.cfg.window)
        return _EXACT_ATTENTION(q, k_old, v_old)


_EXACT_ATTENTION = smollm2._attention


def _log_probs(logits):
    x = logits[:-1].astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def evaluate(model, tokens, exact_lp, sim):
    """Perplexity and mean KL(exact ‖ quantized) of next-token distributions, with every
    layer's attention computed by ``sim`` (a :class:`CacheSim`)."""
    layer_of = {}

    def hook(layer, k, v):
        layer_of["layer"] = layer
        return k, v

    def attention(q, k, v):
        return sim.attend(layer_of.pop("layer"), q, k, v)

    with mock.patch.object(smollm2, "_attention", attention):
        lp = _log_probs(smollm2.forward(model, tokens, kv_hook=hook))
    idx = np.arange(len(tokens) - 1)
    ppl = float(np.exp(-lp[idx, tokens[1:]].mean()))
    kl = float((np.exp(exact_lp) * (exact_lp - lp)).sum(-1).mean())
    return ppl, kl


# -- sensitivities and allocation -------------------------------------------------------
def sensitivities(model, tokens, calib, ref_bits=2, progress=None):
    """KL of the stack (with the 3-bit budget's two-tier window) with one layer's keys (or
    values) alone at ``ref_bits``."""
    mc = model.config
    exact_lp = _log_probs(smollm2.forward(model, tokens))
    _, _, w, wb = TIERED[3.0]
    cfg = tiered(ref_bits, ref_bits, max(1, round(w * len(tokens) / 512)), wb)
    sens = np.zeros((mc.n_layers, 2))
    for layer in range(mc.n_layers):
        for j, name in enumerate("kv"):
            sim = CacheSim(cfg, mc, calib, seed=7, only=(layer, name))
            sens[layer, j] = max(evaluate(model, tokens, exact_lp, sim)[1], 1e-6)
        if progress:
            progress(f"sensitivity layer {layer}: K {sens[layer, 0]:.4f} V {sens[layer, 1]:.4f}")
    return sens


# Hand-picked two-tier windows per budget: (K bits, V bits, window, window bits).
TIERED = {4.0: (4, 3, 32, 6), 3.0: (3, 2, 32, 5), 2.5: (2, 2, 24, 5)}


def tiered(kb, vb, window, window_bits, label=None, **kw):
    return best(kb, vb, label or f"stack K{kb}/V{vb} + W{window}@{window_bits}", window=window,
                window_bits=window_bits, **kw)


def allocated(budget, sens, n_tokens, mc, base):
    """``base`` (a uniform stack config) with per-layer K and V bits that fill ``budget``.

    The keys' and the values' mean bits each grow by the same amount from the base's
    (so the keys keep their extra bit); within each stream the bits go, one step of
    ±1 bit around the base at most, to the layers of largest measured sensitivity.
    """
    # honest bits are linear in the mean code bits: the code budget that fills ``budget``
    two, three = (dataclasses.replace(base, key=stack_key(b), value=stack_value(b))
                  .bits(n_tokens, mc.n_layers, mc.head_dim) for b in (2, 3))
    extra = 2 + (budget - two) / (three - two) - (base.key.bits + base.value.bits) / 2
    streams = []
    for j, b0 in enumerate((base.key.bits, base.value.bits)):
        choices = tuple(range(max(2, b0 - 1), b0 + 2))
        bits = allocate_bits(sens[:, j], b0 + extra, choices, ref_bits=2)
        streams.append(tuple(int(b) for b in bits))
    label = "stack, per-layer bits" + (f" + {base.window_label}" if base.window else "")
    return dataclasses.replace(base, label=label, key=stack_key(streams[0]),
                               value=stack_value(streams[1]), group="budget")


def budget_configs(sens, n_tokens, mc, budgets=(4.0, 3.0, 2.5)):
    """For each honest budget: the best-fitting plain TurboQuant and uniform stack, the
    stack with a two-tier window, and that with per-layer bits from the sensitivities."""
    d, L = mc.head_dim, mc.n_layers
    out = []
    for b in budgets:
        rows = []
        for kb, vb in ((4, 4), (4, 3), (3, 3), (3, 2), (2, 2)):
            c = plain(kb, vb, group="budget")
            if c.bits(n_tokens, L, d) <= b:
                rows.append(c)
                break
        for kb, vb in ((4, 4), (4, 3), (3, 3), (4, 2), (3, 2), (2, 2)):
            c = best(kb, vb, group="budget")
            if c.bits(n_tokens, L, d) <= b:
                rows.append(c)
                break
        if b in TIERED:
            kb, vb, w, wb = TIERED[b]
            c = tiered(kb, vb, max(1, round(w * n_tokens / 512)), wb, group="budget")
            if c.bits(n_tokens, L, d) <= b:
                rows.append(c)
                if sens is not None:
                    rows.append(allocated(b, sens, n_tokens, mc, c))
        out.append((b, rows))
    return out


# -- per-layer attention-output error ----------------------------------------------------
def attention_errors(model, tokens, configs, calib, seed=0):
    """Relative attention-output error per layer with the real queries (no propagation).

    Returns
    -------
    dict
        label → ``(L, 2)`` array: error over all heads, and the worst query head.
    """
    mc = model.config
    _, cap = smollm2.forward(model, tokens, capture=True)
    out = {}
    for cfg in configs:
        sim = CacheSim(cfg, mc, calib, seed=seed)
        errs = np.zeros((mc.n_layers, 2))
        for layer in range(mc.n_layers):
            q, k, v = cap["q"][layer], cap["k"][layer], cap["v"][layer]
            ref, got = _EXACT_ATTENTION(q, k, v), sim.attend(layer, q, k, v)
            per_head = np.sqrt(((got - ref) ** 2).sum((1, 2)) / (ref ** 2).sum((1, 2)))
            errs[layer] = (np.sqrt(((got - ref) ** 2).sum() / (ref ** 2).sum()), per_head.max())
        out[cfg.label] = errs
    return out


# -- driver -----------------------------------------------------------------------------
def run(n_tokens=512, seeds=(0, 1), quick=False, progress=None):
    progress = progress or (lambda m: None)
    model = smollm2.load_model()
    mc = model.config
    ids = {t: smollm2.tokenize(smollm2.load_text(t)) for t in smollm2.CORPORA}
    tokens = {t: ids[t][:n_tokens] for t in smollm2.CORPORA}
    calib_tokens = ids["gpl3"][CALIB_SPAN[0]:CALIB_SPAN[1]]
    exact_lp = {t: _log_probs(smollm2.forward(model, tokens[t])) for t in tokens}
    idx = np.arange(n_tokens - 1)
    exact = {t: float(np.exp(-exact_lp[t][idx, tokens[t][1:]].mean())) for t in tokens}
    progress(f"exact perplexity {exact}")
    calib = calibrate(model, calib_tokens)
    progress("calibrated channel scales and outlier channels")
    sens_tokens = SENS_TOKENS // 2 if quick else SENS_TOKENS
    sens = sensitivities(model, calib_tokens[:sens_tokens], calib, progress=progress)

    configs = lever_configs(quick)
    budgets = budget_configs(sens, n_tokens, mc, (3.0,) if quick else (4.0, 3.0, 2.5))
    for _, rows in budgets:
        configs += [c for c in rows if c not in configs]
    headline = {c for _, rows in budgets for c in rows if c.window}
    results = {}
    for cfg in configs:
        start = time.perf_counter()
        r = {}
        row_seeds = tuple(range(2 * len(seeds))) if cfg in headline else seeds
        for t in tokens:
            vals = [evaluate(model, tokens[t], exact_lp[t], CacheSim(cfg, mc, calib, seed=s))
                    for s in row_seeds]
            r[t] = np.array(vals)
        results[cfg] = r
        progress(f"{cfg.label} [{cfg.bits(n_tokens, mc.n_layers, mc.head_dim):.3f} b]: "
                 + ", ".join(f"{t} ppl {r[t][:, 0].mean():.3f} KL {r[t][:, 1].mean():.4f}"
                             for t in tokens) + f" ({time.perf_counter() - start:.0f} s)")
    rows3 = next(rows for b, rows in budgets if b == 3.0)
    best3 = min(rows3, key=lambda c: sum(results[c][t][:, 1].mean() for t in tokens))
    err_cfgs = [plain(3, 3), best3]
    errors = {t: attention_errors(model, tokens[t], err_cfgs, calib) for t in tokens}
    progress("per-layer attention-output errors")
    return dict(exact=exact, results=results, budgets=budgets, sens=sens, errors=errors,
                err_labels=[c.label for c in err_cfgs], n_tokens=n_tokens, seeds=tuple(seeds),
                model=mc, configs=configs)


# -- tables -----------------------------------------------------------------------------
def _cell(res, exact, t):
    p, kl = res[t][:, 0].mean(), res[t][:, 1].mean()
    return f"{p:.2f} ({100 * (p / exact[t] - 1):+.1f}%)", f"{kl:.4f}"


def _row(cfg, out):
    mc, n = out["model"], out["n_tokens"]
    res = out["results"][cfg]
    cells = [cfg.label, cfg.key.short(mc.n_layers, mc.head_dim),
             cfg.value.short(mc.n_layers, mc.head_dim),
             f"{cfg.bits(n, mc.n_layers, mc.head_dim):.3f}"]
    for t in out["exact"]:
        cells += list(_cell(res, out["exact"], t))
    return cells


def _header(out, first="configuration"):
    h = [first, "K code bits", "V code bits", "stored bits/coord"]
    for t in out["exact"]:
        h += [f"{t} ppl (Δ)", f"{t} KL"]
    return h


def tables(out) -> dict:
    mc, n = out["model"], out["n_tokens"]
    ex = out["exact"]
    res = out["results"]
    tabs = {}
    exact_row = ["exact (float32)", "32", "32", "32.000"]
    for t in ex:
        exact_row += [f"{ex[t]:.2f}", "0"]

    groups = {}
    for cfg in out["configs"]:
        groups.setdefault(cfg.group, []).append(cfg)
    rows = [exact_row] + [_row(c, out) for c in groups.get("baseline", [])]
    rows += [_row(c, out) for c in groups.get("alone", [])]
    tabs["levers"] = markdown_table(_header(out, "plain K3/V3 + one lever"), rows)

    rows = [_row(plain(3, 3), out)] if plain(3, 3) in res else []
    rows += [_row(c, out) for c in groups.get("stack", []) + groups.get("variants", [])]
    tabs["stack"] = markdown_table(_header(out, "stacked levers (K3/V3 unless named)"), rows)

    rows = []
    for b, cfgs in out["budgets"]:
        for c in cfgs:
            rows.append([f"≤ {b:g}"] + _row(c, out))
    tabs["budget"] = markdown_table(["budget"] + _header(out), rows)

    # which lever bought what: consecutive steps of the stack at K3/V3
    steps = ([plain(3, 3)] if plain(3, 3) in res else []) + groups.get("stack", [])
    rows = []
    for prev, cur in itertools.pairwise(steps):
        cells = [cur.label.lstrip("+ "),
                 f"{cur.bits(n, mc.n_layers, mc.head_dim) - prev.bits(n, mc.n_layers, mc.head_dim):+.3f}"]
        for t in ex:
            a, b = res[prev][t].mean(0), res[cur][t].mean(0)
            cells += [f"{100 * (b[0] - a[0]) / ex[t]:+.1f} pts", f"{b[1] / a[1]:.2f}×"]
        rows.append(cells)
    base_bits = plain(3, 3).bits(n, mc.n_layers, mc.head_dim)
    for cfg in groups.get("alone", []):
        if plain(3, 3) not in res:
            break
        base = res[plain(3, 3)]
        cells = [f"alone: {cfg.label}", f"{cfg.bits(n, mc.n_layers, mc.head_dim) - base_bits:+.3f}"]
        for t in ex:
            a, b = base[t].mean(0), res[cfg][t].mean(0)
            cells += [f"{100 * (b[0] - a[0]) / ex[t]:+.1f} pts", f"{b[1] / a[1]:.2f}×"]
        rows.append(cells)
    h = ["lever", "Δ stored bits"]
    for t in ex:
        h += [f"{t} Δppl", f"{t} KL ratio"]
    tabs["bought"] = markdown_table(h, rows)

    labels = out["err_labels"]
    h = ["layer"]
    for t in ex:
        for lab in labels:
            h += [f"{t}: {lab}"]
    rows = []
    for layer in range(mc.n_layers):
        cells = [str(layer)]
        for t in ex:
            for lab in labels:
                e = out["errors"][t][lab][layer]
                cells.append(f"{e[0]:.3f} / {e[1]:.3f}")
        rows.append(cells)
    cells = ["mean"]
    for t in ex:
        for lab in labels:
            e = out["errors"][t][lab].mean(0)
            cells.append(f"{e[0]:.3f} / {e[1]:.3f}")
    rows.append(cells)
    tabs["errors"] = markdown_table(h, rows)

    sens = out["sens"]
    rows = [[str(i), f"{sens[i, 0]:.4f}", f"{sens[i, 1]:.4f}"] for i in range(mc.n_layers)]
    tabs["sens"] = markdown_table(["layer", "K at 2 bits: KL", "V at 2 bits: KL"], rows)
    alloc = []
    for b, cfgs in out["budgets"]:
        c = cfgs[-1]
        if isinstance(c.key.bits, tuple):
            alloc.append(f"- ≤ {b:g} bits: K bits per layer {''.join(map(str, c.key.bits))}, "
                         f"V bits per layer {''.join(map(str, c.value.bits))}")
    tabs["alloc"] = "\n".join(alloc) + "\n"
    return tabs


def markdown(out, tabs, elapsed) -> str:
    n, seeds = out["n_tokens"], out["seeds"]
    lines = [
        "## KV-cache fidelity levers (SmolLM2-135M)",
        "",
        f"Produced by `python -m benchmarks.cpu.fidelity_levers` in {elapsed / 60:.1f} min. "
        f"First {n} tokens of each text; perplexity and KL(exact ‖ quantized) are means over "
        f"{len(seeds)} rotation seed(s), {2 * len(seeds)} for the two-tier rows of the budget "
        "table (each layer has its own quantizer seeds). Stored bits "
        "per coordinate are honest: codes, float16 norms (two per vector with an outlier "
        "split or prod mode), float16 sink/window tokens and the per-sequence key mean μ "
        f"(float16, fitted on the first {MEAN_BLOCK} tokens), averaged over K and V. "
        "Calibration (channel scales, outlier channels, sensitivities): GPL-3 tokens "
        f"{CALIB_SPAN[0]}–{CALIB_SPAN[1] - 1}; pydoc uses the same settings.",
        "",
        "KL is the low-noise metric: a perplexity change of the first 512 tokens moves by "
        "several points between rotation seeds, while Δppl ≈ exp(KL) − 1 on average.",
        "",
        "### Levers alone (on plain TurboQuant K3/V3) and baselines",
        "",
        tabs["levers"],
        "### Stacked levers",
        "",
        tabs["stack"],
        "### Which lever bought what (at K3/V3)",
        "",
        tabs["bought"],
        "### Budgets (honest stored bits per coordinate)",
        "",
        tabs["budget"],
        "Per-layer bits of the allocated rows (layers 0–29):",
        "",
        tabs["alloc"],
        "### Per-layer attention-output error with real queries",
        "",
        "Relative error ‖softmax(qK̂ᵀ/√d)V̂ − softmax(qKᵀ/√d)V‖ / ‖·‖ per layer on the exact "
        "captured q/k/v (no error propagation): all heads / worst query head.",
        "",
        tabs["errors"],
        "### Sensitivity per layer (calibration text, stack + two-tier window, 2 bits in one layer)",
        "",
        tabs["sens"],
    ]
    try:
        lines += ["", environment_markdown(environment())]
    except Exception:  # environment details are a nicety
        pass
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="256 tokens, one seed, a few rows, the 3-bit budget only")
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=None, help="rotation seeds per row")
    parser.add_argument("--no-write", action="store_true",
                        help="do not write benchmarks/results/cpu.md (--quick never writes it)")
    args = parser.parse_args(argv)
    n = args.tokens or (256 if args.quick else 512)
    seeds = tuple(range(args.seeds or (1 if args.quick else 2)))
    progress = Progress()
    start = time.perf_counter()
    out = run(n, seeds, args.quick, progress)
    tabs = tables(out)
    text = markdown(out, tabs, time.perf_counter() - start)
    print(text)
    if not (args.no_write or args.quick):   # a quick run never overwrites the full results
        progress(f"wrote {write_sections({RESULTS_SECTION: text}, CPU_TABLES)}")


if __name__ == "__main__":
    main()
