"""The backend contract: every operation a backend implements, declared once.

The public API (:mod:`rotorq.turboquant`, :mod:`rotorq.qjl`, :mod:`rotorq.kv`) checks its
arguments, then calls these operations on the backend of the arrays' device
(:func:`rotorq._backend.get`): :mod:`rotorq.cpu` for numpy arrays, :mod:`rotorq.cuda` for
cupy arrays and torch CUDA tensors. Each backend defines a function of the same name and
signature for every operation declared here (``tests/test_ops_contract.py`` checks it); the
stubs below carry the shared documentation and are never called.

Arrays are the backend's own (numpy or cupy), already validated: floating inputs are
float32 or float64 rows unless said otherwise, packed codes are uint8 rows (little-endian
bit streams), norms float16/float32. The attention operations exchange the small frozen
dataclasses :class:`RotatedQuery`, :class:`KeyPart`, :class:`ValuePart`, :class:`KeyBias`
and :class:`Partial` instead of positional tuples.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

OPERATIONS: dict[str, Any] = {}


def operation(stub):
    """Declare ``stub`` (its name, signature and docstring) as a backend operation."""
    OPERATIONS[stub.__name__] = stub
    return stub


@dataclasses.dataclass(frozen=True)
class RotatedQuery:
    """Query rows of one key part, rotated into that part's domain.

    Attributes
    ----------
    rotated : array, float32 (BH, R, D)
        Rotated query rows times the softmax scale; row ``r`` is query ``r % n_q`` of the
        group's query head ``r // n_q``.
    sketch : array, float32 (BH, R, m), or None
        ``rotated @ sketchᵀ`` for a prod-mode key part; None in MSE mode.
    """

    rotated: Any
    sketch: Any = None


@dataclasses.dataclass(frozen=True)
class KeyPart:
    """Packed keys of one key part (normal or outlier channels) for decode attention.

    Attributes
    ----------
    codes : array, uint8 (BH, cap, row_bytes)
        Packed codes of ``bits`` bits per stored coordinate.
    norms : array, float16 (BH, cap)
    centroids : array, float32 (2**bits,)
        The codebook, scaled to rotated coordinates.
    bits : int
    signs : array, uint8 (BH, cap, ceil(m / 8)), or None
        Packed QJL residual signs (prod mode).
    qjl_norms : array, float16 (BH, cap), or None
        QJL residual norms (prod mode).
    qjl_scale : float
        ``√(π/2) / m`` in prod mode, 0.0 in MSE mode.
    """

    codes: Any
    norms: Any
    centroids: Any
    bits: int
    signs: Any = None
    qjl_norms: Any = None
    qjl_scale: float = 0.0

    @property
    def prod(self) -> bool:
        """Whether the part carries a QJL residual sketch."""
        return self.signs is not None


@dataclasses.dataclass(frozen=True)
class ValuePart:
    """Packed values of one value part (MSE codes only).

    Attributes
    ----------
    codes : array, uint8 (BH, cap, row_bytes)
    norms : array, float16 (BH, cap)
    centroids : array, float32 (2**bits,)
    bits : int
    stored_dim : int
        Coordinates per rotated value row (the accumulator's width).
    """

    codes: Any
    norms: Any
    centroids: Any
    bits: int
    stored_dim: int


@dataclasses.dataclass(frozen=True)
class KeyBias:
    """A per-key score term ``Σ_i cos_coef[r, i]·cos((pos0 + t)·θ_i) + sin_coef[r, i]·sin(…)``.

    It is ``q · RoPE_t(μ)``, the exact contribution of a RoPE-aware key offset ``μ``
    (:mod:`rotorq.kvprep`), already times the softmax scale.

    Attributes
    ----------
    cos_coef, sin_coef : array, float32 (BH, R, h)
    freqs : array, float64 (h,)
        The RoPE angles ``θ_i``.
    pos0 : int
        Position of the first cached token.
    """

    cos_coef: Any
    sin_coef: Any
    freqs: Any
    pos0: int


@dataclasses.dataclass(frozen=True)
class Partial:
    """Unnormalized attention over part of the tokens (flash-decoding's partial result).

    Attributes
    ----------
    accs : tuple of arrays, float32 (BH, R, D_v), one per value part
        ``Σ_t exp(s_t − max) · ν_t · c[jdx_t]`` in each value part's rotated domain.
    max : array, float32 (BH, R)
        Largest score per row, ``-inf`` for rows that saw no token.
    sum : array, float32 (BH, R)
        ``Σ_t exp(s_t − max)``.
    """

    accs: tuple
    max: Any
    sum: Any


@operation
def rotate(x, rot, scale=1.0):
    """Rows ``x`` (n, d) → rotated rows (n, stored_dim) float32, times ``scale``."""


@operation
def unrotate(y, rot):
    """Rotated rows ``y`` (n, stored_dim) → rows (n, d) float32."""


@operation
def quantize(x, rot, boundaries, centroids, bits, norm_correction, sketch):
    """Fused rotation, codebook, packing and norms of rows ``x`` (n, d).

    ``sketch`` is the QJL matrix (m, stored_dim) float32 in prod mode, else None. Returns
    ``codes, norms, qjl_signs, qjl_norms`` (the last two empty without a sketch).
    """


@operation
def dequantize(codes, norms, rot, centroids, bits):
    """Reconstructed rows (n, d) float32 from packed codes (n, row_bytes) and norms (n,)."""


@operation
def dequantize_rotated(codes, norms, stored_dim, centroids, bits):
    """Reconstructions in the rotated domain, (n, stored_dim) float32."""


@operation
def scores(qrot, qsketch, qmap, codes, norms, signs, qjl_norms, kmap, centroids, bits,
           qjl_scale):
    """Scores (B, M, N) of rotated queries (Bq, M, stored_dim) against packed keys
    (Bk, N, ·); ``qmap``/``kmap`` (B,) int64 map each output batch to its query and key
    batch; ``qsketch``, ``signs``, ``qjl_norms`` are None in MSE mode."""


@operation
def prepare_scores(queries, rows, rot, sketch, qmap, codes, norms, signs, qjl_norms, kmap,
                   centroids, bits, qjl_scale, out_shape):
    """A callable ``plan(queries, out=None)`` that computes :func:`scores` of raw queries
    shaped like ``queries`` with the launches prepared once, or None where preparing gains
    nothing (the caller then runs the unprepared path)."""


@operation
def qjl_quantize(x, sketch):
    """Packed ``sign(sketch @ xᵀ)`` rows and float32 norms of rows ``x``."""


@operation
def qjl_scores(qsketch, qmap, signs, norms, kmap, scale):
    """QJL estimates (B, M, N) from sketched queries (Bq, M, m) and packed signs."""


@operation
def wht(x, out_dtype=None):
    """Orthonormal Walsh–Hadamard transform of rows (n, D), D a power of two; float32 out
    unless ``out_dtype`` says otherwise."""


@operation
def unpack_codes(codes, bits, count):
    """Rows of packed codes → uint8 (n, count)."""


@operation
def rotor_roundtrip(x, rot, boundaries, centroids, norm_correction):
    """Rotor-quantized reconstructions (n, d) float32 of rows ``x``, in one fused pass."""


@operation
def attention_layout(key_dim, key_bits, key_mode, value_dim, value_bits):
    """"rows" or "tiles": how a KV cache stores its codes for :func:`decode_attention`."""


@operation
def decode_attention(queries, keys, values, n_keys, n_q, causal_offset, key_bias=None,
                     layout="rows"):
    """Fused attention of rotated queries over packed keys and values.

    Parameters
    ----------
    queries : tuple of RotatedQuery, one per key part
    keys : tuple of KeyPart (1 or 2)
    values : tuple of ValuePart (1 or 2)
    n_keys : int
        Valid tokens in the buffers (``cap >= n_keys``).
    n_q : int
        Queries per query head.
    causal_offset : int
        Key ``t`` is visible to row ``r`` iff ``t <= r % n_q + causal_offset``.
    key_bias : KeyBias, optional
    layout : {"rows", "tiles"}
        "tiles": one MSE key part and one value part in the tile layout of
        :mod:`rotorq.tiles`.

    Returns
    -------
    Partial
    """


@operation
def exact_attention(q, ke, ve, pos, scale, n_q, offset, causal, partial=None):
    """Attention of rows ``q`` (BH, R, d) over uncompressed keys ``ke`` (BH, E, d) and
    values ``ve`` (BH, E, dv) at positions ``pos`` (E,), merged with the compressed part's
    :class:`Partial` (or None): the normalized output (BH, R, dv) float32, as
    :func:`rotorq.reference.exact_attention`."""


def signature(name: str) -> inspect.Signature:
    """The declared signature of operation ``name``."""
    return inspect.signature(OPERATIONS[name])


__all__ = ["OPERATIONS", "KeyBias", "KeyPart", "Partial", "RotatedQuery", "ValuePart",
           "operation", "signature"]
