"""Prepared score calls on a real GPU: :class:`rotorq.cuda.api.ScoresPlan`,
:class:`rotorq.cuda.api.QueryScoresPlan` and ``TurboQuant.prepare_scores`` return exactly
what ``api.scores`` / ``TurboQuant.scores`` return (same kernels, same geometry), call after
call with new queries (the patched pointers take effect), into fresh or preallocated outputs.
Fresh outputs are poisoned (NaN) first, so an element a kernel skips shows up."""

import importlib

import numpy as np
import pytest

from helpers import cupy_with_gpu

cp = cupy_with_gpu()

import rotorq  # noqa: E402

api = importlib.import_module("rotorq.cuda.api")
launch_mod = importlib.import_module("rotorq.cuda._launch")

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("poisoned_outputs")]


def _keys(tq, k_shape, seed=0):
    rng = np.random.default_rng(seed)
    return tq.quantize(cp.asarray(rng.standard_normal(k_shape + (tq.dim,)), cp.float32)), rng


def _queries(rng, shape, dtype=cp.float32):
    return cp.asarray(rng.standard_normal(shape), dtype)


def _same(a, b):
    assert a.shape == b.shape
    np.testing.assert_array_equal(cp.asnumpy(a), cp.asnumpy(b))
    assert not np.isnan(cp.asnumpy(a)).any()


SHAPES = [  # (query shape without dim, key shape without dim)
    ((1,), (1024,)),
    ((2, 5), (2, 300)),
    ((4, 1, 3), (2, 777)),
    ((40,), (513,)),  # several query chunks
    ((1,), (16384,)),  # the tiled / generated score kernels (MSE)
    ((3,), (16384,)),
]


@pytest.mark.parametrize("q_shape,k_shape", SHAPES)
@pytest.mark.parametrize("mode,bits", [("mse", 2), ("mse", 3), ("mse", 4), ("prod", 2),
                                       ("prod", 3), ("prod", 4)])
def test_public_prepared_equals_scores(q_shape, k_shape, mode, bits):
    tq = rotorq.TurboQuant(128, bits, mode=mode)
    codes, rng = _keys(tq, k_shape)
    prepared = tq.prepare_scores(_queries(rng, q_shape + (128,)), codes)
    out = None
    for i in range(4):
        q = _queries(rng, q_shape + (128,))
        expected = tq.scores(q, codes)
        if i == 2:
            out = cp.full(expected.shape, np.nan, cp.float32)
        got = prepared(q, out=out)
        if out is not None:
            assert got is out
        _same(got, expected)


@pytest.mark.parametrize("rotation,dim", [("hadamard", 50), ("rotor", 64), ("rotor", 128),
                                          ("dense", 96)])
@pytest.mark.parametrize("mode", ["mse", "prod"])
@pytest.mark.parametrize("dtype", [cp.float32, cp.float16, cp.float64])
def test_public_prepared_rotations_and_dtypes(rotation, dim, mode, dtype):
    tq = rotorq.TurboQuant(dim, 3, mode=mode, rotation=rotation, seed=3)
    codes, rng = _keys(tq, (2, 600), seed=1)
    prepared = tq.prepare_scores(_queries(rng, (2, 3, dim), dtype), codes)
    for _ in range(3):
        q = _queries(rng, (2, 3, dim), dtype)
        _same(prepared(q), tq.scores(q, codes))


@pytest.mark.parametrize("q_shape,k_shape", SHAPES)
@pytest.mark.parametrize("mode,bits", [("mse", 2), ("mse", 3), ("mse", 4), ("prod", 3)])
def test_backend_plan_equals_api_scores(q_shape, k_shape, mode, bits):
    tq = rotorq.TurboQuant(128, bits, mode=mode)
    codes, rng = _keys(tq, k_shape)
    k = tq._consts(cp)
    bq, m = int(np.prod(q_shape[:-1])), q_shape[-1]
    bk, n = int(np.prod(k_shape[:-1])), k_shape[-1]
    _, qmap, kmap = rotorq._backend.device_batch_maps(cp, "cuda", q_shape[:-1], k_shape[:-1])
    flat = codes.codes.reshape(bk, n, -1)
    norms = codes.norms.reshape(bk, n).astype(cp.float32)
    if mode == "mse":
        keys = (qmap, flat, norms, None, None, kmap, k["centroids"], tq.mse_bits, 0.0)
    else:
        keys = (qmap, flat, norms, codes.qjl_signs.reshape(bk, n, -1),
                codes.qjl_norms.reshape(bk, n).astype(cp.float32), kmap, k["centroids"],
                tq.mse_bits, tq.qjl_scale)

    def operands():
        qrot = _queries(rng, (bq, m, 128))
        qsk = None if mode == "mse" else _queries(rng, (bq, m, tq.qjl_dim))
        return qrot, qsk

    qrot, qsk = operands()
    plan = api.ScoresPlan(qrot, qsk, *keys)
    for i in range(4):
        qrot, qsk = operands()
        expected = api.scores(qrot, qsk, *keys)
        out = cp.full(expected.shape, np.nan, cp.float32) if i % 2 else None
        got = plan(qrot, qsk, out=out)
        assert out is None or got is out
        _same(got, expected)


