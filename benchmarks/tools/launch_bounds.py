"""Launch bounds of the tiled quantize kernels: kernel time against resident blocks per SM.

The kernels cap their registers for a number of resident blocks (``launch_bounds``); more
blocks mean more warps to hide latency with, fewer registers, and sometimes more instructions.
For fp16 rows, d = 128, 3 bits, N = 2^20 and 2^22, this times the Hadamard quantize
(:func:`rotorq.cuda.gen.quantize.kernel`, ``blocks``) and the rotor quantize
(:func:`rotorq.cuda.gen.quantize_rotor.kernel`, register budget ``regs``) at each setting,
the launches recorded once and replayed (no host work), least of 3 medians.

    python3 -m benchmarks.tools.launch_bounds            (a GPU)
    python3 -m benchmarks.tools.launch_bounds --precompile-only   (fills $ROTORQ_PTX_CACHE, no GPU)
"""

import argparse
import functools

import numpy as np

HADAMARD_BLOCKS = (4, 5, 6)
ROTOR_REGS = (64, 56, 40)  # 5, 6 and 8 blocks of 192 threads at d = 128
D, BITS = 128, 3


def _kernels():
    from rotorq.cuda.gen import quantize, quantize_rotor
    out = []
    for b in HADAMARD_BLOCKS:
        out.append(("hadamard", f"blocks {b}", functools.partial(quantize.kernel, blocks=b)))
    for r in ROTOR_REGS:
        out.append(("rotor", f"regs {r}", functools.partial(quantize_rotor.kernel, regs=r)))
    return out


def precompile():
    from benchmarks.gpu.bench import compile_sm90
    u32, f32 = np.uint32, np.float32
    rd, lv = 3 * (-(-D // 3)), 1 << BITS
    for rot, _, make in _kernels():
        if rot == "hadamard":
            kern = make(D, D, BITS, True, False, True)
            args = (np.zeros(D, u32), np.zeros(D, f32), np.zeros(lv - 1, f32),
                    np.zeros(lv, f32), np.zeros(D * BITS // 32, u32), np.zeros(1, f32))
        else:
            kern = make(D, BITS, True, False)
            args = (np.zeros(D, u32), np.zeros(3 * rd, f32), np.zeros(lv - 1, f32),
                    np.zeros(lv, f32), np.zeros(8 * ((rd * BITS + 7) // 8), u32),
                    np.zeros(1, f32))
        compile_sm90(kern, args)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precompile-only", action="store_true")
    a = ap.parse_args()
    if a.precompile_only:
        precompile()
        return
    import cupy as cp

    import rotorq
    from benchmarks.gpu.bench import api, buffers, kernel_time
    rng = np.random.default_rng(0)
    name = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    print(f"# launch bounds of the tiled quantize kernels — {name}, d = {D}, {BITS} bits, fp16\n")
    print("| rotation | setting | launch bounds (threads, blocks) | N | µs (kernel) |")
    print("|---|---|---|---|---|")
    mods = {"hadamard": api._gen_quantize, "rotor": api._gen_rotor}
    originals = {rot: mod.kernel for rot, mod in mods.items()}
    for n in (1 << 20, 1 << 22):
        xs = buffers(lambda n=n: cp.asarray(rng.standard_normal((n, D)), cp.float16), n * 2 * D)
        for rot, setting, make in _kernels():
            tq = rotorq.TurboQuant(D, BITS, rotation=rot)
            k = tq.device_constants(cp)
            mods[rot].kernel = make
            try:
                def call(x, tq=tq, k=k):
                    return api.quantize(x, tq.rotation, k["boundaries"], k["centroids"], BITS,
                                        False, None)
                secs = min(kernel_time(call, xs, 20) for _ in range(3))
                kern = (make(D, D, BITS, True, False, True) if rot == "hadamard"
                        else make(D, BITS, True, False))
            finally:
                mods[rot].kernel = originals[rot]
            print(f"| {rot} | {setting} | {kern.launch_bounds} | 2^{n.bit_length() - 1} | "
                  f"{secs * 1e6:.1f} |", flush=True)


if __name__ == "__main__":
    main()
