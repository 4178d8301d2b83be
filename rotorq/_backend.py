"""Backend selection and argument intake shared by every public operation.

An operation checks its arguments once here, then calls the backend of the arrays'
device: :mod:`rotorq.cpu` (numpy + Numba ``@njit``) or :mod:`rotorq.cuda` (cupy + Numba
``@cuda.jit``), which expose the same functions. The CUDA side is imported only when a
GPU array arrives.
"""

from __future__ import annotations

import numpy as np
from array_api_compat import is_cupy_array, is_torch_array

from ._arrays import (
    Origin,
    common_origin,
    host_view,
    namespace_key,
    origin_of,
    prepared_mismatch,
    to_framework,
)

_RESULT_DTYPES = ("float16", "float32", "float64")


def get(device: str):
    """The backend module for ``device`` ("cpu" or "cuda")."""
    if device == "cpu":
        from . import cpu

        return cpu
    try:
        from . import cuda
    except ImportError as exc:  # numba-cuda or cupy missing
        raise RuntimeError(
            "GPU arrays need rotorq's CUDA extra: pip install 'rotorq[cuda12]' (or [cuda13]); "
            f"import failed with: {exc}"
        ) from exc
    return cuda


def view(x, origin: Origin, name: str):
    """``x`` as an array of its backend's namespace, without copying where possible."""
    if origin.device == "cpu":
        return host_view(x, name)
    return get("cuda").view(x, name)


def float_array(x, name: str, *, dim: int | None = None, min_ndim: int = 1, origin=None):
    """Validate a floating array argument; returns ``(array, origin, backend)``.

    Checks the dtype (fp16/bf16/fp32/fp64), the rank and the trailing dimension, each with
    an error that names the argument; torch tensors that require grad are refused
    (:func:`rotorq._arrays.origin_of`: rotorq has no autograd).
    """
    origin = origin or origin_of(x, name)
    arr = view(x, origin, name)
    kind = np.dtype(arr.dtype).kind
    if kind != "f":
        raise TypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), "
            f"got {arr.dtype}"
        )
    if arr.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {arr.shape}")
    if dim is not None and arr.shape[-1] != dim:
        raise ValueError(f"{name} must have a last dimension of {dim}, got shape {tuple(arr.shape)}")
    return arr, origin, get(origin.device)


def result_dtype(dtype, name="dtype"):
    """The numpy dtype of a ``dtype=`` argument: float32 for None; float16, float32 or
    float64 given as a numpy dtype, a type, a name or a torch dtype."""
    if dtype is None:
        return np.dtype(np.float32)
    text = str(dtype)
    if text.startswith("torch."):  # torch.float16 -> "float16"
        dtype = text[len("torch."):]
    try:
        out = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name} must be float16, float32 or float64, got {dtype!r}") from None
    if out.name not in _RESULT_DTYPES:
        raise TypeError(f"{name} must be float16, float32 or float64, got {out.name}")
    return out


def check_out(out, shape, origin: Origin, name="out"):
    """Check an ``out=`` argument: a writable float32 array of ``shape`` in the framework
    and on the device a result for inputs of ``origin`` has (numpy on the CPU but for torch
    tensors, cupy on a GPU); ``ValueError`` naming what differs."""
    if origin.framework == "torch":
        ok, kind = is_torch_array(out), "torch Tensor"
    elif origin.device == "cpu":
        ok, kind = isinstance(out, np.ndarray), "ndarray"
    else:
        ok, kind = is_cupy_array(out), "cupy ndarray"
    shape = tuple(shape)
    if (not ok or tuple(out.shape) != shape
            or str(out.dtype).rsplit(".", 1)[-1] != "float32"):
        raise ValueError(f"{name} must be a float32 {kind} of shape {shape}, got "
                         f"{type(out).__name__} {tuple(getattr(out, 'shape', ()))} "
                         f"{getattr(out, 'dtype', '')}")
    got = origin_of(out, name)
    if (got.device, got.device_id) != (origin.device, origin.device_id):
        raise ValueError(f"{name} is on {got.device}:{got.device_id} but the inputs are on "
                         f"{origin.device}:{origin.device_id}; move them to the same device")
    if isinstance(out, np.ndarray) and not out.flags.writeable:
        raise ValueError(f"{name} is read-only")
    return out


def write_out(out, result):
    """Copy ``result`` (of the framework :func:`check_out` checked ``out`` against) into
    ``out``; returns ``out``."""
    if isinstance(out, np.ndarray):
        np.copyto(out, result)
    elif is_torch_array(out):
        out.copy_(result)
    else:
        out[...] = result
    return out


def require_finite(xp, arr, name: str, *more):
    """Raise ``ValueError`` if ``arr`` (or any array of ``more``: ``arr2, name2, …``) holds
    NaN or Inf, naming the first that does; one device synchronization in all."""
    arrays = [(arr, name)] + list(zip(more[::2], more[1::2], strict=True))
    ok = None
    for a, _ in arrays:
        if a.size:
            fin = xp.isfinite(a).all()
            ok = fin if ok is None else ok & fin
    if ok is not None and not bool(ok):
        for a, n in arrays:
            if a.size and not bool(xp.isfinite(a).all()):
                raise ValueError(f"{n} contains NaN or Inf; rotorq refuses non-finite input")


_MAPS: dict = {}


def device_batch_maps(xp, device, q_batch, k_batch):
    """:func:`batch_maps` with the maps as ``xp`` arrays, cached per (device, shapes) so that
    a GPU call does not copy them host-to-device each time."""
    dev = xp.cuda.runtime.getDevice() if hasattr(xp, "cuda") else None
    key = (xp.__name__, str(device), dev, tuple(q_batch), tuple(k_batch))
    hit = _MAPS.get(key)
    if hit is None:
        shape, qmap, kmap = batch_maps(q_batch, k_batch)
        if xp is not np:
            qmap, kmap = xp.asarray(qmap), xp.asarray(kmap)
        if len(_MAPS) > 256:
            _MAPS.clear()
        hit = _MAPS[key] = (shape, qmap, kmap)
    return hit


def batch_maps(q_batch, k_batch, q_name="queries", k_name="codes"):
    """Broadcast two batch shapes; returns ``(shape, qmap, kmap)`` flat index maps (int64)."""
    try:
        shape = np.broadcast_shapes(tuple(q_batch), tuple(k_batch))
    except ValueError:
        raise ValueError(
            f"batch shapes of {q_name} {tuple(q_batch)} and {k_name} {tuple(k_batch)} "
            "do not broadcast"
        ) from None
    qmap = np.broadcast_to(np.arange(int(np.prod(q_batch))).reshape(q_batch), shape).ravel()
    kmap = np.broadcast_to(np.arange(int(np.prod(k_batch))).reshape(k_batch), shape).ravel()
    return shape, qmap.astype(np.int64), kmap.astype(np.int64)


__all__ = [
    "Origin",
    "batch_maps",
    "check_out",
    "common_origin",
    "device_batch_maps",
    "float_array",
    "get",
    "namespace_key",
    "prepared_mismatch",
    "require_finite",
    "result_dtype",
    "to_framework",
    "view",
    "write_out",
]
