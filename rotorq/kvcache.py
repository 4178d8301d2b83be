"""A decode-time KV cache that stores keys and values at 2–4 bits and attends on the codes.

Keys and values are TurboQuant-compressed per token and KV head (MATH.md §3). Attention
never materialises the decompressed cache:

- scores: ``n_t · ⟨Π q, c[idx_t]⟩`` (+ the QJL term in prod mode) with the query rotated
  once per call;
- values: ``Σ_t p_t · ν_t · c[jdx_t]`` accumulated in the rotated domain, then one inverse
  rotation per output row (linearity; works for every rotation kind);
- softmax: online (running max), exact over the compressed part plus the small
  full-precision part (attention sinks, the recent window), merged with the log-sum-exp
  rule.

The fidelity levers measured on SmolLM2 (``benchmarks/RESULTS.md``, issue 6) are built in:
a per-sequence key offset (RoPE-aware with ``rope_base``), optional calibrated key channel
scales, norm correction, attention-sink tokens and a two-tier recent window (the newest
tokens at ``residual_bits``, demoted to the base bits from those codes as they age).

The fused pass is the backend's ``decode_attention`` (:mod:`rotorq.cpu.attention` on the
CPU; ``rotorq.cuda`` provides the same function for GPU arrays).
"""

from __future__ import annotations

import math

import numpy as np

from . import _backend, tiles
from ._arrays import origin_of
from .rotation import ROTATIONS
from .turboquant import MODES, TurboQuant, _positive_int, check_norms

_FP16_NORM_BYTES = 2
_WINDOW_BYTES = 4  # a full-precision window is float32
_OFFSET_BYTES = 2  # the fitted key offset μ is rounded to float16
_FP16_MAX = 65504.0
_WINDOW_SEED = 1 << 31  # window quantizers: seeds 4·seed + i + 2**31


