"""Exact, cheap transforms that make keys and values easier to quantize (fidelity levers).

A KV cache quantizer (TurboQuant) spends its error budget in proportion to each vector's
length, spread evenly over all directions by the random rotation. Real keys are far from
that ideal: most of their energy is a per-head offset that every token shares, and their
channels differ by 4–10× in RMS while the queries weight the channels differently again.
The transforms here remove that structure before quantization and put it back (or move
it to the query side) afterwards, so that attention is unchanged except for the smaller
quantization error:

* **key offset** ``m_t`` (:class:`KeyPrep`): quantize ``k_t − m_t`` instead of ``k_t``.
  With a constant post-RoPE mean ``m`` the term ``q·m`` is the same for every key of a
  query, so softmax ignores it (no correction at all). With a *RoPE-aware* mean
  ``m_t = RoPE_t(μ)`` (``μ`` the mean of the un-rotated keys) the offset follows each
  key's rotation and removes ~80% of the key energy instead of ~60%; the per-key term
  ``q·m_t`` (:meth:`KeyPrep.score_bias`) is then added to the scores.
* **per-channel scales** ``s`` (:func:`channel_scales`): quantize ``s ⊙ k`` and score with
  ``q / s`` — exact, since ``(q/s)·(s⊙k) = q·k``. With isotropic quantization noise of
  variance ∝ ``Σ s_i² σk_i²`` the score error is ∝ ``(Σ s_i² σk_i²)(Σ q_i²/s_i²)``,
  minimized (Cauchy–Schwarz) by ``s_i² ∝ σq_i / σk_i``: ``alpha = 0.5``.
* **bit allocation** (:func:`allocate_bits`): give the extra bits of a fractional budget
  to the layers/heads whose measured sensitivity is largest.
* **honest accounting** (:func:`kv_bits_per_coordinate`): codes, norms, full-precision
  tokens and per-sequence side information, per stored coordinate.

Channels follow the rotate-half RoPE convention (Hugging Face / Llama): channel ``i`` is
paired with ``i + d/2`` and rotated by ``t·θ_i``, ``θ_i = base^(−2i/d)``.

The array functions accept numpy, cupy or torch arrays (via ``array_api_compat``); the
fitted parameters live on the host as float32 numpy arrays and are moved to the input's
device on use.
"""

from __future__ import annotations

import itertools

import numpy as np
from array_api_compat import array_namespace
from array_api_compat import device as _device

__all__ = ["KeyPrep", "allocate_bits", "channel_scales", "kv_bits_per_coordinate", "rope",
           "unrope"]


def _as(xp, a, like):
    """``a`` (host numbers) as an array of ``like``'s namespace, dtype and device."""
    return xp.asarray(np.asarray(a, dtype=np.float64), dtype=like.dtype, device=_device(like))


def _rope_tables(positions, dim, base):
    if dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {dim}")
    inv_freq = float(base) ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    angles = np.outer(np.asarray(positions, dtype=np.float64).reshape(-1), inv_freq)
    angles = np.concatenate([angles, angles], axis=1)
    return np.cos(angles), np.sin(angles)


