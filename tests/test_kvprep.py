"""rotorq.kv.prep: exactness of the key transforms, optimality of the scales, bit budgets."""

import itertools

import numpy as np
import pytest

import rotorq
from rotorq.kv.prep import KeyPrep, allocate_bits, channel_scales, kv_bits_per_coordinate, rope, unrope


def softmax(s):
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    return p / p.sum(-1, keepdims=True)


def rope_complex(x, positions, base):
    """Independent RoPE: channel pair (i, i+d/2) as the complex number x_i + j·x_{i+d/2}."""
    d = x.shape[-1]
    h = d // 2
    theta = base ** (-np.arange(h) * 2.0 / d)
    z = (x[..., :h] + 1j * x[..., h:]) * np.exp(1j * np.outer(positions, theta))
    return np.concatenate([z.real, z.imag], axis=-1)


def rope_keys(rng, heads, t, d, base, offset=4.0, outlier=6.0):
    """Post-RoPE keys whose pre-RoPE form is a per-head offset + anisotropic noise."""
    pos = np.arange(t)
    scale = np.ones(d)
    scale[rng.choice(d, 3, replace=False)] = outlier
    pre = rng.standard_normal((heads, t, d)) * scale + offset * rng.standard_normal((heads, 1, d))
    return rope(pre, pos, base), pos


# -- RoPE -------------------------------------------------------------------------------
def test_rope_matches_complex_rotation_and_inverts(rng):
    d, t, base = 16, 40, float(rng.uniform(100, 1e5))
    x = rng.standard_normal((3, t, d))
    pos = rng.integers(0, 5000, t)
    y = rope(x, pos, base)
    np.testing.assert_allclose(y, rope_complex(x, pos, base), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(unrope(y, pos, base), x, rtol=1e-10, atol=1e-10)


def test_rope_scores_depend_on_relative_position_only(rng):
    d, base = 32, 1e4
    q, k = rng.standard_normal((2, 1, d))
    shift = int(rng.integers(1, 1000))
    a = rope(q, [7], base) @ rope(k, [3], base).T
    b = rope(q, [7 + shift], base) @ rope(k, [3 + shift], base).T
    np.testing.assert_allclose(a, b, rtol=1e-9)


def test_rope_rejects_bad_shapes(rng):
    with pytest.raises(ValueError, match="even"):
        rope(rng.standard_normal((2, 3, 5)), np.arange(3))
    with pytest.raises(ValueError, match="positions"):
        rope(rng.standard_normal((2, 3, 4)), np.arange(4))


# -- key offset -------------------------------------------------------------------------
def test_post_rope_mean_leaves_softmax_unchanged(rng):
    heads, group, t, d = 2, 3, 60, 32
    k = rng.standard_normal((heads, t, d)) * 3 + rng.standard_normal((heads, 1, d)) * 10
    q = rng.standard_normal((heads * group, 5, d))
    prep = KeyPrep.fit(k)                                  # post-RoPE mean, no scales
    pos = np.arange(t)
    kp = prep.keys(k, pos)
    np.testing.assert_allclose(kp.mean(axis=1), 0, atol=1e-5)  # μ is stored in float32
    bias = prep.score_bias(q, pos)
    np.testing.assert_allclose(bias, bias[..., :1].repeat(t, -1), rtol=1e-10)  # per query
    exact = softmax(q @ np.repeat(k, group, 0).swapaxes(1, 2))
    shifted = softmax(prep.queries(q) @ np.repeat(kp, group, 0).swapaxes(1, 2))
    np.testing.assert_allclose(shifted, exact, rtol=1e-9, atol=1e-12)
    # and the raw scores do differ (the mean is not a no-op)
    assert np.abs(q @ np.repeat(k - kp, group, 0).swapaxes(1, 2)).max() > 1.0


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_rope_mean_and_scales_are_exact(rng, alpha):
    heads, group, d, base = 3, 3, 64, 1e5
    k, _ = rope_keys(rng, heads, 80, d, base)
    q = rng.standard_normal((heads * group, 80, d))
    prep = KeyPrep.fit(k, q, rope_base=base, alpha=alpha)
    later = np.arange(80, 120)                          # new tokens after calibration
    k2 = rope(unrope(rng.standard_normal((heads, 40, d)), later, base) + 1.0, later, base)
    kp = prep.keys(k2, later)
    np.testing.assert_allclose(prep.restore(kp, later), k2, rtol=1e-5, atol=1e-5)
    exact = q @ np.repeat(k2, group, 0).swapaxes(1, 2)
    rebuilt = prep.queries(q) @ np.repeat(kp, group, 0).swapaxes(1, 2) \
        + prep.score_bias(q, later)
    np.testing.assert_allclose(rebuilt, exact, rtol=1e-5, atol=1e-4 * np.abs(exact).max())
    if alpha == 0.0:
        np.testing.assert_array_equal(prep.scales, 1.0)


def test_rope_mean_removes_the_offset_that_a_post_rope_mean_misses(rng):
    heads, t, d, base = 2, 512, 64, 1e4
    k, pos = rope_keys(rng, heads, t, d, base, offset=8.0, outlier=1.0)
    energy = (k ** 2).sum()
    post = (KeyPrep.fit(k).keys(k, pos) ** 2).sum() / energy
    pre = (KeyPrep.fit(k, rope_base=base).keys(k, pos) ** 2).sum() / energy
    # The noise is ~1/65 of the energy: the RoPE-aware mean leaves only it; the post-RoPE
    # mean cannot follow the rotating offset of the high-frequency pairs.
    assert pre < 0.03
    assert post > 5 * pre


def test_keyprep_validates_parameters(rng):
    with pytest.raises(ValueError, match="shape"):
        KeyPrep(2, 8, scales=np.ones((3, 8)))
    with pytest.raises(ValueError, match="positive"):
        KeyPrep(1, 4, scales=np.array([[1.0, -1.0, 1.0, 1.0]]))
    prep = KeyPrep(2, 8)
    with pytest.raises(ValueError, match="keys"):
        prep.keys(rng.standard_normal((3, 4, 8)), np.arange(4))
    with pytest.raises(ValueError, match="multiple"):
        prep.queries(rng.standard_normal((3, 4, 8)))


def test_keyprep_on_torch_matches_numpy(rng):
    torch = pytest.importorskip("torch")
    heads, d, base = 2, 16, 1e4
    k, pos = rope_keys(rng, heads, 30, d, base)
    q = rng.standard_normal((4, 30, d))
    prep = KeyPrep.fit(k, q, rope_base=base)
    kt = torch.tensor(k, dtype=torch.float32)
    out = prep.keys(kt, pos)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), prep.keys(k, pos), rtol=1e-4, atol=1e-4)
    qt = torch.tensor(q, dtype=torch.float32)
    np.testing.assert_allclose(prep.score_bias(qt, pos).numpy(), prep.score_bias(q, pos),
                               rtol=1e-4, atol=1e-3)


