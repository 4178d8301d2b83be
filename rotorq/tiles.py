"""Fragment-tiled storage of packed key and value codes for the tensor-core attention kernel.

The KV cache stores each token's packed codes as one row (``codes[bh, t]``, the bytes of
:meth:`rotorq.TurboQuant.quantize`) and its norm as ``norms[bh, t]``. On a GPU the
tensor-core decode attention (:func:`rotorq.cuda.attention.attention_kernel` with
``tiled=True``) reads 16 tokens per warp step, and each lane needs scattered pieces of those
rows: 12 bytes of two tokens' keys, 6 bytes of four tokens' values, four norms. Read from the
row layout, that is 22 scattered loads per lane and step. The *tile layout* permutes the bits
of every block of 16 consecutive rows (the same array, shape and bytes; only positions inside
each 16-token block move) so that each lane's pieces are contiguous and a warp's loads are
coalesced 16- and 8-byte vectors:

- keys, a token's row split into 4 quarters of ``dim·bits/4`` bits: lane ``l = 4g + t``
  holds quarter ``t`` of tokens ``g`` and ``g + 8`` (its ``2·kw`` words);
- values, a row split into 8 eighths of ``dim·bits/8`` bits: lane ``l`` holds eighth ``g``
  of tokens ``2t, 2t+1``, then of ``2t+8, 2t+9`` (``2·vw`` words), the two tokens' codes of
  each coordinate side by side (the pair the MMA wants in one register is one field);
- each lane's words are cut into 16-byte chunks and one 8-byte rest; chunk ``c`` of lane
  ``l`` is at word ``128c + 4l`` of the tile (the rest at ``128F + 2l``), so one vector load
  of the warp covers a contiguous 512 (256) bytes;
- norms: token ``r`` of a block is at slot ``2·(r % 8) + r // 8``, so the pair of tokens
  ``g, g + 8`` is one 32-bit word.

Only whole-word quarters are tiled (``dim`` a multiple of 128); the layout is internal to the
cache, which converts back to rows (:func:`load`) for anything but that kernel.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from ._arrays import namespace_key

TILE = 16
"""Tokens per tile."""


def supported(dim: int, bits: int) -> bool:
    """Whether codes of ``dim`` coordinates at ``bits`` bits can be tiled."""
    return dim > 0 and dim % 128 == 0 and 1 <= bits <= 8


def _chunk_position(lane: int, slot: int, n_slots: int) -> int:
    """Tile word of a lane's word ``slot`` (of ``n_slots``, even): 16-byte chunks, then an
    8-byte rest."""
    full = n_slots // 4
    if slot < 4 * full:
        return 128 * (slot // 4) + 4 * lane + slot % 4
    return 128 * full + 2 * lane + (slot - 4 * full)


@functools.cache
def order(kind: str, dim: int, bits: int) -> np.ndarray:
    """Positions (bits within the tile) of every bit of every row of a tile: ``out[r, b]``
    is where bit ``b`` of token ``r``'s row (least significant first) goes; ``kind``
    "keys" or "values". A permutation of ``range(16 · dim · bits)``.

    Examples
    --------
    >>> import numpy as np
    >>> from rotorq import tiles
    >>> o = tiles.order("values", 128, 3)
    >>> o.shape, bool(np.array_equal(np.sort(o.ravel()), np.arange(o.size)))
    ((16, 384), True)
    """
    if kind not in ("keys", "values"):
        raise ValueError(f"kind must be 'keys' or 'values', got {kind!r}")
    if not supported(dim, bits):
        raise ValueError(f"codes of dim={dim} at bits={bits} cannot be tiled")
    out = np.full((TILE, dim * bits), -1, np.int64)
    if kind == "keys":
        kw = dim * bits // 128  # words per quarter
        for lane in range(32):
            g, t = divmod(lane, 4)
            for slot in range(2 * kw):
                row = g + 8 * (slot >= kw)
                word = t * kw + slot % kw
                pos = _chunk_position(lane, slot, 2 * kw)
                out[row, 32 * word:32 * word + 32] = 32 * pos + np.arange(32)
    else:
        vw = dim * bits // 128  # words per pair of tokens' eighths
        ncoord = dim // 8
        j = np.arange(ncoord)
        k = np.arange(bits)
        for lane in range(32):
            g, t = divmod(lane, 4)
            for pair in range(2):
                # lane bit 2·bits·j + h·bits + k: code j of token 2t + 8·pair + h, bit k
                for h in range(2):
                    row = 2 * t + 8 * pair + h
                    lane_bit = (32 * vw * pair + 2 * bits * j[:, None] + h * bits
                                + k[None, :]).ravel()
                    slot, w = lane_bit // 32, lane_bit % 32
                    pos = np.array([_chunk_position(lane, int(x), 2 * vw) for x in slot])
                    src = ((g * ncoord + j[:, None]) * bits + k[None, :]).ravel()
                    out[row, src] = 32 * pos + w
    assert (out >= 0).all()
    out.setflags(write=False)
    return out


@functools.cache
def norm_slots() -> np.ndarray:
    """Slot of token ``r`` of a tile in the tiled norms: ``2·(r % 8) + r // 8``."""
    r = np.arange(TILE)
    out = 2 * (r % 8) + r // 8
    out.setflags(write=False)
    return out


