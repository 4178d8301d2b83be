import hashlib

import numpy as np
import pytest

import rotorq
from helpers import (
    assert_codes_match_reference,
    expected_nbytes,
    kernel_encoding,
    outlier_vectors,
    unit_vectors,
)
from rotorq import reference

ROTATIONS = ["hadamard", "dense", "rotor"]
# docs/math.md §2: per-vector MSE of unit vectors at d = 128 (exact sphere-coordinate law;
# the N(0, 1/d) model's 0.36338, 0.11748, 0.03455, 0.00950 are 0.7-2% higher).
MSE_TABLE = {1: 0.3609, 2: 0.1160, 3: 0.0340, 4: 0.00931}
# docs/math.md §3, d = 128: MSE-only inner-product error × d and slope; Prod error × d.
IP_MSE = {1: (0.358, 0.638), 2: (0.117, 0.883), 3: (0.034, 0.964), 4: (0.0093, 0.990)}
IP_PROD = {2: 0.552, 3: 0.176, 4: 0.053}


@pytest.mark.parametrize("rotation", ROTATIONS)
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_mse_on_unit_vectors_matches_table(rng, rotation, bits):
    x = unit_vectors(rng, 8000, 128, np.float32)
    tq = rotorq.TurboQuant(128, bits, rotation=rotation, seed=int(rng.integers(1 << 30)))
    mse = np.sum((x - tq.dequantize(tq.quantize(x))) ** 2, axis=1).mean()
    assert mse == pytest.approx(MSE_TABLE[bits], rel=0.02)


@pytest.mark.parametrize("rotation", ROTATIONS)
@pytest.mark.parametrize("mode,bits", [("mse", 1), ("mse", 3), ("prod", 2), ("prod", 3)])
def test_parity_with_numpy_reference(rng, rotation, mode, bits):
    d = 96
    x = rng.standard_normal((300, d)) * rng.uniform(0.1, 50, (300, 1))
    tq = rotorq.TurboQuant(d, bits, mode=mode, rotation=rotation, seed=int(rng.integers(1 << 30)))
    qv = tq.quantize(x.astype(np.float32))
    assert_codes_match_reference(tq, x, qv)
    enc = kernel_encoding(tq, qv)
    np.testing.assert_allclose(tq.dequantize(qv), reference.dequantize(tq, enc),
                               rtol=1e-4, atol=1e-4 * np.abs(x).max())
    q = rng.standard_normal((5, d))
    np.testing.assert_allclose(tq.scores(q, qv), reference.scores(tq, q, enc),
                               rtol=1e-4, atol=1e-4 * np.abs(q).max() * np.abs(x).max() * d ** 0.5)


def _pair_scores(tq, q, x):
    """Estimated <q_i, x_i> for paired rows, through batch broadcasting."""
    qv = tq.quantize(x[:, None, :])
    return tq.scores(q[:, None, :], qv)[:, 0, 0]


@pytest.mark.slow
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_mse_mode_inner_products_match_table(rng, bits):
    n, d = 20000, 128
    q, x = unit_vectors(rng, n, d), unit_vectors(rng, n, d)
    true = np.sum(q * x, axis=1)
    est = _pair_scores(rotorq.TurboQuant(d, bits, seed=int(rng.integers(1 << 30))), q, x)
    err_d, slope = IP_MSE[bits]
    assert np.mean((est - true) ** 2) * d == pytest.approx(err_d, rel=0.08)
    assert np.polyfit(true, est, 1)[0] == pytest.approx(slope, abs=0.012)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_prod_mode_error_matches_table(rng, bits):
    n, d = 20000, 128
    q, x = unit_vectors(rng, n, d), unit_vectors(rng, n, d)
    tq = rotorq.TurboQuant(d, bits, mode="prod", seed=int(rng.integers(1 << 30)))
    err = _pair_scores(tq, q, x) - np.sum(q * x, axis=1)
    assert np.mean(err ** 2) * d == pytest.approx(IP_PROD[bits], rel=0.08)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [2, 3])
