"""QJL (arXiv 2406.03482): 1-bit Johnson–Lindenstrauss sign sketches of vectors.

A key ``k`` is stored as ``sign(S k)`` (``m`` bits) and ``‖k‖``; a full-precision query
``q`` is scored with the unbiased estimator ``√(π/2)/m · ‖k‖ · ⟨S q, sign(S k)⟩``.
"""

from __future__ import annotations

import math

import numpy as np

from . import _backend
from ._checks import (
    config_arguments,
    finish_scores,
    flag,
    positive_int,
    seed_value,
    store_norms,
    unit_rows,
)
from .quantized import QuantizedVectors, register_quantizer

_STREAM_QJL = 0x5EED_0003


def orthogonal_row_norm(dim):
    """Row norm ``r`` of a block-orthogonal sketch that keeps the QJL estimator unbiased.

    A row of norm ``r`` in a random orthogonal block is ``r·u``, ``u`` uniform on the unit
    sphere, and ``E[⟨r·u, q⟩·sign⟨u, k⟩] = r·E|u₁|·⟨q, k⟩/‖k‖``; a Gaussian row gives
    ``√(2/π)·⟨q, k⟩/‖k‖``. So ``r = √(2/π) / E|u₁|`` with
    ``E|u₁| = Γ(d/2) / (√π·Γ((d+1)/2))``, which is ``√d·(1 − 1/(4d) + O(d⁻²))``.

    Examples
    --------
    >>> from rotorq.qjl import orthogonal_row_norm
    >>> round(orthogonal_row_norm(128) ** 2 / 128, 4)
    0.9961
    """
    d = int(dim)
    mean_abs = math.exp(math.lgamma(d / 2) - math.lgamma((d + 1) / 2)) / math.sqrt(math.pi)
    return math.sqrt(2 / math.pi) / mean_abs


def qjl_matrix(dim, sketch_dim, seed=0, *, orthogonal=True):
    """The float64 sketch matrix ``S`` (sketch_dim, dim) with i.i.d. N(0, 1) rows.

    With ``orthogonal=True`` each block of ``dim`` rows is orthogonalized (QR), which lowers
    the variance, and its rows rescaled to :func:`orthogonal_row_norm` so that the ``√(π/2)/m``
    estimator stays unbiased. (Rows of norm ``√dim``, as in the QJL reference code,
    overestimate every inner product by a factor ``≈ 1 + 1/(4·dim)``: 3% at dim 8;
    docs/math.md §4.)

    Examples
    --------
    >>> import numpy as np
    >>> from rotorq.qjl import qjl_matrix, orthogonal_row_norm
    >>> s = qjl_matrix(8, 16)
    >>> bool(np.allclose(s[:8] @ s[:8].T, orthogonal_row_norm(8) ** 2 * np.eye(8)))
    True
    """
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, _STREAM_QJL])
    g = rng.standard_normal((sketch_dim, dim))
    if not orthogonal:
        return g
    for start in range(0, sketch_dim, dim):
        block = g[start:start + dim]
        q, r = np.linalg.qr(block.T)  # columns of q: orthonormal basis of the block's rows
        s = np.sign(np.diag(r))
        s[s == 0] = 1.0
        g[start:start + dim] = (q * s).T * orthogonal_row_norm(dim)
    return g


