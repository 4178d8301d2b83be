"""Moved to :mod:`rotorq.kv`; this module keeps ``from rotorq.kvcache import KVCache``
working."""

from .kv import KVCache

__all__ = ["KVCache"]
