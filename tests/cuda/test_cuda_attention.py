"""Fused decode attention on the GPU (:mod:`rotorq.cuda.attention`) against the CPU kernel.

- ``cudasim``: the general kernel, the split merge and the generated tensor-core kernel (its
  MMAs and warp exchanges emulated through shared memory) under Numba's simulator, on tiny
  fresh random inputs, outputs poisoned, against :func:`rotorq.cpu.attention.decode_attention`.
  Run with ``NUMBA_ENABLE_CUDASIM=1 python -m pytest -m cudasim tests/cuda``.
- ``cuda``: :class:`rotorq.KVCache` fed cupy arrays and torch CUDA tensors against the same
  cache fed numpy (GQA, causal, outliers, prod keys, the residual window), and the kernels at
  decode size against the CPU kernel.
"""

import importlib
import os

import numpy as np
import pytest

from helpers import exact_attention_case
from rotorq._ops import KeyBias, KeyPart, Partial, RotatedQuery, ValuePart

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
CPU_ATT = importlib.import_module("rotorq.cpu.attention")


def _pack(codes, bits):
    """LSB-first packing of uint8 codes (n, …, D) into bytes (n, …, ceil(D·bits/8))."""
    lead, d = codes.shape[:-1], codes.shape[-1]
    bitv = ((codes[..., :, None].astype(np.uint16) >> np.arange(bits)) & 1).astype(np.uint8)
    bitv = bitv.reshape(lead + (d * bits,))
    pad = (-bitv.shape[-1]) % 8
    if pad:
        bitv = np.concatenate([bitv, np.zeros(lead + (pad,), np.uint8)], axis=-1)
    return np.packbits(bitv, axis=-1, bitorder="little")


def make_case(rng, *, n_bh=2, n_rows=3, n_q=1, dk=(16, 0), dv=(16, 0), kbits=(3, 2),
              vbits=(3, 4), m=(0, 0), n_keys=50, cap=None, causal_offset=None, n_freq=0,
              pos0=0):
    """Random arguments of the decode-attention contract (CPU dtypes), plus the merged
    reference ``(accs, m, l)`` computed by the CPU kernel."""
    cap = cap or n_keys + 3
    f32 = np.float32
    scale = f32(0.4)

    def cent(bits):
        return np.sort(rng.standard_normal(1 << bits)).astype(f32)

    def norms(shape):
        return (rng.random(shape) * 2 + 0.1).astype(np.float16)

    q, qs, keys, vals = [], [], [], []
    for p in range(2):
        d = dk[p]
        q.append((rng.standard_normal((n_bh, n_rows, d)) * scale).astype(f32))
        qs.append((rng.standard_normal((n_bh, n_rows, m[p])) * scale).astype(f32))
        b = kbits[p]
        codes = rng.integers(0, 1 << b, (n_bh, cap, max(d, 1))).astype(np.uint8)
        kc = _pack(codes, b)
        signs = rng.integers(0, 2, (n_bh, cap, max(m[p], 1))).astype(np.uint8)
        ks = _pack(signs, 1)
        keys.append((kc, norms((n_bh, cap)), ks, norms((n_bh, cap)), cent(b), b,
                     float(np.sqrt(np.pi / 2) / max(m[p], 1)) if m[p] else 0.0))
        b = vbits[p]
        d = dv[p]
        codes = rng.integers(0, 1 << b, (n_bh, cap, max(d, 1))).astype(np.uint8)
        vals.append((_pack(codes, b), norms((n_bh, cap)), cent(b), b))
    if causal_offset is None:
        causal_offset = n_keys
    bias = ((rng.standard_normal((n_bh, n_rows, n_freq)) * scale).astype(f32),
            (rng.standard_normal((n_bh, n_rows, n_freq)) * scale).astype(f32),
            10000.0 ** -(np.arange(n_freq) / max(n_freq, 1)), pos0)
    return dict(q=q, qs=qs, keys=keys, vals=vals, n_keys=n_keys, n_q=n_q,
                causal_offset=causal_offset, n_rows=n_rows, n_bh=n_bh, dv=dv, bias=bias)


def flat_args(case, *, uint16_norms):
    """The contract's argument list (without outputs)."""
    out = [case["q"][0], case["q"][1], case["qs"][0], case["qs"][1], *case["bias"]]
    for kc, kn, ks, kg, cent, b, sc in case["keys"]:
        if uint16_norms:
            kn, kg = kn.view(np.uint16), kg.view(np.uint16)
        out += [kc, kn, ks, kg, cent, b, sc]
    for vc, vn, cent, b in case["vals"]:
        out += [vc, vn.view(np.uint16) if uint16_norms else vn, cent, b]
    return out + [case["n_keys"], case["n_q"], case["causal_offset"]]


def outputs(case, n_split, fill=0.0):
    n_bh, n_rows, dv = case["n_bh"], case["n_rows"], case["dv"]
    return [np.full((n_bh, n_split, n_rows, dv[0]), fill, np.float32),
            np.full((n_bh, n_split, n_rows, dv[1]), fill, np.float32),
            np.full((n_bh, n_split, n_rows), fill, np.float32),
            np.full((n_bh, n_split, n_rows), fill, np.float32)]


