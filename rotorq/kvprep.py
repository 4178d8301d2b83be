"""Moved to :mod:`rotorq.kv.prep` (the transforms that make keys easier to quantize); this
module keeps the old import path working."""

from .kv.prep import KeyPrep, allocate_bits, channel_scales, kv_bits_per_coordinate, rope, unrope

__all__ = ["KeyPrep", "allocate_bits", "channel_scales", "kv_bits_per_coordinate", "rope",
           "unrope"]
