"""The CPU benchmark suite in one command: ``python -m benchmarks.cpu``.

Parts (``--only`` picks some):

``fidelity``
    Real-KV attention fidelity of SmolLM2-135M, every layer × KV head
    (:mod:`benchmarks.cpu.realkv_fidelity`).
``perplexity``
    Perplexity with the KV cache through rotorq (:mod:`benchmarks.cpu.realkv_perplexity`).
``nn``
    Nearest-neighbour recall on MiniLM embeddings vs FAISS (:mod:`benchmarks.cpu.nn_search`).
``speed``
    Encode and score throughput vs the public reference approach
    (:mod:`benchmarks.cpu.speed`).
``mse``
    MSE vs bits per rotation and data kind (:mod:`benchmarks.cpu.mse_bits`).

The full run prints every table, rewrites its own sections of ``benchmarks/results/cpu.md``
(between ``<!-- BEGIN cpu:… -->`` / ``<!-- END cpu:… -->`` markers; the other scripts'
sections are kept) and writes PNG plots to ``benchmarks/plots/``; the summary in
``benchmarks/RESULTS.md`` is updated by hand from those tables.  ``--quick`` runs a reduced
version of every part (a few layers, 256 tokens, 3 bits, N ≤ 2^16) in about two minutes and
only prints, unless ``--output`` names a tables file (its plots then go to a ``plots``
folder beside it).

Needs the ``bench`` extras plus the model packages: see :mod:`benchmarks.cpu.smollm2` and
:mod:`benchmarks.cpu.minilm`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from benchmarks.cpu import mse_bits, nn_search, realkv_fidelity, realkv_perplexity, speed
from benchmarks.tools.report import (
    CPU_TABLES,
    PLOTS,
    Progress,
    environment,
    environment_markdown,
    markdown_table,
    passive_openmp,
    write_sections,
)

PARTS = ("fidelity", "perplexity", "nn", "speed", "mse")
QUICK_LAYERS = (0, 15, 29)


def _fidelity(quick, progress, plots):
    if quick:
        result = realkv_fidelity.run(layers=QUICK_LAYERS, n_tokens=256, bits=(3,),
                                     mixed_bits=(3.5,), progress=progress)
    else:
        result = realkv_fidelity.run(progress=progress)
    head = realkv_fidelity.headline(result)
    layers = result["layers"]
    scope = (f"{len(layers)} layers × 3 KV heads = {head['pairs']} pairs, "
             f"{result['n_tokens']} tokens of {result['text']}, "
             f"queries with ≥ {realkv_fidelity.MIN_KEYS} visible keys")
    body = (
        "## Real-KV attention fidelity (SmolLM2-135M)\n\n"
        f"Scope: {scope}. Real post-RoPE queries, each query head scored against its KV "
        "head (GQA 9:3). Values are compressed with TurboQuant MSE mode at the same bits "
        "and rotation as the keys (QJL rows: Hadamard). Produced by "
        "`benchmarks/cpu/realkv_fidelity.py`.\n\n"
        f"**Headline — 3-bit Hadamard MSE mode ({head['key_bits']:.3f} stored bits/coordinate): "
        f"mean score cosine {head['cos']:.4f}, top-1 match {head['top1']:.3f}, "
        f"true top-1 in estimated top-5 {head['top5']:.3f}, attention-output relative error "
        f"{head['attn_err']:.4f} (K and V compressed) / {head['attn_err_k']:.4f} (K only), "
        f"over all {head['pairs']} layer × KV-head pairs.**\n\n"
        "Outlier rows (`2.5`/`3.5 outliers`) are the TurboQuant paper's split: the d/4 = 16 "
        "channels of largest RMS get b+1 bits, the other 48 b bits, with two quantizers. "
        "Its code bits average b + 0.25, not b + 0.5; each part stores its own float16 norm, "
        "and with Hadamard the 48-channel part pads to 64 coordinates, so the measured "
        "bits/coordinate (first columns) are what to compare.\n\n"
        + realkv_fidelity.summary_table(result)
        + "\n<details><summary>Per layer, 3-bit Hadamard MSE (mean over the 3 KV heads)"
        "</summary>\n\n" + realkv_fidelity.per_layer_table(result)
        + "\n</details>\n\n<details><summary>Per layer, attention-output error with only the "
        "keys compressed, every 3-bit method</summary>\n\n"
        + realkv_fidelity.per_layer_comparison(result) + "\n</details>\n")
    if plots is not None:
        realkv_fidelity.plot(result, plots / "realkv_fidelity.png")
        body += "\n![real-KV fidelity](plots/realkv_fidelity.png)\n"
    return body, realkv_fidelity.summary_table(result)


def _perplexity(quick, progress, plots):
    if quick:
        result = realkv_perplexity.run(n_tokens=256, bits=(3,), texts=("gpl3",),
                                       progress=progress)
    else:
        result = realkv_perplexity.run(progress=progress)
    table = realkv_perplexity.table(result)
    body = (
        "## Perplexity with the KV cache through rotorq (SmolLM2-135M)\n\n"
        f"First {result['n_tokens']} tokens of each text; keys and values of every layer "
        "quantized then dequantized (Hadamard rotation, one quantizer per layer). "
        "Window w: the w most recent tokens of each query stay in full precision "
        "(w = 0: every token quantized). Produced by `benchmarks/cpu/realkv_perplexity.py`.\n\n"
        + table)
    return body, table


def _nn(quick, progress, plots):
    result = nn_search.run(bits=(3,) if quick else (2, 3, 4), progress=progress)
    table = nn_search.table(result)
    body = (
        "## Nearest-neighbour search: rotorq vs FAISS (all-MiniLM-L6-v2)\n\n"
        f"{result['n_db']} database passages, {result['n_queries']} held-out query passages "
        f"(paragraphs of `pydoc_data.topics` and the system licence texts), d = {result['dim']}, "
        "unit-norm embeddings, exact inner product as ground truth. Recall@1@k = fraction of "
        "queries whose true top-1 is in the estimated top-k. Setup = FAISS train or building "
        "the rotorq quantizer (no training); encode = FAISS add or rotorq quantize. Produced by "
        "`benchmarks/cpu/nn_search.py`.\n\n" + table)
    if plots is not None:
        nn_search.plot(result, plots / "recall_vs_bytes.png")
        body += "\n![recall vs bytes](plots/recall_vs_bytes.png)\n"
    return body, table


def _speed(quick, progress, plots):
    sizes = speed.QUICK_SIZES if quick else speed.SIZES
    compile_times = speed.compile_times()
    progress("speed: compile times measured")
    encode = speed.encode_speed(sizes, progress)
    score = speed.score_speed(sizes, progress)
    tables = (speed.encode_table(encode) + "\n" + speed.score_table(score) + "\n"
              + speed.compile_table(compile_times))
    body = (
        "## CPU speed (d = 128, 3 bits)\n\n"
        f"{os.cpu_count()} cores; medians after warm-up, Numba compilation excluded and "
        "listed last. The reference rows run the public approach (dense matmul + argmin "
        "+ uint8 indices) over 2^16-row blocks. On a machine shared with other processes a "
        "multi-threaded BLAS call of a few µs can wait a scheduler slice (ms) for its second "
        "thread, so the small-N fp32 baselines jump around; compare at N = 2^20. Produced by "
        "`benchmarks/cpu/speed.py`.\n\n"
        + tables)
    if plots is not None:
        speed.plot(encode, plots / "encode_speed.png")
        body += "\n![encode speed](plots/encode_speed.png)\n"
    return body, tables


def _mse(quick, progress, plots):
    result = mse_bits.run(n=2048 if quick else mse_bits.N_VECTORS, progress=progress)
    table = mse_bits.table(result)
    body = ("## Reconstruction MSE vs bits, per rotation and data kind\n\n"
            "Relative MSE ‖x − x̂‖²/‖x‖² of TurboQuant MSE mode. Produced by "
            "`benchmarks/cpu/mse_bits.py`.\n\n" + table)
    if plots is not None:
        mse_bits.plot(result, plots / "mse_vs_bits.png")
        body += "\n![MSE vs bits](plots/mse_vs_bits.png)\n"
    return body, table


_RUNNERS = {"fidelity": _fidelity, "perplexity": _perplexity, "nn": _nn, "speed": _speed,
            "mse": _mse}


def main(argv=None) -> None:
    """Run the requested parts, print their tables and write the tables file."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cpu",
                                     description="rotorq CPU benchmark suite")
    parser.add_argument("--quick", action="store_true",
                        help="short run of every part; prints only unless --output is given")
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS),
                        help="parts to run (default: all)")
    parser.add_argument("--output", type=Path, default=None,
                        help=f"tables file (default: {CPU_TABLES} for a full run)")
    args = parser.parse_args(argv)
    output = args.output if args.output is not None else (None if args.quick else CPU_TABLES)
    if output is None:
        plots = None
    else:
        plots = PLOTS if output.resolve() == CPU_TABLES else output.parent / "plots"
        plots_link = os.path.relpath(plots, output.resolve().parent).replace(os.sep, "/")
    omp_policy = passive_openmp()
    progress = Progress()
    env = environment()
    load_before = os.getloadavg()[0]
    sections, timings, loads = {}, {}, {}
    for part in args.only:
        progress(f"=== {part} ===")
        start = time.perf_counter()
        body, table = _RUNNERS[part](args.quick, progress, plots)
        if plots is not None:
            body = body.replace("](plots/", f"]({plots_link}/")
        timings[part] = time.perf_counter() - start
        loads[part] = os.getloadavg()[0]
        sections[f"cpu:{part}"] = (body + f"\n_{env['date']}, {'quick' if args.quick else 'full'}"
                                   f" run, {timings[part]:.0f} s._\n")
        print(f"\n{table}", flush=True)
    total = sum(timings.values())
    command = " ".join(["python -m benchmarks.cpu", *(argv if argv is not None else sys.argv[1:])])
    header = (
        "## CPU suite: environment\n\n" + environment_markdown(env)
        + f"- command: `{command}`\n"
        f"- OMP_WAIT_POLICY={omp_policy} (see `benchmarks.tools.report.passive_openmp`)\n"
        f"- load average (1 min) at the start: {load_before:.2f}; other processes sharing "
        "the cores slow every timing below\n\n"
        + markdown_table(["part", "seconds", "load average at its end"],
                         [[p, f"{s:.0f}", f"{loads[p]:.2f}"] for p, s in timings.items()]
                         + [["total", f"{total:.0f}", ""]]))
    sections = {"cpu:environment": header, **sections}
    print(f"\ntotal {total:.0f} s", flush=True)
    if output is not None:
        write_sections(sections, output)
        progress(f"wrote {output}" + (f" and plots in {plots}" if plots else ""))


if __name__ == "__main__":
    main()