# -- channel scales ---------------------------------------------------------------------
def test_channel_scales_reach_the_cauchy_schwarz_minimum(rng):
    d = 64
    sk = np.exp(rng.normal(0, 1, d))
    sq = np.exp(rng.normal(0, 1, d))

    def cost(s):
        return ((s * sk) ** 2).sum() * ((sq / s) ** 2).sum()

    s = channel_scales(sk, sq).astype(np.float64)
    np.testing.assert_allclose(np.exp(np.log(s).mean()), 1.0, rtol=1e-6)
    np.testing.assert_allclose(cost(s), (sk * sq).sum() ** 2, rtol=1e-5)
    for _ in range(20):  # any other scaling is worse
        assert cost(s * np.exp(rng.normal(0, 0.05, d))) > cost(s)
    assert cost(channel_scales(sk, sq, alpha=1.0)) > cost(s)
    assert cost(np.ones(d)) >= cost(s)


def test_channel_scales_tied_pairs(rng):
    sk, sq = np.exp(rng.normal(0, 1, (3, 32))), np.exp(rng.normal(0, 1, (3, 32)))
    s = channel_scales(sk, sq, tie_rope_pairs=True)
    np.testing.assert_array_equal(s[:, :16], s[:, 16:])
    # tied scales commute with RoPE
    x = rng.standard_normal((3, 5, 32))
    pos = np.arange(5)
    np.testing.assert_allclose(rope(x * s[:, None], pos), rope(x, pos) * s[:, None], rtol=1e-6)