def _non_negative_int(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def _bits_arg(value, name, lo=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not lo <= value <= 8:
        raise ValueError(f"{name} must be in {lo}..8, got {value}")
    return int(value)


def _dtype_name(x, arr) -> str:
    """The caller's element type (bfloat16 is widened to float32 on the host view)."""
    if "bfloat16" in str(getattr(x, "dtype", "")):
        return "bfloat16"
    return np.dtype(arr.dtype).name


class _Part:
    """One channel subset of one stream (keys or values): its quantizer and growth buffers.

    ``layout`` "tiles": the buffers ``codes`` and ``norms`` hold each block of 16 tokens in
    the tile layout of :mod:`rotorq.tiles` (the GPU's tensor-core attention reads it in
    place); :meth:`rows` gives them back in token order."""

    def __init__(self, tq: TurboQuant, offset: int, kind: str):
        self.tq = tq
        self.offset = offset  # first channel of this part in the permuted channel order
        self.dim = tq.dim
        self.kind = kind  # "keys" or "values"
        self.layout = "rows"
        self.buffers: dict = {}

    def row_bytes(self) -> int:
        """Stored bytes of one token of one KV head."""
        tq = self.tq
        n = (tq.stored_dim * tq.mse_bits + 7) // 8 + _FP16_NORM_BYTES
        if tq.mode == "prod":
            n += (tq.qjl_dim + 7) // 8 + _FP16_NORM_BYTES
        return n

    def append(self, xp, rows, n_bh, n_tok, used, check=True):
        """Quantize ``rows`` (n_bh·n_tok, dim) and write them after the ``used`` tokens
        (``check``: refuse non-finite rows and norms beyond the stored dtype; a list defers
        that check to the caller, as :func:`rotorq.turboquant.store_norms` says)."""
        qv = self.tq._quantize(rows, check)
        tiled = self.layout == "tiles"
        need = used + n_tok
        new_parts = {}
        for name, arr in qv.parts.items():
            arr = new_parts[name] = arr.reshape((n_bh, n_tok) + tuple(arr.shape[1:]))
            buf = self.buffers.get(name)
            if buf is None or buf.shape[1] < need:
                cap = max(need, 256 if buf is None else 2 * buf.shape[1])
                if tiled:  # whole tiles; slots past the tokens hold finite zeros
                    cap = -(-cap // tiles.TILE) * tiles.TILE
                    new = xp.zeros((n_bh, cap) + tuple(arr.shape[2:]), arr.dtype)
                else:
                    new = xp.empty((n_bh, cap) + tuple(arr.shape[2:]), arr.dtype)
                if buf is not None:
                    keep = -(-used // tiles.TILE) * tiles.TILE if tiled else used
                    new[:, :keep] = buf[:, :keep]
                buf = self.buffers[name] = new
            if not tiled:
                buf[:, used:need] = arr
        if tiled:
            tiles.store(xp, self.buffers["codes"], self.buffers["norms"], new_parts["codes"],
                        new_parts["norms"], used, self.kind, self.tq.stored_dim,
                        self.tq.mse_bits)

    def rows(self, xp, lo, hi):
        """``(codes, norms)`` of tokens ``lo..hi`` in token order: (BH, n, nbytes), (BH, n)
        (views of the buffers in the row layout, new arrays in the tile layout)."""
        if self.layout == "tiles":
            return tiles.load(xp, self.buffers["codes"], self.buffers["norms"], lo, hi,
                              self.kind, self.tq.stored_dim, self.tq.mse_bits)
        return self.buffers["codes"][:, lo:hi], self.buffers["norms"][:, lo:hi]

    def decode(self, xp, be, lo, hi):
        """Dequantized float32 rows ``(BH, hi − lo, dim)`` of tokens ``lo..hi`` (MSE mode)."""
        codes, norms = self.rows(xp, lo, hi)
        n_bh, n = codes.shape[0], codes.shape[1]
        tq = self.tq
        out = be.dequantize(xp.ascontiguousarray(codes.reshape(n_bh * n, -1)),
                            norms.reshape(-1).astype(xp.float32),
                            tq.rotation, tq._consts(xp)["centroids"], tq.mse_bits)
        return out.reshape(n_bh, n, self.dim)

    def drop_front(self, n, used):
        """Forget the first ``n`` of ``used`` tokens (the rest move to the front)."""
        assert self.layout == "rows"  # window parts only
        if n and used > n:
            for buf in self.buffers.values():
                buf[:, :used - n] = buf[:, n:used].copy()

class KVCache:
    """KV cache with keys and values compressed to a few bits, attended on the codes.

    Token layout along the sequence: ``sink_tokens`` attention sinks (float16), then the
    compressed tokens (``key_bits``/``value_bits``), then the recent window (the
    ``residual_tokens`` newest, at ``residual_bits`` or full precision). Keys are stored
    as ``s ⊙ (k_t − m_t)`` (:mod:`rotorq.kvprep`): ``m_t`` a per-sequence key offset fitted
    on the first ``offset_tokens`` tokens after the sinks (its effect on the scores is
    added back exactly), ``s`` optional calibrated channel scales (``1/s`` goes to the
    queries). Defaults are the best recipe measured on SmolLM2-135M (``benchmarks/
    RESULTS.md``): about 3.95 stored bits per coordinate with the default 4/3 bits,
    perplexity within 1% of exact; ``key_bits=3, value_bits=2`` stores about 2.95 bits.

    Parameters
    ----------
    num_kv_heads : int
        Number of KV heads ``H``.
    head_dim : int
        Channels per head ``d``.
    key_bits, value_bits : int
        Bits per stored coordinate of the compressed keys (prod mode: total, 1 of them for
        QJL) and values (always MSE mode).
    key_mode : {"mse", "prod"}
        TurboQuant mode of the compressed keys. ``"mse"`` wins inside softmax (MATH.md §3;
        measured: prod keys cost +400% perplexity at 3 bits on SmolLM2).
    rotation : {"hadamard", "dense", "rotor"}
        Rotation of every quantizer. Hadamard pads each part to a power of two (with
        outlier channels: choose ``head_dim - k`` a power of two, or use ``"dense"``).
    residual_tokens : int
        Size ``R`` of the recent window. After ``T`` tokens (and once the key offset is
        fitted), ``max(0, ⌊(T − sinks − R) / B⌋ · B)`` tokens are compressed, ``B =
        block_tokens``; the rest stay in the window. The state depends on ``T`` only, so
        streaming one token at a time and a single prefill give identical caches.
    residual_bits : int, "auto" or None
        Bits of the window tokens: they are quantized at ``residual_bits`` (MSE mode, own
        rotations) and, when they leave the window, re-quantized to the base bits *from
        those codes* (nothing else is kept). ``"auto"``: ``min(8, key_bits + 2)``.
        ``None``: the window is kept in float32.
    sink_tokens : int
        The first ``sink_tokens`` tokens of the sequence are kept in float16 (float32 if
        a value exceeds float16's range) and never compressed.
    key_offset : bool
        Remove a per-sequence key offset before quantizing: the mean of the
        ``offset_tokens`` tokens after the sinks, stored as float16. Until that many
        tokens have arrived, all tokens are held in float32 (``pending_tokens``).
    rope_base : float, optional
        RoPE frequency base of the model (``rope_theta``; rotate-half channel pairing).
        Makes the key offset RoPE-aware: the mean of the un-rotated keys, rotated to each
        key's position (token ``i`` of the cache is position ``i``), which removes most of
        a real key's energy; the per-key term ``q·RoPE_t(μ)`` is added to the scores
        inside the attention kernel. Without it the offset is one post-RoPE vector, whose
        term is the same for every key of a query (softmax ignores it).
    offset_tokens : int
        Tokens after the sinks used to fit the key offset.
    key_scales : array_like, (num_kv_heads, head_dim), optional
        Calibrated positive channel scales ``s`` of the keys (see
        :func:`rotorq.kvprep.channel_scales`; ``(σq/σk)^½`` from a calibration text);
        exact: the queries are divided by ``s``.
    outlier_channels : int or array of int
        ``k > 0``: the ``k`` channels of largest RMS per KV head (of the prepared keys, of
        the values), chosen separately for keys and values when the cache starts
        compressing, get their own quantizers at ``outlier_bits``. An array ``(k,)`` or
        ``(num_kv_heads, k)`` gives the channels explicitly. ``0``: no split.
    outlier_bits : int, optional
        Bits of the outlier parts (keys and values); default: base bits + 1 (max 8).
    seed : int
        Seed of the rotations (and QJL sketches): base quantizers use ``4·seed + i``,
        window quantizers ``4·seed + i + 2**31``.
    block_tokens : int, optional
        Compression granularity (default ``min(8, residual_tokens)``, at least 1): the
        window holds ``residual_tokens`` to ``residual_tokens + block_tokens − 1`` tokens.
    norm_correction : bool
        Store ``‖x‖/‖c[idx]‖`` as the norm (MATH.md §3), so decompressed keys and values
        keep their length.
    check_finite : bool
        Refuse appended keys and values that hold NaN or Inf, or whose norms exceed the
        stored float16 range, with a ``ValueError`` (nothing is stored). On a GPU each check
        is a device synchronization, one per append and one per quantizer call: the host
        cannot queue work ahead of the GPU. ``False`` skips them, as ``check_finite`` does in
        :mod:`scipy.linalg`: non-finite or out-of-range input is then stored as it comes, and
        every later ``attend`` and ``scores`` over it gives NaN or Inf.

    Notes
    -----
    ``append`` takes ``(num_kv_heads, t, head_dim)`` or ``(batch, num_kv_heads, t,
    head_dim)``; the first non-empty append fixes the batch size, the device and the
    dtypes of keys and values. An append of ``t = 0`` tokens is validated and otherwise a
    no-op. Queries are ``(num_q_heads, head_dim)`` or ``(num_q_heads, n_q, head_dim)``
    (with the batch axis in front for a batched cache); query head ``h`` reads KV head
    ``h // (num_q_heads // num_kv_heads)``. Results are float32 in the queries' framework;
    without an ``n_q`` axis in the queries there is none in the result.

    On a GPU, with one key part (MSE, 128–512 stored coordinates) and one value part (128
    or 256), the compressed tokens are held in the tile layout of :mod:`rotorq.tiles`,
    which the tensor-core attention kernel reads in place (a RoPE-aware offset's per-key
    term is computed first and added there); non-finite queries are not refused (that
    check would cost a device sync per call): they give NaN outputs.

    Examples
    --------
    >>> import numpy as np, rotorq
    >>> rng = np.random.default_rng(0)
    >>> cache = rotorq.KVCache(2, 64, key_bits=4, value_bits=4)
    >>> k = rng.standard_normal((2, 500, 64), dtype=np.float32) + 3.0   # keys share an offset
    >>> v = rng.standard_normal((2, 500, 64), dtype=np.float32) + rng.standard_normal(
    ...     (2, 1, 64), dtype=np.float32)
    >>> cache.append(k[:, :499], v[:, :499])      # prefill
    >>> cache.append(k[:, 499:], v[:, 499:])      # decode: one token at a time
    >>> len(cache), cache.sink_count, cache.compressed_tokens, cache.window_tokens
    (500, 1, 464, 35)
    >>> q = rng.standard_normal((8, 64), dtype=np.float32)   # 8 query heads (GQA 4:1)
    >>> out = cache.attend(q)
    >>> out.shape, cache.scores(q).shape
    ((8, 64), (8, 500))
    >>> s = np.einsum("hd,htd->ht", q, k.repeat(4, 0)) / 8.0   # exact attention
    >>> p = np.exp(s - s.max(1, keepdims=True)); p /= p.sum(1, keepdims=True)
    >>> exact = np.einsum("ht,htd->hd", p, v.repeat(4, 0))
    >>> bool(np.linalg.norm(out - exact) / np.linalg.norm(exact) < 0.03)
    True
    >>> round(cache.bits_per_coordinate, 3)   # codes, norms, window, sink and offset
    4.429
    """

    def __init__(self, num_kv_heads, head_dim, *, key_bits=4, value_bits=3, key_mode="mse",
                 rotation="hadamard", residual_tokens=32, residual_bits="auto", sink_tokens=1,
                 key_offset=True, rope_base=None, offset_tokens=128, key_scales=None,
                 outlier_channels=0, outlier_bits=None, seed=0, block_tokens=None,
                 norm_correction=True, check_finite=True):
        self.num_kv_heads = _positive_int(num_kv_heads, "num_kv_heads")
        self.head_dim = _positive_int(head_dim, "head_dim")
        if key_mode not in MODES:
            raise ValueError(f"key_mode must be one of {MODES}, got {key_mode!r}")
        if rotation not in ROTATIONS:
            raise ValueError(f"rotation must be one of {ROTATIONS}, got {rotation!r}")
        self.key_mode = key_mode
        self.rotation = rotation
        self.residual_tokens = _non_negative_int(residual_tokens, "residual_tokens")
        if block_tokens is None:
            block_tokens = max(1, min(8, self.residual_tokens))
        self.block_tokens = _positive_int(block_tokens, "block_tokens")
        self.sink_tokens = _non_negative_int(sink_tokens, "sink_tokens")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.seed = int(seed)
        for name, bits in (("key_bits", key_bits), ("value_bits", value_bits)):
            if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
                raise TypeError(f"{name} must be an int, got {type(bits).__name__}")
        if isinstance(residual_bits, str):
            if residual_bits != "auto":
                raise ValueError(f"residual_bits must be an int, 'auto' or None, got "
                                 f"{residual_bits!r}")
            residual_bits = min(8, int(key_bits) + 2)
        elif residual_bits is not None:
            residual_bits = _bits_arg(residual_bits, "residual_bits")
        self.residual_bits = residual_bits
        if not isinstance(key_offset, (bool, np.bool_)):
            raise TypeError(f"key_offset must be a bool, got {type(key_offset).__name__}")
        self.key_offset = bool(key_offset)
        if rope_base is not None:
            if not self.key_offset:
                raise ValueError("rope_base is used by the key offset; it needs key_offset=True")
            if isinstance(rope_base, bool) or not isinstance(rope_base, (int, float, np.number)) \
                    or not math.isfinite(rope_base) or rope_base <= 1:
                raise ValueError(f"rope_base must be a finite number > 1, got {rope_base!r}")
            if self.head_dim % 2:
                raise ValueError(f"rope_base needs an even head_dim, got {self.head_dim}")
            rope_base = float(rope_base)
        self.rope_base = rope_base
        self.offset_tokens = _positive_int(offset_tokens, "offset_tokens")
        d, heads = self.head_dim, self.num_kv_heads
        if key_scales is not None:
            sc = np.asarray(key_scales, dtype=np.float64)
            if sc.shape != (heads, d):
                raise ValueError(f"key_scales must have shape (num_kv_heads, head_dim) = "
                                 f"{(heads, d)}, got {sc.shape}")
            if not np.all(np.isfinite(sc)) or np.any(sc <= 0):
                raise ValueError("key_scales must be positive and finite")
            key_scales = sc.astype(np.float32)
        self.key_scales = key_scales
        nc = self.norm_correction = bool(norm_correction)
        if not isinstance(check_finite, (bool, np.bool_)):
            raise TypeError(f"check_finite must be a bool, got {type(check_finite).__name__}")
        self.check_finite = bool(check_finite)

        self._explicit_outliers = None
        if isinstance(outlier_channels, (int, np.integer)) and not isinstance(outlier_channels, bool):
            k = int(outlier_channels)
            if not 0 <= k < d:
                raise ValueError(f"outlier_channels must be in 0..head_dim-1 = {d - 1}, got {k}")
        else:
            idx = np.asarray(outlier_channels)
            if idx.dtype.kind not in "iu" or idx.ndim not in (1, 2) or idx.shape[-1] == 0:
                raise ValueError("outlier_channels must be an int or an integer array of shape "
                                 f"(k,) or (num_kv_heads, k), got {outlier_channels!r}")
            idx = np.broadcast_to(idx, (heads, idx.shape[-1])) if idx.ndim == 1 else idx
            if idx.shape[0] != heads:
                raise ValueError(f"outlier_channels has {idx.shape[0]} rows, expected "
                                 f"num_kv_heads={heads}")
            k = idx.shape[1]
            if k >= d or idx.min() < 0 or idx.max() >= d:
                raise ValueError(f"outlier_channels must index 0..{d - 1} with fewer than "
                                 f"head_dim={d} channels per head")
            srt = np.sort(idx, axis=1)
            if np.any(srt[:, 1:] == srt[:, :-1]):
                raise ValueError("outlier_channels has repeated channels within a head")
            self._explicit_outliers = srt.astype(np.int64)
        self.num_outlier_channels = k
        if outlier_bits is not None and k == 0:
            raise ValueError("outlier_bits needs outlier_channels > 0")
        if outlier_bits is not None and (isinstance(outlier_bits, bool)
                                         or not isinstance(outlier_bits, (int, np.integer))):
            raise TypeError(f"outlier_bits must be an int, got {type(outlier_bits).__name__}")

        def quantizers(bits, mode, obits, seed, kind):
            parts = [_Part(TurboQuant(d - k, bits, mode=mode, rotation=rotation,
                                      seed=seed, norm_correction=nc), 0, kind)]
            if k:
                parts.append(_Part(TurboQuant(k, obits, mode=mode, rotation=rotation,
                                              seed=seed + 1, norm_correction=nc), d - k, kind))
            return parts

        kb_out = min(8, key_bits + 1) if outlier_bits is None else outlier_bits
        vb_out = min(8, value_bits + 1) if outlier_bits is None else outlier_bits
        self.key_bits, self.value_bits = key_bits, value_bits
        self.outlier_bits = (kb_out, vb_out) if k else None
        self._kparts = quantizers(key_bits, key_mode, kb_out, 4 * self.seed, "keys")
        self._vparts = quantizers(value_bits, "mse", vb_out, 4 * self.seed + 2, "values")
        self._wkparts = self._wvparts = None
        if residual_bits is not None:
            rb, rb_out = residual_bits, min(8, residual_bits + 1)
            self._wkparts = quantizers(rb, "mse", rb_out, 4 * self.seed + _WINDOW_SEED, "keys")
            self._wvparts = quantizers(rb, "mse", rb_out, 4 * self.seed + 2 + _WINDOW_SEED,
                                       "values")

        # state fixed by the first non-empty append
        self._origin = None
        self._dtypes = None
        self._batch = None  # None: unbatched; else the batch size
        self._xp = None
        self._be = None
        self._fitted = False
        self._mu = None  # (BH, d) key offset (post-RoPE, or pre-RoPE with rope_base)
        self._scales = None  # (BH, d) key scales on the device
        self._freqs = None  # (d/2,) float64 RoPE angles on the device
        self._kperm = self._vperm = None  # (BH, d) permuted channel order, or None
        self._kinv = self._vinv = None
        self._pending = 0
        self._pend_k = self._pend_v = None
        self._n_sink = 0
        self._sink_k = self._sink_v = None
        self._compressed = 0
        self._window = 0
        self._win_k = self._win_v = None  # float32 window (residual_bits=None)
        # the exact part kept decoded across appends (_exact_part): float32 keys, values
        # (BH, cap, d) and positions (cap,): the sinks, then the window's first _x_win tokens
        self._xk = self._xv = self._xpos = None
        self._x_sinks = self._x_win = 0

    # -- properties -------------------------------------------------------------------
    def __len__(self):
        return self._pending + self._n_sink + self._compressed + self._window

    @property
    def compressed_tokens(self) -> int:
        """Tokens stored at ``key_bits``/``value_bits``."""
        return self._compressed

    @property
    def window_tokens(self) -> int:
        """Tokens in the recent window (at ``residual_bits``, or float32)."""
        return self._window

    @property
    def sink_count(self) -> int:
        """Attention-sink tokens held (float16), at most ``sink_tokens``."""
        return self._n_sink

    @property
    def pending_tokens(self) -> int:
        """Tokens held in float32 while the key offset waits for ``offset_tokens`` tokens."""
        return self._pending

    @property
    def batch_size(self):
        """Batch size fixed by the first append (None: unbatched, or nothing appended yet)."""
        return self._batch

    @property
    def device(self):
        """"cpu" or "cuda" once something was appended, else None."""
        return None if self._origin is None else self._origin.device

    @property
    def key_offset_vector(self):
        """The fitted key offset μ per sequence and KV head as a host float32 array of shape
        ``([batch,] num_kv_heads, head_dim)`` (pre-RoPE with ``rope_base``), or None."""
        if self._mu is None:
            return None
        mu = _host(self._mu)
        return mu if self._batch is None else mu.reshape(self._batch, self.num_kv_heads, -1)

    def _outliers(self, perm):
        if perm is None or not self.num_outlier_channels:
            return None
        return np.sort(_host(perm[: self.num_kv_heads, self.head_dim - self.num_outlier_channels:]),
                       axis=1)

    @property
    def key_outlier_channels(self):
        """Outlier channels of the keys per KV head, (num_kv_heads, k) (None before the
        cache starts compressing)."""
        return self._outliers(self._kperm)

    @property
    def value_outlier_channels(self):
        """Outlier channels of the values per KV head, (num_kv_heads, k)."""
        return self._outliers(self._vperm)

    @property
    def bytes_per_token(self) -> int:
        """Bytes of one compressed token (all KV heads, keys and values, one sequence)."""
        return self.num_kv_heads * sum(p.row_bytes() for p in self._kparts + self._vparts)

    @property
    def window_bytes_per_token(self) -> int:
        """Bytes of one window token (all KV heads, keys and values, one sequence)."""
        if self._wkparts is None:
            return self.num_kv_heads * 2 * self.head_dim * _WINDOW_BYTES
        return self.num_kv_heads * sum(p.row_bytes() for p in self._wkparts + self._wvparts)

    @property
    def nbytes(self) -> int:
        """True bytes held: packed codes, norms, QJL and outlier parts of the compressed
        tokens, the window (codes or float32), the sinks (float16/float32), pending float32
        tokens and the float16 key offset μ of every sequence (spare capacity of the growth
        buffers and per-cache constants such as rotations, channel scales and indices are
        not counted)."""
        n_seq = 1 if self._batch is None else self._batch
        heads, d = self.num_kv_heads, self.head_dim
        n = self._compressed * self.bytes_per_token + self._window * self.window_bytes_per_token
        if self._n_sink:
            n += self._n_sink * heads * d * (self._sink_k.itemsize + self._sink_v.itemsize)
        n += self._pending * heads * 2 * d * _WINDOW_BYTES
        if self._mu is not None:
            n += heads * d * _OFFSET_BYTES
        return n_seq * n

    @property
    def bits_per_coordinate(self) -> float:
        """``8 · nbytes`` per stored coordinate (tokens · sequences · heads · d · 2)."""
        n_seq = 1 if self._batch is None else self._batch
        coords = len(self) * n_seq * self.num_kv_heads * self.head_dim * 2
        return 8.0 * self.nbytes / coords if coords else 0.0

    def __repr__(self):
        return (f"KVCache(num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"key_bits={self.key_bits}, value_bits={self.value_bits}, "
                f"residual_bits={self.residual_bits}, key_mode={self.key_mode!r}, "
                f"rotation={self.rotation!r}, tokens={len(self)}, "
                f"compressed={self._compressed}, nbytes={self.nbytes})")

    # -- append -----------------------------------------------------------------------
    def _intake(self, x, name, origin):
        arr, origin, be = _backend.float_array(x, name, min_ndim=3, origin=origin)
        if arr.ndim not in (3, 4):
            raise ValueError(f"{name} must have shape (num_kv_heads, t, head_dim) or "
                             f"(batch, num_kv_heads, t, head_dim), got {tuple(arr.shape)}")
        if arr.shape[-3] != self.num_kv_heads:
            raise ValueError(f"{name} has {arr.shape[-3]} heads (axis -3) but the cache has "
                             f"num_kv_heads={self.num_kv_heads}")
        if arr.shape[-1] != self.head_dim:
            raise ValueError(f"{name} has head_dim {arr.shape[-1]} (last axis) but the cache "
                             f"has head_dim={self.head_dim}")
        return arr, origin, be

    def append(self, keys, values):
        """Append ``t`` tokens: ``keys``, ``values`` of shape ``(num_kv_heads, t, head_dim)``
        or ``(batch, num_kv_heads, t, head_dim)`` (float16/bfloat16/float32/float64).

        Tokens older than the ``residual_tokens`` most recent are compressed in blocks.
        ``t = 0`` is a no-op (after validation).

        Raises
        ------
        ValueError
            Head count, head_dim, rank, batch size or token count mismatch; NaN/Inf; a
            device different from the first append's.
        TypeError
            Non-floating dtype, or a dtype different from the first append's.

        Examples
        --------
        >>> import numpy as np, rotorq
        >>> cache = rotorq.KVCache(1, 16, residual_tokens=4, key_offset=False, sink_tokens=0)
        >>> x = np.random.default_rng(0).standard_normal((1, 10, 16))
        >>> cache.append(x, x); (len(cache), cache.compressed_tokens)
        (10, 4)
        >>> cache.append(x.astype(np.float32), x)
        Traceback (most recent call last):
        ...
        TypeError: keys have dtype float32 but the cache holds float64 keys (fixed by the first append)
        """
        k_origin = origin_of(keys, "keys")
        v_origin = origin_of(values, "values")
        if (k_origin.device, k_origin.device_id) != (v_origin.device, v_origin.device_id):
            raise ValueError(f"keys are on {k_origin.device}:{k_origin.device_id} but values "
                             f"on {v_origin.device}:{v_origin.device_id}; use one device")
        k, k_origin, be = self._intake(keys, "keys", k_origin)
        v, _, _ = self._intake(values, "values", v_origin)
        if tuple(k.shape) != tuple(v.shape):
            raise ValueError(f"keys {tuple(k.shape)} and values {tuple(v.shape)} must have the "
                             "same shape")
        batch = k.shape[0] if k.ndim == 4 else None
        dtypes = (_dtype_name(keys, k), _dtype_name(values, v))
        if self._origin is not None:
            o = self._origin
            if (k_origin.device, k_origin.device_id) != (o.device, o.device_id):
                raise ValueError(f"keys/values are on {k_origin.device}:{k_origin.device_id} "
                                 f"but the cache lives on {o.device}:{o.device_id} (fixed by "
                                 "the first append)")
            for name, got, want in zip(("keys", "values"), dtypes, self._dtypes, strict=True):
                if got != want:
                    raise TypeError(f"{name} have dtype {got} but the cache holds {want} "
                                    f"{name} (fixed by the first append)")
            if (batch is None) != (self._batch is None) or batch != self._batch:
                want = ("(num_kv_heads, t, head_dim)" if self._batch is None
                        else f"(batch={self._batch}, num_kv_heads, t, head_dim)")
                raise ValueError(f"keys/values of shape {tuple(k.shape)} do not match the "
                                 f"cache's layout {want} (fixed by the first append)")
        t = k.shape[-2]
        if t == 0:
            return
        xp = be.xp
        # Once every new token is quantized at once (past the pending phase and the sinks,
        # with a quantized window), a NaN or Inf makes a non-finite norm, and the window's
        # norm checks in _process (one sync) refuse it; tokens kept as they come: checked here.
        quantized = self._fitted and self._wkparts is not None and len(self) >= self.sink_tokens
        if self.check_finite and not quantized:
            _backend.require_finite(xp, k, "keys", v, "values")
        n_bh = (1 if batch is None else batch) * self.num_kv_heads
        k = xp.ascontiguousarray(k.reshape(n_bh, t, self.head_dim), dtype=xp.float32)
        v = xp.ascontiguousarray(v.reshape(n_bh, t, self.head_dim), dtype=xp.float32)
        if self._origin is None:
            self._origin, self._be, self._xp = k_origin, be, xp
            self._dtypes, self._batch = dtypes, batch
        if self._fitted:
            self._process(k, v, len(self))
            return
        # before the key offset is fitted every token waits in float32
        p = self._pending
        self._pend_k = _grow(xp, self._pend_k, p + t, p, k)
        self._pend_v = _grow(xp, self._pend_v, p + t, p, v)
        self._pend_k[:, p:p + t] = k
        self._pend_v[:, p:p + t] = v
        self._pending = p + t
        if self.key_offset and self._pending < self.sink_tokens + self.offset_tokens:
            return
        pk, pv = self._pend_k[:, :self._pending], self._pend_v[:, :self._pending]
        self._fit(pk, pv)
        self._pending = 0
        self._pend_k = self._pend_v = None
        self._process(pk, pv, 0)

    def _fit(self, k, v):
        """Fix the key offset, the scales, the outlier channels and the window buffers."""
        from .kvprep import _mean_key

        xp = self._xp
        n_bh, _, d = k.shape
        heads, n_out, s0 = self.num_kv_heads, self.num_outlier_channels, self.sink_tokens
        if self.key_offset:
            block = _host(k[:, s0:s0 + self.offset_tokens])
            mu = _mean_key(block, np.arange(s0, s0 + block.shape[1]), self.rope_base)
            self._mu = xp.asarray(mu.astype(np.float16).astype(np.float32))  # one rounding
            if self.rope_base is not None:
                self._freqs = xp.asarray(
                    self.rope_base ** (-np.arange(0, d, 2, dtype=np.float64) / d))
        if self.key_scales is not None:
            self._scales = xp.asarray(np.tile(self.key_scales, (n_bh // heads, 1)))
        self._fitted = True

        def perm_for(x):
            if not n_out:
                return None
            if self._explicit_outliers is not None:
                out = self._explicit_outliers
            else:  # largest RMS per KV head over batch and (up to 8192 evenly spaced) tokens
                sub = x[:, ::max(1, x.shape[1] // 8192)]
                rms = _host(xp.einsum("btd,btd->bd", sub, sub).reshape(-1, heads, d).sum(axis=0))
                out = np.sort(np.argsort(-rms, axis=1, kind="stable")[:, :n_out], axis=1)
            normal = np.array([np.setdiff1d(np.arange(d), o) for o in out])
            perm = np.concatenate([normal, out], axis=1)
            return xp.asarray(np.tile(perm, (n_bh // heads, 1)))

        first = s0 if k.shape[1] > s0 else 0
        self._kperm = perm_for(self._prep(k[:, first:], first))
        self._vperm = perm_for(v[:, first:])
        if self._kperm is not None:
            self._kinv = xp.argsort(self._kperm, axis=1)
        if self._vperm is not None:
            self._vinv = xp.argsort(self._vperm, axis=1)
        if self._wkparts is None:
            cap = self.residual_tokens + self.block_tokens
            self._win_k = xp.empty((n_bh, cap, d), xp.float32)
            self._win_v = xp.empty((n_bh, cap, d), xp.float32)
        if len(self._kparts) == 1 and len(self._vparts) == 1:  # the backend's attention layout
            kq, vq = self._kparts[0].tq, self._vparts[0].tq
            layout = self._be.attention_layout(kq.stored_dim, kq.mse_bits, kq.mode,
                                               vq.stored_dim, vq.mse_bits)
            self._kparts[0].layout = self._vparts[0].layout = layout

    # -- key transform ----------------------------------------------------------------
    def _offsets(self, p0, n):
        """The key offsets ``m_t`` of positions ``p0..p0+n-1``: (BH, n or 1, d) float32."""
        xp = self._xp
        mu = self._mu
        if self._freqs is None:
            return mu[:, None, :]
        ang = xp.arange(p0, p0 + n, dtype=xp.float64)[:, None] * self._freqs[None, :]
        cos, sin = xp.cos(ang).astype(xp.float32), xp.sin(ang).astype(xp.float32)
        h = self.head_dim // 2
        m1, m2 = mu[:, None, :h], mu[:, None, h:]
        return xp.concatenate([m1 * cos - m2 * sin, m2 * cos + m1 * sin], axis=2)

    def _prep(self, k, p0):
        """``s ⊙ (k − m_t)`` for keys ``(BH, n, d)`` at positions ``p0..``."""
        if self._mu is not None:
            k = k - self._offsets(p0, k.shape[1])
        if self._scales is not None:
            k = k * self._scales[:, None, :]
        return k

    def _restore(self, kp, p0, offset=True):
        """Inverse of :meth:`_prep` (``offset=False``: the key offset left out)."""
        if self._scales is not None:
            kp = kp / self._scales[:, None, :]
        if self._mu is not None and offset:
            kp = kp + self._offsets(p0, kp.shape[1])
        return kp

    def _offset_frame(self):
        """Whether the sinks and window of the exact part are held minus the key offset:
        with a post-RoPE offset (no ``rope_base``) its term ``q·μ`` is the same for every
        key of a query, so attention leaves it out on both parts (softmax ignores it)."""
        return self._mu is not None and self._freqs is None

    # -- storage ----------------------------------------------------------------------
    def _process(self, k, v, p0):
        """Store tokens ``k, v`` (BH, t, d) float32 at positions ``p0..`` (offset fitted).

        With ``check_finite`` and a quantized window, the window quantizers' norm checks
        are deferred and made by one synchronization (:meth:`_check`) before anything else
        is stored."""
        xp = self._xp
        check = self.check_finite
        n_s = max(0, min(k.shape[1], self.sink_tokens - p0))
        if n_s:
            self._sink_k = _sink_store(xp, self._sink_k, k[:, :n_s], p0, self.sink_tokens)
            self._sink_v = _sink_store(xp, self._sink_v, v[:, :n_s], p0, self.sink_tokens)
            self._n_sink = p0 + n_s
            k, v, p0 = k[:, n_s:], v[:, n_s:], p0 + n_s
        t = k.shape[1]
        if t == 0:
            return
        c, w = self._compressed, self._window
        r_tok, blk = self.residual_tokens, self.block_tokens
        target = max(0, (c + w + t - r_tok) // blk * blk)
        n_c = target - c
        s0 = self._n_sink  # position of compressed token 0
        if self._wkparts is not None:
            # every token enters the window at residual_bits; leaving it, it is re-quantized
            # from those codes (the same path for a prefill and for one token at a time)
            deferred = [] if check else False
            self._compress(xp, self._prep(k, p0), self._wkparts, self._kperm, w, deferred)
            self._compress(xp, v, self._wvparts, self._vperm, w, deferred)
            self._check(deferred, k, v)
            if n_c:
                kd = self._decode(self._wkparts, self._kinv, 0, n_c)
                vd = self._decode(self._wvparts, self._vinv, 0, n_c)
                self._compress(xp, kd, self._kparts, self._kperm, c, check)
                self._compress(xp, vd, self._vparts, self._vperm, c, check)
                keep = w + t - n_c
                for part in self._wkparts + self._wvparts:
                    part.drop_front(n_c, w + t)
                    _shrink(part, keep, 4 * (r_tok + blk))
                self._drop_exact(n_c)
            self._compressed, self._window = target, w + t - n_c
            return
        from_win = min(n_c, w)
        from_new = n_c - from_win
        if n_c:
            for x, win, parts, perm, is_key in ((k, self._win_k, self._kparts, self._kperm, True),
                                                (v, self._win_v, self._vparts, self._vperm, False)):
                old = win[:, :from_win]
                block = old if from_new == 0 else (
                    x[:, :from_new] if from_win == 0
                    else xp.concatenate([old, x[:, :from_new]], axis=1))
                if is_key:
                    block = self._prep(block, s0 + c)
                self._compress(xp, block, parts, perm, c, check)
            self._compressed = target
        keep_w = w - from_win
        if from_win:
            self._drop_exact(from_win)
        for x, win in ((k, self._win_k), (v, self._win_v)):
            if from_win and keep_w:
                win[:, :keep_w] = win[:, from_win:w].copy()
            win[:, keep_w:keep_w + t - from_new] = x[:, from_new:]
        self._window = keep_w + t - from_new

    def _check(self, deferred, k, v):
        """Make the deferred norm checks of :meth:`_process` (one synchronization): raise for
        non-finite keys or values first, else for norms beyond the stored dtype."""
        if deferred is not False:
            check_norms(self._xp, deferred,
                        lambda: _backend.require_finite(self._xp, k, "keys", v, "values"))

    def _compress(self, xp, block, parts, perm, used, check):
        """Quantize ``block`` (BH, n, d) float32 into the parts' buffers after ``used``
        (``check``: :meth:`_Part.append`'s)."""
        n_bh, n_tok, _ = block.shape
        for part in parts:
            if perm is None:
                rows = xp.ascontiguousarray(block, dtype=xp.float32)
            else:  # this part's channels of each head, gathered head by head (fast takes)
                cols = perm[:, part.offset:part.offset + part.dim]
                rows = xp.empty((n_bh, n_tok, part.dim), xp.float32)
                for b in range(n_bh):
                    xp.take(block[b], cols[b], axis=1, out=rows[b])
            part.append(xp, rows.reshape(n_bh * n_tok, part.dim), n_bh, n_tok, used, check)

    def _decode(self, parts, inv, lo, hi):
        """Dequantized tokens ``lo..hi`` of ``parts`` in channel order, (BH, n, d)."""
        xp = self._xp
        pieces = [p.decode(xp, self._be, lo, hi) for p in parts]
        out = pieces[0] if len(pieces) == 1 else xp.concatenate(pieces, axis=2)
        if inv is not None:
            out = xp.take_along_axis(out, inv[:, None, :], axis=2)
        return out

    def _exact_part(self):
        """Keys, values (BH, E, d) float32 and positions (E,) of the tokens not in codes of
        the base tier: pending, or the sinks and the window (dequantized and restored).
        The sinks and window are kept decoded across appends: a call decodes only the
        window tokens that arrived since the last one. Their keys are minus the key offset
        where :meth:`_offset_frame` says so."""
        xp = self._xp
        if self._pending:
            p = self._pending
            return self._pend_k[:, :p], self._pend_v[:, :p], xp.arange(p)
        n_s, w = self._n_sink, self._window
        e = n_s + w
        if not e:
            return None
        if self._xk is None or self._xk.shape[1] < e:
            n_bh, d = self._n_bh(), self.head_dim
            cap = max(e, n_s + self.residual_tokens + self.block_tokens,
                      2 * (0 if self._xk is None else self._xk.shape[1]))
            self._xk = xp.empty((n_bh, cap, d), xp.float32)
            self._xv = xp.empty((n_bh, cap, d), xp.float32)
            self._xpos = xp.empty(cap, xp.int64)
            self._x_sinks = self._x_win = 0
        frame = self._offset_frame()
        if self._x_sinks != n_s:  # the window's rows start after the sinks: all stale
            self._xk[:, :n_s] = self._sink_k[:, :n_s]
            if frame:
                self._xk[:, :n_s] -= self._mu[:, None, :]
            self._xv[:, :n_s] = self._sink_v[:, :n_s]
            self._xpos[:n_s] = xp.arange(n_s)
            self._x_sinks, self._x_win = n_s, 0
        lo = self._x_win
        if lo < w:
            p0 = n_s + self._compressed + lo
            if self._wkparts is None:
                kd, vd = self._win_k[:, lo:w], self._win_v[:, lo:w]
                if frame:
                    kd = kd - self._mu[:, None, :]
            else:
                kd = self._restore(self._decode(self._wkparts, self._kinv, lo, w), p0,
                                   offset=not frame)
                vd = self._decode(self._wvparts, self._vinv, lo, w)
            self._xk[:, n_s + lo:e] = kd
            self._xv[:, n_s + lo:e] = vd
            self._xpos[n_s + lo:e] = xp.arange(p0, p0 + w - lo)
            self._x_win = w
        return self._xk[:, :e], self._xv[:, :e], self._xpos[:e]

    def _n_bh(self):
        """Sequences times KV heads."""
        return (self._batch or 1) * self.num_kv_heads

    def _drop_exact(self, n):
        """The window's first ``n`` tokens left it: its decoded tokens after them move to
        the front of the window's rows of the exact part."""
        keep = self._x_win - n
        if keep <= 0:
            self._x_win = 0
            return
        a = self._x_sinks
        for buf in (self._xk, self._xv):
            buf[:, a:a + keep] = buf[:, a + n:a + n + keep].copy()
        self._xpos[a:a + keep] = self._xpos[a + n:a + n + keep].copy()
        self._x_win = keep

    # -- queries ----------------------------------------------------------------------
    def _queries(self, queries):
        """Validate queries; returns ``(q (BH, R, d) float32, origin, lead shape, n_q, squeeze)``."""
        if self._origin is None or len(self) == 0:
            raise ValueError("the cache is empty; append keys and values first")
        q, origin, _ = _backend.float_array(queries, "queries", dim=self.head_dim, min_ndim=2)
        if (origin.device, origin.device_id) != (self._origin.device, self._origin.device_id):
            raise ValueError(f"queries are on {origin.device}:{origin.device_id} but the cache "
                             f"lives on {self._origin.device}:{self._origin.device_id}")
        batched = self._batch is not None
        lead = 1 if batched else 0
        if q.ndim not in (lead + 2, lead + 3):
            want = "(batch, num_q_heads[, n_q], head_dim)" if batched \
                else "(num_q_heads[, n_q], head_dim)"
            raise ValueError(f"queries must have shape {want}, got {tuple(q.shape)}")
        if batched and q.shape[0] != self._batch:
            raise ValueError(f"queries have batch size {q.shape[0]} but the cache holds "
                             f"{self._batch} sequences")
        squeeze = q.ndim == lead + 2
        xp = self._xp
        if xp is np:  # on a GPU the check would cost a device sync per call: NaN in, NaN out
            _backend.require_finite(xp, q, "queries")
        n_qh = q.shape[lead]
        if n_qh % self.num_kv_heads:
            raise ValueError(f"queries have {n_qh} heads (num_q_heads), not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        n_q = 1 if squeeze else q.shape[lead + 1]
        n_seq = self._batch or 1
        q = xp.asarray(q, dtype=xp.float32).reshape(
            n_seq * self.num_kv_heads, (n_qh // self.num_kv_heads) * n_q, self.head_dim)
        lead_shape = ((self._batch,) if batched else ()) + (n_qh,)
        return xp.ascontiguousarray(q), origin, lead_shape, n_q, squeeze

    def _rotated_queries(self, q, scale):
        """Per key part: (rotated query rows × scale (BH, R, D), sketched rows or None)."""
        xp, be = self._xp, self._be
        n_bh, n_rows, _ = q.shape
        if self._scales is not None:
            q = q / self._scales[:, None, :]
        if self._kperm is not None:
            q = xp.take_along_axis(q, self._kperm[:, None, :], axis=2)
        out = []
        for part in self._kparts:
            tq = part.tq
            rows = xp.ascontiguousarray(q[:, :, part.offset:part.offset + part.dim])
            qrot = be.rotate(rows.reshape(-1, part.dim), tq.rotation, scale)
            qrot = qrot.reshape(n_bh, n_rows, tq.stored_dim)
            qsk = None
            if tq.mode == "prod":
                qsk = xp.ascontiguousarray(qrot @ tq._consts(xp)["sketch"].T)
            out.append((qrot, qsk))
        return out

    def _bias_coefficients(self, q):
        """``(A, B)`` (BH, R, d/2) of the RoPE-aware offset term ``q·RoPE_t(μ) =
        Σ_i A_i cos(tθ_i) + B_i sin(tθ_i)``."""
        h = self.head_dim // 2
        mu = self._mu[:, None, :]
        q1, q2 = q[..., :h], q[..., h:]
        a = q1 * mu[..., :h] + q2 * mu[..., h:]
        b = q2 * mu[..., :h] - q1 * mu[..., h:]
        xp = self._xp
        return xp.ascontiguousarray(a), xp.ascontiguousarray(b)

    def _offset_scores(self, q, p0, n):
        """``q·m_t`` for positions ``p0..p0+n-1``: (BH, R, n) (or (BH, R, 1) without RoPE)."""
        xp = self._xp
        if self._freqs is None:
            return (q @ self._mu[:, :, None])
        a, b = self._bias_coefficients(q)
        out = xp.empty(q.shape[:2] + (n,), xp.float32)
        step = 1 << 14
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            ang = xp.arange(p0 + lo, p0 + hi, dtype=xp.float64)[None, :] * self._freqs[:, None]
            out[:, :, lo:hi] = a @ xp.cos(ang).astype(xp.float32) \
                + b @ xp.sin(ang).astype(xp.float32)
        return out

    def _shape_out(self, out, lead_shape, n_q, squeeze, origin):
        out = out.reshape(lead_shape + (n_q,) + tuple(out.shape[2:]))
        if squeeze:
            out = out.reshape(lead_shape + tuple(out.shape[len(lead_shape) + 1:]))
        return _backend.to_framework(self._xp.ascontiguousarray(out), origin)

    def scores(self, queries):
        """Estimated inner products ``⟨q, k_t⟩`` with every cached key (no scaling, no mask).

        Parameters
        ----------
        queries : array, (num_q_heads[, n_q], head_dim) (batch axis in front if batched)

        Returns
        -------
        float32 array, (num_q_heads[, n_q], T)
            In token order: sinks, compressed tokens (estimated on the codes, plus the
            exact key-offset term), window (on its dequantized keys).

        Examples
        --------
        >>> import numpy as np, rotorq
        >>> rng = np.random.default_rng(0)
        >>> cache = rotorq.KVCache(1, 64, residual_tokens=0)
        >>> k = rng.standard_normal((1, 300, 64))
        >>> cache.append(k, k)
        >>> q = rng.standard_normal((2, 64))
        >>> s = cache.scores(q)
        >>> s.shape, bool(np.corrcoef(s.ravel(), (q @ k[0].T).ravel())[0, 1] > 0.99)
        ((2, 300), True)
        """
        q, origin, lead_shape, n_q, squeeze = self._queries(queries)
        xp, be = self._xp, self._be
        n_bh = q.shape[0]
        exact = self._exact_part()
        c = self._compressed
        comp = None
        if c:
            bmap = xp.arange(n_bh, dtype=xp.int64)
            for part, (qrot, qsk) in zip(self._kparts, self._rotated_queries(q, 1.0), strict=True):
                tq, buf = part.tq, part.buffers
                k = tq._consts(xp)
                signs = qn = None
                if tq.mode == "prod":
                    signs = xp.ascontiguousarray(buf["qjl_signs"][:, :c])
                    qn = buf["qjl_norms"][:, :c].astype(xp.float32)
                codes, norms = part.rows(xp, 0, c)
                s = be.scores(qrot, qsk, bmap, xp.ascontiguousarray(codes),
                              norms.astype(xp.float32), signs, qn, bmap,
                              k["centroids"], tq.mse_bits, tq.qjl_scale if qsk is not None
                              else 0.0)
                comp = s if comp is None else comp + s
            if self._mu is not None:
                comp = comp + self._offset_scores(q, self._n_sink, c)
        if exact is None:
            out = comp
        else:
            se = q @ xp.swapaxes(exact[0], 1, 2)
            if self._offset_frame() and not self._pending:
                se = se + self._offset_scores(q, 0, 1)
            if comp is None:
                out = se
            else:
                n_s = self._n_sink
                out = xp.concatenate([se[:, :, :n_s], comp, se[:, :, n_s:]], axis=2)
        return self._shape_out(out.astype(xp.float32), lead_shape, n_q, squeeze, origin)

    def attend(self, queries, *, scale=None, causal=False):
        """Softmax attention of ``queries`` over the whole cache, on the compressed codes.

        Parameters
        ----------
        queries : array, (num_q_heads[, n_q], head_dim) (batch axis in front if batched)
        scale : float, optional
            Score scale; default ``1/√head_dim``.
        causal : bool
            Align the ``n_q`` queries with the last ``n_q`` positions: query ``i`` sees
            tokens ``0 .. T − n_q + i``.

        Returns
        -------
        float32 array, (num_q_heads[, n_q], head_dim), in the queries' framework.

        Examples
        --------
        >>> import numpy as np, rotorq
        >>> rng = np.random.default_rng(0)
        >>> cache = rotorq.KVCache(2, 32, residual_tokens=8, offset_tokens=16)
        >>> x = rng.standard_normal((2, 2, 40, 32))
        >>> cache.append(x[0], x[1])
        >>> out = cache.attend(rng.standard_normal((4, 3, 32)), causal=True)
        >>> out.shape, out.dtype
        ((4, 3, 32), dtype('float32'))
        """
        q, origin, lead_shape, n_q, squeeze = self._queries(queries)
        xp, be = self._xp, self._be
        total = len(self)
        if scale is None:
            scale = 1.0 / math.sqrt(self.head_dim)
        if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)) \
                or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale must be a positive finite number, got {scale!r}")
        scale = float(scale)
        if not isinstance(causal, (bool, np.bool_)):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
        if causal and n_q > total:
            raise ValueError(f"causal=True with n_q={n_q} queries but only {total} cached tokens")
        offset = total - n_q if causal else total
        n_bh, n_rows, _ = q.shape
        c = self._compressed
        exact = self._exact_part()

        # compressed part: fused kernel → (acc, m, l), acc in the value rotations' domains
        if c:
            kargs = []
            for part in self._kparts:
                tq, buf = part.tq, part.buffers
                cst = tq._consts(xp)
                prod = tq.mode == "prod"
                kargs.append((buf["codes"], buf["norms"], cst["centroids"], tq.mse_bits,
                              buf["qjl_signs"] if prod else None,
                              buf["qjl_norms"] if prod else None,
                              tq.qjl_scale if prod else 0.0))
            vargs = [(p.buffers["codes"], p.buffers["norms"], p.tq._consts(xp)["centroids"],
                      p.tq.mse_bits, p.tq.stored_dim) for p in self._vparts]
            bias = None
            if self._freqs is not None:
                bias = (*self._bias_coefficients(q * np.float32(scale)), self._freqs,
                        self._n_sink)
            accs, m_c, l_c = be.decode_attention(tuple(self._rotated_queries(q, scale)),
                                                 tuple(kargs), tuple(vargs), c, n_q,
                                                 offset - self._n_sink, key_bias=bias,
                                                 layout=self._vparts[0].layout)
            pieces = [be.unrotate(a.reshape(n_bh * n_rows, -1), p.tq.rotation)
                      .reshape(n_bh, n_rows, p.dim) for a, p in zip(accs, self._vparts, strict=True)]
            acc_c = pieces[0] if len(pieces) == 1 else xp.concatenate(pieces, axis=2)
            if self._vinv is not None:
                acc_c = xp.take_along_axis(acc_c, self._vinv[:, None, :], axis=2)
            if exact is None:
                return self._shape_out((acc_c / l_c[:, :, None]).astype(xp.float32),
                                       lead_shape, n_q, squeeze, origin)

        # sinks, window, pending: float32 attention on their (dequantized) keys and values,
        # merged with the compressed part (every row sees at least token 0), one kernel
        ke, ve, pos = exact
        out = be.exact_attention(q, ke, ve, pos, scale, n_q, offset, causal,
                                 (acc_c, m_c, l_c) if c else None)
        return self._shape_out(out, lead_shape, n_q, squeeze, origin)


def _grow(xp, buf, need, used, like):
    """A float32 (BH, cap, d) buffer with room for ``need`` tokens (first ``used`` kept)."""
    if buf is not None and buf.shape[1] >= need:
        return buf
    cap = max(need, 64 if buf is None else 2 * buf.shape[1])
    new = xp.empty((like.shape[0], cap, like.shape[2]), xp.float32)
    if buf is not None and used:
        new[:, :used] = buf[:, :used]
    return new


def _sink_store(xp, buf, x, p0, n_sinks):
    """Write sink tokens ``x`` (BH, n, d) at ``p0`` into ``buf`` (float16 while in range)."""
    if buf is None:
        buf = xp.empty((x.shape[0], n_sinks, x.shape[2]), xp.float16)
    if buf.dtype == xp.float16 and x.size and float(xp.abs(x).max()) > _FP16_MAX:
        buf = buf.astype(xp.float32)
    buf[:, p0:p0 + x.shape[1]] = x
    return buf


def _shrink(part, keep, limit):
    """Give back the spare capacity of a window part after a large prefill."""
    for name, buf in part.buffers.items():
        if buf.shape[1] > limit:
            part.buffers[name] = buf[:, :max(keep, limit // 2)].copy()


def _host(a):
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)


__all__ = ["KVCache"]
