"""The one-query score kernel's table plans, measured against the shared-memory model.

The one-query kernel (:mod:`rotorq.cuda.gen.scores_one`) scores each key by table lookups at
random entries; a warp's lookup costs one shared-memory wavefront per distinct 32-bit word a bank is
asked for. The model: expected wavefronts per 32 keys = lookups × E[max distinct words per
bank] (Monte Carlo over uniform codes) + 2 × code words (staged through shared memory), at one
wavefront per SM clock. For each plan ``(G coordinates per lookup, float16 entries?)`` this
prints that count and the kernel time at N = 2^20 and 2^22 (d = 128; launches recorded once and
replayed: no host work), the effective TB/s and the speed-up over torch's fp16 ``q @ K.T`` on
the uncompressed keys, and the largest score difference from the float32 plan of the same bits.

    python3 -m benchmarks.gpu.score_tables --out DIR      # on the GPU machine
    python3 -m benchmarks.gpu.score_tables --precompile-only   # fill $ROTORQ_PTX_CACHE
"""

import argparse
import importlib
import os
import time

import numpy as np

D = 128
PLANS = {2: ((4, False), (2, False), (4, True)),
         3: ((2, False), (2, True), (1, False)),
         4: ((1, False), (2, True))}
"""Plans per bit width; the first is the previous default. Each runs as before (blocks of
128 threads, the first tile's loads issued after the table build: ``late``); the new plan
also with those loads issued first (``early``) and in blocks of 256 threads (the default);
the 8-row tensor-core kernel late (its default) and early."""


OTHER_PER_SM = (6,)
"""Resident blocks of 128 threads per SM (``scores_one.kernel``'s ``per_sm``) also measured for
the default plan: 6 allows 80 registers (the default before ``BLOCKS_PER_SM_SMALL``)."""


def variants(bits):
    """``(label, kernel factory, query rows, blocks per SM)`` measured at ``bits``."""
    from rotorq.cuda.gen import score_tiles, scores_group, scores_one
    per_sm = score_tiles.BLOCKS_PER_SM
    out = [(f"{p} late, 128 threads",
            lambda p=p: scores_one.kernel(D, bits, 128, plan=p, early=False, per_sm=per_sm),
            1, per_sm)
           for p in PLANS[bits]]
    plan = score_tiles.table_plan(D, bits)
    out.append((f"{plan} early, 128 threads",
                lambda: scores_one.kernel(D, bits, 128, plan=plan, per_sm=per_sm), 1, per_sm))
    one = scores_one.kernel(D, bits, plan=plan)
    out.append((f"{plan} early, {one.threads} threads (default)", lambda: one, 1,
                one.launch_bounds[1]))
    for per in OTHER_PER_SM:  # the default plan with other resident blocks
        k = scores_one.kernel(D, bits, plan=plan, per_sm=per)
        out.append((f"{plan} early, {k.threads} threads, {k.launch_bounds[1]} per SM",
                    lambda k=k: k, 1, k.launch_bounds[1]))
    out.append(("8 rows, tensor cores, late (default)",
                lambda: scores_group.kernel(D, bits, early=False), 8,
                score_tiles.GROUP_BLOCKS_PER_SM))
    out.append(("8 rows, tensor cores, early",
                lambda: scores_group.kernel(D, bits, early=True), 8,
                score_tiles.GROUP_BLOCKS_PER_SM))
    return out


def wavefronts(bits, label, trials=4000, seed=0):
    """Modelled shared-memory wavefronts per warp of 32 keys of a one-query plan (see the
    module docstring; NaN for the tensor-core kernel)."""
    if not label.startswith("("):
        return float("nan")
    g, half = (int(label[1]), "True" in label)
    rng = np.random.default_rng(seed)
    word = rng.integers(0, 1 << (g * bits), (trials, 32)) * (2 if half else 4) // 4
    bank = word % 32
    worst = np.zeros(trials)
    for b in range(32):
        distinct = np.array([len(set(w[m])) for w, m in zip(word, bank == b, strict=True)])
        worst = np.maximum(worst, distinct)
    return D // g * worst.mean() + 2 * (D * bits // 32)