def rope(x, positions, base=10000.0, *, inverse=False):
    """Rotate-half rotary position embedding of ``x (..., T, d)`` at ``positions (T,)``.

    Channel pairs ``(i, i + d/2)`` are rotated by the angle ``positions · base^(−2i/d)``
    (``inverse=True``: by its negative, undoing :func:`rope`). Computed in float64 tables,
    returned in ``x``'s dtype and framework.

    Parameters
    ----------
    x : array, (..., T, d)
        Vectors, ``d`` even.
    positions : array_like of int, (T,)
        Token positions.
    base : float
        RoPE frequency base (``rope_theta``; SmolLM2 uses 100000).
    inverse : bool
        Apply the inverse rotation.

    Returns
    -------
    array, same shape and dtype as ``x``

    Examples
    --------
    >>> import numpy as np
    >>> from rotorq.kv.prep import rope, unrope
    >>> x = np.random.default_rng(0).standard_normal((2, 5, 8))
    >>> y = rope(x, np.arange(5), 100.0)
    >>> bool(np.allclose(unrope(y, np.arange(5), 100.0), x))
    True
    >>> bool(np.allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1)))
    True
    """
    xp = array_namespace(x)
    d = x.shape[-1]
    cos, sin = _rope_tables(positions, d, base)
    if cos.shape[0] != x.shape[-2]:
        raise ValueError(f"positions has {cos.shape[0]} entries but x has {x.shape[-2]} tokens")
    cos, sin = _as(xp, cos, x), _as(xp, -sin if inverse else sin, x)
    half = d // 2
    rotated = xp.concat([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def unrope(x, positions, base=10000.0):
    """Inverse of :func:`rope`: the pre-RoPE vectors of post-RoPE ``x (..., T, d)``."""
    return rope(x, positions, base, inverse=True)


def channel_scales(key_rms, query_rms, alpha=0.5, *, tie_rope_pairs=False):
    """Per-channel key scales ``s`` that minimize the score error of a rotated quantizer.

    Keys are quantized as ``s ⊙ k`` and scored with ``q / s``. A random rotation spreads
    the quantization error evenly over the channels, with a variance proportional to
    ``Σ s_i² σk_i²``; the score error ``Σ (q_i/s_i)·e_i`` then has variance proportional to
    ``(Σ s_i² σk_i²)·(Σ σq_i² / s_i²)``, which is smallest (Cauchy–Schwarz) for
    ``s_i = (σq_i / σk_i)^½``, i.e. ``alpha = 0.5``; the minimum is ``(Σ σq_i σk_i)²``
    versus ``Σ σk_i² · Σ σq_i²`` without scales. ``alpha = 0`` gives no scaling,
    ``alpha = 1`` full equalization (usually worse).

    Parameters
    ----------
    key_rms : array_like, (..., d)
        RMS of each key channel over calibration tokens (after any offset removal).
    query_rms : array_like, (..., d)
        RMS of each query channel (pool the query heads of a GQA group).
    alpha : float
        Exponent of ``σq / σk``.
    tie_rope_pairs : bool
        Give channels ``i`` and ``i + d/2`` the same scale (their RMS pooled). Tied scales
        commute with RoPE, so they can be folded into the k/q projection weights; untied
        scales (the default, measured better on post-RoPE keys) are applied after RoPE.

    Returns
    -------
    numpy.ndarray float32, (..., d)
        Positive scales with geometric mean 1 over the last axis.

    Examples
    --------
    >>> import numpy as np
    >>> from rotorq.kv.prep import channel_scales
    >>> sk, sq = np.array([4.0, 1.0, 1.0, 1.0]), np.array([1.0, 1.0, 1.0, 4.0])
    >>> s = channel_scales(sk, sq)
    >>> before = (sk ** 2).sum() * (sq ** 2).sum()
    >>> after = ((s * sk) ** 2).sum() * ((sq / s) ** 2).sum()
    >>> round(float(before / after), 3), round(float(after), 3), float((sk * sq).sum() ** 2)
    (3.61, 100.0, 100.0)
    """
    sk = np.asarray(key_rms, dtype=np.float64)
    sq = np.asarray(query_rms, dtype=np.float64)
    if sk.shape[-1] != sq.shape[-1]:
        raise ValueError(f"key_rms and query_rms differ in channels: {sk.shape} vs {sq.shape}")
    if tie_rope_pairs:
        sk, sq = _tie_pairs(sk), _tie_pairs(sq)
    tiny = np.finfo(np.float64).tiny
    ratio = np.maximum(sq, tiny) / np.maximum(sk, tiny)
    log_s = alpha * np.log(ratio)
    log_s -= log_s.mean(axis=-1, keepdims=True)
    return np.exp(log_s).astype(np.float32)


def _tie_pairs(r):
    half = r.shape[-1] // 2
    pooled = np.sqrt((r[..., :half] ** 2 + r[..., half:] ** 2) / 2)
    return np.concatenate([pooled, pooled], axis=-1)


def _mean_key(keys, positions=None, rope_base=None):
    """:meth:`KeyPrep.offset_of` in float64 (the KV cache rounds it once, to float16)."""
    k = np.asarray(_host(keys), dtype=np.float64)
    if rope_base is not None:
        pos = np.arange(k.shape[-2]) if positions is None else positions
        k = unrope(k, pos, rope_base)
    return k.mean(axis=-2)


class KeyPrep:
    """Offset removal and channel scaling of the keys, with the matching query transform.

    For a key ``k_t`` at position ``t`` and any query ``q``::

        keys(k)_t   = s ⊙ (k_t − m_t)          (what the cache quantizes)
        queries(q)  = q / s                     (what scores the codes)
        q·k_t       = queries(q)·keys(k)_t + score_bias(q)_t        (exactly)
        restore(keys(k)) = k

    where ``m_t = RoPE_t(μ)`` if ``rope_base`` is given (``μ``: a pre-RoPE mean; the
    offset follows the key's rotation) and ``m_t = μ`` otherwise (a post-RoPE mean; then
    ``score_bias`` is the same for every key of a query and softmax ignores it).

    Parameters
    ----------
    num_kv_heads, head_dim : int
        Shape of the keys ``(num_kv_heads, T, head_dim)``.
    scales : array_like, (num_kv_heads, head_dim), optional
        Channel scales ``s`` (:func:`channel_scales`); default all ones.
    mean : array_like, (num_kv_heads, head_dim), optional
        The offset ``μ``; default zeros.
    rope_base : float, optional
        Treat ``mean`` as pre-RoPE and rotate it to each key's position.

    Examples
    --------
    >>> import numpy as np
    >>> from rotorq.kv.prep import KeyPrep, rope
    >>> rng = np.random.default_rng(0)
    >>> pos = np.arange(50)
    >>> k = rope(rng.standard_normal((2, 50, 16)) + 5.0, pos, 1e4)   # offset before RoPE
    >>> q = rng.standard_normal((6, 50, 16))                 # 6 query heads (GQA 3:1)
    >>> prep = KeyPrep.fit(k, q, rope_base=1e4)
    >>> kp = prep.keys(k, pos)
    >>> float(np.linalg.norm(kp) / np.linalg.norm(k)) < 0.4      # offset removed
    True
    >>> qk = np.einsum("gtd,gsd->gts", q, np.repeat(k, 3, axis=0))
    >>> qp = prep.queries(q)
    >>> rebuilt = np.einsum("gtd,gsd->gts", qp, np.repeat(kp, 3, axis=0)) + prep.score_bias(q, pos)
    >>> bool(np.allclose(rebuilt, qk)), bool(np.allclose(prep.restore(kp, pos), k))
    (True, True)
    """

    def __init__(self, num_kv_heads, head_dim, *, scales=None, mean=None, rope_base=None):
        self.num_kv_heads = int(num_kv_heads)
        self.head_dim = int(head_dim)
        shape = (self.num_kv_heads, self.head_dim)

        def param(a, fill, name):
            if a is None:
                return np.full(shape, fill, np.float32)
            a = np.asarray(a, dtype=np.float32)
            if a.shape != shape:
                raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
            if not np.all(np.isfinite(a)):
                raise ValueError(f"{name} contains NaN or Inf")
            return a

        self.scales = param(scales, 1.0, "scales")
        if np.any(self.scales <= 0):
            raise ValueError("scales must be positive")
        self.mean = param(mean, 0.0, "mean")
        self.rope_base = None if rope_base is None else float(rope_base)

    # -- fitting ----------------------------------------------------------------------
    @staticmethod
    def offset_of(keys, positions=None, rope_base=None):
        """Mean key ``μ (H, d)``: post-RoPE, or pre-RoPE when ``rope_base`` is given.

        Parameters
        ----------
        keys : array, (H, T, d)
            Post-RoPE keys, e.g. the first block of a prompt.
        positions : array_like of int, (T,), optional
            Their positions (default ``0..T-1``); used with ``rope_base``.
        rope_base : float, optional
        """
        return _mean_key(keys, positions, rope_base).astype(np.float32)

    @classmethod
    def fit(cls, keys, queries=None, *, positions=None, rope_base=None, alpha=0.5,
            mean=True, tie_rope_pairs=False):
        """Fit the offset and (given queries) the channel scales on calibration data.

        Parameters
        ----------
        keys : array, (H, T, d)
            Post-RoPE calibration keys.
        queries : array, (Hq, T', d), optional
            Post-RoPE calibration queries, ``Hq`` a multiple of ``H`` (query head ``h``
            reads KV head ``h // (Hq // H)``). Without queries the scales stay 1.
        positions : array_like of int, (T,), optional
            Key positions (default ``0..T-1``).
        rope_base : float, optional
            Use a RoPE-aware offset (recommended for RoPE models).
        alpha : float
            Exponent of :func:`channel_scales`.
        mean : bool
            Remove the offset (``False``: scales only).
        tie_rope_pairs : bool
            See :func:`channel_scales`.

        Returns
        -------
        KeyPrep
        """
        k = np.asarray(_host(keys), dtype=np.float64)
        heads, n_tok, d = k.shape
        pos = np.arange(n_tok) if positions is None else np.asarray(positions)
        mu = cls.offset_of(k, pos, rope_base) if mean else np.zeros((heads, d), np.float32)
        prep = cls(heads, d, mean=mu, rope_base=rope_base)
        if queries is not None:
            q = np.asarray(_host(queries), dtype=np.float64)
            if q.ndim != 3 or q.shape[0] % heads or q.shape[2] != d:
                raise ValueError(f"queries must have shape (k·{heads}, T, {d}), got {q.shape}")
            q_rms = np.sqrt((q.reshape(heads, -1, d) ** 2).mean(axis=1))
            resid = k - prep.offsets(pos)
            k_rms = np.sqrt((resid ** 2).mean(axis=1))
            prep.scales = channel_scales(k_rms, q_rms, alpha, tie_rope_pairs=tie_rope_pairs)
        return prep

    # -- transforms -------------------------------------------------------------------
    def offsets(self, positions, like=None):
        """The offsets ``m_t`` as an ``(H, T, d)`` array (of ``like``'s framework)."""
        like = np.zeros(1, np.float32) if like is None else like
        xp = array_namespace(like)
        n_tok = len(np.asarray(positions).reshape(-1))
        mu = np.broadcast_to(self.mean[:, None, :].astype(np.float64),
                             (self.num_kv_heads, n_tok, self.head_dim))
        if self.rope_base is not None:
            mu = rope(mu, positions, self.rope_base)
        return _as(xp, mu, like)

    def _check(self, x, name, heads):
        if x.ndim < 3 or x.shape[-1] != self.head_dim or x.shape[-3] != heads:
            raise ValueError(f"{name} must have shape (..., {heads}, T, {self.head_dim}), "
                             f"got {tuple(x.shape)}")

    def keys(self, k, positions):
        """``s ⊙ (k − m_t)`` for keys ``k (..., H, T, d)`` at ``positions (T,)``."""
        self._check(k, "keys", self.num_kv_heads)
        xp = array_namespace(k)
        return (k - self.offsets(positions, k)) * _as(xp, self.scales[:, None, :], k)

    def restore(self, kp, positions):
        """Inverse of :meth:`keys`: ``kp / s + m_t`` (apply it to dequantized keys)."""
        self._check(kp, "keys", self.num_kv_heads)
        xp = array_namespace(kp)
        return kp / _as(xp, self.scales[:, None, :], kp) + self.offsets(positions, kp)

    def _group(self, q):
        hq = q.shape[-3]
        if hq % self.num_kv_heads:
            raise ValueError(f"queries have {hq} heads, not a multiple of {self.num_kv_heads}")
        return hq // self.num_kv_heads

    def queries(self, q):
        """``q / s`` for queries ``q (..., Hq, T, d)``; query head ``h`` uses KV head
        ``h // (Hq // H)``."""
        if q.ndim < 3 or q.shape[-1] != self.head_dim:
            raise ValueError(f"queries must have shape (..., Hq, T, {self.head_dim}), "
                             f"got {tuple(q.shape)}")
        xp = array_namespace(q)
        g = self._group(q)
        s = np.repeat(self.scales, g, axis=0)[:, None, :]
        return q / _as(xp, s, q)

    def score_bias(self, q, positions):
        """``q · m_t``: the term to add to the scores of ``queries(q)`` against the codes.

        Parameters
        ----------
        q : array, (..., Hq, Tq, d)
            Queries (not transformed).
        positions : array_like of int, (T,)
            Positions of the keys.

        Returns
        -------
        array, (..., Hq, Tq, T)
            Constant along the last axis when ``rope_base`` is None (then softmax ignores
            it and a cache may skip it).
        """
        if q.ndim < 3 or q.shape[-1] != self.head_dim:
            raise ValueError(f"queries must have shape (..., Hq, Tq, {self.head_dim})")
        xp = array_namespace(q)
        g = self._group(q)
        m = self.offsets(positions, q)                  # (H, T, d)
        m = xp.repeat(m, g, axis=0) if g > 1 else m   # (Hq, T, d)
        return q @ xp.matrix_transpose(m)

    @property
    def nbytes_per_sequence(self) -> int:
        """Bytes of the offset μ if it is fitted per sequence (float16): ``2·H·d``."""
        return 2 * self.num_kv_heads * self.head_dim


def allocate_bits(sensitivity, budget, choices=(2, 3, 4), *, ref_bits=None, weights=None):
    """Bits per unit (layer, head, K/V…) that minimize the predicted loss under a budget.

    Each unit ``u`` quantized at ``b`` bits is predicted to cost
    ``sensitivity[u] · 4^−(b − ref_bits)`` (the MSE of a b-bit scalar quantizer falls by
    4× per bit). Starting from ``min(choices)`` everywhere, the step of largest predicted
    gain per added bit is taken while the weighted mean of the bits stays within
    ``budget`` — optimal for this convex model when steps are one bit.

    Parameters
    ----------
    sensitivity : array_like, (n,)
        Measured loss increase (e.g. KL divergence) of each unit alone at ``ref_bits``.
    budget : float
        Largest allowed weighted mean of the code bits.
    choices : sequence of int
        Allowed bit widths, consecutive.
    ref_bits : int, optional
        Bits at which ``sensitivity`` was measured (default ``min(choices)``).
    weights : array_like, (n,), optional
        Coordinates per unit (default equal).

    Returns
    -------
    numpy.ndarray int, (n,)

    Examples
    --------
    >>> from rotorq.kv.prep import allocate_bits
    >>> allocate_bits([0.1, 5.0, 0.2, 1.0], budget=3.0, choices=(2, 3, 4)).tolist()
    [2, 4, 2, 4]
    """
    sens = np.asarray(sensitivity, dtype=np.float64).reshape(-1)
    n = sens.size
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    choices = sorted(int(c) for c in choices)
    if any(b - a != 1 for a, b in itertools.pairwise(choices)):
        raise ValueError(f"choices must be consecutive integers, got {choices}")
    lo, hi = choices[0], choices[-1]
    ref = lo if ref_bits is None else ref_bits
    if budget < lo - 1e-12:
        raise ValueError(f"budget {budget} is below the smallest choice {lo}")
    bits = np.full(n, lo, dtype=np.int64)
    spent = lo * w.sum()
    cap = budget * w.sum() + 1e-9
    while True:
        gain = sens * (4.0 ** -(bits - ref)) * 0.75 / w
        gain[(bits >= hi) | (spent + w > cap)] = -np.inf
        u = int(np.argmax(gain))
        if not np.isfinite(gain[u]):
            return bits
        bits[u] += 1
        spent += w[u]


def kv_bits_per_coordinate(n_tokens, head_dim, key_bits, value_bits, *, norm_bits=16,
                           key_norms=1, value_norms=1, full_tokens=0, full_bits=16,
                           key_side_bits=0, value_side_bits=0):
    """Stored bits per coordinate of a cache, averaged over keys and values.

    Counts, per KV head and sequence of ``n_tokens`` tokens: the codes of the quantized
    tokens (``key_bits``/``value_bits`` per coordinate, fractional for mixed widths),
    ``key_norms``/``value_norms`` norms of ``norm_bits`` per vector (2 with an outlier
    split, 2 in prod mode: the QJL residual norm, 4 for both), the
    ``full_tokens`` tokens kept at ``full_bits`` (attention sinks, a recent window), and
    per-sequence side information such as a fitted key offset (``key_side_bits`` in
    total, e.g. ``16 · head_dim`` for a float16 μ). Per-model constants (rotation seeds,
    calibrated channel scales) are not per-sequence storage and are not counted.

    Examples
    --------
    >>> from rotorq.kv.prep import kv_bits_per_coordinate
    >>> kv_bits_per_coordinate(512, 64, 3, 3)                      # plain TurboQuant, d = 64
    3.25
    >>> round(kv_bits_per_coordinate(512, 64, 3, 2, full_tokens=1, key_side_bits=16 * 64), 4)
    2.7915
    """
    if not 0 <= full_tokens <= n_tokens:
        raise ValueError(f"full_tokens must be in 0..n_tokens, got {full_tokens}")
    q_tok = n_tokens - full_tokens
    total = 0.0
    for bits, norms, side in ((key_bits, key_norms, key_side_bits),
                              (value_bits, value_norms, value_side_bits)):
        per_tok = bits * head_dim + norms * norm_bits
        total += q_tok * per_tok + full_tokens * full_bits * head_dim + side
    return total / (2 * n_tokens * head_dim)


def _host(a):
    if hasattr(a, "get") and not isinstance(a, np.ndarray):
        return a.get()
    if hasattr(a, "detach"):
        return a.detach().cpu().numpy()
    return np.asarray(a)
