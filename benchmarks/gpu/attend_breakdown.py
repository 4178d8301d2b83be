"""Where the time of ``rotorq.KVCache.attend`` goes on the GPU, per phase (the shape of
``gpu_kv_bench.py``: 32 query / 4 KV heads, d = 128, 3-bit K and V, one query per head).

For each ``--tokens`` it prints, in µs per call:

- ``attend``: back-to-back calls, wall clock (no synchronization between calls);
- ``host``: the same calls' host time alone (``cupyx.profiler.benchmark`` CPU time);
- ``gpu``: the GPU time of one call (``cupyx.profiler.benchmark`` GPU time);
- each phase of a call run alone between device synchronizations (wall): query checks,
  query rotation, the fused kernels, the inverse rotation, the window kernel;
- a cProfile of 50 calls (top functions by own time) to ``attend_profile_T.txt`` in ``--out``;
- a decode loop (``--decode-steps``: append one token, attend) on that cache and on a
  cache with ``KVCache``'s default recipe: µs per step, per append and per attend alone,
  and a cProfile to ``decode_profile_*.txt``.

Usage: ``python3 -m benchmarks.gpu.attend_breakdown [--tokens 4096 1048576] [--out DIR]``.
"""

import argparse
import cProfile
import io
import os
import pstats
import time

import cupy as cp
import numpy as np
from cupyx.profiler import benchmark

import rotorq
from benchmarks.gpu.kv_bench import HK, HQ, D, api, build_cache, fused_args
from rotorq._ops import Partial
from rotorq.kv import attention as kv_attention


def phase_times(cache, q, reps=20):
    """Wall µs of each phase of attend, each run alone between synchronizations."""
    state = cache._state
    be = state.setup.be
    scale = 1.0 / np.sqrt(cache.head_dim)
    qq, _, _, n_q, _ = cache._queries(state, q)
    total = len(cache)
    queries, keys, values, c, n_q, off, lay = fused_args(cache, q)
    part = be.decode_attention(queries, keys, values, c, n_q, off, layout=lay)
    n_bh, n_rows = qq.shape[0], qq.shape[1]
    rotation = state.base.values.parts[0].tq.rotation
    exact = cache._exact.rows(state)
    acc_c = be.unrotate(part.accs[0].reshape(n_bh * n_rows, -1), rotation).reshape(
        n_bh, n_rows, -1)
    partial = Partial((acc_c,), part.max, part.sum)
    phases = {
        "queries": lambda: cache._queries(state, q),
        "rotate": lambda: kv_attention.rotated_queries(state, qq, scale),
        "fused kernels": lambda: be.decode_attention(queries, keys, values, c, n_q, off,
                                                     layout=lay),
        "unrotate": lambda: be.unrotate(part.accs[0].reshape(n_bh * n_rows, -1), rotation),
        "window": lambda: be.exact_attention(qq, exact[0], exact[1], exact[2], scale, n_q,
                                             total, False, partial),
        "attend": lambda: cache.attend(q),
    }
    out = {}
    for name, fn in phases.items():
        fn()
        cp.cuda.runtime.deviceSynchronize()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            cp.cuda.runtime.deviceSynchronize()
            ts.append(time.perf_counter() - t0)
        out[name] = float(np.median(ts)) * 1e6
    return out