def _args(bits, m, n=4):
    f32, i64, u32 = np.float32, np.int64, np.uint32
    return (np.zeros((1, m, D), f32), np.zeros(1, i64), np.zeros(n * D * bits // 32, u32),
            np.zeros((1, n), f32), np.zeros(1, i64), np.zeros(1 << bits, f32),
            np.zeros((1, m, n), f32))


def _compile(job):
    bits, i = job
    launch = importlib.import_module("rotorq.cuda._launch")
    from rotorq.cuda._jit import kernel_signature
    t0 = time.perf_counter()
    label, make, m, _ = variants(bits)[i]
    launch.compile_ptx(make(), kernel_signature(_args(bits, m)), (9, 0))
    return f"{bits}-bit {label}", time.perf_counter() - t0


def precompile():
    import concurrent.futures
    import multiprocessing
    jobs = [(b, i) for b in PLANS for i in range(len(variants(b)))]
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(min(8, len(jobs)), mp_context=ctx) as pool:
        return dict(pool.map(_compile, jobs))


def measure(log2ns, rng):
    import cupy as cp
    import torch

    import rotorq
    from benchmarks.gpu.bench import buffers, code_buffers, device_time, kernel_time
    api = importlib.import_module("rotorq.cuda.api")
    launch = importlib.import_module("rotorq.cuda._launch")
    rows = []
    for bits in PLANS:
        tq = rotorq.TurboQuant(D, bits)
        k = tq.device_constants(cp)
        cent = k["centroids"]
        zero = cp.zeros(1, cp.int64)
        for log2n in log2ns:
            n = 1 << log2n
            reps = max(20, min(400, (1 << 26) // n))
            xs = buffers(lambda n=n: cp.asarray(rng.standard_normal((n, D)), dtype=cp.float16),
                         n * D * 2)
            keys = [(api._flat(c, api._U32), nr.astype(cp.float32))
                    for c, nr in code_buffers(xs, tq, bits)]  # enough buffers to miss L2
            del xs
            tx = [torch.randn((n, D), dtype=torch.float16, device="cuda")
                  for _ in range(max(2, len(keys) // 4))]
            base = {}
            for m in (1, 8):
                q16 = torch.randn((m, D), dtype=torch.float16, device="cuda")
                base[m] = device_time(lambda kk, q16=q16: q16 @ kk.T, tx, reps)
            del tx
            refs = {}
            for label, make, m, per_sm in variants(bits):
                kern = make()
                qrot = api.rotate(cp.asarray(rng.standard_normal((m, D)), cp.float32),
                                  tq.rotation).reshape(1, m, D) if m not in refs else refs[m][0]
                tiles = -(-n // kern.keys_per_tile)
                gx = max(1, min(tiles, api._sm_count() * per_sm))

                def call(kn, kern=kern, gx=gx, n=n, m=m, head=(qrot, zero), tail=(zero, cent)):
                    out = cp.empty((1, m, n), cp.float32)
                    launch.launch(kern, (gx, 1, 1), (kern.threads, 1), 0,
                                  head + kn + tail + (out,))
                    return out
                secs = kernel_time(call, keys, reps)
                got = call(keys[0])
                if m not in refs:
                    refs[m] = (qrot, got)
                ref = refs[m][1]
                diff = float(cp.abs(got - ref).max() / cp.abs(ref).max())
                nbytes = n * (D * bits // 8 + 4 + 4 * m)
                rows.append((bits, label, log2n, wavefronts(bits, label), secs * 1e6,
                             nbytes / secs / 1e12, base[m] * 1e6, base[m] / secs, diff))
                print(*rows[-1], flush=True)
            del keys
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--log2n", type=int, nargs="+", default=[20, 22])
    ap.add_argument("--precompile-only", action="store_true")
    ap.add_argument("--bits", type=int, nargs="+", choices=sorted(PLANS), default=sorted(PLANS))
    args = ap.parse_args()
    for b in set(PLANS) - set(args.bits):
        del PLANS[b]
    t0 = time.perf_counter()
    done = precompile()
    print(f"precompiled in {time.perf_counter() - t0:.1f} s: "
          + ", ".join(f"{k} {v:.1f}" for k, v in done.items()), flush=True)
    if args.precompile_only:
        return
    import cupy as cp
    rows = measure(args.log2n, np.random.default_rng())
    card = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    lines = [f"Run: `python3 -m benchmarks.gpu.score_tables` — {card}, "
             f"{time.strftime('%Y-%m-%d %H:%M:%S')}", "",
             "| bits | kernel: plan (G, fp16), first tile's loads | N "
             "| model wavefronts / 32 keys | µs (kernel) | TB/s "
             "| torch fp16 q·Kᵀ µs (same rows) | × torch | max Δ / max score vs first row |",
             "| ---: | :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for bits, label, log2n, wf, us, tbs, base, ratio, diff in rows:
        lines.append(f"| {bits} | {label} | 2^{log2n} | {wf:.0f} | {us:.1f} | {tbs:.2f} | "
                     f"{base:.1f} | {ratio:.2f} | {diff:.1e} |")
    text = "\n".join(lines) + "\n"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_score_tables.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
