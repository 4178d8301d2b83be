"""Perplexity of SmolLM2-135M with its KV cache passed through rotorq.

In every layer the post-RoPE keys and the values are quantized and dequantized with
TurboQuant (one quantizer per layer, seeded by the layer index, shared by the 3 KV
heads) before attention.  Dequantize-then-dot equals rotorq's score estimator in both
modes (prod mode's reconstruction includes the QJL term), so this is exactly what an
attention kernel on the codes computes.

Residual window ``w``: a real cache keeps the ``w`` most recent tokens in full
precision and quantizes a token when it leaves the window.  Query ``t`` then sees keys
``j > t - w`` exactly and older keys quantized.  ``w = 0`` quantizes every token
(the hardest setting).  The model's forward pass has one ``kv_hook`` that replaces
the keys for all queries at once, so for ``w > 0`` the attention of
:mod:`benchmarks.cpu.smollm2` is swapped, for the duration of the call, for one that mixes
the exact and the quantized cache per (query, key) pair.

Run ``python -m benchmarks.cpu.realkv_perplexity`` (``--quick``: 256 tokens, 3 bits).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from unittest import mock

import numpy as np

import rotorq
from benchmarks.cpu import smollm2
from benchmarks.tools.report import Progress, markdown_table

WINDOWS = (0, 128)


@dataclass(frozen=True)
class KVConfig:
    """How keys and values are compressed.

    Attributes
    ----------
    label : str
        Row name in the table.
    key : dict
        ``TurboQuant`` keyword arguments for the keys (``bits`` included).
    value : dict
        Same for the values.
    """

    label: str
    key: dict = field(hash=False)
    value: dict = field(hash=False)


def configs(bits=(2, 3, 4)) -> list[KVConfig]:
    """Configurations of the table: MSE-mode Hadamard K and V at each of ``bits``, and at
    3 bits (when requested) also norm correction and prod-mode keys."""
    out = [KVConfig(f"MSE {b}-bit K+V", {"bits": b}, {"bits": b}) for b in bits]
    if 3 in bits:
        out.append(KVConfig("MSE 3-bit K+V, norm correction",
                            {"bits": 3, "norm_correction": True},
                            {"bits": 3, "norm_correction": True}))
        out.append(KVConfig("prod 3-bit K, MSE 3-bit V", {"bits": 3, "mode": "prod"},
                            {"bits": 3}))
    return out


class KVQuantizer:
    """Quantize-dequantize keys and values of each layer; records stored bits.

    Parameters
    ----------
    config : KVConfig
        Compression of keys and values.
    n_layers, head_dim : int
        Model shape.
    """

    def __init__(self, config: KVConfig, n_layers: int, head_dim: int):
        self.keys = [rotorq.TurboQuant(head_dim, seed=layer, **config.key)
                     for layer in range(n_layers)]
        self.values = [rotorq.TurboQuant(head_dim, seed=10_000 + layer, **config.value)
                       for layer in range(n_layers)]
        self.bits = {"key": float("nan"), "value": float("nan")}

    def __call__(self, layer, k, v):
        """``kv_hook`` of :func:`benchmarks.cpu.smollm2.forward`: returns ``(k̂, v̂)``."""
        out = []
        for name, tq, x in (("key", self.keys[layer], k), ("value", self.values[layer], v)):
            codes = tq.quantize(x)
            self.bits[name] = codes.bits_per_coordinate
            out.append(tq.dequantize(codes))
        return tuple(out)


def windowed_attention(q, k, v, k_hat, v_hat, window):
    """Causal GQA attention where key/value ``j`` is exact for query ``t`` iff ``t - j < window``.

    Parameters
    ----------
    q : numpy.ndarray
        ``(H, T, D)`` queries.
    k, v, k_hat, v_hat : numpy.ndarray
        ``(Hkv, T, D)`` exact and quantized keys and values.
    window : int
        Residual window length.

    Returns
    -------
    numpy.ndarray
        ``(H, T, D)`` attention output.
    """
    n_heads, n_tok, d = q.shape
    n_kv = k.shape[0]
    qg = q.reshape(n_kv, n_heads // n_kv, n_tok, d) * np.float32(1.0 / np.sqrt(d))
    age = np.arange(n_tok)[:, None] - np.arange(n_tok)[None, :]
    recent = (age >= 0) & (age < window)
    scores = np.where(recent, qg @ k.swapaxes(1, 2)[:, None], qg @ k_hat.swapaxes(1, 2)[:, None])
    scores[..., age < 0] = -np.inf
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    exact_part = np.where(recent, scores, np.float32(0.0))
    out = exact_part @ v[:, None] + (scores - exact_part) @ v_hat[:, None]
    return out.reshape(n_heads, n_tok, d)


def perplexity(model, tokens, quantizer: KVQuantizer, window: int = 0) -> float:
    """Perplexity with the KV cache compressed by ``quantizer`` and a residual window.

    Parameters
    ----------
    model : benchmarks.cpu.smollm2.Model
    tokens : numpy.ndarray
        Token ids.
    quantizer : KVQuantizer
        Compression of every layer's keys and values.
    window : int, default 0
        Most recent tokens kept in full precision for each query (0: none).

    Returns
    -------
    float
    """
    if window == 0:
        return smollm2.perplexity(model, tokens, kv_hook=quantizer)
    pending = {}

    def hook(layer, k, v):
        pending["kv"] = quantizer(layer, k, v)
        return k, v

    def attention(q, k, v):
        k_hat, v_hat = pending.pop("kv")
        return windowed_attention(q, k, v, k_hat, v_hat, window)

    with mock.patch.object(smollm2, "_attention", attention):
        return smollm2.perplexity(model, tokens, kv_hook=hook)


def run(n_tokens: int = 512, bits=(2, 3, 4), windows=WINDOWS, texts=smollm2.CORPORA,
        progress=None) -> dict:
    """Perplexity of every configuration, window and text.

    Parameters
    ----------
    n_tokens : int, default 512
        Tokens from the start of each text.
    bits : sequence of int
        Bit widths of :func:`configs`.
    windows : sequence of int
        Residual windows.
    texts : sequence of str
        Corpora of :func:`benchmarks.cpu.smollm2.load_text`.
    progress : callable, optional
        Receives a message per evaluation.

    Returns
    -------
    dict
        ``exact``: text → perplexity; ``rows``: list of dicts with ``label``,
        ``key_bits``, ``value_bits`` and ``ppl`` ((text, window) → perplexity);
        ``n_tokens``, ``windows`` and ``texts``.
    """
    progress = progress or (lambda message: None)
    model = smollm2.load_model()
    cfg = model.config
    tokens = {t: smollm2.tokenize(smollm2.load_text(t))[:n_tokens] for t in texts}
    exact = {t: smollm2.perplexity(model, tokens[t]) for t in texts}
    progress(f"perplexity: exact {exact}")
    rows = []
    for config in configs(bits):
        quantizer = KVQuantizer(config, cfg.n_layers, cfg.head_dim)
        ppl = {}
        for t in texts:
            for w in windows:
                ppl[(t, w)] = perplexity(model, tokens[t], quantizer, w)
                progress(f"perplexity: {config.label}, {t}, window {w}: {ppl[(t, w)]:.3f}")
        rows.append({"label": config.label, "key_bits": quantizer.bits["key"],
                     "value_bits": quantizer.bits["value"], "ppl": ppl})
    return {"exact": exact, "rows": rows, "n_tokens": n_tokens, "windows": tuple(windows),
            "texts": tuple(texts)}


def table(result: dict) -> str:
    """Markdown table: perplexity (and change vs exact) per text and window."""
    cols = [(t, w) for t in result["texts"] for w in result["windows"]]
    header = ["K/V cache", "K bits/coord", "V bits/coord"] + [f"{t}, window {w}"
                                                              for t, w in cols]
    rows = [["exact (float32)", "32", "32"] + [f"{result['exact'][t]:.3f}" for t, _ in cols]]
    for r in result["rows"]:
        cells = []
        for t, w in cols:
            p = r["ppl"][(t, w)]
            cells.append(f"{p:.3f} ({100 * (p / result['exact'][t] - 1):+.1f}%)")
        rows.append([r["label"], f"{r['key_bits']:.3f}", f"{r['value_bits']:.3f}"] + cells)
    return markdown_table(header, rows)


def main(argv=None) -> None:
    """Command line: print the perplexity table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 tokens, 3 bits, gpl3")
    args = parser.parse_args(argv)
    progress = Progress()
    if args.quick:
        result = run(n_tokens=256, bits=(3,), texts=("gpl3",), progress=progress)
    else:
        result = run(progress=progress)
    print(table(result))


if __name__ == "__main__":
    main()
