"""CPU decode attention: ``KVCache.attend`` on the codes against numpy fp32 attention.

One decode step of a Llama-3-8B-shaped layer (8 KV heads, 32 query heads, one query per
head, head_dim 128) at several context lengths T. Both sides see the same random keys and
values in the same run:

- ``attend``: :meth:`rotorq.KVCache.attend` on a cache appended with the T tokens (the
  fused kernel on the packed codes, plus the float32 sinks and window);
- ``numpy``: exact GQA attention with BLAS matmuls (``q @ Kᵀ``, softmax, ``@ V``) over the
  uncompressed float32 keys and values, contiguous.

The two are timed alternately, in blocks: per round, each method gets a pause of
``--settle`` seconds, untimed calls for ``--warm`` seconds, then ``--block`` timed calls
back to back (a decode loop calls attention back to back too). The pause lets OpenBLAS's
worker threads, which spin for about 0.1 s after a numpy call, go to sleep before
``attend`` is timed; the untimed calls wake the thread pools and the cores again. A first
round, untimed, also compiles. The table shows
the median of all timed calls of each method and the ratio of the medians. Run from the
repository root, on an otherwise idle machine if possible::

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.cpu.attend_speed
    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.cpu.attend_speed --tokens 32768 --repeats 15
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import time

import numba
import numpy as np

import rotorq

CONFIGS = {"K4/V3": (4, 3), "K3/V3": (3, 3)}


def numpy_attention(q, k, v, scale):
    """Exact GQA attention in float32: q (H, G, d), k/v (H, T, d) → (H, G, d)."""
    s = np.matmul(q, k.transpose(0, 2, 1))
    s *= np.float32(scale)
    s -= s.max(axis=2, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=2, keepdims=True)
    return np.matmul(s, v)


def interleaved(fns, repeats, block, settle, warm):
    """Median seconds of each function over at least ``repeats`` timed calls, timed in
    alternating blocks of ``block`` calls, each block after a pause of ``settle`` seconds
    and untimed calls for ``warm`` seconds (at least one)."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(-(-repeats // block)):
        for i, fn in enumerate(fns):
            time.sleep(settle)
            t_end = time.perf_counter() + warm
            fn()
            while time.perf_counter() < t_end:
                fn()
            for _ in range(block):
                t = time.perf_counter()
                fn()
                times[i].append(time.perf_counter() - t)
    return [float(np.median(t)) for t in times]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192, 32768])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--group", type=int, default=4, help="query heads per KV head")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=10, help="timed calls of each method")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--block", type=int, default=5, help="timed calls per block")
    ap.add_argument("--warm", type=float, default=0.05,
                    help="seconds of untimed calls before each block")
    ap.add_argument("--settle", type=float, default=0.2,
                    help="seconds of sleep before each block")
    args = ap.parse_args(argv)
    h, g, d = args.kv_heads, args.group, args.head_dim
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"numba threads {numba.get_num_threads()}, numpy {np.__version__}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    print(f"{h} KV heads, {h * g} query heads (one query each), head_dim {d}; median of "
          f"{-(-args.repeats // args.block) * args.block} timed calls each, in alternating "
          f"blocks of {args.block} (each after a {args.settle} s pause and {args.warm} s of "
          "untimed calls)")
    print()
    print("| T | config | attend ms | numpy fp32 ms | numpy / attend | rel. err |")
    print("|---|---|---|---|---|---|")
    rng = np.random.default_rng(args.seed)
    scale = 1.0 / np.sqrt(d)
    for t in args.tokens:
        k = rng.standard_normal((h, t, d), dtype=np.float32)
        v = rng.standard_normal((h, t, d), dtype=np.float32)
        q = rng.standard_normal((h * g, d), dtype=np.float32)
        qg = np.ascontiguousarray(q.reshape(h, g, d))
        for name in args.configs:
            kb, vb = CONFIGS[name]
            cache = rotorq.KVCache(h, d, key_bits=kb, value_bits=vb)
            cache.append(k, v)
            ta, tn = interleaved([functools.partial(cache.attend, q),
                                  functools.partial(numpy_attention, qg, k, v, scale)],
                                 args.repeats, args.block, args.settle, args.warm)
            out = cache.attend(q).reshape(h, g, d)
            ref = numpy_attention(qg, k, v, scale)
            err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
            print(f"| {t} | {name} | {ta * 1e3:.2f} | {tn * 1e3:.2f} | {tn / ta:.2f}× "
                  f"| {err:.3f} |", flush=True)


if __name__ == "__main__":
    main()
