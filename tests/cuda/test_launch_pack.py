"""The launch layer's parameter packing (:mod:`rotorq.cuda._launch`), without a GPU: cupy
arrays over host memory (never touched by a kernel) are packed as Numba's kernel ABI lays
them out, and a :class:`~rotorq.cuda._launch.View` packs exactly as the cupy view it stands for.
A :class:`~rotorq.cuda._launch.Prepared` launch writes the new pointers into exactly the data
words of its patched arguments (the driver is replaced by a fake that reads the buffer).
Skipped where cupy is not installed."""

import ctypes
import os
import struct
import types

import numpy as np
import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("packs for the real driver, not the simulator", allow_module_level=True)
cp = pytest.importorskip("cupy")
pytest.importorskip("numba.cuda")
launch = pytest.importorskip("rotorq.cuda._launch")

_BUF = np.zeros(1 << 16, np.uint8)


def host_array(shape, dtype, offset=0):
    """A cupy array whose pointer is host memory: fine for packing, never for a kernel."""
    mem = cp.cuda.UnownedMemory(_BUF.ctypes.data, _BUF.nbytes, _BUF, device_id=0)
    return cp.ndarray(shape, dtype, memptr=cp.cuda.MemoryPointer(mem, offset))


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


def fake_kernel(*args):
    """Stands for a ``@cuda.jit`` kernel: never compiled, its function is seeded."""


FAKE_FN = 0xF00D


class FakeDriver:
    """Records each launch with the parameter words the driver would copy."""

    def __init__(self):
        self.launches = []

    def launchKernel(self, fn, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        tags = (ctypes.c_int64 * 5).from_address(extra)
        assert (tags[0], tags[2], tags[4]) == (1, 2, 0)  # BUFFER_POINTER, BUFFER_SIZE, END
        size = ctypes.c_int64.from_address(tags[3]).value
        buf = list((ctypes.c_int64 * (size // 8)).from_address(tags[1]))
        self.launches.append((fn, (gx, gy, gz), (bx, by, bz), shared, stream, params, buf))


@pytest.fixture
def fake_driver(monkeypatch):
    drv = FakeDriver()
    monkeypatch.setattr(launch, "driver", types.SimpleNamespace(launchKernel=drv.launchKernel))
    return drv


def prepared(monkeypatch, args, patch, **kw):
    key = (fake_kernel, 0, launch._pack(args)[0])
    monkeypatch.setitem(launch._functions, key, (None, FAKE_FN))
    return launch.Prepared(fake_kernel, (5, 2, 1), (128, 1), 640, args, patch, device_id=0, **kw)


def scores_like_args(q_off=0, v_off=4096, out_off=8192):
    q = host_array((1, 3, 128), cp.float32, q_off)
    codes = host_array((2, 1024, 48), cp.uint8, 16384)
    view = launch.View(host_array((2, 10), cp.float32, v_off), np.dtype(np.float32), (20,))
    out = host_array((1, 3, 1024), cp.float32, out_off)
    return (q, host_array(2, cp.int64, 12288), codes.view(cp.uint32), view, 3, 0.25, out)


def test_prepared_patches_only_the_data_words(monkeypatch, fake_driver):
    args = scores_like_args()
    p = prepared(monkeypatch, args, (0, 6, 3))
    for q_off, out_off, v_off in ((256, 12544, 4096 + 512), (1024, 24576, 20000)):
        new = scores_like_args(q_off, v_off, out_off)
        p(77, new[0].data.ptr, new[6].data.ptr, new[3].base.data.ptr)
        fn, grid, block, shared, stream, params, buf = fake_driver.launches[-1]
        assert buf == words(new)  # the rest as packed at preparation
        assert (fn, grid, block, shared, stream, params) == (FAKE_FN, (5, 2, 1), (128, 1, 1),
                                                               640, 77, 0)
    assert words(args) != words(new)
    assert p.words == (4, 11 + 7 + 11 + 7 + 1 + 1 + 4, 11 + 7 + 11 + 4)
    assert p.args == (None,) + args[1:3] + (None, 3, 0.25, None)  # the fixed ones kept alive


def test_prepared_without_patches_relaunches_as_packed(monkeypatch, fake_driver):
    args = scores_like_args()
    p = prepared(monkeypatch, args, ())
    p(0)
    p(0)
    assert [lc[-1] for lc in fake_driver.launches] == [words(args)] * 2


def test_prepared_refuses_scalars_and_a_wrong_pointer_count(monkeypatch, fake_driver):
    args = scores_like_args()
    with pytest.raises(TypeError, match="argument 4 of fake_kernel is not an array"):
        prepared(monkeypatch, args, (0, 4))
    p = prepared(monkeypatch, args, (0, 6))
    with pytest.raises(ValueError):
        p(0, args[0].data.ptr)


def test_prepared_is_recorded_as_a_copy(monkeypatch, fake_driver):
    args = scores_like_args()
    p = prepared(monkeypatch, args, (0,))
    monkeypatch.setattr(launch, "RECORDER", [])
    first = scores_like_args(q_off=512)[0].data.ptr
    p(5, first)
    p(5, scores_like_args(q_off=768)[0].data.ptr)
    (fn, grid, block, shared, stream, mem, extra), _ = launch.RECORDER
    assert (fn, grid, block, shared, stream) == (FAKE_FN, (5, 2, 1), (128, 1), 640, 5)
    tags = (ctypes.c_int64 * 5).from_address(extra)
    assert tags[1] == mem.buffer_info()[0] and tags[3] == tags[1] + 8 * (len(mem) - 6)
    assert list(mem)[:-6][4] == first  # not the later call's pointer
    assert list(mem)[:-6][5:] == words(args)[5:]


def test_capture_records_instead_of_launching(fake_driver):
    args = scores_like_args()
    with launch.capture() as launches:
        launch.launch(fake_kernel, (1, 1, 1), (32, 1), 0, args)
        with pytest.raises(RuntimeError, match="do not nest"), launch.capture():
            pass
    assert launches == [(fake_kernel, (1, 1, 1), (32, 1), 0, args)]
    assert fake_driver.launches == []
    assert not launch._CAPTURES


def test_bind_patches_the_call_arrays_by_pointer(monkeypatch, fake_driver):
    api = pytest.importorskip("rotorq.cuda.api")
    args = scores_like_args()
    q, view, out = args[0], args[3], args[6]
    key = (fake_kernel, 0, launch._pack(args)[0])
    monkeypatch.setitem(launch._functions, key, (None, FAKE_FN))
    spec = (fake_kernel, (5, 2, 1), (128, 1), 640, args)
    (p, which), = api._bind([spec], (out, q, view.base), 0)
    assert which == (1, 2, 0) and p.words == (4, 33, 42)
    new = scores_like_args(512, 20000, 24576)
    api._run([(p, which)], 3, (new[6].data.ptr, new[0].data.ptr, new[3].base.data.ptr))
    assert fake_driver.launches[-1][-1] == words(new)
    other = host_array((1, 3, 128), cp.float32, 30000)  # an array the kernel never sees
    with pytest.raises(RuntimeError, match="does not reach its kernels in place"):
        api._bind([spec], (q, other), 0)
    assert api._bind([], (q, other), 0) == []
