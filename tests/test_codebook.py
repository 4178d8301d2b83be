import numpy as np
import pytest

import rotorq
from rotorq.codebook import codebook_mse

# MATH.md §2: positive unit-variance centroids and per-coordinate MSE.
TABLE = {
    1: ([0.7979], 0.36338),
    2: ([0.4528, 1.5104], 0.11748),
    3: ([0.2451, 0.7560, 1.3439, 2.1519], 0.03455),
    4: ([0.1284, 0.3880, 0.6568, 0.9423, 1.2562, 1.6180, 2.0690, 2.7326], 0.00950),
}
BETA_128 = {1: 0.3609, 2: 0.1160, 3: 0.0340, 4: 0.00931}


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_gaussian_codebook_matches_table(bits):
    c, b = rotorq.lloyd_max(bits)
    positive, mse = TABLE[bits]
    np.testing.assert_allclose(c[len(c) // 2:], positive, atol=6e-5)
    np.testing.assert_allclose(c, -c[::-1], atol=1e-12)
    np.testing.assert_allclose(b, 0.5 * (c[1:] + c[:-1]))
    assert codebook_mse(bits) == pytest.approx(mse, rel=2e-4)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_beta_codebook_mse_at_128(bits):
    assert codebook_mse(bits, 128, distribution="beta") * 128 == pytest.approx(BETA_128[bits], rel=3e-3)


def test_dim_scaling_and_paper_bounds():
    for bits in (1, 2, 3, 4):
        c, _ = rotorq.lloyd_max(bits, 64)
        np.testing.assert_allclose(c * 8.0, rotorq.lloyd_max(bits)[0])
        mse = codebook_mse(bits)
        assert 4.0 ** -bits < mse <= np.sqrt(3) * np.pi / 2 * 4.0 ** -bits


def test_eight_bits_is_sorted_and_fine():
    c, b = rotorq.lloyd_max(8)
    assert c.shape == (256,) and b.shape == (255,)
    assert np.all(np.diff(c) > 0)
    assert codebook_mse(8) < 1e-4


@pytest.mark.parametrize("bad", [0, 9, -1, 2.0, True, "3"])
def test_bad_bits(bad):
    with pytest.raises((ValueError, TypeError), match="bits"):
        rotorq.lloyd_max(bad)


def test_bad_distribution_and_dim():
    with pytest.raises(ValueError, match="distribution"):
        rotorq.lloyd_max(2, 64, distribution="laplace")
    with pytest.raises(ValueError, match="dim"):
        rotorq.lloyd_max(2, 0)
    with pytest.raises(ValueError, match="beta"):
        rotorq.lloyd_max(2, distribution="beta")
