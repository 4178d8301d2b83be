"""The tiled kernels of :mod:`rotorq.cuda.tiled` under Numba's simulator against the CPU twins.

Tiny shapes and blocks (2–16 threads: tiles of 1–3 rows) launched on 2 blocks over more tiles
than blocks, with a partial last tile, so that the grid-stride loop, the prefetch of the next
tile, padded rows (d < D) and every WHT phase layout (one phase for D = 16, a strided second
phase for D = 32, 128, 256, a third for D = 512) run.
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

tiled = importlib.import_module("rotorq.cuda.tiled")
CPU_WHT = importlib.import_module("rotorq.cpu.wht")

pytestmark = pytest.mark.cudasim


@pytest.mark.parametrize("half_in,half_out", ((True, True), (True, False), (False, False),
                                              (False, True)))
@pytest.mark.parametrize("big_d,threads", ((16, 3), (32, 4), (128, 16), (256, 32), (512, 64)))
def test_tiled_wht_matches_cpu(big_d, threads, half_in, half_out):
    """Bit-identical to the CPU's WHT (fp16 output: the CPU's float32 result rounded once)."""
    rng = np.random.default_rng(big_d + 2 * half_in + half_out)
    n = 7
    x = rng.standard_normal((n, big_d)).astype(np.float16 if half_in else np.float32)
    ref = np.empty((n, big_d), np.float32)
    CPU_WHT.wht(x.astype(np.float32), ref)
    out = np.full((n, big_d // 2) if half_out else (n, big_d), 0xFFFF,
                  np.uint32 if half_out else np.float32)
    kern = tiled.wht_kernel(big_d, half_in, half_out, threads=threads)
    assert kern.rows_per_tile * 2 < n  # more tiles than blocks, partial last tile
    kern[2, threads]((x.view(np.uint32) if half_in else x).reshape(-1), out.reshape(-1))
    got = out.view(np.float16).astype(np.float32) if half_out else out
    expected = ref.astype(np.float16).astype(np.float32) if half_out else ref
    np.testing.assert_array_equal(got, expected)


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
    assert tiled._Gen(1 << (d - 1).bit_length(), threads, half, d, vec=True).A == 8
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
    kern = tiled.quantize_kernel(d, tq.stored_dim, bits, half, norm_correction, word_out,
                                 threads=threads)
    signs = np.ascontiguousarray(tq.rotation.params(np)["signs"], np.float32)
    kern[2, threads]((x.view(np.uint32) if half else x).reshape(-1), signs, tq.boundaries,
                     tq.centroids, codes.reshape(-1), norms)
    np.testing.assert_array_equal(codes.view(np.uint8).reshape(n, -1), codes_ref)
    np.testing.assert_allclose(norms, norms_ref, rtol=1e-6)
    assert norms[3] == 0


@pytest.mark.parametrize("paired", (True, False))
def test_shared_layout_is_conflict_free(paired):
    """For the benchmark shape (D = 128, 256 threads) the chosen layouts make every warp access
    to shared memory one wavefront: float tile (16 first-phase, 16 second-phase, 16 store-pass
    accesses), fp16 word tile (8 staging stores, 8 first-phase loads), fp16 output tile."""
    gen = tiled._Gen(128, tiled.THREADS, True, 128)
    tiled._strides(gen, paired)
    assert tiled._cost(128, tiled.THREADS, (gen.S, gen.SH), paired) == 48
    assert tiled._cost(128, tiled.THREADS, (gen.SW, gen.SHW), False, 64, True) == 16
    out = tiled._pick_layout(64, lambda lay: tiled._out_cost(gen, lay, paired))
    assert tiled._out_cost(gen, out, paired) == (16 if paired else 8)
    src = tiled.wht_kernel(128, True, True).rotorq_source
    assert f"r = tid % U64({gen.R})" in src and f"rw = r * U64({gen.SW})" in src


@pytest.mark.parametrize("bits", (1, 2, 3))
def test_register_decision_matches_cpu_count(bits):
    """The register bisection of the quantize kernel gives the CPU's code (the number of
    boundaries ``<= y``) for every ``y``, values exactly on a boundary, ±0 and NaN included."""
    cpu_q = importlib.import_module("rotorq.cpu.quantize")
    tq = rotorq.TurboQuant(32, bits, rotation="hadamard", norm_dtype="float32")
    bd = np.asarray(tq.boundaries, np.float32)
    src = "\n".join(["def decide(y, bd):"]
                    + [f"    bd{i} = bd[{i}]" for i in range(bd.shape[0])]
                    + ["    " + line for line in tiled._reg_decide("y", "c", bits)] + ["    return c"])
    env = {"U32": np.uint32}
    exec(src, env)
    ys = np.concatenate([bd, np.nextafter(bd, np.float32(-np.inf)), np.nextafter(bd, np.float32(np.inf)),
                         np.float32([0.0, -0.0, np.nan, np.inf, -np.inf, 1.0, -1.0]),
                         np.random.default_rng(bits).standard_normal(200).astype(np.float32) * 0.3])
    for y in ys.astype(np.float32):
        assert env["decide"](y, bd) == cpu_q.encode_value(y, bd), y


@pytest.mark.parametrize("bits", (2, 3, 4))
@pytest.mark.parametrize("codebook", ("gaussian", "beta"))
def test_symmetric_decision_matches_cpu_count(bits, codebook):
    """The sign-and-magnitude decision of fp16 rows gives the CPU's code (the number of
    boundaries ``<= y``) for every ``y`` but ``-y`` exactly on a boundary (one code lower
    there: the documented rounding flips), ±0 included; it relies on every codebook being
    symmetric about an exact 0, which this checks too."""
    cpu_q = importlib.import_module("rotorq.cpu.quantize")
    tq = rotorq.TurboQuant(32, bits, rotation="hadamard", norm_dtype="float32",
                           codebook=codebook)
    bd = np.asarray(tq.boundaries, np.float32)
    mid = bd.shape[0] // 2
    assert bd[mid] == 0 and np.array_equal(bd, -bd[::-1])
    pos = tiled._reg_boundaries(bits, "sym")
    assert pos == list(range(mid + 1, bd.shape[0]))
    src = "\n".join(["def decide(y, bd):"]
                    + [f"    bd{i} = bd[{j}]" for i, j in enumerate(pos)]
                    + ["    " + line for line in tiled._sym_decide("y", "c", bits)]
                    + ["    bits = " + " | ".join(f"(U32(c_{lv}) << U32({lv}))"
                                                   for lv in range(bits)),
                       "    assert bits == c", "    return c"])
    env = {"U32": np.uint32, "np": np}
    exec(src, env)
    ys = np.concatenate([bd, np.nextafter(bd, np.float32(-np.inf)),
                         np.nextafter(bd, np.float32(np.inf)),
                         np.float32([0.0, -0.0, np.inf, -np.inf, 1.0, -1.0]),
                         np.random.default_rng(bits).standard_normal(400).astype(np.float32)
                         * 0.3])
    for y in ys.astype(np.float32):
        want = cpu_q.encode_value(y, bd)
        tie = y < 0 and np.any(bd == -y)
        assert env["decide"](y, bd) == want - tie, y


def test_quantize_lane_layout_is_conflict_free():
    """Benchmark shape (D = 128, 256 threads, fp16): with lanes of 8 rows × 4 parts and the
    unpadded rows of ``_vec_strides``, every shared access of the quantize kernel's first warp
    takes the minimum wavefronts (one per 128 bytes): 16-byte first-phase stores / decision
    loads and fp16 word loads, 8-byte paired second-phase accesses, 4-byte staging stores."""
    gen = tiled._Gen(128, tiled.THREADS, True, 128, vec=True)
    tiled._vec_strides(gen)
    assert (gen.A, gen.B) == (8, 4)

    def rp(t):  # the kernel's (row, part) of thread t
        return (t % 8) | (((t >> 5) & (gen.R // 8 - 1)) << 3), ((t >> 3) & 3) | (t // (4 * gen.R) << 2)

    def wavefronts(words, width):  # lanes in groups of 128 bytes; words: first word per lane
        total = 0
        for g in range(0, 32, 32 // width):
            banks: dict = {}
            for a in words[g:g + 32 // width]:
                assert a % width == 0  # aligned vector access
                for k in range(width):
                    banks.setdefault((a + k) % 32, set()).add(a + k)
            total += max(len(v) for v in banks.values())
        return total

    lanes = range(32)
    for k in range(0, 16, 4):  # first phase / decision: 16 consecutive floats
        assert wavefronts([rp(t)[0] * gen.S + 16 * rp(t)[1] + k for t in lanes], 4) == 4
    for k in range(0, 8, 4):  # first phase: 8 consecutive fp16 words
        assert wavefronts([rp(t)[0] * gen.SW + 8 * rp(t)[1] + k for t in lanes], 4) == 4
    for k in range(8):  # second phase, paired groups 2p, 2p + 1: coordinates 2p + 16k, + 1
        assert wavefronts([rp(t)[0] * gen.S + 2 * rp(t)[1] + 16 * k for t in lanes], 2) == 2
    for i in range(8):  # staging stores: consecutive words of the tile
        assert wavefronts([(t + 256 * i) // 64 * gen.SW + (t + 256 * i) % 64 for t in lanes], 1) == 1


@pytest.mark.parametrize("d,bits,rows,n", ((128, 3, 4, 9), (16, 3, 4, 11), (40, 2, 4, 10),
                                           (22, 4, 4, 9), (30, 4, 8, 19), (128, 1, 4, 9),
                                           (64, 2, 4, 13)))
@pytest.mark.parametrize("half", (True, False))
@pytest.mark.parametrize("norm_correction", (False, True))
def test_tiled_rotor_quantize_matches_cpu(d, bits, rows, n, half, norm_correction):
    """The tiled rotor quantize gives the CPU's packed codes and norms: a last part with fewer
    groups (d = 128, 40), padding coordinates (d % 3 != 0), every bit width, the heap decision
    (4 bits), a zero row, over more tiles than blocks with a partial last tile."""
    trotor = importlib.import_module("rotorq.cuda.tiled_rotor")
    tq, x, codes_ref, norms_ref = _cpu_case("rotor", d, bits, half, norm_correction, n,
                                            d * 10 + bits + 100 * half)
    kern = trotor.quantize_kernel(d, bits, half, norm_correction, rows=rows)
    assert kern.rows_per_tile * 2 < n and n % rows  # more tiles than blocks, partial last tile
    whole = np.full((trotor.padded_rows(n, rows), codes_ref.shape[1]), 0xAB, np.uint8)
    norms = np.full(n, np.nan, np.float32)
    mats = np.ascontiguousarray(tq.rotation.params(np)["mats"], np.float32).reshape(-1)
    kern[2, kern.threads]((x.view(np.uint32) if half else x).reshape(-1), mats, tq.boundaries,
                          tq.centroids, whole.reshape(-1).view(np.uint32), norms)
    np.testing.assert_array_equal(whole[:n], codes_ref)
    assert (whole[n:] != 0xAB).all()  # whole tiles written
    np.testing.assert_allclose(norms, norms_ref, rtol=1e-6)
    assert norms[3] == 0
