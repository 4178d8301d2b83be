"""Decode-attention kernel variants on the GPU, against torch fp16 SDPA in the same run.

The shape of ``gpu_kv_bench.py`` (32 query / 4 KV heads, d = 128, 3-bit K and V, one query
per head) at each ``--tokens``: for every register cap of the tensor-core kernel
(``rotorq.cuda.attention.FAST_LAUNCH_BLOCKS``; 0: uncapped), the kernels' time (the call's launches
replayed, ``gpu_bench.kernel_time``) and its output against the general float32 kernel on
the same codes; then SDPA on the uncompressed fp16 cache.

    python3 -m benchmarks.gpu.attention_variants [--out DIR] [--tokens 65536 1048576]
        [--variants 4 4:1 4:0:4 ...]

Writes ``DIR/gpu_attention_variants.json`` and prints a table last.
"""

import argparse
import importlib
import json
import os
import time

import cupy as cp
import numpy as np
import torch

from benchmarks.gpu.bench import device_time, kernel_time
from benchmarks.gpu.kv_bench import HQ, build_cache, fused_args, l2_bytes

api = importlib.import_module("rotorq.cuda.api")
att = importlib.import_module("rotorq.cuda.attention")
_launch = importlib.import_module("rotorq.cuda._launch")


def launch_times(fn, bufs, reps):
    """Median µs of the attention kernel and of the split merge (the first and last launch
    of a call), each replayed alone."""
    return [kernel_time(fn, bufs, reps, only=k) * 1e6 for k in (0, -1)]


def merged(res):
    accs, _, lsum = res
    return (accs[0] / lsum[..., None]).get()


