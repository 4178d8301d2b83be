"""Perplexity of SmolLM2-135M decoding with :class:`rotorq.KVCache` as its KV cache.

Every layer of the numpy SmolLM2 forward pass (:mod:`benchmarks.cpu.smollm2`) attends through
its own ``rotorq.KVCache``, token by token, as a decoder would: for position ``t`` the
cache holds exactly what it holds after ``t + 1`` appends (sinks, compressed tokens, the
window), and the query of position ``t`` attends over it with ``KVCache.attend``. This is
the library's cache end to end (key offset, RoPE-aware bias inside the fused kernel,
two-tier window, demotion from the window's codes), not a simulation.

Stored bits per coordinate are read from the caches themselves
(``KVCache.bits_per_coordinate`` after the last token, averaged over layers): codes, norms,
window codes, float16 sinks and the float16 key offset.

Configurations: plain TurboQuant (every token quantized, no levers) as the baseline in the
same run, the library's defaults, and the recipe at three budgets (4, 3 and 2.5 bits),
with and without the RoPE-aware offset and the calibrated key channel scales (scales
calibrated once on GPL-3 tokens 512–1023, as in :mod:`benchmarks.cpu.fidelity_levers`).

Run ``python -m benchmarks.cpu.kvcache_perplexity`` (about 15 minutes on 2 cores; ``--quick``:
256 tokens, one seed, three rows). A full run writes the ``cpu:kvcache-perplexity``
section of ``benchmarks/results/cpu.md``; ``--layer-errors`` writes ``cpu:kvcache-layer-errors``
(per-layer attention-output errors of the caches on the exact captured q/k/v).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from unittest import mock

import numpy as np

import rotorq
from benchmarks.cpu import smollm2
from benchmarks.cpu.fidelity_levers import CALIB_SPAN, _log_probs, calibrate
from benchmarks.tools.report import (
    CPU_TABLES,
    Progress,
    environment,
    environment_markdown,
    markdown_table,
    write_sections,
)

PLAIN = dict(residual_tokens=0, residual_bits=None, sink_tokens=0, key_offset=False,
             norm_correction=False)


@dataclass(frozen=True)
class Row:
    """One configuration: ``KVCache`` keyword arguments plus the harness's switches.

    Attributes
    ----------
    rope : bool
        Pass the model's ``rope_base`` (RoPE-aware key offset).
    scales : bool
        Pass the calibrated key channel scales.
    """

    label: str
    budget: str
    kwargs: dict = field(default_factory=dict, hash=False, compare=False)
    rope: bool = False
    scales: bool = False


def rows(quick=False):
    def plain(kb, vb):
        return Row(f"plain TurboQuant K{kb}/V{vb}", "—", dict(key_bits=kb, value_bits=vb, **PLAIN))

    k3v2 = dict(key_bits=3, value_bits=2)
    out = [
        plain(4, 3), plain(3, 3), plain(2, 2),
        Row("defaults: KVCache(H, d) (K4/V3, W32@6)", "≤ 4", {}),
        Row("defaults + rope_base", "≤ 4", {}, rope=True),
        Row("defaults + rope_base + key_scales", "≤ 4", {}, rope=True, scales=True),
        Row("K3/V2 (W32@5)", "≤ 3", k3v2),
        Row("K3/V2 + rope_base", "≤ 3", k3v2, rope=True),
        Row("K3/V2 + rope_base + key_scales", "≤ 3", k3v2, rope=True, scales=True),
        Row("K3/V2 + rope_base + key_scales, offset_tokens=32", "≤ 3",
            dict(offset_tokens=32, **k3v2), rope=True, scales=True),
        Row("K2/V2, W24@5 + rope_base + key_scales", "≤ 2.5",
            dict(key_bits=2, value_bits=2, residual_tokens=24, residual_bits=5), rope=True,
            scales=True),
    ]
    if quick:
        return [out[1], out[4], out[8]]
    return out


class DecodeAttention:
    """Stand-in for :func:`benchmarks.cpu.smollm2._attention`: one ``KVCache`` per layer, fed
    token by token; collects the caches' stored bits."""

    def __init__(self, model, row, calib, seed):
        self.mc, self.row, self.calib, self.seed = model.config, row, calib, seed
        self.layer = 0
        self.bits = []

    def __call__(self, q, k, v):
        mc, row = self.mc, self.row
        layer = self.layer
        self.layer += 1
        kw = dict(row.kwargs)
        if row.rope:
            kw["rope_base"] = mc.rope_base
        if row.scales:
            kw["key_scales"] = self.calib.key_scales["rope" if row.rope else "post"][layer]
        cache = rotorq.KVCache(mc.n_kv_heads, mc.head_dim, seed=self.seed * 1000 + layer, **kw)
        out = np.empty_like(q)
        for t in range(q.shape[1]):
            cache.append(k[:, t:t + 1], v[:, t:t + 1])
            out[:, t] = cache.attend(q[:, t])
        self.bits.append(cache.bits_per_coordinate)
        return out