@functools.cache
def _norm_slots_inverse() -> np.ndarray:
    """Token of each slot of the tiled norms (the inverse of :func:`norm_slots`)."""
    return np.argsort(norm_slots())


@functools.cache
def _gather(kind, dim, bits):
    """``(unit, to_rows, to_tiles)``: the tile unit (bit, or uint16 where the order moves
    whole aligned uint16, as for keys) at each row-major ``(token, unit)`` place of a tile,
    and its inverse."""
    to_rows = order(kind, dim, bits).ravel()
    unit = 1
    blocks = to_rows.reshape(-1, 16)
    if (blocks[:, 0] % 16 == 0).all() and (blocks - blocks[:, :1] == np.arange(16)).all():
        unit, to_rows = 16, blocks[:, 0] // 16
    to_tiles = np.empty_like(to_rows)
    to_tiles[to_rows] = np.arange(to_rows.size)
    return unit, to_rows, to_tiles


_ON_DEVICE: dict = {}


def _on(xp, a):
    """The constant numpy array ``a`` as an ``xp`` array: uploaded once per device (an
    upload per call would be a host-to-device copy each time)."""
    if xp is np:
        return a
    key = (namespace_key(xp), id(a))
    hit = _ON_DEVICE.get(key)
    if hit is None:
        hit = _ON_DEVICE[key] = (a, xp.asarray(a))  # ``a`` kept alive: its id stays its own
    return hit[1]


@functools.cache
def _bit_sources(kind, dim, bits, inverse):
    """Per output bit of :func:`_permute`: its source byte and the shift of its bit there,
    and the shifts that pack 8 bits into a byte."""
    _, to_rows, to_tiles = _gather(kind, dim, bits)
    index = to_tiles if inverse else to_rows
    return index // 8, (index % 8).astype(np.uint8), np.arange(8, dtype=np.uint8)


def _permute(xp, src, kind, dim, bits, inverse):
    """``src`` (…, n) uint8 with its units (bits or uint16, :func:`_gather`) reordered into
    rows (or into tiles: ``inverse``)."""
    unit, to_rows, to_tiles = _gather(kind, dim, bits)
    if unit == 16:
        halves = xp.ascontiguousarray(src).view(xp.uint16)
        return xp.take(halves, _on(xp, to_tiles if inverse else to_rows), axis=-1).view(xp.uint8)
    byte, shift, pack = (_on(xp, a) for a in _bit_sources(kind, dim, bits, inverse))
    out_bits = (xp.take(src, byte, axis=-1) >> shift) & 1  # bit i of the output (LSB first)
    return (out_bits.reshape(src.shape[:-1] + (-1, 8)) << pack).sum(axis=-1, dtype=xp.uint8)


_CHUNK = 2048
"""Tiles converted at once (bounds the transient bit arrays of values: 8 bytes per stored
byte)."""


def _tiles_in_rows(xp, codes, norms, t0, t1, kind, dim, bits):
    """Tiles ``t0 … t1 − 1`` in token order: uint8 ``(BH, 16·(t1 − t0), row)`` and norms
    ``(BH, 16·(t1 − t0))`` (new arrays)."""
    n_bh, _, row = codes.shape
    tiles_b = codes.reshape(n_bh, -1, TILE * row)
    out = xp.empty((n_bh, t1 - t0, TILE * row), xp.uint8)
    for c in range(t0, t1, _CHUNK):
        e = min(t1, c + _CHUNK)
        out[:, c - t0:e - t0] = _permute(xp, tiles_b[:, c:e], kind, dim, bits, False)
    tn = xp.take(norms.reshape(n_bh, -1, TILE)[:, t0:t1], _on(xp, norm_slots()), axis=2)
    return out.reshape(n_bh, TILE * (t1 - t0), row), tn.reshape(n_bh, -1)