def test_prod_mode_is_unbiased_where_mse_mode_shrinks(rng, bits):
    # Bias shows on correlated pairs (<q, x> ≈ 0.5); unbiasedness is over the random
    # rotation and sketch, so average per-seed mean errors over many seeds.
    d, pairs, seeds = 128, 100, 200
    x = unit_vectors(rng, pairs, d)
    q = x + rng.standard_normal((pairs, d)) * np.sqrt(3.0 / d)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    true = np.sum(q * x, axis=1)
    first = int(rng.integers(1 << 30))
    prod, mse = [], []
    for seed in range(first, first + seeds):
        prod.append(np.mean(_pair_scores(rotorq.TurboQuant(d, bits, mode="prod", seed=seed), q, x) - true))
        mse.append(np.mean(_pair_scores(rotorq.TurboQuant(d, bits - 1, seed=seed), q, x) - true))
    prod, mse = np.array(prod), np.array(mse)
    assert abs(prod.mean()) < 5 * prod.std() / np.sqrt(seeds)
    assert abs(mse.mean()) > 10 * mse.std() / np.sqrt(seeds)  # the check can fail


def test_outlier_channels_separate_dense_hadamard_from_rotor(rng):
    # A dense rotation maps the few outlier channels to a few fixed directions, so one draw's
    # MSE varies by ~3% (sd 0.0009): average over rotation seeds, not only over vectors.
    x = outlier_vectors(rng, 2000, 128).astype(np.float32)
    mse = {}
    for rotation in ROTATIONS:
        draws = []
        for _ in range(8 if rotation != "rotor" else 1):
            tq = rotorq.TurboQuant(128, 3, rotation=rotation, seed=int(rng.integers(1 << 30)))
            draws.append(np.sum((x - tq.dequantize(tq.quantize(x))) ** 2, axis=1).mean())
        mse[rotation] = np.mean(draws)
    assert 0.027 < mse["dense"] < 0.037
    assert 0.027 < mse["hadamard"] < 0.037
    assert mse["rotor"] > 0.15  # block rotations cannot spread an outlier channel


@pytest.mark.parametrize("mode,bits", [("mse", 1), ("mse", 3), ("mse", 8), ("prod", 3), ("prod", 4)])
@pytest.mark.parametrize("dim", [1, 3, 50, 128, 200])
@pytest.mark.parametrize("rotation", ROTATIONS)
def test_nbytes_is_the_bit_budget(rng, mode, bits, dim, rotation):
    tq = rotorq.TurboQuant(dim, bits, mode=mode, rotation=rotation)
    qv = tq.quantize(rng.standard_normal((3, 7, dim)))
    assert qv.shape == (3, 7, dim)
    assert qv.nbytes == expected_nbytes(tq, 21)
    assert qv.bits_per_coordinate == pytest.approx(8 * expected_nbytes(tq, 1) / dim)


def test_three_bit_codes_cross_byte_boundaries():
    tq = rotorq.TurboQuant(128, 3)
    qv = tq.quantize(np.random.default_rng(0).standard_normal(128))
    assert qv.codes.shape == (48,) and qv.nbytes == 50
    assert qv.bits_per_coordinate == 3.125


def test_fp16_bf16_fp32_fp64_inputs_agree(rng):
    x = rng.standard_normal((50, 64)).astype(np.float16)
    tq = rotorq.TurboQuant(64, 4)
    ref = tq.quantize(x.astype(np.float32))
    for dtype in (np.float16, np.float64):
        qv = tq.quantize(x.astype(dtype))
        assert np.mean(qv.codes != ref.codes) < 1e-3
    torch = pytest.importorskip("torch")
    qv = tq.quantize(torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16))
    assert isinstance(tq.dequantize(qv), torch.Tensor)


def test_zero_vectors_and_empty_input(rng):
    tq = rotorq.TurboQuant(64, 3, mode="prod")
    x = rng.standard_normal((4, 64))
    x[1] = 0.0
    out = tq.dequantize(tq.quantize(x))
    assert np.all(np.isfinite(out)) and np.all(out[1] == 0.0)
    empty = tq.quantize(np.empty((0, 64), np.float32))
    assert empty.shape == (0, 64) and empty.nbytes == 0
    assert tq.dequantize(empty).shape == (0, 64)
    assert tq.scores(np.ones((2, 64)), empty).shape == (2, 0)
    assert tq.scores(np.ones((0, 64)), tq.quantize(x)).shape == (0, 4)


