"""Bit packing: ``bits``-bit codes and 1-bit signs, little-endian bit streams, LSB first.

Coordinate ``j`` of a vector occupies bits ``[j*bits, (j+1)*bits)`` of that vector's
byte row, so 3-bit codes cross byte boundaries; each row is padded to whole bytes.
"""

import numpy as np

from ._jit import ROWS_PER_TASK, jit, jit_parallel, prange


@jit
def pack_row(idx, bits, out):
    """Pack the codes ``idx`` (uint8) of one vector into the byte row ``out``."""
    acc = np.uint64(0)
    nacc = 0
    o = 0
    for j in range(idx.shape[0]):
        acc |= np.uint64(idx[j]) << np.uint64(nacc)
        nacc += bits
        while nacc >= 8:
            out[o] = np.uint8(acc & np.uint64(255))
            acc >>= np.uint64(8)
            nacc -= 8
            o += 1
    if nacc > 0:
        out[o] = np.uint8(acc & np.uint64(255))


@jit
def unpack_row(row, bits, count, idx):
    """Unpack ``count`` codes of ``bits`` bits from the byte row ``row`` into ``idx``."""
    mask = np.uint64((1 << bits) - 1)
    acc = np.uint64(0)
    nacc = 0
    i = 0
    for j in range(count):
        while nacc < bits:
            acc |= np.uint64(row[i]) << np.uint64(nacc)
            nacc += 8
            i += 1
        idx[j] = np.uint8(acc & mask)
        acc >>= np.uint64(bits)
        nacc -= bits


@jit_parallel
def unpack_codes(codes, bits, count, out):
    """Unpack every row of ``codes`` (n, nbytes) into ``out`` (n, count) uint8."""
    n = codes.shape[0]
    for t in prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        for r in range(t * ROWS_PER_TASK, min(n, (t + 1) * ROWS_PER_TASK)):
            unpack_row(codes[r], bits, count, out[r])


@jit_parallel
def pack_codes(idx, bits, out):
    """Pack every row of ``idx`` (n, count) uint8 into ``out`` (n, nbytes)."""
    n = idx.shape[0]
    for t in prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        for r in range(t * ROWS_PER_TASK, min(n, (t + 1) * ROWS_PER_TASK)):
            pack_row(idx[r], bits, out[r])
