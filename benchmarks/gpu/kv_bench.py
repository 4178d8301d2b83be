"""Decode attention over a 3-bit KV cache on the GPU against torch fp16 SDPA, same run.

Shape: 32 query heads, 4 KV heads (GQA 8), d = 128, one query per head (n_q = 1), keys and
values 3-bit MSE (hadamard), T = 4K, 64K, 1M tokens. Timed by CUDA events after a warm-up,
median of trials, inputs rotated among buffers that together exceed L2 (50 MB):

- ``fused``: rotorq's backend ``decode_attention`` (the fused split-K kernel + the device
  merge) on the cache's packed codes, back-to-back calls; "kernels only": the same calls'
  launches recorded once and replayed (``gpu_bench.kernel_time``), the GPU time without the
  call's host work — what the floor refers to;
- ``attend``: ``rotorq.KVCache.attend`` end to end (query rotation, fused kernel, inverse
  rotation, the full-precision window of 128 tokens, the merge, host overhead included);
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention(q, K, V, enable_gqa=True)`` on
  the uncompressed fp16 cache (1, 4, T, 128).

Effective TB/s = bytes of the cache read / time (compressed: 100 B per token and KV head,
fp16: 512 B). Usage: ``python3 -m benchmarks.gpu.kv_bench [--out DIR] [--tokens 4096 ...]``;
writes ``gpu_kv_bench.json`` and ``gpu_kv_bench.md`` to DIR (default ``$OUT`` or ``.``) and
prints a short table last.
"""

import argparse
import dataclasses
import importlib
import importlib.metadata
import json
import math
import os
import platform
import time

import cupy as cp
import numpy as np
import torch

import rotorq
from benchmarks.gpu.bench import device_time as events_time
from benchmarks.gpu.bench import kernel_time
from rotorq._ops import KeyBias
from rotorq.kv import attention as kv_attention

api = importlib.import_module("rotorq.cuda.api")

HQ, HK, D, BITS = 32, 4, 128, 3
L2_FALLBACK = 50 << 20


def l2_bytes():
    """The current device's L2 size (H100 50 MB, H200 60 MB); 50 MB without a device."""
    try:
        return int(cp.cuda.Device().attributes["L2CacheSize"])
    except Exception:  # e.g. --precompile-only on a machine without a GPU
        return L2_FALLBACK
FLOOR_TBS = 2.98


def build_cache(tokens, rng, check_finite=True):
    """A KVCache of ``tokens`` tokens (fp16 keys/values appended on the GPU) and the same
    uncompressed keys and values as torch fp16 (1, HK, T, D)."""
    saved = api.GENERATED_MIN_ROWS
    api.GENERATED_MIN_ROWS = 1 << 62  # the generic quantize kernel: no long compile of a shape
    try:
        grng = cp.random.default_rng(int(rng.integers(1 << 31)))
        k = grng.standard_normal((HK, tokens, D), dtype=cp.float32).astype(cp.float16)
        v = grng.standard_normal((HK, tokens, D), dtype=cp.float32).astype(cp.float16)
        cache = rotorq.KVCache(HK, D, key_bits=BITS, value_bits=BITS, residual_tokens=128,
                               residual_bits=None, sink_tokens=0, key_offset=False,
                               check_finite=check_finite)
        cache.append(k, v)
    finally:
        api.GENERATED_MIN_ROWS = saved
    kt = torch.from_dlpack(k).unsqueeze(0)
    vt = torch.from_dlpack(v).unsqueeze(0)
    return cache, kt, vt


