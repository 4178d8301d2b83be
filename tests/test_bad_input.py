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
    with pytest.raises(ValueError, match="queries must have at least 1"):
        tq.scores(np.float64(1.0), codes)
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


# -- seeds, flags and magnitudes (issue 23, item 6) -----------------------------------

@pytest.mark.parametrize("cls,args", [(rotorq.TurboQuant, (32, 3)), (rotorq.QJL, (32, 16))])
@pytest.mark.parametrize("seed,err", [(1.5, TypeError), (True, TypeError), (np.bool_(False), TypeError),
                                      ("3", TypeError), (None, TypeError), (-1, ValueError),
                                      (2 ** 64, ValueError), (-(2 ** 63), ValueError)])
def test_seed_must_be_an_int_in_range(cls, args, seed, err):
    with pytest.raises(err, match="seed"):
        cls(*args, seed=seed)


@pytest.mark.parametrize("seed", [0, 2 ** 63, 2 ** 64 - 1, np.uint64(2 ** 64 - 1), np.int8(5)])
def test_seeds_of_the_whole_range_are_accepted(seed):
    tq = rotorq.TurboQuant(32, 3, mode="prod", seed=seed)
    assert tq.seed == int(seed) and type(tq.seed) is int
    assert rotorq.TurboQuant.from_config(tq.config).config == tq.config


def test_distinct_seeds_give_distinct_rotations():
    # -1 and 2**64 - 1 once gave the same rotation under different configs; now -1 is refused
    # and the extremes of the range differ from each other and from their neighbours.
    mats = {seed: rotorq.TurboQuant(16, 3, rotation="dense", seed=seed).rotation.matrix()
            for seed in (0, 1, 2 ** 63, 2 ** 64 - 1, 2 ** 64 - 2)}
    seeds = list(mats)
    for i, a in enumerate(seeds):
        for b in seeds[i + 1:]:
            assert not np.allclose(mats[a], mats[b]), (a, b)


@pytest.mark.parametrize("value", ["no", "", 1, 0, None, 1.0])
def test_flags_must_be_bool(value):
    with pytest.raises(TypeError, match="norm_correction must be True or False"):
        rotorq.TurboQuant(32, 3, norm_correction=value)
    with pytest.raises(TypeError, match="orthogonal must be True or False"):
        rotorq.QJL(32, 16, orthogonal=value)


def test_flags_accept_numpy_bools():
    assert rotorq.TurboQuant(32, 3, norm_correction=np.bool_(True)).config["norm_correction"] is True


@pytest.mark.parametrize("mode", ["mse", "prod"])
def test_finite_input_beyond_float32_norms_is_not_called_non_finite(rng, mode):
    x = rng.standard_normal((4, 32)).astype(np.float32)
    x[2] = 3e38  # finite; its norm (1.7e39) is beyond float32
    for norm_dtype in ("float16", "float32"):
        tq = rotorq.TurboQuant(32, 3, mode=mode, norm_dtype=norm_dtype)
        with pytest.raises(ValueError, match=r"x has vector norms up to 1.7e\+39, beyond float32") as e:
            tq.quantize(x)
        assert "NaN" not in str(e.value) and "norm_dtype='float32'" not in str(e.value)
    with pytest.raises(ValueError, match="beyond float32"):
        rotorq.QJL(32, 16).quantize(x)
    with pytest.raises(ValueError, match=r"x has vector norms up to 5.66e\+300, beyond float32"):
        rotorq.TurboQuant(32, 3, norm_dtype="float32").quantize(np.full((1, 32), 1e300))
    x[2, 5] = np.nan  # non-finite input still says so
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        rotorq.TurboQuant(32, 3, mode=mode).quantize(x)


def test_float16_overflow_suggests_float32_norms(rng):
    x = rng.standard_normal((3, 32)) * 1e5
    with pytest.raises(ValueError, match=r"beyond float16's range.*norm_dtype='float32'"):
        rotorq.TurboQuant(32, 3).quantize(x)


@pytest.mark.parametrize("mode,rotation", [("mse", "hadamard"), ("mse", "dense"), ("mse", "rotor"),
                                           ("prod", "hadamard"), ("prod", "rotor")])
def test_huge_finite_queries_are_scored_exactly(rng, mode, rotation):
    """Queries of 1e38 gave all-NaN scores. Scores are linear in each query row, so a row
    times 2**120 must give exactly 2**120 times its scores, whatever the other rows hold."""
    tq = rotorq.TurboQuant(64, 3, mode=mode, rotation=rotation, seed=int(rng.integers(1 << 30)))
    codes = tq.quantize(rng.standard_normal((2, 7, 64)) * 1e-3)
    q = rng.standard_normal((2, 3, 64)).astype(np.float32)
    big = q.copy()
    big[:, 1] *= np.float32(2.0 ** 120)  # up to ~1e37 per coordinate
    plain, scaled = tq.scores(q, codes), tq.scores(big, codes)
    np.testing.assert_array_equal(scaled[:, [0, 2]], plain[:, [0, 2]])
    np.testing.assert_array_equal(scaled[:, 1], plain[:, 1] * np.float32(2.0 ** 120))
    qjl = rotorq.QJL(64, 64, seed=int(rng.integers(1 << 30)))
    qcodes = qjl.quantize(rng.standard_normal((7, 64)) * 1e-3)
    np.testing.assert_array_equal(qjl.scores(big[0], qcodes)[1],
                                  qjl.scores(q[0], qcodes)[1] * np.float32(2.0 ** 120))


def test_scores_beyond_float32_are_refused(rng):
    tq = rotorq.TurboQuant(64, 3)
    codes = tq.quantize(rng.standard_normal((5, 64)))
    q = rng.standard_normal((2, 64)) * 1e38  # finite; scores ~1e39
    with pytest.raises(ValueError, match="scores exceed float32's range"):
        tq.scores(q, codes)
    qjl = rotorq.QJL(64, 64)
    with pytest.raises(ValueError, match="scores exceed float32's range"):
        qjl.scores(q, qjl.quantize(rng.standard_normal((5, 64))))