def cpu_partials(case, chunk):
    n_split = max(1, -(-case["n_keys"] // chunk))
    outs = outputs(case, n_split)
    CPU_ATT.decode_attention(0, case["n_bh"] * n_split, *flat_args(case, uint16_norms=True),
                             chunk, *outs)
    return outs


def merged(outs):
    acc0, acc1, mx, sm = outs
    m = mx.max(axis=1)
    safe = np.where(np.isfinite(m), m, 0)
    w = np.exp(mx - safe[:, None, :])
    return (np.einsum("bsr,bsrd->brd", w, acc0), np.einsum("bsr,bsrd->brd", w, acc1),
            m, (w * sm).sum(axis=1))


def assert_merged_close(got, want, rtol):
    """Merged outputs ``acc / l`` within ``rtol`` of the row's accumulator norm, and the
    log-normalizers ``m + log l`` (``m`` is a reference, not necessarily the maximum: the
    tensor-core kernel's lazy rescaling may keep it above)."""
    g0, g1, gm, gl = got
    w0, w1, wm, wl = want
    np.testing.assert_array_equal(np.isfinite(gm), np.isfinite(wm))
    fin = np.isfinite(wm)
    np.testing.assert_allclose(gm[fin] + np.log(gl[fin]), wm[fin] + np.log(wl[fin]),
                               rtol=rtol, atol=rtol)
    for g, w in ((g0, w0), (g1, w1)):
        if w.size == 0:
            continue
        go = g / np.where(gl > 0, gl, 1)[..., None]
        wo = w / np.where(wl > 0, wl, 1)[..., None]
        scale = np.linalg.norm(wo, axis=-1, keepdims=True) + 1e-30
        err = np.abs(go - wo) / scale
        assert err.max() <= rtol, f"max relative error {err.max():.3g} > {rtol}"


# ------------------------------------------------------------------------------ simulator

SIM_CASES = {
    "mse-1part": dict(),
    "gqa-causal": dict(n_rows=6, n_q=2, causal_offset=37),
    "rows-over-8": dict(n_rows=11, n_keys=21),
    "two-parts-prod": dict(dk=(16, 5), dv=(16, 7), m=(8, 4), n_keys=40),
    "prod-4bit": dict(kbits=(4, 2), vbits=(2, 4), m=(16, 0), dk=(8, 0), dv=(12, 0)),
    "all-masked-split": dict(n_rows=2, n_q=2, causal_offset=3, n_keys=45),
    "rope-bias": dict(n_rows=5, n_q=1, n_freq=4, pos0=70001, n_keys=40),
}


@pytest.mark.cudasim
@pytest.mark.skipif(not SIMULATOR, reason="simulator test: NUMBA_ENABLE_CUDASIM=1 -m cudasim")
@pytest.mark.parametrize("name", sorted(SIM_CASES))
def test_sim_general_kernel_matches_cpu(rng, name):
    att = importlib.import_module("rotorq.cuda.attention")
    case = make_case(rng, **SIM_CASES[name])
    chunk, threads = 16, 4
    want = cpu_partials(case, chunk)
    n_split = len(range(0, case["n_keys"], chunk))
    got = outputs(case, n_split, fill=np.nan)
    dk, m, dv = [a.shape[2] for a in case["q"]], [a.shape[2] for a in case["qs"]], case["dv"]
    levels = 0
    shared = 4 * att.shared_floats(threads, *dk, *m, *dv, levels, case["bias"][0].shape[2])
    att.decode_attention[(n_split, case["n_bh"]), threads, 0, shared](
        *flat_args(case, uint16_norms=False), chunk, *got)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5)
    # the device merge
    n_bh, n_rows = case["n_bh"], case["n_rows"]
    mo = [np.full((n_bh, n_rows, dv[0]), np.nan, np.float32),
          np.full((n_bh, n_rows, dv[1]), np.nan, np.float32),
          np.full((n_bh, n_rows), np.nan, np.float32), np.full((n_bh, n_rows), np.nan, np.float32)]
    nx, ny = 32, 3  # a warp of columns (the device's shuffles), fewer rows than splits
    grid = (max(1, -(-(dv[0] + dv[1]) // nx)), n_rows, n_bh)
    merge = importlib.import_module("rotorq.cuda.merge")
    merge.merge_splits[grid, (nx, ny), 0, 4 * merge.merge_shared_floats(n_split, nx * ny)](
        got[2], got[3], got[0], got[1], *mo)
    ref = merged(want)
    for g, w in zip(mo, ref, strict=True):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5)


MMA_CASES = {
    "k3v3-gqa8": dict(n_rows=8, kbits=(3, 2), vbits=(3, 4), n_keys=150),
    "k4v2-causal": dict(n_rows=6, n_q=3, kbits=(4, 2), vbits=(2, 4), n_keys=140,
                        causal_offset=97),
    "k2v4-rows3": dict(n_rows=3, kbits=(2, 2), vbits=(4, 4), n_keys=70),
    # the RoPE-aware key offset: the per-key term (CPU twin) added by the MMA kernel, against
    # the CPU kernel, which computes it inside its score loop
    "k3v3-rope-bias": dict(n_rows=6, n_q=2, kbits=(3, 2), vbits=(3, 4), n_keys=140,
                           causal_offset=120, n_freq=64, pos0=5000),
}
MMA_RTOL = 5e-3  # fp16 MMA inputs (queries, centroids, p·ν), fp32 accumulation


@pytest.mark.cudasim
@pytest.mark.skipif(not SIMULATOR, reason="simulator test: NUMBA_ENABLE_CUDASIM=1 -m cudasim")
@pytest.mark.parametrize("tiled", [False, True], ids=["rows", "tiles"])
@pytest.mark.parametrize("name", sorted(MMA_CASES))
def test_sim_mma_kernel_matches_cpu(rng, name, tiled):
    """The tensor-core kernel against the CPU kernel, reading the row layout or the tile
    layout of :mod:`rotorq.tiles` (a partial last tile: its other slots hold other codes,
    masked). On tiles, splits of 192 tokens: 2–3 steps per warp, through the loop body's
    unrolled copies and their exit between copies."""
    mma = importlib.import_module("rotorq.cuda.gen.attention")
    case = make_case(rng, n_bh=2, dk=(128, 0), dv=(128, 0), **MMA_CASES[name])
    chunk = 192 if tiled and name != "k2v4-rows3" else 64
    want = cpu_partials(case, chunk)
    n_split = len(range(0, case["n_keys"], chunk))
    got = outputs(case, n_split, fill=np.nan)
    kc, kn, _, _, kcent, kb, _ = case["keys"][0]
    vc, vn, vcent, vb = case["vals"][0]
    cfg = mma.config(128, kb, 128, vb, kc.shape[-1], vc.shape[-1])
    assert cfg is not None
    ba, bb, freqs, pos0 = case["bias"]
    kbias = ()
    if ba.shape[2]:
        kb = np.zeros((case["n_bh"], case["n_keys"], 8), np.float32)
        CPU_ATT.key_bias_scores(ba, bb, freqs, pos0, case["n_keys"], kb)
        kbias = (kb.reshape(case["n_bh"], -1),)
    kern = mma.kernel(*cfg, bias=bool(kbias), tiled=tiled)
    n_bh = case["n_bh"]
    if tiled:
        from rotorq import tiles
        n, cap = case["n_keys"], -(-case["n_keys"] // 16) * 16
        bufs = []
        for kind, codes, nrm, bits in (("keys", kc, kn, cfg[1]), ("values", vc, vn, cfg[3])):
            tc = rng.integers(0, 256, (n_bh, cap, codes.shape[2]), dtype=np.uint8)
            tn = rng.standard_normal((n_bh, cap)).astype(np.float16)
            tiles.store(np, tc, tn, codes[:, :n], nrm[:, :n], 0, kind, 128, bits)
            bufs += [tc.view(np.uint32).reshape(-1), tn.view(np.uint32).reshape(-1)]
        args = (bufs[0], bufs[1], kcent, bufs[2], bufs[3], vcent)
    else:
        args = (kc.view(np.uint32).reshape(n_bh, -1), kn, kcent,
                vc.view(np.uint16).reshape(n_bh, -1), vn, vcent)
    kern[(n_split, n_bh), 32 * mma.WARPS](
        case["q"][0], *args, *kbias,
        case["n_keys"], case["n_q"], case["causal_offset"], chunk, got[0], got[2], got[3])
    gm = merged([got[0], got[1], got[2], got[3]])
    wm = merged(want)
    assert_merged_close(gm, wm, MMA_RTOL)
    fin = np.isfinite(want[2])  # each split's log-normalizer
    np.testing.assert_allclose(got[2][fin] + np.log(got[3][fin]),
                               want[2][fin] + np.log(want[3][fin]), rtol=MMA_RTOL,
                               atol=MMA_RTOL)


@pytest.mark.cudasim
@pytest.mark.skipif(not SIMULATOR, reason="simulator test: NUMBA_ENABLE_CUDASIM=1 -m cudasim")
def test_sim_key_bias_kernel_matches_cpu(rng):
    """The per-key RoPE offset term on the device against its CPU twin, 5 rows (the unrolled
    accumulators of rows 5–7 are not stored), positions past 2^20 (angle reduction)."""
    att = importlib.import_module("rotorq.cuda.attention")
    case = make_case(rng, n_bh=2, n_rows=5, n_freq=6, pos0=(1 << 20) + 3, n_keys=37)
    ba, bb, freqs, pos0 = case["bias"]
    want = np.full((2, 40, 6), np.nan, np.float32)
    CPU_ATT.key_bias_scores(ba, bb, freqs, pos0, 37, want)
    got = np.full_like(want, np.nan)
    threads = 16
    att.key_bias_scores[(-(-37 // threads), 2), threads, 0, 8 * 5 * 6](ba, bb, freqs, pos0, 37, got)
    np.testing.assert_allclose(got[:, :37, :5], want[:, :37, :5], rtol=1e-5, atol=1e-5)
    assert np.isnan(got[:, 37:]).all() and np.isnan(got[..., 5:]).all()  # nothing else written


def key_bias_tolerance(ba, bb):
    """Per ``(bh, row)`` bound of the tensor-core key term's error against the CPU twin:
    float16 twiddles and coefficients, ``≤ 2⁻¹¹`` relative each, summed over the
    frequencies: ``1.2e-3 · Σ_f |(A_f, B_f)|`` (a sign, row or position slip is of order
    ``Σ_f |(A_f, B_f)|`` itself)."""
    return 1.2e-3 * np.hypot(ba.astype(np.float64), bb.astype(np.float64)).sum(axis=2)


def check_key_bias(got, want, ba, bb, n_keys):
    """``got`` (BH, ≥ n_keys, 8) within :func:`key_bias_tolerance` of ``want`` for every
    key and row ``r < R``, RMS error under 2e-3 of the RMS term per row, rows past R zero,
    and nothing written past ``n_keys``."""
    n_rows = ba.shape[1]
    g64 = got[:, :n_keys, :n_rows].astype(np.float64)
    w64 = want[:, :n_keys, :n_rows].astype(np.float64)
    err = np.abs(g64 - w64)
    tol = key_bias_tolerance(ba, bb)[:, None, :]
    assert np.isfinite(g64).all()
    assert (err <= tol).all(), float((err / tol).max())
    rms_err = np.sqrt((err ** 2).mean(axis=1))
    rms = np.sqrt((w64 ** 2).mean(axis=1))
    assert (rms_err <= 2e-3 * rms).all(), float((rms_err / rms).max())
    assert (got[:, :n_keys, n_rows:] == 0).all()
    assert np.isnan(got[:, n_keys:]).all()


@pytest.mark.cudasim
@pytest.mark.skipif(not SIMULATOR, reason="simulator test: NUMBA_ENABLE_CUDASIM=1 -m cudasim")
@pytest.mark.parametrize("n_rows,n_freq,n_keys,tiles", [(5, 6, 37, 2), (8, 64, 40, 1),
                                                        (3, 20, 75, 3)])
def test_sim_key_bias_mma_matches_cpu(rng, n_rows, n_freq, n_keys, tiles):
    """The tensor-core key term against the CPU twin: padded frequencies (6, 20), rows past
    R (5, 3), a short last tile, more than one tile per warp (coefficients rotated from tile
    to tile), positions past 2^20, rows 10^4 and 10^-4 times the rest (per-row scaling)."""
    key_bias = importlib.import_module("rotorq.cuda.gen.key_bias")
    case = make_case(rng, n_bh=2, n_rows=n_rows, n_freq=n_freq, pos0=(1 << 20) + 3,
                     n_keys=n_keys)
    ba, bb, freqs, pos0 = case["bias"]
    for a in (ba, bb):
        a[:, 0] *= 1e4
        a[:, -1] *= 1e-4
    want = np.full((2, n_keys + 3, 8), np.nan, np.float32)
    CPU_ATT.key_bias_scores(ba, bb, freqs, pos0, n_keys, want)
    got = np.full_like(want, np.nan)
    n_tiles = -(-n_keys // 16)
    warps = -(-n_tiles // tiles)
    kern = key_bias.kernel(n_freq)
    kern[(-(-warps // key_bias.BIAS_WARPS), 2), 32 * key_bias.BIAS_WARPS](
        ba, bb, freqs, pos0, n_keys, tiles, got.reshape(-1), n_keys + 3)
    check_key_bias(got, want, ba, bb, n_keys)


def test_key_bias_kernel_rejects_frequency_counts():
    if SIMULATOR or _gpu() is None:
        pytest.importorskip("numba.cuda")
    key_bias = importlib.import_module("rotorq.cuda.gen.key_bias")
    for n in (0, 65):
        with pytest.raises(ValueError, match="frequencies"):
            key_bias.spec(n)


# ------------------------------------------------------------------------------ real GPU

def _gpu():
    if SIMULATOR:
        return None
    try:
        import cupy as cp
        return cp if cp.cuda.runtime.getDeviceCount() else None
    except Exception:  # no cupy, no driver, no device
        return None


_REPORT: dict = {}


@pytest.fixture(scope="module")
def cp():
    mod = _gpu()
    if mod is None:
        pytest.skip("needs a CUDA GPU and cupy")
    yield mod
    path = os.environ.get("ROTORQ_ATTENTION_REPORT")
    if path and _REPORT:
        import json
        with open(path, "w") as f:
            json.dump(_REPORT, f, indent=1, sort_keys=True)


@pytest.fixture(params=[True, False], ids=["fast", "general"])
def fast_path(request, monkeypatch, cp):
    api = importlib.import_module("rotorq.cuda.api")
    monkeypatch.setattr(api, "ATTENTION_FAST", request.param)
    return request.param


def _host(a):
    if hasattr(a, "get"):
        return a.get()
    if hasattr(a, "detach"):
        return a.detach().cpu().numpy()
    return np.asarray(a)


CACHE_CASES = {
    # name: (KVCache kwargs, q heads, kv heads, d, T, n_q, causal)
    "gqa8-d128-k3v3": (dict(key_bits=3, value_bits=3, residual_tokens=64), 32, 4, 128, 700, 1,
                       False),
    "gqa4-d128-causal": (dict(key_bits=4, value_bits=3, residual_tokens=16), 8, 2, 128, 500, 2,
                         True),
    "gqa4-d64": (dict(key_bits=4, value_bits=3, residual_tokens=32), 8, 2, 64, 400, 1, False),
    "outliers": (dict(key_bits=3, value_bits=2, outlier_channels=4, residual_tokens=32), 8, 2,
                 68, 300, 3, True),
    "prod-keys": (dict(key_bits=4, value_bits=3, key_mode="prod", residual_tokens=32), 8, 2,
                  128, 300, 1, False),
    "window-only": (dict(key_bits=3, value_bits=3, residual_tokens=128), 8, 2, 128, 100, 1,
                    False),
    "rope-scales-sinks": (dict(key_bits=3, value_bits=2, rope_base=1e5, sink_tokens=4,
                               key_scales=np.linspace(0.5, 2.0, 2 * 128).reshape(2, 128)),
                          8, 2, 128, 900, 2, True),
    "legacy-float-window": (dict(key_bits=4, value_bits=3, residual_tokens=40, sink_tokens=0,
                                 key_offset=False, residual_bits=None), 8, 2, 128, 600, 1, False),
    # 16 rows per KV head: the tensor-core kernel in two groups of rows
    "gqa8-nq2-row-groups": (dict(key_bits=3, value_bits=3, residual_tokens=32), 16, 2, 128,
                                 400, 2, True),
}


def _rel_err(got, want):
    want = np.asarray(want, np.float64)
    err = np.abs(np.asarray(got, np.float64) - want)
    return float((err / (np.linalg.norm(want, axis=-1, keepdims=True) + 1e-30)).max())


@pytest.mark.cuda
@pytest.mark.parametrize("framework", ["cupy", "torch"])
@pytest.mark.parametrize("name", sorted(CACHE_CASES))
def test_kvcache_gpu_matches_numpy(rng, cp, fast_path, name, framework):
    import rotorq
    kw, hq, hk, d, total, n_q, causal = CACHE_CASES[name]
    k = rng.standard_normal((hk, total, d)).astype(np.float32)
    v = rng.standard_normal((hk, total, d)).astype(np.float32)
    if "outlier" in name:
        k[:, :, [3, 40]] *= 10.0
    q = rng.standard_normal((hq, n_q, d)).astype(np.float32)
    ref = rotorq.KVCache(hk, d, **kw)
    if framework == "torch":
        torch = pytest.importorskip("torch")

        def dev(a):
            return torch.from_numpy(a).cuda()
    else:
        def dev(a):
            return cp.asarray(a)
    gpu = rotorq.KVCache(hk, d, **kw)
    split = total - 7
    for cache, conv in ((ref, np.asarray), (gpu, dev)):
        cache.append(conv(k[:, :split]), conv(v[:, :split]))
        for i in range(split, total):  # decode: one token at a time
            cache.append(conv(k[:, i:i + 1]), conv(v[:, i:i + 1]))
    assert len(gpu) == len(ref) and gpu.compressed_tokens == ref.compressed_tokens
    want = ref.attend(q, causal=causal)
    got = gpu.attend(dev(q), causal=causal)
    if framework == "torch":
        assert got.is_cuda
    else:
        assert isinstance(got, cp.ndarray)
    err = _rel_err(_host(got), want)
    _REPORT[f"{name}-{framework}-{'fast' if fast_path else 'general'}"] = err
    # GPU quantization may flip rare codes at rounding boundaries (FMA), the fast kernel
    # rounds its MMA inputs to fp16
    assert err < (1e-2 if fast_path else 5e-3), err
    sg = _host(gpu.scores(dev(q)))
    np.testing.assert_allclose(sg, ref.scores(q), rtol=1e-2, atol=1e-2 * np.abs(sg).max())


@pytest.mark.cuda
@pytest.mark.parametrize("kw", [dict(), dict(key_bits=3, value_bits=3, rotation="rotor")])
def test_kvcache_gpu_refused_decode_steps_store_nothing(rng, cp, kw):
    """On the GPU, decode steps check the input and the window's norms with one sync after
    quantizing (NaN and Inf go through the kernels): refused steps raise the input's error
    and leave the cache (tile layout included) answering exactly as before."""
    import rotorq
    hk, hq, d, t = 2, 8, 128, 300
    k = rng.standard_normal((hk, t + 12, d)).astype(np.float32)
    v = rng.standard_normal((hk, t + 12, d)).astype(np.float32)
    q = cp.asarray(rng.standard_normal((hq, 1, d)).astype(np.float32))
    kw = dict(residual_tokens=16, block_tokens=8) | kw
    cache, clean = rotorq.KVCache(hk, d, **kw), rotorq.KVCache(hk, d, **kw)
    for c in (cache, clean):
        c.append(cp.asarray(k[:, :t]), cp.asarray(v[:, :t]))
    nan_k, inf_v = k[:, t:t + 1].copy(), v[:, t:t + 1].copy()
    nan_k[1, 0, 9] = np.nan
    inf_v[0, 0, 2] = np.inf
    big = k[:, t:t + 1] * np.float32(1e5)
    for i in range(12):
        good_k, good_v = cp.asarray(k[:, t + i:t + i + 1]), cp.asarray(v[:, t + i:t + i + 1])
        before = cp.asnumpy(cache.attend(q))
        for bad_k, bad_v, msg in ((cp.asarray(nan_k), good_v, "keys contains NaN or Inf"),
                                  (good_k, cp.asarray(inf_v), "values contains NaN or Inf"),
                                  (cp.asarray(big), good_v, "beyond float16")):
            with pytest.raises(ValueError, match=msg):
                cache.append(bad_k, bad_v)
            assert len(cache) == t + i
            np.testing.assert_array_equal(cp.asnumpy(cache.attend(q)), before)
        for c in (cache, clean):
            c.append(good_k, good_v)
        np.testing.assert_array_equal(cp.asnumpy(cache.attend(q)), cp.asnumpy(clean.attend(q)))
    assert cache.compressed_tokens == clean.compressed_tokens > t - 16


@pytest.mark.cuda
@pytest.mark.parametrize("n_keys,n_rows,n_q,causal,n_freq", [
    (70_001, 8, 1, False, 0), (9_000, 8, 2, True, 0), (3_000, 5, 1, False, 0),
    (20_000, 8, 1, False, 64), (5_000, 6, 3, True, 64)])
def test_backend_kernels_match_cpu_kernel(rng, cp, fast_path, n_keys, n_rows, n_q, causal,
                                          n_freq):
    """The backend's decode_attention on random packed codes at decode sizes vs the CPU's
    (``n_freq > 0``: with the RoPE-aware key-offset bias: the per-key term, then the
    tensor-core kernel; the general kernel computes it inside)."""
    import rotorq.cuda as gpu
    from rotorq import cpu
    case = make_case(rng, n_bh=4, n_rows=n_rows, n_q=n_q, dk=(128, 0), dv=(128, 0),
                     kbits=(3, 2), vbits=(3, 4), n_keys=n_keys,
                     causal_offset=n_keys - n_q if causal else None, n_freq=n_freq, pos0=3)
    kc, kn, _, _, kcent, kb, _ = case["keys"][0]
    vc, vn, vcent, vb = case["vals"][0]
    q = case["q"][0]
    args = (n_keys, n_q, case["causal_offset"])
    c = cp.asarray
    ba, bb, freqs, pos0 = case["bias"]
    bias_cpu = KeyBias(ba, bb, freqs, pos0) if n_freq else None
    bias_gpu = KeyBias(c(ba), c(bb), c(freqs), pos0) if n_freq else None
    want = cpu.decode_attention((RotatedQuery(q),), (KeyPart(kc, kn, kcent, kb),),
                                (ValuePart(vc, vn, vcent, vb, 128),), *args, key_bias=bias_cpu)
    got = gpu.decode_attention((RotatedQuery(c(q)),), (KeyPart(c(kc), c(kn), c(kcent), kb),),
                               (ValuePart(c(vc), c(vn), c(vcent), vb, 128),), *args,
                               key_bias=bias_gpu)
    accs_w, m_w, l_w = want.accs, want.max, want.sum
    accs_g, m_g, l_g = got.accs, got.max, got.sum
    # m alone moves with the score rounding (fp16 MMA inputs) and with lazy rescaling
    # (RESCALE_SLACK of rotorq.cuda.gen.attention); m + log l does not
    np.testing.assert_allclose(m_g.get() + np.log(l_g.get()), m_w + np.log(l_w),
                               rtol=2e-3, atol=2e-3)
    out_w = accs_w[0] / l_w[..., None]
    out_g = accs_g[0].get() / l_g.get()[..., None]
    err = _rel_err(out_g, out_w)
    fast = fast_path  # with n_freq: the per-key term, then the tensor-core kernel
    _REPORT[f"kernel-T{n_keys}-R{n_rows}-nq{n_q}-f{n_freq}-{'fast' if fast else 'general'}"] = err
    assert err < (MMA_RTOL if fast else 1e-4), err


@pytest.mark.cuda
@pytest.mark.parametrize("n_keys,n_rows,n_q,causal,n_freq,heads", [
    (70_001, 8, 1, False, 0, None), (9_000, 6, 2, True, 64, None), (9_000, 6, 2, True, 64, 3),
    (1_000, 12, 1, False, 0, None), (2_000, 18, 3, True, 0, None),
    (3_000, 24, 12, True, 64, None)])
def test_backend_tiles_match_cpu_rows(rng, cp, monkeypatch, n_keys, n_rows, n_q, causal,
                                      n_freq, heads):
    """decode_attention on codes in the tile layout (rotorq.tiles; the tensor-core kernel
    reads them in place; past 8 rows in groups of whole heads, or of 8 queries of one head)
    against the CPU on the row layout. ``heads``: the kernel's 32-bit word limit lowered so
    that it launches per group of that many heads (of 4)."""
    import rotorq.cuda as gpu
    from rotorq import cpu, tiles
    case = make_case(rng, n_bh=4, n_rows=n_rows, n_q=n_q, dk=(128, 0), dv=(128, 0),
                     kbits=(3, 2), vbits=(4, 4), n_keys=n_keys,
                     causal_offset=n_keys - n_q if causal else None, n_freq=n_freq, pos0=3)
    kc, kn, _, _, kcent, kb, _ = case["keys"][0]
    vc, vn, vcent, vb = case["vals"][0]
    cap = -(-n_keys // 16) * 16 + 32
    tiled = []
    for kind, codes, nrm, bits in (("keys", kc, kn, kb), ("values", vc, vn, vb)):
        tc = np.zeros((4, cap, codes.shape[2]), np.uint8)
        tn = np.zeros((4, cap), np.float16)
        tiles.store(np, tc, tn, codes[:, :n_keys], nrm[:, :n_keys], 0, kind, 128, bits)
        tiled.append((cp.asarray(tc), cp.asarray(tn)))
    if heads:  # the value codes (4 bits) are the largest array: cap·16 words a head
        monkeypatch.setattr(importlib.import_module("rotorq.cuda.api"), "TILED_MAX_WORDS",
                            heads * cap * 16 + 15)
    q = case["q"][0]
    args = (n_keys, n_q, case["causal_offset"])
    ba, bb, freqs, pos0 = case["bias"]
    bias_cpu = KeyBias(ba, bb, freqs, pos0) if n_freq else None
    bias_gpu = KeyBias(cp.asarray(ba), cp.asarray(bb), cp.asarray(freqs), pos0) if n_freq else None
    want = cpu.decode_attention((RotatedQuery(q),), (KeyPart(kc, kn, kcent, kb),),
                                (ValuePart(vc, vn, vcent, vb, 128),), *args, key_bias=bias_cpu)
    got = gpu.decode_attention((RotatedQuery(cp.asarray(q)),),
                               (KeyPart(*tiled[0], cp.asarray(kcent), kb),),
                               (ValuePart(*tiled[1], cp.asarray(vcent), vb, 128),), *args,
                               key_bias=bias_gpu, layout="tiles")
    out_w = want.accs[0] / want.sum[..., None]
    out_g = got.accs[0].get() / got.sum.get()[..., None]
    err = _rel_err(out_g, out_w)
    _REPORT[f"tiles-T{n_keys}-R{n_rows}-nq{n_q}-f{n_freq}-h{heads}"] = err
    assert err < MMA_RTOL, err
    np.testing.assert_allclose(got[1].get() + np.log(got[2].get()), want[1] + np.log(want[2]),
                               rtol=2e-3, atol=2e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("mma", [True, False], ids=["mma", "scalar"])
@pytest.mark.parametrize("n_keys,n_rows,n_freq,pos0", [
    (100_003, 8, 64, 3), (5_000, 6, 40, (1 << 20) + 7), (700, 8, 64, 0), (3_001, 8, 80, 11)])
def test_key_bias_gpu_matches_cpu(rng, cp, monkeypatch, mma, n_keys, n_rows, n_freq, pos0):
    """The per-key RoPE offset term of the tensor-core path against the CPU twin: the MMA
    kernel (≤ 64 frequencies; 80 goes to the scalar kernel) and the scalar kernel."""
    api = importlib.import_module("rotorq.cuda.api")
    monkeypatch.setattr(api, "KEY_BIAS_MMA", mma)
    n_bh = 4
    ba = rng.standard_normal((n_bh, n_rows, n_freq)).astype(np.float32)
    bb = rng.standard_normal((n_bh, n_rows, n_freq)).astype(np.float32)
    ba[1] *= 300.0  # a head of larger coefficients: the per-row scaling
    freqs = 10000.0 ** -(np.arange(n_freq) / n_freq)
    want = np.full((n_bh, n_keys + 5, 8), np.nan, np.float32)
    CPU_ATT.key_bias_scores(ba, bb, freqs, pos0, n_keys, want)
    got = api._key_bias_scores((cp.asarray(ba), cp.asarray(bb), cp.asarray(freqs), pos0),
                               n_bh, n_rows, n_keys).get()
    assert got.shape == (n_bh, n_keys, 8)
    full = np.full_like(want, np.nan)
    full[:, :n_keys] = got
    if mma and n_freq <= 64:
        check_key_bias(full, want, ba, bb, n_keys)
    else:
        w = want[:, :n_keys, :n_rows]
        np.testing.assert_allclose(got[..., :n_rows], w, rtol=1e-4, atol=1e-5 * np.abs(w).max())
        assert (got[..., n_rows:] == 0).all()
    w = want[:, :n_keys, :n_rows]
    err = float(np.sqrt(((got[..., :n_rows] - w) ** 2).mean() / (w ** 2).mean()))
    _REPORT[f"key-bias-T{n_keys}-R{n_rows}-F{n_freq}-{'mma' if mma else 'scalar'}"] = err


# ------------------------------------------------------------------ compile only (NVVM)

@pytest.mark.skipif(SIMULATOR, reason="compile tests need the real numba.cuda")
@pytest.mark.parametrize("tiled", [False, True], ids=["rows", "tiles"])
@pytest.mark.parametrize("kbits,vbits", [(3, 3), (4, 2)])
def test_mma_kernel_compiles_to_mma_ptx(monkeypatch, kbits, vbits, tiled):
    """The tensor-core kernel (inline-PTX MMA, 32-bit intrinsics) compiles for sm_90."""
    import types

    import numba.cuda.dispatcher as dispatcher
    from numba import cuda, float32

    from rotorq.cuda._jit import kernel_signature

    def probe(a):
        a[0] = 1.0

    try:
        cuda.compile_ptx(probe, (float32[::1],), cc=(9, 0))
    except Exception as exc:  # missing NVVM / NVRTC
        pytest.skip(f"NVVM/NVRTC unavailable ({type(exc).__name__}: {exc})")
    monkeypatch.setattr(dispatcher, "get_current_device",
                        lambda: types.SimpleNamespace(compute_capability=(9, 0)))
    mma = importlib.import_module("rotorq.cuda.gen.attention")
    f32, bh, r, d, cap = np.float32, 2, 8, 128, 4
    cap = 16 if tiled else cap
    norms = np.zeros(bh * cap // 2, np.uint32) if tiled else np.zeros((bh, cap), np.float16)
    vcodes = (np.zeros(bh * cap * d * vbits // 32, np.uint32) if tiled
              else np.zeros((bh, cap * d * vbits // 16), np.uint16))
    kcodes = np.zeros(bh * cap * d * kbits // 32, np.uint32)
    args = (np.zeros((bh, r, d), f32), kcodes if tiled else kcodes.reshape(bh, -1),
            norms, np.zeros(1 << kbits, f32), vcodes, norms,
            np.zeros(1 << vbits, f32), 1, 1, 1, 1, np.zeros((bh, 1, r, d), f32),
            np.zeros((bh, 1, r), f32), np.zeros((bh, 1, r), f32))
    kern = mma.kernel(*mma.config(d, kbits, d, vbits, d * kbits // 8, d * vbits // 8),
                      tiled=tiled)
    ptx, _ = cuda.compile_ptx(kern.py_func, kernel_signature(args), cc=(9, 0))
    copies = kern.spec.prefetch + 1 if tiled else 1  # loop body copies (unmasked steps)
    copies += 1  # and the masked copy for the last steps
    assert ptx.count("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32") == 16 * copies
    assert ".local" not in ptx  # no local-memory arrays


# ------------------------------------------------------------ window part (exact tokens)

@pytest.mark.cudasim
@pytest.mark.skipif(not SIMULATOR, reason="simulator test: NUMBA_ENABLE_CUDASIM=1 -m cudasim")
@pytest.mark.parametrize("causal,partial", [(False, True), (True, True), (True, False)])
def test_sim_exact_kernel_matches_cpu(rng, causal, partial):
    merge = importlib.import_module("rotorq.cuda.merge")
    from rotorq import cpu
    q, ke, ve, pos, part = exact_attention_case(rng, 2, 3, 6, 5, 19, partial, 4 * 19 + 50)
    n_q, offset = (1, 40) if causal else (1, 0)
    want = cpu.exact_attention_twin(q, ke, ve, pos, 0.4, n_q, offset, causal,
                                    Partial((part[0],), part[1], part[2]) if part else None)
    got = np.full_like(want, np.nan)
    ph = np.zeros((1, 1, 1), np.float32)
    acc, m, lsum = part if part else (ph, ph[0], ph[0])
    threads = 4  # fewer threads than tokens and than value columns: the strides
    merge.exact_attention[(3, 2), threads, 0, 4 * merge.exact_shared_floats(19, threads)](
        q, ke, ve, pos, 19, 0.4, n_q, offset, int(causal), acc, m, lsum, int(bool(part)), got)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())


@pytest.mark.cuda
@pytest.mark.parametrize("n_e,prefix,partial,causal", [
    (130, False, True, False), (300, True, True, True), (64, True, False, False),
    (13_000, False, True, False)])  # past one block's shared memory: array operations
def test_exact_attention_gpu_matches_cpu(rng, cp, n_e, prefix, partial, causal):
    """The window kernel on the GPU against its CPU twin, on whole arrays and on prefix
    views of a larger buffer (the KV cache's window)."""
    import rotorq.cuda as gpu
    from rotorq import cpu
    q, ke, ve, pos, part = exact_attention_case(rng, 4, 8, 128, 128, n_e, partial, 4 * n_e + 50)
    n_q, offset = (2, int(pos[n_e // 2])) if causal else (1, 0)
    want = cpu.exact_attention_twin(q, ke, ve, pos, 0.09, n_q, offset, causal,
                                    Partial((part[0],), part[1], part[2]) if part else None)
    if prefix:
        kbuf = cp.asarray(np.concatenate([ke, rng.standard_normal(ke.shape).astype(np.float32)],
                                         axis=1))
        vbuf = cp.asarray(np.concatenate([ve, rng.standard_normal(ve.shape).astype(np.float32)],
                                         axis=1))
        kg, vg = kbuf[:, :n_e], vbuf[:, :n_e]
        assert not kg.flags.c_contiguous
    else:
        kg, vg = cp.asarray(ke), cp.asarray(ve)
    pg = Partial((cp.asarray(part[0]),), cp.asarray(part[1]), cp.asarray(part[2])) if part else None
    got = gpu.exact_attention(cp.asarray(q), kg, vg, cp.asarray(pos), 0.09, n_q, offset,
                              causal, pg)
    np.testing.assert_allclose(got.get(), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
