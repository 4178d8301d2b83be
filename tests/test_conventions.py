"""numpy conventions (issue 22, item 5): 1-D queries, ``out=``, concatenation of codes,
``dequantize(dtype=)``, and torch tensors that require grad (rotorq has no autograd)."""

import numpy as np
import pytest

import rotorq
from rotorq._arrays import Origin

QUANTIZERS = [
    ("mse", "hadamard"), ("mse", "dense"), ("mse", "rotor"), ("prod", "hadamard"), ("prod", "rotor"),
]


def _tq(rng, mode="mse", rotation="hadamard", dim=48, bits=3):
    return rotorq.TurboQuant(dim, bits, mode=mode, rotation=rotation,
                             seed=int(rng.integers(1 << 30)))


# -- 1-D queries ----------------------------------------------------------------------------

@pytest.mark.parametrize("mode,rotation", QUANTIZERS)
def test_one_query_drops_its_axis(rng, mode, rotation):
    tq = _tq(rng, mode, rotation)
    q = rng.standard_normal(48)
    for lead in ((), (3,), (2, 3)):
        codes = tq.quantize(rng.standard_normal(lead + (11, 48)))
        got = tq.scores(q, codes)
        assert got.shape == lead + (11,)
        np.testing.assert_array_equal(got, tq.scores(q[None], codes)[..., 0, :])
        np.testing.assert_array_equal(tq.prepare_scores(q, codes)(q), got)
    qjl = rotorq.QJL(48, 80, seed=int(rng.integers(1 << 30)))
    codes = qjl.quantize(rng.standard_normal((3, 11, 48)))
    np.testing.assert_array_equal(qjl.scores(q, codes), qjl.scores(q[None], codes)[:, 0])


def test_one_query_matches_matmul_of_the_decoded_keys(rng):
    # Scores are inner products with the dequantized keys (MSE mode), so numpy's matmul of
    # a 1-D query with them is the reference, axis for axis.
    tq = _tq(rng, bits=4)
    codes = tq.quantize(rng.standard_normal((2, 9, 48)))
    q = rng.standard_normal(48)
    expected = tq.dequantize(codes).astype(np.float64) @ q
    np.testing.assert_allclose(tq.scores(q, codes), expected, rtol=2e-5, atol=2e-5 * np.abs(expected).max())


def test_one_query_torch(rng):
    torch = pytest.importorskip("torch")
    tq = _tq(rng)
    codes = tq.quantize(rng.standard_normal((2, 9, 48)))
    q = rng.standard_normal(48).astype(np.float32)
    got = tq.scores(torch.from_numpy(q), codes)
    assert isinstance(got, torch.Tensor) and tuple(got.shape) == (2, 9)
    np.testing.assert_array_equal(got.numpy(), tq.scores(q, codes))


