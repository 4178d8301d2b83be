"""The generated tiled quantize kernels (:mod:`rotorq.cuda.gen.quantize`, Hadamard;
:mod:`rotorq.cuda.gen.quantize_rotor`) under Numba's simulator against the CPU twins.

Tiny shapes and blocks launched on 2 blocks over more tiles than blocks, with a partial last
tile, so that the grid-stride loop, the prefetch of the next tile, padded rows (d < D), every
decision (registers, sign and magnitude, heap) and both lane mappings run.
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

pytestmark = pytest.mark.cudasim

quantize = importlib.import_module("rotorq.cuda.gen.quantize")
quantize_rotor = importlib.import_module("rotorq.cuda.gen.quantize_rotor")
row_tiles = importlib.import_module("rotorq.cuda.gen.row_tiles")


@pytest.mark.parametrize("d,bits,threads", ((16, 3, 2), (12, 2, 3), (32, 4, 4), (32, 1, 2),
                                            (96, 3, 16)))
@pytest.mark.parametrize("half", (True, False))
@pytest.mark.parametrize("norm_correction", (False, True))
def test_tiled_quantize_matches_cpu(d, bits, threads, half, norm_correction):
    """Same packed codes and norms as the CPU's Hadamard quantize (zero row included)."""
    _check_quantize(d, bits, threads, half, norm_correction, 11)


@pytest.mark.parametrize("d,bits,threads,n", ((64, 3, 32, 37), (96, 2, 64, 19), (128, 3, 256, 70),
                                              (128, 4, 256, 70), (512, 3, 256, 20)))
@pytest.mark.parametrize("half", (True, False))
@pytest.mark.parametrize("norm_correction", (False, True))
def test_tiled_quantize_lane_mapping_matches_cpu(d, bits, threads, n, half, norm_correction):
    """Tiles of a multiple of 8 rows (lanes of 8 rows × 4 parts, unpadded vector-aligned rows),
    the benchmark block of 256 threads included, over more tiles than blocks."""
    assert row_tiles.RowTiles(1 << (d - 1).bit_length(), threads, half, d, vec=True).A == 8
    _check_quantize(d, bits, threads, half, norm_correction, n)


def _cpu_case(rotation, d, bits, half, norm_correction, n, seed):
    """A quantizer, rows (row 3 zero) and the CPU twin's packed codes and float32 norms."""
    rng = np.random.default_rng(seed)
    tq = rotorq.TurboQuant(d, bits, rotation=rotation, norm_dtype="float32",
                           norm_correction=norm_correction)
    x = (rng.standard_normal((n, d)) * 3).astype(np.float16 if half else np.float32)
    x[3] = 0
    q = tq.quantize(x)
    return tq, x, np.asarray(q.codes), np.asarray(q.norms)


def _check_quantize(d, bits, threads, half, norm_correction, n):
    tq, x, codes_ref, norms_ref = _cpu_case("hadamard", d, bits, half, norm_correction, n,
                                            d * 10 + bits)
    nbytes = codes_ref.shape[1]
    word_out = nbytes % 4 == 0
    codes = np.full((n, nbytes // 4) if word_out else (n, nbytes), 0xAB,
                    np.uint32 if word_out else np.uint8)
    norms = np.full(n, np.nan, np.float32)
    kern = quantize.kernel(d, tq.stored_dim, bits, half, norm_correction, word_out, threads)
    signs = np.ascontiguousarray(tq.rotation.params(np)["signs"], np.float32)
    kern[2, threads]((x.view(np.uint32) if half else x).reshape(-1), signs, tq.boundaries,
                     tq.centroids, codes.reshape(-1), norms)
    np.testing.assert_array_equal(codes.view(np.uint8).reshape(n, -1), codes_ref)
    np.testing.assert_allclose(norms, norms_ref, rtol=1e-6)
    assert norms[3] == 0



@pytest.mark.parametrize("d,bits,rows,n", ((128, 3, 4, 9), (16, 3, 4, 11), (40, 2, 4, 10),
                                           (22, 4, 4, 9), (30, 4, 8, 19), (128, 1, 4, 9),
                                           (64, 2, 4, 13)))
@pytest.mark.parametrize("half", (True, False))
@pytest.mark.parametrize("norm_correction", (False, True))
def test_tiled_rotor_quantize_matches_cpu(d, bits, rows, n, half, norm_correction):
    """The tiled rotor quantize gives the CPU's packed codes and norms: a last part with fewer
    groups (d = 128, 40), padding coordinates (d % 3 != 0), every bit width, the heap decision
    (4 bits), a zero row, over more tiles than blocks with a partial last tile."""
    tq, x, codes_ref, norms_ref = _cpu_case("rotor", d, bits, half, norm_correction, n,
                                            d * 10 + bits + 100 * half)
    kern = quantize_rotor.kernel(d, bits, half, norm_correction, rows)
    assert kern.rows_per_tile * 2 < n and n % rows  # more tiles than blocks, partial last tile
    whole = np.full((quantize_rotor.padded_rows(n, rows), codes_ref.shape[1]), 0xAB, np.uint8)
    norms = np.full(n, np.nan, np.float32)
    mats = np.ascontiguousarray(tq.rotation.params(np)["mats"], np.float32).reshape(-1)
    kern[2, kern.threads]((x.view(np.uint32) if half else x).reshape(-1), mats, tq.boundaries,
                          tq.centroids, whole.reshape(-1).view(np.uint32), norms)
    np.testing.assert_array_equal(whole[:n], codes_ref)
    assert (whole[n:] != 0xAB).all()  # whole tiles written
    np.testing.assert_allclose(norms, norms_ref, rtol=1e-6)
    assert norms[3] == 0
