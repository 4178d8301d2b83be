"""``QuantizedVectors``: packed codes and their side information, with true byte counts."""

from __future__ import annotations

import json
import math

import numpy as np

from ._arrays import Origin

FORMAT_VERSION = 1


class QuantizedVectors:
    """Compressed vectors of shape ``(..., dim)``.

    Holds arrays whose leading axes are the vectors' leading axes:

    - ``codes``: uint8 ``(..., nbytes)``, ``bits`` bits per stored coordinate packed as a
      little-endian bit stream (LSB first), so 3-bit codes cross byte boundaries;
    - ``norms``: float16 (or float32) ``(...)`` — the vector norms (or corrected norms);
    - prod mode / QJL: ``qjl_signs`` uint8 ``(..., ceil(m/8))`` and ``qjl_norms`` ``(...)``.

    Indexing and slicing act on the leading axes. Arrays live on the device that
    produced them (numpy on the CPU, cupy on a GPU).

    Examples
    --------
    >>> import numpy as np, rotorq
    >>> tq = rotorq.TurboQuant(128, 3)
    >>> qv = tq.quantize(np.random.default_rng(0).standard_normal((4, 10, 128)))
    >>> qv.shape, qv[1:3].shape, qv.nbytes, qv.bits_per_coordinate
    ((4, 10, 128), (2, 10, 128), 2000, 3.125)
    """

    def __init__(self, parts: dict, config: dict, origin: Origin | None = None):
        self.parts = parts
        self.config = dict(config)
        self.origin = origin or Origin("numpy", "cpu")

    @property
    def dim(self) -> int:
        return int(self.config["dim"])

    @property
    def shape(self) -> tuple:
        return tuple(self.parts["norms"].shape) + (self.dim,)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self):
        if self.ndim < 2:
            raise TypeError("len() of a single quantized vector")
        return self.shape[0]

    @property
    def codes(self):
        return self.parts.get("codes")

    @property
    def norms(self):
        return self.parts["norms"]

    @property
    def qjl_signs(self):
        return self.parts.get("qjl_signs")

    @property
    def qjl_norms(self):
        return self.parts.get("qjl_norms")

    @property
    def device(self) -> str:
        return self.origin.device

    @property
    def nbytes(self) -> int:
        """True storage in bytes: codes, norms and QJL parts."""
        return int(sum(a.nbytes for a in self.parts.values()))

    @property
    def bits_per_coordinate(self) -> float:
        """Stored bits per coordinate of the original vectors (side information included)."""
        count = math.prod(self.shape)
        return 8.0 * self.nbytes / count if count else float("nan")

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        lead = len(self.shape) - 1
        if sum(k is not Ellipsis and k is not None for k in key) > lead:
            raise IndexError(f"too many indices: QuantizedVectors index only the {lead} leading axes")
        parts = {}
        for name, arr in self.parts.items():
            parts[name] = arr[key + (slice(None),)] if arr.ndim > lead else arr[key]
        return QuantizedVectors(parts, self.config, self.origin)

    def __repr__(self):
        return (f"QuantizedVectors(shape={self.shape}, method={self.config.get('method')}, "
                f"bits={self.config.get('bits')}, nbytes={self.nbytes}, device={self.device})")

    def save(self, path):
        """Write to ``path`` (an ``.npz`` file) for :func:`rotorq.load`.

        Examples
        --------
        >>> import os, tempfile, numpy as np, rotorq
        >>> tq = rotorq.TurboQuant(16, 2)
        >>> qv = tq.quantize(np.ones((3, 16)))
        >>> path = os.path.join(tempfile.mkdtemp(), "codes.npz")
        >>> qv.save(path)
        >>> bool((rotorq.load(path).codes == qv.codes).all())
        True
        """
        host = {name: _to_host(a) for name, a in self.parts.items()}
        meta = json.dumps({"format": FORMAT_VERSION, "config": self.config})
        with open(path, "wb") as f:
            np.savez(f, __meta__=np.array(meta), **host)


def _to_host(a):
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)


def load(path) -> QuantizedVectors:
    """Read :class:`QuantizedVectors` written by :meth:`QuantizedVectors.save` (host arrays).

    Examples
    --------
    >>> import os, tempfile, numpy as np, rotorq
    >>> qv = rotorq.TurboQuant(8, 4).quantize(np.arange(1.0, 9.0))
    >>> path = os.path.join(tempfile.mkdtemp(), "v.npz"); qv.save(path)
    >>> rotorq.load(path).shape
    (8,)
    """
    with np.load(path, allow_pickle=False) as f:
        meta = json.loads(str(f["__meta__"]))
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported rotorq format {meta.get('format')!r}")
        parts = {name: f[name] for name in f.files if name != "__meta__"}
    return QuantizedVectors(parts, meta["config"])
