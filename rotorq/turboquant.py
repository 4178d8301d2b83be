"""TurboQuant (arXiv 2504.19874): random rotation + per-coordinate Lloyd-Max codebook.

MSE mode stores ``bits`` bits per rotated coordinate and the vector norm. Prod mode
stores ``bits - 1`` bits of MSE codes plus a 1-bit QJL sketch of the residual and its
norm, giving an unbiased inner-product estimator.
"""

from __future__ import annotations

import math

import numpy as np

from . import _arrays, _backend
from ._checks import (
    config_arguments,
    finish_scores,
    flag,
    positive_int,
    seed_value,
    store_norms,
    unit_rows,
)
from .codebook import lloyd_max
from .quantized import QuantizedVectors, register_quantizer
from .rotation import ROTATIONS, make_rotation

MODES = ("mse", "prod")
CODEBOOKS = ("gaussian", "beta")
_STREAM_SKETCH = 0x5EED_0002
def stored_dim_of(rotation, dim):
    """Stored dimension of ``rotation`` ("hadamard", "dense" or "rotor") for vectors of
    ``dim``, without drawing the rotation (:mod:`rotorq.rotation`'s ``stored_dim``)."""
    if rotation == "hadamard":
        return 1 << max(0, (dim - 1).bit_length())
    if rotation == "rotor":
        return 3 * -(-dim // 3)
    return dim


@register_quantizer
class TurboQuant:
    """TurboQuant quantizer for vectors of dimension ``dim``.

    Parameters
    ----------
    dim : int
        Vector dimension (any ``dim >= 1``).
    bits : int
        Total bits per stored coordinate, 1–8 (prod mode: 2–8, i.e. ``bits - 1`` for
        the MSE stage + 1 for QJL).
    mode : {"mse", "prod"}
        ``"mse"`` minimizes reconstruction error; ``"prod"`` adds a QJL residual sketch
        for unbiased inner products.
    rotation : {"hadamard", "dense", "rotor"}
        See :mod:`rotorq.rotation` for the stored dimension each implies.
    seed : int
        Seed of the rotation and the QJL matrix, in ``[0, 2**64)``; same seed, same codes
        everywhere, and distinct seeds give distinct rotations.
    qjl_dim : int, optional
        QJL sketch size ``m`` in prod mode (default: the stored dimension).
    codebook : {"gaussian", "beta"}
        Lloyd-Max model of the rotated coordinates.
    norm_correction : bool
        Store ``‖x‖/‖c[idx]‖`` so reconstructions keep the input's length (True or False;
        other values are refused).
    norm_dtype : {"float16", "float32"}
        Storage of norms; float16 overflow above 65504 raises. float16 keeps a relative
        precision of 2^-11 from 6.1e-5 up; smaller norms are float16 subnormals with an
        absolute precision of 6e-8 (under 3e-8 they store as 0): use ``"float32"`` for
        vectors of such tiny length.

    Notes
    -----
    Arrays in may be numpy arrays, torch tensors, cupy arrays or DLPack objects; results
    come back in the input's framework and on its device. rotorq has no autograd: no
    gradient flows through quantization or scores, so torch tensors that require grad are
    refused with a ``TypeError`` (pass ``x.detach()``).

    Examples
    --------
    >>> import numpy as np, rotorq
    >>> x = np.random.default_rng(0).standard_normal((1000, 128)).astype(np.float32)
    >>> tq = rotorq.TurboQuant(128, bits=3)
    >>> qv = tq.quantize(x)
    >>> x_hat = tq.dequantize(qv)
    >>> err = ((x - x_hat) ** 2).sum(1) / (x ** 2).sum(1)
    >>> bool(0.030 < err.mean() < 0.038), qv.bits_per_coordinate
    (True, 3.125)
    """

    method = "turboquant"

    def __init__(self, dim, bits, *, mode="mse", rotation="hadamard", seed=0, qjl_dim=None,
                 codebook="gaussian", norm_correction=False, norm_dtype="float16"):
        cfg = self._settings(dim, bits, mode=mode, rotation=rotation, seed=seed,
                             qjl_dim=qjl_dim, codebook=codebook,
                             norm_correction=norm_correction, norm_dtype=norm_dtype)
        self.dim, self.bits, self.mode, self.seed = cfg["dim"], cfg["bits"], cfg["mode"], cfg["seed"]
        self.codebook, self.norm_dtype = cfg["codebook"], cfg["norm_dtype"]
        self.norm_correction = cfg["norm_correction"]
        rotation, qjl_dim = cfg["rotation"], cfg["qjl_dim"]
        self.rotation = make_rotation(rotation, self.dim, self.seed)
        self.mse_bits = self.bits - (1 if self.mode == "prod" else 0)
        big_d = self.rotation.stored_dim
        # Hadamard spreads the energy over the padded D coordinates; the others keep ~1/d.
        coord_dim = big_d if rotation == "hadamard" else self.dim
        if self.codebook == "beta" and coord_dim >= 2:
            c, b = lloyd_max(self.mse_bits, coord_dim, distribution="beta")
        else:
            c, b = lloyd_max(self.mse_bits, coord_dim)
        self.centroids = c.astype(np.float32)
        self.boundaries = b.astype(np.float32)
        self.qjl_dim = qjl_dim
        self.sketch = None
        if self.mode == "prod":
            rng = np.random.default_rng([self.seed, _STREAM_SKETCH])
            self.sketch = rng.standard_normal((self.qjl_dim, big_d)).astype(np.float32)
            self.qjl_scale = math.sqrt(math.pi / 2) / self.qjl_dim
        self._device_consts: dict = {}
        self._expected_parts = self._parts_layout(self.config)

    @staticmethod
    def _settings(dim, bits, *, mode="mse", rotation="hadamard", seed=0, qjl_dim=None,
                  codebook="gaussian", norm_correction=False, norm_dtype="float16"):
        """The constructor's arguments checked and in canonical form: the config without
        ``"method"`` (``qjl_dim`` resolved in prod mode). Draws nothing."""
        dim = positive_int(dim, "dim")
        if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
            raise TypeError(f"bits must be an int, got {type(bits).__name__}")
        if not isinstance(mode, str) or mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        low = 2 if mode == "prod" else 1
        if not low <= bits <= 8:
            raise ValueError(f"bits must be in {low}..8 for mode={mode!r}, got {bits}"
                             + (" (prod mode spends 1 bit on QJL)" if mode == "prod" else ""))
        if not isinstance(rotation, str) or rotation not in ROTATIONS:
            raise ValueError(f"rotation must be one of {ROTATIONS}, got {rotation!r}")
        if not isinstance(codebook, str) or codebook not in CODEBOOKS:
            raise ValueError(f"codebook must be one of {CODEBOOKS}, got {codebook!r}")
        if not isinstance(norm_dtype, str) or norm_dtype not in ("float16", "float32"):
            raise ValueError(f"norm_dtype must be 'float16' or 'float32', got {norm_dtype!r}")
        if mode == "prod":
            qjl_dim = stored_dim_of(rotation, dim) if qjl_dim is None else positive_int(
                qjl_dim, "qjl_dim")
        elif qjl_dim is not None:
            raise ValueError("qjl_dim is only used with mode='prod'")
        return {"dim": dim, "bits": int(bits), "mode": str(mode), "rotation": str(rotation),
                "seed": seed_value(seed), "qjl_dim": qjl_dim, "codebook": str(codebook),
                "norm_correction": flag(norm_correction, "norm_correction"),
                "norm_dtype": str(norm_dtype)}

    # -- configuration ----------------------------------------------------------------
    @property
    def config(self) -> dict:
        """Everything that determines the codes; equal configs give equal codes."""
        return {"method": self.method, "dim": self.dim, "bits": self.bits, "mode": self.mode,
                "rotation": self.rotation.kind, "seed": self.seed, "qjl_dim": self.qjl_dim,
                "codebook": self.codebook, "norm_correction": self.norm_correction,
                "norm_dtype": self.norm_dtype}

    @classmethod
    def from_config(cls, config: dict) -> TurboQuant:
        """Rebuild the quantizer that produced codes with ``config``.

        Raises ``TypeError``/``ValueError`` as the constructor does, and for a config that
        is not a dict, names another method, lacks ``dim`` or ``bits``, or has unknown keys.

        Examples
        --------
        >>> import rotorq
        >>> tq = rotorq.TurboQuant(64, 3, mode="prod", seed=5)
        >>> rotorq.TurboQuant.from_config(tq.config).config == tq.config
        True
        """
        return cls(**config_arguments(cls, config))

    @classmethod
    def _canonical_config(cls, config: dict) -> dict:
        """``config`` checked as :meth:`from_config` checks it, in the canonical form that
        :attr:`config` reports, without building the quantizer (no rotation is drawn)."""
        return {"method": cls.method, **cls._settings(**config_arguments(cls, config))}

    @classmethod
    def _parts_layout(cls, config: dict) -> dict:
        """The arrays that codes of ``config`` hold: ``{name: (dtype, row)}``, ``row`` the
        length of the last axis (bytes of packed codes or signs) or None for one value per
        vector. Draws nothing."""
        cfg = cls._canonical_config(config)
        big_d = stored_dim_of(cfg["rotation"], cfg["dim"])
        mse_bits = cfg["bits"] - (1 if cfg["mode"] == "prod" else 0)
        out = {"codes": ("uint8", (big_d * mse_bits + 7) // 8), "norms": (cfg["norm_dtype"], None)}
        if cfg["mode"] == "prod":
            out["qjl_signs"] = ("uint8", (cfg["qjl_dim"] + 7) // 8)
            out["qjl_norms"] = (cfg["norm_dtype"], None)
        return out

    @property
    def stored_dim(self) -> int:
        return self.rotation.stored_dim

    def __repr__(self):
        return (f"TurboQuant(dim={self.dim}, bits={self.bits}, mode={self.mode!r}, "
                f"rotation={self.rotation.kind!r}, seed={self.seed})")

    def _consts(self, xp):
        key = _backend.namespace_key(xp)
        if key not in self._device_consts:
            self._device_consts[key] = {
                "centroids": xp.asarray(self.centroids),
                "boundaries": xp.asarray(self.boundaries),
                "sketch": None if self.sketch is None else xp.asarray(self.sketch),
            }
        return self._device_consts[key]

    def _check_codes(self, codes, name="codes", layout=True):
        if not isinstance(codes, QuantizedVectors):
            raise TypeError(f"{name} must be QuantizedVectors, got {type(codes).__name__}")
        if codes.config != self.config:
            diff = {k: (codes.config.get(k), v) for k, v in self.config.items()
                    if codes.config.get(k) != v}
            raise ValueError(f"{name} were made by a different quantizer (codes vs this): {diff}")
        if layout:
            codes._check_layout(self._expected_parts, name)

    # -- verbs ------------------------------------------------------------------------
    def quantize(self, x) -> QuantizedVectors:
        """Compress ``x`` of shape ``(..., dim)`` (float16/bfloat16/float32/float64).

        Raises ``ValueError`` for NaN/Inf and for norms beyond ``norm_dtype``'s range,
        ``TypeError`` for non-floating dtypes and for torch tensors that require grad.
        """
        return self._quantize(x, True)

    def _quantize(self, x, check):
        """:meth:`quantize`; ``check=False`` skips the finiteness and range check of the
        norms (a device sync on a GPU; :class:`rotorq.KVCache` with ``check_finite=False``),
        a list defers it (:func:`store_norms`)."""
        arr, origin, be = _backend.float_array(x, "x", dim=self.dim)
        lead = tuple(arr.shape[:-1])
        rows = arr.reshape(-1, self.dim)
        k = self._consts(be.xp)
        codes, norms, signs, qnorms = be.quantize(
            rows, self.rotation, k["boundaries"], k["centroids"], self.mse_bits,
            self.norm_correction, k["sketch"])
        parts = {"codes": codes.reshape(lead + codes.shape[1:]),
                 "norms": store_norms(be.xp, norms, self.norm_dtype, check=check,
                                      source=rows).reshape(lead)}
        if self.mode == "prod":
            parts["qjl_signs"] = signs.reshape(lead + signs.shape[1:])
            parts["qjl_norms"] = store_norms(be.xp, qnorms, self.norm_dtype, check=check,
                                             source=rows).reshape(lead)
        return QuantizedVectors._trusted(parts, self.config, origin)

    def dequantize(self, codes: QuantizedVectors, dtype=None):
        """Reconstruct vectors ``(..., dim)`` (prod mode adds the QJL residual term).

        Parameters
        ----------
        codes : QuantizedVectors
            Made by this quantizer (or one of equal :attr:`config`).
        dtype : {None, "float16", "float32", "float64"}, optional
            Of the result (numpy dtypes, types and torch dtypes are accepted too); computed
            in float32 and cast. Default float32.

        Returns
        -------
        array (..., dim)
            In the framework and on the device of the quantized input.

        Examples
        --------
        >>> import numpy as np, rotorq
        >>> tq = rotorq.TurboQuant(32, 4)
        >>> qv = tq.quantize(np.random.default_rng(0).standard_normal((5, 32)))
        >>> tq.dequantize(qv).dtype, tq.dequantize(qv, dtype="float16").dtype
        (dtype('float32'), dtype('float16'))
        """
        dtype = _backend.result_dtype(dtype)
        self._check_codes(codes)
        be = _backend.get(codes.device)
        xp = be.xp
        lead = codes.shape[:-1]
        flat_codes = codes.codes.reshape(-1, codes.codes.shape[-1])
        norms = codes.norms.reshape(-1).astype(xp.float32)
        k = self._consts(xp)
        if self.mode == "mse":
            out = be.dequantize(flat_codes, norms, self.rotation, k["centroids"], self.mse_bits)
        else:
            rot_out = be.dequantize_rotated(flat_codes, norms, self.stored_dim, k["centroids"],
                                            self.mse_bits)
            pm = be.unpack_codes(codes.qjl_signs.reshape(-1, codes.qjl_signs.shape[-1]), 1,
                                 self.qjl_dim).astype(xp.float32) * 2 - 1
            gamma = codes.qjl_norms.reshape(-1, 1).astype(xp.float32) * np.float32(self.qjl_scale)
            rot_out += (pm @ k["sketch"]) * gamma
            out = be.unrotate(rot_out, self.rotation)
        if dtype != np.float32:
            with np.errstate(over="ignore"):  # float16: beyond 65504 becomes inf, as astype
                out = out.astype(dtype)
        return _backend.to_framework(out.reshape(lead + (self.dim,)), codes.origin)

    def rotate(self, x):
        """Rotate ``x (..., dim)`` into the stored domain ``(..., stored_dim)``, float32."""
        arr, origin, be = _backend.float_array(x, "x", dim=self.dim)
        out = be.rotate(arr.reshape(-1, self.dim), self.rotation)
        return _backend.to_framework(out.reshape(arr.shape[:-1] + (self.stored_dim,)), origin)

    def scores(self, queries, codes: QuantizedVectors, *, out=None):
        """Estimated inner products of ``queries (..., m, dim)`` with ``codes (..., n, dim)``.

        Computed on the packed codes: the queries are rotated once, then each key is a
        gather-dot ``norm · ⟨Π q, c[idx]⟩`` (plus the QJL term in prod mode). Leading
        batch axes broadcast. Returns float32 ``(..., m, n)`` in the queries' framework; a
        1-D query ``(dim,)`` gives ``(..., n)`` (its axis dropped, as numpy's matmul does).
        On the CPU, NaN/Inf queries and scores beyond float32's range raise ``ValueError``
        (query rows of any finite magnitude are scored without overflow inside); on a GPU
        neither is checked (that would force a device sync per call): they give NaN or Inf
        scores.

        ``out``, when given, receives the scores and is returned: a float32 array of the
        result's shape, in the framework and on the device the result has (numpy for numpy
        queries, torch for torch tensors, cupy on a GPU); else ``ValueError``.

        Examples
        --------
        >>> import numpy as np, rotorq
        >>> rng = np.random.default_rng(1)
        >>> keys, q = rng.standard_normal((2, 500, 64)), rng.standard_normal((3, 64))
        >>> tq = rotorq.TurboQuant(64, 4)
        >>> s = tq.scores(q, tq.quantize(keys))
        >>> exact = q @ keys.transpose(0, 2, 1)
        >>> s.shape, bool(np.corrcoef(s.ravel(), exact.ravel())[0, 1] > 0.99)
        ((2, 3, 500), True)
        >>> tq.scores(q[0], tq.quantize(keys)).shape  # one query: its axis dropped
        (2, 500)
        """
        q, origin, be, key_args, full_shape, out_shape = self._score_inputs(queries, codes)
        if out is not None:
            _backend.check_out(out, out_shape, origin)
        xp = be.xp
        host = xp is np
        q_in, exps = q, None
        if host:
            q, exps = unit_rows(q)
        bq, m_q = math.prod(q.shape[:-2]), q.shape[-2]
        qrot = be.rotate(q.reshape(-1, self.dim), self.rotation).reshape(bq, m_q, self.stored_dim)
        qsk = None
        if self.mode == "prod":
            qsk = xp.ascontiguousarray(qrot @ self._consts(xp)["sketch"].T)
        res = be.scores(qrot, qsk, *key_args).reshape(full_shape)
        if host:
            res = finish_scores(res, exps, q_in, codes.norms)
        res = _backend.to_framework(res.reshape(out_shape), origin)
        return res if out is None else _backend.write_out(out, res)

    def _score_inputs(self, queries, codes):
        """Check the arguments of :meth:`scores`; returns ``(queries as the backend sees
        them (..., m, dim), origin, backend, (qmap, codes, norms, signs, qjl_norms, kmap,
        centroids, bits, qjl_scale) as be.scores takes them, the shape (..., m, n), the
        result's shape)``; a 1-D query is seen as (1, dim) and dropped from the result."""
        self._check_codes(codes, layout=False)
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
        xp = be.xp
        if xp is np:
            # On a GPU the check would cost a device sync per call (~10× the launch): there,
            # non-finite queries are not refused; they give NaN scores for those queries.
            _backend.require_finite(xp, q, "queries")
        shape, qmap, kmap = _backend.device_batch_maps(xp, origin.device, q.shape[:-2],
                                                       codes.shape[:-2])
        m_q, n_k = q.shape[-2], codes.shape[-2]
        bk = math.prod(codes.shape[:-2])
        k = self._consts(xp)
        flat = codes.codes.reshape(bk, n_k, codes.codes.shape[-1])
        norms = codes.norms.reshape(bk, n_k).astype(xp.float32, copy=False)
        if self.mode == "mse":
            key_args = (qmap, flat, norms, None, None, kmap, k["centroids"], self.mse_bits, 0.0)
        else:
            signs = codes.qjl_signs.reshape(bk, n_k, codes.qjl_signs.shape[-1])
            qn = codes.qjl_norms.reshape(bk, n_k).astype(xp.float32, copy=False)
            key_args = (qmap, flat, norms, signs, qn, kmap, k["centroids"], self.mse_bits,
                        self.qjl_scale)
        full = tuple(shape) + (m_q, n_k)
        return q, origin, be, key_args, full, (full[:-2] + (n_k,) if one else full)

    def prepare_scores(self, queries, codes: QuantizedVectors) -> PreparedScores:
        """:meth:`scores` against fixed ``codes``, prepared for many calls with queries of
        the shape, dtype, framework and device of ``queries``.

        The arguments are checked, and on a GPU the kernels chosen and their arguments packed,
        once; a call then checks the new queries' attributes and, on a GPU, launches the
        prepared rotation and score kernels with the new data pointers, which spends far less
        host time per call than :meth:`scores`. The result equals :meth:`scores` of the same
        queries and codes.

        Parameters
        ----------
        queries : array (..., m, dim) or (dim,)
            Example queries (numpy, torch or cupy; values unused): every call takes arrays of
            this framework, device, shape and dtype.
        codes : QuantizedVectors
            The keys, made by this quantizer. They must not change while the prepared call
            is used (their float32 norms are taken once, here).

        Returns
        -------
        PreparedScores
            ``prepared(queries, out=None)`` returns ``scores(queries, codes)``, written into
            ``out`` when given (float32 of the result's shape, framework and device).

        Raises
        ------
        TypeError, ValueError
            As :meth:`scores`, and when ``queries`` is not an array. A call raises them for
            queries of another framework, device, shape or dtype, on a GPU for queries that
            are not C-contiguous, and as :meth:`scores` for NaN/Inf queries on the CPU (on a
            GPU they are not checked).

        Notes
        -----
        On a GPU, calls reuse a buffer per stream for the rotated queries: use a prepared call
        from one thread at a time.

        Examples
        --------
        >>> import numpy as np, rotorq
        >>> rng = np.random.default_rng(2)
        >>> tq = rotorq.TurboQuant(64, 3)
        >>> codes = tq.quantize(rng.standard_normal((500, 64)))
        >>> q = rng.standard_normal((4, 64)).astype(np.float32)
        >>> scores_of = tq.prepare_scores(q, codes)
        >>> out = np.empty((4, 500), np.float32)
        >>> for _ in range(3):
        ...     q = rng.standard_normal((4, 64)).astype(np.float32)
        ...     s = scores_of(q, out=out)
        >>> s is out, bool((s == tq.scores(q, codes)).all())
        (True, True)
        """
        return PreparedScores(self, queries, codes)

    # -- for containers that check many quantizations at once (rotorq.kv) -------------
    def quantize_unchecked(self, x, deferred=None) -> QuantizedVectors:
        """:meth:`quantize` with the check of the stored norms left to the caller.

        :meth:`quantize` refuses NaN/Inf input and norms beyond ``norm_dtype``'s range at
        once, which costs a device synchronization per call on a GPU. A container that
        quantizes several blocks per operation (:class:`rotorq.KVCache`) checks them all
        with one synchronization instead.

        Parameters
        ----------
        x : array, (..., dim)
            As :meth:`quantize`.
        deferred : list, optional
            Each stored norm array (float32 as the kernel computed it) is appended as
            ``(norms, norm_dtype, name)`` for the caller to check (the KV cache does, in
            :mod:`rotorq.kv.checks`). ``None``: no check at all.

        Returns
        -------
        QuantizedVectors
            The codes of :meth:`quantize`. Unchecked: NaN/Inf input gives NaN norms, norms
            beyond ``norm_dtype``'s range are stored as inf.

        Examples
        --------
        >>> import numpy as np, rotorq
        >>> tq = rotorq.TurboQuant(16, 3)
        >>> x = np.random.default_rng(0).standard_normal((4, 16))
        >>> later = []
        >>> qv = tq.quantize_unchecked(x, later)
        >>> [(norms.shape, dtype) for norms, dtype, _ in later]
        [((4,), 'float16')]
        >>> bool((qv.codes == tq.quantize(x).codes).all())
        True
        """
        return self._quantize(x, False if deferred is None else deferred)

    def device_constants(self, xp) -> dict:
        """The codebook and the QJL sketch as arrays of namespace ``xp`` (numpy, or cupy on
        the current device), made once per device and shared: do not write to them.

        Returns
        -------
        dict
            ``"centroids"`` (``2**mse_bits``,) and ``"boundaries"`` float32, ``"sketch"``
            (``qjl_dim``, ``stored_dim``) float32 in prod mode, else None.

        Examples
        --------
        >>> import numpy as np, rotorq
        >>> c = rotorq.TurboQuant(64, 3, mode="prod").device_constants(np)
        >>> c["centroids"].shape, c["boundaries"].shape, c["sketch"].shape
        ((4,), (3,), (64, 64))
        """
        return self._consts(xp)


class PreparedScores:
    """``quantizer.scores(·, codes)`` prepared for queries like an example:
    :meth:`TurboQuant.prepare_scores` makes it, its docstring says what a call does."""

    def __init__(self, quantizer, queries, codes):
        if not hasattr(queries, "shape") or not hasattr(queries, "dtype"):
            raise TypeError("queries must be an array (numpy, torch or cupy), got "
                            f"{type(queries).__name__}")
        q, origin, be, key_args, full_shape, out_shape = quantizer._score_inputs(queries, codes)
        self.quantizer, self.codes, self.origin = quantizer, codes, origin
        self.shape, self.dtype = tuple(queries.shape), queries.dtype
        self.out_shape = out_shape
        self._full_shape = full_shape
        self._one = len(self.shape) == 1  # a 1-D query: the plan sees (1, dim)
        self._plan = be.prepare_scores(queries[None] if self._one else queries, q,
                                       quantizer.rotation,
                                       quantizer.device_constants(be.xp)["sketch"], *key_args,
                                       full_shape)

    def __repr__(self):
        return (f"PreparedScores({self.quantizer!r}, queries {self.shape} {self.dtype} on "
                f"{self.origin.framework}/{self.origin.device}, codes {self.codes.shape})")

    def __call__(self, queries, out=None):
        """``quantizer.scores(queries, codes)``, into ``out`` when given."""
        if self._plan is not None:
            if not self._one:
                return self._plan(queries, out)
            if hasattr(queries, "shape") and tuple(queries.shape) == self.shape:
                queries = queries[None]
            if out is None:
                return self._plan(queries, None).reshape(self.out_shape)
            fits = hasattr(out, "shape") and tuple(out.shape) == self.out_shape
            self._plan(queries, out.reshape(self._full_shape) if fits else out)
            return out
        o = self.origin
        if (_arrays.origin_of(queries, "queries") != o or not hasattr(queries, "shape")
                or tuple(queries.shape) != self.shape or queries.dtype != self.dtype):
            _backend.prepared_mismatch(queries, "queries", o, self.shape, self.dtype, False)
        return self.quantizer.scores(queries, self.codes, out=out)
