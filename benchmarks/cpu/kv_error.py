"""Attention-output error of :class:`rotorq.KVCache` per bit width, synthetic and real.

- synthetic: 2 KV heads × 4 (GQA), d = 64 and 128, T = 1024, keys with 4 planted outlier
  channels (×10) and a bias, values with a shared mean, queries of logit spread ~1;
  median over ``--draws`` draws of data and quantizer seeds; window 64 tokens.
- real: post-RoPE q/k/v of SmolLM2-135M (``tests/data/smollm2_kv.npz``: layers 0, 1, 15,
  29; or the 2-layer sample shipped in :mod:`rotorq.datasets`), GQA 9:3, d = 64,
  causal attention of the last 192 of 256 positions with every token compressed; mean
  over layers.

The error is ``‖ô − o‖ / ‖o‖`` against float64 exact softmax attention.

Run from the repository root: ``python -m benchmarks.cpu.kv_error``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

import rotorq

CONFIGS = [(2, 2), (3, 3), (4, 3), (4, 4)]

LEGACY = dict(residual_bits=None, sink_tokens=0, key_offset=False)
"""The base quantizers alone: no sinks, no key offset, a float32 window."""


def exact(q, k, v, causal=False):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    g = q.shape[0] // k.shape[0]
    s = q @ np.ascontiguousarray(np.repeat(k, g, 0).transpose(0, 2, 1)) / math.sqrt(q.shape[-1])
    if causal:
        n_q, t = q.shape[1], k.shape[1]
        s = np.where(np.arange(t)[None] <= (t - n_q + np.arange(n_q))[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return p @ np.repeat(v, g, 0)


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def planted(rng, d, t, heads=2, group=4, n_q=4):
    scale = np.ones((heads, 1, d))
    for h in range(heads):
        scale[h, 0, rng.choice(d, 4, replace=False)] = 10.0
    k = rng.standard_normal((heads, t, d)) * scale + rng.standard_normal((heads, 1, d)) * scale * 0.5
    v = rng.standard_normal((heads, t, d)) + rng.standard_normal((heads, 1, d))
    q = rng.standard_normal((heads * group, n_q, d)) / np.repeat(scale, group, 0)
    return k.astype(np.float32), v.astype(np.float32), q.astype(np.float32)


def real_data():
    path = Path(__file__).resolve().parents[2] / "tests" / "data" / "smollm2_kv.npz"
    if path.exists():
        with np.load(path) as z:
            return {n: z[n].astype(np.float32) for n in "qkv"}, [int(x) for x in z["layers"]]
    from rotorq.datasets import smollm2_kv_sample

    z = smollm2_kv_sample()
    return {n: z[n].astype(np.float32) for n in "qkv"}, [int(x) for x in z["layers"]]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    modes = [("mse", 0), ("mse", 8), ("prod", 0), ("prod", 8)]
    header = " | ".join(f"K{kb}/V{vb}" for kb, vb in CONFIGS)

    print("## synthetic (planted outlier channels, GQA 4:1, T = 1024), median over draws\n")
    print(f"| d | key mode | outlier ch. | {header} |")
    print("|---|---|---|" + "---|" * len(CONFIGS))
    for d in (64, 128):
        errs = {}
        for _ in range(args.draws):
            k, v, q = planted(rng, d, 1024)
            ref = exact(q, k, v)
            for mode, n_out in modes:
                for kb, vb in CONFIGS:
                    c = rotorq.KVCache(2, d, key_bits=kb, value_bits=vb, key_mode=mode,
                                       outlier_channels=n_out, residual_tokens=64, **LEGACY,
                                       seed=int(rng.integers(1 << 30)))
                    c.append(k, v)
                    errs.setdefault((mode, n_out, kb, vb), []).append(rel(c.attend(q), ref))
        for mode, n_out in modes:
            cells = " | ".join(f"{np.median(errs[mode, n_out, kb, vb]):.4f}" for kb, vb in CONFIGS)
            print(f"| {d} | {mode} | {n_out} | {cells} |")

    data, layers = real_data()
    q, k, v = data["q"], data["k"], data["v"]
    heads, d = k.shape[1], k.shape[3]
    print(f"\n## real SmolLM2-135M q/k/v (layers {layers}, GQA {q.shape[1]}:{heads}, d = {d}), "
          "causal, all tokens compressed, mean over layers\n")
    print(f"| key mode | outlier ch. | {header} | per layer at K4/V4 |")
    print("|---|---|" + "---|" * len(CONFIGS) + "---|")
    for mode, n_out in modes:
        cells, per_layer = [], []
        for kb, vb in CONFIGS:
            e = []
            for layer in range(q.shape[0]):
                c = rotorq.KVCache(heads, d, key_bits=kb, value_bits=vb, key_mode=mode,
                                   outlier_channels=n_out, residual_tokens=0, **LEGACY)
                c.append(k[layer], v[layer])
                qs = q[layer, :, -192:]
                e.append(rel(c.attend(qs, causal=True), exact(qs, k[layer], v[layer], causal=True)))
            cells.append(f"{np.mean(e):.4f}")
            if (kb, vb) == (4, 4):
                per_layer = e
        print(f"| {mode} | {n_out} | {' | '.join(cells)} | "
              f"{', '.join(f'{x:.3f}' for x in per_layer)} |")


if __name__ == "__main__":
    main()
