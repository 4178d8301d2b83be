"""Merge a GPU session's tables into ``benchmarks/results/gpu.md`` (sections ``<card>:*``).

A GPU session (``python -m benchmarks.gpu``) writes its tables under ``$OUT`` on the GPU
machine. With that folder brought back here::

    python -m benchmarks.tools.gpu_results DIR --card H200

reads what DIR holds — ``gpu_bench.md`` (:mod:`benchmarks.gpu.bench`), ``gpu_kv_bench.md``
(:mod:`benchmarks.gpu.kv_bench`), ``gpu_shapes.md`` (:mod:`benchmarks.gpu.shapes`),
``gpu_score_tables.md`` (:mod:`benchmarks.gpu.score_tables`), ``overhead_*.json``
(:mod:`benchmarks.gpu.overhead`) and ``parity.json`` (the CUDA tests) — and replaces the
card's sections (``h200:kernels``, ``h200:attention``, ``h200:shapes``,
``h200:score-tables``, ``h200:overhead``, ``h200:parity``), keeping every other section.
Kernel times are set beside the floors and targets of ``docs/gpu.md``: H100 floors at
2.98 TB/s, scaled on another card by the bandwidth of a preallocated copy in the same run.
The summary page ``benchmarks/RESULTS.md`` is then updated by hand.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
from pathlib import Path

from benchmarks.tools.report import GPU_TABLES, markdown_table, write_sections

H100_TBPS = 2.98
"""Copy bandwidth of the H100 that the floors of docs/gpu.md assume."""
FLOORS_2_20 = {  # µs at 2.98 TB/s, N = 2^20, d = 128, 3 bits, fp16 in (docs/gpu.md)
    "quantize hadamard fp16": (108, "≤ 180"),
    "quantize rotor fp16": (108, "≤ the Hadamard path"),
    "scores 3-bit, 1 query": (19, "≤ 40 and ≥ 2.5× torch"),
    "scores 3-bit, 8 queries": (29, "≤ 70"),
    "WHT-128 fp16 -> fp16": (185, "≤ 230"),
}
SUMMARY_HEAD = ["op", "µs (call)", "µs (kernel)", "floor µs", "kernel × floor", "target"]


def _rows(md: str):
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 5 and re.fullmatch(r"2\^\d+", cells[1]):
            yield cells


def _summary(times, scale=1.0):
    """Rows of :data:`SUMMARY_HEAD` at N = 2^20 (floors × ``scale`` for another card), then
    the speed-ups against the same run's torch baselines (kernel time where measured)."""
    summary = []
    for op, (floor, target) in FLOORS_2_20.items():
        t = times.get((op, "2^20"))
        kt = times.get((f"{op} (kernel)", "2^20"))
        if t is not None:
            f = floor * scale
            summary.append([op, f"{t:.1f}", "—" if kt is None else f"{kt:.1f}", f"{f:.0f}",
                            f"{(t if kt is None else kt) / f:.1f}×", target])
    for op, base in (("scores 3-bit, 1 query", "torch fp16 q@K.T, 1 query"),
                     ("scores 3-bit, 8 queries", "torch fp16 q@K.T, 8 queries")):
        for n in ("2^20", "2^22"):
            for tag in ("", " (kernel)"):
                if (op + tag, n) in times and (base, n) in times:
                    summary.append([f"{op}{tag} vs {base}", f"N = {n}", "", "",
                                    f"{times[(base, n)] / times[(op + tag, n)]:.2f}× faster",
                                    ""])
    return summary


def kernels_section(folder: Path, card: str) -> str:
    """``gpu_bench.md``: the 2^20 summary against floors and targets, then the full table."""
    md = (folder / "gpu_bench.md").read_text(encoding="utf-8")
    times = {(c[0], c[1]): float(c[2]) for c in _rows(md)}
    copy = times.get(("cupy copyto (preallocated) fp16", "2^20"))
    scale = H100_TBPS / (512 * 2**20 / copy / 1e6) if copy else 1.0
    head = md.split("\n|", 1)[0].strip().lstrip("# ")
    parts = [f"## GPU kernels ({card}): time per call against floors and baselines", "",
             f"Run: `python3 -m benchmarks.gpu.bench` — {head}", "",
             "At N = 2^20; \"call\" is back-to-back backend calls, \"kernel\" the same calls' "
             "kernels replayed without host work. Floors: docs/gpu.md's H100 floors × "
             f"{scale:.2f}, the ratio of the H100's {H100_TBPS} TB/s to the bandwidth of a "
             "preallocated cupy copy in this run (1 where the run has none; targets are the "
             "H100's). Speed-ups against torch in the same run:",
             "", markdown_table(SUMMARY_HEAD, _summary(times, scale)), "",
             "Full table:", "", md.split("\n", 1)[1].split("\n\n", 1)[1].strip()]
    return "\n".join(parts) + "\n"


def attention_section(folder: Path, card: str) -> str:
    """``gpu_kv_bench.md``: decode attention against SDPA."""
    md = (folder / "gpu_kv_bench.md").read_text(encoding="utf-8")
    return (f"## Decode attention over compressed K and V ({card})\n\n"
            "Run: `python3 -m benchmarks.gpu.kv_bench` — 32 query / 4 KV heads, d = 128, "
            "3-bit K and V, one query token, against torch fp16 SDPA on the uncompressed "
            "cache in the same run. Target (docs/gpu.md): ≥ 3× faster than SDPA at 1M "
            "tokens.\n\n" + md.split("\n", 1)[1].strip() + "\n")


