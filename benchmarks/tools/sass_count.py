"""SASS instruction counts of the generated kernels, without a GPU.

Compiles a kernel of :mod:`rotorq.cuda.gen` (its spec's defaults) to PTX for sm_90
(:func:`numba.cuda.compile_ptx`), assembles it with ``ptxas`` and disassembles it with
``cuobjdump -sass`` (pip ``nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm``), then prints the
registers and the instructions of the largest loop body (the grid-stride loop over tiles) by
opcode family.

    python -m benchmarks.tools.sass_count quantize --bits 3
    python -m benchmarks.tools.sass_count rotor --bits 3      (the tiled rotor quantize)
    python -m benchmarks.tools.sass_count one --bits 3
    python -m benchmarks.tools.sass_count attention --bits 3   (the tensor-core decode attention)
    python -m benchmarks.tools.sass_count attention-tiled --bits 3   (same, tile layout)
"""

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np


def _tool(name):
    path = shutil.which(name)
    if path:
        return path
    import nvidia
    for root in nvidia.__path__:
        for sub in ("cu13", "cu12", "cuda_cuobjdump"):
            cand = os.path.join(root, sub, "bin", name)
            if os.path.exists(cand):
                return cand
    sys.exit(f"{name} not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm; "
             "ptxas from the CUDA toolkit)")


def _kernel(which, d, bits, half, blocks=None, depth=None):
    from rotorq.cuda.gen import (
        attention,
        key_bias,
        quantize,
        quantize_rotor,
        scores_group,
        scores_one,
        wht,
    )
    u32, f32, i64 = np.uint32, np.float32, np.int64
    if which == "quantize":
        kern = quantize.kernel(d, d, bits, half, False, True)
        xin = np.zeros(d // 2, u32) if half else np.zeros(d, f32)
        args = (xin, np.zeros(d, f32), np.zeros((1 << bits) - 1, f32),
                np.zeros(1 << bits, f32), np.zeros(d * bits // 32, u32), np.zeros(1, f32))
    elif which == "rotor":
        kern = quantize_rotor.kernel(d, bits, half, False)
        g = -(-d // 3)
        xin = np.zeros(d // 2, u32) if half else np.zeros(d, f32)
        args = (xin, np.zeros(9 * g, f32), np.zeros((1 << bits) - 1, f32),
                np.zeros(1 << bits, f32), np.zeros(8 * -(-3 * g * bits // 8), u32),
                np.zeros(1, f32))
    elif which in ("attention", "attention-tiled"):
        tiled = which == "attention-tiled"
        kern = attention.kernel(d, bits, d, bits, tiled=tiled, blocks=blocks, prefetch=depth)
        f16, u16 = np.float16, np.uint16
        norms = np.zeros(8, u32) if tiled else np.zeros((1, 16), f16)
        vcodes = (np.zeros(16 * d * bits // 32, u32) if tiled
                  else np.zeros((1, 16 * d * bits // 16), u16))
        kcodes = np.zeros(16 * d * bits // 32, u32)
        args = (np.zeros((1, 8, d), f32), kcodes if tiled else kcodes.reshape(1, -1),
                norms, np.zeros(1 << bits, f32), vcodes, norms,
                np.zeros(1 << bits, f32), 0, 0, 0, 0, np.zeros((1, 1, 8, d), f32),
                np.zeros((1, 1, 8), f32), np.zeros((1, 1, 8), f32))
    elif which == "bias":
        kern = key_bias.kernel(d // 2)
        args = (np.zeros((1, 8, d // 2), f32), np.zeros((1, 8, d // 2), f32),
                np.zeros(d // 2), 0, 0, 0, np.zeros(128, f32), 0)
    elif which == "wht":
        kern = wht.kernel(d, half, half)
        a = np.zeros(d // 2, u32) if half else np.zeros(d, f32)
        args = (a, a)
    else:
        m = 1 if which == "one" else 8
        kern = scores_one.kernel(d, bits) if m == 1 else scores_group.kernel(d, bits)
        args = (np.zeros((1, m, d), f32), np.zeros(1, i64), np.zeros(d * bits // 32, u32),
                np.zeros((1, 4), f32), np.zeros(1, i64), np.zeros(1 << bits, f32),
                np.zeros((1, m, 4), f32))
    return kern, args


def sass(kern, args):
    """(registers, SASS text) of ``kern`` for ``args`` on sm_90."""
    import types

    import numba.cuda.dispatcher as dispatcher
    from numba import cuda

    # device functions (e.g. a shared array's ``view``) compile for the current device: sm_90
    dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=(9, 0))

    from rotorq.cuda._jit import kernel_signature
    ptx, _ = cuda.compile_ptx(kern.py_func, kernel_signature(args), cc=(9, 0),
                              launch_bounds=getattr(kern, "launch_bounds", None))
    ptx = re.sub(r"^\.version \d+\.\d+", ".version 8.0", ptx, count=1, flags=re.M)
    with tempfile.TemporaryDirectory() as tmp:
        src, obj = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([_tool("ptxas"), "-arch=sm_90", "-v", src, "-o", obj],
                             capture_output=True, text=True, check=True)
        regs = int(re.search(r"Used (\d+) registers", res.stderr).group(1))
        dump = _tool("cuobjdump")  # it runs nvdisasm, which pip installs next to it
        env = dict(os.environ, PATH=os.environ.get("PATH", "") + os.pathsep + os.path.dirname(dump))
        text = subprocess.run([dump, "-sass", obj], capture_output=True, text=True, check=True,
                              env=env).stdout
    return regs, text


def loop_body(text):
    """Instructions ``(address, opcode)`` of the largest backward-branch loop."""
    ins = []
    for line in text.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*);", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2), m.group(3)))
    best = []
    for addr, op, rest in ins:
        t = re.search(r"0x([0-9a-f]+)", rest)
        if op.startswith("BRA") and t and int(t.group(1), 16) < addr:
            body = [x for x in ins if int(t.group(1), 16) <= x[0] <= addr]
            if len(body) > len(best):
                best = body
    return [(a, op) for a, op, _ in best]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kernel", choices=["quantize", "rotor", "wht", "one", "group", "attention",
                                       "attention-tiled",
                                       "bias"])
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--fp32", action="store_true", help="fp32 input (default fp16)")
    ap.add_argument("--dump", help="write the SASS here")
    ap.add_argument("--depth", type=int, help="attention-tiled: tiles prefetched (the "
                    "spec's prefetch; default rotorq.cuda.gen.attention.PREFETCH)")
    ap.add_argument("--blocks", type=int, help="attention: launch-bounds blocks (0 uncapped; "
                    "default rotorq.cuda.gen.attention.LAUNCH_BLOCKS)")
    a = ap.parse_args(argv)
    kern, args = _kernel(a.kernel, a.d, a.bits, not a.fp32, a.blocks, a.depth)
    regs, text = sass(kern, args)
    if a.dump:
        with open(a.dump, "w") as f:
            f.write(text)
    body = loop_body(text)
    fam = collections.Counter(op.split(".")[0] for _, op in body)
    print(f"{a.kernel} d={a.d} bits={a.bits}: {regs} registers, loop body {len(body)} "
          f"instructions")
    print("  " + ", ".join(f"{k} {v}" for k, v in fam.most_common()))


if __name__ == "__main__":
    main()
