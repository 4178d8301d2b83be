"""The unrolled one-key-per-thread score kernel (:mod:`rotorq.cuda.gen.scores_rows`) under
Numba's simulator against the CPU twin.

Tiny shapes (D = 32, two blocks of 4 threads striding over the keys) so that the grid-stride
loop, the clamped second key of a thread and partial query chunks all run.
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

scores_rows = importlib.import_module("rotorq.cuda.gen.scores_rows")

pytestmark = pytest.mark.cudasim


@pytest.mark.parametrize("bits", (1, 2, 3, 4))
@pytest.mark.parametrize("n_m", (1, 3, 8))
def test_scores_match_cpu(rng, bits, n_m):
    """1–4 bits (1 bit: a shape the tiled kernels do not take), 1, 3 (a partial chunk of 4)
    and 8 query rows."""
    stored_dim, n_keys = 32, 13
    tq = rotorq.TurboQuant(stored_dim, bits, norm_dtype="float32")
    keys = tq.quantize(rng.standard_normal((2, n_keys, stored_dim)).astype(np.float32))
    q = rng.standard_normal((3, n_m, stored_dim)).astype(np.float32)
    qrot = np.asarray(tq.rotate(q)).reshape(3, n_m, stored_dim).astype(np.float32)
    qmap = np.array([0, 1, 2], np.int64)
    kmap = np.array([0, 1, 1], np.int64)
    codes = np.asarray(keys.codes).reshape(2, n_keys, -1)
    norms = np.asarray(keys.norms).reshape(2, n_keys).astype(np.float32)
    ref = importlib.import_module("rotorq.cpu.scores")
    expected = np.empty((3, n_m, n_keys), np.float32)
    ref.scores_mse(qrot, qmap, codes, norms, kmap, tq.centroids, bits, expected)
    queries = scores_rows.score_queries(stored_dim, bits, n_m)
    kern = scores_rows.kernel(stored_dim, bits, queries)
    out = np.full((3, n_m, n_keys), np.nan, np.float32)
    kern[(2, 2, -(-n_m // queries)), 4](qrot, qmap, codes.view(np.uint32), norms, kmap,
                                        tq.centroids, out)
    np.testing.assert_allclose(out, expected, rtol=2e-5, atol=2e-5 * np.abs(expected).max())


def test_score_queries_picks_chunks():
    """Query rows per pass: one query needs its table within the shared budget, more rows go
    in powers of two up to 8; dimensions not a multiple of 32 or past the unroll limit: 0."""
    assert scores_rows.score_queries(128, 3, 1) == 1
    assert [scores_rows.score_queries(64, 3, m) for m in (2, 3, 5, 8, 11)] == [2, 4, 8, 8, 8]
    assert scores_rows.score_queries(96, 3, 1) == 1
    assert scores_rows.score_queries(48, 3, 1) == 0
    assert scores_rows.score_queries(544, 2, 4) == 0
    assert scores_rows.score_queries(128, 5, 1) == 0
