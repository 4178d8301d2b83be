"""The tiled GPU kernels at other shapes: head_dim 64/128/256 at 3 bits, 2 and 4 bits at 128.

For each (d, bits), at N = 2^20 fp16 vectors: Hadamard and rotor quantize, scores for 1 query and for
a GQA group of 8, and the standalone WHT (fp16 in and out), each with its bytes, the floor at
the bandwidth of a preallocated cupy copy measured in the same run, and the time as a multiple
of it. Kernel time: each call's launches recorded once and replayed
(``benchmarks.gpu.bench.kernel_time``), so the host's work per call (more than some of these
kernels take) is not timed.

Run on the GPU machine: ``python3 -m benchmarks.gpu.shapes --out DIR`` (writes
``gpu_shapes.md``).
"""

import argparse
import os
import time

import cupy as cp
import numpy as np

import rotorq
from benchmarks.gpu.bench import api, buffers, code_buffers, device_time, kernel_time
from rotorq.cuda.gen import quantize, quantize_rotor, row_tiles, score_tiles

FLOOR_TBS = [2.98]
"""Bandwidth of the floors (TB/s): the H100 copy bandwidth of docs/gpu.md until ``main``
measures it."""
SHAPES = ((64, 3), (128, 3), (256, 3), (128, 2), (128, 4))


def rows_for(d, bits, n, rng):
    tq = rotorq.TurboQuant(d, bits)
    k = tq.device_constants(cp)
    reps = max(3, min(200, (1 << 24) // n))
    xs = buffers(lambda: cp.asarray(rng.standard_normal((n, d)), dtype=cp.float16), n * d * 2)
    out = []

    def add(op, secs, nbytes):
        floor = nbytes / (FLOOR_TBS[0] * 1e12)
        out.append((d, bits, op, secs * 1e6, nbytes / secs / 1e12, floor * 1e6, secs / floor))

    assert quantize.applies("hadamard", d, d, bits, np.dtype("float16"), 0)
    assert row_tiles.applies(d)
    secs = kernel_time(lambda x: api.quantize(x, tq.rotation, k["boundaries"], k["centroids"],
                                              bits, False, None), xs, reps)
    add("quantize hadamard fp16", secs, n * (2 * d + d * bits // 8 + 2))
    tr = rotorq.TurboQuant(d, bits, rotation="rotor")
    kr = tr.device_constants(cp)
    assert quantize_rotor.applies("rotor", d, tr.stored_dim, bits, np.dtype("float16"), 0)
    secs = kernel_time(lambda x: api.quantize(x, tr.rotation, kr["boundaries"], kr["centroids"],
                                              bits, False, None), xs, reps)
    add("quantize rotor fp16", secs, n * (2 * d + -(-tr.stored_dim * bits // 8) + 2))
    keys = code_buffers(xs, tq, bits)
    zero = cp.zeros(1, cp.int64)
    for heads in (1, 8):
        if not score_tiles.applies(d, bits, heads):  # the unrolled kernel compiles for minutes
            continue
        qrot = api.rotate(cp.asarray(rng.standard_normal((heads, d)), cp.float32),
                          tq.rotation).reshape(1, heads, d)
        secs = kernel_time(lambda kn, qrot=qrot: api.scores(
            qrot, None, zero, kn[0], kn[1], None, None, zero, k["centroids"], bits, 0.0),
            keys, reps)
        add(f"scores, {heads} quer{'y' if heads == 1 else 'ies'}", secs,
            n * (d * bits // 8 + 2 + 4 * heads))  # codes + fp16 norm read, fp32 scores written
    secs = kernel_time(lambda x: api.wht(x, cp.float16), xs, reps)
    add("WHT fp16 -> fp16", secs, n * 4 * d)
    return out


def _rotor_job(shape):
    from benchmarks.gpu.bench import compile_sm90
    d, bits = shape
    g = -(-d // 3)
    kern = quantize_rotor.kernel(d, bits, True, False)
    args = (np.zeros(d, np.uint32), np.zeros(9 * g, np.float32), np.zeros((1 << bits) - 1,
            np.float32), np.zeros(1 << bits, np.float32), np.zeros(8, np.uint32),
            np.zeros(2, np.float32))
    t0 = time.perf_counter()
    compile_sm90(kern, args)
    return shape, time.perf_counter() - t0


def precompile():
    """Compile the rotor quantize kernels of every shape into ``$ROTORQ_PTX_CACHE`` in
    parallel processes (where there is no GPU)."""
    import concurrent.futures
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(len(SHAPES), mp_context=ctx) as pool:
        return dict(pool.map(_rotor_job, SHAPES))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--log2n", type=int, default=20)
    ap.add_argument("--precompile-only", action="store_true",
                    help="only fill $ROTORQ_PTX_CACHE with the rotor quantize kernels")
    args = ap.parse_args()
    if args.precompile_only:
        print(precompile())
        return
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    src = cp.ones(1 << 29, cp.uint8)
    dst = cp.empty_like(src)
    secs = device_time(lambda pair: cp.copyto(*pair), [(dst, src)], 20)
    FLOOR_TBS[0] = 2 * src.nbytes / secs / 1e12
    del src, dst
    rows = []
    for d, bits in SHAPES:
        rows += rows_for(d, bits, 1 << args.log2n, rng)
        cp.get_default_memory_pool().free_all_blocks()
    name = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    lines = [f"# tiled kernels at other shapes — {name}, N = 2^{args.log2n}, fp16 in, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"{time.perf_counter() - t0:.0f} s (compiles included); kernel times; floors at "
             f"{FLOOR_TBS[0]:.2f} TB/s (a preallocated cupy copy, same run)", "",
             "| d | bits | op | µs | TB/s | floor µs | × floor |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {d} | {b} | {op} | {us:.1f} | {tbs:.2f} | {fl:.1f} | {x:.2f} |"
              for d, b, op, us, tbs, fl, x in rows]
    text = "\n".join(lines) + "\n"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_shapes.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
