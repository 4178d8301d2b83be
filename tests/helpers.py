"""Assertions shared by the test modules."""

import numpy as np

from rotorq import reference

BOUNDARY_EPS = 2e-5  # float32 kernels vs the float64 reference: codes may flip this close


def kernel_encoding(tq, qv):
    """The unpacked encoding of QuantizedVectors ``qv`` in the reference's dict form."""
    codes = np.asarray(qv.codes).reshape(-1, qv.codes.shape[-1])
    enc = {"idx": reference.unpack_bits(codes, tq.mse_bits, tq.stored_dim),
           "norms": np.asarray(qv.norms, dtype=np.float64).reshape(-1)}
    if tq.mode == "prod":
        signs = np.asarray(qv.qjl_signs).reshape(-1, qv.qjl_signs.shape[-1])
        enc["signs"] = reference.unpack_bits(signs, 1, tq.qjl_dim).astype(bool)
        enc["qjl_norms"] = np.asarray(qv.qjl_norms, dtype=np.float64).reshape(-1)
    return enc


def assert_codes_match_reference(tq, x, qv):
    """Codes equal the reference's, except flips by one level within BOUNDARY_EPS of a boundary.

    Returns the number of flips.
    """
    ref = reference.quantize(tq, np.asarray(x, dtype=np.float64).reshape(-1, tq.dim))
    got = kernel_encoding(tq, qv)
    diff = got["idx"].astype(int) - ref["idx"].astype(int)
    bad = np.nonzero(diff)
    if bad[0].size:
        y = ref["y"][bad]
        dist = np.abs(y[:, None] - tq.boundaries.astype(np.float64)[None, :]).min(1)
        assert np.all(np.abs(diff[bad]) == 1), "codes differ by more than one level"
        assert np.all(dist < BOUNDARY_EPS), f"code flips away from boundaries: {dist.max():.3g}"
    # float16 norms below 6.1e-5 are subnormals: absolute spacing 2^-24
    atol = 2.0 ** -24 if tq.norm_dtype == "float16" else 1e-30
    np.testing.assert_allclose(got["norms"], ref["norms"], rtol=1e-3, atol=atol)
    assert np.mean(diff != 0) <= 1e-3
    if tq.mode == "prod":
        # Signs of the sketch may flip only where the projection is tiny.
        assert np.mean(got["signs"] != ref["signs"]) < 5e-3
        np.testing.assert_allclose(got["qjl_norms"], ref["qjl_norms"], rtol=2e-3,
                                   atol=1e-3 * ref["norms"].max())
    return int(bad[0].size)


def expected_nbytes(tq, count):
    per = (tq.stored_dim * tq.mse_bits + 7) // 8 + (2 if tq.norm_dtype == "float16" else 4)
    if tq.mode == "prod":
        per += (tq.qjl_dim + 7) // 8 + (2 if tq.norm_dtype == "float16" else 4)
    return per * count


def unit_vectors(rng, n, d, dtype=np.float64):
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)


def outlier_vectors(rng, n, d, channels=4, factor=15.0):
    """Unit vectors after scaling a few fixed channels by ``factor`` (docs/math.md §6)."""
    x = rng.standard_normal((n, d))
    x[:, rng.choice(d, channels, replace=False)] *= factor
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact_attention_case(rng, n_bh, n_rows, d, dv, n_e, partial, pos_span):
    """Random arguments of ``exact_attention``: float32 queries, keys, values, sorted
    distinct positions below ``pos_span``, and (with ``partial``) a compressed part's
    ``(acc, m, l)``."""
    f32 = np.float32
    q = rng.standard_normal((n_bh, n_rows, d)).astype(f32)
    ke = rng.standard_normal((n_bh, n_e, d)).astype(f32)
    ve = rng.standard_normal((n_bh, n_e, dv)).astype(f32)
    pos = np.sort(rng.choice(pos_span, n_e, replace=False)).astype(np.int64)
    part = None
    if partial:
        part = ((rng.standard_normal((n_bh, n_rows, dv)) * 5).astype(f32),
                (rng.standard_normal((n_bh, n_rows)) * 2).astype(f32),
                (rng.random((n_bh, n_rows)) * 5 + 0.5).astype(f32))
    return q, ke, ve, pos, part


def cupy_with_gpu(reason="no CUDA GPU visible"):
    """cupy, or skip the calling module (at import) or test where cupy is missing, no GPU
    is visible, or the CUDA simulator runs (real-GPU tests only)."""
    import os

    import pytest
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        pytest.skip("real-GPU tests do not run under the simulator", allow_module_level=True)
    cp = pytest.importorskip("cupy")
    try:
        gpus = cp.cuda.runtime.getDeviceCount()
    except cp.cuda.runtime.CUDARuntimeError:
        gpus = 0
    if not gpus:
        pytest.skip(reason, allow_module_level=True)
    return cp