def evaluate(model, tokens, exact_lp, row, calib, seed):
    """(perplexity, mean KL(exact ‖ cache), stored bits per coordinate)."""
    att = DecodeAttention(model, row, calib, seed)
    with mock.patch.object(smollm2, "_attention", att):
        lp = _log_probs(smollm2.forward(model, tokens))
    idx = np.arange(len(tokens) - 1)
    ppl = float(np.exp(-lp[idx, tokens[1:]].mean()))
    kl = float((np.exp(exact_lp) * (exact_lp - lp)).sum(-1).mean())
    return ppl, kl, float(np.mean(att.bits))


def run(n_tokens=512, seeds=(0, 1), quick=False, progress=None):
    progress = progress or (lambda m: None)
    model = smollm2.load_model()
    ids = {t: smollm2.tokenize(smollm2.load_text(t)) for t in smollm2.CORPORA}
    tokens = {t: ids[t][:n_tokens] for t in smollm2.CORPORA}
    exact_lp = {t: _log_probs(smollm2.forward(model, tokens[t])) for t in tokens}
    idx = np.arange(n_tokens - 1)
    exact = {t: float(np.exp(-exact_lp[t][idx, tokens[t][1:]].mean())) for t in tokens}
    progress(f"exact perplexity {exact}")
    calib = calibrate(model, ids["gpl3"][CALIB_SPAN[0]:CALIB_SPAN[1]])
    results = {}
    for row in rows(quick):
        start = time.perf_counter()
        results[row.label] = {t: np.array([evaluate(model, tokens[t], exact_lp[t], row, calib, s)
                                           for s in seeds]) for t in tokens}
        r = results[row.label]
        progress(f"{row.label}: " + ", ".join(
            f"{t} ppl {r[t][:, 0].mean():.3f} KL {r[t][:, 1].mean():.4f} bits {r[t][:, 2].mean():.3f}"
            for t in tokens) + f" ({time.perf_counter() - start:.0f} s)")
    return dict(exact=exact, results=results, rows=rows(quick), n_tokens=n_tokens, seeds=seeds)


ERROR_ROWS = ("plain TurboQuant K3/V3", "K3/V2 + rope_base", "defaults + rope_base")


def layer_errors(n_tokens=512, seed=0, progress=None):
    """Per-layer attention-output error of the caches on the exact captured q/k/v (no error
    propagation): every layer's cache is fed token by token and position ``t`` attends after
    ``t + 1`` appends. Returns ``{text: {row label: (n_layers, 2) [all heads, worst head]}}``."""
    progress = progress or (lambda m: None)
    model = smollm2.load_model()
    mc = model.config
    calib = calibrate(model, smollm2.tokenize(smollm2.load_text("gpl3"))[CALIB_SPAN[0]:CALIB_SPAN[1]])
    by_label = {r.label: r for r in rows()}
    out = {}
    for text in smollm2.CORPORA:
        tokens = smollm2.tokenize(smollm2.load_text(text))[:n_tokens]
        _, cap = smollm2.forward(model, tokens, capture=True)
        res = {}
        for label in ERROR_ROWS:
            att = DecodeAttention(model, by_label[label], calib, seed)
            errs = np.zeros((mc.n_layers, 2))
            for layer in range(mc.n_layers):
                q, k, v = cap["q"][layer], cap["k"][layer], cap["v"][layer]
                want = smollm2._attention(q, k, v).astype(np.float64)
                got = att(q, k, v).astype(np.float64)
                per_head = np.linalg.norm(got - want, axis=(1, 2)) / np.linalg.norm(want, axis=(1, 2))
                errs[layer] = np.linalg.norm(got - want) / np.linalg.norm(want), per_head.max()
            res[label] = errs
            progress(f"{text} {label}: mean attention-output error {errs[:, 0].mean():.3f}")
        out[text] = res
    return out


