"""Bit packing on the GPU, the twin of :mod:`rotorq.cpu.bits` (same LSB-first bit streams).

Lanes split a row without carrying state across lanes: packing works on chunks of 8 codes,
which fill exactly ``bits`` whole bytes; unpacking reads code ``j`` from the one or two bytes
holding bits ``[j·bits, (j+1)·bits)``. Score kernels stream a row with :func:`read_code`,
one word (uint8 or uint32) at a time.

Loops over a lane's share are ``while`` loops: ``range`` with a runtime step costs a 64-bit
division per loop on the GPU.
"""

import numpy as np

from ._jit import device, kernel
from ._threads import row_thread


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
def read_code(row, wbits, bits, w, buf, nbuf):
    """The next ``bits``-bit code of the packed stream ``row`` of ``wbits``-bit words.

    ``(w, buf, nbuf)`` is the reader state (next word, bit buffer, bits in it), starting at
    ``(0, 0, 0)``; returns ``(code, w, buf, nbuf)``.
    """
    if nbuf < bits:
        buf |= np.int64(row[w]) << nbuf
        nbuf += wbits
        w += 1
    return buf & ((1 << bits) - 1), w, buf >> bits, nbuf - bits


@device
def pack_row(idx, bits, out, lane, lanes):
    """Pack the codes ``idx`` of one vector into the byte row ``out``; lanes split chunks of
    8 codes (``bits`` bytes each)."""
    count = idx.shape[0]
    c = lane
    while 8 * c < count:
        acc = 0
        for i in range(8):
            if 8 * c + i < count:
                acc |= np.int64(idx[8 * c + i]) << (i * bits)
        for k in range(8):
            if k < bits and c * bits + k < out.shape[0]:
                out[c * bits + k] = np.uint8((acc >> (8 * k)) & 255)
        c += lanes


@device
def unpack_row(row, bits, count, idx, lane, lanes):
    """Unpack ``count`` codes of the byte row ``row`` into ``idx``; lanes split the codes."""
    j = lane
    while j < count:
        idx[j] = unpack_value(row, bits, j)
        j += lanes


@kernel
def unpack_codes(codes, bits, count, out):
    """Unpack every row of ``codes`` (n, nbytes) into ``out`` (n, count) uint8. Row kernel."""
    lane, lanes, r, _, active = row_thread(codes.shape[0])
    if active:
        unpack_row(codes[r], bits, count, out[r], lane, lanes)


@kernel
def pack_codes(idx, bits, out):
    """Pack every row of ``idx`` (n, count) uint8 into ``out`` (n, nbytes). Row kernel."""
    lane, lanes, r, _, active = row_thread(idx.shape[0])
    if active:
        pack_row(idx[r], bits, out[r], lane, lanes)
