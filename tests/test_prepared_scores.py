"""``TurboQuant.prepare_scores`` on the CPU: the prepared call returns exactly what
``scores`` returns, and refuses queries unlike the example it was prepared with."""

import numpy as np
import pytest

import rotorq
from helpers import cupy_with_gpu


def _case(mode, rotation, bits=3, dim=40, q_shape=(2, 3), k_shape=(2, 70), seed=0):
    rng = np.random.default_rng(seed)
    tq = rotorq.TurboQuant(dim, bits, mode=mode, rotation=rotation, seed=seed)
    codes = tq.quantize(rng.standard_normal(k_shape + (dim,)).astype(np.float32))
    return tq, codes, rng


@pytest.mark.parametrize("mode,bits", [("mse", 2), ("mse", 4), ("prod", 3)])
@pytest.mark.parametrize("rotation", ["hadamard", "dense", "rotor"])
def test_equals_scores_on_fresh_queries(mode, bits, rotation):
    tq, codes, rng = _case(mode, rotation, bits)
    example = np.zeros((2, 3, 40), np.float32)
    prepared = tq.prepare_scores(example, codes)
    for _ in range(3):
        q = rng.standard_normal((2, 3, 40)).astype(np.float32)
        np.testing.assert_array_equal(prepared(q), tq.scores(q, codes))


@pytest.mark.parametrize("q_shape,k_shape", [((5,), (70,)), ((1, 5), (3, 70)), ((4, 2, 5), (2, 70))])
def test_broadcast_batches_and_out(q_shape, k_shape):
    tq, codes, rng = _case("mse", "hadamard", k_shape=k_shape)
    q = rng.standard_normal(q_shape + (40,))
    prepared = tq.prepare_scores(q, codes)
    expected = tq.scores(q, codes)
    out = np.full(expected.shape, np.nan, np.float32)
    assert prepared(q, out=out) is out
    np.testing.assert_array_equal(out, expected)
    assert prepared.out_shape == expected.shape


def test_float16_and_torch_queries():
    torch = pytest.importorskip("torch")
    tq, codes, rng = _case("prod", "hadamard")
    q16 = rng.standard_normal((2, 3, 40)).astype(np.float16)
    np.testing.assert_array_equal(tq.prepare_scores(q16, codes)(q16), tq.scores(q16, codes))
    tqs = torch.from_numpy(rng.standard_normal((2, 3, 40)).astype(np.float32))
    prepared = tq.prepare_scores(tqs, codes)
    got = prepared(tqs)
    assert isinstance(got, torch.Tensor)
    np.testing.assert_array_equal(got.numpy(), tq.scores(tqs, codes).numpy())
    out = torch.empty(got.shape, dtype=torch.float32)
    assert prepared(tqs, out=out) is out
    np.testing.assert_array_equal(out.numpy(), got.numpy())


def test_empty_queries_and_keys():
    tq, codes, rng = _case("mse", "hadamard", k_shape=(0,))
    q = rng.standard_normal((3, 40))
    assert tq.prepare_scores(q, codes)(q).shape == (3, 0)
    tq, codes, _ = _case("mse", "hadamard", k_shape=(70,))
    q = np.zeros((0, 40))
    assert tq.prepare_scores(q, codes)(q).shape == (0, 70)


def test_refuses_queries_unlike_the_example():
    tq, codes, rng = _case("mse", "hadamard")
    q = rng.standard_normal((2, 3, 40)).astype(np.float32)
    prepared = tq.prepare_scores(q, codes)
    with pytest.raises(ValueError, match=r"prepared shape \(2, 3, 40\)"):
        prepared(q[:, :2])
    with pytest.raises(ValueError, match="prepared shape"):
        prepared(np.zeros((0, 3, 40), np.float32))
    with pytest.raises(TypeError, match="prepared dtype float32"):
        prepared(q.astype(np.float64))
    with pytest.raises(TypeError, match="must be an array"):
        prepared(q.tolist())
    with pytest.raises(ValueError, match="out must be a float32"):
        prepared(q, out=np.empty((2, 3, 70), np.float64))
    with pytest.raises(ValueError, match="out must be a float32"):
        prepared(q, out=np.empty((2, 3, 69), np.float32))


def test_refuses_other_frameworks():
    torch = pytest.importorskip("torch")
    tq, codes, rng = _case("mse", "hadamard")
    q = rng.standard_normal((2, 3, 40)).astype(np.float32)
    prepared = tq.prepare_scores(q, codes)
    with pytest.raises(TypeError, match="prepared for numpy arrays"):
        prepared(torch.from_numpy(q))
    with pytest.raises(ValueError, match="out must be a float32 ndarray"):
        prepared(q, out=torch.empty((2, 3, 70)))


def test_nan_queries_raise_as_scores():
    tq, codes, rng = _case("prod", "hadamard")
    q = rng.standard_normal((2, 3, 40)).astype(np.float32)
    prepared = tq.prepare_scores(q, codes)
    q[1, 2, 5] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        prepared(q)


def test_prepare_checks_as_scores():
    tq, codes, rng = _case("mse", "hadamard")
    q = rng.standard_normal((2, 3, 40))
    with pytest.raises(ValueError, match="last dimension of 40"):
        tq.prepare_scores(np.zeros((3, 41)), codes)
    with pytest.raises(TypeError, match="floating dtype"):
        tq.prepare_scores(np.zeros((3, 40), np.int32), codes)
    with pytest.raises(ValueError, match="do not broadcast"):
        tq.prepare_scores(np.zeros((3, 3, 40)), codes)
    with pytest.raises(ValueError, match="different quantizer"):
        tq.prepare_scores(q, rotorq.TurboQuant(40, 2).quantize(np.ones((4, 40))))
    with pytest.raises(TypeError, match="must be an array"):
        tq.prepare_scores(q.tolist(), codes)
    assert "PreparedScores" in repr(tq.prepare_scores(q, codes))


def test_device_mix_is_refused_at_preparation():
    cp = cupy_with_gpu()
    tq, codes, _ = _case("mse", "hadamard")
    with pytest.raises(ValueError, match="move them to the same device"):
        tq.prepare_scores(cp.zeros((3, 40), cp.float32), codes)


def test_device_mix_is_refused_per_call():
    cp = pytest.importorskip("cupy")
    buf = np.zeros((2, 3, 40), np.float32)
    try:  # a cupy array over host memory: only its attributes are read
        mem = cp.cuda.UnownedMemory(buf.ctypes.data, buf.nbytes, buf, device_id=0)
        gpu_q = cp.ndarray(buf.shape, cp.float32, memptr=cp.cuda.MemoryPointer(mem, 0))
    except Exception as exc:  # cupy without a usable CUDA runtime
        pytest.skip(f"cupy cannot make a host-memory array here: {exc}")
    tq, codes, _ = _case("mse", "hadamard")
    prepared = tq.prepare_scores(buf, codes)
    with pytest.raises(ValueError, match="are on cuda:0 but the call was prepared for cpu"):
        prepared(gpu_q)
