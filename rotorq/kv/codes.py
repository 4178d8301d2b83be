"""Packed codes of one stream (keys or values) of a cache tier, grown without rewriting.

A stream's channels are split into parts (the normal channels, and optionally the outlier
channels), each with its own :class:`rotorq.TurboQuant`. :class:`Codes` holds the parts'
growth buffers — per token and sequence·KV head a row of packed codes and a float16 norm
(prod mode: QJL signs and their norm too) — and the live range ``start … start + count``.

A :class:`Codes` is a value: :meth:`Codes.extended` and :meth:`Codes.dropped` return new
ones and never change the tokens the old one holds. New tokens are written past the live
range of a shared buffer, or into new buffers; tokens leaving the front only move
``start``. An append that fails after writing therefore leaves the codes the cache still
holds untouched (its rows past the live range are unused; the tile layout's attention
kernel masks them).
"""

from __future__ import annotations

import dataclasses

from .. import tiles
from .._ops import KeyPart, ValuePart
from ..turboquant import TurboQuant

_NORM_BYTES = 2  # float16 norms


@dataclasses.dataclass(frozen=True)
class Part:
    """One channel subset of one stream: its quantizer, its first channel in the permuted
    channel order (:class:`rotorq.kv.keys.KeyFrame`) and the stream, "keys" or "values"."""

    tq: TurboQuant
    offset: int
    kind: str

    @property
    def dim(self) -> int:
        """Channels of this part."""
        return self.tq.dim

    def row_bytes(self) -> int:
        """Stored bytes of one token of one sequence·KV head."""
        tq = self.tq
        n = (tq.stored_dim * tq.mse_bits + 7) // 8 + _NORM_BYTES
        if tq.mode == "prod":
            n += (tq.qjl_dim + 7) // 8 + _NORM_BYTES
        return n


