"""The KV cache: keys and values stored at 2–4 bits, attention computed on the codes.

- :mod:`rotorq.kv.cache`: :class:`KVCache`, the façade (arguments, lock, commit);
- :mod:`rotorq.kv.store`: the cache's state and how an append builds the next one;
- :mod:`rotorq.kv.tiers`, :mod:`rotorq.kv.codes`, :mod:`rotorq.kv.window`: the tiers
  (pending, sinks; the base tier's codes; the recent window in its two modes);
- :mod:`rotorq.kv.keys`: the key preparation (offset, channel scales, outlier channels);
- :mod:`rotorq.kv.checks`: the checks of one append, read with one synchronization;
- :mod:`rotorq.kv.attention`, :mod:`rotorq.kv.exact`: scores and attention on a state;
- :mod:`rotorq.kv.prep`: the transforms on their own (fitting them on calibration data,
  bit allocation, storage accounting).
"""

from .cache import KVCache

__all__ = ["KVCache"]
