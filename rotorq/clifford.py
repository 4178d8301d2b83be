"""The Clifford algebra Cl(3,0): multivectors, the geometric product and rotors.

Multivectors are arrays of shape ``(..., 8)`` in the basis
``[1, e1, e2, e3, e12, e13, e23, e123]`` with ``e_i² = +1``. The product table is
the one of docs/math.md §1.3 (associative; public RotorQuant code has 18 flipped signs).
A rotor ``R = cos(θ/2) + sin(θ/2) B̂`` rotates a vector by the sandwich ``R v R̃``;
:func:`rotor_to_matrix` turns it into the equivalent 3×3 matrix (9 FMA per vector).
"""

from __future__ import annotations

import numpy as np

REVERSE_SIGNS = np.array([1, 1, 1, 1, -1, -1, -1, -1], dtype=np.float64)


def _as_multivector(a, name):
    a = np.asarray(a)
    if a.dtype.kind not in "fiu" or a.shape[-1:] != (8,):
        raise ValueError(f"{name} must be a real array of shape (..., 8), got {a.dtype} {a.shape}")
    return a.astype(np.result_type(a.dtype, np.float32), copy=False)


def geometric_product(a, b):
    """Geometric product ``a·b`` of multivectors, broadcasting over leading axes.

    Examples
    --------
    >>> import numpy as np
    >>> from rotorq import clifford
    >>> e1 = np.eye(8)[1]; e2 = np.eye(8)[2]
    >>> clifford.geometric_product(e1, e2).tolist()   # e1 e2 = e12
    [0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    """
    a = _as_multivector(a, "a")
    b = _as_multivector(b, "b")
    a0, a1, a2, a3, a12, a13, a23, a123 = np.moveaxis(a, -1, 0)
    b0, b1, b2, b3, b12, b13, b23, b123 = np.moveaxis(b, -1, 0)
    r = [
        a0 * b0 + a1 * b1 + a2 * b2 + a3 * b3 - a12 * b12 - a13 * b13 - a23 * b23 - a123 * b123,
        a0 * b1 + a1 * b0 - a2 * b12 - a3 * b13 + a12 * b2 + a13 * b3 - a23 * b123 - a123 * b23,
        a0 * b2 + a1 * b12 + a2 * b0 - a3 * b23 - a12 * b1 + a13 * b123 + a23 * b3 + a123 * b13,
        a0 * b3 + a1 * b13 + a2 * b23 + a3 * b0 - a12 * b123 - a13 * b1 - a23 * b2 - a123 * b12,
        a0 * b12 + a1 * b2 - a2 * b1 + a3 * b123 + a12 * b0 - a13 * b23 + a23 * b13 + a123 * b3,
        a0 * b13 + a1 * b3 - a2 * b123 - a3 * b1 + a12 * b23 + a13 * b0 - a23 * b12 - a123 * b2,
        a0 * b23 + a1 * b123 + a2 * b3 - a3 * b2 - a12 * b13 + a13 * b12 + a23 * b0 + a123 * b1,
        a0 * b123 + a1 * b23 - a2 * b13 + a3 * b12 + a12 * b3 - a13 * b2 + a23 * b1 + a123 * b0,
    ]
    return np.stack(np.broadcast_arrays(*r), axis=-1)


def reverse(a):
    """Reverse ``ã``: flips the sign of the bivector and trivector parts.

    Examples
    --------
    >>> from rotorq import clifford
    >>> clifford.reverse([1, 2, 3, 4, 5, 6, 7, 8]).tolist()
    [1.0, 2.0, 3.0, 4.0, -5.0, -6.0, -7.0, -8.0]
    """
    return _as_multivector(a, "a") * REVERSE_SIGNS


def vector(v):
    """Embed 3-vectors ``(..., 3)`` as multivectors ``(..., 8)``.

    Examples
    --------
    >>> from rotorq import clifford
    >>> clifford.vector([1.0, 2.0, 3.0]).tolist()
    [0.0, 1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 0.0]
    """
    v = np.asarray(v, dtype=np.float64)
    if v.shape[-1:] != (3,):
        raise ValueError(f"v must have shape (..., 3), got {v.shape}")
    out = np.zeros(v.shape[:-1] + (8,))
    out[..., 1:4] = v
    return out


