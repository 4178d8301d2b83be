"""CPU speed of rotorq's encoder and scorer against the public reference approach.

Encode: ``N × 128`` float32 Gaussian vectors at 3 bits, for each rotation, against

- ``rotorq.reference.public_reference_quantize`` (numpy: normalize, dense matmul
  rotation, ``argmin`` over the centroids, uint8 indices — what the public PyTorch
  reference does), and
- the same approach written in torch (CPU), on the same data.

Both anchors run over blocks of ``CHUNK`` rows (their ``N × 128 × 8`` distance tensor
would need 4 GiB at ``N = 2^20``) and produce unpacked uint8 indices, i.e. less work than
rotorq's packed 3-bit codes.  Throughput is ``N`` / median wall time after a warm-up
(at least 5 runs, or 3 for ``N > 2^16``, and at least ``MIN_SECONDS`` of runs).

Score: one query and a GQA group of 8 queries against ``N`` 3-bit keys (MSE mode,
Hadamard), with rotorq's ``scores`` on the packed codes, against float32 ``q·Kᵀ`` over
the uncompressed keys (numpy and torch) and the public approach's dequantize-then-matmul
in torch.

Numba compilation is timed separately in a fresh process with an empty Numba cache
(``NUMBA_CACHE_DIR``), so the medians never include it.

Run ``python -m benchmarks.cpu.speed`` (``--quick``: N up to 2^16).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

import rotorq
from benchmarks.tools.report import Progress, markdown_table, median_time, passive_openmp
from rotorq import reference

DIM = 128
BITS = 3
CHUNK = 1 << 16
SIZES = tuple(1 << p for p in (10, 12, 14, 16, 20))
QUICK_SIZES = tuple(1 << p for p in (10, 12, 14, 16))
ROTATIONS = ("hadamard", "dense", "rotor")
GROUP = 8
MIN_SECONDS = 0.5

_COMPILE_SCRIPT = r"""
import json, time
import numpy as np
start = time.perf_counter()
import rotorq
out = {"import rotorq": time.perf_counter() - start}
x = np.random.default_rng(0).standard_normal((1024, 128)).astype(np.float32)
for rotation in ("hadamard", "dense", "rotor"):
    tq = rotorq.TurboQuant(128, 3, rotation=rotation)
    start = time.perf_counter()
    codes = tq.quantize(x)
    out[f"first quantize ({rotation})"] = time.perf_counter() - start
