"""The generated tiled WHT (:mod:`rotorq.cuda.gen.wht`) under Numba's simulator against the
CPU twin.

Tiny shapes and blocks (3–64 threads: tiles of 1–3 rows) launched on 2 blocks over more tiles
than blocks, with a partial last tile, so that the grid-stride loop, the prefetch of the next
tile and every phase layout (one phase for D = 16, a strided second phase for D = 32, 128,
256, a third for D = 512) run.
Run with ``NUMBA_ENABLE_CUDASIM=1 python -m pytest -m cudasim tests/cuda``.
"""

import importlib
import os

import numpy as np
import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
    pytest.skip("simulator tests: run with NUMBA_ENABLE_CUDASIM=1 -m cudasim",
                allow_module_level=True)


pytestmark = pytest.mark.cudasim

wht = importlib.import_module("rotorq.cuda.gen.wht")
CPU_WHT = importlib.import_module("rotorq.cpu.wht")


@pytest.mark.parametrize("half_in,half_out", ((True, True), (True, False), (False, False),
                                              (False, True)))
@pytest.mark.parametrize("stored_dim,threads", ((16, 3), (32, 4), (128, 16), (256, 32), (512, 64)))
def test_tiled_wht_matches_cpu(stored_dim, threads, half_in, half_out):
    """Bit-identical to the CPU's WHT (fp16 output: the CPU's float32 result rounded once)."""
    rng = np.random.default_rng(stored_dim + 2 * half_in + half_out)
    n = 7
    x = rng.standard_normal((n, stored_dim)).astype(np.float16 if half_in else np.float32)
    ref = np.empty((n, stored_dim), np.float32)
    CPU_WHT.wht(x.astype(np.float32), ref)
    out = np.full((n, stored_dim // 2) if half_out else (n, stored_dim), 0xFFFF,
                  np.uint32 if half_out else np.float32)
    kern = wht.kernel(stored_dim, half_in, half_out, threads)
    assert kern.rows_per_tile * 2 < n  # more tiles than blocks, partial last tile
    kern[2, threads]((x.view(np.uint32) if half_in else x).reshape(-1), out.reshape(-1))
    got = out.view(np.float16).astype(np.float32) if half_out else out
    expected = ref.astype(np.float16).astype(np.float32) if half_out else ref
    np.testing.assert_array_equal(got, expected)