def rotor(bivector, angle):
    """Unit rotor ``cos(θ/2) + sin(θ/2)·B̂`` for a bivector ``(b12, b13, b23)`` and angle θ.

    Examples
    --------
    >>> import numpy as np
    >>> from rotorq import clifford
    >>> R = clifford.rotor([1.0, 0.0, 0.0], np.pi / 2)   # quarter turn in the e1e2 plane
    >>> np.round(clifford.sandwich(R, [1.0, 0.0, 0.0]), 12).tolist()
    [0.0, -1.0, 0.0]
    """
    b = np.asarray(bivector, dtype=np.float64)
    if b.shape[-1:] != (3,):
        raise ValueError(f"bivector must have shape (..., 3), got {b.shape}")
    norm = np.linalg.norm(b, axis=-1, keepdims=True)
    if np.any(norm == 0):
        raise ValueError("bivector must be non-zero")
    half = 0.5 * np.asarray(angle, dtype=np.float64)[..., None]
    out = np.zeros(np.broadcast_shapes(b.shape[:-1], half.shape[:-1]) + (8,))
    out[..., 0] = np.cos(half[..., 0])
    out[..., 4:7] = np.sin(half) * b / norm
    return out


def sandwich(R, v):
    """Rotate 3-vectors ``v (..., 3)`` by rotors ``R (..., 8)``: the vector part of ``R v R̃``.

    Examples
    --------
    >>> import numpy as np
    >>> from rotorq import clifford
    >>> R = clifford.rotor([0.0, 0.0, 1.0], 0.3)
    >>> v = np.array([0.2, -1.0, 0.5])
    >>> bool(np.isclose(np.linalg.norm(clifford.sandwich(R, v)), np.linalg.norm(v)))
    True
    """
    full = geometric_product(geometric_product(R, vector(v)), reverse(R))
    return full[..., 1:4]


def rotor_to_matrix(R):
    """3×3 matrices ``M`` with ``M @ v == sandwich(R, v)`` for unit rotors ``R (..., 8)``.

    Examples
    --------
    >>> import numpy as np
    >>> from rotorq import clifford
    >>> R = clifford.rotor([0.3, -0.2, 0.9], 1.1)
    >>> v = np.array([0.5, 0.1, -2.0])
    >>> bool(np.allclose(clifford.rotor_to_matrix(R) @ v, clifford.sandwich(R, v)))
    True
    """
    R = _as_multivector(R, "R").astype(np.float64)
    s, p12, p13, p23 = R[..., 0], R[..., 4], R[..., 5], R[..., 6]
    rows = [
        [s * s - p12 * p12 - p13 * p13 + p23 * p23, 2 * (s * p12 - p13 * p23), 2 * (s * p13 + p12 * p23)],
        [-2 * (s * p12 + p13 * p23), s * s - p12 * p12 + p13 * p13 - p23 * p23, 2 * (s * p23 - p12 * p13)],
        [2 * (p12 * p23 - s * p13), -2 * (s * p23 + p12 * p13), s * s + p12 * p12 - p13 * p13 - p23 * p23],
    ]
    return np.stack([np.stack(r, axis=-1) for r in rows], axis=-2)


def random_rotors(count, rng):
    """``count`` Haar-distributed unit rotors (uniform on the 3-sphere of even multivectors).

    A unit rotor ``s + p12 e12 + p13 e13 + p23 e23`` is a unit quaternion; the uniform
    law on S³ gives the Haar law on SO(3) (angle density ``(1 - cos θ)/π``).

    Examples
    --------
    >>> import numpy as np
    >>> from rotorq import clifford
    >>> R = clifford.random_rotors(4, np.random.default_rng(0))
    >>> R.shape
    (4, 8)
    """
    g = rng.standard_normal((count, 4))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    out = np.zeros((count, 8))
    out[:, 0] = g[:, 0]
    out[:, 4:7] = g[:, 1:]
    return out