def test_backend_plan_converts_float16_rotated_queries():
    tq = rotorq.TurboQuant(128, 3)
    codes, rng = _keys(tq, (1, 2000))
    k = tq._consts(cp)
    zero = cp.zeros(1, cp.int64)
    keys = (zero, codes.codes.reshape(1, 2000, -1), codes.norms.reshape(1, 2000), None, None,
            zero, k["centroids"], 3, 0.0)
    plan = api.ScoresPlan(_queries(rng, (1, 2, 128), cp.float16), None, *keys)
    for _ in range(2):
        q = _queries(rng, (1, 2, 128), cp.float16)
        _same(plan(q), api.scores(q, None, *keys))


def test_prepared_and_plain_calls_interleave_on_a_stream():
    tq = rotorq.TurboQuant(128, 3, mode="prod")
    codes, rng = _keys(tq, (1000,))
    q0 = _queries(rng, (2, 128))
    prepared = tq.prepare_scores(q0, codes)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        results = []
        for _ in range(5):
            q = _queries(rng, (2, 128))
            results.append((prepared(q), tq.scores(q, codes)))
        stream.synchronize()
    for got, expected in results:
        _same(got, expected)
    _same(prepared(q0), tq.scores(q0, codes))  # the default stream: its own scratch


def test_prepared_empty():
    tq = rotorq.TurboQuant(128, 3)
    codes, rng = _keys(tq, (0,))
    q = _queries(rng, (3, 128))
    assert tq.prepare_scores(q, codes)(q).shape == (3, 0)
    codes, rng = _keys(tq, (100,))
    q = cp.zeros((0, 128), cp.float32)
    assert tq.prepare_scores(q, codes)(q).shape == (0, 100)


def test_prepared_refuses_bad_queries_and_outputs():
    tq = rotorq.TurboQuant(128, 3)
    codes, rng = _keys(tq, (2, 100))
    q = _queries(rng, (2, 4, 128))
    prepared = tq.prepare_scores(q, codes)
    with pytest.raises(ValueError, match=r"prepared shape \(2, 4, 128\)"):
        prepared(q[:, :3].copy())
    with pytest.raises(TypeError, match="prepared dtype float32"):
        prepared(q.astype(cp.float16))
    with pytest.raises(ValueError, match="C-contiguous"):
        prepared(cp.asfortranarray(q))
    with pytest.raises(ValueError, match="are on cpu:0 but the call was prepared for cuda:0"):
        prepared(cp.asnumpy(q))
    with pytest.raises(TypeError, match="prepared dtype float32"):
        prepared(q, out=cp.empty((2, 4, 100), cp.float64))
    with pytest.raises(ValueError, match=r"prepared shape \(2, 4, 100\)"):
        prepared(q, out=cp.empty((8, 100), cp.float32))
    with pytest.raises(ValueError, match="move them to the same device"):
        tq.prepare_scores(cp.asnumpy(q), codes)
    plan = prepared._plan._scores
    with pytest.raises(ValueError, match="prepared without a sketch"):
        plan(cp.zeros((2, 4, 128), cp.float32), cp.zeros((2, 4, 128), cp.float32))


def test_prepared_torch_tensors():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    tq = rotorq.TurboQuant(128, 3, mode="prod")
    codes, rng = _keys(tq, (2, 700))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        def tensor(dtype=dtype):
            return torch.from_numpy(rng.standard_normal((2, 3, 128)).astype(np.float32)).to(
                device="cuda", dtype=dtype)

        prepared = tq.prepare_scores(tensor(), codes)
        out = torch.empty((2, 3, 700), dtype=torch.float32, device="cuda")
        for i in range(3):
            q = tensor()
            got = prepared(q, out=out if i == 2 else None)
            assert isinstance(got, torch.Tensor) and (i < 2 or got is out)
            expected = tq.scores(q, codes)
            torch.cuda.synchronize()
            np.testing.assert_array_equal(got.cpu().numpy(), expected.cpu().numpy())
        with pytest.raises(TypeError, match="prepared for torch arrays"):
            prepared(cp.asarray(rng.standard_normal((2, 3, 128)), cp.float32))
        with pytest.raises(ValueError, match="C-contiguous"):
            prepared(tensor().transpose(0, 1).contiguous().transpose(0, 1))


def test_prepared_launches_replay_with_the_recorder():
    tq = rotorq.TurboQuant(128, 3)
    codes, rng = _keys(tq, (1024,))
    prepared = tq.prepare_scores(_queries(rng, (1, 128)), codes)
    launch_mod.RECORDER = rec = []
    try:
        q = _queries(rng, (1, 128))
        got = prepared(q)
    finally:
        launch_mod.RECORDER = None
    assert len(rec) == 2  # the rotation, the scores
    cp.cuda.get_current_stream().synchronize()
    expected = got.copy()
    got.fill(np.nan)
    from cupy.cuda import driver
    for f, g, blk, sh, st, _, ex in rec:
        driver.launchKernel(f, g[0], g[1], g[2], blk[0], blk[1], 1, sh, st, 0, ex)
    _same(got, expected)
