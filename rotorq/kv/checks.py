"""The checks of one append, read with one device synchronization before it commits.

A KV cache refuses an append whose keys or values hold NaN or Inf, or whose vector norms
would not fit the float16 norms it stores. On a GPU every read of a device boolean is a
synchronization, so the append collects its checks as device booleans and reads them all
at once (:meth:`Checks.verify`); only a failed check pays for finding which one failed.
"""

from __future__ import annotations

import numpy as np

from .. import _backend

FP16_MAX = float(np.finfo(np.float16).max)
_LIMITS = {"float16": FP16_MAX, "float32": float(np.finfo(np.float32).max)}


class Checks:
    """Validity flags of one append: its input finite, every norm within float16's range.

    Parameters
    ----------
    xp : module
        numpy or cupy.
    enabled : bool
        ``False`` (``check_finite=False``): every method is a no-op and nothing is refused.
    keys, values : arrays
        The append's input (as float32 rows); a failed check first looks for NaN or Inf
        there, so that non-finite input is named as such whichever check caught it.

    Examples
    --------
    >>> import numpy as np
    >>> from rotorq.kv.checks import Checks
    >>> k = np.ones((2, 3, 4), np.float32)
    >>> checks = Checks(np, True, k, k)
    >>> checks.norms(k * 1e5, "keys")
    >>> try:
    ...     checks.verify()
    ... except ValueError as e:
    ...     print(str(e).split(":")[0])
    keys have vector norms up to 2e+05, beyond float16's range (65504)
    """

    def __init__(self, xp, enabled, keys, values):
        self.xp = xp
        self.enabled = bool(enabled)
        self._inputs = (keys, "keys", values, "values")
        self._flags = []  # (device boolean, function raising this check's error)

    def finite(self):
        """Check that the append's keys and values hold no NaN or Inf."""
        if not self.enabled:
            return
        xp = self.xp
        for arr in self._inputs[::2]:
            if arr.size:
                self._flags.append((xp.isfinite(arr).all(), self._raise_non_finite))

    def norms(self, rows, name, what=""):
        """Check that the vector norms of ``rows (..., d)`` (float32) fit float16 (``what``:
        how those rows relate to the input, for the error message)."""
        if not self.enabled or not rows.size:
            return
        xp = self.xp
        sq = xp.einsum("...d,...d->...", rows, rows)  # inf past float32: refused as well
        flag = (sq <= np.float32(FP16_MAX) ** 2).all()
        self._flags.append((flag, lambda: self._raise_norms(name, _norm_max(xp, rows), what)))

    def stored(self, name, rows=None):
        """A list for :meth:`rotorq.TurboQuant.quantize_unchecked` (None when disabled): the
        norms that quantization stores for ``name``, checked by :meth:`verify` (``rows``: the
        quantized rows, for the error message)."""
        if not self.enabled:
            return None
        deferred = []
        xp = self.xp

        def flag():
            ok = None
            for norms, dtype, _ in deferred:
                if norms.size:
                    f = (norms <= _LIMITS[dtype]).all()
                    ok = f if ok is None else ok & f
            return ok

        def explain():
            top = max(float(n.max()) for n, _, _ in deferred if n.size)
            if not np.isfinite(top) and rows is not None:
                top = _norm_max(xp, rows)
            if not np.isfinite(top):  # e.g. a key offset beyond float16: the input's norms
                top = _norm_max(xp, self._inputs[0 if name == "keys" else 2])
            self._raise_norms(name, top, " as stored (after the key offset, channel scales "
                              "and norm correction)" if name == "keys" else " as stored")

        self._flags.append((flag, explain))
        return deferred

    def verify(self):
        """Read every check added since the last call (one synchronization); on failure raise
        ``ValueError``: for NaN or Inf input first, else for the first failing check."""
        if not self._flags:
            return
        flags, self._flags = self._flags, []
        ok = None
        for flag, _ in flags:
            f = flag() if callable(flag) else flag
            if f is not None:
                ok = f if ok is None else ok & f
        if ok is None or bool(ok):
            return
        self._raise_non_finite()
        for flag, explain in flags:
            f = flag() if callable(flag) else flag
            if f is not None and not bool(f):
                explain()
        raise AssertionError("a check failed without an error")  # pragma: no cover

    def _raise_non_finite(self):
        _backend.require_finite(self.xp, *self._inputs)

    @staticmethod
    def _raise_norms(name, top, what):
        raise ValueError(f"{name} have vector norms up to {top:.3g}{what}, beyond float16's "
                         f"range ({FP16_MAX:g}): a KVCache stores float16 norms")


def _norm_max(xp, rows):
    """The largest vector norm of ``rows (..., d)`` in float64 (a host float)."""
    r = rows.astype(xp.float64)
    return float(xp.sqrt(xp.einsum("...d,...d->...", r, r).max()))
