"""Attention fidelity of rotorq on SmolLM2-135M's real KV cache, every layer × KV head.

For each of the model's 30 layers and 3 KV heads (90 pairs) the keys are compressed by
a method and scored against the REAL post-RoPE queries of the 3 query heads that share
the KV head (grouped-query attention); the values are compressed too and the causal
attention output is recomputed from the compressed cache.

Methods (keys)
--------------
- ``mse/<rotation>``: TurboQuant MSE mode, ``b`` bits, rotation hadamard, dense or rotor.
- ``prod/<rotation>``: TurboQuant prod mode (``b - 1`` MSE bits + 1-bit QJL residual).
- ``qjl``: QJL alone with ``m = b · d`` sign bits (same stored bits as MSE mode).
- ``mse/<rotation> outliers``: the TurboQuant paper's mixed precision: the ``d/4``
  channels of largest RMS over the keys (per layer and head) get ``b + 1`` bits, the
  rest ``b`` bits, with two TurboQuant instances (labelled ``b + 0.5`` as in the
  paper; the stored bits are reported as measured).

Values are always TurboQuant MSE mode at the same bits and rotation as the keys (for
``qjl``: hadamard; for the outlier configurations the same split, chosen on the values'
channel RMS), so the attention-output error compares the key methods on equal values.

Metrics, per (layer, KV head), over queries that see at least ``MIN_KEYS`` keys
-----------------------------------------------------------------------------
- score cosine: cosine between the exact and the estimated score vector ``q·Kᵀ`` over
  the causal keys, averaged over queries;
- top-1: the estimated arg-max key equals the exact one;
- top-1 in top-5: the exact arg-max key is among the 5 largest estimates;
- attention error: ``‖O − Ô‖_F / ‖O‖_F`` with ``O = softmax(qKᵀ/√d + causal)·V``
  and ``Ô`` the same with the estimated scores and the reconstructed values; also with
  the exact values (keys only), which isolates the key method;
- key MSE: ``Σ‖k − k̂‖² / Σ‖k‖²`` (methods that reconstruct);
- bits/coordinate of the keys and of the values actually stored (from ``nbytes``).

Run ``python -m benchmarks.cpu.realkv_fidelity`` for the full tables (``--quick``: 3 layers,
256 tokens, 3 bits).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import rotorq
from benchmarks.cpu import smollm2
from benchmarks.tools.report import Progress, markdown_table

ROTATIONS = ("hadamard", "dense", "rotor")
BITS = (2, 3, 4)
MIXED_BITS = (2.5, 3.5)
MIN_KEYS = 32
TOP_K = 5
METRICS = ("cos", "top1", "top5", "attn_err", "attn_err_k", "key_mse")
CACHE_FORMAT = 1


@dataclass(frozen=True)
class Method:
    """One key-compression configuration.

    Attributes
    ----------
    kind : {"mse", "prod", "qjl"}
        TurboQuant mode, or QJL alone.
    rotation : str
        TurboQuant rotation (``"hadamard"`` for ``qjl``'s values).
    bits : float
        Nominal bits per coordinate; ``b + 0.5`` means the outlier split.
    """

    kind: str
    rotation: str
    bits: float

    @property
    def outliers(self) -> bool:
        """Whether this is the mixed-precision outlier-channel split."""
        return self.bits != int(self.bits)

    @property
    def label(self) -> str:
        """Short name, e.g. ``"mse/hadamard 3"`` or ``"mse/dense 2.5 outliers"``."""
        name = "qjl" if self.kind == "qjl" else f"{self.kind}/{self.rotation}"
        bits = f"{self.bits:g}"
        return f"{name} {bits}" + (" outliers" if self.outliers else "")


def methods(bits=BITS, mixed_bits=MIXED_BITS) -> list[Method]:
    """All key methods at the given bit widths, in table order.

    Parameters
    ----------
    bits : sequence of int
        Uniform bit widths (MSE, prod, QJL).
    mixed_bits : sequence of float
        Outlier-split widths (MSE mode, every rotation).

    Returns
    -------
    list of Method
    """
    out = []
    for b in bits:
        out += [Method("mse", r, b) for r in ROTATIONS]
        out += [Method("prod", r, b) for r in ROTATIONS]
        out.append(Method("qjl", "hadamard", b))
    for b in mixed_bits:
        out += [Method("mse", r, b) for r in ROTATIONS]
    return out


def capture(text: str = "gpl3", n_tokens: int = 512, cache_dir: str | Path | None = None,
            progress=None) -> dict[str, np.ndarray]:
    """Real post-RoPE queries, keys and values of SmolLM2-135M on the first tokens of a text.

    Parameters
    ----------
    text : {"gpl3", "pydoc"}
        Corpus of :func:`benchmarks.cpu.smollm2.load_text`.
    n_tokens : int
        Tokens from the start of the corpus.
    cache_dir : str or pathlib.Path, optional
        Cache folder (outside the repository); default ``~/.cache/rotorq``.
    progress : callable, optional
        Called with a message when the model has to run.

    Returns
    -------
    dict
        ``"q"`` float32 ``(30, 9, T, 64)``, ``"k"`` and ``"v"`` float32 ``(30, 3, T, 64)``.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "rotorq"
    cache = cache_dir / f"smollm2-qkv-{text}-{n_tokens}-v{CACHE_FORMAT}.npz"
    if cache.is_file():
        with np.load(cache) as data:
            return {name: data[name] for name in ("q", "k", "v")}
    if progress is not None:
        progress(f"running SmolLM2-135M over {n_tokens} tokens of {text} to capture q/k/v")
    model = smollm2.load_model(cache_dir)
    tokens = smollm2.tokenize(smollm2.load_text(text))[:n_tokens]
    _, captured = smollm2.forward(model, tokens, capture=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = cache.with_suffix(".tmp.npz")
    np.savez(partial, **captured)
    partial.replace(cache)
    return captured


def channel_order(x: np.ndarray) -> np.ndarray:
    """Channels of ``x (H, T, d)`` by decreasing RMS over tokens, per head → ``(H, d)``."""
    rms = np.sqrt(np.mean(np.square(x, dtype=np.float64), axis=1))
    return np.argsort(-rms, axis=-1, kind="stable")


class TurboCodec:
    """Whole-vector TurboQuant on ``(H, 1, T, d)`` batches (the 1 broadcasts over GQA)."""

    def __init__(self, tq: rotorq.TurboQuant):
        self.tq = tq

    def encode(self, x):
        return self.tq.quantize(x)

    def scores(self, q, codes):
        return self.tq.scores(q, codes)

    def decode(self, codes):
        return self.tq.dequantize(codes)

    @staticmethod
    def nbytes(codes):
        return codes.nbytes


class QJLCodec:
    """QJL sign sketches; keys only (no reconstruction)."""

    def __init__(self, qjl: rotorq.QJL):
        self.qjl = qjl

    def encode(self, x):
        return self.qjl.quantize(x)

    def scores(self, q, codes):
        return self.qjl.scores(q, codes)

    decode = None

    @staticmethod
    def nbytes(codes):
        return codes.nbytes


class SplitCodec:
    """Two TurboQuant instances on a per-head channel split (outliers first).

    Parameters
    ----------
    high, low : TurboQuant
        Quantizers of the ``high.dim`` outlier channels and of the remaining channels.
    order : numpy.ndarray
        ``(H, d)`` channel permutation per head, outliers first (:func:`channel_order`).
    """

    def __init__(self, high, low, order):
        self.high, self.low = high, low
        self.n_high = high.dim
        self.order = order

    def _index(self, ndim):
        return self.order.reshape(self.order.shape[:1] + (1,) * (ndim - 2) + self.order.shape[1:])

    def _split(self, x):
        xp = np.take_along_axis(x, self._index(x.ndim), axis=-1)
        return np.ascontiguousarray(xp[..., :self.n_high]), np.ascontiguousarray(xp[..., self.n_high:])

    def encode(self, x):
        hi, lo = self._split(x)
        return self.high.quantize(hi), self.low.quantize(lo)

    def scores(self, q, codes):
        qh, ql = self._split(q)
        return self.high.scores(qh, codes[0]) + self.low.scores(ql, codes[1])

    def decode(self, codes):
        y = np.concatenate([self.high.dequantize(codes[0]), self.low.dequantize(codes[1])], -1)
        out = np.empty_like(y)
        np.put_along_axis(out, self._index(y.ndim), y, axis=-1)
        return out

    @staticmethod
    def nbytes(codes):
        return codes[0].nbytes + codes[1].nbytes


def make_codec(kind: str, rotation: str, bits: float, dim: int, seed: int, data=None):
    """Build the codec of a configuration for one layer.

    Parameters
    ----------
    kind : {"mse", "prod", "qjl"}
    rotation : str
    bits : float
        ``b + 0.5`` selects the outlier split (``dim // 4`` channels at ``b + 1`` bits).
    dim : int
        Head dimension.
    seed : int
        Seed of the rotations / sketches.
    data : numpy.ndarray, optional
        ``(H, T, d)`` vectors whose channel RMS picks the outliers (split only).

    Returns
    -------
    TurboCodec, QJLCodec or SplitCodec
    """
    if kind == "qjl":
        return QJLCodec(rotorq.QJL(dim, int(bits) * dim, seed=seed))
    if bits != int(bits):
        base = int(bits)
        n_high = dim // 4
        high = rotorq.TurboQuant(n_high, base + 1, mode=kind, rotation=rotation, seed=seed)
        low = rotorq.TurboQuant(dim - n_high, base, mode=kind, rotation=rotation, seed=seed + 1)
        return SplitCodec(high, low, channel_order(data))
    return TurboCodec(rotorq.TurboQuant(dim, int(bits), mode=kind, rotation=rotation, seed=seed))


def _softmax_rows(s):
    s = s - s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return s


class LayerReference:
    """Exact attention quantities of one layer, shared by every method.

    Parameters
    ----------
    q : numpy.ndarray
        ``(Hq, T, d)`` queries.
    k, v : numpy.ndarray
        ``(Hkv, T, d)`` keys and values.
    min_keys : int
        Queries that see fewer keys are left out of the metrics.
    """

    def __init__(self, q, k, v, min_keys=MIN_KEYS):
        n_kv, n_tok, d = k.shape
        self.q = np.ascontiguousarray(q.reshape(n_kv, -1, n_tok, d), dtype=np.float32)
        self.k = np.ascontiguousarray(k[:, None], dtype=np.float32)
        self.v = np.ascontiguousarray(v[:, None], dtype=np.float32)
        self.scale = np.float32(1.0 / math.sqrt(d))
        pos = np.arange(n_tok)
        rows = pos[pos >= min_keys - 1]
        visible = pos[None, :] <= rows[:, None]
        self.rows = rows
        self.keep = visible.astype(np.float32)
        self.bias = np.where(visible, np.float32(0.0), np.float32(-np.inf))
        self.scores = (self.q[..., rows, :] @ self.k.swapaxes(-1, -2)) * self.keep
        self.top1 = (self.scores + self.bias).argmax(-1)
        self.out = self._probs(self.scores) @ self.v

    def _probs(self, rows_scores):
        """Causal softmax of score rows ``(..., len(rows), T)``."""
        return _softmax_rows(rows_scores * self.scale + self.bias)

    def metrics(self, est, v_hat):
        """Per-KV-head metrics of estimated scores ``(Hkv, G, T, T)`` and values ``v_hat``.

        Returns
        -------
        dict of str to numpy.ndarray
            ``cos``, ``top1``, ``top5``, ``attn_err`` (keys and values compressed) and
            ``attn_err_k`` (keys only), each ``(Hkv,)``.
        """
        r = est[..., self.rows, :] * self.keep
        s = self.scores
        dot = np.einsum("hgtn,hgtn->hgt", s, r, dtype=np.float64)
        norm = np.linalg.norm(s, axis=-1) * np.linalg.norm(r, axis=-1)
        cos = dot / np.maximum(norm, 1e-30)
        masked = r + self.bias
        top1 = masked.argmax(-1) == self.top1
        at_true = np.take_along_axis(masked, self.top1[..., None], axis=-1)
        in_top = (masked > at_true).sum(-1) < TOP_K
        p = self._probs(r)
        ref = np.square(self.out).sum((1, 2, 3))

        def rel_err(out):
            return np.sqrt(np.square(out - self.out).sum((1, 2, 3)) / ref)

        return {"cos": cos.mean((1, 2)), "top1": top1.mean((1, 2)),
                "top5": in_top.mean((1, 2)), "attn_err": rel_err(p @ v_hat),
                "attn_err_k": rel_err(p @ self.v)}


def evaluate_layer(ref: LayerReference, method: Method, seed: int) -> dict:
    """All metrics of ``method`` on one layer.

    Parameters
    ----------
    ref : LayerReference
        Exact quantities of the layer.
    method : Method
        Key configuration (values: TurboQuant MSE, see the module docstring).
    seed : int
        Seed of the layer's quantizers.

    Returns
    -------
    dict
        The arrays of :meth:`LayerReference.metrics`, ``key_mse`` ``(Hkv,)`` (NaN for
        QJL), and the stored ``key_bits`` and ``value_bits`` per coordinate.
    """
    k, v = ref.k, ref.v
    dim = k.shape[-1]
    key_codec = make_codec(method.kind, method.rotation, method.bits, dim, seed, k[:, 0])
    value_codec = make_codec("mse", method.rotation, method.bits, dim, seed + 1000, v[:, 0])
    kc = key_codec.encode(k)
    est = key_codec.scores(ref.q, kc)
    vc = value_codec.encode(v)
    out = ref.metrics(est, value_codec.decode(vc))
    if key_codec.decode is None:
        out["key_mse"] = np.full(k.shape[0], np.nan)
    else:
        err = key_codec.decode(kc) - k
        out["key_mse"] = np.square(err).sum((1, 2, 3)) / np.square(k).sum((1, 2, 3))
    out["key_bits"] = 8.0 * key_codec.nbytes(kc) / k.size
    out["value_bits"] = 8.0 * value_codec.nbytes(vc) / v.size
    return out


def run(layers=None, n_tokens: int = 512, bits=BITS, mixed_bits=MIXED_BITS, text="gpl3",
        progress=None) -> dict:
    """Evaluate every method on every requested layer and KV head.

    Parameters
    ----------
    layers : sequence of int, optional
        Layers to evaluate; default all 30.
    n_tokens : int, default 512
        Tokens of ``text``.
    bits, mixed_bits : sequences
        See :func:`methods`.
    text : str, default "gpl3"
        Corpus.
    progress : callable, optional
        Receives a message per layer.

    Returns
    -------
    dict
        ``layers`` (list), ``n_tokens``, ``methods`` (list of Method) and ``results``:
        method label → dict of ``(n_layers, Hkv)`` arrays for each of :data:`METRICS`
        plus the float ``key_bits`` and ``value_bits``.
    """
    progress = progress or (lambda message: None)
    data = capture(text, n_tokens, progress=progress)
    layers = list(range(data["k"].shape[0])) if layers is None else list(layers)
    todo = methods(bits, mixed_bits)
    results = {m.label: {name: [] for name in METRICS} for m in todo}
    for i, layer in enumerate(layers):
        ref = LayerReference(data["q"][layer], data["k"][layer], data["v"][layer])
        for method in todo:
            got = evaluate_layer(ref, method, seed=layer)
            entry = results[method.label]
            for name in METRICS:
                entry[name].append(got[name])
            entry["key_bits"], entry["value_bits"] = got["key_bits"], got["value_bits"]
        progress(f"fidelity: layer {layer} done ({i + 1}/{len(layers)}, {len(todo)} methods)")
    for entry in results.values():
        for name in METRICS:
            entry[name] = np.asarray(entry[name])
    return {"layers": layers, "n_tokens": n_tokens, "methods": todo, "results": results,
            "text": text}


def headline(result: dict, label: str = "mse/hadamard 3") -> dict:
    """Mean score cosine, top-1 and attention errors of one method over all pairs."""
    r = result["results"][label]
    return {"pairs": r["cos"].size, "cos": float(r["cos"].mean()),
            "top1": float(r["top1"].mean()), "top5": float(r["top5"].mean()),
            "attn_err": float(r["attn_err"].mean()), "attn_err_k": float(r["attn_err_k"].mean()),
            "key_bits": r["key_bits"]}


def summary_table(result: dict) -> str:
    """Markdown summary: one row per method, averaged over all (layer, KV head) pairs."""
    rows = []
    for m in result["methods"]:
        r = result["results"][m.label]
        key_mse = "—" if np.isnan(r["key_mse"]).all() else f"{r['key_mse'].mean():.4f}"
        rows.append([m.label, f"{r['key_bits']:.3f}", f"{r['value_bits']:.3f}",
                     f"{r['cos'].mean():.4f}", f"{r['cos'].min():.4f}",
                     f"{r['top1'].mean():.3f}", f"{r['top5'].mean():.3f}",
                     f"{r['attn_err'].mean():.4f}", f"{r['attn_err'].max():.4f}",
                     f"{r['attn_err_k'].mean():.4f}", key_mse])
    return markdown_table(["keys: method bits", "K bits/coord", "V bits/coord", "score cos",
                           "min cos", "top-1", "top-1 in top-5", "attn err (K+V)",
                           "max attn err", "attn err (K only)", "key rel. MSE"], rows)


def per_layer_table(result: dict, label: str = "mse/hadamard 3") -> str:
    """Markdown per-layer table of one method (means over the layer's KV heads)."""
    r = result["results"][label]
    rows = [[layer, f"{r['cos'][i].mean():.4f}", f"{r['cos'][i].min():.4f}",
             f"{r['top1'][i].mean():.3f}", f"{r['top5'][i].mean():.3f}",
             f"{r['attn_err'][i].mean():.4f}", f"{r['attn_err_k'][i].mean():.4f}",
             f"{r['key_mse'][i].mean():.4f}"]
            for i, layer in enumerate(result["layers"])]
    return markdown_table(["layer", "score cos", "min cos (head)", "top-1", "top-1 in top-5",
                           "attn err (K+V)", "attn err (K only)", "key rel. MSE"], rows)


def per_layer_comparison(result: dict, bits: float = 3, metric: str = "attn_err_k") -> str:
    """Markdown table: one metric per layer (rows) for every method at ``bits`` (columns)."""
    chosen = [m for m in result["methods"] if m.bits == bits]
    rows = [[layer] + [f"{result['results'][m.label][metric][i].mean():.4f}" for m in chosen]
            for i, layer in enumerate(result["layers"])]
    return markdown_table(["layer"] + [m.label for m in chosen], rows)


def plot(result: dict, path: Path) -> Path:
    """Attention error and score cosine vs stored key bits, one line per method family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    families: dict[str, list] = {}
    for m in result["methods"]:
        family = m.label.rsplit(" ", 1)[0] if not m.outliers else m.label.split(" ")[0] + " outl."
        families.setdefault(family, []).append(m)
    for family, group in families.items():
        group = sorted(group, key=lambda m: m.bits)
        x = [result["results"][m.label]["key_bits"] for m in group]
        for ax, metric in zip(axes, ("attn_err_k", "cos"), strict=True):
            y = [result["results"][m.label][metric].mean() for m in group]
            ax.plot(x, y, "o-" if "outl." not in family else "s--", label=family)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("attention-output rel. error (keys compressed)")
    axes[1].set_ylabel("score-vector cosine")
    for ax in axes:
        ax.set_xlabel("stored key bits / coordinate")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"SmolLM2-135M real KV ({len(result['layers'])} layers × 3 KV heads, "
                 f"{result['n_tokens']} tokens of {result['text']})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    """Command line: print the summary and the per-layer tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 layers, 256 tokens, 3 bits")
    args = parser.parse_args(argv)
    progress = Progress()
    if args.quick:
        result = run(layers=(0, 15, 29), n_tokens=256, bits=(3,), mixed_bits=(3.5,),
                     progress=progress)
    else:
        result = run(progress=progress)
    print(summary_table(result))
    print(per_layer_table(result))
    print(per_layer_comparison(result))


if __name__ == "__main__":
    main()
