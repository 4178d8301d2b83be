"""Bridges from rotorq to other libraries, each an optional extra.

- :mod:`rotorq.integrations.transformers`: :class:`~rotorq.integrations.transformers.RotorqCache`,
  a Hugging Face transformers cache whose decode attention runs on the compressed codes
  (``pip install "rotorq[transformers]"``).

Nothing here is imported by ``import rotorq``: torch and transformers are loaded only by
the module that needs them.
"""
