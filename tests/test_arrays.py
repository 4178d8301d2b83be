"""Arrays in, arrays out: numpy, torch (CPU) and DLPack objects; no framework imported."""

import subprocess
import sys

import numpy as np
import pytest

import rotorq


def test_import_never_loads_gpu_frameworks():
    code = ("import sys, rotorq, numpy as np; "
            "rotorq.TurboQuant(16, 3).quantize(np.ones((2, 16))); "
            "bad = [m for m in ('torch', 'cupy', 'numba.cuda') if m in sys.modules]; "
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


class _DLPackOnly:
    """An array known only through the DLPack protocol."""

    def __init__(self, arr):
        self._arr = arr

    def __dlpack__(self, **kwargs):
        return self._arr.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._arr.__dlpack_device__()


def test_dlpack_object_is_accepted(rng):
    x = rng.standard_normal((6, 32)).astype(np.float32)
    tq = rotorq.TurboQuant(32, 3)
    np.testing.assert_array_equal(tq.quantize(_DLPackOnly(x)).codes, tq.quantize(x).codes)


def test_torch_in_torch_out_zero_copy(rng):
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(rng.standard_normal((3, 5, 64)).astype(np.float32))
    tq = rotorq.TurboQuant(64, 4, mode="prod")
    qv = tq.quantize(x)
    np.testing.assert_array_equal(qv.codes, tq.quantize(x.numpy()).codes)
    out = tq.dequantize(qv)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (3, 5, 64)
    s = tq.scores(x[:, :2], qv)
    assert isinstance(s, torch.Tensor) and s.shape == (3, 2, 5)
    np.testing.assert_allclose(s.numpy(), tq.scores(x[:, :2].numpy(), qv), rtol=1e-6)
    y = rotorq.wht(x)
    assert isinstance(y, torch.Tensor)
    # The view is shared, not copied.
    from rotorq._arrays import host_view
    assert np.shares_memory(host_view(x), x.numpy())


def test_torch_dtypes_and_grad(rng):
    torch = pytest.importorskip("torch")
    base = torch.from_numpy(rng.standard_normal((8, 64)).astype(np.float32))
    tq = rotorq.TurboQuant(64, 3)
    ref = tq.quantize(base.to(torch.bfloat16).float())
    bf = tq.quantize(base.to(torch.bfloat16))
    np.testing.assert_array_equal(bf.codes, ref.codes)
    half = tq.quantize(base.half())
    assert np.mean(half.codes != tq.quantize(base.half().float()).codes) == 0
    with pytest.raises(TypeError, match=r"x requires grad, but rotorq has no autograd.*x.detach\(\)"):
        tq.quantize(base.clone().requires_grad_(True))
    with pytest.raises(TypeError, match="floating"):
        tq.quantize(base.to(torch.int32))


def test_non_contiguous_input(rng):
    x = rng.standard_normal((64, 40))
    tq = rotorq.TurboQuant(32, 3)
    view = x[::2, 4:36]
    np.testing.assert_array_equal(tq.quantize(view).codes, tq.quantize(view.copy()).codes)
    fortran = np.asfortranarray(x[:, :32])
    np.testing.assert_array_equal(tq.quantize(fortran).codes, tq.quantize(x[:, :32].copy()).codes)