def store(xp, codes, norms, rows, row_norms, first, kind, dim, bits):
    """Write tokens ``first …`` into tiled buffers (the tiles they touch are rewritten
    whole; their other tokens keep their contents).

    Parameters
    ----------
    xp : module
        numpy or cupy.
    codes : uint8 (BH, cap, row_bytes), C-contiguous, ``cap`` a multiple of 16
    norms : float16 (BH, cap), C-contiguous
    rows : uint8 (BH, n, row_bytes)
        Packed codes of the new tokens, row layout.
    row_norms : (BH, n)
    first : int
        Token index of ``rows[:, 0]``.
    kind, dim, bits
        As :func:`order`.

    Examples
    --------
    >>> import numpy as np
    >>> from rotorq import tiles
    >>> rng = np.random.default_rng(0)
    >>> rows = rng.integers(0, 256, (2, 21, 48), dtype=np.uint8)
    >>> nrm = rng.standard_normal((2, 21)).astype(np.float16)
    >>> codes, norms = np.zeros((2, 32, 48), np.uint8), np.zeros((2, 32), np.float16)
    >>> tiles.store(np, codes, norms, rows[:, :5], nrm[:, :5], 0, "values", 128, 3)
    >>> tiles.store(np, codes, norms, rows[:, 5:], nrm[:, 5:], 5, "values", 128, 3)
    >>> back, bn = tiles.load(np, codes, norms, 0, 21, "values", 128, 3)
    >>> bool(np.array_equal(back, rows)), bool(np.array_equal(bn, nrm))
    (True, True)
    """
    n = rows.shape[1]
    if n == 0:
        return
    n_bh = codes.shape[0]
    t0, t1 = first // TILE, -(-(first + n) // TILE)
    lo = first - TILE * t0
    if lo == 0 and n == TILE * (t1 - t0):  # whole tiles: nothing to keep
        cur = rows
        cur_n = row_norms.astype(norms.dtype)
    else:
        cur, cur_n = _tiles_in_rows(xp, codes, norms, t0, t1, kind, dim, bits)
        cur[:, lo:lo + n] = rows
        cur_n[:, lo:lo + n] = row_norms
    cur = cur.reshape(n_bh, t1 - t0, -1)
    dst = codes.reshape(n_bh, -1, cur.shape[2])
    for c in range(0, t1 - t0, _CHUNK):
        e = min(t1 - t0, c + _CHUNK)
        dst[:, t0 + c:t0 + e] = _permute(xp, cur[:, c:e], kind, dim, bits, True)
    norms.reshape(n_bh, -1, TILE)[:, t0:t1] = xp.take(cur_n.reshape(n_bh, t1 - t0, TILE),
                                                      _on(xp, _norm_slots_inverse()), axis=2)


def load(xp, codes, norms, lo, hi, kind, dim, bits):
    """Tokens ``lo … hi − 1`` of tiled buffers in row layout: ``(codes (BH, n, row_bytes)
    uint8, norms (BH, n))`` (new arrays)."""
    n_bh, _, row = codes.shape
    if hi <= lo:
        return xp.empty((n_bh, 0, row), xp.uint8), xp.empty((n_bh, 0), norms.dtype)
    t0, t1 = lo // TILE, -(-hi // TILE)
    rows, tn = _tiles_in_rows(xp, codes, norms, t0, t1, kind, dim, bits)
    a, b = lo - TILE * t0, hi - TILE * t0
    return xp.ascontiguousarray(rows[:, a:b]), xp.ascontiguousarray(tn[:, a:b])


def attention_rows(xp, keys, values, n_keys, key_dim):
    """The ``keys``, ``values`` arguments of ``decode_attention`` (one MSE
    :class:`~rotorq._ops.KeyPart`, one :class:`~rotorq._ops.ValuePart`, codes and norms in
    the tile layout) with their first ``n_keys`` tokens in the row layout."""
    if len(keys) != 1 or len(values) != 1 or keys[0].prod:
        raise ValueError("layout='tiles' takes one MSE key part and one value part")
    k, v = keys[0], values[0]
    kc, kn = load(xp, k.codes, k.norms, 0, n_keys, "keys", key_dim, k.bits)
    vc, vn = load(xp, v.codes, v.norms, 0, n_keys, "values", v.stored_dim, v.bits)
    return ((dataclasses.replace(k, codes=kc, norms=kn),),
            (dataclasses.replace(v, codes=vc, norms=vn),))


__all__ = ["TILE", "attention_rows", "load", "norm_slots", "order", "store", "supported"]
