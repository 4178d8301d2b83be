import numpy as np
import pytest

import rotorq
from helpers import unit_vectors
from rotorq import reference


def test_parity_with_reference(rng):
    d, m = 50, 100
    qjl = rotorq.QJL(d, m, seed=int(rng.integers(1 << 30)))
    k = rng.standard_normal((200, d)) * 3
    q = rng.standard_normal((4, d))
    qv = qjl.quantize(k)
    signs, norms = reference.qjl_quantize(qjl, k)
    got = reference.unpack_bits(qv.qjl_signs, 1, m).astype(bool)
    assert np.mean(got != signs) < 2e-3
    np.testing.assert_allclose(qv.norms.astype(np.float64), norms, rtol=1e-3)
    expected = reference.qjl_scores(qjl, q, got, qv.norms.astype(np.float64))
    np.testing.assert_allclose(qjl.scores(q, qv), expected, rtol=1e-4, atol=1e-4)
    assert qv.nbytes == 200 * (m // 8 + (m % 8 > 0) + 2)


@pytest.mark.slow
@pytest.mark.parametrize("orthogonal", [False, True])
def test_unbiased_over_sketches(rng, orthogonal):
    # Unbiased over the draw of S: average per-seed mean errors over many seeds.
    d, pairs, seeds = 128, 100, 200
    x = unit_vectors(rng, pairs, d)
    q = x + rng.standard_normal((pairs, d)) * np.sqrt(3.0 / d)  # correlated: <q, x> ≈ 0.5
    true = np.sum(q * x, axis=1)
    first = int(rng.integers(1 << 30))
    means = []
    for seed in range(first, first + seeds):
        qjl = rotorq.QJL(d, d, seed=seed, orthogonal=orthogonal)
        est = qjl.scores(q[:, None, :], qjl.quantize(x[:, None, :]))[:, 0, 0]
        means.append(np.mean(est - true))
    means = np.array(means)
    assert abs(means.mean()) < 5 * means.std() / np.sqrt(seeds)


def test_orthogonal_sketch_unbiased_at_small_dim(rng):
    # Rows of norm √d would overestimate by ≈ 1 + 1/(4d) (3.2% at d = 8, > 10σ here); the
    # rescaled rows of orthogonal_row_norm are exact.
    d, pairs, seeds = 8, 50, 200
    x = unit_vectors(rng, pairs, d)
    q = x + rng.standard_normal((pairs, d)) * 0.3
    true = np.sum(q * x, axis=1)
    first = int(rng.integers(1 << 30))
    ratios = []
    for seed in range(first, first + seeds):
        qjl = rotorq.QJL(d, d, seed=seed, orthogonal=True, norm_dtype="float32")
        est = qjl.scores(q[:, None, :], qjl.quantize(x[:, None, :]))[:, 0, 0]
        ratios.append(np.sum(est) / np.sum(true))
    ratios = np.array(ratios)
    assert abs(ratios.mean() - 1) < 4 * ratios.std() / np.sqrt(seeds)
    assert abs(ratios.mean() - 1) < 0.01


@pytest.mark.slow
def test_error_matches_published_and_variance_bound(rng):
    n, d = 20000, 128
    x, q = unit_vectors(rng, n, d), unit_vectors(rng, n, d)
    qjl = rotorq.QJL(d, d, seed=int(rng.integers(1 << 30)), orthogonal=False)
    err = qjl.scores(q[:, None, :], qjl.quantize(x[:, None, :]))[:, 0, 0] - np.sum(q * x, axis=1)
    # docs/math.md §3 table, b = 1 Prod row (pure QJL, m = d): error × d = 1.534 on random pairs,
    # below the bound (π/2)‖q‖²‖k‖²/m of §4.
    assert np.mean(err ** 2) * d == pytest.approx(1.534, rel=0.08)
    # The bound holds in expectation over S; one draw of S fluctuates by a few percent.
    assert np.mean(err ** 2) <= np.pi / 2 / d * 1.05


def test_orthogonal_sketch_lowers_error(rng):
    n, d, m = 4000, 64, 64
    x, q = unit_vectors(rng, n, d), unit_vectors(rng, n, d)
    true = np.sum(q * x, axis=1)
    errs = {}
    for orth in (False, True):
        qjl = rotorq.QJL(d, m, seed=int(rng.integers(1 << 30)), orthogonal=orth)
        est = qjl.scores(q[:, None, :], qjl.quantize(x[:, None, :]))[:, 0, 0]
        errs[orth] = np.mean((est - true) ** 2)
    assert errs[True] < errs[False]


def test_gqa_broadcast(rng):
    qjl = rotorq.QJL(64, 128)
    keys = qjl.quantize(rng.standard_normal((2, 1, 30, 64)))   # 2 KV heads
    q = rng.standard_normal((2, 4, 3, 64))                       # 4 query heads per KV head
    s = qjl.scores(q, keys)
    assert s.shape == (2, 4, 3, 30)
    np.testing.assert_allclose(s[1, 2], qjl.scores(q[1, 2], keys[1, 0]), rtol=1e-5, atol=1e-5)


def test_bad_input(rng):
    with pytest.raises(ValueError, match="sketch_dim"):
        rotorq.QJL(64, 0)
    qjl = rotorq.QJL(16, 32)
    with pytest.raises(ValueError, match="last dimension of 16"):
        qjl.quantize(np.ones((3, 17)))
    with pytest.raises(ValueError, match="NaN"):
        qjl.quantize(np.full((2, 16), np.nan))
    codes = qjl.quantize(rng.standard_normal((5, 16)))
    with pytest.raises(ValueError, match="different quantizer"):
        rotorq.QJL(16, 32, seed=3).scores(np.ones((1, 16)), codes)
    with pytest.raises(ValueError, match="at least 1"):
        qjl.scores(np.float64(1.0), codes)
    with pytest.raises(ValueError, match="codes must have shape"):
        qjl.scores(np.ones(16), codes[0])
    with pytest.raises(ValueError, match="queries contains NaN"):
        qjl.scores(np.full(16, np.nan), codes)
