"""The CUDA backend against the CPU backend through the public API, on a real GPU.

Every output the backend allocates is poisoned first (NaN / 0xAB), so an element a kernel
forgets to write shows up. Codes must equal the CPU's except rounding-boundary flips (FMA
contraction on the GPU, cuBLAS vs BLAS for the dense rotation), at most ``FLIP_LIMIT`` of
the codes; the flips are counted and, with ``ROTORQ_PARITY_REPORT=path.json``, written out.
"""

import importlib
import json
import os

import numpy as np
import pytest

from helpers import cupy_with_gpu

cp = cupy_with_gpu()

import rotorq  # noqa: E402
from rotorq import cpu  # noqa: E402

api = importlib.import_module("rotorq.cuda.api")
launch_mod = importlib.import_module("rotorq.cuda._launch")
QUANTIZE_ROTOR = importlib.import_module("rotorq.cuda.gen.quantize_rotor")
SCORE_TILES = importlib.import_module("rotorq.cuda.gen.score_tiles")
SCORES_ROWS = importlib.import_module("rotorq.cuda.gen.scores_rows")

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("poisoned_outputs")]

FLIP_LIMIT = 1e-4
DIMS = (1, 3, 50, 64, 96, 128, 200, 256)
ROTATIONS = ("hadamard", "dense", "rotor")
N = 4096
_REPORT: dict = {}


def _record(kind, total, flips, **extra):
    r = _REPORT.setdefault(kind, {"cases": 0, "total": 0, "flips": 0, "worst_rate": 0.0})
    r["cases"] += 1
    r["total"] += int(total)
    r["flips"] += int(flips)
    r["worst_rate"] = max(r["worst_rate"], flips / max(total, 1))
    for k, v in extra.items():
        r[k] = max(r.get(k, 0.0), float(v))


@pytest.fixture(scope="session", autouse=True)
def parity_report():
    yield _REPORT
    path = os.environ.get("ROTORQ_PARITY_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump({"device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(),
                       "flip_limit": FLIP_LIMIT, "results": _REPORT}, f, indent=1)


def host(a):
    if isinstance(a, cp.ndarray):
        return a.get()
    if hasattr(a, "detach"):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def host_codes(qv):
    return rotorq.QuantizedVectors({k: host(v) for k, v in qv.parts.items()}, qv.config)


def code_flips(a, b, bits, count):
    """Per-row numbers of differing codes of two packed code arrays (n, nbytes)."""
    ua = cpu.unpack_codes(np.ascontiguousarray(a.reshape(-1, a.shape[-1])), bits, count)
    ub = cpu.unpack_codes(np.ascontiguousarray(b.reshape(-1, b.shape[-1])), bits, count)
    return (ua != ub).sum(axis=1)


