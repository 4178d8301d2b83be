"""The generated tiled score kernels (:mod:`rotorq.cuda.gen.scores_one`,
:mod:`rotorq.cuda.gen.scores_group`) under Numba's simulator against the CPU twin
(:func:`rotorq.cpu.scores.scores_mse`).

Tiny shapes: 37 keys in tiles of 4 (one query) or 16–32 keys (query groups) on 2 blocks, so
that the grid-stride loop over tiles, the prefetch of the next tile, the partial last tile,
the loop over output batches (3 batches on 2 blocks, two sharing one key batch) and, for more
than 8 query rows, a second chunk of rows all run. One query: float32 tables at 2 and 4 bits
(2e-5 relative tolerance), float16 tables at 3 bits; query groups:
fp16 tensor-core inputs; float16 paths err at most 1e-3 of the largest score (measured ~3e-4).
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

sct = importlib.import_module("rotorq.cuda.gen.score_tiles")
scores_one = importlib.import_module("rotorq.cuda.gen.scores_one")
scores_group = importlib.import_module("rotorq.cuda.gen.scores_group")
CPU_SCORES = importlib.import_module("rotorq.cpu.scores")

pytestmark = pytest.mark.cudasim
N_KEYS = 37


def _case(stored_dim, bits, n_m, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    rotation = "hadamard" if stored_dim & (stored_dim - 1) == 0 else "dense"  # stored dimension stored_dim
    tq = rotorq.TurboQuant(stored_dim, bits, rotation=rotation, norm_dtype="float32")
    keys = tq.quantize(rng.standard_normal((2, N_KEYS, stored_dim)).astype(np.float32))
    q = (rng.standard_normal((3, n_m, stored_dim)) * scale).astype(np.float32)
    qrot = np.asarray(tq.rotate(q)).reshape(3, n_m, stored_dim).astype(np.float32)
    qmap = np.array([0, 1, 2], np.int64)
    kmap = np.array([0, 1, 1], np.int64)
    codes = np.ascontiguousarray(np.asarray(keys.codes).reshape(2, N_KEYS, -1))
    norms = np.asarray(keys.norms).reshape(2, N_KEYS).astype(np.float32)
    expected = np.empty((3, n_m, N_KEYS), np.float32)
    CPU_SCORES.scores_mse(qrot, qmap, codes, norms, kmap, tq.centroids, bits, expected)
    out = np.full((3, n_m, N_KEYS), np.nan, np.float32)
    args = (qrot, qmap, codes.view(np.uint32).reshape(-1), norms, kmap, tq.centroids, out)
    return args, expected


@pytest.mark.parametrize("stored_dim,bits", ((32, 3), (64, 2), (32, 4), (64, 4), (128, 3), (128, 4),
                                         (96, 2)))
def test_one_query_matches_cpu(stored_dim, bits):
    """Pair tables (2 bits: float32, 3 bits: float16), triple tables (2 bits at D = 96:
    float16), single-coordinate float32 tables (4 bits)."""
    threads = 4
    args, expected = _case(stored_dim, bits, 1, stored_dim + bits)
    kern = scores_one.kernel(stored_dim, bits, threads)
    plan = {2: (3, True) if stored_dim % 3 == 0 else (2, False), 3: (2, True), 4: (1, False)}[bits]
    assert (kern.table_group, kern.table_half) == sct.table_plan(stored_dim, bits) == plan
    assert -(-N_KEYS // kern.keys_per_tile) > 2  # more tiles than blocks
    kern[(2, 2), threads](*args)
    out = args[-1]
    err = np.abs(out - expected).max() / np.abs(expected).max()
    assert err < sct.tolerance(stored_dim, bits, 1), err
    if plan[1]:
        assert err > 1e-6  # float16 entries really were used
    else:
        np.testing.assert_allclose(out, expected, rtol=2e-5, atol=2e-5 * np.abs(expected).max())


@pytest.mark.parametrize("stored_dim,bits,threads", ((64, 2, 16), (64, 4, 32), (64, 3, 64)))
def test_one_query_column_table_build(stored_dim, bits, threads):
    """Blocks a multiple of the table width build it by columns (each thread one column's
    centroids, for every ``threads / width``-th group): same scores as the CPU."""
    args, expected = _case(stored_dim, bits, 1, 3 * stored_dim + bits)
    kern = scores_one.kernel(stored_dim, bits, threads)
    assert "col = tid &" in kern.source
    kern[(2, 2), threads](*args)
    out = args[-1]
    err = np.abs(out - expected).max() / np.abs(expected).max()
    assert err < sct.tolerance(stored_dim, bits, 1), err


@pytest.mark.parametrize("scale", (1e-6, 1e4))
def test_one_query_half_table_scaling(scale):
    """Float16 tables hold the query scaled by 1/max|q|: tiny and large queries keep the same
    relative error (no float16 subnormals or overflow); a zero query scores 0; 5 threads (the
    max|q| reduction over a block that is not a multiple of 32 wide)."""
    args, expected = _case(64, 3, 1, 5, scale)
    args[0][1] = 0
    expected[1] = 0
    kern = scores_one.kernel(64, 3, 5)
    assert kern.table_half
    kern[(2, 2), 5](*args)
    out = args[-1]
    err = np.abs(out - expected).max() / np.abs(expected).max()
    assert err < 1e-3, err
    assert (out[1] == 0).all()


def test_one_query_plans_agree():
    """Every table plan of one shape scores the same keys (float32 ones within 2e-5)."""
    args, expected = _case(64, 2, 1, 11)
    for plan in ((4, False), (2, False), (1, False), (2, True)):
        out = args[-1]
        out[:] = np.nan
        scores_one.kernel(64, 2, 4, plan)[(2, 2), 4](*args)
        err = np.abs(out - expected).max() / np.abs(expected).max()
        assert err < (1e-3 if plan[1] else 2e-5), (plan, err)


@pytest.mark.parametrize("stored_dim,bits,n_m,steps", ((32, 4, 3, 1), (64, 2, 8, 2), (64, 4, 2, 1),
                                                  (128, 3, 8, 1), (64, 2, 11, 1)))
def test_group_matches_cpu(stored_dim, bits, n_m, steps):
    """Tensor-core kernel (MMA emulated): 2–11 rows (11: two row chunks), 1 warp."""
    args, expected = _case(stored_dim, bits, n_m, 7 * stored_dim + n_m)
    kern = scores_group.kernel(stored_dim, bits, warps=1, steps=steps)
    kern[(2, 2, -(-n_m // sct.MAX_ROWS)), 32](*args)
    out = args[-1]
    err = np.abs(out - expected).max() / np.abs(expected).max()
    assert err < 1e-3, err


@pytest.mark.parametrize("which", ("one", "group"))
def test_first_tile_order_gives_same_scores(which):
    """The first tile's loads before (``early``) or after the table / query staging: the
    same scores, bit for bit."""
    m = 1 if which == "one" else 3
    args, _ = _case(64, 2, m, 13)
    out = {}
    for early in (True, False):
        if which == "one":
            kern = scores_one.kernel(64, 2, 16, early=early)
            kern[(2, 2), 16](*args)
        else:
            kern = scores_group.kernel(64, 2, warps=1, steps=1, early=early)
            kern[(2, 2, 1), 32](*args)
        out[early] = args[-1].copy()
    np.testing.assert_array_equal(out[True], out[False])


@pytest.mark.parametrize("scale", (1e-6, 1e4))
def test_group_query_scaling(scale):
    """Rows are scaled by 1/max|q| before fp16 rounding: tiny and large queries keep the
    same relative error (no fp16 subnormals or overflow); a zero row scores 0."""
    args, expected = _case(64, 4, 4, 3, scale)
    args[0][1, 2] = 0
    expected[1, 2] = 0
    kern = scores_group.kernel(64, 4, warps=1, steps=1)
    kern[(2, 2, 1), 32](*args)
    out = args[-1]
    err = np.abs(out - expected).max() / np.abs(expected).max()
    assert err < 1e-3, err
    assert (out[1, 2] == 0).all()