# -- out= -----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,rotation", QUANTIZERS)
def test_out_is_filled_and_returned(rng, mode, rotation):
    tq = _tq(rng, mode, rotation)
    codes = tq.quantize(rng.standard_normal((2, 9, 48)))
    q = rng.standard_normal((4, 48))
    expected = tq.scores(q, codes)
    out = np.full(expected.shape, np.nan, np.float32)
    assert tq.scores(q, codes, out=out) is out
    np.testing.assert_array_equal(out, expected)
    strided = np.full((2, 8, 9), np.nan, np.float32)[:, ::2]  # not contiguous: still written
    assert tq.scores(q, codes, out=strided) is strided
    np.testing.assert_array_equal(strided, expected)
    one = np.empty((2, 9), np.float32)
    assert tq.scores(q[1], codes, out=one) is one
    np.testing.assert_array_equal(one, tq.scores(q[1], codes))
    # Alone or in a batch of queries: BLAS (dense rotation, prod sketch) rounds by row count.
    np.testing.assert_allclose(one, expected[:, 1], rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_out_of_qjl(rng):
    qjl = rotorq.QJL(48, 64)
    codes = qjl.quantize(rng.standard_normal((9, 48)))
    q = rng.standard_normal((3, 48))
    out = np.empty((3, 9), np.float32)
    assert qjl.scores(q, codes, out=out) is out
    np.testing.assert_array_equal(out, qjl.scores(q, codes))
    with pytest.raises(ValueError, match=r"out must be a float32 ndarray of shape \(3, 9\)"):
        qjl.scores(q, codes, out=np.empty((9, 3), np.float32))


@pytest.mark.parametrize("bad,match", [
    (np.empty((4, 9), np.float32), r"out must be a float32 ndarray of shape \(2, 4, 9\)"),
    (np.empty((2, 4, 9), np.float64), "float32"),
    (np.empty((2, 4, 9), np.float16), "float32"),
    ([[0.0] * 9] * 4, "float32 ndarray"),
    ("out", "float32 ndarray"),
])
def test_bad_out_is_refused(rng, bad, match):
    tq = _tq(rng)
    codes = tq.quantize(rng.standard_normal((2, 9, 48)))
    with pytest.raises(ValueError, match=match):
        tq.scores(rng.standard_normal((4, 48)), codes, out=bad)


def test_read_only_and_foreign_out_are_refused(rng):
    tq = _tq(rng)
    codes = tq.quantize(rng.standard_normal((9, 48)))
    q = rng.standard_normal((4, 48))
    ro = np.empty((4, 9), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        tq.scores(q, codes, out=ro)
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match="float32 ndarray"):  # numpy queries: a numpy result
        tq.scores(q, codes, out=torch.empty((4, 9)))
    tq_q = torch.from_numpy(q.astype(np.float32))
    with pytest.raises(ValueError, match="float32 torch Tensor"):
        tq.scores(tq_q, codes, out=np.empty((4, 9), np.float32))
    out = torch.empty((4, 9))
    assert tq.scores(tq_q, codes, out=out) is out
    np.testing.assert_array_equal(out.numpy(), tq.scores(q.astype(np.float32), codes))
    with pytest.raises(TypeError, match="out requires grad"):
        tq.scores(tq_q, codes, out=torch.empty((4, 9), requires_grad=True))


# -- concatenate ----------------------------------------------------------------------------

@pytest.mark.parametrize("mode,rotation", QUANTIZERS)
def test_concatenate_equals_quantizing_the_joined_input(rng, mode, rotation):
    tq = _tq(rng, mode, rotation)
    a, b = rng.standard_normal((2, 5, 48)), rng.standard_normal((2, 3, 48))
    joined = rotorq.concatenate([tq.quantize(a), tq.quantize(b)], axis=1)
    whole = tq.quantize(np.concatenate([a, b], axis=1))
    assert joined.shape == (2, 8, 48) and joined.config == whole.config
    for name, arr in whole.parts.items():
        np.testing.assert_array_equal(joined.parts[name], arr)
    same = rotorq.concatenate([tq.quantize(a), tq.quantize(b)], axis=-2)
    np.testing.assert_array_equal(same.codes, joined.codes)
    c = rng.standard_normal((3, 5, 48))
    first = rotorq.concatenate((tq.quantize(a), tq.quantize(c), tq.quantize(a)))
    assert first.shape == (7, 5, 48)
    np.testing.assert_array_equal(tq.dequantize(first), np.concatenate(
        [tq.dequantize(tq.quantize(x)) for x in (a, c, a)]))


def test_np_concatenate_dispatches(rng):
    tq = _tq(rng)
    a, b = tq.quantize(rng.standard_normal((4, 48))), tq.quantize(rng.standard_normal((2, 48)))
    joined = np.concatenate([a, b])  # was an object array of QuantizedVectors
    assert isinstance(joined, rotorq.QuantizedVectors) and joined.shape == (6, 48)
    np.testing.assert_array_equal(joined.codes, np.concatenate([a.codes, b.codes]))
    assert np.shape(joined) == (6, 48) and np.ndim(joined) == 2
    with pytest.raises(TypeError, match="no out, dtype or casting"):
        np.concatenate([a, b], out=np.empty(3))
    with pytest.raises(ValueError, match="leading axis"):
        np.concatenate([a, b], axis=None)
    for func in (lambda: np.stack([a, b]), lambda: np.sum(a), lambda: np.mean(a)):
        with pytest.raises(TypeError, match="does not apply to QuantizedVectors"):
            func()


def test_concatenate_qjl_codes(rng):
    qjl = rotorq.QJL(48, 70)
    a, b = rng.standard_normal((3, 48)), rng.standard_normal((4, 48))
    joined = rotorq.concatenate([qjl.quantize(a), qjl.quantize(b)])
    np.testing.assert_array_equal(joined.qjl_signs, qjl.quantize(np.concatenate([a, b])).qjl_signs)


def test_concatenate_refuses(rng):
    tq = _tq(rng)
    a = tq.quantize(rng.standard_normal((2, 5, 48)))
    other = rotorq.TurboQuant(48, 3, seed=tq.seed + 1).quantize(rng.standard_normal((2, 5, 48)))
    with pytest.raises(ValueError, match="different quantizer"):
        rotorq.concatenate([a, other])
    with pytest.raises(ValueError, match="cannot be joined"):
        rotorq.concatenate([a, tq.quantize(rng.standard_normal((2, 4, 48)))])
    with pytest.raises(ValueError, match="cannot be joined"):
        rotorq.concatenate([a, tq.quantize(rng.standard_normal((5, 48)))])
    for axis in (2, -1, 3, -4):
        with pytest.raises(ValueError, match="not a leading axis"):
            rotorq.concatenate([a, a], axis=axis)
    with pytest.raises(TypeError, match="axis must be an int"):
        rotorq.concatenate([a, a], axis=True)
    with pytest.raises(TypeError, match="axis must be an int"):
        rotorq.concatenate([a, a], axis=1.0)
    with pytest.raises(ValueError, match="not a leading axis"):  # single vectors: no leading axis
        rotorq.concatenate([a[0, 0], a[0, 1]])
    with pytest.raises(ValueError, match="at least one"):
        rotorq.concatenate([])
    with pytest.raises(TypeError, match="sequence of QuantizedVectors"):
        rotorq.concatenate(a)
    with pytest.raises(TypeError, match=r"codes\[1\] must be QuantizedVectors"):
        rotorq.concatenate([a, np.zeros((2, 5, 18), np.uint8)])
    fake = tq.quantize(rng.standard_normal((2, 5, 48)))
    fake.origin = Origin("cupy", "cuda")
    with pytest.raises(ValueError, match="same device"):
        rotorq.concatenate([a, fake])
    broken = tq.quantize(rng.standard_normal((2, 5, 48)))
    broken.parts["codes"] = broken.parts["codes"][..., :3]
    with pytest.raises(ValueError, match=r"codes\[1\]: codes must have rows of 24 bytes"):
        rotorq.concatenate([a, broken])


# -- dequantize(dtype=) -------------------------------------------------------------------

@pytest.mark.parametrize("dtype,expected", [
    (None, np.float32), ("float32", np.float32), ("float16", np.float16), ("float64", np.float64),
    (np.float16, np.float16), (np.dtype("float64"), np.float64), (float, np.float64),
])
def test_dequantize_dtype(rng, dtype, expected):
    tq = _tq(rng, mode="prod")
    qv = tq.quantize(rng.standard_normal((3, 7, 48)))
    base = tq.dequantize(qv)
    got = tq.dequantize(qv, dtype=dtype)
    assert got.dtype == expected and got.shape == (3, 7, 48)
    np.testing.assert_array_equal(got, base.astype(expected))


@pytest.mark.parametrize("dtype", ["int8", np.int32, "bfloat16", "complex64", 5, "float"])
def test_dequantize_bad_dtype(rng, dtype):
    tq = _tq(rng)
    qv = tq.quantize(rng.standard_normal((3, 48)))
    if dtype == "float":  # numpy's name for float64: accepted
        assert tq.dequantize(qv, dtype=dtype).dtype == np.float64
        return
    with pytest.raises(TypeError, match="dtype must be float16, float32 or float64"):
        tq.dequantize(qv, dtype=dtype)


def test_dequantize_torch_dtype(rng):
    torch = pytest.importorskip("torch")
    tq = _tq(rng)
    x = torch.from_numpy(rng.standard_normal((3, 48)).astype(np.float32))
    qv = tq.quantize(x)
    got = tq.dequantize(qv, dtype=torch.float16)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float16
    np.testing.assert_array_equal(got.numpy(), tq.dequantize(qv).numpy().astype(np.float16))
    with pytest.raises(TypeError, match="dtype must be"):
        tq.dequantize(qv, dtype=torch.bfloat16)


# -- torch tensors that require grad -----------------------------------------------------

def test_tensors_that_require_grad_are_refused(rng):
    torch = pytest.importorskip("torch")
    tq, qjl = _tq(rng), rotorq.QJL(48, 64)
    x = torch.from_numpy(rng.standard_normal((4, 48)).astype(np.float32))
    g = x.clone().requires_grad_(True)
    codes, qcodes = tq.quantize(x), qjl.quantize(x)
    calls = {
        "x": [lambda: tq.quantize(g), lambda: qjl.quantize(g), lambda: tq.rotate(g),
              lambda: rotorq.wht(torch.ones(2, 8, requires_grad=True))],
        "queries": [lambda: tq.scores(g, codes), lambda: qjl.scores(g, qcodes),
                    lambda: tq.prepare_scores(g, codes)],
        "keys": [lambda: rotorq.KVCache(1, 48).append(g[None], x[None])],
    }
    for name, fns in calls.items():
        for fn in fns:
            with pytest.raises(TypeError, match=f"{name} requires grad, but rotorq has no autograd"):
                fn()
    # A computed tensor (requires grad through its graph) too; .detach() is the way in.
    y = g * 2
    with pytest.raises(TypeError, match="detach"):
        tq.quantize(y)
    np.testing.assert_array_equal(tq.quantize(y.detach()).codes, tq.quantize(x * 2).codes)
    prepared = tq.prepare_scores(x, codes)
    with pytest.raises(TypeError, match="queries requires grad"):
        prepared(g)
