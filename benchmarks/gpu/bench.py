"""GPU timings of rotorq's CUDA kernels against cupy/torch baselines measured in the same run.

N = 2^10 … 2^22 vectors of d = 128, 3 bits: fused quantize (hadamard, rotor, dense) of fp16
input, scores against packed keys (1 query, a GQA group of 8), the standalone WHT-128
(fp16 in/out), each through the backend (``rotorq.cuda.api``), which runs the generated
kernels of ``rotorq.cuda.gen`` from ``api.GENERATED_MIN_ROWS`` rows (quantize and WHT: tiles
staged through shared memory; scores: float16 pair tables for 1 query at 3 bits, tensor
cores for 8). Baselines: cupy's ``x.copy()``, torch fp16 ``q @ Kᵀ``, and the plain torch
quantizer (dense matmul + bucketize + uint8 indices). Device time from CUDA events around
back-to-back calls (so small N shows per-call overhead too), after a warm-up, median of
trials, inputs rotated among buffers that together exceed L2. Rows marked "(kernel)" time
the same calls' kernels alone: each call's launches are recorded once and replayed with their
prepared arguments (``kernel_time``), because a backend call's host work (30–60 µs on the
GPU machines' hosts) exceeds some kernels' time, and back-to-back calls then measure the host.
Effective TB/s = bytes the operation must move / time. Also measures host overhead per call at
small N.

Usage: ``python3 -m benchmarks.gpu.bench [--out DIR] [--max-log2n 22]``; writes
``gpu_bench.json`` and ``gpu_bench.md`` to DIR (default ``$OUT`` or ``.``).
"""

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import statistics
import time

import cupy as cp
import numpy as np
from cupy.cuda import driver

try:
    import torch
except ImportError:  # --precompile-only needs no torch
    torch = None

import rotorq

api = importlib.import_module("rotorq.cuda.api")
launch_mod = importlib.import_module("rotorq.cuda._launch")

D, BITS = 128, 3
L2_FALLBACK = 50 << 20
KERNEL_NOTE = "kernels replayed: no host work"


def l2_bytes():
    """The current device's L2 size (H100 50 MB, H200 60 MB); 50 MB without a device."""
    try:
        return int(cp.cuda.Device().attributes["L2CacheSize"])
    except Exception:  # e.g. --precompile-only on a machine without a GPU
        return L2_FALLBACK


def device_time(fn, bufs, reps, trials=5):
    """Median seconds per call of ``fn(buf)`` cycling over ``bufs``, by CUDA events."""
    for b in bufs[:3]:
        fn(b)
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(trials):
        start.record()
        for i in range(reps):
            fn(bufs[i % len(bufs)])
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) / 1e3 / reps)
    return statistics.median(times)


def kernel_time(fn, bufs, reps, trials=5, only=None):
    """Median seconds per call of the kernels that ``fn(buf)`` launches, cycling over
    ``bufs``: each call's launches are recorded once (``rotorq.cuda._launch.RECORDER``) and
    replayed with their prepared parameter buffers, so the time is the GPU's, not the host's
    (a backend call costs 30–60 µs of host time, more than some kernels at N = 2^20).
    ``only``: replay just that launch of each call (an index into its launches)."""
    launch_mod.RECORDER = rec = []
    calls = []
    try:
        for b in bufs:
            first = len(rec)
            out = fn(b)
            calls.append((rec[first:], out))  # keep the outputs the launches write alive
    finally:
        launch_mod.RECORDER = None
    stream = cp.cuda.get_current_stream()
    if any(r[4] != stream.ptr for c in calls for r in c[0]):
        raise RuntimeError("recorded launches ran on another stream")

    def replay(i):
        launches = calls[i % len(calls)][0]
        if only is not None:
            launches = [launches[only]]
        for f, g, blk, sh, st, _, ex in launches:
            driver.launchKernel(f, g[0], g[1], g[2], blk[0], blk[1], 1, sh, st, 0, ex)

    for i in range(3):
        replay(i)
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(trials):
        start.record()
        for i in range(reps):
            replay(i)
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) / 1e3 / reps)
    return statistics.median(times)


def host_time(fn, reps=2000):
    """Median wall seconds per call (host overhead bound at tiny sizes), synchronized."""
    fn()
    cp.cuda.runtime.deviceSynchronize()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        cp.cuda.runtime.deviceSynchronize()
        times.append((time.perf_counter() - t0) / reps)
    return statistics.median(times)


