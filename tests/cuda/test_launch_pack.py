"""The launch layer's parameter packing (:mod:`rotorq.cuda._launch`), without a GPU: cupy
arrays over host memory (never touched by a kernel) are packed as Numba's kernel ABI lays
them out, and a :class:`~rotorq.cuda._launch.View` packs exactly as the cupy view it stands for.
Skipped where cupy is not installed."""

import os
import struct

import numpy as np
import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("packs for the real driver, not the simulator", allow_module_level=True)
cp = pytest.importorskip("cupy")
pytest.importorskip("numba.cuda")
launch = pytest.importorskip("rotorq.cuda._launch")

_BUF = np.zeros(1 << 16, np.uint8)


def host_array(shape, dtype):
    """A cupy array whose pointer is host memory: fine for packing, never for a kernel."""
    mem = cp.cuda.UnownedMemory(_BUF.ctypes.data, _BUF.nbytes, _BUF, device_id=0)
    return cp.ndarray(shape, dtype, memptr=cp.cuda.MemoryPointer(mem, 0))


def words(args):
    """The packed parameter words (without the driver's trailing ``extra`` list)."""
    _, mem, _ = launch._pack(args)
    return list(mem)[:-6]


def test_array_layout_is_numbas_abi():
    a = host_array((3, 5, 8), cp.float32)
    w = words((a,))
    assert w == [0, 0, 120, 4, a.data.ptr, 3, 5, 8, 160, 32, 4]


@pytest.mark.parametrize("shape,dtype,as_dtype,view_shape", [
    ((4, 96, 48), cp.uint8, np.uint32, (4, 96 * 12)),
    ((4, 96, 48), cp.uint8, np.uint32, (4, 96, 12)),
    ((1024, 128), cp.float16, np.uint32, (1024 * 64,)),
    ((2, 40, 8), cp.float32, np.float32, (2, 320)),
    ((6, 10), cp.uint16, np.uint16, (6, 2, 5)),
])
def test_view_packs_as_the_cupy_view(shape, dtype, as_dtype, view_shape):
    a = host_array(shape, dtype)
    v = launch.View(a, np.dtype(as_dtype), view_shape)
    real = a.view(as_dtype).reshape(view_shape)
    assert words((v,)) == words((real,))
    assert launch._pack((v,))[0] == launch._pack((real,))[0]  # same compiled function
    assert v.array().shape == real.shape and v.array().dtype == real.dtype


def test_view_rejects_a_shape_that_does_not_cover_the_bytes():
    a = host_array((4, 48), cp.uint8)
    with pytest.raises(ValueError, match="does not cover"):
        launch.View(a, np.dtype(np.uint32), (4, 11))
    with pytest.raises(ValueError, match="C-contiguous"):
        launch.View(host_array((4, 48), cp.uint8)[:, :40], np.dtype(np.uint32), (4, 10))


def test_scalars_pack_as_int64_and_float64():
    as_int = struct.Struct("<q").unpack
    bits = as_int(struct.pack("<d", 0.1))[0]
    w = words((3, True, 0.1, np.float64(0.1), np.float32(0.5), np.int32(-7)))
    assert w == [3, 1, bits, bits, as_int(struct.pack("<d", 0.5))[0], -7]
    keys = launch._pack((3, 0.1, np.float32(0.5)))[0]
    assert keys == (False, True, True)