def decode_steps(tokens, rng, steps, out_dir, default_recipe, check_finite=True):
    """A decode loop on a cache of ``tokens`` tokens: ``steps`` times append one token
    (float16 on the GPU) and attend. Returns µs per step (wall, back to back), per append
    and per attend (each alone between synchronizations) and writes a cProfile."""
    grng = cp.random.default_rng(int(rng.integers(1 << 31)))
    if default_recipe:
        cache = rotorq.KVCache(HK, D, check_finite=check_finite)
    else:
        cache, _, _ = build_cache(tokens, rng, check_finite)
    if default_recipe:
        saved, api.GENERATED_MIN_ROWS = api.GENERATED_MIN_ROWS, 1 << 62  # no long compile of a shape
        try:
            for lo in range(0, tokens, 1 << 18):
                n = min(1 << 18, tokens - lo)
                kv = grng.standard_normal((2, HK, n, D), dtype=cp.float32).astype(cp.float16)
                cache.append(kv[0], kv[1])
        finally:
            api.GENERATED_MIN_ROWS = saved
    new = grng.standard_normal((steps + 1, 2, HK, 1, D), dtype=cp.float32).astype(cp.float16)
    qs = grng.standard_normal((steps + 1, HQ, D), dtype=cp.float32)
    cache.append(new[0, 0], new[0, 1])
    cache.attend(qs[0])
    cp.cuda.runtime.deviceSynchronize()
    t0 = time.perf_counter()
    for i in range(1, steps + 1):
        cache.append(new[i, 0], new[i, 1])
        cache.attend(qs[i])
    cp.cuda.runtime.deviceSynchronize()
    step = (time.perf_counter() - t0) / steps * 1e6
    ta, tt = [], []
    for i in range(1, steps + 1):
        cp.cuda.runtime.deviceSynchronize()
        h0 = time.perf_counter()
        cache.append(new[i, 0], new[i, 1])
        cp.cuda.runtime.deviceSynchronize()
        h1 = time.perf_counter()
        cache.attend(qs[i])
        cp.cuda.runtime.deviceSynchronize()
        ta.append(h1 - h0)
        tt.append(time.perf_counter() - h1)
    prof = cProfile.Profile()
    prof.enable()
    for i in range(1, steps + 1):
        cache.append(new[i, 0], new[i, 1])
        cache.attend(qs[i])
    prof.disable()
    cp.cuda.runtime.deviceSynchronize()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30)
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(45)
    name = ("default" if default_recipe else "bench") + ("" if check_finite else "_nocheck")
    with open(os.path.join(out_dir, f"decode_profile_{name}_{tokens}.txt"), "w") as f:
        f.write(s.getvalue())
    return step, float(np.median(ta)) * 1e6, float(np.median(tt)) * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 1 << 20])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--decode-steps", type=int, default=30,
                    help="steps of the decode loop (append one token, attend); 0: none")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for t in a.tokens:
        cache, _, _ = build_cache(t, rng)
        q = cp.asarray(rng.standard_normal((HQ, 128), dtype=np.float32))
        cache.attend(q)
        cp.cuda.runtime.deviceSynchronize()
        t0 = time.perf_counter()
        for _ in range(a.reps):
            cache.attend(q)
        cp.cuda.runtime.deviceSynchronize()
        wall = (time.perf_counter() - t0) / a.reps * 1e6
        b = benchmark(cache.attend, (q,), n_repeat=a.reps, n_warmup=3)
        host = float(np.median(b.cpu_times)) * 1e6
        gpu = float(np.median(b.gpu_times[0])) * 1e6
        ph = phase_times(cache, q)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(50):
            cache.attend(q)
        prof.disable()
        cp.cuda.runtime.deviceSynchronize()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, f"attend_profile_{t}.txt"), "w") as f:
            f.write(s.getvalue())
        rows.append((t, wall, host, gpu, ph))
    dec = []
    if a.decode_steps:
        for t in a.tokens:
            for default, check in ((False, True), (True, True), (False, False),
                                   (True, False)):
                name = ("KVCache(4, 128) defaults" if default else
                        "3/3 bits, window 128 fp32, no offset")
                dec.append((t, name + ("" if check else ", check_finite=False"),
                            *decode_steps(t, rng, a.decode_steps, a.out, default, check)))
    names = list(rows[0][4])
    print("| T | attend wall | host (cupyx) | gpu (cupyx) | "
          + " | ".join(f"{n} (alone)" for n in names) + " |")
    print("|---" * (4 + len(names)) + "|")
    for t, wall, host, gpu, ph in rows:
        print(f"| {t} | {wall:.1f} | {host:.1f} | {gpu:.1f} | "
              + " | ".join(f"{ph[n]:.1f}" for n in names) + " |")
    if dec:
        print()
        print("| T | cache | decode step (append 1 token + attend), back to back µs | "
              "append alone µs | attend alone µs |")
        print("|---|---|---|---|---|")
        for t, name, step, ta, tt in dec:
            print(f"| {t} | {name} | {step:.1f} | {ta:.1f} | {tt:.1f} |")


if __name__ == "__main__":
    main()
