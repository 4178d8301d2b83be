"""Every public verb refuses bad input with an error that names the argument."""

import numpy as np
import pytest

import rotorq


@pytest.fixture
def tq():
    return rotorq.TurboQuant(32, 3)


@pytest.mark.parametrize("kwargs,match", [
    (dict(dim=0, bits=3), "dim"),
    (dict(dim=3.5, bits=3), "dim"),
    (dict(dim=32, bits=0), "bits"),
    (dict(dim=32, bits=9), "bits"),
    (dict(dim=32, bits=1, mode="prod"), "prod"),
    (dict(dim=32, bits=3, mode="fast"), "mode"),
    (dict(dim=32, bits=3, rotation="givens"), "rotation"),
    (dict(dim=32, bits=3, codebook="uniform"), "codebook"),
    (dict(dim=32, bits=3, qjl_dim=64), "qjl_dim"),
    (dict(dim=32, bits=3, mode="prod", qjl_dim=0), "qjl_dim"),
    (dict(dim=32, bits=3, norm_dtype="float8"), "norm_dtype"),
])
def test_constructor(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        rotorq.TurboQuant(**kwargs)


def test_bits_must_be_int():
    with pytest.raises(TypeError, match="bits"):
        rotorq.TurboQuant(32, 3.0)


@pytest.mark.parametrize("x,err,match", [
    (np.ones((4, 31)), ValueError, "last dimension of 32"),
    (np.ones(()), ValueError, "at least 1"),
    (np.ones((4, 32), dtype=np.int64), TypeError, "floating"),
    (np.ones((4, 32), dtype=np.complex64), TypeError, "floating"),
    (np.ones((4, 32), dtype=object), TypeError, "floating"),
    (np.ones((4, 32), dtype=bool), TypeError, "floating"),
    ("not an array", TypeError, "x must be"),
])
def test_quantize_bad_x(tq, x, err, match):
    with pytest.raises(err, match=match):
        tq.quantize(x)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_quantize_non_finite(tq, rng, bad):
    x = rng.standard_normal((5, 32))
    x[3, 7] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        tq.quantize(x)


def test_scores_bad_queries(tq, rng):
    codes = tq.quantize(rng.standard_normal((6, 32)))
    with pytest.raises(ValueError, match="queries must have a last dimension of 32"):
        tq.scores(rng.standard_normal((2, 16)), codes)
    with pytest.raises(ValueError, match="queries must have at least 2"):
        tq.scores(rng.standard_normal(32), codes)
    with pytest.raises(TypeError, match="queries must have a floating"):
        tq.scores(np.ones((2, 32), dtype=np.int32), codes)
    q = rng.standard_normal((2, 32))
    q[0, 0] = np.nan
    with pytest.raises(ValueError, match="queries contains NaN"):
        tq.scores(q, codes)
    with pytest.raises(ValueError, match="codes must have shape"):
        tq.scores(rng.standard_normal((2, 32)), codes[0])
    batched = tq.quantize(rng.standard_normal((3, 6, 32)))
    with pytest.raises(ValueError, match="do not broadcast"):
        tq.scores(rng.standard_normal((2, 4, 32)), batched)


def test_mismatched_quantizer_and_codes(tq, rng):
    codes = tq.quantize(rng.standard_normal((6, 32)))
    for other in (rotorq.TurboQuant(32, 3, seed=1), rotorq.TurboQuant(32, 2),
                  rotorq.TurboQuant(32, 3, rotation="dense")):
        with pytest.raises(ValueError, match="different quantizer"):
            other.dequantize(codes)
        with pytest.raises(ValueError, match="different quantizer"):
            other.scores(np.ones((1, 32)), codes)
    with pytest.raises(TypeError, match="QuantizedVectors"):
        tq.dequantize(np.ones((6, 12), np.uint8))


def test_device_mix_is_refused(tq, rng):
    codes = tq.quantize(rng.standard_normal((6, 32)))
    from rotorq._arrays import Origin
    codes.origin = Origin("cupy", "cuda")  # codes that claim to live on a GPU
    with pytest.raises(ValueError, match="same device"):
        tq.scores(rng.standard_normal((2, 32)), codes)


def test_load_rejects_foreign_files(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, __meta__=np.array('{"format": 99}'))
    with pytest.raises(ValueError, match="format"):
        rotorq.load(path)
