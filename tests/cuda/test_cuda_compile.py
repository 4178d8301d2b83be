"""Every CUDA kernel type-checks and compiles to PTX for sm_90, without a GPU.

Needs NVVM and NVRTC, which ``pip install "numba-cuda[cu13]"`` (or ``[cu12]``) provides;
skipped with the reason where they are missing, and under the simulator.
"""

import os
import types

import numpy as np
import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("compile tests need the real numba.cuda, not the simulator",
                allow_module_level=True)

from _cuda_cases import kernel_cases

CC = (9, 0)


def _signature_cases():
    seen, out = set(), []
    for case in kernel_cases():
        key = (case.module, case.kernel,
               tuple((a.dtype.str, a.ndim) if isinstance(a, np.ndarray) else type(a)
                     for a in case.args))
        if key not in seen:
            seen.add(key)
            out.append(case)
    return out


@pytest.fixture(scope="module")
def compiler():
    """``compile_ptx`` with device functions compiled for sm_90 even where no GPU is visible.

    Numba compiles a kernel's device functions for the *current* device's compute
    capability; the fixture substitutes a fake sm_90 device for that lookup.
    """
    import numba.cuda.dispatcher as dispatcher
    from numba import cuda, float32

    def probe(a):
        a[0] = 1.0

    try:
        cuda.compile_ptx(probe, (float32[::1],), cc=CC)
    except Exception as exc:  # missing NVVM / NVRTC libraries
        pytest.skip(f"NVVM/NVRTC unavailable ({type(exc).__name__}: {exc}); "
                    'install them with: pip install "numba-cuda[cu13]"')
    mp = pytest.MonkeyPatch()
    mp.setattr(dispatcher, "get_current_device",
               lambda: types.SimpleNamespace(compute_capability=CC))
    yield cuda.compile_ptx
    mp.undo()


@pytest.mark.parametrize("case", _signature_cases(), ids=lambda c: c.name)
def test_kernel_compiles_for_sm90(compiler, case):
    from rotorq.cuda._jit import kernel_signature

    ptx, _ = compiler(case.get_kernel().py_func, kernel_signature(case.args), cc=CC)
    assert ".entry" in ptx and ".target sm_90" in ptx


def _tiled_cases():
    """The generated tiled row kernels (WHT, Hadamard and rotor quantize) and the key-offset
    term at the benchmark shape, d = 128."""
    from rotorq.cuda.gen import key_bias, quantize, quantize_rotor, wht
    u32, f32 = np.uint32, np.float32

    def a(n, dt=f32):
        return np.zeros(n, dt)

    q_args = (a(7), a(8), a(12, u32), a(4))
    return [
        ("wht-f16-f16", lambda: wht.kernel(128, True, True), (a(64, u32), a(64, u32))),
        ("wht-f16-f32", lambda: wht.kernel(128, True, False), (a(64, u32), a(128))),
        ("wht-f32-f32", lambda: wht.kernel(128, False, False), (a(128), a(128))),
        ("wht-f32-f16", lambda: wht.kernel(128, False, True), (a(128), a(64, u32))),
        ("quantize-f16", lambda: quantize.kernel(128, 128, 3, True, False, True),
         (a(64, u32), a(128)) + q_args),
        ("quantize-f16-nc", lambda: quantize.kernel(128, 128, 3, True, True, True),
         (a(64, u32), a(128)) + q_args),
        ("quantize-f32", lambda: quantize.kernel(128, 128, 3, False, False, True),
         (a(128), a(128)) + q_args),
        ("quantize-f16-d96-bytes", lambda: quantize.kernel(96, 128, 2, True, False, False),
         (a(48, u32), a(128), a(3), a(4), a(32, np.uint8), a(4))),
        ("rotor-quantize-f16", lambda: quantize_rotor.kernel(128, 3, True, False),
         (a(64, u32), a(387), a(7), a(8), a(392, u32), a(1))),
        ("rotor-quantize-f16-nc", lambda: quantize_rotor.kernel(128, 3, True, True),
         (a(64, u32), a(387), a(7), a(8), a(392, u32), a(1))),
        ("rotor-quantize-f32-4bit", lambda: quantize_rotor.kernel(128, 4, False, False),
         (a(128), a(387), a(15), a(16), a(520, u32), a(1))),
        ("key-bias-64-freq", lambda: key_bias.kernel(64),
         (np.zeros((2, 8, 64), f32), np.zeros((2, 8, 64), f32), a(64, np.float64), 0, 0, 0,
          a(256), 0)),
    ]


def _compile_and_assemble(compiler, kern, args, tmp_path):
    """PTX for sm_90 with ``kern``'s launch bounds; where ``ptxas`` is on the PATH, also
    assembled: no spills, and registers within the launch bounds. Returns the PTX."""
    import re
    import shutil
    import subprocess

    from rotorq.cuda._jit import kernel_signature

    ptx, _ = compiler(kern.py_func, kernel_signature(args), cc=CC,
                      launch_bounds=kern.launch_bounds)
    assert ".entry" in ptx and ".target sm_90" in ptx and ".maxntid" in ptx
    ptxas = shutil.which("ptxas")
    if ptxas is None:
        return ptx
    src = tmp_path / "k.ptx"
    src.write_text(re.sub(r"^\.version \d+\.\d+", ".version 8.0", ptx, count=1, flags=re.M))
    res = subprocess.run([ptxas, "-arch=sm_90", "-v", str(src), "-o", str(tmp_path / "k.cubin")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    regs = int(re.search(r"Used (\d+) registers", res.stderr).group(1))
    threads, blocks = kern.launch_bounds
    assert regs <= 65536 // (threads * blocks), res.stderr
    assert re.search(r"\b0 bytes spill stores", res.stderr), res.stderr  # not "20 bytes …"
    return ptx


@pytest.mark.parametrize("case", _tiled_cases(), ids=lambda c: c[0])
def test_tiled_kernel_compiles_for_sm90(compiler, case, tmp_path):
    """PTX for sm_90 with the kernel's launch bounds; where ``ptxas`` is on the PATH, also
    assembled: no spills, and registers within the launch bounds."""
    _, make, args = case
    _compile_and_assemble(compiler, make(), args, tmp_path)


def _tiled_score_cases():
    """The generated tiled score kernels at D = 128, 2/3/4 bits."""
    from rotorq.cuda.gen import scores_group, scores_one
    f32, i64, u32 = np.float32, np.int64, np.uint32

    def args(bits, m):
        return (np.zeros((1, m, 128), f32), np.zeros(1, i64), np.zeros(16 * bits, u32),
                np.zeros((1, 4), f32), np.zeros(1, i64), np.zeros(1 << bits, f32),
                np.zeros((1, m, 4), f32))

    out = []
    for bits in (2, 3, 4):
        out.append((f"one-query-{bits}bit", lambda b=bits: scores_one.kernel(128, b),
                    args(bits, 1)))
        out.append((f"group8-{bits}bit", lambda b=bits: scores_group.kernel(128, b), args(bits, 8)))
    return out


@pytest.mark.parametrize("case", _tiled_score_cases(), ids=lambda c: c[0])
def test_tiled_score_kernel_compiles_for_sm90(compiler, case, tmp_path):
    """PTX for sm_90 with the launch bounds (the group kernel with ``mma.sync.m16n8k16``);
    where ``ptxas`` is on the PATH: assembled without spills, registers within the bounds."""
    name, make, args = case
    ptx = _compile_and_assemble(compiler, make(), args, tmp_path)
    assert ("mma.sync.aligned.m16n8k16" in ptx) == name.startswith("group")
