"""Command line: ``rotorq demo`` (or ``python -m rotorq demo``) and ``rotorq --version``."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def _methods():
    import rotorq

    for rotation in ("hadamard", "dense", "rotor"):
        for bits in (2, 3, 4):
            yield f"TurboQuant mse  {rotation:<8} {bits}b", rotorq.TurboQuant(64, bits, rotation=rotation)
    for bits in (3, 4):
        yield f"TurboQuant prod hadamard {bits}b", rotorq.TurboQuant(64, bits, mode="prod")
    for m in (128, 192):
        yield f"QJL m={m:<3}                 ", rotorq.QJL(64, m)


def demo(out=sys.stdout):
    """Quantize real SmolLM2 keys and values with every method; print size and fidelity."""
    from rotorq._log import compile_seconds
    from rotorq.datasets import smollm2_kv_sample

    data = smollm2_kv_sample()
    # (layers, kv_heads, T, d); 3 query heads per KV head read the same keys (GQA).
    q = data["q"].astype(np.float32).reshape(2, 3, 3, 256, 64)
    k = data["k"].astype(np.float32)[:, :, None]
    v = data["v"].astype(np.float32)
    exact = q @ np.swapaxes(k, -1, -2)
    print(f"rotorq demo: real SmolLM2-135M keys/values, 2 layers x 3 KV heads x 256 tokens x 64 "
          f"(fp16 = 16 bits/coordinate); key norms {np.linalg.norm(k, axis=-1).min():.0f}"
          f"-{np.linalg.norm(k, axis=-1).max():.0f}", file=out)
    header = (f"{'method':<30} {'bits/coord':>10} {'vs fp16':>8} {'K rel.MSE':>10} "
              f"{'V rel.MSE':>10} {'score cos':>10} {'top-1':>6} {'first ms':>9} {'ms':>7}")
    print(header, file=out)
    print("-" * len(header), file=out)
    compiled_before = compile_seconds()
    for name, quantizer in _methods():
        first, _ = _timed(_quantize_and_score, quantizer, k, q)
        elapsed, (kq, est) = _timed(_quantize_and_score, quantizer, k, q)
        if hasattr(quantizer, "dequantize"):
            k_err = np.sum((quantizer.dequantize(kq) - k) ** 2) / np.sum(k ** 2)
            vq = quantizer.quantize(v)
            v_err = f"{np.sum((quantizer.dequantize(vq) - v) ** 2) / np.sum(v ** 2):10.4f}"
            k_err = f"{k_err:10.4f}"
        else:
            k_err = v_err = f"{'-':>10}"
        e, x = est.reshape(-1, 256), exact.reshape(-1, 256)
        cos = np.mean(np.sum(e * x, 1) / (np.linalg.norm(e, axis=1) * np.linalg.norm(x, axis=1)))
        top1 = np.mean(e.argmax(1) == x.argmax(1))
        bpc = kq.bits_per_coordinate
        print(f"{name:<30} {bpc:10.3f} {16 / bpc:7.2f}x {k_err} {v_err} {cos:10.4f} "
              f"{top1:6.3f} {first:9.1f} {elapsed:7.1f}", file=out)
    print("score cos / top-1: estimated vs exact q.k over all 2x9 query heads x 256 queries "
          "(real queries, GQA). ms: quantize + scores of a second call; first ms: the first "
          "call, which compiles the kernels it needs (or loads them from Numba's on-disk "
          "cache).", file=out)
    _kvcache_demo(data, out)
    print(f"\nNumba compiled rotorq kernels for {compile_seconds() - compiled_before:.1f} s of "
          "this demo (0 when its on-disk cache already held them; they are cached for the "
          "next process).", file=out)


def _quantize_and_score(quantizer, k, q):
    kq = quantizer.quantize(k)
    return kq, quantizer.scores(q, kq)


def _timed(call, *args):
    """``(milliseconds, call(*args))``."""
    t0 = time.perf_counter()
    result = call(*args)
    return (time.perf_counter() - t0) * 1e3, result


KV_CONFIGS = (
    ("plain TurboQuant K3/V3", dict(key_bits=3, value_bits=3, residual_tokens=0,
                                    residual_bits=None, sink_tokens=0, key_offset=False,
                                    norm_correction=False)),
    ("KVCache defaults (K4/V3)", {}),
    ("defaults + rope_base", dict(rope_base=100000.0)),
    ("K3/V2 + rope_base", dict(key_bits=3, value_bits=2, rope_base=100000.0)),
)


def _kvcache_demo(data, out):
    """Causal attention of the last 128 real queries through ``rotorq.KVCache``."""
    q, k, v = (data[n].astype(np.float32) for n in "qkv")
    print("\nKVCache: prefill 256 real tokens per layer, attend the last 128 real queries "
          "(causal, GQA 9:3); SmolLM2 rope_theta = 100000", file=out)
    header = (f"{'configuration':<30} {'bits/coord':>10} {'vs fp16':>8} {'attn out rel.err':>17} "
              f"{'first ms':>9} {'ms':>7}")
    print(header, file=out)
    print("-" * len(header), file=out)
    for name, kw in KV_CONFIGS:
        errs, bits, times = [], [], []
        for layer in range(q.shape[0]):
            qs = q[layer, :, -128:]
            ms, (got, bpc) = _timed(_cache_attend, k[layer], v[layer], qs, kw)
            want = _exact_attention(qs, k[layer], v[layer])
            errs.append(np.linalg.norm(got - want) / np.linalg.norm(want))
            bits.append(bpc)
            times.append(ms)
        b = float(np.mean(bits))
        print(f"{name:<30} {b:10.3f} {16 / b:7.2f}x {np.mean(errs):17.4f} {times[0]:9.1f} "
              f"{times[-1]:7.1f}", file=out)
    print("bits/coord: everything the cache stores (codes, norms, window codes, float16 sink "
          "and key offset) at 256 tokens; fixed costs shrink with longer contexts. first ms: "
          "new cache, prefill and attend of the first layer (compiles on first use); ms: the "
          "same for the second layer.", file=out)


def _cache_attend(k, v, qs, kw):
    import rotorq

    cache = rotorq.KVCache(k.shape[0], k.shape[2], **kw)
    cache.append(k, v)
    return cache.attend(qs, causal=True), cache.bits_per_coordinate


def _exact_attention(q, k, v):
    """Causal float64 GQA attention of the last ``q.shape[1]`` positions."""
    group = q.shape[0] // k.shape[0]
    kk = np.repeat(k, group, 0).astype(np.float64)
    s = q.astype(np.float64) @ kk.transpose(0, 2, 1) / np.sqrt(q.shape[-1])
    n_q, t = q.shape[1], k.shape[1]
    s = np.where(np.arange(t)[None] <= (t - n_q + np.arange(n_q))[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return p @ np.repeat(v, group, 0)


DESCRIPTION = ("rotorq compresses vectors and KV caches to 2-4 bits per coordinate and "
               "computes on the codes.")


def _version():
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rotorq")
    except PackageNotFoundError:  # run from a source tree that pip has not installed
        import rotorq

        return rotorq.__version__


def main(argv=None):
    """Run the command line ``rotorq`` (or ``python -m rotorq``) with ``argv``.

    Parameters
    ----------
    argv : list of str, optional
        The arguments after the program name; ``sys.argv[1:]`` when None.

    Returns
    -------
    int
        The exit status, 0 (argparse exits with status 2 on bad arguments).

    Examples
    --------
    >>> main(["--version"])
    rotorq 0.1.0
    0
    """
    parser = argparse.ArgumentParser(prog="rotorq", description=DESCRIPTION)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    commands = parser.add_subparsers(dest="command", metavar="command")
    commands.add_parser(
        "demo", help="quantize real SmolLM2-135M keys and values with every method and print "
        "bits per coordinate, compression, error, score fidelity and timings",
        description="Quantize real SmolLM2-135M keys and values with every method and print "
        "bits per coordinate, compression against fp16, error, score fidelity and timings "
        "(first call, which compiles, apart from later calls).")
    args = parser.parse_args(argv)
    if args.version:
        print(f"rotorq {_version()}")
        return 0
    if args.command is None:
        parser.error("a command is required: demo")
    if args.command == "demo":
        demo()
    return 0


if __name__ == "__main__":
    sys.exit(main())
