import numpy as np
import pytest
from scipy.linalg import hadamard

import rotorq


@pytest.mark.parametrize("n", [1, 2, 8, 64, 128, 1024])
def test_matches_hadamard_matrix_and_is_involution(rng, n):
    x = rng.standard_normal((5, n)).astype(np.float32)
    y = rotorq.wht(x)
    np.testing.assert_allclose(y, x @ hadamard(n).T / np.sqrt(n), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rotorq.wht(y, inverse=True), x, rtol=1e-5, atol=1e-5)
    assert y.dtype == np.float32


def test_any_leading_shape_and_dtypes(rng):
    x = rng.standard_normal((2, 3, 16))
    ref = rotorq.wht(x)
    assert ref.shape == (2, 3, 16)
    np.testing.assert_allclose(rotorq.wht(x.astype(np.float16)), ref, atol=5e-3)
    np.testing.assert_allclose(rotorq.wht(x[:, :, ::-1]), rotorq.wht(x[:, :, ::-1].copy()))
    assert rotorq.wht(np.empty((0, 8))).shape == (0, 8)


def test_bad_input():
    with pytest.raises(ValueError, match="power-of-two"):
        rotorq.wht(np.ones((2, 12)))
    with pytest.raises(TypeError, match="floating"):
        rotorq.wht(np.ones((2, 8), dtype=np.int32))
    with pytest.raises(ValueError, match="NaN"):
        rotorq.wht(np.array([1.0, np.inf]))
    with pytest.raises(ValueError, match="at least 1"):
        rotorq.wht(np.float64(1.0))