class Codes:
    """The packed codes of one stream in one tier (a value: methods return new ones).

    Invariants: every part's buffers have the same capacity; tokens ``start … start +
    count`` of them are the live tokens, in order; ``layout`` "tiles" (base tier on a GPU):
    ``start`` is 0, the capacity a multiple of 16, codes and norms in the tile layout of
    :mod:`rotorq.tiles`, and slots never written hold zeros.

    Parameters
    ----------
    parts : tuple of Part
    layout : {"rows", "tiles"}
    buffers : tuple of dict, optional
        Per part, its arrays by name ("codes", "norms", in prod mode "qjl_signs",
        "qjl_norms"), each (BH, capacity, …).
    start, count : int
    """

    __slots__ = ("buffers", "count", "layout", "parts", "start")

    def __init__(self, parts, layout="rows", buffers=None, start=0, count=0):
        self.parts = tuple(parts)
        self.layout = layout
        self.buffers = buffers
        self.start = start
        self.count = count

    def _with(self, **changes):
        fields = {name: getattr(self, name) for name in self.__slots__} | changes
        return Codes(**fields)

    def with_layout(self, layout):
        """These (empty) codes, to be held in ``layout``."""
        assert self.count == 0
        return self._with(layout=layout)

    @property
    def row_bytes(self) -> int:
        """Stored bytes of one token of one sequence·KV head, all parts."""
        return sum(p.row_bytes() for p in self.parts)

    # -- building -----------------------------------------------------------------------
    def quantize(self, xp, block, perm, checks, name):
        """Quantize tokens ``block`` (BH, n, d) float32 (channel order; ``perm`` (BH, d) or
        None: the permuted order the parts split) without storing them; returns what
        :meth:`extended` takes. The stored norms are checked by ``checks`` (its next
        :meth:`~rotorq.kv.checks.Checks.verify`)."""
        n_bh, n_tok, _ = block.shape
        out = []
        for part in self.parts:
            if perm is None:
                rows = xp.ascontiguousarray(block, dtype=xp.float32)
            else:  # this part's channels of each head, gathered head by head (fast takes)
                cols = perm[:, part.offset:part.offset + part.dim]
                rows = xp.empty((n_bh, n_tok, part.dim), xp.float32)
                for b in range(n_bh):
                    xp.take(block[b], cols[b], axis=1, out=rows[b])
            rows = rows.reshape(n_bh * n_tok, part.dim)
            qv = part.tq.quantize_unchecked(rows, checks.stored(name, rows))
            out.append({key: arr.reshape((n_bh, n_tok) + tuple(arr.shape[1:]))
                        for key, arr in qv.parts.items()})
        return out

    def extended(self, xp, new):
        """These codes followed by ``new`` (from :meth:`quantize`)."""
        n_tok = next(iter(new[0].values())).shape[1]
        if n_tok == 0:
            return self
        tiled = self.layout == "tiles"
        end, need = self.start + self.count, self.count + n_tok
        buffers = []
        start = self.start
        for i, (part, arrays) in enumerate(zip(self.parts, new, strict=True)):
            old = None if self.buffers is None else self.buffers[i]
            bufs = {}
            for name, arr in arrays.items():
                buf = None if old is None else old[name]
                if buf is None or buf.shape[1] < end + n_tok:
                    buf = self._regrown(xp, buf, arr, need, tiled)
                    start = 0
                bufs[name] = buf
            buffers.append(bufs)
            at = start + self.count
            if tiled:
                tiles.store(xp, bufs["codes"], bufs["norms"], arrays["codes"], arrays["norms"],
                            at, part.kind, part.tq.stored_dim, part.tq.mse_bits)
            else:
                for name, arr in arrays.items():
                    bufs[name][:, at:at + n_tok] = arr
        return self._with(buffers=tuple(buffers), start=start, count=need)

    def _regrown(self, xp, buf, like, need, tiled):
        """A new buffer for ``need`` live tokens holding this one's live tokens at its front."""
        if buf is None:
            cap = max(need, 256)
        else:
            cap = buf.shape[1]
            cap = cap if 2 * need <= cap else max(need, 2 * cap)
        shape = (like.shape[0], cap) + tuple(like.shape[2:])
        if tiled:  # whole tiles; slots past the tokens hold finite zeros
            cap = -(-cap // tiles.TILE) * tiles.TILE
            new = xp.zeros((like.shape[0], cap) + tuple(like.shape[2:]), like.dtype)
            if buf is not None:
                keep = -(-self.count // tiles.TILE) * tiles.TILE
                new[:, :keep] = buf[:, :keep]
            return new
        new = xp.empty(shape, like.dtype)
        if buf is not None and self.count:
            new[:, :self.count] = buf[:, self.start:self.start + self.count]
        return new

    def dropped(self, xp, n, limit):
        """These codes without their first ``n`` tokens (row layout only); buffers holding
        more than ``limit`` tokens are given back (after a large prefill)."""
        assert self.layout == "rows" and 0 <= n <= self.count
        if n == 0:
            return self
        out = self._with(start=self.start + n, count=self.count - n)
        if self.buffers is None or self.buffers[0]["codes"].shape[1] <= limit:
            return out
        cap, lo, n = max(out.count, limit // 2), out.start, out.count
        buffers = []
        for bufs in self.buffers:
            smaller = {}
            for name, buf in bufs.items():
                new = smaller[name] = xp.empty((buf.shape[0], cap) + buf.shape[2:], buf.dtype)
                new[:, :n] = buf[:, lo:lo + n]
            buffers.append(smaller)
        return out._with(buffers=tuple(buffers), start=0)

    # -- reading ------------------------------------------------------------------------
    def rows(self, xp, i, lo, hi):
        """``(codes, norms)`` of part ``i``'s live tokens ``lo … hi`` in token order:
        (BH, n, row bytes), (BH, n) (views in the row layout, new arrays for tiles)."""
        bufs, part = self.buffers[i], self.parts[i]
        if self.layout == "tiles":
            return tiles.load(xp, bufs["codes"], bufs["norms"], lo, hi, part.kind,
                              part.tq.stored_dim, part.tq.mse_bits)
        a = self.start
        return bufs["codes"][:, a + lo:a + hi], bufs["norms"][:, a + lo:a + hi]

    def array(self, i, name, lo, hi):
        """Part ``i``'s array ``name`` of live tokens ``lo … hi`` (row layout)."""
        a = self.start
        return self.buffers[i][name][:, a + lo:a + hi]

    def decode(self, xp, be, inv, lo, hi):
        """Dequantized float32 tokens ``lo … hi`` (BH, n, d) in channel order (``inv``: the
        inverse channel permutation, or None); MSE parts."""
        pieces = []
        for i, part in enumerate(self.parts):
            codes, norms = self.rows(xp, i, lo, hi)
            n_bh, n = codes.shape[0], codes.shape[1]
            tq = part.tq
            out = be.dequantize(xp.ascontiguousarray(codes.reshape(n_bh * n, -1)),
                                norms.reshape(-1).astype(xp.float32), tq.rotation,
                                tq.device_constants(xp)["centroids"], tq.mse_bits)
            pieces.append(out.reshape(n_bh, n, part.dim))
        out = pieces[0] if len(pieces) == 1 else xp.concatenate(pieces, axis=2)
        if inv is not None:
            out = xp.take_along_axis(out, inv[:, None, :], axis=2)
        return out

    def kernel_keys(self, xp):
        """The keys argument of the backend's ``decode_attention``: a
        :class:`~rotorq._ops.KeyPart` per part, whole buffers (start 0)."""
        assert self.start == 0
        out = []
        for part, buf in zip(self.parts, self.buffers, strict=True):
            tq = part.tq
            centroids = tq.device_constants(xp)["centroids"]
            if tq.mode == "prod":
                out.append(KeyPart(buf["codes"], buf["norms"], centroids, tq.mse_bits,
                                   buf["qjl_signs"], buf["qjl_norms"], tq.qjl_scale))
            else:
                out.append(KeyPart(buf["codes"], buf["norms"], centroids, tq.mse_bits))
        return tuple(out)

    def kernel_values(self, xp):
        """The values argument of ``decode_attention``: a :class:`~rotorq._ops.ValuePart`
        per part, whole buffers (start 0)."""
        assert self.start == 0
        return tuple(ValuePart(buf["codes"], buf["norms"], p.tq.device_constants(xp)["centroids"],
                               p.tq.mse_bits, p.tq.stored_dim)
                     for p, buf in zip(self.parts, self.buffers, strict=True))


class Compressed:
    """The base tier: keys (prepared, permuted) and values as codes at the base bits, two
    :class:`Codes` of equal ``count`` starting at token 0 (``start`` stays 0)."""

    __slots__ = ("keys", "values")

    def __init__(self, keys: Codes, values: Codes):
        self.keys, self.values = keys, values

    @property
    def count(self) -> int:
        """Tokens in the base tier."""
        return self.keys.count

    @property
    def layout(self) -> str:
        """"rows" or "tiles" (:mod:`rotorq.tiles`)."""
        return self.values.layout

    @property
    def row_bytes(self) -> int:
        """Stored bytes of one token of one sequence·KV head."""
        return self.keys.row_bytes + self.values.row_bytes

    def with_layout(self, layout):
        """This (empty) tier, to be held in ``layout``."""
        return Compressed(self.keys.with_layout(layout), self.values.with_layout(layout))

    def extended(self, xp, frame, keys, values, checks):
        """This tier followed by tokens with prepared keys ``keys`` and values ``values``
        (BH, n, d) float32; their norms are checked (one synchronization, with every check
        ``checks`` holds) before anything is written."""
        new_k = self.keys.quantize(xp, keys, frame.kperm, checks, "keys")
        new_v = self.values.quantize(xp, values, frame.vperm, checks, "values")
        checks.verify()
        return Compressed(self.keys.extended(xp, new_k), self.values.extended(xp, new_v))
