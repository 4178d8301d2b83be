"""The KV cache façade: :class:`KVCache`, a decode-time cache that stores keys and values
at 2–4 bits and attends on the codes.

The façade checks arguments, holds the cache's lock and its one state, and commits each
append's new state at once. The rest of :mod:`rotorq.kv`: the storing (:mod:`.store`) over
the tiers (:mod:`.tiers`, :mod:`.codes`, :mod:`.window`), the key preparation
(:mod:`.keys`), the checks (:mod:`.checks`), and attention on a state (:mod:`.attention`,
:mod:`.exact`). The fidelity levers measured on SmolLM2 (``benchmarks/RESULTS.md``) are
built in: a per-sequence key offset (RoPE-aware with ``rope_base``), optional calibrated
key channel scales, norm correction, attention-sink tokens and a two-tier recent window
(the newest tokens at ``residual_bits``, demoted to the base bits from those codes as
they age).
"""

from __future__ import annotations

import math
import threading

import numpy as np

from .. import _backend
from .._arrays import origin_of
from .._checks import positive_int
from ..rotation import ROTATIONS
from ..turboquant import MODES, TurboQuant
from . import attention
from .codes import Codes, Compressed, Part
from .exact import ExactRows
from .keys import outlier_channels
from .prep import _host
from .store import Plan, Setup, appended, initial_state
from .window import FloatWindow, QuantizedWindow

_WINDOW_BYTES = 4  # a full-precision window is float32
_OFFSET_BYTES = 2  # the fitted key offset μ is rounded to float16
_WINDOW_SEED = 1 << 31  # window quantizers: seeds 4·seed + i + 2**31


