"""The CPU's tiled decode attention (:mod:`rotorq.cpu.attention_fast`) against the CUDA
kernel's CPU twin (:func:`rotorq.cpu.attention.decode_attention`) and a float64 numpy
oracle built on :mod:`rotorq.reference`, on fresh random packed codes: MSE and prod keys,
one and two key/value parts, the RoPE-aware key bias, causal masks, 1–5 bits, odd token
counts, buffers larger than the tokens, the vector decoder's two block widths and the
natural-order fallback."""

import numba
import numpy as np
import pytest

import rotorq.cpu as backend
from rotorq import _ops as ops
from rotorq import reference
from rotorq.cpu import attention as twin
from rotorq.cpu import attention_fast as fast
from rotorq.cpu import simd


@numba.njit
def _exp_sum16(arr, off, n16, mx):
    return simd.exp_sum16(arr, off, n16, mx)


@numba.njit
def _max16(arr, off, n16):
    return simd.max16(arr, off, n16)


def _serial(kernel, n_tasks, args, shared=False):
    kernel(0, n_tasks, *args)


def make_case(rng, *, n_bh=2, n_rows=4, n_q=1, dk=(128,), dv=(128,), kbits=(4,),
              vbits=(3,), m=(0,), n_keys=333, cap_extra=5, causal_offset=None, n_freq=0,
              pos0=0):
    """Random arguments of the decode-attention contract plus the unpacked codes."""
    cap = n_keys + cap_extra
    f32 = np.float32
    scale = f32(0.4)

    def cent(bits):
        return np.sort(rng.standard_normal(1 << bits)).astype(f32)

    def norms():
        return (rng.random((n_bh, cap)) * 2 + 0.1).astype(np.float16)

    def packed(bits, d):
        idx = rng.integers(0, 1 << bits, (n_bh, cap, d)).astype(np.uint8)
        return idx, reference.pack_bits(idx.reshape(-1, d), bits).reshape(n_bh, cap, -1)

    keys, vals = [], []
    for p in range(len(dk)):
        q = (rng.standard_normal((n_bh, n_rows, dk[p])) * scale).astype(f32)
        qs = (rng.standard_normal((n_bh, n_rows, m[p])) * scale).astype(f32)
        idx, codes = packed(kbits[p], dk[p])
        sidx, signs = packed(1, max(m[p], 1))
        keys.append(dict(q=q, qs=qs, idx=idx, codes=codes, norms=norms(), sidx=sidx,
                         signs=signs, gnorms=norms(), cent=cent(kbits[p]), bits=kbits[p],
                         qscale=float(np.sqrt(np.pi / 2) / m[p]) if m[p] else 0.0))
    for p in range(len(dv)):
        idx, codes = packed(vbits[p], dv[p])
        vals.append(dict(idx=idx, codes=codes, norms=norms(), cent=cent(vbits[p]),
                         bits=vbits[p]))
    bias = ((rng.standard_normal((n_bh, n_rows, n_freq)) * scale).astype(f32),
            (rng.standard_normal((n_bh, n_rows, n_freq)) * scale).astype(f32),
            10000.0 ** -(np.arange(n_freq) / max(n_freq, 1)), pos0)
    return dict(keys=keys, vals=vals, bias=bias, n_keys=n_keys, n_q=n_q, n_bh=n_bh,
                n_rows=n_rows, causal_offset=n_keys if causal_offset is None else causal_offset)