def shapes_section(folder: Path, card: str) -> str:
    """``gpu_shapes.md``: the kernels at other head dims and bit widths."""
    md = (folder / "gpu_shapes.md").read_text(encoding="utf-8")
    title, body = md.split("\n", 1)
    measured = re.search(r"floors at ([\d.]+) TB/s", title)
    floor = (f"bytes at {measured.group(1)} TB/s (a preallocated cupy copy in the same run)"
             if measured else f"bytes at {H100_TBPS} TB/s (docs/gpu.md)")
    return (f"## Tiled kernels at other head dims and bit widths ({card})\n\n"
            "Run: `python3 -m benchmarks.gpu.shapes` — the default (tiled) kernels at "
            "N = 2^20, fp16 in; scores read keys from enough code buffers to leave L2 (a "
            "single 52 MB buffer stays partly resident and gave 43–95 µs for the same "
            f"kernel). Floor: {floor}; for scores the bytes are the codes and norms read "
            "and the float32 scores written.\n\n"
            f"Run header: {title.lstrip('# ').strip()}\n\n" + body.strip() + "\n")


def score_tables_section(folder: Path, card: str) -> str:
    """``gpu_score_tables.md``: the one-query kernel's table plans."""
    md = (folder / "gpu_score_tables.md").read_text(encoding="utf-8")
    doc = importlib.import_module("benchmarks.gpu.score_tables").__doc__.split("\n\n")[1]
    return (f"## One-query score kernel: table plans against the shared-memory model ({card})"
            "\n\n" + " ".join(doc.split()) + "\n\n" + md.strip() + "\n")


def overhead_section(folder: Path, card: str) -> str | None:
    """``overhead_<label>.json`` files: host µs per call, a column per label and torch state."""
    runs = {}
    for f in sorted(folder.glob("overhead_*.json")):
        runs[f.stem.removeprefix("overhead_")] = json.loads(f.read_text(encoding="utf-8"))
    if not runs:
        return None
    modes = ("torch not initialized", "torch initialized")
    columns = [(label, mode) for mode in modes for label in runs]
    names = list(dict.fromkeys(name for label, mode in columns
                               for name in runs[label]["results"].get(mode, {})))
    rows = []
    for name in names:
        cells = [name]
        for label, mode in columns:
            v = runs[label]["results"].get(mode, {}).get(name)
            cells.append("—" if v is None else f"{v:.1f}")
        rows.append(cells)
    head = ["µs per call"] + [f"{label}, {mode}" for label, mode in columns]
    return (f"## Host overhead per call ({card} host)\n\n"
            "Run: `python3 -m benchmarks.gpu.overhead` (least of 7 averages).\n\n"
            + markdown_table(head, rows))


def parity_section(folder: Path, card: str) -> str | None:
    """``parity.json`` of the CUDA tests: codes flipped against the CPU twins."""
    parity = folder / "parity.json"
    if not parity.is_file():
        return None
    data = json.loads(parity.read_text(encoding="utf-8"))
    rows = [[name, str(r["cases"]), str(r["total"]), str(r["flips"]),
             f"{r.get('max_rel_err', float('nan')):.2g}"]
            for name, r in data["results"].items()]
    return (f"## GPU/CPU parity ({card}, `python3 -m pytest -m cuda tests/cuda`)\n\n"
            "Codes and signs equal to the CPU twin's except flips at rounding boundaries "
            f"(limit {data['flip_limit']:g} of codes); float outputs within the max relative "
            "error shown.\n\n"
            + markdown_table(["check", "cases", "elements", "flips", "max rel. err"], rows))


SECTIONS = {
    "kernels": ("gpu_bench.md", kernels_section),
    "attention": ("gpu_kv_bench.md", attention_section),
    "shapes": ("gpu_shapes.md", shapes_section),
    "score-tables": ("gpu_score_tables.md", score_tables_section),
    "overhead": (None, overhead_section),
    "parity": (None, parity_section),
}


def sections_of(folder: Path, card: str) -> dict[str, str]:
    """The sections ``<card>:<name>`` that the files in ``folder`` make."""
    out = {}
    model = re.search(r"\b[A-Z]\d{2,}\b", card)
    key = (model.group(0) if model else card.split()[-1]).lower()
    for name, (needed, make) in SECTIONS.items():
        if needed is not None and not (folder / needed).is_file():
            continue
        text = make(folder, card)
        if text is not None:
            out[f"{key}:{name}"] = text
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tools.gpu_results",
                                     description="Merge a GPU session's tables (the $OUT "
                                     "folder of python -m benchmarks.gpu) into a tables file.")
    parser.add_argument("folder", type=Path, help="the session's $OUT folder")
    parser.add_argument("--card", default="H100",
                        help="the card, as in the section titles; its model names the "
                             "sections (NVIDIA H200 -> h200:*)")
    parser.add_argument("--output", type=Path, default=GPU_TABLES,
                        help=f"tables file (default: {GPU_TABLES})")
    args = parser.parse_args(argv)
    sections = sections_of(args.folder, args.card)
    if not sections:
        parser.error(f"no GPU tables in {args.folder}")
    print(write_sections(sections, args.output), ", ".join(sections))


if __name__ == "__main__":
    main()