def data(rng, shape, dtype=np.float32):
    """Gaussian rows with a few outlier channels, a zero row and varied norms."""
    x = rng.standard_normal(shape) * rng.uniform(0.1, 30.0, shape[:-1] + (1,))
    x[..., : max(1, shape[-1] // 32)] *= 8.0
    x.reshape(-1, shape[-1])[0] = 0.0
    return x.astype(dtype)


def assert_quantized_match(tq, gpu, ref, kind, rows_ok=None):
    """Compare GPU and CPU QuantizedVectors; returns the rows whose codes match exactly."""
    g = host_codes(gpu)
    flips = code_flips(g.codes, ref.codes, tq.mse_bits, tq.stored_dim)
    total = flips.size * tq.stored_dim
    _record(kind, total, flips.sum())
    assert flips.sum() <= FLIP_LIMIT * total, f"{flips.sum()} code flips of {total}"
    same = flips == 0
    np.testing.assert_allclose(g.norms.reshape(-1)[same], ref.norms.reshape(-1)[same],
                               rtol=2e-6, atol=1e-30)
    if tq.mode == "prod":
        sf = code_flips(g.qjl_signs[same], ref.qjl_signs[same], 1, tq.qjl_dim)
        _record(kind + " qjl signs", sf.size * tq.qjl_dim, sf.sum())
        assert sf.sum() <= FLIP_LIMIT * sf.size * tq.qjl_dim
        # the residual is a difference of float32 values of the vector's scale: compare its
        # norm at that scale (FMA rounding in the rotation moves it by ~1e-7·‖x‖)
        got, want = g.qjl_norms.reshape(-1)[same], ref.qjl_norms.reshape(-1)[same]
        scale = ref.norms.reshape(-1)[same]
        assert (np.abs(got - want) <= 1e-5 * want + 1e-6 * scale).all()
    return same


CONFIGS = [(d, b, mode, rot) for d in DIMS for b in (1, 2, 3, 4) for mode in ("mse", "prod")
           for rot in ROTATIONS if not (mode == "prod" and b == 1)]


@pytest.mark.parametrize("dim,bits,mode,rotation", CONFIGS)
def test_quantize_dequantize_scores_match_cpu(dim, bits, mode, rotation):
    rng = np.random.default_rng()
    tq = rotorq.TurboQuant(dim, bits, mode=mode, rotation=rotation, norm_dtype="float32",
                           norm_correction=bits % 2 == 0)
    x = data(rng, (N, dim))
    gpu = tq.quantize(cp.asarray(x))
    assert isinstance(gpu.codes, cp.ndarray)
    ref = tq.quantize(x)
    same = assert_quantized_match(tq, gpu, ref, f"quantize {mode}")

    # dequantize the same codes on both sides
    hc = host_codes(gpu)
    rec = host(tq.dequantize(gpu))
    rec_ref = tq.dequantize(hc)
    scale = np.abs(rec_ref).max() + 1e-30
    err = np.abs(rec - rec_ref).max() / scale
    _record(f"dequantize {mode}", rec.size, 0, max_rel_err=err)
    assert err < 2e-5

    # scores of a GQA group (4 KV heads × 8 query heads) against the same codes
    q = data(rng, (4, 8, dim))
    kv = rotorq.QuantizedVectors({k: v.reshape((4, N // 4) + v.shape[1:])
                                  for k, v in gpu.parts.items()}, gpu.config, gpu.origin)
    s = host(tq.scores(cp.asarray(q), kv))
    s_ref = tq.scores(q, host_codes(kv))
    err = np.abs(s - s_ref).max() / (np.abs(s_ref).max() + 1e-30)
    _record(f"scores {mode}", s.size, 0, max_rel_err=err)
    assert err < 2e-5, err
    assert same.mean() > 0.99


def _as(framework, x, dtype):
    """``x`` (float32 numpy) as a cupy array or torch CUDA tensor of ``dtype``."""
    if framework == "cupy":
        return cp.asarray(x.astype(dtype))
    torch = pytest.importorskip("torch")
    return torch.from_numpy(x).cuda().to(getattr(torch, dtype))


def _rounded(x, dtype):
    """The values a ``dtype`` input holds, as float32 on the host."""
    if dtype == "bfloat16":
        return ((x.view(np.uint32) + 0x7FFF + ((x.view(np.uint32) >> 16) & 1))
                & 0xFFFF0000).view(np.float32)
    return x.astype(dtype).astype(np.float32)


@pytest.mark.parametrize("framework", ["cupy", "torch"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("rotation", ROTATIONS)
@pytest.mark.parametrize("dim,mode", [(128, "mse"), (96, "prod"), (50, "mse")])
def test_input_dtypes_and_frameworks(framework, dtype, rotation, dim, mode):
    if framework == "cupy" and dtype == "bfloat16":
        pytest.skip("cupy has no bfloat16")
    rng = np.random.default_rng()
    tq = rotorq.TurboQuant(dim, 3, mode=mode, rotation=rotation, norm_dtype="float32")
    x = data(rng, (N, dim)) / 8
    xd = _as(framework, x, dtype)
    gpu = tq.quantize(xd)
    ref = tq.quantize(_rounded(x, dtype) if dtype != "float64" else x.astype(np.float64))
    assert_quantized_match(tq, gpu, ref, f"quantize {dtype} {framework}")
    rec = tq.dequantize(gpu)
    q = _as(framework, data(rng, (3, dim)), dtype)
    s = tq.scores(q, gpu)
    if framework == "torch":
        torch = pytest.importorskip("torch")
        assert isinstance(rec, torch.Tensor) and rec.is_cuda
        assert isinstance(s, torch.Tensor) and s.is_cuda and s.shape == (3, N)
    else:
        assert isinstance(rec, cp.ndarray) and isinstance(s, cp.ndarray)


@pytest.mark.parametrize("rotation", ROTATIONS)
@pytest.mark.parametrize("dim", (3, 50, 128, 200))
def test_rotate_and_unrotate_match_cpu(rotation, dim):
    rng = np.random.default_rng()
    tq = rotorq.TurboQuant(dim, 3, rotation=rotation)
    x = data(rng, (513, dim))
    y = host(tq.rotate(cp.asarray(x)))
    y_ref = tq.rotate(x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5 * np.abs(y_ref).max())
    scale = float(rng.uniform(0.05, 3.0))  # the scale folded into the kernel (KVCache.attend)
    ys = host(api.rotate(cp.asarray(x), tq.rotation, scale))
    np.testing.assert_allclose(ys, cpu.rotate(x, tq.rotation, scale), rtol=1e-5,
                               atol=1e-5 * scale * np.abs(y_ref).max())
    back = host(api.unrotate(cp.asarray(y_ref), tq.rotation))
    np.testing.assert_allclose(back, cpu.unrotate(y_ref, tq.rotation), rtol=1e-5,
                               atol=1e-5 * np.abs(x).max())


@pytest.mark.parametrize("framework,dtype", [("cupy", "float16"), ("cupy", "float32"),
                                             ("torch", "float16"), ("torch", "bfloat16")])
@pytest.mark.parametrize("n", (1, 2, 128, 1024))
def test_wht_matches_cpu(framework, dtype, n):
    rng = np.random.default_rng()
    x = rng.standard_normal((3, 77, n)).astype(np.float32)
    got = host(rotorq.wht(_as(framework, x, dtype)))
    ref = rotorq.wht(_rounded(x, dtype))
    np.testing.assert_array_equal(got, ref)  # same butterflies, same float32 sums


@pytest.mark.parametrize("dim,sketch_dim", [(1, 8), (50, 64), (128, 128), (200, 100)])
@pytest.mark.parametrize("heads", (1, 8, 12))
def test_qjl_matches_cpu(dim, sketch_dim, heads):
    rng = np.random.default_rng()
    qjl = rotorq.QJL(dim, sketch_dim, norm_dtype="float32")
    k = data(rng, (2, 1000, dim))
    gpu = qjl.quantize(cp.asarray(k))
    ref = qjl.quantize(k)
    g = host_codes(gpu)
    flips = code_flips(g.qjl_signs, ref.qjl_signs, 1, sketch_dim)
    _record("qjl quantize", flips.size * sketch_dim, flips.sum())
    assert flips.sum() <= FLIP_LIMIT * flips.size * sketch_dim
    np.testing.assert_allclose(g.norms, ref.norms, rtol=2e-6)
    q = data(rng, (2, heads, dim))
    s = host(qjl.scores(cp.asarray(q), gpu))
    s_ref = qjl.scores(q, g)
    err = np.abs(s - s_ref).max() / np.abs(s_ref).max()
    _record("qjl scores", s.size, 0, max_rel_err=err)
    assert err < 2e-5


@pytest.mark.parametrize("mode", ("mse", "prod"))
def test_scores_broadcast_and_query_chunks(mode):
    """Broadcast batch maps and more query rows than one block stages (MAX_QUERIES)."""
    rng = np.random.default_rng()
    tq = rotorq.TurboQuant(128, 3, mode=mode)
    codes = tq.quantize(cp.asarray(data(rng, (1, 4, 777, 128))))
    q = data(rng, (2, 1, 19, 128))
    s = host(tq.scores(cp.asarray(q), codes))
    s_ref = tq.scores(q, host_codes(codes))
    assert s.shape == (2, 4, 19, 777)
    np.testing.assert_allclose(s, s_ref, rtol=1e-4, atol=2e-5 * np.abs(s_ref).max())


@pytest.mark.parametrize("dim", (3, 50, 128, 200))
@pytest.mark.parametrize("norm_correction", (False, True))
def test_rotor_roundtrip_matches_cpu_and_dequantize(dim, norm_correction):
    rng = np.random.default_rng()
    tq = rotorq.TurboQuant(dim, 3, rotation="rotor", norm_dtype="float32",
                           norm_correction=norm_correction)
    x = data(rng, (N, dim))
    k = tq._consts(cp)
    got = host(api.rotor_roundtrip(cp.asarray(x), tq.rotation, k["boundaries"],
                                   k["centroids"], norm_correction))
    ref = cpu.rotor_roundtrip(x, tq.rotation, tq.boundaries, tq.centroids, norm_correction)
    via_codes = tq.dequantize(tq.quantize(x))
    np.testing.assert_array_equal(ref, via_codes)
    # a row differs only where an FMA-rounded coordinate flipped a code
    bad = np.abs(got - ref).max(axis=1) > 1e-5 * (np.abs(ref).max(axis=1) + 1e-30)
    _record("rotor roundtrip (rows with a flip)", bad.size * tq.stored_dim, bad.sum())
    assert bad.sum() <= FLIP_LIMIT * bad.size * tq.stored_dim


def test_torch_current_stream_is_used():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng()
    tq = rotorq.TurboQuant(128, 3)
    x = torch.from_numpy(data(rng, (N, 128))).cuda().half()
    q = torch.from_numpy(data(rng, (8, 128))).cuda().half()
    ref = host(tq.scores(q, tq.quantize(x)))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        assert launch_mod.current_stream(0).ptr == side.cuda_stream
        s = tq.scores(q, tq.quantize(x))
    side.synchronize()
    np.testing.assert_array_equal(host(s), ref)


def test_mixed_devices_raise():
    tq = rotorq.TurboQuant(64, 3)
    codes = tq.quantize(cp.ones((10, 64), cp.float32))
    with pytest.raises(ValueError, match="same device"):
        tq.scores(np.ones((2, 64), np.float32), codes)
    qjl = rotorq.QJL(64, 32)
    with pytest.raises(ValueError, match="same device"):
        qjl.scores(np.ones((2, 64), np.float32), qjl.quantize(cp.ones((10, 64), cp.float32)))


def test_empty_inputs():
    tq = rotorq.TurboQuant(64, 3)
    qv = tq.quantize(cp.ones((0, 64), cp.float32))
    assert qv.codes.shape == (0, 24)
    assert tq.dequantize(qv).shape == (0, 64)


GENERATED_N = 16384  # above api.GENERATED_MIN_ROWS / GENERATED_MIN_KEYS: the generated kernels


@pytest.mark.parametrize("rotation", ("hadamard", "rotor"))
def test_generated_kernels_match_cpu(rotation):
    """The benchmark's shapes (d = 128, 3 bits, fp16) through the generated kernels."""
    assert GENERATED_N >= api.GENERATED_MIN_ROWS and GENERATED_N >= api.GENERATED_MIN_KEYS
    rng = np.random.default_rng()
    tq = rotorq.TurboQuant(128, 3, rotation=rotation, norm_dtype="float32")
    x = data(rng, (GENERATED_N, 128)).astype(np.float16)
    gpu = tq.quantize(cp.asarray(x))
    ref = tq.quantize(x)
    same = assert_quantized_match(tq, gpu, ref, f"generated quantize {rotation} fp16")
    assert same.mean() > 0.99
    keys = rotorq.QuantizedVectors({k: v.reshape((1, GENERATED_N) + v.shape[1:])
                                    for k, v in gpu.parts.items()}, gpu.config, gpu.origin)
    for heads in (1, 8, 5):
        q = data(rng, (2, heads, 128))[1:]  # data()'s first row is zero
        s = host(tq.scores(cp.asarray(q), keys))
        s_ref = tq.scores(q, host_codes(keys))
        err = np.abs(s - s_ref).max() / (np.abs(s_ref).max() + 1e-30)
        _record(f"generated scores {heads} queries", s.size, 0, max_rel_err=err)
        # tiled scores: fp16 tables (3 bits) or tensor-core inputs (~3e-4 of the largest score)
        assert err < SCORE_TILES.tolerance(128, 3, heads), (heads, err)


@pytest.mark.parametrize("out_dtype", ("float16", "float32"))
def test_generated_wht_matches_cpu(out_dtype):
    rng = np.random.default_rng()
    x = rng.standard_normal((GENERATED_N, 128)).astype(np.float16)
    got = host(api.wht(cp.asarray(x), cp.dtype(out_dtype))).astype(np.float32)
    want = host(rotorq.wht(x.astype(np.float32))).astype(out_dtype).astype(np.float32)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("d,dtype", ((128, "float16"), (128, "float32"), (96, "float16")))
def test_tiled_kernels_match_cpu(d, dtype):
    """The tiled Hadamard quantize and WHT (rotorq.cuda.gen.quantize, gen.wht) against the
    CPU: WHT bit-identical; quantize codes equal but for rounding flips (float64 norms summed
    in another order), norms within 1e-6."""
    rng = np.random.default_rng()
    x = data(rng, (GENERATED_N + 77, d)).astype(dtype)
    xg = cp.asarray(x)
    tq = rotorq.TurboQuant(d, 3, norm_dtype="float32")
    k = tq._consts(cp)
    codes, norms, _, _ = api.quantize(xg, tq.rotation, k["boundaries"], k["centroids"], 3,
                                      False, None)
    ref = tq.quantize(x)
    same = (host(codes) == np.asarray(ref.codes)).all(axis=1)
    _record(f"tiled quantize d={d} {dtype}", same.size, int((~same).sum()))
    assert same.mean() > 0.999
    np.testing.assert_allclose(host(norms), np.asarray(ref.norms), rtol=1e-6)
    if d == 128:
        for out_dtype in ("float16", "float32"):
            got = host(api.wht(xg, cp.dtype(out_dtype))).astype(np.float32)
            want = host(rotorq.wht(x.astype(np.float32))).astype(out_dtype).astype(np.float32)
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("d,bits,dtype,norm_correction", (
    (128, 3, "float16", False), (128, 3, "float32", True), (64, 2, "float16", True),
    (96, 4, "float16", False), (256, 3, "float16", False), (100, 1, "float32", False)))
def test_tiled_rotor_quantize_matches_cpu(d, bits, dtype, norm_correction):
    """The tiled rotor quantize (rotorq.cuda.gen.quantize_rotor) against the CPU: codes equal but for
    rounding flips, norms within 2e-6 (float64 sums in another order)."""
    rng = np.random.default_rng()
    x = data(rng, (GENERATED_N + 77, d)).astype(dtype)
    tq = rotorq.TurboQuant(d, bits, rotation="rotor", norm_dtype="float32",
                           norm_correction=norm_correction)
    assert QUANTIZE_ROTOR.applies("rotor", d, tq.stored_dim, bits, x.dtype, 0)
    gpu = tq.quantize(cp.asarray(x))
    same = assert_quantized_match(tq, gpu, tq.quantize(x), f"tiled rotor quantize d={d} b={bits}")
    assert same.mean() > 0.999


@pytest.mark.parametrize("bits", (2, 3, 4))
@pytest.mark.parametrize("heads", (1, 8, 5, 11))
def test_tiled_scores_match_cpu(bits, heads):
    """The tiled score kernels (rotorq.cuda.gen.scores_one, scores_group) against the CPU and
    the unrolled kernel (rotorq.cuda.gen.scores_rows, launched directly): one query with
    float32 tables (2, 4 bits) within 2e-5, with float16 tables (3 bits) and 2+ query rows
    (tensor cores, fp16 inputs) within 1e-3 of the largest score; 2 key batches, 3 output
    batches (GQA-style maps), a partial last tile."""
    rng = np.random.default_rng()
    n = GENERATED_N + 77
    tq = rotorq.TurboQuant(128, bits, norm_dtype="float32")
    k = tq._consts(cp)
    x = data(rng, (2 * n, 128)).astype(np.float16)
    codes, norms, _, _ = api.quantize(cp.asarray(x), tq.rotation, k["boundaries"],
                                      k["centroids"], bits, False, None)
    codes, norms = codes.reshape(2, n, -1), norms.reshape(2, n)
    q = data(rng, (3, heads, 128))
    qrot = api.rotate(cp.asarray(q.reshape(-1, 128)), tq.rotation).reshape(3, heads, 128)
    qmap, kmap = cp.asarray([0, 1, 2]), cp.asarray([0, 1, 1])
    got = {True: host(api.scores(qrot, None, qmap, codes, norms, None, None, kmap,
                                 k["centroids"], bits, 0.0))}
    assert not isinstance(api._generated_score_kernel(128, bits, min(heads, 8))[0].spec,
                          SCORES_ROWS.ScoresRowsSpec)
    queries = SCORES_ROWS.score_queries(128, bits, heads)
    out = cp.full((3, heads, n), cp.nan, cp.float32)
    api._generated_scores(SCORES_ROWS.kernel(128, bits, queries), queries, qrot, qmap, codes,
                          norms, kmap, k["centroids"], out)
    got[False] = host(out)
    want = np.empty((3, heads, n), np.float32)
    importlib.import_module("rotorq.cpu.scores").scores_mse(
        host(qrot), host(qmap), host(codes), host(norms), host(kmap), tq.centroids, bits, want)
    scale = np.abs(want).max()
    err = np.abs(got[True] - want).max() / scale
    _record(f"tiled scores {bits}-bit {heads} queries", want.size, 0, max_rel_err=err)
    assert err < SCORE_TILES.tolerance(128, bits, heads), err
    assert np.abs(got[False] - want).max() / scale < 2e-5


@pytest.mark.parametrize("d,bits", ((384, 2), (384, 3), (512, 2), (512, 3), (512, 4)))
def test_one_query_large_dims(d, bits):
    """Head dims where the one-query kernel's shared memory needs smaller blocks or tables
    (rotorq.cuda.gen.score_tiles.one_query_config), and D = 512 at 4 bits, where no table
    fits and the unrolled kernel (rotorq.cuda.gen.scores_rows) scores: the public scores
    against the CPU. Keys are quantized on the CPU."""
    rng = np.random.default_rng()
    ts = SCORE_TILES
    rotation = "dense" if d == 384 else "hadamard"
    tq = rotorq.TurboQuant(d, bits, rotation=rotation, norm_dtype="float32")
    x = data(rng, (1, GENERATED_N // 2 + 809, d))
    hk = tq.quantize(x)
    origin = tq.quantize(cp.asarray(x[0, :2])).origin
    keys = rotorq.QuantizedVectors({k: cp.asarray(v) for k, v in hk.parts.items()}, hk.config,
                                   origin)
    q = data(rng, (2, 1, d))[1:]
    s = host(tq.scores(cp.asarray(q), keys))
    want = tq.scores(q, hk)
    err = np.abs(s - want).max() / np.abs(want).max()
    assert (ts.one_query_config(d, bits) is None) == (d == 512 and bits == 4)
    assert err < ts.tolerance(d, bits, 1), err


@pytest.mark.parametrize("d,bits,heads", ((64, 3, 8), (64, 3, 3), (128, 1, 1), (128, 1, 8)))
def test_rows_scores_match_cpu(d, bits, heads):
    """Shapes the tiled score kernels do not take (1-bit codes; 2–8 rows where D·bits is not
    a multiple of 128) go to the unrolled kernel (rotorq.cuda.gen.scores_rows): the public
    scores against the CPU within 2e-5 of the largest score."""
    rng = np.random.default_rng()
    tq = rotorq.TurboQuant(d, bits, norm_dtype="float32")
    assert isinstance(api._generated_score_kernel(d, bits, heads)[0].spec,
                      SCORES_ROWS.ScoresRowsSpec)
    x = data(rng, (1, GENERATED_N + 77, d))
    hk = tq.quantize(x)
    origin = tq.quantize(cp.asarray(x[0, :2])).origin
    keys = rotorq.QuantizedVectors({k: cp.asarray(v) for k, v in hk.parts.items()}, hk.config,
                                   origin)
    q = data(rng, (2, heads, d))[1:]
    s = host(tq.scores(cp.asarray(q), keys))
    want = tq.scores(q, hk)
    err = np.abs(s - want).max() / np.abs(want).max()
    _record(f"unrolled scores d={d} {bits}-bit {heads} queries", s.size, 0, max_rel_err=err)
    assert err < 2e-5, err