def fused_args(cache, q, layout=None):
    """The backend call KVCache.attend makes for its base tier
    (:func:`rotorq.kv.attention.fused_arguments`): ``(queries, keys, values, n_keys, n_q,
    offset, layout)``. ``layout="rows"``: the codes converted to the row layout (copies) when
    the cache holds tiles (:mod:`rotorq.tiles`)."""
    state = cache._state
    qq, _, _, n_q, _ = cache._queries(state, q)
    args, kwargs = kv_attention.fused_arguments(state, qq, 1.0 / math.sqrt(D), n_q, len(state))
    queries, keys, values, n_c, n_q, off = args
    held = kwargs["layout"]
    if layout == "rows" and held == "tiles":
        base = state.base

        def rows(codes, parts):
            return tuple(dataclasses.replace(p, **dict(zip(("codes", "norms"),
                                                           codes.rows(cp, i, 0, n_c),
                                                           strict=True)))
                         for i, p in enumerate(parts))

        keys, values = rows(base.keys, keys), rows(base.values, values)
    return queries, keys, values, n_c, n_q, off, layout or held


def rotated_copies(keys, values, n):
    """``n`` buffer sets ``(keys, values)``: the originals, then copies of codes and norms."""
    def copy(parts):
        return tuple(dataclasses.replace(p, codes=p.codes.copy(), norms=p.norms.copy())
                     for p in parts)

    return [(keys, values)] + [(copy(keys), copy(values)) for _ in range(n - 1)]


