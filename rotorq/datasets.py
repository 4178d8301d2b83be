"""Small real data shipped with rotorq, for demos and quick checks."""

from __future__ import annotations

from importlib import resources

import numpy as np


def smollm2_kv_sample():
    """Real attention tensors of SmolLM2-135M-Instruct (Apache-2.0).

    Post-RoPE queries and keys and the values of layers 1 and 15 over the first 256
    tokens of the GPL-3 text, float16, rotate-half channel order. Keys carry fixed
    outlier channels (up to ~9× the median channel RMS), as real keys do.

    Returns
    -------
    dict
        ``q`` (2, 9, 256, 64), ``k`` and ``v`` (2, 3, 256, 64), ``layers`` (2,).

    Examples
    --------
    >>> from rotorq.datasets import smollm2_kv_sample
    >>> smollm2_kv_sample()["k"].shape
    (2, 3, 256, 64)
    """
    with resources.files("rotorq.data").joinpath("smollm2_kv_sample.npz").open("rb") as f:
        with np.load(f, allow_pickle=False) as data:
            return {name: data[name] for name in ("q", "k", "v", "layers")}