def run(tokens, variants, reps, rng):
    cache, kt, vt = build_cache(tokens, rng)
    q = cp.asarray(rng.standard_normal((HQ, 128), dtype=np.float32))
    rq, kargs, vargs, n_c, n_q, off, lay = fused_args(cache, q)
    comp = cache.compressed_tokens * cache.bytes_per_token
    nbuf = max(1, min(64, -(-2 * l2_bytes() // comp)))
    bufs = [(kargs, vargs)]
    for _ in range(nbuf - 1):
        bufs.append((tuple((a[0].copy(), a[1].copy()) + a[2:] for a in kargs),
                     tuple((a[0].copy(), a[1].copy()) + a[2:] for a in vargs)))

    def fused(b):
        return api.decode_attention(rq, b[0], b[1], n_c, n_q, off, layout=lay)

    saved = api.ATTENTION_FAST
    api.ATTENTION_FAST = False
    try:
        want = merged(fused(bufs[0]))
        t_general = kernel_time(fused, bufs[:2], max(2, reps // 10))
    finally:
        api.ATTENTION_FAST = saved
    rows = []
    saved = (att.FAST_LAUNCH_BLOCKS, att.FAST_TABLE_COPIES, att.FAST_BLOCKS_PER_SM,
             att.FAST_PREFETCH, att.FAST_MULHI, att.FAST_UNROLL, att.FAST_FULL_TILES,
             att.FAST_FUNNEL, att.FAST_PAIRED, att.FAST_RESCALE_SLACK)
    for variant in variants:
        blocks = variant[0]
        copies = (variant[1],) * 2 if len(variant) > 1 and variant[1] else None
        per_sm = variant[2] if len(variant) > 2 and variant[2] else saved[2]
        depth = variant[3] if len(variant) > 3 and variant[3] else saved[3]
        mulhi = variant[4] if len(variant) > 4 else saved[4]
        unroll = variant[5] if len(variant) > 5 and variant[5] else saved[5]
        full = bool(variant[6]) if len(variant) > 6 else saved[6]
        funnel = bool(variant[7]) if len(variant) > 7 else saved[7]
        paired = bool(variant[8]) if len(variant) > 8 else saved[8]
        slack = float(variant[9]) if len(variant) > 9 else saved[9]
        (att.FAST_LAUNCH_BLOCKS, att.FAST_TABLE_COPIES, att.FAST_BLOCKS_PER_SM,
         att.FAST_PREFETCH, att.FAST_MULHI, att.FAST_UNROLL, att.FAST_FULL_TILES,
         att.FAST_FUNNEL, att.FAST_PAIRED, att.FAST_RESCALE_SLACK) = (
            blocks, copies, per_sm, depth, mulhi, unroll, full, funnel, paired, slack)
        got = merged(fused(bufs[0]))
        err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
        t = kernel_time(fused, bufs, reps)
        parts = launch_times(fused, bufs, reps)
        kern = att.attention_kernel(128, 3, 128, 3, tiled=lay == "tiles")
        regs = [_launch.driver.funcGetAttribute(4, fn)  # NUM_REGS
                for (k, _, _), (_, fn) in _launch._functions.items() if k is kern]
        rows.append({"tokens": tokens, "layout": lay, "prefetch": depth, "mulhi": mulhi,
                     "unroll": unroll or depth + 1, "full_tiles": full, "funnel": funnel,
                     "paired": paired, "rescale_slack": slack,
                     "blocks": blocks or None, "splits_per_sm": per_sm,
                     "copies": list(copies or att.table_copies(128, 3, 128, 3)),
                     "kernel_us": t * 1e6, "launch_us": parts,
                     "tbs": comp / t / 1e12, "rel_err_vs_general": err,
                     "registers": sorted(set(regs))})
    (att.FAST_LAUNCH_BLOCKS, att.FAST_TABLE_COPIES, att.FAST_BLOCKS_PER_SM,
     att.FAST_PREFETCH, att.FAST_MULHI, att.FAST_UNROLL, att.FAST_FULL_TILES,
     att.FAST_FUNNEL, att.FAST_PAIRED, att.FAST_RESCALE_SLACK) = saved
    fb = max(1, min(64, -(-2 * l2_bytes() // (kt.numel() * 4))))
    fbufs = [(kt, vt)] + [(kt.clone(), vt.clone()) for _ in range(fb - 1)]
    qt = torch.randn(1, HQ, 1, 128, device="cuda", dtype=torch.float16)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    t_sdpa = device_time(lambda b: sdpa(qt, b[0], b[1], enable_gqa=True), fbufs, reps)
    for r in rows:
        r["sdpa_us"] = t_sdpa * 1e6
        r["speedup"] = t_sdpa / (r["kernel_us"] * 1e-6)
        r["general_us"] = t_general * 1e6
    del bufs, fbufs, kt, vt, cache
    cp.get_default_memory_pool().free_all_blocks()
    torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tokens", type=int, nargs="+", default=[1 << 16, 1 << 20])
    ap.add_argument("--variants", nargs="+", default=["4", "0", "4:1", "4:0:8"],
                    help="BLOCKS[:COPIES[:PER_SM[:DEPTH[:MULHI[:UNROLL[:FULL[:FUNNEL[:PAIR[:SLACK]]]]]]]]]: "
                         "launch-bounds "
                         "blocks (0: "
                         "uncapped); 1 for single (not replicated) pair tables, 0 the "
                         "default; split blocks per SM (FAST_BLOCKS_PER_SM; 0 the default); "
                         "tiles prefetched (FAST_PREFETCH, tile layout; 0 the default); "
                         "FAST_MULHI; loop body copies (FAST_UNROLL; 0 the default); "
                         "unmasked full tiles (FAST_FULL_TILES, 1/0); funnel shifts "
                         "(FAST_FUNNEL, 1/0); no exit test between the unmasked body copies "
                         "(FAST_PAIRED, 1/0); lazy-rescale slack (FAST_RESCALE_SLACK, base 2)")
    ap.add_argument("--reps", type=int, default=50)
    a = ap.parse_args()
    rng = np.random.default_rng(7)
    t0 = time.perf_counter()
    rows = []
    for n in a.tokens:
        rows += run(n, [tuple(int(x) for x in v.split(":")) for v in a.variants], a.reps, rng)
    info = {"device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "seconds": time.perf_counter() - t0, "rows": rows}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "gpu_attention_variants.json"), "w") as f:
        json.dump(info, f, indent=1)
    print(f"{info['device']}, {info['date']}")
    print("| T | codes | prefetch | body copies | unmasked full tiles | funnel shifts | "
          "mul.hi shifts | launch-bounds blocks | "
          "split blocks per SM | "
          "table copies (K, V) | registers | kernels µs | "
          "alone: attention / merge µs | TB/s | general kernel µs | SDPA µs | SDPA / kernels | "
          "rel. diff vs general |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']} | {r['layout']} | {r['prefetch']} | {r['unroll']} | "
              f"{'yes' if r['full_tiles'] else 'no'} | {'yes' if r['funnel'] else 'no'} | "
              f"{'yes' if r['paired'] else 'no'} | {r['rescale_slack']:g} | "
              f"{r['mulhi']} | "
              f"{r['blocks'] or '—'} | "
              f"{r['splits_per_sm']} | {r['copies']} | "
              f"{r['registers']} | "
              f"{r['kernel_us']:.1f} | {' / '.join(f'{x:.1f}' for x in r['launch_us'])} | "
              f"{r['tbs']:.2f} | {r['general_us']:.1f} | "
              f"{r['sdpa_us']:.1f} | {r['speedup']:.2f}× | {r['rel_err_vs_general']:.2e} |")


if __name__ == "__main__":
    main()
