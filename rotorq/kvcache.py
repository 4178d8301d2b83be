"""A decode-time KV cache that stores keys and values at 2–4 bits and attends on the codes.

Keys and values are TurboQuant-compressed per token and KV head (MATH.md §3). Attention
never materialises the decompressed cache:

- scores: ``n_t · ⟨Π q, c[idx_t]⟩`` (+ the QJL term in prod mode) with the query rotated
  once per call;
- values: ``Σ_t p_t · ν_t · c[jdx_t]`` accumulated in the rotated domain, then one inverse
  rotation per output row (linearity; works for every rotation kind);
- softmax: online (running max), exact over the compressed part plus the full-precision
  window of the most recent tokens, merged with the log-sum-exp rule.

The fused pass is the backend's ``decode_attention`` (:mod:`rotorq.cpu.attention` on the
CPU; ``rotorq.cuda`` provides the same function for GPU arrays).
"""

from __future__ import annotations

import math

import numpy as np

from . import _backend
from ._arrays import origin_of
from .rotation import ROTATIONS
from .turboquant import MODES, TurboQuant, _positive_int

_FP16_NORM_BYTES = 2
_WINDOW_BYTES = 4  # the window is float32


def _non_negative_int(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def _dtype_name(x, arr) -> str:
    """The caller's element type (bfloat16 is widened to float32 on the host view)."""
    if "bfloat16" in str(getattr(x, "dtype", "")):
        return "bfloat16"
    return np.dtype(arr.dtype).name


class _Part:
    """One channel subset of one stream (keys or values): its quantizer and growth buffers."""

    def __init__(self, tq: TurboQuant, offset: int):
        self.tq = tq
        self.offset = offset  # first channel of this part in the permuted channel order
        self.dim = tq.dim
        self.buffers: dict = {}

    def row_bytes(self) -> int:
        """Stored bytes of one token of one KV head."""
        tq = self.tq
        n = (tq.stored_dim * tq.mse_bits + 7) // 8 + _FP16_NORM_BYTES
        if tq.mode == "prod":
            n += (tq.qjl_dim + 7) // 8 + _FP16_NORM_BYTES
        return n

    def append(self, xp, rows, n_bh, n_tok, used):
        """Quantize ``rows`` (n_bh·n_tok, dim) and write them after the ``used`` tokens."""
        qv = self.tq.quantize(rows)
        for name, arr in qv.parts.items():
            arr = arr.reshape((n_bh, n_tok) + tuple(arr.shape[1:]))
            buf = self.buffers.get(name)
            need = used + n_tok
            if buf is None or buf.shape[1] < need:
                cap = max(need, 256 if buf is None else 2 * buf.shape[1])
                new = xp.empty((n_bh, cap) + tuple(arr.shape[2:]), arr.dtype)
                if buf is not None:
                    new[:, :used] = buf[:, :used]
                buf = self.buffers[name] = new
            buf[:, used:need] = arr


class KVCache:
    """KV cache with keys and values compressed to a few bits, attended on the codes.

    Parameters
    ----------
    num_kv_heads : int
        Number of KV heads ``H``.
    head_dim : int
        Channels per head ``d``.
    key_bits, value_bits : int
        Bits per stored coordinate of the keys (prod mode: total, 1 of them for QJL) and
        of the values (always MSE mode).
    key_mode : {"mse", "prod"}
        TurboQuant mode of the keys. ``"mse"`` usually wins inside softmax (MATH.md §3).
    rotation : {"hadamard", "dense", "rotor"}
        Rotation of every quantizer. Hadamard pads each part to a power of two (with
        outlier channels: choose ``head_dim - k`` a power of two, or use ``"dense"``).
    residual_tokens : int
        The most recent ``residual_tokens`` tokens stay in full precision (float32).
        Older tokens are compressed in blocks of ``block_tokens``: after ``T`` tokens
        in total, ``max(0, ⌊(T − residual_tokens) / block_tokens⌋ · block_tokens)`` are
        compressed. The state depends on ``T`` only, so streaming one token at a time
        and a single prefill give identical caches.
    outlier_channels : int or array of int
        ``k > 0``: the ``k`` channels of largest RMS per KV head, chosen separately for
        keys and values from the first non-empty append, get their own quantizers at
        ``outlier_bits``. An array ``(k,)`` or ``(num_kv_heads, k)`` gives the channels
        explicitly (used for keys and values alike). ``0``: no split.
    outlier_bits : int, optional
        Bits of the outlier parts (keys and values); default: base bits + 1 (max 8).
    seed : int
        Seed of the rotations (and QJL sketches); key/value and normal/outlier quantizers
        use the derived seeds ``4·seed + i``, ``i = 0..3``.
    block_tokens : int, optional
        Compression granularity (default ``min(64, residual_tokens)``, at least 1).
    norm_correction : bool
        Store ``‖x‖/‖c[idx]‖`` as the norm (MATH.md §3), so decompressed keys and values
        keep their length: no shrinkage of the scores (a softmax temperature change) or of
        the output. Lowers the attention-output error by ~8% at 4 bits.

    Notes
    -----
    ``append`` takes ``(num_kv_heads, t, head_dim)`` or ``(batch, num_kv_heads, t,
    head_dim)``; the first non-empty append fixes the batch size, the device and the
    dtypes of keys and values. An append of ``t = 0`` tokens is validated and otherwise a
    no-op. Queries are ``(num_q_heads, head_dim)`` or ``(num_q_heads, n_q, head_dim)``
    (with the batch axis in front for a batched cache); query head ``h`` reads KV head
    ``h // (num_q_heads // num_kv_heads)``. Results are float32 in the queries' framework;
    without an ``n_q`` axis in the queries there is none in the result.

    Examples
    --------
    >>> import numpy as np, rotorq
    >>> rng = np.random.default_rng(0)
    >>> cache = rotorq.KVCache(2, 64, key_bits=4, value_bits=4, residual_tokens=32)
    >>> k = rng.standard_normal((2, 500, 64), dtype=np.float32)
    >>> v = rng.standard_normal((2, 500, 64), dtype=np.float32) + rng.standard_normal((2, 1, 64))
    >>> cache.append(k[:, :499], v[:, :499])      # prefill
    >>> cache.append(k[:, 499:], v[:, 499:])      # decode: one token at a time
    >>> len(cache), cache.compressed_tokens, cache.window_tokens
    (500, 448, 52)
    >>> q = rng.standard_normal((8, 64), dtype=np.float32)   # 8 query heads (GQA 4:1)
    >>> out = cache.attend(q)
    >>> out.shape, cache.scores(q).shape
    ((8, 64), (8, 500))
    >>> s = np.einsum("hd,htd->ht", q, k.repeat(4, 0)) / 8.0   # exact attention
    >>> p = np.exp(s - s.max(1, keepdims=True)); p /= p.sum(1, keepdims=True)
    >>> exact = np.einsum("ht,htd->hd", p, v.repeat(4, 0))
    >>> bool(np.linalg.norm(out - exact) / np.linalg.norm(exact) < 0.02)
    True
    >>> cache.nbytes   # 448 tokens · 2 heads · (34 + 34) B of codes and norms + float32 window
    114176
    """

    def __init__(self, num_kv_heads, head_dim, *, key_bits=4, value_bits=3, key_mode="mse",
                 rotation="hadamard", residual_tokens=128, outlier_channels=0,
                 outlier_bits=None, seed=0, block_tokens=None, norm_correction=True):
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
            block_tokens = max(1, min(64, self.residual_tokens))
        self.block_tokens = _positive_int(block_tokens, "block_tokens")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.seed = int(seed)
        for name, bits in (("key_bits", key_bits), ("value_bits", value_bits)):
            if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
                raise TypeError(f"{name} must be an int, got {type(bits).__name__}")
        nc = self.norm_correction = bool(norm_correction)
        d, heads = self.head_dim, self.num_kv_heads

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

        def quantizers(bits, mode, obits, i):
            parts = [_Part(TurboQuant(d - k, bits, mode=mode, rotation=rotation,
                                      seed=4 * self.seed + i, norm_correction=nc), 0)]
            if k:
                parts.append(_Part(TurboQuant(k, obits, mode=mode, rotation=rotation,
                                              seed=4 * self.seed + i + 1, norm_correction=nc),
                                   d - k))
            return parts

        kb_out = min(8, key_bits + 1) if outlier_bits is None else outlier_bits
        vb_out = min(8, value_bits + 1) if outlier_bits is None else outlier_bits
        self.key_bits, self.value_bits = key_bits, value_bits
        self.outlier_bits = (kb_out, vb_out) if k else None
        self._kparts = quantizers(key_bits, key_mode, kb_out, 0)
        self._vparts = quantizers(value_bits, "mse", vb_out, 2)

        # state fixed by the first non-empty append
        self._origin = None
        self._dtypes = None
        self._batch = None  # None: unbatched; else the batch size
        self._xp = None
        self._be = None
        self._kperm = self._vperm = None  # (BH, d) permuted channel order, or None
        self._vinv = None
        self._compressed = 0
        self._window = 0
        self._win_k = self._win_v = None

    # -- properties -------------------------------------------------------------------
    def __len__(self):
        return self._compressed + self._window

    @property
    def compressed_tokens(self) -> int:
        """Tokens stored as codes."""
        return self._compressed

    @property
    def window_tokens(self) -> int:
        """Tokens held in full precision (the most recent ones)."""
        return self._window

    @property
    def batch_size(self):
        """Batch size fixed by the first append (None: unbatched, or nothing appended yet)."""
        return self._batch

    @property
    def device(self):
        """"cpu" or "cuda" once something was appended, else None."""
        return None if self._origin is None else self._origin.device

    def _outliers(self, perm):
        if perm is None or not self.num_outlier_channels:
            return None
        return np.sort(_host(perm[: self.num_kv_heads, self.head_dim - self.num_outlier_channels:]),
                       axis=1)

    @property
    def key_outlier_channels(self):
        """Outlier channels of the keys per KV head, (num_kv_heads, k) (None before any append)."""
        return self._outliers(self._kperm)

    @property
    def value_outlier_channels(self):
        """Outlier channels of the values per KV head, (num_kv_heads, k)."""
        return self._outliers(self._vperm)

    @property
    def bytes_per_token(self) -> int:
        """Compressed bytes of one token (all KV heads, keys and values, one sequence)."""
        return self.num_kv_heads * sum(p.row_bytes() for p in self._kparts + self._vparts)

    @property
    def nbytes(self) -> int:
        """True bytes held: packed codes, norms, QJL parts, outlier parts and the float32
        window of every stored token (spare capacity of the growth buffers and per-cache
        constants such as rotations and channel indices are not counted)."""
        n_seq = 1 if self._batch is None else self._batch
        window = self._window * n_seq * self.num_kv_heads * 2 * self.head_dim * _WINDOW_BYTES
        return self._compressed * n_seq * self.bytes_per_token + window

    def __repr__(self):
        return (f"KVCache(num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"key_bits={self.key_bits}, value_bits={self.value_bits}, "
                f"key_mode={self.key_mode!r}, rotation={self.rotation!r}, tokens={len(self)}, "
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
        >>> cache = rotorq.KVCache(1, 16, residual_tokens=4)
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
        _backend.require_finite(xp, k, "keys")
        _backend.require_finite(xp, v, "values")
        n_bh = (1 if batch is None else batch) * self.num_kv_heads
        k = xp.ascontiguousarray(k.reshape(n_bh, t, self.head_dim), dtype=xp.float32)
        v = xp.ascontiguousarray(v.reshape(n_bh, t, self.head_dim), dtype=xp.float32)
        if self._origin is None:
            self._start(k_origin, be, dtypes, batch, k, v)

        # After T tokens, exactly max(0, ⌊(T − R)/B⌋·B) are compressed (a function of T).
        r_tok, blk = self.residual_tokens, self.block_tokens
        total = len(self) + t
        target = max(0, (total - r_tok) // blk * blk)
        n_c = target - self._compressed
        w = self._window
        from_win = min(n_c, w)
        from_new = n_c - from_win
        if n_c:
            for x, win, parts, perm in ((k, self._win_k, self._kparts, self._kperm),
                                        (v, self._win_v, self._vparts, self._vperm)):
                old = win[:, :from_win]
                block = old if from_new == 0 else (
                    x[:, :from_new] if from_win == 0
                    else xp.concatenate([old, x[:, :from_new]], axis=1))
                self._compress(xp, block, parts, perm)
            self._compressed = target
        keep_w = w - from_win
        for x, win in ((k, self._win_k), (v, self._win_v)):
            if from_win and keep_w:
                win[:, :keep_w] = win[:, from_win:w].copy()
            win[:, keep_w:keep_w + t - from_new] = x[:, from_new:]
        self._window = keep_w + t - from_new

    def _start(self, origin, be, dtypes, batch, k, v):
        """Fix device, dtypes and layout; pick the outlier channels; allocate the window."""
        xp = be.xp
        self._origin, self._be, self._xp = origin, be, xp
        self._dtypes, self._batch = dtypes, batch
        n_bh = k.shape[0]
        heads, d, n_out = self.num_kv_heads, self.head_dim, self.num_outlier_channels

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

        self._kperm = perm_for(k)
        self._vperm = perm_for(v)
        if self._vperm is not None:
            self._vinv = xp.argsort(self._vperm, axis=1)
        cap = self.residual_tokens + self.block_tokens
        self._win_k = xp.empty((n_bh, cap, d), xp.float32)
        self._win_v = xp.empty((n_bh, cap, d), xp.float32)

    def _compress(self, xp, block, parts, perm):
        """Quantize ``block`` (BH, n, d) float32 into the parts' buffers."""
        n_bh, n_tok, _ = block.shape
        for part in parts:
            if perm is None:
                rows = xp.ascontiguousarray(block)
            else:  # this part's channels of each head, gathered head by head (fast takes)
                cols = perm[:, part.offset:part.offset + part.dim]
                rows = xp.empty((n_bh, n_tok, part.dim), xp.float32)
                for b in range(n_bh):
                    xp.take(block[b], cols[b], axis=1, out=rows[b])
            part.append(xp, rows.reshape(n_bh * n_tok, part.dim), n_bh, n_tok,
                        self._compressed)

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
        if self._kperm is not None:
            q = xp.take_along_axis(q, self._kperm[:, None, :], axis=2)
        out = []
        for part in self._kparts:
            tq = part.tq
            rows = xp.ascontiguousarray(q[:, :, part.offset:part.offset + part.dim])
            qrot = be.rotate(rows.reshape(-1, part.dim), tq.rotation)
            if scale != 1.0:
                qrot *= np.float32(scale)
            qrot = qrot.reshape(n_bh, n_rows, tq.stored_dim)
            qsk = None
            if tq.mode == "prod":
                qsk = xp.ascontiguousarray(qrot @ tq._consts(xp)["sketch"].T)
            out.append((qrot, qsk))
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
            Compressed tokens first (estimated on the codes), then the window (exact).

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
        parts = []
        c = self._compressed
        if c:
            total = None
            bmap = xp.arange(n_bh, dtype=xp.int64)
            for part, (qrot, qsk) in zip(self._kparts, self._rotated_queries(q, 1.0), strict=True):
                tq, buf = part.tq, part.buffers
                k = tq._consts(xp)
                signs = qn = None
                if tq.mode == "prod":
                    signs = xp.ascontiguousarray(buf["qjl_signs"][:, :c])
                    qn = buf["qjl_norms"][:, :c].astype(xp.float32)
                s = be.scores(qrot, qsk, bmap, xp.ascontiguousarray(buf["codes"][:, :c]),
                              buf["norms"][:, :c].astype(xp.float32), signs, qn, bmap,
                              k["centroids"], tq.mse_bits, tq.qjl_scale if qsk is not None
                              else 0.0)
                total = s if total is None else total + s
            parts.append(total)
        if self._window:
            parts.append(q @ xp.swapaxes(self._win_k[:, :self._window], 1, 2))
        out = parts[0] if len(parts) == 1 else xp.concatenate(parts, axis=2)
        return self._shape_out(out, lead_shape, n_q, squeeze, origin)

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
        >>> cache = rotorq.KVCache(2, 32, residual_tokens=8)
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
        c, w = self._compressed, self._window

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
            accs, m_c, l_c = be.decode_attention(tuple(self._rotated_queries(q, scale)),
                                                 tuple(kargs), tuple(vargs), c, n_q, offset)
            pieces = [be.unrotate(a.reshape(n_bh * n_rows, -1), p.tq.rotation)
                      .reshape(n_bh, n_rows, p.dim) for a, p in zip(accs, self._vparts, strict=True)]
            acc_c = pieces[0] if len(pieces) == 1 else xp.concatenate(pieces, axis=2)
            if self._vinv is not None:
                acc_c = xp.take_along_axis(acc_c, self._vinv[:, None, :], axis=2)

        # window: exact float32 attention over the most recent tokens
        if w:
            s = (q @ xp.swapaxes(self._win_k[:, :w], 1, 2)) * np.float32(scale)
            if causal:
                pos = c + xp.arange(w)
                limit = xp.arange(n_rows) % n_q + offset
                s = xp.where(pos[None, None, :] <= limit[None, :, None], s,
                             np.float32(-np.inf))
            m_w = s.max(axis=2)
            safe = xp.where(xp.isfinite(m_w), m_w, np.float32(0.0))
            p = xp.exp(s - safe[:, :, None])
            l_w = p.sum(axis=2)
            acc_w = p @ self._win_v[:, :w]

        if not c:
            out = acc_w / l_w[:, :, None]
        elif not w:
            out = acc_c / l_c[:, :, None]
        else:
            m = xp.maximum(m_c, m_w)  # finite: every row sees at least one token
            a = xp.exp(m_c - m)
            b = xp.exp(m_w - m)
            out = (acc_c * a[:, :, None] + acc_w * b[:, :, None]) / (a * l_c + b * l_w)[:, :, None]
        return self._shape_out(out.astype(xp.float32), lead_shape, n_q, squeeze, origin)


def _host(a):
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)


__all__ = ["KVCache"]