def twin_args(case, chunk):
    """The twin's argument tuple (without the task range) and its output arrays."""
    u8, u16, f32 = np.zeros((1, 1, 1), np.uint8), np.zeros((1, 1), np.uint16), \
        np.zeros(1, np.float32)
    n_bh, n_rows = case["n_bh"], case["n_rows"]
    empty = np.zeros((n_bh, n_rows, 0), np.float32)
    ks = case["keys"] + [None] * (2 - len(case["keys"]))
    vs = case["vals"] + [None] * (2 - len(case["vals"]))
    args = [k["q"] if k else empty for k in ks] + [k["qs"] if k else empty for k in ks]
    args += list(case["bias"])
    for k in ks:
        if k is None:
            args += [u8, u16, u8, u16, f32, 1, 0.0]
        else:
            args += [k["codes"], k["norms"].view(np.uint16), k["signs"],
                     k["gnorms"].view(np.uint16), k["cent"], k["bits"], k["qscale"]]
    for v in vs:
        args += [u8, u16, f32, 1] if v is None else \
            [v["codes"], v["norms"].view(np.uint16), v["cent"], v["bits"]]
    n_split = max(1, -(-case["n_keys"] // chunk))
    dvs = [v["idx"].shape[2] if v else 0 for v in vs]
    outs = [np.full((n_bh, n_split, n_rows, d), np.nan, np.float32) for d in dvs]
    outs += [np.full((n_bh, n_split, n_rows), np.nan, np.float32) for _ in range(2)]
    args += [case["n_keys"], case["n_q"], case["causal_offset"], chunk, *outs]
    return tuple(args), n_bh * n_split, outs


def merged(outs, n_parts):
    acc0, acc1, mx, sm = outs
    m = mx.max(axis=1)
    w = np.exp(mx - np.where(np.isfinite(m), m, 0)[:, None, :])
    accs = [np.einsum("bsr,bsrd->brd", w, a) for a in (acc0, acc1)[:n_parts]]
    return accs, m, (w * sm).sum(axis=1)


def oracle(case):
    """float64 attention of every row over the unpacked codes: (accs, m, l) merged."""
    n_keys = case["n_keys"]
    s = 0.0
    for k in case["keys"]:
        kv = k["cent"].astype(np.float64)[k["idx"][:, :n_keys]] \
            * k["norms"][:, :n_keys, None].astype(np.float64)
        s = s + np.einsum("brd,btd->brt", k["q"].astype(np.float64), kv)
        if k["qs"].shape[2]:
            sgn = 2.0 * k["sidx"][:, :n_keys, :k["qs"].shape[2]] - 1.0
            s = s + k["qscale"] * k["gnorms"][:, None, :n_keys].astype(np.float64) \
                * np.einsum("brm,btm->brt", k["qs"].astype(np.float64), sgn)
    a, b, freqs, pos0 = case["bias"]
    if freqs.shape[0]:
        ang = (pos0 + np.arange(n_keys))[:, None] * freqs[None, :]
        s = s + np.einsum("brf,tf->brt", a.astype(np.float64), np.cos(ang)) \
            + np.einsum("brf,tf->brt", b.astype(np.float64), np.sin(ang))
    rows = np.arange(case["n_rows"])
    limit = rows % case["n_q"] + case["causal_offset"]
    s = np.where(np.arange(n_keys)[None, None, :] <= limit[None, :, None], s, -np.inf)
    m = s.max(axis=2)
    p = np.exp(s - np.where(np.isfinite(m), m, 0)[:, :, None])
    accs = []
    for v in case["vals"]:
        vv = v["cent"].astype(np.float64)[v["idx"][:, :n_keys]] \
            * v["norms"][:, :n_keys, None].astype(np.float64)
        accs.append(np.einsum("brt,btd->brd", p, vv))
    return accs, m, p.sum(axis=2)


def assert_close(got, want, rtol):
    """Outputs ``acc / l`` within ``rtol`` of each row's output norm; ``m + log l`` too."""
    g_accs, gm, gl = got
    w_accs, wm, wl = want
    np.testing.assert_array_equal(np.isfinite(gm), np.isfinite(wm))
    fin = np.isfinite(wm)
    np.testing.assert_allclose(gm[fin] + np.log(gl[fin]), wm[fin] + np.log(wl[fin]),
                               rtol=rtol, atol=rtol)
    for g, w in zip(g_accs, w_accs, strict=True):
        go = g / np.where(gl > 0, gl, 1)[..., None]
        wo = w / np.where(wl > 0, wl, 1)[..., None]
        err = np.abs(go - wo) / (np.linalg.norm(wo, axis=-1, keepdims=True) + 1e-30)
        assert err.max() <= rtol, f"max relative error {err.max():.3g} > {rtol}"


CASES = {
    "defaults-K4V3": dict(),
    "K3V3": dict(kbits=(3,), vbits=(3,)),
    "K2V4-gqa-causal": dict(kbits=(2,), vbits=(4,), n_rows=8, n_q=2, causal_offset=300),
    "d64-8-lanes": dict(dk=(64,), dv=(64,), kbits=(3,), vbits=(2,), n_keys=129),
    "d256-1bit": dict(dk=(256,), dv=(256,), kbits=(1,), vbits=(2,), n_keys=71, n_rows=3),
    "two-parts-prod-bias": dict(dk=(64, 8), dv=(128, 8), kbits=(2, 3), vbits=(4, 2),
                                m=(64, 12), n_freq=4, pos0=5, n_keys=257, n_rows=3),
    "prod-d128": dict(kbits=(3,), m=(128,), n_keys=200),
    "natural-order-5bit": dict(dk=(40,), dv=(24,), kbits=(5,), vbits=(1,), n_keys=99,
                               n_rows=2),
    "masked-splits": dict(n_rows=2, n_q=2, causal_offset=3, n_keys=301),
    "one-token": dict(n_keys=1, cap_extra=0),
    "rows-5": dict(n_rows=5, kbits=(2,), vbits=(4,), n_keys=150),
    "rows-12-causal": dict(n_rows=12, n_q=3, causal_offset=180, n_keys=190),
    "rows-9-prod-signs-lanes8": dict(n_rows=9, dk=(64,), dv=(192,), m=(64,), n_keys=77),
    "rows-37-prefill": dict(n_rows=37, n_q=37, causal_offset=90, n_keys=127, n_bh=1),
    "rows-24-natural-blas-blocks": dict(n_rows=24, n_q=6, dk=(200,), dv=(200,), kbits=(3,),
                                        vbits=(2,), causal_offset=60, n_keys=70),
}


@pytest.mark.parametrize("chunk", [64, 512])
@pytest.mark.parametrize("name", list(CASES))
def test_fast_kernel_matches_twin_and_oracle(rng, name, chunk):
    case = make_case(rng, **CASES[name])
    n_parts = len(case["vals"])
    args, n_tasks, outs = twin_args(case, chunk)
    twin.decode_attention(0, n_tasks, *args)
    want = merged(outs, n_parts)
    args, n_tasks, outs = twin_args(case, chunk)
    fast.run(_serial, n_tasks, args)
    got = merged(outs, n_parts)
    assert not any(np.isnan(o).any() for o in outs), "an output was left unwritten"
    assert_close(got, want, 3e-5)
    assert_close(got, oracle(case), 1e-4)


def test_backend_wrapper_runs_the_fast_kernel_on_threads(rng):
    """``rotorq.cpu.decode_attention`` (several threads) gives exactly the fast kernel's
    serial result merged, and the twin's within float32 rounding."""
    case = make_case(rng, n_bh=3, n_keys=1500, kbits=(3,), vbits=(3,))
    queries = tuple(ops.RotatedQuery(k["q"]) for k in case["keys"])
    keys = tuple(ops.KeyPart(k["codes"], k["norms"], k["cent"], k["bits"])
                 for k in case["keys"])
    values = tuple(ops.ValuePart(v["codes"], v["norms"], v["cent"], v["bits"],
                                 v["idx"].shape[2]) for v in case["vals"])
    got = backend.decode_attention(queries, keys, values, case["n_keys"], case["n_q"],
                                   case["causal_offset"])
    accs, m, l_sum = got.accs, got.max, got.sum
    chunk = backend._split_chunk(case["n_keys"], case["n_bh"])
    args, n_tasks, outs = twin_args(case, chunk)
    fast.run(_serial, n_tasks, args)
    f_accs, f_m, f_l = merged(outs, 1)
    np.testing.assert_array_equal(accs[0], f_accs[0].astype(np.float32))
    np.testing.assert_array_equal(m, f_m)
    np.testing.assert_array_equal(l_sum, f_l.astype(np.float32))
    args, n_tasks, outs = twin_args(case, chunk)
    twin.decode_attention(0, n_tasks, *args)
    assert_close((accs, m, l_sum), merged(outs, 1), 3e-5)


def test_task_ranges_and_shared_counter_give_the_same_partials(rng):
    """Tasks taken from explicit ranges (no counter) or handed out by the shared counter
    from interleaved calls write the same partials as one serial call."""
    case = make_case(rng, n_keys=700, kbits=(3,), vbits=(4,))
    captured = {}
    args, n_tasks, _ = twin_args(case, 128)
    fast.run(lambda kernel, n, a, shared: captured.update(kernel=kernel, args=a), n_tasks, args)
    kernel, fargs = captured["kernel"], captured["args"]
    results = []
    for split in ("serial", "ranges", "counter"):
        a = list(fargs)
        for i in range(len(a) - 5, len(a) - 1):
            a[i] = np.full_like(a[i], np.nan)
        if split == "serial":
            kernel(0, n_tasks, *a)
        elif split == "ranges":
            a[-1] = np.zeros(0, np.int64)
            kernel(0, 5, *a)
            kernel(5, n_tasks, *a)
        else:
            a[-1] = np.zeros(1, np.int64)
            kernel(0, 1, *a)  # takes every task: the range is ignored
            kernel(0, 1, *a)  # finds none left
        results.append([x.copy() for x in a[-5:-1]])
    for got in results[1:]:
        for g, w in zip(got, results[0], strict=True):
            np.testing.assert_array_equal(g, w)
    assert not np.isnan(results[0][0]).any()


@pytest.mark.parametrize("lanes", [8, 16])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_vector_decoder_is_the_permuted_centroid_gather(rng, bits, lanes):
    d = 8 * lanes * 2
    n = 5
    idx = rng.integers(0, 1 << bits, (n, d)).astype(np.uint8)
    codes = reference.pack_bits(idx, bits).reshape(1, n, -1)
    cent = rng.standard_normal(1 << bits).astype(np.float32)
    table = np.zeros(fast.TABLE, np.float32)
    table[:cent.shape[0]] = cent
    out = np.full(fast.TILE * d, np.nan, np.float32)
    fast._decode_tile(codes, 0, 1, n - 1, bits, lanes, table, cent, d,
                      np.empty(d, np.uint8), out)
    perm = fast.permutation(d, lanes)
    np.testing.assert_array_equal(out[:(n - 1) * d].reshape(n - 1, d), cent[idx[1:]][:, perm])
    assert np.isnan(out[(n - 1) * d:]).all()


def test_permutation_and_block_widths():
    for d in (64, 128, 192, 256, 512):
        for lanes in (0, 8, 16):
            if lanes and d % (8 * lanes):
                continue
            perm = fast.permutation(d, lanes)
            np.testing.assert_array_equal(np.sort(perm), np.arange(d))
    for d in (64, 128, 192, 256):
        np.testing.assert_array_equal(np.sort(fast.order(d, fast.FUSED, True)), np.arange(d))
    assert fast.block_lanes(128, 4) == 16 and fast.block_lanes(192, 3) == 8
    assert fast.block_lanes(40, 2) == 0 and fast.block_lanes(128, 5) == 0
    assert fast.part_mode(128, 3, 4) == fast.FUSED == fast.part_mode(192, 4, 400)
    assert fast.part_mode(64, 5, 4) == 0 == fast.part_mode(40, 2, 1) == fast.part_mode(200, 3, 4)
    # block s, code c of word g sits at 8·lanes·s + lanes·c + g: coordinate 8(lanes·s + g) + c
    assert fast.permutation(128, 16)[16 * 3 + 5] == 8 * 5 + 3


@pytest.mark.parametrize("x", [0.0, -1e-3, -0.5, -1.0, -7.25, -20.0, -86.9, -87.5, -1e4,
                               -np.inf])
def test_exp_within_two_ulp_vector_and_scalar_alike(x, rng):
    xs = np.float32(x) * (1 + rng.random(64).astype(np.float32) * 1e-3)
    xs[0] = np.float32(x)
    vec, sca = xs.copy().reshape(1, -1), xs.copy().reshape(1, -1)
    total_vec = _exp_sum16(vec, 0, 4, np.float32(0.0))
    total_sca = fast._exp_sum(sca, 0, 0, 64, np.float32(0.0))
    np.testing.assert_array_equal(vec, sca)  # the same operations in the same order
    want = np.exp(xs.astype(np.float64))
    tiny = want < np.exp(-87.0)
    got = vec[0]
    assert (got[tiny] == 0).all()
    ulp = np.spacing(want[~tiny].astype(np.float32)).astype(np.float64)
    assert (np.abs(got[~tiny] - want[~tiny]) <= 2 * ulp).all()
    for total in (total_vec, total_sca):
        np.testing.assert_allclose(total, want[~tiny].sum(), rtol=1e-6)


def test_exp_keeps_nan():
    for n, call in ((16, lambda row: _exp_sum16(row, 0, 1, np.float32(0.0))),
                    (2, lambda row: fast._exp_sum(row, 0, 0, 2, np.float32(0.0)))):
        row = np.zeros((1, n), np.float32)
        row[0, 0] = np.nan
        call(row)
        assert np.isnan(row[0, 0]) and row[0, 1] == 1.0


def test_row_max_vector_and_scalar(rng):
    row = rng.standard_normal((1, 48)).astype(np.float32)
    row[0, [3, 40]] = np.nan
    want = np.nanmax(row)
    assert _max16(row, 0, 3) == want == fast._row_max(row, 0, 0, 48)
    assert _max16(row, 16, 0) == fast._row_max(row, 0, 5, 5) == -np.inf


def test_half_conversion_every_pattern():
    """Every float16 pattern, through the 16-wide path and the scalar tail."""
    bits = np.arange(1 << 16, dtype=np.uint16)
    want = bits.view(np.float16).astype(np.float32)
    for j0, n in ((0, bits.shape[0]), (3, bits.shape[0] - 3 - 9)):
        out = np.empty(n + 16, np.float32)
        fast._norms(bits.reshape(1, -1), 0, j0, n, out)
        w = want[j0:j0 + n]
        nan = np.isnan(w)
        np.testing.assert_array_equal(np.isnan(out[:n]), nan)
        np.testing.assert_array_equal(out[:n][~nan].view(np.uint32), w[~nan].view(np.uint32))