start = time.perf_counter()
tq.scores(x[:8], codes)
out["first scores (rotor codes)"] = time.perf_counter() - start
print(json.dumps(out))
"""


def compile_times() -> dict[str, float]:
    """Seconds of the first calls in a fresh process whose Numba cache is empty.

    Returns
    -------
    dict of str to float
        ``import rotorq`` and the first ``quantize`` per rotation and first ``scores``;
        each includes the compilation of the kernels it is first to use.
    """
    root = Path(__file__).resolve().parents[2]
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(root),
                                                            os.environ.get("PYTHONPATH")]))}
        done = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, check=True,
                              capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _chunked(fn, x):
    for start in range(0, x.shape[0], CHUNK):
        fn(x[start:start + CHUNK])


def _torch_reference(rotation_matrix, centroids):
    """The public approach in torch: ``f(x)`` → uint8 indices and norms of rows ``x``."""
    import torch

    rot = torch.from_numpy(np.ascontiguousarray(rotation_matrix, np.float32))
    cent = torch.from_numpy(centroids)

    def encode(x):
        with torch.inference_mode():
            xt = torch.from_numpy(x)
            n = xt.norm(dim=1, keepdim=True)
            y = (xt / n.clamp_min(1e-30)) @ rot.T
            return (y[..., None] - cent).abs().argmin(-1).to(torch.uint8), n

    return encode


def encode_speed(sizes=SIZES, progress=None) -> list[dict]:
    """Vectors per second of every encoder at every ``N``.

    Parameters
    ----------
    sizes : sequence of int
        Numbers of vectors.
    progress : callable, optional
        Receives a message per size.

    Returns
    -------
    list of dict
        ``n``, ``method`` and ``vectors_per_s``.
    """
    progress = progress or (lambda message: None)
    data = np.random.default_rng(0).standard_normal((max(sizes), DIM), dtype=np.float32)
    quantizers = {r: rotorq.TurboQuant(DIM, BITS, rotation=r) for r in ROTATIONS}
    dense = quantizers["dense"]
    rot = dense.rotation.matrix().astype(np.float32)
    torch_encode = _torch_reference(rot, dense.centroids)
    rows = []
    for i, n in enumerate(sizes):
        x = data[:n]
        repeats = 5 if n <= CHUNK else 3
        warmup = 1 if i == 0 else 0
        timed = {f"rotorq {r}": (lambda q=q, x=x: q.quantize(x)) for r, q in quantizers.items()}
        timed["numpy reference (dense, argmin)"] = lambda x=x: _chunked(
            lambda c: reference.public_reference_quantize(c, rot, dense.centroids), x)
        timed["torch reference (dense, argmin)"] = lambda x=x: _chunked(torch_encode, x)
        for method, fn in timed.items():
            seconds = median_time(fn, repeats, warmup, MIN_SECONDS)
            rows.append({"n": n, "method": method, "vectors_per_s": n / seconds})
        progress(f"speed: encode N={n} done")
    return rows


def score_speed(sizes=SIZES, progress=None) -> list[dict]:
    """Keys per second scored, for 1 query and for a group of ``GROUP`` queries.

    Parameters
    ----------
    sizes : sequence of int
        Numbers of keys.
    progress : callable, optional
        Receives a message per size.

    Returns
    -------
    list of dict
        ``n``, ``queries``, ``method`` and ``keys_per_s``.
    """
    import torch

    progress = progress or (lambda message: None)
    rng = np.random.default_rng(1)
    keys_all = rng.standard_normal((max(sizes), DIM), dtype=np.float32)
    tq = rotorq.TurboQuant(DIM, BITS)
    codes_all = tq.quantize(keys_all)
    rot = torch.from_numpy(tq.rotation.matrix().astype(np.float32))
    cent = torch.from_numpy(tq.centroids)
    idx_all = torch.from_numpy(reference.unpack_bits(np.asarray(codes_all.codes), BITS, DIM))
    norms_all = torch.from_numpy(np.asarray(codes_all.norms, dtype=np.float32))
    rows = []
    for i, n in enumerate(sizes):
        keys, codes = keys_all[:n], codes_all[:n]
        keys_t, idx, norms = torch.from_numpy(keys), idx_all[:n], norms_all[:n]
        for m in (1, GROUP):
            q = rng.standard_normal((m, DIM), dtype=np.float32)
            q_t = torch.from_numpy(q)

            def dequantize_matmul(q_t=q_t, idx=idx, norms=norms):
                with torch.inference_mode():
                    k_hat = (cent[idx.long()] * norms[:, None]) @ rot
                    return q_t @ k_hat.T

            def torch_fp32(q_t=q_t, keys_t=keys_t):
                with torch.inference_mode():
                    return q_t @ keys_t.T

            timed = {"rotorq scores (3-bit codes)": lambda q=q, codes=codes: tq.scores(q, codes),
                     "numpy fp32 q·Kᵀ (uncompressed)": lambda q=q, keys=keys: q @ keys.T,
                     "torch fp32 q·Kᵀ (uncompressed)": torch_fp32,
                     "torch dequantize + matmul (reference)": dequantize_matmul}
            for method, fn in timed.items():
                seconds = median_time(fn, 5 if n <= CHUNK else 3, 1 if i == 0 else 0,
                                      MIN_SECONDS)
                rows.append({"n": n, "queries": m, "method": method, "keys_per_s": n / seconds})
        progress(f"speed: score N={n} done")
    return rows


def encode_table(rows) -> str:
    """Markdown: millions of vectors per second, one column per ``N``."""
    sizes = sorted({r["n"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    get = {(r["method"], r["n"]): r["vectors_per_s"] for r in rows}
    body = [[m] + [f"{get[(m, n)] / 1e6:.2f}" for n in sizes] for m in methods]
    return markdown_table(["encode, Mvectors/s"] + [f"N=2^{n.bit_length() - 1}" for n in sizes],
                          body)


def score_table(rows) -> str:
    """Markdown: millions of keys scored per second, per query count and ``N``."""
    sizes = sorted({r["n"] for r in rows})
    keys = list(dict.fromkeys((r["method"], r["queries"]) for r in rows))
    get = {(r["method"], r["queries"], r["n"]): r["keys_per_s"] for r in rows}
    body = [[m, q] + [f"{get[(m, q, n)] / 1e6:.1f}" for n in sizes] for m, q in keys]
    return markdown_table(["score, Mkeys/s", "queries"]
                          + [f"N=2^{n.bit_length() - 1}" for n in sizes], body)


def compile_table(times: dict) -> str:
    """Markdown: first-call seconds with an empty Numba cache."""
    return markdown_table(["first call (fresh process, empty Numba cache)", "seconds"],
                          [[k, f"{v:.2f}"] for k, v in times.items()])


def plot(encode_rows, path) -> None:
    """Encode throughput vs ``N`` (log-log), one line per encoder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in encode_rows):
        pts = sorted((r["n"], r["vectors_per_s"]) for r in encode_rows if r["method"] == method)
        ax.plot(*zip(*pts, strict=True), "o-" if method.startswith("rotorq") else "s--", label=method)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("N vectors (d = 128, float32)")
    ax.set_ylabel("vectors / s (3 bits)")
    ax.set_title(f"CPU encode throughput ({os.cpu_count()} cores)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    """Command line: print the compile, encode and score tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N up to 2^16")
    args = parser.parse_args(argv)
    passive_openmp()
    progress = Progress()
    sizes = QUICK_SIZES if args.quick else SIZES
    print(compile_table(compile_times()))
    print(encode_table(encode_speed(sizes, progress)))
    print(score_table(score_speed(sizes, progress)))


if __name__ == "__main__":
    main()