@register_quantizer
class QJL:
    """1-bit QJL sketch quantizer.

    Parameters
    ----------
    dim : int
        Vector dimension.
    sketch_dim : int
        Number of sign bits ``m`` per vector.
    seed : int
        Seed of the sketch matrix, in ``[0, 2**64)``.
    orthogonal : bool
        Block-orthogonalize the sketch (lower variance, same estimator).
    norm_dtype : {"float16", "float32"}
        Storage of the norms.

    Notes
    -----
    As :class:`rotorq.TurboQuant`: any array framework in, the same out; no autograd
    (torch tensors that require grad are refused: pass ``x.detach()``).

    Examples
    --------
    >>> import numpy as np, rotorq
    >>> rng = np.random.default_rng(0)
    >>> k, q = rng.standard_normal((2000, 64)), rng.standard_normal((1, 64))
    >>> qjl = rotorq.QJL(64, 256)
    >>> est = qjl.scores(q, qjl.quantize(k))
    >>> bool(np.corrcoef(est.ravel(), (q @ k.T).ravel())[0, 1] > 0.85)
    True
    """

    method = "qjl"

    def __init__(self, dim, sketch_dim, *, seed=0, orthogonal=True, norm_dtype="float16"):
        cfg = self._settings(dim, sketch_dim, seed=seed, orthogonal=orthogonal,
                             norm_dtype=norm_dtype)
        self.dim, self.sketch_dim, self.seed = cfg["dim"], cfg["sketch_dim"], cfg["seed"]
        self.orthogonal, self.norm_dtype = cfg["orthogonal"], cfg["norm_dtype"]
        self.sketch = qjl_matrix(self.dim, self.sketch_dim, self.seed,
                                 orthogonal=self.orthogonal).astype(np.float32)
        self.scale = math.sqrt(math.pi / 2) / self.sketch_dim
        self._device_sketch: dict = {}
        self._expected_parts = self._parts_layout(self.config)

    @staticmethod
    def _settings(dim, sketch_dim, *, seed=0, orthogonal=True, norm_dtype="float16"):
        """The constructor's arguments checked, in canonical form (the config without
        ``"method"``). Draws nothing."""
        if not isinstance(norm_dtype, str) or norm_dtype not in ("float16", "float32"):
            raise ValueError(f"norm_dtype must be 'float16' or 'float32', got {norm_dtype!r}")
        return {"dim": positive_int(dim, "dim"),
                "sketch_dim": positive_int(sketch_dim, "sketch_dim"), "seed": seed_value(seed),
                "orthogonal": flag(orthogonal, "orthogonal"), "norm_dtype": str(norm_dtype)}

    @property
    def config(self) -> dict:
        """Everything that determines the codes; equal configs give equal codes."""
        return {"method": self.method, "dim": self.dim, "sketch_dim": self.sketch_dim,
                "seed": self.seed, "orthogonal": self.orthogonal, "norm_dtype": self.norm_dtype}

    @classmethod
    def from_config(cls, config: dict) -> QJL:
        """Rebuild the quantizer that produced codes with ``config``.

        Raises ``TypeError``/``ValueError`` as the constructor does, and for a config that
        is not a dict, names another method, lacks ``dim`` or ``sketch_dim``, or has unknown
        keys.

        Examples
        --------
        >>> import rotorq
        >>> qjl = rotorq.QJL(64, 256, seed=3)
        >>> rotorq.QJL.from_config(qjl.config).config == qjl.config
        True
        """
        return cls(**config_arguments(cls, config))

    @classmethod
    def _canonical_config(cls, config: dict) -> dict:
        """``config`` checked as :meth:`from_config` checks it, in canonical form."""
        return {"method": cls.method, **cls._settings(**config_arguments(cls, config))}

    @classmethod
    def _parts_layout(cls, config: dict) -> dict:
        """``{name: (dtype, row)}`` of the arrays codes of ``config`` hold (see
        :meth:`rotorq.TurboQuant._parts_layout`)."""
        cfg = cls._canonical_config(config)
        return {"qjl_signs": ("uint8", (cfg["sketch_dim"] + 7) // 8),
                "norms": (cfg["norm_dtype"], None)}

    def __repr__(self):
        return f"QJL(dim={self.dim}, sketch_dim={self.sketch_dim}, seed={self.seed})"

    def _sketch(self, xp):
        key = _backend.namespace_key(xp)
        if key not in self._device_sketch:
            self._device_sketch[key] = xp.asarray(self.sketch)
        return self._device_sketch[key]

    def quantize(self, x) -> QuantizedVectors:
        """Sign sketches and norms of ``x (..., dim)``."""
        arr, origin, be = _backend.float_array(x, "x", dim=self.dim)
        lead = tuple(arr.shape[:-1])
        signs, norms = be.qjl_quantize(arr.reshape(-1, self.dim), self._sketch(be.xp))
        parts = {"qjl_signs": signs.reshape(lead + signs.shape[1:]),
                 "norms": store_norms(be.xp, norms, self.norm_dtype,
                                      source=arr).reshape(lead)}
        return QuantizedVectors._trusted(parts, self.config, origin)

    def scores(self, queries, codes: QuantizedVectors, *, out=None):
        """Unbiased estimates of ``queries (..., m, dim) · keys (..., n, dim)ᵀ`` → ``(..., m, n)``.

        As :meth:`rotorq.TurboQuant.scores`: leading batch axes broadcast, a 1-D query
        ``(dim,)`` gives ``(..., n)``, ``out`` (a float32 array of the result's shape,
        framework and device) receives the result, NaN/Inf queries raise ``ValueError``, and
        on the CPU scores beyond float32's range too.

        Examples
        --------
        >>> import numpy as np, rotorq
        >>> rng = np.random.default_rng(0)
        >>> qjl = rotorq.QJL(32, 128)
        >>> codes = qjl.quantize(rng.standard_normal((10, 32)))
        >>> out = np.empty(10, np.float32)
        >>> qjl.scores(rng.standard_normal(32), codes, out=out) is out
        True
        """
        if not isinstance(codes, QuantizedVectors):
            raise TypeError(f"codes must be QuantizedVectors, got {type(codes).__name__}")
        if codes.config != self.config:
            raise ValueError(f"codes were made by a different quantizer: {codes.config}")
        q, origin, be = _backend.float_array(queries, "queries", dim=self.dim, min_ndim=1)
        one = q.ndim == 1
        if one:
            q = q[None]
        if origin.device != codes.device:
            raise ValueError(f"queries are on {origin.device} but codes are on {codes.device}; "
                             "move them to the same device")
        codes._check_layout(self._expected_parts)
        if codes.ndim < 2:
            raise ValueError(f"codes must have shape (..., n, dim), got {codes.shape}")
        _backend.require_finite(be.xp, q, "queries")
        xp = be.xp
        shape, qmap, kmap = _backend.batch_maps(q.shape[:-2], codes.shape[:-2])
        m_q, n_k = q.shape[-2], codes.shape[-2]
        out_shape = shape + ((n_k,) if one else (m_q, n_k))
        if out is not None:
            _backend.check_out(out, out_shape, origin)
        host = xp is np
        q_in, exps = q, None
        if host:
            q, exps = unit_rows(q)
        bq, bk = math.prod(q.shape[:-2]), math.prod(codes.shape[:-2])
        qf = q.reshape(-1, self.dim).astype(xp.float32)
        qsk = xp.ascontiguousarray((qf @ self._sketch(xp).T).reshape(bq, m_q, self.sketch_dim))
        signs = codes.qjl_signs.reshape(bk, n_k, codes.qjl_signs.shape[-1])
        norms = codes.norms.reshape(bk, n_k).astype(xp.float32)
        res = be.qjl_scores(qsk, xp.asarray(qmap), signs, norms, xp.asarray(kmap), self.scale)
        res = res.reshape(shape + (m_q, n_k))
        if host:
            res = finish_scores(res, exps, q_in, codes.norms)
        res = _backend.to_framework(res.reshape(out_shape), origin)
        return res if out is None else _backend.write_out(out, res)
