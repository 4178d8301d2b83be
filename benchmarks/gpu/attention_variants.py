"""Decode-attention kernel variants on the GPU, against torch fp16 SDPA in the same run.

The shape of ``benchmarks.gpu.kv_bench`` (32 query / 4 KV heads, d = 128, 3-bit K and V, one
query per head) at each ``--tokens``: for every variant of the tensor-core kernel's spec
(:func:`rotorq.cuda.gen.attention.spec`: register cap ``blocks``, 0 uncapped; pair-table
``copies``; ``prefetch`` depth in the tile layout) and of the split count
(``rotorq.cuda.gen.attention.SPLIT_BLOCKS_PER_SM``), the kernels' time (the call's launches
replayed, ``benchmarks.gpu.bench.kernel_time``) and its output against the general float32
kernel on the same codes; then SDPA on the uncompressed fp16 cache.

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
from benchmarks.gpu.kv_bench import HQ, build_cache, fused_args, l2_bytes, rotated_copies

api = importlib.import_module("rotorq.cuda.api")
gen_att = importlib.import_module("rotorq.cuda.gen.attention")
_launch = importlib.import_module("rotorq.cuda._launch")


def launch_times(fn, bufs, reps):
    """Median µs of the attention kernel and of the split merge (the first and last launch
    of a call), each replayed alone."""
    return [kernel_time(fn, bufs, reps, only=k) * 1e6 for k in (0, -1)]


def merged(res):
    return (res.accs[0] / res.sum[..., None]).get()


def run(tokens, variants, reps, rng):
    cache, kt, vt = build_cache(tokens, rng)
    q = cp.asarray(rng.standard_normal((HQ, 128), dtype=np.float32))
    queries, keys, values, n_c, n_q, off, lay = fused_args(cache, q)
    comp = cache.compressed_tokens * cache.bytes_per_token
    bufs = rotated_copies(keys, values, max(1, min(64, -(-2 * l2_bytes() // comp))))

    def fused(b):
        return api.decode_attention(queries, b[0], b[1], n_c, n_q, off, layout=lay)

    saved = api.ATTENTION_FAST
    api.ATTENTION_FAST = False
    try:
        want = merged(fused(bufs[0]))
        t_general = kernel_time(fused, bufs[:2], max(2, reps // 10))
    finally:
        api.ATTENTION_FAST = saved
    rows = []
    saved = (api._attention_kernel, gen_att.SPLIT_BLOCKS_PER_SM)
    try:
        for variant in variants:
            blocks = variant[0]
            copies = (variant[1],) * 2 if len(variant) > 1 and variant[1] else None
            per_sm = variant[2] if len(variant) > 2 and variant[2] else saved[1]
            prefetch = variant[3] if len(variant) > 3 and variant[3] else None

            def kernel(dk, kb, dv, vb, bias, tiled, blocks=blocks, copies=copies,
                       prefetch=prefetch):
                return gen_att.kernel(dk, kb, dv, vb, bias=bias, tiled=tiled, blocks=blocks,
                                      copies=copies, prefetch=prefetch)

            api._attention_kernel, gen_att.SPLIT_BLOCKS_PER_SM = kernel, per_sm
            got = merged(fused(bufs[0]))
            err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
            t = kernel_time(fused, bufs, reps)
            parts = launch_times(fused, bufs, reps)
            kern = kernel(128, 3, 128, 3, False, lay == "tiles")
            spec = gen_att.spec(128, 3, 128, 3, tiled=lay == "tiles", blocks=blocks,
                                copies=copies, prefetch=prefetch)
            regs = [_launch.driver.funcGetAttribute(4, fn)  # NUM_REGS
                    for (k, _, _), (_, fn) in _launch._functions.items() if k is kern]
            rows.append({"tokens": tokens, "layout": lay, "prefetch": spec.prefetch,
                         "blocks": spec.launch_blocks, "splits_per_sm": per_sm,
                         "copies": [spec.key_copies, spec.value_copies],
                         "kernel_us": t * 1e6, "launch_us": parts,
                         "tbs": comp / t / 1e12, "rel_err_vs_general": err,
                         "registers": sorted(set(regs))})
    finally:
        api._attention_kernel, gen_att.SPLIT_BLOCKS_PER_SM = saved
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
                    help="BLOCKS[:COPIES[:PER_SM[:PREFETCH]]]: launch-bounds blocks (0: "
                         "uncapped); 1 for single (not replicated) pair tables, 0 the "
                         "default; split blocks per SM (0 the default); tiles prefetched "
                         "in the tile layout (0 the default)")
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
    print("| T | codes | prefetch | launch-bounds blocks | split blocks per SM | "
          "table copies (K, V) | registers | kernels µs | alone: attention / merge µs | "
          "TB/s | general kernel µs | SDPA µs | SDPA / kernels | rel. diff vs general |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']} | {r['layout']} | {r['prefetch']} | {r['blocks'] or '—'} | "
              f"{r['splits_per_sm']} | {r['copies']} | {r['registers']} | "
              f"{r['kernel_us']:.1f} | {' / '.join(f'{x:.1f}' for x in r['launch_us'])} | "
              f"{r['tbs']:.2f} | {r['general_us']:.1f} | "
              f"{r['sdpa_us']:.1f} | {r['speedup']:.2f}× | {r['rel_err_vs_general']:.2e} |")


if __name__ == "__main__":
    main()
