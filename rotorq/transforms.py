"""Standalone transforms."""

from __future__ import annotations

from . import _backend


def wht(x, *, inverse=False):
    """Orthonormal fast Walsh–Hadamard transform over the last axis.

    ``H`` (Sylvester order, scaled by ``1/√n``) is symmetric and orthogonal, so it is its
    own inverse: ``inverse=True`` computes the same transform and is accepted for clarity.
    The last axis must be a power of two. Returns float32 in the input's framework.

    Examples
    --------
    >>> import numpy as np, rotorq
    >>> rotorq.wht(np.array([1.0, 0.0, 0.0, 0.0])).tolist()
    [0.5, 0.5, 0.5, 0.5]
    >>> x = np.random.default_rng(0).standard_normal((3, 8))
    >>> bool(np.allclose(rotorq.wht(rotorq.wht(x), inverse=True), x, atol=1e-6))
    True
    """
    del inverse  # H is an involution.
    arr, origin, be = _backend.float_array(x, "x")
    n = arr.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"x must have a power-of-two last dimension, got {n}")
    _backend.require_finite(be.xp, arr, "x")
    out = be.wht(arr.reshape(-1, n)).reshape(arr.shape)
    return _backend.to_framework(out, origin)
