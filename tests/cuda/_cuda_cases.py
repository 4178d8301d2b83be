"""Every CUDA kernel of rotorq with tiny inputs and its CPU twin's answer.

Shared by the simulator tests (which launch the kernels) and the compile-only tests (which
only need each kernel's argument types). Importing this module imports no numba.cuda:
:func:`kernel_cases` looks the kernels up by module and name when asked.
"""

import importlib
from dataclasses import dataclass

import numpy as np

import rotorq
from rotorq import cpu

# The backend functions (rotorq.cpu.quantize, …) shadow the kernel modules' names.
CPU = {name: importlib.import_module(f"rotorq.cpu.{name}")
       for name in ("bits", "dequantize", "qjl", "quantize", "rotate", "rotor", "scores", "wht")}

POISON_BYTE = 0xAB


@dataclass
class Case:
    """One kernel call: ``rotorq.cuda.<module>.<kernel>(*args)`` writes ``args[i]`` for ``i``
    in ``outputs``, which must equal ``expected`` (computed by the CPU twin)."""

    name: str
    module: str
    kernel: str
    geometry: tuple  # ("rows", n, width) or ("scores", per_query, levels)
    args: tuple
    outputs: tuple
    expected: tuple

    def get_kernel(self):
        return getattr(importlib.import_module(f"rotorq.cuda.{self.module}"), self.kernel)


def poisoned(a):
    """A copy of ``a`` with every element set to garbage (NaN or 0xAB)."""
    out = np.empty_like(a)
    if out.dtype.kind == "f":
        out.fill(np.nan)
    else:
        out.fill(POISON_BYTE)
    return out


def _empty_like(*arrays):
    return tuple(np.zeros_like(a) for a in arrays)


