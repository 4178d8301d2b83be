"""Source expressions shared by the generators: packed-code fields, bank-conflict models and
the simulator's MMA scratch.

A code field is ``bits`` consecutive bits of packed codes (LSB first) held in generated local
variables ``{word}0, {word}1, …``; its bit offset is a constant of the generated source, so
every shift and mask is a constant too.
"""


def code_field(word, p, bits, mask):
    """Expression (uint32 numpy operators) of the ``bits``-bit field at bit ``p`` of the words
    ``{word}0, {word}1, …``, masked with ``mask``."""
    w, s = p >> 5, p & 31
    if s + bits <= 32:
        return f"((({word}{w} >> U32({s})) & U32({mask})))"
    return (f"((({word}{w} >> U32({s})) | ({word}{w + 1} << U32({32 - s}))) & U32({mask}))")


def field32(word, p, bits, shift=0):
    """Expression (32-bit intrinsics of :mod:`.intrinsics`) of the ``bits``-bit field at bit
    ``p`` of the uint32 words ``{word}0, {word}1, …``, shifted left by ``shift``. A field across
    two words whose offset is at least ``shift`` is one funnel shift (``shf.r``)."""
    w, s = p // 32, p % 32
    mask = ((1 << bits) - 1) << shift
    if s + bits <= 32:
        if s == shift:
            return f"and32({word}{w}, U32({mask}))"
        if s > shift:
            return f"and32(shr32({word}{w}, U32({s - shift})), U32({mask}))"
        return f"and32(shl32({word}{w}, U32({shift - s})), U32({mask}))"
    if s >= shift:
        return f"and32(fshr32({word}{w}, {word}{w + 1}, U32({s - shift})), U32({mask}))"
    both = f"or32(shr32({word}{w}, U32({s})), shl32({word}{w + 1}, U32({32 - s})))"
    if shift:
        both = f"shl32({both}, U32({shift}))"
    return f"and32({both}, U32({mask}))"


def mma_scratch(warps):
    """Generated lines: the block-shared scratch of the simulator's emulated MMA
    (:func:`.intrinsics.mma_sim`) for ``warps`` warps."""
    return [f"    sa = cuda.shared.array({warps * 128}, numba.uint32)",
            f"    sb = cuda.shared.array({warps * 64}, numba.uint32)"]


def wavefronts(addrs):
    """Shared-memory wavefronts of one warp access to the 4-byte words ``addrs`` (one per
    lane): the most distinct words any one of the 32 banks is asked for."""
    banks: dict = {}
    for a in addrs:
        banks.setdefault(a % 32, set()).add(a)
    return max(len(v) for v in banks.values())