def errors_table(errs) -> str:
    texts = list(errs)
    header = ["layer"] + [f"{t}: {label}" for t in texts for label in ERROR_ROWS]
    n_layers = len(next(iter(errs[texts[0]].values())))
    body = [[str(i)] + [f"{errs[t][lab][i, 0]:.3f} / {errs[t][lab][i, 1]:.3f}" for t in texts
                        for lab in ERROR_ROWS] for i in range(n_layers)]
    body.append(["mean"] + [f"{errs[t][lab][:, 0].mean():.3f} / {errs[t][lab][:, 1].mean():.3f}"
                            for t in texts for lab in ERROR_ROWS])
    return markdown_table(header, body)


def table(out) -> str:
    ex = out["exact"]
    header = ["budget", "configuration", "stored bits/coord"]
    for t in ex:
        header += [f"{t} ppl (Δ)", f"{t} KL"]
    first = ["—", "exact (float32)", "32"]
    for t in ex:
        first += [f"{ex[t]:.2f}", "0"]
    body = [first]
    for row in out["rows"]:
        r = out["results"][row.label]
        bits = np.mean([r[t][:, 2].mean() for t in ex])
        cells = [row.budget, row.label, f"{bits:.3f}"]
        for t in ex:
            p, kl = r[t][:, 0].mean(), r[t][:, 1].mean()
            cells += [f"{p:.2f} ({100 * (p / ex[t] - 1):+.1f}%)", f"{kl:.4f}"]
        body.append(cells)
    return markdown_table(header, body)


def markdown(out, elapsed) -> str:
    return "\n".join([
        "## SmolLM2-135M decoding through `rotorq.KVCache` (issue 6)",
        "",
        f"Produced by `python -m benchmarks.cpu.kvcache_perplexity` in {elapsed / 60:.1f} min. "
        f"First {out['n_tokens']} tokens of each text, decoded token by token: every layer "
        "appends one token to its own `KVCache` and attends with `KVCache.attend` (the fused "
        "kernel on the codes). Means over rotation seeds "
        f"{', '.join(map(str, out['seeds']))}. Stored bits per coordinate are "
        "`KVCache.bits_per_coordinate` after the last token (codes, norms, window codes, "
        "float16 sinks, float16 key offset), averaged over layers and texts. Plain "
        "TurboQuant = every token quantized, no levers (`residual_tokens=0, "
        "residual_bits=None, sink_tokens=0, key_offset=False, norm_correction=False`). "
        "`key_scales`: calibrated once on GPL-3 tokens 512–1023; `rope_base`: the model's "
        "100000.",
        "",
        table(out),
        "",
        environment_markdown(environment()),
    ])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="256 tokens, one seed, three rows")
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--layer-errors", action="store_true",
                    help="only the per-layer attention-output errors (about 6 minutes)")
    args = ap.parse_args(argv)
    n = args.tokens or (256 if args.quick else 512)
    start = time.perf_counter()
    if args.layer_errors:
        errs = layer_errors(n, progress=Progress())
        text = "\n".join([
            "## Per-layer attention-output error through `rotorq.KVCache` (SmolLM2-135M)", "",
            f"Produced by `python -m benchmarks.cpu.kvcache_perplexity --layer-errors` in "
            f"{(time.perf_counter() - start) / 60:.1f} min. Exact captured post-RoPE q/k/v of the "
            f"first {n} tokens (no error propagation); each layer's cache is fed token by token "
            "and position t attends after t + 1 appends (rotation seed 0). Relative error "
            "‖attn_cache − attn_exact‖ / ‖attn_exact‖ over all positions: all heads / worst "
            "query head. Configurations as in the perplexity table.", "",
            errors_table(errs), ""])
        print(text)
        if args.tokens is None:
            write_sections({"cpu:kvcache-layer-errors": text}, CPU_TABLES)
        return
    seeds = (0,) if args.quick else (0, 1)
    out = run(n, seeds, quick=args.quick, progress=Progress())
    text = markdown(out, time.perf_counter() - start)
    print(text)
    if not args.quick and args.tokens is None:
        write_sections({"cpu:kvcache-perplexity": text}, CPU_TABLES)


if __name__ == "__main__":
    main()