class KVCache:
    """KV cache with keys and values compressed to a few bits, attended on the codes.

    Token layout along the sequence: ``sink_tokens`` attention sinks (float16), then the
    compressed tokens (``key_bits``/``value_bits``), then the recent window (the
    ``residual_tokens`` newest, at ``residual_bits`` or full precision). Keys are stored
    as ``s ⊙ (k_t − m_t)`` (:mod:`rotorq.kv.prep`): ``m_t`` a per-sequence key offset fitted
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
        TurboQuant mode of the compressed keys. ``"mse"`` wins inside softmax
        (``docs/math.md``; prod keys cost +400% perplexity at 3 bits on SmolLM2,
        ``benchmarks/RESULTS.md``).
    rotation : {"hadamard", "dense", "rotor"}
        Rotation of every quantizer. Hadamard pads each part to a power of two (with
        outlier channels: choose ``head_dim - k`` a power of two, or use ``"dense"``).
    residual_tokens : int
        Size ``R`` of the recent window. After ``T`` tokens (and once the key offset is
        fitted), ``max(0, ⌊(T − sinks − R) / B⌋ · B)`` tokens are compressed, ``B =
        block_tokens``; the rest stay in the window. The state depends on ``T`` only, so
        streaming one token at a time, a single prefill and any chunking in between give
        identical caches, with two exceptions. Automatic outlier channels
        (``outlier_channels=k``) are chosen from the tokens held when the pending phase
        ends — the first ``sink_tokens + offset_tokens`` when streaming, every token of a
        longer first append (without ``key_offset``: the first append) — so streams and
        prefills may choose different channels: give them as an array for identical
        caches. With ``rotation="dense"`` a matrix product rounds differently for
        different numbers of rows (BLAS), so a coordinate at a rounding boundary may get
        the neighbouring code: attention agrees closely (to about 1e-3) but not bit for
        bit.
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
        :func:`rotorq.kv.prep.channel_scales`; ``(σq/σk)^½`` from a calibration text);
        exact: the queries are divided by ``s``.
    outlier_channels : int or array of int
        ``k > 0``: the ``k`` channels of largest RMS per KV head (of the prepared keys, of
        the values), chosen separately for keys and values from the tokens after the sinks
        held when the pending phase ends (see ``residual_tokens``), get their own
        quantizers at ``outlier_bits``. An array ``(k,)`` or
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
        Store ``‖x‖/‖c[idx]‖`` as the norm (``docs/math.md``), so decompressed keys and values
        keep their length.
    check_finite : bool
        Refuse, on the append that brings them, keys and values that hold NaN or Inf or
        whose vector norms exceed the range of the float16 norms the cache stores, with a
        ``ValueError`` (nothing is stored; :meth:`append` says which norms are checked).
        On a GPU a check is a device synchronization, one per append (two when tokens leave
        a quantized window for the base tier): the host cannot queue work ahead of the GPU.
        ``False`` skips them, as ``check_finite`` does in :mod:`scipy.linalg`: non-finite or
        out-of-range input is then stored as it comes, and every later ``attend`` and
        ``scores`` over it gives NaN or Inf.

    Notes
    -----
    ``append`` takes ``(num_kv_heads, t, head_dim)`` or ``(batch, num_kv_heads, t,
    head_dim)``; the first non-empty append fixes the batch size, the device and the
    dtypes of keys and values. An append of ``t = 0`` tokens is validated and otherwise a
    no-op. Queries are ``(num_q_heads, head_dim)`` or ``(num_q_heads, n_q, head_dim)``
    (with the batch axis in front for a batched cache); query head ``h`` reads KV head
    ``h // (num_q_heads // num_kv_heads)``. Results are float32 in the queries' framework;
    without an ``n_q`` axis in the queries there is none in the result.

    An append is a transaction: it computes the cache's next state, then commits it at
    once, so an append that raises — refused input, or any exception on the way, a
    ``KeyboardInterrupt`` included — leaves the cache exactly as it was. ``append``,
    ``attend`` and ``scores`` hold the cache's lock (a :class:`threading.RLock`): threads
    may share a cache, their calls run one at a time, and an ``attend`` sees the cache
    before or after an append, never in between.

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
        self._lock = threading.RLock()
        self.num_kv_heads = positive_int(num_kv_heads, "num_kv_heads")
        self.head_dim = positive_int(head_dim, "head_dim")
        if key_mode not in MODES:
            raise ValueError(f"key_mode must be one of {MODES}, got {key_mode!r}")
        if rotation not in ROTATIONS:
            raise ValueError(f"rotation must be one of {ROTATIONS}, got {rotation!r}")
        self.key_mode = key_mode
        self.rotation = rotation
        self.residual_tokens = _non_negative_int(residual_tokens, "residual_tokens")
        if block_tokens is None:
            block_tokens = max(1, min(8, self.residual_tokens))
        self.block_tokens = positive_int(block_tokens, "block_tokens")
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
        self.offset_tokens = positive_int(offset_tokens, "offset_tokens")
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

        explicit = None
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
            explicit = srt.astype(np.int64)
        self.num_outlier_channels = k
        if outlier_bits is not None and k == 0:
            raise ValueError("outlier_bits needs outlier_channels > 0")
        if outlier_bits is not None and (isinstance(outlier_bits, bool)
                                         or not isinstance(outlier_bits, (int, np.integer))):
            raise TypeError(f"outlier_bits must be an int, got {type(outlier_bits).__name__}")

        def quantizers(bits, mode, obits, seed, kind):
            parts = [Part(TurboQuant(d - k, bits, mode=mode, rotation=rotation,
                                     seed=seed, norm_correction=nc), 0, kind)]
            if k:
                parts.append(Part(TurboQuant(k, obits, mode=mode, rotation=rotation,
                                             seed=seed + 1, norm_correction=nc), d - k, kind))
            return Codes(parts)

        kb_out = min(8, key_bits + 1) if outlier_bits is None else outlier_bits
        vb_out = min(8, value_bits + 1) if outlier_bits is None else outlier_bits
        self.key_bits, self.value_bits = key_bits, value_bits
        self.outlier_bits = (kb_out, vb_out) if k else None
        base = Compressed(quantizers(key_bits, key_mode, kb_out, 4 * self.seed, "keys"),
                          quantizers(value_bits, "mse", vb_out, 4 * self.seed + 2, "values"))
        if residual_bits is None:
            window = FloatWindow(self.residual_tokens + self.block_tokens)
        else:
            rb, rb_out = residual_bits, min(8, residual_bits + 1)
            window = QuantizedWindow(
                quantizers(rb, "mse", rb_out, 4 * self.seed + _WINDOW_SEED, "keys"),
                quantizers(rb, "mse", rb_out, 4 * self.seed + 2 + _WINDOW_SEED, "values"))
        self._plan = Plan(
            heads=heads, head_dim=d, sink_tokens=self.sink_tokens,
            residual_tokens=self.residual_tokens, block_tokens=self.block_tokens,
            key_offset=self.key_offset, offset_tokens=self.offset_tokens,
            rope_base=self.rope_base, key_scales=self.key_scales, n_outliers=k,
            outliers=explicit, check_finite=self.check_finite, base=base, window=window)
        self._state = initial_state(self._plan)
        # the sinks and window as float32 rows, kept decoded across attend and scores calls
        self._exact = ExactRows(self.residual_tokens + self.block_tokens)

    # -- properties -------------------------------------------------------------------
    def __len__(self):
        return len(self._state)

    @property
    def compressed_tokens(self) -> int:
        """Tokens stored at ``key_bits``/``value_bits``."""
        return self._state.base.count

    @property
    def window_tokens(self) -> int:
        """Tokens in the recent window (at ``residual_bits``, or float32)."""
        return self._state.window.count

    @property
    def sink_count(self) -> int:
        """Attention-sink tokens held (float16), at most ``sink_tokens``."""
        return self._state.sinks.count

    @property
    def pending_tokens(self) -> int:
        """Tokens held in float32 while the key offset waits for ``offset_tokens`` tokens."""
        return self._state.pending.count

    @property
    def batch_size(self):
        """Batch size fixed by the first append (None: unbatched, or nothing appended yet)."""
        setup = self._state.setup
        return None if setup is None else setup.batch

    @property
    def device(self):
        """"cpu" or "cuda" once something was appended, else None."""
        setup = self._state.setup
        return None if setup is None else setup.origin.device

    @property
    def key_offset_vector(self):
        """The fitted key offset μ per sequence and KV head as a host float32 array of shape
        ``([batch,] num_kv_heads, head_dim)`` (pre-RoPE with ``rope_base``), or None."""
        state = self._state
        if state.frame is None or state.frame.mu is None:
            return None
        mu = _host(state.frame.mu)
        batch = state.setup.batch
        return mu if batch is None else mu.reshape(batch, self.num_kv_heads, -1)

    @property
    def key_outlier_channels(self):
        """Outlier channels of the keys per KV head, (num_kv_heads, k) (None before the
        cache starts compressing)."""
        frame = self._state.frame
        return None if frame is None else outlier_channels(
            frame.kperm, self.num_kv_heads, self.num_outlier_channels)

    @property
    def value_outlier_channels(self):
        """Outlier channels of the values per KV head, (num_kv_heads, k)."""
        frame = self._state.frame
        return None if frame is None else outlier_channels(
            frame.vperm, self.num_kv_heads, self.num_outlier_channels)

    @property
    def bytes_per_token(self) -> int:
        """Bytes of one compressed token (all KV heads, keys and values, one sequence)."""
        return self.num_kv_heads * self._plan.base.row_bytes

    @property
    def window_bytes_per_token(self) -> int:
        """Bytes of one window token (all KV heads, keys and values, one sequence)."""
        window = self._plan.window
        if window.row_bytes is None:
            return self.num_kv_heads * 2 * self.head_dim * _WINDOW_BYTES
        return self.num_kv_heads * window.row_bytes

    @property
    def nbytes(self) -> int:
        """True bytes held: packed codes, norms, QJL and outlier parts of the compressed
        tokens, the window (codes or float32), the sinks (float16/float32), pending float32
        tokens and the float16 key offset μ of every sequence (spare capacity of the growth
        buffers and per-cache constants such as rotations, channel scales and indices are
        not counted)."""
        state = self._state
        n_seq = 1 if state.setup is None or state.setup.batch is None else state.setup.batch
        hd = self.num_kv_heads * self.head_dim
        n = (state.base.count * self.bytes_per_token
             + state.window.count * self.window_bytes_per_token
             + state.sinks.nbytes(hd) + state.pending.nbytes(hd))
        if state.frame is not None and state.frame.mu is not None:
            n += hd * _OFFSET_BYTES
        return n_seq * n

    @property
    def bits_per_coordinate(self) -> float:
        """``8 · nbytes`` per stored coordinate (tokens · sequences · heads · d · 2)."""
        state = self._state
        n_seq = 1 if state.setup is None or state.setup.batch is None else state.setup.batch
        coords = len(state) * n_seq * self.num_kv_heads * self.head_dim * 2
        return 8.0 * self.nbytes / coords if coords else 0.0

    def __repr__(self):
        state = self._state
        return (f"KVCache(num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"key_bits={self.key_bits}, value_bits={self.value_bits}, "
                f"residual_bits={self.residual_bits}, key_mode={self.key_mode!r}, "
                f"rotation={self.rotation!r}, tokens={len(state)}, "
                f"compressed={state.base.count}, nbytes={self.nbytes})")

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
        ``t = 0`` is a no-op (after validation). The append is all or nothing: when it
        raises, the cache is as before.

        With ``check_finite`` (the default), every token is checked by the tier it ends the
        append in: NaN or Inf anywhere are refused; so are vector norms beyond float16's
        range (65504) of a token that will be stored with float16 norms — as stored, for
        tokens quantized now (the window at ``residual_bits``, the base tier); its key after
        the key offset and channel scales, and its value, for a token entering a float32
        window; its key and value as given, for a token held pending. Sinks are kept as
        they come. A token whose norms are within a few percent of the limit may pass and
        be refused later, when it is compressed (norm correction and, for a pending token,
        the key offset change its stored norm): that later append is then refused as a
        whole.

        Raises
        ------
        ValueError
            Head count, head_dim, rank, batch size or token count mismatch; NaN/Inf; norms
            beyond float16's range; a device different from the first append's.
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
        with self._lock:
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
            setup = self._state.setup
            if setup is not None:
                o = setup.origin
                if (k_origin.device, k_origin.device_id) != (o.device, o.device_id):
                    raise ValueError(f"keys/values are on {k_origin.device}:{k_origin.device_id} "
                                     f"but the cache lives on {o.device}:{o.device_id} (fixed by "
                                     "the first append)")
                for name, got, want in zip(("keys", "values"), dtypes, setup.dtypes, strict=True):
                    if got != want:
                        raise TypeError(f"{name} have dtype {got} but the cache holds {want} "
                                        f"{name} (fixed by the first append)")
                if (batch is None) != (setup.batch is None) or batch != setup.batch:
                    want = ("(num_kv_heads, t, head_dim)" if setup.batch is None
                            else f"(batch={setup.batch}, num_kv_heads, t, head_dim)")
                    raise ValueError(f"keys/values of shape {tuple(k.shape)} do not match the "
                                     f"cache's layout {want} (fixed by the first append)")
            t = k.shape[-2]
            if t == 0:
                return
            xp = be.xp
            n_bh = (1 if batch is None else batch) * self.num_kv_heads
            k = xp.ascontiguousarray(k.reshape(n_bh, t, self.head_dim), dtype=xp.float32)
            v = xp.ascontiguousarray(v.reshape(n_bh, t, self.head_dim), dtype=xp.float32)
            if setup is None:
                setup = Setup(k_origin, be, xp, dtypes, batch, n_bh)
            self._state = appended(self._plan, self._state, setup, k, v)  # the commit

    # -- queries ----------------------------------------------------------------------
    def _queries(self, state, queries):
        """Validate queries against ``state``; returns ``(rows (BH, R, d) float32, origin,
        lead shape, n_q, squeeze)``."""
        setup = state.setup
        if setup is None or len(state) == 0:
            raise ValueError("the cache is empty; append keys and values first")
        q, origin, _ = _backend.float_array(queries, "queries", dim=self.head_dim, min_ndim=2)
        if (origin.device, origin.device_id) != (setup.origin.device, setup.origin.device_id):
            raise ValueError(f"queries are on {origin.device}:{origin.device_id} but the cache "
                             f"lives on {setup.origin.device}:{setup.origin.device_id}")
        batched = setup.batch is not None
        lead = 1 if batched else 0
        if q.ndim not in (lead + 2, lead + 3):
            want = "(batch, num_q_heads[, n_q], head_dim)" if batched \
                else "(num_q_heads[, n_q], head_dim)"
            raise ValueError(f"queries must have shape {want}, got {tuple(q.shape)}")
        if batched and q.shape[0] != setup.batch:
            raise ValueError(f"queries have batch size {q.shape[0]} but the cache holds "
                             f"{setup.batch} sequences")
        squeeze = q.ndim == lead + 2
        xp = setup.xp
        if xp is np:  # on a GPU the check would cost a device sync per call: NaN in, NaN out
            _backend.require_finite(xp, q, "queries")
        n_qh = q.shape[lead]
        if n_qh % self.num_kv_heads:
            raise ValueError(f"queries have {n_qh} heads (num_q_heads), not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        n_q = 1 if squeeze else q.shape[lead + 1]
        n_seq = setup.batch or 1
        q = xp.asarray(q, dtype=xp.float32).reshape(
            n_seq * self.num_kv_heads, (n_qh // self.num_kv_heads) * n_q, self.head_dim)
        lead_shape = ((setup.batch,) if batched else ()) + (n_qh,)
        return xp.ascontiguousarray(q), origin, lead_shape, n_q, squeeze

    @staticmethod
    def _shape_out(xp, out, lead_shape, n_q, squeeze, origin):
        out = out.reshape(lead_shape + (n_q,) + tuple(out.shape[2:]))
        if squeeze:
            out = out.reshape(lead_shape + tuple(out.shape[len(lead_shape) + 1:]))
        return _backend.to_framework(xp.ascontiguousarray(out), origin)

    def scores(self, queries):
        """Estimated inner products ``⟨q, k_t⟩`` with every cached key (no scaling, no mask).

        Parameters
        ----------
        queries : array, (num_q_heads[, n_q], head_dim) (batch axis in front if batched)

        Returns
        -------
        float32 array, (num_q_heads[, n_q], T)
            In token order: sinks, compressed tokens (estimated on the codes, plus the
            exact key-offset term), window (on its dequantized keys). Queries with 0 heads
            or ``n_q = 0`` give an empty result.

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
        with self._lock:
            state = self._state
            q, origin, lead_shape, n_q, squeeze = self._queries(state, queries)
            xp = state.setup.xp
            if q.shape[1] == 0:
                out = xp.zeros(q.shape[:2] + (len(state),), xp.float32)
            else:
                out = attention.scores(state, self._exact, q)
            return self._shape_out(xp, out, lead_shape, n_q, squeeze, origin)

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
            Queries with 0 heads or ``n_q = 0`` give an empty result, as :meth:`scores`.

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
        >>> cache.attend(np.zeros((0, 32))).shape   # no query heads: nothing to attend
        (0, 32)
        """
        with self._lock:
            state = self._state
            q, origin, lead_shape, n_q, squeeze = self._queries(state, queries)
            xp = state.setup.xp
            total = len(state)
            if scale is None:
                scale = 1.0 / math.sqrt(self.head_dim)
            if isinstance(scale, bool) or not isinstance(
                    scale, (int, float, np.floating, np.integer)) \
                    or not math.isfinite(scale) or scale <= 0:
                raise ValueError(f"scale must be a positive finite number, got {scale!r}")
            if not isinstance(causal, (bool, np.bool_)):
                raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
            if causal and n_q > total:
                raise ValueError(f"causal=True with n_q={n_q} queries but only {total} cached "
                                 "tokens")
            if q.shape[1] == 0:
                out = xp.zeros(q.shape, xp.float32)
            else:
                out = attention.attend(state, self._exact, q, float(scale), n_q,
                                       total - n_q if causal else total, causal)
            return self._shape_out(xp, out, lead_shape, n_q, squeeze, origin)


def _dtype_name(x, arr) -> str:
    """The caller's element type (bfloat16 is widened to float32 on the host view)."""
    if "bfloat16" in str(getattr(x, "dtype", "")):
        return "bfloat16"
    return np.dtype(arr.dtype).name


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


__all__ = ["KVCache"]
