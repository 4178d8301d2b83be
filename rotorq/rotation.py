"""Seeded random rotations: randomized Hadamard, dense Haar and Cl(3,0) rotors.

Every rotation maps R^d into R^D (``D >= d``, the *stored* dimension) isometrically:
``‖rotate(x)‖ = ‖x‖`` and ``unrotate(rotate(x)) = x``. Parameters are drawn with numpy's
PCG64 from ``seed``, so the same arguments give the same rotation on every machine;
device copies are made from them.

==========  ==================  ============================================================
kind        stored dimension D  cost and notes
==========  ==================  ============================================================
hadamard    next power of two   ``H (s ⊙ pad(x))``, d·log₂D adds. Padding costs bytes: d = 96
                                stores 128 coordinates (33% more), d = 200 stores 256.
dense       d                   Haar matrix from QR with sign fix, d² FMA (a matmul).
rotor       3·⌈d/3⌉             one Haar rotor per 3-group, as a 3×3 matrix (9 FMA per group);
                                block-diagonal, so it cannot spread an outlier channel over
                                the whole vector (docs/math.md §6).
==========  ==================  ============================================================
"""

from __future__ import annotations

import math

import numpy as np

from . import _backend, clifford

ROTATIONS = ("hadamard", "dense", "rotor")
_STREAM_ROTATION = 0x5EED_0001


def _rng(seed, stream):
    return np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, stream])


def haar_matrix(dim, rng):
    """Haar-distributed orthogonal matrix: QR of a Gaussian matrix with the sign fix."""
    g = rng.standard_normal((dim, dim))
    q, r = np.linalg.qr(g)
    s = np.sign(np.diag(r))
    s[s == 0] = 1.0
    return q * s


class Rotation:
    """Base class: ``dim`` in, ``stored_dim`` out, parameters on the host as numpy arrays."""

    kind: str

    def __init__(self, dim: int, seed: int):
        self.dim = int(dim)
        self.seed = int(seed)
        self._device_params: dict = {}

    @property
    def stored_dim(self) -> int:
        raise NotImplementedError

    def matrix(self) -> np.ndarray:
        """The explicit float64 (D, d) matrix of the rotation (for references and tests)."""
        raise NotImplementedError

    def host_params(self) -> dict:
        """The float32 arrays the kernels take."""
        raise NotImplementedError

    def params(self, xp):
        """Kernel parameters as arrays of the namespace ``xp`` (cached per namespace and GPU)."""
        key = _backend.namespace_key(xp)
        if key not in self._device_params:
            self._device_params[key] = {k: xp.asarray(v) for k, v in self.host_params().items()}
        return self._device_params[key]


class HadamardRotation(Rotation):
    """``y = H (s ⊙ pad(x))``: orthonormal Walsh–Hadamard after seeded random signs.

    Examples
    --------
    >>> import numpy as np
    >>> from rotorq.rotation import HadamardRotation
    >>> r = HadamardRotation(96, seed=0)
    >>> r.stored_dim
    128
    >>> m = r.matrix()
    >>> bool(np.allclose(m.T @ m, np.eye(96)))
    True
    """

    kind = "hadamard"

    def __init__(self, dim, seed):
        super().__init__(dim, seed)
        big_d = self.stored_dim
        self.signs = np.where(_rng(seed, _STREAM_ROTATION).random(big_d) < 0.5, -1.0, 1.0)

    @property
    def stored_dim(self):
        return 1 << max(0, (self.dim - 1).bit_length())

    def matrix(self):
        from scipy.linalg import hadamard

        big_d = self.stored_dim
        h = hadamard(big_d).astype(np.float64) / math.sqrt(big_d)
        return h[:, : self.dim] * self.signs[: self.dim]

    def host_params(self):
        return {"signs": self.signs.astype(np.float32)}


class DenseRotation(Rotation):
    """A dense Haar-random orthogonal ``d × d`` matrix.

    Examples
    --------
    >>> import numpy as np
    >>> from rotorq.rotation import DenseRotation
    >>> q = DenseRotation(8, seed=1).matrix()
    >>> bool(np.allclose(q @ q.T, np.eye(8)))
    True
    """

    kind = "dense"

    def __init__(self, dim, seed):
        super().__init__(dim, seed)
        self.q = haar_matrix(self.dim, _rng(seed, _STREAM_ROTATION))

    @property
    def stored_dim(self):
        return self.dim

    def matrix(self):
        return self.q

    def host_params(self):
        return {"matrix": self.q.astype(np.float32)}


class RotorRotation(Rotation):
    """One Haar-random Cl(3,0) rotor per 3-group (the last group zero-padded).

    Examples
    --------
    >>> import numpy as np
    >>> from rotorq.rotation import RotorRotation
    >>> r = RotorRotation(128, seed=0)
    >>> r.stored_dim, r.rotors.shape
    (129, (43, 8))
    """

    kind = "rotor"

    def __init__(self, dim, seed):
        super().__init__(dim, seed)
        self.rotors = clifford.random_rotors(-(-self.dim // 3), _rng(seed, _STREAM_ROTATION))
        self.mats = clifford.rotor_to_matrix(self.rotors)

    @property
    def stored_dim(self):
        return 3 * self.rotors.shape[0]

    def matrix(self):
        big_d = self.stored_dim
        m = np.zeros((big_d, big_d))
        for g, block in enumerate(self.mats):
            m[3 * g : 3 * g + 3, 3 * g : 3 * g + 3] = block
        return m[:, : self.dim]

    def host_params(self):
        return {"mats": self.mats.astype(np.float32)}


_KINDS = {"hadamard": HadamardRotation, "dense": DenseRotation, "rotor": RotorRotation}


def make_rotation(kind, dim, seed=0) -> Rotation:
    """Build the rotation ``kind`` ∈ {"hadamard", "dense", "rotor"} for vectors of ``dim``.

    Examples
    --------
    >>> from rotorq.rotation import make_rotation
    >>> make_rotation("rotor", 10).stored_dim
    12
    """
    if kind not in _KINDS:
        raise ValueError(f"rotation must be one of {ROTATIONS}, got {kind!r}")
    return _KINDS[kind](dim, seed)
