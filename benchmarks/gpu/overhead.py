"""Host overhead per call on the GPU, split into its pieces.

Times (the least of 7 averages over ``reps`` synchronized calls: on a shared virtual
machine, noise only ever adds time, and it moved medians by up to 50% between runs) of the backend and
public calls at tiny sizes (1 query × 1024 keys, 1024 × 128 fp16 rows), of the prepared
score calls (``ScoresPlan``, ``TurboQuant.prepare_scores``) and of the pieces a
backend call is made of: argument packing, the bare driver launch, output allocation,
device and stream lookups — once with torch not initialized and once with it (then the
caller's torch stream is looked up every call).

    python3 -m benchmarks.gpu.overhead --out DIR [--label new]

Writes ``DIR/overhead_<label>.json`` and prints a table.
"""

import argparse
import json
import os
import sys
import time

import cupy as cp
import numpy as np
from cupy.cuda import driver

import rotorq
from rotorq.cuda import _launch as launch_mod
from rotorq.cuda import api
from rotorq.cuda.plans import ScoresPlan

D, BITS, N = 128, 3, 1024


def host_us(fn, reps=1000, time_sync=True):
    """Wall µs per call: the least of 7 averages over ``reps`` calls, synchronized after each
    average. ``time_sync=False``: the sync is not timed — what the CPU spends issuing the calls
    (with it, a loop of launches whose kernels take longer than their launches times the GPU)."""
    fn()
    cp.cuda.runtime.deviceSynchronize()
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        t1 = time.perf_counter()
        cp.cuda.runtime.deviceSynchronize()
        times.append(((time.perf_counter() if time_sync else t1) - t0) / reps)
    return min(times) * 1e6


def issue_us(fn, reps=300):
    """Host issue µs per call (:func:`host_us` without timing the sync)."""
    return host_us(fn, reps, time_sync=False)