def test_keyprep_cuts_turboquant_score_error(rng):
    """Real-key-like data (a large offset before RoPE, outlier channels, queries that weight
    other channels): the prepared 3-bit keys give far smaller score and attention errors,
    and the RoPE-aware offset beats a post-RoPE mean on the same data."""
    heads, group, t, d, base = 2, 3, 512, 64, 1e5
    k, pos = rope_keys(rng, heads, t, d, base, offset=3.0, outlier=8.0)
    qw = np.exp(rng.normal(0, 0.7, d))
    q = rng.standard_normal((heads * group, t, d)) * qw * 0.4
    tq = rotorq.TurboQuant(d, 3, seed=int(rng.integers(1 << 30)))
    exact = q @ np.repeat(k, group, 0).swapaxes(1, 2) / 8

    def errors(prep):
        """(relative score RMSE, mean total-variation distance of the softmax rows)."""
        kp = prep.keys(k, pos).astype(np.float32)
        kq = np.repeat(tq.dequantize(tq.quantize(kp)), group, 0)
        s = (prep.queries(q) @ kq.swapaxes(1, 2) + prep.score_bias(q, pos)) / 8
        tv = np.abs(softmax(s) - softmax(exact)).sum(-1).mean()
        return np.sqrt(((s - exact) ** 2).mean() / exact.var()), tv

    fit = dict(positions=pos[:128])
    s_plain, p_plain = errors(KeyPrep(heads, d))
    s_rope, p_rope = errors(KeyPrep.fit(k[:, :128], q[:, :128], rope_base=base, **fit))
    s_post, p_post = errors(KeyPrep.fit(k[:, :128], q[:, :128], **fit))
    # measured over 200 draws: rope/plain ≤ 0.44 (scores) and ≤ 0.53 (softmax), typically
    # 0.31 and 0.33; rope/post ≤ 0.67 and ≤ 0.74, typically 0.52 and 0.54
    assert s_rope < 0.55 * s_plain
    assert p_rope < 0.65 * p_plain
    assert s_rope < 0.8 * s_post
    assert p_rope < 0.85 * p_post


# -- bit allocation ---------------------------------------------------------------------
@pytest.mark.parametrize("trial", range(4))
def test_allocate_bits_is_optimal_for_its_model(rng, trial):
    n = 5
    sens = np.exp(rng.normal(0, 2, n))
    budget = float(rng.choice([2.2, 2.6, 3.0, 3.4]))
    got = allocate_bits(sens, budget, (2, 3, 4))
    assert got.mean() <= budget + 1e-9

    def loss(b):
        return float((sens * 4.0 ** -(np.asarray(b) - 2)).sum())

    best = min(loss(b) for b in itertools.product((2, 3, 4), repeat=n)
               if np.mean(b) <= budget + 1e-9)
    assert loss(got) == pytest.approx(best, rel=1e-12)


def test_allocate_bits_weights_and_limits(rng):
    sens = np.array([1.0, 1.0])
    # unit 1 holds 3× the coordinates: with room for one upgrade, the cheap one is taken
    np.testing.assert_array_equal(allocate_bits(sens, 2.25, (2, 3), weights=[1, 3]), [3, 2])
    np.testing.assert_array_equal(allocate_bits(sens, 9.0, (2, 3, 4)), [4, 4])
    with pytest.raises(ValueError, match="consecutive"):
        allocate_bits(sens, 3.0, (2, 4))
    with pytest.raises(ValueError, match="below"):
        allocate_bits(sens, 1.5, (2, 3))


# -- storage accounting -----------------------------------------------------------------
@pytest.mark.parametrize("mode,bits", [("mse", 2), ("mse", 3), ("mse", 4), ("prod", 3)])
def test_bits_per_coordinate_matches_turboquant_storage(rng, mode, bits):
    t, d = 96, 64
    tq = rotorq.TurboQuant(d, bits, mode=mode)
    stored = tq.quantize(rng.standard_normal((t, d)).astype(np.float32)).bits_per_coordinate
    norms = 2 if mode == "prod" else 1
    assert kv_bits_per_coordinate(t, d, bits, bits, key_norms=norms,
                                  value_norms=norms) == pytest.approx(stored)


def test_bits_per_coordinate_counts_full_tokens_and_side_info():
    t, d = 512, 64
    base = kv_bits_per_coordinate(t, d, 3, 3)
    sinks = kv_bits_per_coordinate(t, d, 3, 3, full_tokens=4)
    assert sinks - base == pytest.approx(4 * 2 * (16 * d - 3 * d - 16) / (2 * t * d))
    side = kv_bits_per_coordinate(t, d, 3, 3, key_side_bits=16 * d)
    assert side - base == pytest.approx(16 * d / (2 * t * d))
    split = kv_bits_per_coordinate(t, d, 3, 3, key_norms=2, value_norms=2)
    assert split - base == pytest.approx(0.25)
    with pytest.raises(ValueError):
        kv_bits_per_coordinate(t, d, 3, 3, full_tokens=t + 1)


def test_old_module_name_still_imports():
    """``rotorq.kvprep`` (the module's old name) gives the same functions."""
    import rotorq.kv.prep
    import rotorq.kvprep
    for name in rotorq.kvprep.__all__:
        assert getattr(rotorq.kvprep, name) is getattr(rotorq.kv.prep, name)
    from rotorq.kvcache import KVCache
    assert KVCache is rotorq.KVCache
