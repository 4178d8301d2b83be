"""Bit packing on the GPU, the twin of :mod:`rotorq.cpu.bits` (same LSB-first bit streams).

Each packed byte (and each unpacked code) is computed independently, so lanes split a row
without carrying a bit accumulator: byte ``o`` gathers the codes overlapping bits
``[8o, 8o+8)``; code ``j`` reads the one or two bytes holding bits ``[j·bits, (j+1)·bits)``.
"""

import numpy as np

from ._jit import device, kernel
from ._threads import row_thread


@device
def pack_byte(idx, bits, o):
    """Byte ``o`` of the packed stream of the codes ``idx`` (``bits`` ≤ 8 each)."""
    lo = 8 * o
    end = min(idx.shape[0], (lo + 7 + bits) // bits)
    acc = 0
    for j in range(lo // bits, end):
        s = j * bits - lo
        v = np.int64(idx[j])
        if s >= 0:
            acc |= v << s
        else:
            acc |= v >> -s
    return np.uint8(acc & 255)


@device
def unpack_value(row, bits, j):
    """Code ``j`` of the packed byte row ``row``."""
    p = j * bits
    b = p >> 3
    s = p & 7
    v = np.int64(row[b])
    if s + bits > 8:
        v |= np.int64(row[b + 1]) << 8
    return (v >> s) & ((1 << bits) - 1)


@device
def pack_row(idx, bits, out, lane, lanes):
    """Pack the codes ``idx`` of one vector into the byte row ``out``; lanes split the bytes."""
    for o in range(lane, out.shape[0], lanes):
        out[o] = pack_byte(idx, bits, o)


@device
def unpack_row(row, bits, count, idx, lane, lanes):
    """Unpack ``count`` codes of the byte row ``row`` into ``idx``; lanes split the codes."""
    for j in range(lane, count, lanes):
        idx[j] = unpack_value(row, bits, j)


@kernel
def unpack_codes(codes, bits, count, out):
    """Unpack every row of ``codes`` (n, nbytes) into ``out`` (n, count) uint8. Row kernel."""
    lane, lanes, r, rr, active = row_thread(codes.shape[0])
    if active:
        unpack_row(codes[r], bits, count, out[r], lane, lanes)


@kernel
def pack_codes(idx, bits, out):
    """Pack every row of ``idx`` (n, count) uint8 into ``out`` (n, nbytes). Row kernel."""
    lane, lanes, r, rr, active = row_thread(idx.shape[0])
    if active:
        pack_row(idx[r], bits, out[r], lane, lanes)
