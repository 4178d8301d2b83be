"""Decode attention on a compressed KV cache vs exact attention on the uncompressed cache.

One decode step (one query per query head) of a Llama-3-8B-shaped layer (8 KV heads,
32 query heads, head_dim 128) at several context lengths T:

- ``rotorq``: :meth:`rotorq.KVCache.attend` — the fused kernel on the packed codes
  (scores → online softmax → values in the rotated domain) plus the float32 window;
- ``numpy fp32``: exact attention with BLAS matmuls on a contiguous float32 cache.

Every timed call is preceded by one warm-up; the best of ``--repeats`` runs is shown
(robust to other load on a shared machine),
with the bytes each method keeps and the attention-output error of the compressed cache
(relative to float64 exact attention).

Run from the repository root::

    python -m benchmarks.cpu.kv_attention                      # T = 4K, 16K, 64K
    python -m benchmarks.cpu.kv_attention --tokens 4096 65536 --key-bits 4 --value-bits 4

(A GPU section against torch ``scaled_dot_product_attention`` comes with ``rotorq.cuda``.)
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numba
import numpy as np

import rotorq


def exact_fp32(q, k, v, scale):
    """Exact GQA attention, float32, BLAS: q (H, G, d), k/v (H, T, d) contiguous."""
    s = np.matmul(q, k.transpose(0, 2, 1)) * np.float32(scale)  # (H, G, T)
    s -= s.max(axis=2, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=2, keepdims=True)
    return np.matmul(s, v)  # (H, G, d)


def exact_fp64(q, k, v, scale):
    s = np.matmul(q.astype(np.float64), k.astype(np.float64).transpose(0, 2, 1)) * scale
    p = np.exp(s - s.max(axis=2, keepdims=True))
    p /= p.sum(axis=2, keepdims=True)
    return np.matmul(p, v.astype(np.float64))


def timed(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.min(times))


def make_kv(rng, heads, t, d, n_out=4, factor=10.0):
    """Keys with planted outlier channels and a bias; values with a shared mean (float32)."""
    scale = np.ones((heads, 1, d), np.float32)
    for h in range(heads):
        scale[h, 0, rng.choice(d, n_out, replace=False)] = factor
    k = rng.standard_normal((heads, t, d), dtype=np.float32) * scale
    k += rng.standard_normal((heads, 1, d), dtype=np.float32) * scale * 0.5
    v = rng.standard_normal((heads, t, d), dtype=np.float32)
    v += rng.standard_normal((heads, 1, d), dtype=np.float32)
    return k, v, scale


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--group", type=int, default=4, help="query heads per KV head")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--key-bits", type=int, default=4)
    ap.add_argument("--value-bits", type=int, default=3)
    ap.add_argument("--key-mode", default="mse", choices=["mse", "prod"])
    ap.add_argument("--outlier-channels", type=int, default=8)
    ap.add_argument("--residual-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    h, g, d = args.kv_heads, args.group, args.head_dim
    scale = 1 / np.sqrt(d)
    print(f"# CPU decode attention: {h} KV heads × {g} (GQA), head_dim {d}, batch 1, 1 query/head")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"numba threads {numba.get_num_threads()}, numpy {np.__version__}")
    print(f"# rotorq: key {args.key_bits} bits ({args.key_mode}), value {args.value_bits} bits, "
          f"{args.outlier_channels} outlier channels, window {args.residual_tokens} tokens")
    print()
    print("| T | rotorq ms | numpy fp32 ms | speed-up | rotorq MiB | fp32 MiB | fp16 MiB "
          "| compress s | rel. error |")
    print("|---|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(args.seed)
    for t in args.tokens:
        k, v, ch_scale = make_kv(rng, h, t, d)
        q = (rng.standard_normal((h, g, d), dtype=np.float32) / ch_scale)
        cache = rotorq.KVCache(h, d, key_bits=args.key_bits, value_bits=args.value_bits,
                               key_mode=args.key_mode, outlier_channels=args.outlier_channels,
                               residual_tokens=args.residual_tokens, seed=args.seed,
                               residual_bits=None, sink_tokens=0, key_offset=False)
        t0 = time.perf_counter()
        cache.append(k, v)
        t_compress = time.perf_counter() - t0
        qh = q.reshape(h * g, d)
        t_rq = timed(lambda qh=qh, cache=cache: cache.attend(qh), args.repeats)
        t_np = timed(lambda q=q, k=k, v=v: exact_fp32(q, k, v, scale), args.repeats)
        out = np.asarray(cache.attend(qh)).reshape(h, g, d)
        ref = exact_fp64(q, k, v, scale)
        err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
        mib = 2.0 ** 20
        print(f"| {t} | {t_rq * 1e3:.1f} | {t_np * 1e3:.1f} | {t_np / t_rq:.2f}× "
              f"| {cache.nbytes / mib:.1f} | {k.nbytes * 2 / mib:.1f} | {k.nbytes / mib:.1f} "
              f"| {t_compress:.2f} | {err:.4f} |", flush=True)


if __name__ == "__main__":
    main()
