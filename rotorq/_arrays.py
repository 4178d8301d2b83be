"""Array intake and output: any array in, the caller's framework out.

Frameworks are recognised with array-api-compat's ``is_*_array`` helpers, which look at
the type and never import torch or cupy. Host memory is viewed as numpy without a copy
(``np.from_dlpack``); GPU memory is handed to :mod:`rotorq.cuda`, imported only then.

rotorq has no autograd: no gradient flows through quantization, scores or attention, so
torch tensors that require grad are refused here, where every array comes in (pass
``x.detach()``), rather than detached silently.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
from array_api_compat import is_cupy_array, is_numpy_array, is_torch_array

# DLPack device types (dlpack.h): kDLCPU = 1, kDLCUDA = 2, kDLCUDAHost = 3, kDLCUDAManaged = 13.
_DL_CPU, _DL_CUDA, _DL_CUDA_HOST, _DL_CUDA_MANAGED = 1, 2, 3, 13


@dataclass(frozen=True)
class Origin:
    """Where an input came from: its framework and device, so outputs can go back there."""

    framework: str  # "numpy", "torch", "cupy" or "dlpack"
    device: str  # "cpu" or "cuda"
    device_id: int = 0

    @property
    def backend(self) -> str:
        return self.device


def origin_of(x, name="x") -> Origin:
    """Identify the framework and device of ``x`` without importing any framework."""
    if is_numpy_array(x) or isinstance(x, np.generic):
        return Origin("numpy", "cpu")
    if is_torch_array(x):
        if x.requires_grad:
            raise TypeError(f"{name} requires grad, but rotorq has no autograd (no gradient "
                            f"flows through its kernels); pass {name}.detach()")
        if x.device.type == "cpu":
            return Origin("torch", "cpu")
        if x.device.type == "cuda":
            return Origin("torch", "cuda", x.device.index or 0)
        raise TypeError(f"{name}: torch device {x.device} is not supported (cpu or cuda only)")
    if is_cupy_array(x):
        return Origin("cupy", "cuda", x.device.id)
    if hasattr(x, "__dlpack_device__"):
        kind, dev = x.__dlpack_device__()
        kind = int(kind)
        if kind in (_DL_CPU, _DL_CUDA_HOST):
            return Origin("dlpack", "cpu")
        if kind in (_DL_CUDA, _DL_CUDA_MANAGED):
            return Origin("dlpack", "cuda", int(dev))
        raise TypeError(f"{name}: DLPack device type {kind} is not supported (CPU or CUDA only)")
    if hasattr(x, "__cuda_array_interface__"):
        return Origin("dlpack", "cuda")
    if isinstance(x, (list, tuple, int, float)):
        return Origin("numpy", "cpu")
    raise TypeError(
        f"{name} must be a numpy array, torch tensor, cupy array or an object with __dlpack__, "
        f"got {type(x).__name__}"
    )


def _is_bfloat16(x) -> bool:
    return "bfloat16" in str(getattr(x, "dtype", ""))


def widen_bfloat16(bits16: np.ndarray) -> np.ndarray:
    """float32 values of raw bfloat16 bit patterns (uint16/int16 view)."""
    return (bits16.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def host_view(x, name="x") -> np.ndarray:
    """A numpy view of host memory ``x`` (no copy where the memory allows).

    bfloat16 torch tensors are widened to float32 (numpy has no bfloat16).
    """
    if is_numpy_array(x):
        return x
    if is_torch_array(x):
        if _is_bfloat16(x):
            torch = sys.modules["torch"]
            return widen_bfloat16(np.from_dlpack(x.contiguous().view(torch.int16)))
        return np.from_dlpack(x)
    if hasattr(x, "__dlpack__"):
        try:
            return np.from_dlpack(x)
        except (TypeError, BufferError, RuntimeError) as exc:
            raise TypeError(f"{name}: cannot view this array as numpy via DLPack: {exc}") from exc
    return np.asarray(x)


def to_framework(arr, origin: Origin):
    """Return ``arr`` (numpy, or a device array of the CUDA backend) in ``origin``'s framework."""
    if origin.framework == "torch":
        return sys.modules["torch"].from_dlpack(arr)
    return arr


def common_origin(pairs) -> Origin:
    """The shared origin of several named arrays; a clear error when devices are mixed."""
    origins = [(name, origin_of(a, name)) for name, a in pairs]
    first_name, first = origins[0]
    for name, o in origins[1:]:
        if (o.device, o.device_id) != (first.device, first.device_id):
            raise ValueError(
                f"{name} is on {o.device}:{o.device_id} but {first_name} is on "
                f"{first.device}:{first.device_id}; move them to the same device"
            )
    return first


def prepared_mismatch(x, name: str, origin: Origin, shape, dtype, contiguous: bool):
    """Raise the error that says how ``x`` differs from the arrays a prepared call takes:
    ``origin``'s device and framework, ``shape``, ``dtype`` and, with ``contiguous``,
    C-contiguity. The slow path behind a prepared call's cheap per-call checks."""
    got = origin_of(x, name)
    if (got.device, got.device_id) != (origin.device, origin.device_id):
        raise ValueError(f"{name} are on {got.device}:{got.device_id} but the call was prepared "
                         f"for {origin.device}:{origin.device_id}; move them to the same device")
    if got.framework != origin.framework:
        raise TypeError(f"{name}: the call was prepared for {origin.framework} arrays, "
                        f"got {type(x).__name__}")
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have the prepared shape {tuple(shape)}, "
                         f"got {tuple(x.shape)}")
    if x.dtype != dtype:
        raise TypeError(f"{name} must have the prepared dtype {dtype}, got {x.dtype}")
    if contiguous:
        is_c = x.is_contiguous() if hasattr(x, "is_contiguous") else x.flags.c_contiguous
        if not is_c:
            raise ValueError(f"{name} must be C-contiguous: a prepared call on the GPU reads "
                             "the data in place")
    raise ValueError(f"{name} does not match the prepared call")


def namespace_key(xp):
    """Cache key of per-device constants: the namespace, plus the current device for cupy
    (each GPU needs its own copy of a rotation's or codebook's arrays)."""
    if hasattr(xp, "cuda") and hasattr(xp.cuda, "runtime"):
        return (xp.__name__, xp.cuda.runtime.getDevice())
    return (xp.__name__, None)