def buffers(make, nbytes):
    """Enough independent inputs that cycling through them streams from HBM, not L2."""
    return [make() for _ in range(max(1, min(32, -(-2 * l2_bytes() // max(nbytes, 1)))))]


def code_buffers(xs, tq, bits):
    """Packed keys (codes (1, n, B), norms (1, n)) of ``xs``, copied into enough distinct
    buffers that cycling through them reads from HBM, not L2 (2^20 3-bit keys are 52 MB,
    about the H100's L2: one buffer gave 43–95 µs for the same kernel)."""
    k = tq.device_constants(cp)
    one = []
    for x in xs:
        c, nr, _, _ = api.quantize(x, tq.rotation, k["boundaries"], k["centroids"], bits,
                                   False, None)
        one.append((c.reshape(1, x.shape[0], -1), nr.reshape(1, x.shape[0])))
    nbytes = one[0][0].nbytes + one[0][1].nbytes
    keys = list(one)
    while len(keys) < max(2, -(-2 * l2_bytes() // nbytes)):
        c, nr = one[len(keys) % len(one)]
        keys.append((c.copy(), nr.copy()))
    return keys


def bench_size(n, rng, tqs, add):
    """Every operation at ``N = n`` vectors; ``add(op, n, seconds, bytes, note)`` records."""
    tq = tqs["hadamard"]
    k = tq.device_constants(cp)
    reps = max(3, min(200, (1 << 24) // n))
    xs = buffers(lambda: cp.asarray(rng.standard_normal((n, D)), dtype=cp.float16), n * D * 2)
    # quantize
    for name, t in tqs.items():
        kk = t.device_constants(cp)

        def call(x, t=t, kk=kk):
            return api.quantize(x, t.rotation, kk["boundaries"], kk["centroids"], BITS,
                                False, None)
        secs = device_time(call, xs, reps)
        add(f"quantize {name} fp16", n, secs, n * (2 * D + D * BITS // 8 + 2))
        if name != "dense":
            add(f"quantize {name} fp16 (kernel)", n, kernel_time(call, xs, reps),
                n * (2 * D + D * BITS // 8 + 2), KERNEL_NOTE)
    pi = torch.as_tensor(tqs["dense"].rotation.q, dtype=torch.float32, device="cuda")
    bnd = torch.as_tensor(tq.boundaries, device="cuda")
    tx = [torch.from_dlpack(x) for x in xs]

    def torch_quantize(x):
        y = x.float() @ pi.T
        nrm = y.norm(dim=1, keepdim=True)
        return torch.bucketize(y / nrm, bnd).to(torch.uint8), nrm.half()

    secs = device_time(torch_quantize, tx, reps)
    add("torch quantize (matmul+bucketize)", n, secs, n * (2 * D + D + 2),
        "baseline: uint8 codes")
    secs = device_time(lambda x: x.copy(), xs, reps)
    add("cupy x.copy() fp16", n, secs, n * 4 * D, "baseline: cupy's copy kernel")
    dst = cp.empty_like(xs[0])
    secs = device_time(lambda x: cp.copyto(dst, x), xs, reps)
    add("cupy copyto (preallocated) fp16", n, secs, n * 4 * D, "bandwidth reference")
    # scores
    keys = code_buffers(xs, tq, BITS)
    zero = cp.zeros(1, cp.int64)
    for heads in (1, 8):
        label = "1 query" if heads == 1 else f"{heads} queries"
        qrot = api.rotate(cp.asarray(rng.standard_normal((heads, D)), cp.float32),
                          tq.rotation).reshape(1, heads, D)

        def call(kn, qrot=qrot):
            return api.scores(qrot, None, zero, kn[0], kn[1], None, None, zero,
                              k["centroids"], BITS, 0.0)
        secs = device_time(call, keys, reps)
        note = "float16 pair table" if heads == 1 else "tensor cores"
        add(f"scores 3-bit, {label}", n, secs, n * (D * BITS // 8 + 4 + 4 * heads), note)
        add(f"scores 3-bit, {label} (kernel)", n, kernel_time(call, keys, reps),
            n * (D * BITS // 8 + 4 + 4 * heads), KERNEL_NOTE)
        q16 = torch.as_tensor(rng.standard_normal((heads, D)), dtype=torch.float16,
                              device="cuda")
        secs = device_time(lambda kk16, q16=q16: q16 @ kk16.T, tx, reps)
        add(f"torch fp16 q@K.T, {label}", n, secs, n * (2 * D + 2 * heads), "baseline")
    # WHT
    secs = device_time(lambda x: api.wht(x, cp.float16), xs, reps)
    add("WHT-128 fp16 -> fp16", n, secs, n * 4 * D)
    add("WHT-128 fp16 -> fp16 (kernel)", n,
        kernel_time(lambda x: api.wht(x, cp.float16), xs, reps), n * 4 * D, KERNEL_NOTE)
    secs = device_time(api.wht, xs, reps)
    add("WHT-128 fp16 -> fp32 (rotorq.wht)", n, secs, n * 6 * D)


def bench(max_log2n):
    """Rows of the timing table for N = 2^10, 2^12, …, 2^max_log2n."""
    rng = np.random.default_rng(0)
    tqs = {r: rotorq.TurboQuant(D, BITS, rotation=r) for r in ("hadamard", "rotor", "dense")}
    rows = []

    def add(op, n, seconds, nbytes, note=""):
        rows.append({"op": op, "N": n, "us": seconds * 1e6, "bytes": nbytes,
                     "TBps": nbytes / seconds / 1e12, "note": note})

    for log2n in range(10, max_log2n + 1, 2):
        bench_size(1 << log2n, rng, tqs, add)
        cp.get_default_memory_pool().free_all_blocks()
    return rows


def overheads():
    """Host wall time per call at tiny sizes: backend and public API."""
    tq = rotorq.TurboQuant(D, BITS)
    k = tq.device_constants(cp)
    x = cp.asarray(np.random.default_rng(1).standard_normal((1024, D)), cp.float16)
    codes, norms, _, _ = api.quantize(x, tq.rotation, k["boundaries"], k["centroids"], BITS,
                                      False, None)
    qv = tq.quantize(x)
    q = cp.asarray(np.random.default_rng(2).standard_normal((1, D)), cp.float32)
    qrot = api.rotate(q, tq.rotation).reshape(1, 1, D)
    zero = cp.zeros(1, cp.int64)
    keys = (codes.reshape(1, 1024, -1), norms.reshape(1, 1024))
    out = {}
    out["backend scores, 1 query x 1024 keys"] = host_time(
        lambda: api.scores(qrot, None, zero, *keys, None, None, zero, k["centroids"], BITS,
                           0.0))
    out["backend quantize 1024 x 128 fp16"] = host_time(
        lambda: api.quantize(x, tq.rotation, k["boundaries"], k["centroids"], BITS, False,
                             None))
    out["public TurboQuant.scores(q, 1024 keys)"] = host_time(lambda: tq.scores(q, qv), 500)
    out["public TurboQuant.quantize(1024 x 128)"] = host_time(lambda: tq.quantize(x), 500)
    out["reference: cupy elementwise x + 1"] = host_time(lambda: x + 1)
    tx = torch.from_dlpack(x)
    out["reference: torch add"] = host_time(lambda: tx + 1)
    return {k_: v * 1e6 for k_, v in out.items()}


def _jobs():
    """The generated kernels (``rotorq.cuda.gen``) the benchmark launches, with argument specs."""
    from rotorq.cuda.gen import (
        attention,
        key_bias,
        quantize,
        quantize_rotor,
        scores_group,
        scores_one,
        wht,
    )
    f32, i64, u32 = np.float32, np.int64, np.uint32
    w, lv = D * BITS // 32, 1 << BITS

    def a(*shape, dt=f32):
        return np.zeros(shape, dt)

    rd = 3 * (-(-D // 3))
    return {
        "score1": (lambda: scores_one.kernel(D, BITS),
                   (a(1, 1, D), a(1, dt=i64), a(4 * w, dt=u32), a(1, 4), a(1, dt=i64), a(lv),
                    a(1, 1, 4))),
        "score8": (lambda: scores_group.kernel(D, BITS),
                   (a(1, 8, D), a(1, dt=i64), a(4 * w, dt=u32), a(1, 4), a(1, dt=i64), a(lv),
                    a(1, 8, 4))),
        # the tiled kernels take flat arrays (rotorq.cuda.api)
        "quantize": (lambda: quantize.kernel(D, D, BITS, True, False, True),
                     (a(2 * D, dt=u32), a(D), a(lv - 1), a(lv), a(4 * w, dt=u32), a(4))),
        "rotor_quantize": (lambda: quantize_rotor.kernel(D, BITS, True, False),
                           (a(2 * D, dt=u32), a(3 * rd), a(lv - 1), a(lv),
                            a(8 * ((rd * BITS + 7) // 8), dt=u32), a(4))),
        # the tensor-core decode attention on a tile-layout cache
        "attention_tiled": (lambda: attention.kernel(D, BITS, D, BITS, tiled=True),
                            (a(4, 8, D), a(64, dt=u32), a(64, dt=u32), a(lv), a(64, dt=u32),
                             a(64, dt=u32), a(lv), 0, 0, 0, 0, a(4, 2, 8, D), a(4, 2, 8),
                             a(4, 2, 8))),
        "key_bias": (lambda: key_bias.kernel(D // 2),
                     (a(4, 8, D // 2), a(4, 8, D // 2), a(D // 2, dt=np.float64), 0, 0, 0,
                      a(512), 0)),
        "wht16": (lambda: wht.kernel(D, True, True), (a(2 * D, dt=u32),) * 2),
        "wht32": (lambda: wht.kernel(D, True, False), (a(2 * D, dt=u32), a(4 * D))),
    }


def compile_sm90(kern, args):
    """PTX of ``kern`` for ``args`` on sm_90 into the PTX cache, where no GPU may be visible:
    Numba compiles device functions (e.g. a shared array's ``view``) for the current device,
    so this process's current device is made an sm_90 one first."""
    import types

    import numba.cuda.dispatcher as dispatcher

    from rotorq.cuda._jit import kernel_signature
    dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=(9, 0))
    launch_mod.compile_ptx(kern, kernel_signature(args), (9, 0))


def _compile_job(name):
    make, args = _jobs()[name]
    t0 = time.perf_counter()
    compile_sm90(make(), args)
    return name, time.perf_counter() - t0


def precompile():
    """Compile the generated kernels in parallel processes into ``$ROTORQ_PTX_CACHE`` (set to
    a fresh directory when unset); returns seconds per kernel (0 for cache hits)."""
    import concurrent.futures
    import multiprocessing
    import tempfile
    os.environ.setdefault("ROTORQ_PTX_CACHE", tempfile.mkdtemp(prefix="rotorq_ptx_"))
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(len(_jobs()), mp_context=ctx) as pool:
        return dict(pool.map(_compile_job, _jobs()))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--max-log2n", type=int, default=22)
    ap.add_argument("--precompile-only", action="store_true",
                    help="only fill $ROTORQ_PTX_CACHE with the generated kernels, in parallel")
    args = ap.parse_args()
    t0 = time.perf_counter()
    compiled = precompile()
    print(f"precompiled in {time.perf_counter() - t0:.1f} s: "
          + ", ".join(f"{k} {v:.1f}" for k, v in compiled.items()), flush=True)
    if args.precompile_only:
        return
    props = cp.cuda.runtime.getDeviceProperties(0)
    meta = {"card": props["name"].decode(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "python": platform.python_version(), "numpy": np.__version__,
            "cupy": cp.__version__, "torch": torch.__version__,
            "numba": importlib.import_module("numba").__version__,
            "numba_cuda": importlib.metadata.version("numba-cuda"),
            "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(),
            "driver": cp.cuda.runtime.driverGetVersion(), "d": D, "bits": BITS}
    t0 = time.perf_counter()
    over = overheads()
    rows = bench(args.max_log2n)
    meta["seconds"] = round(time.perf_counter() - t0, 1)
    meta["registers"] = launch_mod.registers()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_bench.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows, "overhead_us": over}, f, indent=1)
    lines = [f"# rotorq GPU benchmark — {meta['card']}, {meta['date']}", "",
             ", ".join(f"{k_} {v}" for k_, v in meta.items()
                       if k_ not in ("card", "date", "registers")), "",
             "| op | N | µs | bytes/vec | TB/s | note |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['op']} | 2^{r['N'].bit_length() - 1} | {r['us']:.1f} | "
              f"{r['bytes'] // r['N']} | {r['TBps']:.2f} | {r['note']} |" for r in rows]
    lines += ["", "| host overhead per call (small sizes) | µs |", "|---|---|"]
    lines += [f"| {k_} | {v:.1f} |" for k_, v in over.items()]
    lines += ["", f"registers per thread: {meta['registers']}"]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "gpu_bench.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
