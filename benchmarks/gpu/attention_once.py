"""One decode-attention call over a compressed cache of ``--tokens`` tokens (the shape of
``gpu_kv_bench.py``), for a profiler:

    ncu --kernel-name regex:attn_fast --launch-skip 2 --launch-count 1 \\
        --section WarpStateStats --section SchedulerStats \\
        python3 -m benchmarks.gpu.attention_once --tokens 1048576 [--layout rows]
"""

import argparse
import importlib

import cupy as cp
import numpy as np

from benchmarks.gpu.kv_bench import HQ, build_cache, fused_args

api = importlib.import_module("rotorq.cuda.api")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1 << 20)
    ap.add_argument("--layout", choices=["cache", "rows"], default="cache")
    ap.add_argument("--calls", type=int, default=4)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    cache, _, _ = build_cache(a.tokens, rng)
    q = cp.asarray(rng.standard_normal((HQ, 128), dtype=np.float32))
    *args, lay = fused_args(cache, q, layout=None if a.layout == "cache" else "rows")
    for _ in range(a.calls):
        api.decode_attention(*args, layout=lay)
    cp.cuda.runtime.deviceSynchronize()
    print("layout", lay)


if __name__ == "__main__":
    main()
