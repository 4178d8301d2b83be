"""The generated kernels of :mod:`rotorq.cuda.fast` under Numba's simulator against the CPU twins.

Tiny shapes (D = 16 or 32, two blocks of 4 threads striding over the rows/keys) so that the
grid-stride loops, the clamped second key of a thread and partial query chunks all run.
Run with ``NUMBA_ENABLE_CUDASIM=1 python -m pytest -m cudasim tests/cuda``.
"""

import importlib
import os

import numpy as np
import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
    pytest.skip("simulator tests: run with NUMBA_ENABLE_CUDASIM=1 -m cudasim",
                allow_module_level=True)

import rotorq

fast = importlib.import_module("rotorq.cuda.fast")
CPU_WHT = importlib.import_module("rotorq.cpu.wht")

pytestmark = pytest.mark.cudasim


def _cpu_quantize(tq, x):
    q = tq.quantize(x)
    return np.asarray(q.codes), np.asarray(q.norms)


@pytest.mark.parametrize("rotation,d", (("hadamard", 16), ("hadamard", 12), ("rotor", 8)))
@pytest.mark.parametrize("bits", (2, 3))
@pytest.mark.parametrize("half", (True, False))
@pytest.mark.parametrize("norm_correction", (False, True))
def test_quantize_matches_cpu(rotation, d, bits, half, norm_correction):
    rng = np.random.default_rng(bits * 7 + d)
    tq = rotorq.TurboQuant(d, bits, rotation=rotation, norm_dtype="float32",
                           norm_correction=norm_correction)
    n = 11
    x = rng.standard_normal((n, d)).astype(np.float16 if half else np.float32)
    x[3] = 0
    codes_ref, norms_ref = _cpu_quantize(tq, x)
    big_d = tq.stored_dim
    rot = tq.rotation.params(np)
    rarg = rot["signs"] if rotation == "hadamard" else rot["mats"]
    nbytes = codes_ref.shape[1]
    word_out = nbytes % 4 == 0
    codes = np.full((n, nbytes // 4) if word_out else (n, nbytes), 0xAB,
                    np.uint32 if word_out else np.uint8)
    norms = np.full(n, np.nan, np.float32)
    kern = fast.quantize_kernel(rotation, d, big_d, bits, half, norm_correction, word_out)
    xin = x.view(np.uint32) if half else x
    kern[2, 4](np.ascontiguousarray(xin), np.ascontiguousarray(rarg, np.float32),
               tq.boundaries, tq.centroids, codes, norms)
    np.testing.assert_array_equal(codes.view(np.uint8).reshape(n, -1), codes_ref)
    np.testing.assert_allclose(norms, norms_ref, rtol=1e-6)


@pytest.mark.parametrize("bits", (2, 3, 4))
@pytest.mark.parametrize("n_m", (1, 3, 8))
def test_scores_match_cpu(bits, n_m):
    rng = np.random.default_rng(bits + 10 * n_m)
    big_d, n_keys = 32, 13
    tq = rotorq.TurboQuant(big_d, bits, norm_dtype="float32")
    keys = tq.quantize(rng.standard_normal((2, n_keys, big_d)).astype(np.float32))
    q = rng.standard_normal((3, n_m, big_d)).astype(np.float32)
    qrot = np.asarray(tq.rotate(q)).reshape(3, n_m, big_d).astype(np.float32)
    qmap = np.array([0, 1, 2], np.int64)
    kmap = np.array([0, 1, 1], np.int64)
    codes = np.asarray(keys.codes).reshape(2, n_keys, -1)
    norms = np.asarray(keys.norms).reshape(2, n_keys).astype(np.float32)
    ref = importlib.import_module("rotorq.cpu.scores")
    expected = np.empty((3, n_m, n_keys), np.float32)
    ref.scores_mse(qrot, qmap, codes, norms, kmap, tq.centroids, bits, expected)
    queries = fast.score_queries(big_d, bits, n_m)
    kern = fast.score_kernel(big_d, bits, queries)
    out = np.full((3, n_m, n_keys), np.nan, np.float32)
    kern[(2, 2, -(-n_m // queries)), 4](qrot, qmap, codes.view(np.uint32), norms, kmap,
                                        tq.centroids, out)
    np.testing.assert_allclose(out, expected, rtol=2e-5, atol=2e-5 * np.abs(expected).max())


@pytest.mark.parametrize("half_in,half_out", ((True, True), (True, False), (False, False)))
def test_wht_matches_cpu(half_in, half_out):
    rng = np.random.default_rng(3)
    n = 16
    x = rng.standard_normal((9, n)).astype(np.float16 if half_in else np.float32)
    ref = np.empty((9, n), np.float32)
    CPU_WHT.wht(x.astype(np.float32), ref)
    out = np.full((9, n // 2) if half_out else (9, n), 0xFFFF,
                  np.uint32 if half_out else np.float32)
    fast.wht_kernel(n, half_in, half_out)[2, 4](x.view(np.uint32) if half_in else x, out)
    got = out.view(np.float16).astype(np.float32) if half_out else out
    expected = ref.astype(np.float16).astype(np.float32) if half_out else ref
    np.testing.assert_array_equal(got, expected)