def test_large_norms_are_kept_and_overflow_refused(rng):
    x = rng.standard_normal((10, 64)) * 100.0  # norms ~800, like real keys
    tq = rotorq.TurboQuant(64, 4)
    qv = tq.quantize(x)
    np.testing.assert_allclose(qv.norms.astype(np.float64), np.linalg.norm(x, axis=1), rtol=1e-3)
    with pytest.raises(ValueError, match="float16"):
        tq.quantize(x * 1e3)
    big = rotorq.TurboQuant(64, 4, norm_dtype="float32").quantize(x * 1e3)
    assert big.norms.dtype == np.float32


def test_norm_correction_keeps_length(rng):
    x = rng.standard_normal((500, 128))
    tq = rotorq.TurboQuant(128, 2, norm_correction=True)
    x_hat = tq.dequantize(tq.quantize(x))
    np.testing.assert_allclose(np.linalg.norm(x_hat, axis=1), np.linalg.norm(x, axis=1), rtol=2e-3)


def test_indexing_slicing_and_scores_broadcast(rng):
    tq = rotorq.TurboQuant(32, 3)
    x = rng.standard_normal((4, 6, 32))
    qv = tq.quantize(x)
    assert qv[1].shape == (6, 32) and qv[1:3, ::2].shape == (2, 3, 32) and qv[..., 0].shape == (4, 32)
    np.testing.assert_array_equal(qv[2].codes, tq.quantize(x[2]).codes)
    np.testing.assert_array_equal(tq.dequantize(qv[1:3]), tq.dequantize(qv)[1:3])
    q = rng.standard_normal((5, 32))  # one query set against every batch
    s = tq.scores(q, qv)
    assert s.shape == (4, 5, 6)
    np.testing.assert_allclose(s[3], tq.scores(q, qv[3]), rtol=1e-6)
    assert len(qv) == 4
    with pytest.raises(IndexError):
        qv[0, 0, 0]


def test_save_load_round_trip(tmp_path, rng):
    tq = rotorq.TurboQuant(80, 3, mode="prod", rotation="rotor", seed=7)
    qv = tq.quantize(rng.standard_normal((9, 80)))
    path = tmp_path / "codes.npz"
    qv.save(path)
    back = rotorq.load(path)
    assert back.config == qv.config and back.shape == qv.shape and back.nbytes == qv.nbytes
    tq2 = rotorq.TurboQuant.from_config(back.config)
    np.testing.assert_array_equal(tq2.dequantize(back), tq.dequantize(qv))


GOLDEN = {  # sha256 of the codes of a fixed input at seed 0: same on every machine
    "hadamard": "aabe543ee1874901",
    "rotor": "3276317c73a99342",
}


@pytest.mark.parametrize("rotation", ["hadamard", "rotor"])
def test_same_seed_same_codes_everywhere(rotation):
    x = np.sin(np.arange(64 * 100, dtype=np.float64) * 0.7311).reshape(100, 64)
    codes = rotorq.TurboQuant(64, 3, rotation=rotation, seed=0).quantize(x).codes
    assert hashlib.sha256(codes.tobytes()).hexdigest()[:16] == GOLDEN[rotation]
    other = rotorq.TurboQuant(64, 3, rotation=rotation, seed=1).quantize(x).codes
    assert not np.array_equal(codes, other)


@pytest.mark.parametrize("rotation", ROTATIONS)
def test_backend_rotate_scales_in_the_kernel(rng, rotation):
    """``cpu.rotate(x, rot, s)`` — the scale KVCache.attend folds into the query rotation —
    is ``s`` times the rotation (the kernels scale the input rows in float64)."""
    from rotorq import cpu
    tq = rotorq.TurboQuant(100, 3, rotation=rotation, seed=int(rng.integers(1 << 30)))
    x = rng.standard_normal((33, 100)).astype(np.float32)
    s = float(rng.uniform(0.05, 3.0))
    plain = cpu.rotate(x, tq.rotation)
    np.testing.assert_allclose(cpu.rotate(x, tq.rotation, s), s * plain, rtol=2e-6,
                               atol=2e-6 * s * np.abs(plain).max())
    assert not np.allclose(cpu.rotate(x, tq.rotation, s), plain, rtol=1e-3)