def measure(torch_init):
    tq = rotorq.TurboQuant(D, BITS)
    k = tq.device_constants(cp)
    rng = np.random.default_rng(1)
    x = cp.asarray(rng.standard_normal((N, D)), cp.float16)
    codes, norms, _, _ = api.quantize(x, tq.rotation, k["boundaries"], k["centroids"], BITS,
                                      False, None)
    qv = tq.quantize(x)
    q = cp.asarray(rng.standard_normal((1, D)), cp.float32)
    qrot = api.rotate(q, tq.rotation).reshape(1, 1, D)
    zero = cp.zeros(1, cp.int64)
    keys = (codes.reshape(1, N, -1), norms.reshape(1, N))
    args = (qrot, zero, codes.reshape(1, N, -1).view(cp.uint32), norms.reshape(1, N), zero,
            k["centroids"], BITS, cp.empty((1, 1, N), cp.float32))
    out = {}
    out["backend scores, 1 query × 1024 keys"] = host_us(
        lambda: api.scores(qrot, None, zero, *keys, None, None, zero, k["centroids"], BITS, 0.0))
    plan = ScoresPlan(qrot, None, zero, *keys, None, None, zero, k["centroids"], BITS, 0.0)
    plan_out = cp.empty(plan.out_shape, cp.float32)
    prepared = tq.prepare_scores(q, qv)
    pub_out = cp.empty(prepared.out_shape, cp.float32)
    if not ((plan(qrot) == api.scores(qrot, None, zero, *keys, None, None, zero, k["centroids"],
                                      BITS, 0.0)).all() and (prepared(q) == tq.scores(q, qv)).all()):
        raise RuntimeError("a prepared call differs from the plain call")
    out["prepared backend scores (ScoresPlan), 1 query × 1024 keys"] = host_us(lambda: plan(qrot))
    out["prepared backend scores, preallocated out"] = host_us(lambda: plan(qrot, out=plan_out))
    out["prepared backend scores, preallocated out, host issue only"] = issue_us(
        lambda: plan(qrot, out=plan_out))
    out["prepared public scores (prepare_scores), 1 query × 1024 keys"] = host_us(
        lambda: prepared(q))
    out["prepared public scores, preallocated out"] = host_us(lambda: prepared(q, out=pub_out))
    out["prepared public scores, preallocated out, host issue only"] = issue_us(
        lambda: prepared(q, out=pub_out))
    out["backend quantize 1024 × 128 fp16"] = host_us(
        lambda: api.quantize(x, tq.rotation, k["boundaries"], k["centroids"], BITS, False, None))
    out["backend rotate 1 × 128"] = host_us(lambda: api.rotate(q, tq.rotation))
    out["public TurboQuant.scores(q, 1024 keys)"] = host_us(lambda: tq.scores(q, qv), 500)
    out["public TurboQuant.quantize(1024 × 128)"] = host_us(lambda: tq.quantize(x), 500)
    # pieces
    pack = launch_mod._pack
    out["piece: pack the arguments of a scores launch"] = host_us(lambda: pack(args))
    kern = api._sc.scores_mse
    launch_mod.launch(kern, (8, 1, 1), (128, 1), 4 * (D + 8), args)
    fn = next(v for kk, v in launch_mod._functions.items() if kk[0] is kern)[1]
    packed = pack(args)
    extra = packed[-1]
    stream = cp.cuda.get_current_stream()
    out["piece: bare driver launch (prepared buffer)"] = host_us(
        lambda: driver.launchKernel(fn, 8, 1, 1, 128, 1, 1, 4 * (D + 8), stream.ptr, 0,
                                        extra))
    out["piece: bare driver launch, host issue only"] = issue_us(
        lambda: driver.launchKernel(fn, 8, 1, 1, 128, 1, 1, 4 * (D + 8), stream.ptr, 0,
                                        extra))
    out["backend scores, host issue only"] = issue_us(
        lambda: api.scores(qrot, None, zero, *keys, None, None, zero, k["centroids"], BITS, 0.0))
    (one, _), = plan._launches
    out["piece: Prepared launch (2 pointers patched)"] = host_us(
        lambda: one(stream.ptr, qrot.data.ptr, plan_out.data.ptr))
    out["piece: launch() incl. packing"] = host_us(
        lambda: launch_mod.launch(kern, (8, 1, 1), (128, 1), 4 * (D + 8), args))
    out["piece: cupy.empty(1024 float32)"] = host_us(lambda: cp.empty(N, cp.float32))
    out["piece: cupy.ascontiguousarray (contiguous)"] = host_us(lambda: cp.ascontiguousarray(x))
    out["piece: cupy reshape"] = host_us(lambda: x.reshape(-1))
    out["piece: runtime.getDevice"] = host_us(lambda: cp.cuda.runtime.getDevice())
    out["piece: ndarray.device.id"] = host_us(lambda: x.device.id)
    dev = x.device
    out["piece: with Device (current)"] = host_us(lambda: dev.__enter__() and dev.__exit__())
    out["piece: current_stream()"] = host_us(lambda: launch_mod.current_stream(0))
    out["reference: cupy elementwise x + 1"] = host_us(lambda: x + 1)
    if torch_init:
        import torch
        tx = torch.from_dlpack(x)
        out["reference: torch add"] = host_us(lambda: tx + 1)
        out["piece: torch.cuda.current_stream()"] = host_us(
            lambda: torch.cuda.current_stream(0).cuda_stream)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--label", default="new")
    a = ap.parse_args()
    res = {"torch not initialized": measure(False)}
    import torch
    torch.cuda.init()
    torch.zeros(1, device="cuda")
    res["torch initialized"] = measure(True)
    meta = {"device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(),
            "cupy": cp.__version__, "torch": torch.__version__, "python": sys.version.split()[0],
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "label": a.label,
            "rotorq": os.path.dirname(rotorq.__file__)}
    with open(os.path.join(a.out, f"overhead_{a.label}.json"), "w") as f:
        json.dump({"meta": meta, "results": res}, f, indent=1)
    names = list(res["torch initialized"])
    print(f"| {a.label}: µs per call | torch not initialized | torch initialized |")
    print("|---|---:|---:|")
    for n in names:
        v0 = res["torch not initialized"].get(n)
        print(f"| {n} | {'—' if v0 is None else f'{v0:.1f}'} | {res['torch initialized'][n]:.1f} |")


if __name__ == "__main__":
    main()