def bench(tokens, rng, reps):
    cache, kt, vt = build_cache(tokens, rng)
    comp_bytes = cache.compressed_tokens * cache.bytes_per_token
    fp16_bytes = HK * tokens * D * 2 * 2
    nbuf_c = max(1, min(64, -(-2 * l2_bytes() // comp_bytes)))
    nbuf_f = max(1, min(64, -(-2 * l2_bytes() // fp16_bytes)))
    qs = [cp.asarray(rng.standard_normal((HQ, D), dtype=np.float32)) for _ in range(4)]
    # rotate copies of the packed buffers (the kernel reads only these)
    rq, kargs, vargs, n_c, n_q, off, lay = fused_args(cache, qs[0])
    cbufs = rotated_copies(kargs, vargs, nbuf_c)

    def fused(b):
        return api.decode_attention(rq, b[0], b[1], n_c, n_q, off, layout=lay)

    t_fused = events_time(fused, cbufs, reps)
    t_fused_kernel = kernel_time(fused, cbufs, reps)  # the same launches, no host work
    # the same kernel on the row layout (the codes as TurboQuant.quantize writes them)
    _, rk, rv, _, _, _, _ = fused_args(cache, qs[0], layout="rows")
    rbufs = rotated_copies(rk, rv, nbuf_c)

    def fused_rows(b):
        return api.decode_attention(rq, b[0], b[1], n_c, n_q, off, layout="rows")

    t_rows_kernel = kernel_time(fused_rows, rbufs, reps)
    # the same with the RoPE-aware key-offset bias (KVCache(rope_base=...)): the per-key
    # term, then the tensor-core kernel; and the general kernel, which computes it inside
    half = D // 2
    bias = KeyBias(cp.asarray(rng.standard_normal((HK, HQ // HK, half), dtype=np.float32)),
                   cp.asarray(rng.standard_normal((HK, HQ // HK, half), dtype=np.float32)),
                   cp.asarray(100000.0 ** (-np.arange(0, D, 2) / D)), 1)

    def fused_bias(b):
        return api.decode_attention(rq, b[0], b[1], n_c, n_q, off, key_bias=bias, layout=lay)

    t_bias = events_time(fused_bias, cbufs, reps)
    t_bias_kernel = kernel_time(fused_bias, cbufs, reps)
    # its launches alone: the key term (tensor cores; one thread per key), the attention
    # kernel without and with the term
    t_term = kernel_time(fused_bias, cbufs, reps, only=0)
    t_att = kernel_time(fused, cbufs, reps, only=0)
    t_att_term = kernel_time(fused_bias, cbufs, reps, only=1)
    saved_mma, api.KEY_BIAS_MMA = api.KEY_BIAS_MMA, False
    try:
        t_term_scalar = kernel_time(fused_bias, cbufs, max(2, reps // 4), only=0)
    finally:
        api.KEY_BIAS_MMA = saved_mma
    saved, api.ATTENTION_FAST = api.ATTENTION_FAST, False
    def fused_rows_bias(b):
        return api.decode_attention(rq, b[0], b[1], n_c, n_q, off, key_bias=bias, layout="rows")

    try:  # the general kernel alone, and with the bias (on the row layout)
        t_general = events_time(fused_rows, rbufs, reps)
        t_general_bias = events_time(fused_rows_bias, rbufs, max(2, reps // 4))
    finally:
        api.ATTENTION_FAST = saved
    del rbufs, rk, rv
    # end to end through the cache (its own buffers; rotate the queries)
    t_attend = events_time(lambda q: cache.attend(q), qs, reps)
    cp.cuda.runtime.deviceSynchronize()
    h0 = time.perf_counter()
    for i in range(reps):
        cache.attend(qs[i % 4])
    cp.cuda.runtime.deviceSynchronize()
    t_attend_wall = (time.perf_counter() - h0) / reps
    # torch fp16 SDPA on the uncompressed cache
    fbufs = [(kt, vt)] + [(kt.clone(), vt.clone()) for _ in range(nbuf_f - 1)]
    qt = torch.randn(1, HQ, 1, D, device="cuda", dtype=torch.float16)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def base(b):
        return sdpa(qt, b[0], b[1], enable_gqa=True)

    t_sdpa = events_time(base, fbufs, reps)
    # accuracy of the fused result against fp32 attention on the uncompressed cache
    out = cache.attend(qs[0])
    qf = torch.from_dlpack(qs[0]).float().view(HK, HQ // HK, D)
    s = torch.einsum("hgd,htd->hgt", qf, kt[0].float()) / math.sqrt(D)
    exact = torch.einsum("hgt,htd->hgd", torch.softmax(s, -1), vt[0].float()).reshape(HQ, D)
    got = torch.from_dlpack(out)
    rel = float((got - exact).norm() / exact.norm())
    del cbufs, fbufs, kt, vt
    cp.get_default_memory_pool().free_all_blocks()
    torch.cuda.empty_cache()
    return {"tokens": tokens, "compressed_bytes": comp_bytes, "fp16_bytes": fp16_bytes,
            "layout": lay, "rows_kernel_us": t_rows_kernel * 1e6,
            "fused_us": t_fused * 1e6, "fused_kernel_us": t_fused_kernel * 1e6,
            "speedup_fused_kernel": t_sdpa / t_fused_kernel,
            "fused_rope_bias_us": t_bias * 1e6, "fused_rope_bias_kernel_us": t_bias_kernel * 1e6,
            "general_rope_bias_us": t_general_bias * 1e6,
            "rope_term_mma_us": t_term * 1e6, "rope_term_scalar_us": t_term_scalar * 1e6,
            "attention_alone_us": t_att * 1e6, "attention_with_term_alone_us": t_att_term * 1e6,
            "general_us": t_general * 1e6, "attend_us": t_attend * 1e6,
            "attend_wall_us": t_attend_wall * 1e6, "sdpa_us": t_sdpa * 1e6,
            "fused_tbs": comp_bytes / t_fused / 1e12, "sdpa_tbs": fp16_bytes / t_sdpa / 1e12,
            "floor_us": comp_bytes / (FLOOR_TBS * 1e12) * 1e6,
            "speedup_fused": t_sdpa / t_fused, "speedup_attend": t_sdpa / t_attend,
            "rel_err_vs_fp32_exact": rel}


def profile_host(rng, path, calls=200):
    """cProfile of KVCache.attend and of the backend call at T = 4K (host-bound sizes)."""
    import cProfile
    import io
    import pstats
    cache, _, _ = build_cache(4096, rng)
    q = cp.asarray(rng.standard_normal((HQ, D), dtype=np.float32))
    *args, lay = fused_args(cache, q)
    out = io.StringIO()
    for name, fn in (("KVCache.attend", lambda: cache.attend(q)),
                     ("cuda.decode_attention",
                      lambda: api.decode_attention(*args, layout=lay))):
        fn()
        cp.cuda.runtime.deviceSynchronize()
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        for _ in range(calls):
            fn()
        prof.disable()
        cp.cuda.runtime.deviceSynchronize()
        out.write(f"== {name}: {(time.perf_counter() - t0) / calls * 1e6:.1f} µs per call "
                  "(profiled)\n")
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(18)
    with open(path, "w") as f:
        f.write(out.getvalue())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 65536, 1 << 20])
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    props = cp.cuda.runtime.getDeviceProperties(0)
    meta = {"device": props["name"].decode(), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                    time.gmtime()),
            "python": platform.python_version(), "numpy": np.__version__,
            "cupy": cp.__version__, "torch": torch.__version__,
            "numba-cuda": importlib.metadata.version("numba-cuda"),
            "fast_kernel": api.ATTENTION_FAST}
    t0 = time.perf_counter()
    warm_cache, _, _ = build_cache(4096, rng)  # compile everything once, report it
    warm_cache.attend(cp.asarray(rng.standard_normal((HQ, D), dtype=np.float32)))
    cp.cuda.runtime.deviceSynchronize()
    meta["first_call_compile_s"] = round(time.perf_counter() - t0, 2)
    del warm_cache
    rows = [bench(t, rng, args.reps) for t in args.tokens]
    os.makedirs(args.out, exist_ok=True)
    profile_host(rng, os.path.join(args.out, "gpu_kv_bench_profile.txt"))
    with open(os.path.join(args.out, "gpu_kv_bench.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [f"# decode attention, {HQ} q / {HK} KV heads, d={D}, {BITS}-bit K and V, n_q=1",
             "", ", ".join(f"{k}: {v}" for k, v in meta.items()), "",
             "| T | codes | fused µs | fused, kernels only µs | same kernels on rows µs | TB/s | "
             "floor µs | general kernel µs | "
             "general + RoPE bias µs | fused + RoPE bias µs (call / kernels) | "
             "KVCache.attend µs (events / wall) | "
             "torch SDPA fp16 µs | TB/s | SDPA / fused | SDPA / fused kernels | "
             "SDPA / attend | rel. err vs fp32 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tokens']} | {r['layout']} | {r['fused_us']:.1f} | "
                     f"{r['fused_kernel_us']:.1f} | {r['rows_kernel_us']:.1f} | "
                     f"{r['fused_tbs']:.2f} | "
                     f"{r['floor_us']:.1f} | {r['general_us']:.1f} | "
                     f"{r['general_rope_bias_us']:.1f} | "
                     f"{r['fused_rope_bias_us']:.1f} / {r['fused_rope_bias_kernel_us']:.1f} | "
                     f"{r['attend_us']:.1f} / {r['attend_wall_us']:.1f} | "
                     f"{r['sdpa_us']:.1f} | {r['sdpa_tbs']:.2f} | {r['speedup_fused']:.2f}× | "
                     f"{r['speedup_fused_kernel']:.2f}× | "
                     f"{r['speedup_attend']:.2f}× | {r['rel_err_vs_fp32_exact']:.3f} |")
    lines += ["", "RoPE-aware key term, launches alone (kernels only, µs):", "",
              "| T | key term, tensor cores | key term, one thread per key | attention kernel "
              "| attention kernel with the term | merge and the rest |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        rest = r["fused_rope_bias_kernel_us"] - r["rope_term_mma_us"] - \
            r["attention_with_term_alone_us"]
        lines.append(f"| {r['tokens']} | {r['rope_term_mma_us']:.1f} | "
                     f"{r['rope_term_scalar_us']:.1f} | {r['attention_alone_us']:.1f} | "
                     f"{r['attention_with_term_alone_us']:.1f} | {rest:.1f} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "gpu_kv_bench.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
