"""``QuantizedVectors``: packed codes and their side information, with true byte counts."""

from __future__ import annotations

import json
import math
import zipfile
import zlib

import numpy as np
from array_api_compat import is_cupy_array

from ._arrays import Origin

FORMAT_VERSION = 1
_META = "__meta__"
_MAX_META_BYTES = 1 << 20


QUANTIZERS: dict = {}
"""Quantizer classes by their ``method`` name; each registers itself
(:func:`register_quantizer`), so that this module needs no import of them."""


def register_quantizer(cls):
    """Class decorator: make ``cls`` (a quantizer with a ``method`` name, ``_canonical_config``
    and ``_parts_layout``) the one that reads codes whose config names its method."""
    QUANTIZERS[cls.method] = cls
    return cls


def quantizer_class(config):
    """The quantizer class (:class:`rotorq.TurboQuant` or :class:`rotorq.QJL`) that
    ``config["method"]`` names."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    method = config.get("method")
    if not isinstance(method, str) or method not in QUANTIZERS:
        raise ValueError(f"config names no rotorq method (one of {sorted(QUANTIZERS)}): "
                         f"method {method!r}")
    return QUANTIZERS[method]


def _checked_config(config):
    """``(config, layout)``: ``config`` exactly as its quantizer reports it (rebuilt through
    the quantizer's own argument checks; a config that differs in any key, or lacks one, is
    refused) and the arrays its codes hold."""
    cls = quantizer_class(config)
    canonical = cls._canonical_config(config)
    if canonical != config:
        diff = {k: (config.get(k, "<missing>"), v) for k, v in canonical.items()
                if k not in config or config[k] != v}
        raise ValueError(f"config is not a {cls.__name__} config as it reports it "
                         f"(given vs expected): {diff}")
    return canonical, cls._parts_layout(canonical)


class QuantizedVectors:
    """Compressed vectors of shape ``(..., dim)``.

    Holds arrays whose leading axes are the vectors' leading axes:

    - ``codes``: uint8 ``(..., nbytes)``, ``bits`` bits per stored coordinate packed as a
      little-endian bit stream (LSB first), so 3-bit codes cross byte boundaries;
    - ``norms``: float16 (or float32) ``(...)`` — the vector norms (or corrected norms);
    - prod mode / QJL: ``qjl_signs`` uint8 ``(..., ceil(m/8))`` and ``qjl_norms`` ``(...)``.

    Indexing and slicing act on the leading axes. Arrays live on the device that
    produced them (numpy on the CPU, cupy on a GPU).

    Quantizers make these; the constructor is for codes from elsewhere and checks them as
    untrusted input, since the kernels index by them.

    Parameters
    ----------
    parts : dict
        Exactly the arrays ``config`` implies (above), numpy arrays for the CPU or cupy
        arrays on the origin's GPU: uint8 codes and signs whose rows have the byte length the
        config implies, norms of the config's ``norm_dtype``, finite and non-negative, and
        one leading shape for all.
    config : dict
        The :attr:`rotorq.TurboQuant.config` (or :attr:`rotorq.QJL.config`) of the quantizer
        that made the codes, exactly as it reports it: the quantizer's own argument checks
        rebuild it, and a config that differs (or lacks a key) is refused.
    origin : Origin, optional
        Framework and device of the inputs the codes came from (default: numpy on the CPU).

    Raises
    ------
    TypeError, ValueError
        Naming the first array or config key that does not fit. On a GPU the norm check
        costs one device synchronization.

    Examples
    --------
    >>> import numpy as np, rotorq
    >>> tq = rotorq.TurboQuant(128, 3)
    >>> qv = tq.quantize(np.random.default_rng(0).standard_normal((4, 10, 128)))
    >>> qv.shape, qv[1:3].shape, qv.nbytes, qv.bits_per_coordinate
    ((4, 10, 128), (2, 10, 128), 2000, 3.125)
    """

    def __init__(self, parts: dict, config: dict, origin: Origin | None = None):
        if origin is None:
            origin = Origin("numpy", "cpu")
        if not isinstance(origin, Origin):
            raise TypeError(f"origin must be a rotorq Origin, got {type(origin).__name__}")
        if not isinstance(parts, dict):
            raise TypeError(f"parts must be a dict of arrays, got {type(parts).__name__}")
        config, layout = _checked_config(config)
        parts = {name: np.asarray(a) if isinstance(a, np.generic) else a
                 for name, a in parts.items()}
        _check_parts(parts, layout, origin)
        _check_norm_values(parts, layout)
        self.parts, self.config, self.origin = parts, config, origin

    @classmethod
    def _trusted(cls, parts, config, origin):
        """Codes a quantizer or an operation on checked codes just made: no checks."""
        self = object.__new__(cls)
        self.parts, self.config, self.origin = parts, config, origin
        return self

    def _check_layout(self, layout, name="codes"):
        """Raise ``ValueError``/``TypeError`` unless the arrays are those of ``layout`` (the
        quantizer's ``_parts_layout``) with consistent shapes, on the device of the origin.
        Metadata only (no pass over the data): quantizers call it before every kernel."""
        _check_parts(self.parts, layout, self.origin, name)

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
            part = arr[key + (slice(None),)] if arr.ndim > lead else arr[key]
            parts[name] = np.asarray(part) if isinstance(part, np.generic) else part
        return QuantizedVectors._trusted(parts, self.config, self.origin)

    def __array_function__(self, func, types, args, kwargs):
        """numpy's protocol: ``np.concatenate`` of QuantizedVectors is :func:`concatenate`,
        ``np.shape`` and ``np.ndim`` give :attr:`shape` and :attr:`ndim`; every other numpy
        function raises ``TypeError`` (codes are not an array of numbers)."""
        if func is np.concatenate:
            return _np_concatenate(*args, **kwargs)
        if func is np.shape:
            return self.shape
        if func is np.ndim:
            return self.ndim
        raise TypeError(f"numpy.{func.__name__} does not apply to QuantizedVectors (packed "
                        "codes, not numbers): index them, join them with rotorq.concatenate, "
                        "or decode them with the quantizer's dequantize")

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


def concatenate(codes, axis=0) -> QuantizedVectors:
    """Join :class:`QuantizedVectors` of one quantizer along a leading axis.

    ``np.concatenate`` of QuantizedVectors calls this function.

    Parameters
    ----------
    codes : sequence of QuantizedVectors
        Made by quantizers of equal :attr:`~rotorq.TurboQuant.config`, on one device, of
        equal shapes but along ``axis``.
    axis : int
        A leading axis: ``0 <= axis < ndim - 1``, or negative from ``-ndim`` to ``-2`` (the
        last axis holds the vectors and cannot be joined).

    Returns
    -------
    QuantizedVectors
        Their arrays joined (numpy or cupy ``concatenate``); the result's framework (of
        :meth:`~rotorq.TurboQuant.dequantize`'s output) is the first one's.

    Raises
    ------
    TypeError
        For anything but a non-empty sequence of QuantizedVectors.
    ValueError
        For other configs, devices, ranks or shapes, or the vector axis.

    Examples
    --------
    >>> import numpy as np, rotorq
    >>> tq = rotorq.TurboQuant(64, 3)
    >>> rng = np.random.default_rng(0)
    >>> a, b = tq.quantize(rng.standard_normal((2, 5, 64))), tq.quantize(rng.standard_normal((2, 3, 64)))
    >>> rotorq.concatenate([a, b], axis=1).shape
    (2, 8, 64)
    >>> np.concatenate([a, a]).shape
    (4, 5, 64)
    """
    if isinstance(codes, QuantizedVectors) or not hasattr(codes, "__iter__"):
        raise TypeError(f"codes must be a sequence of QuantizedVectors, got {type(codes).__name__}")
    items = list(codes)
    if not items:
        raise ValueError("need at least one QuantizedVectors to concatenate")
    for i, item in enumerate(items):
        if not isinstance(item, QuantizedVectors):
            raise TypeError(f"codes[{i}] must be QuantizedVectors, got {type(item).__name__}")
    first = items[0]
    layout = quantizer_class(first.config)._parts_layout(first.config)
    for i, item in enumerate(items):
        if item.config != first.config:
            diff = {k: (item.config.get(k), v) for k, v in first.config.items()
                    if item.config.get(k) != v}
            raise ValueError(f"codes[{i}] were made by a different quantizer than codes[0] "
                             f"(codes[{i}] vs codes[0]): {diff}")
        o, f = item.origin, first.origin
        if (o.device, o.device_id) != (f.device, f.device_id):
            raise ValueError(f"codes[{i}] are on {o.device}:{o.device_id} but codes[0] on "
                             f"{f.device}:{f.device_id}; move them to the same device")
        item._check_layout(layout, f"codes[{i}]")
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"axis must be an int, got {type(axis).__name__}")
    ndim = first.ndim
    ax = int(axis) + ndim if axis < 0 else int(axis)
    if ndim < 2 or not 0 <= ax < ndim - 1:
        raise ValueError(f"axis {axis} is not a leading axis of QuantizedVectors of shape "
                         f"{first.shape} (the last axis holds the vectors)")
    for i, item in enumerate(items):
        if item.ndim != ndim or item.shape[:ax] + item.shape[ax + 1:] != (
                first.shape[:ax] + first.shape[ax + 1:]):
            raise ValueError(f"codes[{i}] of shape {item.shape} cannot be joined with codes[0] "
                             f"of shape {first.shape} along axis {axis}")
    xp = np
    if first.device == "cuda":
        from . import _backend
        xp = _backend.get("cuda").xp
    parts = {name: xp.concatenate([item.parts[name] for item in items], axis=ax)
             for name in layout}
    return QuantizedVectors._trusted(parts, first.config, first.origin)


def _np_concatenate(arrays, axis=0, out=None, *, dtype=None, casting=None):
    if out is not None or dtype is not None or casting is not None:
        raise TypeError("np.concatenate of QuantizedVectors takes no out, dtype or casting")
    if axis is None:
        raise ValueError("np.concatenate of QuantizedVectors needs a leading axis, not None")
    return concatenate(arrays, axis)


def _check_names(names, layout, name):
    missing = sorted(set(layout) - set(names))
    extra = sorted(str(k) for k in set(names) - set(layout))
    if missing or extra:
        raise ValueError(f"{name} must hold exactly the arrays {sorted(layout)} for this config; "
                         + (f"missing {missing}" if missing else "")
                         + ("; " if missing and extra else "")
                         + (f"unexpected {extra}" if extra else ""))


def _check_parts(parts, layout, origin, name="codes"):
    """The structural checks of :class:`QuantizedVectors` (see its constructor)."""
    _check_names(parts, layout, name)
    lead = None
    for part, (dtype, row) in layout.items():
        a = parts[part]
        on_gpu = is_cupy_array(a)
        if origin.device == "cpu" and not isinstance(a, np.ndarray):
            raise TypeError(f"{name}: {part} must be a numpy array (the codes live on the CPU), "
                            f"got {type(a).__name__}")
        if origin.device == "cuda" and not on_gpu:
            raise TypeError(f"{name}: {part} must be a cupy array (the codes live on a GPU), "
                            f"got {type(a).__name__}")
        if a.dtype != np.dtype(dtype):
            raise TypeError(f"{name}: {part} must be {dtype} for this config, got {a.dtype}")
        shape = tuple(a.shape)
        if row is not None:
            if not shape or shape[-1] != row:
                raise ValueError(f"{name}: {part} must have rows of {row} bytes for this config "
                                 f"(the last axis), got shape {shape}")
            shape = shape[:-1]
        if lead is None:
            lead = shape
        elif shape != lead:
            raise ValueError(f"{name}: the arrays' leading shapes differ: {part} has {shape}, "
                             f"{next(iter(layout))} has {lead}")


def _check_norm_values(parts, layout, name="codes"):
    """Norms must be finite and non-negative (one pass; on a GPU, one synchronization)."""
    for part, (dtype, row) in layout.items():
        a = parts[part]
        if row is None and a.size:
            top = float(np.finfo(np.dtype(dtype)).max)
            if not bool(((a >= 0) & (a <= top)).all()):
                raise ValueError(f"{name}: {part} must be finite and non-negative")


def _read_npy(zf, info, path, expect=None, max_bytes=None):
    """Read one ``.npy`` member of an archive, checking its header first: the dtype (and
    the shape, through ``expect(shape, dtype)``) before any data is read, and that the data
    fits the member."""
    from numpy.lib import format as npf

    with zf.open(info) as f:
        version = npf.read_magic(f)
        if version not in ((1, 0), (2, 0), (3, 0)):
            raise ValueError(f"unsupported .npy version {version}")
        reader = npf.read_array_header_1_0 if version == (1, 0) else npf.read_array_header_2_0
        shape, fortran, dtype = reader(f)
        if dtype.hasobject:
            raise ValueError("object arrays (pickles) are refused")
        if expect is not None:
            expect(shape, dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        if max_bytes is not None and nbytes > max_bytes:
            raise ValueError(f"{nbytes} bytes, more than {max_bytes}")
        if nbytes > info.file_size - f.tell():
            raise ValueError(f"truncated: its header declares {nbytes} bytes of data, the "
                             f"archive holds {info.file_size - f.tell()}")
        data = f.read(nbytes)
        if len(data) != nbytes or f.read(1):
            raise ValueError("the data does not match its header's size")
    return np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C").copy()


def load(path) -> QuantizedVectors:
    """Read :class:`QuantizedVectors` written by :meth:`QuantizedVectors.save` (host arrays).

    The file is untrusted input: it must be an ``.npz`` archive of exactly the arrays its
    config implies, each checked as the :class:`QuantizedVectors` constructor checks them
    (dtypes, row lengths, leading shapes, finite non-negative norms), and the headers are
    checked before any array data is read. Pickled objects are refused.

    Raises
    ------
    ValueError
        For anything but such a file (``TypeError`` for a wrong array type), naming what is
        wrong; ``OSError`` as ``open`` raises it.

    Examples
    --------
    >>> import os, tempfile, numpy as np, rotorq
    >>> qv = rotorq.TurboQuant(8, 4).quantize(np.arange(1.0, 9.0))
    >>> path = os.path.join(tempfile.mkdtemp(), "v.npz"); qv.save(path)
    >>> rotorq.load(path).shape
    (8,)
    """
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError, ValueError) as exc:
        raise ValueError(f"{path}: not a rotorq file (not an .npz archive: {exc})") from None
    with zf:
        members = {}
        for info in zf.infolist():
            if not info.filename.endswith(".npy") or info.filename[:-4] in members:
                raise ValueError(f"{path}: not a rotorq file (unexpected member "
                                 f"{info.filename!r})")
            members[info.filename[:-4]] = info
        if _META not in members:
            raise ValueError(f"{path}: not a rotorq file (no {_META})")

        def expect_meta(shape, dtype):
            if shape != () or dtype.kind != "U":
                raise ValueError(f"{_META} must be a string, got {dtype} {shape}")

        try:
            raw = _read_npy(zf, members.pop(_META), path, expect_meta, _MAX_META_BYTES)
            meta = json.loads(str(raw))
        except (ValueError, zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError,
                RuntimeError) as exc:
            raise ValueError(f"{path}: unreadable {_META}: {exc}") from None
        if not isinstance(meta, dict) or set(meta) != {"format", "config"}:
            raise ValueError(f"{path}: {_META} must hold exactly 'format' and 'config', got "
                             f"{meta if not isinstance(meta, dict) else sorted(meta)}")
        if meta["format"] != FORMAT_VERSION or isinstance(meta["format"], bool):
            raise ValueError(f"{path}: unsupported rotorq format {meta['format']!r}")
        try:
            config, layout = _checked_config(meta["config"])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from None
        _check_names(members, layout, f"{path}: the file")
        parts, lead = {}, []

        for name, (dtype, row) in layout.items():
            def expect(shape, got, name=name, dtype=dtype, row=row):
                if got != np.dtype(dtype):
                    raise TypeError(f"must be {dtype} for this config, got {got}")
                if row is not None:
                    if not shape or shape[-1] != row:
                        raise ValueError(f"must have rows of {row} bytes for this config, got "
                                         f"shape {shape}")
                    shape = shape[:-1]
                if lead and shape != lead[0]:
                    raise ValueError(f"leading shape {shape} differs from the others' {lead[0]}")
                lead[:] = [shape]

            try:
                parts[name] = _read_npy(zf, members[name], path, expect)
            except TypeError as exc:
                raise TypeError(f"{path}: {name} {exc}") from None
            except (ValueError, zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError,
                    RuntimeError) as exc:
                raise ValueError(f"{path}: {name} {exc}") from None
    try:
        return QuantizedVectors(parts, config)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
