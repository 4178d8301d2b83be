import numpy as np
import pytest

from rotorq import clifford


def test_basis_products():
    e = np.eye(8)
    gp = clifford.geometric_product
    for i in (1, 2, 3):
        np.testing.assert_array_equal(gp(e[i], e[i]), e[0])  # e_i² = +1
    np.testing.assert_array_equal(gp(e[1], e[2]), e[4])
    np.testing.assert_array_equal(gp(e[2], e[1]), -e[4])
    np.testing.assert_array_equal(gp(gp(e[1], e[2]), e[3]), e[7])
    np.testing.assert_array_equal(gp(e[7], e[7]), -e[0])


def test_associative(rng):
    a, b, c = rng.standard_normal((3, 500, 8))
    gp = clifford.geometric_product
    np.testing.assert_allclose(gp(gp(a, b), c), gp(a, gp(b, c)), atol=1e-12)


def test_sandwich_of_vector_is_pure_vector_and_invertible(rng):
    R = clifford.random_rotors(300, rng)
    v = clifford.vector(rng.standard_normal((300, 3)))
    gp = clifford.geometric_product
    rv = gp(gp(R, v), clifford.reverse(R))
    np.testing.assert_allclose(rv[:, [0, 4, 5, 6, 7]], 0.0, atol=1e-14)
    np.testing.assert_allclose(np.linalg.norm(rv, axis=1), np.linalg.norm(v, axis=1), rtol=1e-13)
    np.testing.assert_allclose(gp(gp(clifford.reverse(R), rv), R), v, atol=1e-13)


def test_matrix_equals_sandwich_and_is_rotation(rng):
    R = clifford.rotor(rng.standard_normal((100, 3)), rng.uniform(-np.pi, np.pi, 100))
    v = rng.standard_normal((100, 3))
    m = clifford.rotor_to_matrix(R)
    np.testing.assert_allclose(np.einsum("nij,nj->ni", m, v), clifford.sandwich(R, v), atol=1e-13)
    np.testing.assert_allclose(m @ m.transpose(0, 2, 1), np.broadcast_to(np.eye(3), m.shape), atol=1e-13)
    np.testing.assert_allclose(np.linalg.det(m), 1.0, atol=1e-12)


def test_rotor_angle_is_the_rotation_angle(rng):
    theta = rng.uniform(0.1, 3.0)
    R = clifford.rotor([1.0, 0.0, 0.0], theta)
    m = clifford.rotor_to_matrix(R)
    assert np.arccos((np.trace(m) - 1) / 2) == pytest.approx(theta, rel=1e-12)


def test_random_rotors_are_haar(rng):
    # Haar on SO(3): the rotation angle has density (1 - cos θ)/π, mean π/2 + 2/π.
    m = clifford.rotor_to_matrix(clifford.random_rotors(20000, rng))
    angles = np.arccos(np.clip((np.trace(m, axis1=1, axis2=2) - 1) / 2, -1, 1))
    assert angles.mean() == pytest.approx(np.pi / 2 + 2 / np.pi, abs=0.03)


def test_bad_input():
    with pytest.raises(ValueError, match="8"):
        clifford.geometric_product(np.ones(7), np.ones(8))
    with pytest.raises(ValueError, match="bivector"):
        clifford.rotor([0.0, 0.0, 0.0], 1.0)
    with pytest.raises(ValueError, match="3"):
        clifford.sandwich(np.eye(8)[0], np.ones(4))