def _quantize_cases(rng, dtype):
    """Fused quantize (every rotation, mse and prod), then dequantize of the CPU's codes."""
    n = 5
    for rotation, d in (("hadamard", 6), ("rotor", 7), ("dense", 5)):
        for mode, nc in (("mse", False), ("prod", True)):
            tq = rotorq.TurboQuant(d, 3, mode=mode, rotation=rotation)
            stored_dim = tq.stored_dim
            x = (rng.standard_normal((n, d)) * 3).astype(dtype)
            x[2] = 0.0  # a zero vector
            xf = x.astype(np.float64 if dtype == np.float64 else np.float32)
            sk = tq.sketch if tq.sketch is not None else np.empty((0, 1), np.float32)
            outs = (np.zeros((n, (stored_dim * tq.mse_bits + 7) // 8), np.uint8),
                    np.zeros(n, np.float32), np.zeros((n, (sk.shape[0] + 7) // 8), np.uint8),
                    np.zeros(n, np.float32))
            tail = (tq.boundaries, tq.centroids, tq.mse_bits, int(nc), sk)
            if rotation == "dense":
                kern, prm = "quantize_rotated", ()
                x = xf = cpu.rotate(xf, tq.rotation)
            else:
                kern = f"quantize_{rotation}"
                prm = (tq.rotation.params(np)["signs" if rotation == "hadamard" else "mats"],)
            expected = _empty_like(*outs)
            getattr(CPU["quantize"], kern)(xf, *prm, *tail, *expected)
            first = 1 + len(prm) + len(tail)
            yield Case(f"{kern}-{mode}-{np.dtype(x.dtype).name}", "quantize", kern,
                       ("rows", n, stored_dim), (x, *prm, *tail, *outs),
                       tuple(range(first, first + 4)), expected)
            codes, norms = expected[:2]
            kern = "dequantize_rotated" if rotation == "dense" else f"dequantize_{rotation}"
            out = np.zeros((n, stored_dim if rotation == "dense" else d), np.float32)
            exp = np.zeros_like(out)
            args = (codes, norms, *prm, tq.centroids, tq.mse_bits)
            getattr(CPU["dequantize"], kern)(*args, exp)
            yield Case(f"{kern}-{mode}", "dequantize", kern,
                       ("rows", n, stored_dim), (*args, out), (len(args),), (exp,))


def _rotate_cases(rng, dtype):
    n = 5
    for rotation, d in (("hadamard", 6), ("rotor", 7)):
        tq = rotorq.TurboQuant(d, 3, rotation=rotation)
        prm = tq.rotation.params(np)["signs" if rotation == "hadamard" else "mats"]
        stored_dim = tq.stored_dim
        x = rng.standard_normal((n, d)).astype(dtype)
        y = rng.standard_normal((n, stored_dim)).astype(np.float32)
        fwd, inv = np.zeros((n, stored_dim), np.float32), np.zeros((n, d), np.float32)
        efwd, einv = np.zeros_like(fwd), np.zeros_like(inv)
        scale = float(rng.uniform(0.1, 2.0))
        getattr(CPU["rotate"], f"rotate_{rotation}")(x.astype(np.float32), prm, scale, efwd)
        getattr(CPU["rotate"], f"unrotate_{rotation}")(y, prm, einv)
        yield Case(f"rotate_{rotation}-{np.dtype(dtype).name}", "rotate", f"rotate_{rotation}",
                   ("rows", n, stored_dim), (x, prm, scale, fwd), (3,), (efwd,))
        yield Case(f"unrotate_{rotation}", "rotate", f"unrotate_{rotation}",
                   ("rows", n, stored_dim), (y, prm, inv), (2,), (einv,))
    x = rng.standard_normal((n, 8)).astype(dtype)
    out = np.zeros((n, 8), np.float32)
    exp = np.zeros_like(out)
    CPU["wht"].wht(x.astype(np.float32), exp)
    yield Case(f"wht-{np.dtype(dtype).name}", "wht", "wht", ("rows", n, 8), (x, out), (1,), (exp,))
    tq = rotorq.TurboQuant(7, 3, rotation="rotor", norm_correction=True)
    x = rng.standard_normal((n, 7)).astype(dtype)
    out = np.zeros((n, 7), np.float32)
    exp = np.zeros_like(out)
    mats = tq.rotation.params(np)["mats"]
    CPU["rotor"].rotor_roundtrip(x.astype(np.float32), mats, tq.boundaries, tq.centroids,
                                 True, exp)
    yield Case(f"rotor_roundtrip-{np.dtype(dtype).name}", "rotor", "rotor_roundtrip",
               ("rows", n, tq.stored_dim), (x, mats, tq.boundaries, tq.centroids, 1, out), (5,),
               (exp,))


def _bits_cases(rng):
    n, count = 5, 11
    for b in (1, 3, 4, 8):
        idx = rng.integers(0, 1 << b, (n, count)).astype(np.uint8)
        packed = np.zeros((n, (count * b + 7) // 8), np.uint8)
        CPU["bits"].pack_codes(idx, b, packed)
        yield Case(f"pack_codes-{b}", "bits", "pack_codes", ("rows", n, count),
                   (idx, b, np.zeros_like(packed)), (2,), (packed.copy(),))
        yield Case(f"unpack_codes-{b}", "bits", "unpack_codes", ("rows", n, count),
                   (packed, b, count, np.zeros_like(idx)), (3,), (idx,))


def _qjl_cases(rng, dtype):
    n, d, m = 5, 6, 13
    q = rotorq.QJL(d, m)
    x = rng.standard_normal((n, d)).astype(dtype)
    signs, norms = np.zeros((n, (m + 7) // 8), np.uint8), np.zeros(n, np.float32)
    es, en = np.zeros_like(signs), np.zeros_like(norms)
    CPU["qjl"].qjl_quantize(x.astype(np.float32), q.sketch, es, en)
    yield Case(f"qjl_quantize-{np.dtype(dtype).name}", "qjl", "qjl_quantize", ("rows", n, d),
               (x, q.sketch, signs, norms), (2, 3), (es, en))
    bq, bk, n_m, n_k = 2, 2, 3, 5
    qs = rng.standard_normal((bq, n_m, m)).astype(np.float32)
    ks = rng.integers(0, 256, (bk, n_k, (m + 7) // 8)).astype(np.uint8)
    kn = rng.random((bk, n_k)).astype(np.float32)
    qmap, kmap = np.array([0, 1, 1], np.int64), np.array([1, 0, 1], np.int64)
    out = np.zeros((3, n_m, n_k), np.float32)
    exp = np.zeros_like(out)
    CPU["qjl"].qjl_scores(qs, qmap, ks, kn, kmap, q.scale, exp)
    yield Case("qjl_scores", "qjl", "qjl_scores", ("scores", m, 0),
               (qs, qmap, ks, kn, kmap, q.scale, out), (6,), (exp,))


def _scores_cases(rng):
    """MSE and prod scores; D = 32 rows (12 code bytes, 4 sign bytes) also as uint32 words."""
    bq, bk, n_m, n_k, b = 2, 2, 3, 5, 3
    qmap, kmap = np.array([0, 1, 1], np.int64), np.array([1, 0, 1], np.int64)
    for stored_dim in (8, 32):
        tq = rotorq.TurboQuant(stored_dim, b + 1, mode="prod")
        m = tq.qjl_dim
        qrot = rng.standard_normal((bq, n_m, stored_dim)).astype(np.float32)
        qsk = rng.standard_normal((bq, n_m, m)).astype(np.float32)
        codes = rng.integers(0, 256, (bk, n_k, (stored_dim * b + 7) // 8)).astype(np.uint8)
        norms = rng.random((bk, n_k)).astype(np.float32)
        signs = rng.integers(0, 256, (bk, n_k, (m + 7) // 8)).astype(np.uint8)
        qn = rng.random((bk, n_k)).astype(np.float32)
        out = np.zeros((3, n_m, n_k), np.float32)
        e_mse, e_prod = np.zeros_like(out), np.zeros_like(out)
        CPU["scores"].scores_mse(qrot, qmap, codes, norms, kmap, tq.centroids, b, e_mse)
        CPU["scores"].scores_prod(qrot, qsk, qmap, codes, norms, signs, qn, kmap,
                                  tq.centroids, b, tq.qjl_scale, e_prod)
        levels = tq.centroids.shape[0]
        views = [("bytes", codes, signs)]
        if stored_dim == 32:
            views.append(("words", codes.view(np.uint32), signs.view(np.uint32)))
        for kind, c, sg in views:
            yield Case(f"scores_mse-{stored_dim}-{kind}", "scores", "scores_mse",
                       ("scores", stored_dim, levels),
                       (qrot, qmap, c, norms, kmap, tq.centroids, b, out), (7,), (e_mse,))
            yield Case(f"scores_prod-{stored_dim}-{kind}", "scores", "scores_prod",
                       ("scores", stored_dim + m, levels),
                       (qrot, qsk, qmap, c, norms, sg, qn, kmap, tq.centroids, b,
                        tq.qjl_scale, out), (11,), (e_prod,))
    qjl = rotorq.QJL(8, 64)
    qs = rng.standard_normal((bq, n_m, 64)).astype(np.float32)
    ks = rng.integers(0, 256, (bk, n_k, 8)).astype(np.uint8)
    kn = rng.random((bk, n_k)).astype(np.float32)
    exp = np.zeros((3, n_m, n_k), np.float32)
    CPU["qjl"].qjl_scores(qs, qmap, ks, kn, kmap, qjl.scale, exp)
    yield Case("qjl_scores-words", "qjl", "qjl_scores", ("scores", 64, 0),
               (qs, qmap, ks.view(np.uint32), kn, kmap, qjl.scale, np.zeros_like(exp)), (6,),
               (exp,))


def kernel_cases(seed=0, dtypes=(np.float32, np.float16, np.float64)):
    """All kernel cases on fresh random inputs; kernels that read float vectors get one case
    per input dtype in ``dtypes``, the others one case."""
    rng = np.random.default_rng(seed)
    cases = list(_bits_cases(rng)) + list(_scores_cases(rng))
    seen = set()
    for dtype in dtypes:
        for case in (*_quantize_cases(rng, dtype), *_rotate_cases(rng, dtype),
                     *_qjl_cases(rng, dtype)):
            if case.name not in seen:
                seen.add(case.name)
                cases.append(case)
    return cases
