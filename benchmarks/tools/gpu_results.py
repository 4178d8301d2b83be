"""Merge the GPU runs' outputs into ``benchmarks/RESULTS.md`` (sections ``gpu:*``).

The GPU scripts run on the device machine and write their tables under ``$OUT``; the
device tool brings them back into a folder here. This script takes those files —
``gpu_bench.md`` and ``parity.json`` from ``benchmarks/gpu/bench.py`` / the ``cuda`` tests,
``gpu_kv_bench.md`` from ``benchmarks/gpu/kv_bench.py``, ``gpu_shapes.md`` from
``benchmarks/gpu/shapes.py`` — and writes them into the results
file with the floors and targets of PERFORMANCE.md beside them.

Usage: ``python -m benchmarks.tools.gpu_results --kernels DIR --attention DIR --shapes DIR``
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
from pathlib import Path

from benchmarks.tools.report import markdown_table, write_sections

FLOORS_2_20 = {  # µs at 2.98 TB/s, N = 2^20, d = 128, 3 bits, fp16 in (PERFORMANCE.md)
    "quantize hadamard fp16": (108, "≤ 180"),
    "quantize rotor fp16": (108, "≤ the Hadamard path"),
    "scores 3-bit, 1 query": (19, "≤ 40 and ≥ 2.5× torch"),
    "scores 3-bit, 8 queries": (29, "≤ 70"),
    "WHT-128 fp16 -> fp16": (185, "≤ 230"),
}


def _rows(md: str):
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 5 and re.fullmatch(r"2\^\d+", cells[1]):
            yield cells


SUMMARY_HEAD = ["op", "µs (call)", "µs (kernel)", "floor µs", "kernel × floor", "target"]


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
                            "—" if kt is None else f"{kt / f:.1f}×", target])
    for op, base in (("scores 3-bit, 1 query", "torch fp16 q@K.T, 1 query"),
                     ("scores 3-bit, 8 queries", "torch fp16 q@K.T, 8 queries")):
        for n in ("2^20", "2^22"):
            for tag in ("", " (kernel)"):
                if (op + tag, n) in times and (base, n) in times:
                    summary.append([f"{op}{tag} vs {base}", f"N = {n}", "", "",
                                    f"{times[(base, n)] / times[(op + tag, n)]:.2f}× faster",
                                    ""])
    return summary


def kernels_section(folder: Path) -> str:
    md = (folder / "gpu_bench.md").read_text(encoding="utf-8")
    times = {(c[0], c[1]): float(c[2]) for c in _rows(md)}
    summary = _summary(times)
    head = md.split("\n|", 1)[0].strip().lstrip("# ")
    parts = ["## GPU kernels (H100): time per call against floors and baselines", "",
             f"Run: `python3 -m benchmarks.gpu.bench` — {head}", "",
             "At N = 2^20 against PERFORMANCE.md (floor at 2.98 TB/s):", "",
             markdown_table(SUMMARY_HEAD, summary), "",
             "Full table (baselines measured in the same run):", "",
             md.split("\n", 1)[1].split("\n\n", 1)[1].strip()]
    parity = folder / "parity.json"
    if parity.is_file():
        data = json.loads(parity.read_text(encoding="utf-8"))
        rows = [[name, str(r["cases"]), str(r["total"]), str(r["flips"]),
                 f"{r.get('max_rel_err', float('nan')):.2g}"]
                for name, r in data["results"].items()]
        parts += ["", "## GPU/CPU parity (H100, `python3 -m pytest -m cuda tests/cuda`)", "",
                  f"Codes and signs equal to the CPU twin's except flips at rounding "
                  f"boundaries (limit {data['flip_limit']:g} of codes); float outputs within "
                  "the max relative error shown.", "",
                  markdown_table(["check", "cases", "elements", "flips", "max rel. err"], rows)]
    return "\n".join(parts) + "\n"


def attention_section(folder: Path) -> str:
    md = (folder / "gpu_kv_bench.md").read_text(encoding="utf-8")
    body = md.split("\n", 1)[1].strip()
    return ("## Decode attention over compressed K and V (H100)\n\n"
            "Run: `python3 -m benchmarks.gpu.kv_bench` — 32 query / 4 KV heads, d = 128, "
            "3-bit K and V, one query token, against torch fp16 SDPA on the uncompressed "
            "cache in the same run. Target (PERFORMANCE.md): ≥ 3× faster than SDPA at 1M "
            "tokens.\n\n" + body + "\n")


def shapes_section(folder: Path, card: str = "H100") -> str:
    md = (folder / "gpu_shapes.md").read_text(encoding="utf-8")
    title, body = md.split("\n", 1)
    measured = re.search(r"floors at ([\d.]+) TB/s", title)
    floor = (f"bytes at {measured.group(1)} TB/s (a preallocated cupy copy in the same run)"
             if measured else "bytes at 2.98 TB/s (PERFORMANCE.md)")
    return (f"## Tiled kernels at other head dims and bit widths ({card})\n\n"
            "Run: `python3 -m benchmarks.gpu.shapes` — the default (tiled) kernels at N = 2^20, "
            "fp16 in; scores read keys from enough code buffers to leave L2 (a single 52 MB "
            "buffer stays partly resident and gave 43–95 µs for the same kernel). Floor: "
            f"{floor}; for scores the bytes are the codes and norms read "
            "and the float32 scores written.\n\n"
            f"Run header: {title.lstrip('# ').strip()}\n\n" + body.strip() + "\n")


def score_tables_section(folder: Path) -> str:
    md = (folder / "gpu_score_tables.md").read_text(encoding="utf-8")
    doc = importlib.import_module("benchmarks.gpu.score_tables").__doc__.split("\n\n")[1]
    return ("## One-query score kernel: table plans against the shared-memory model\n\n"
            + " ".join(doc.split()) + "\n\n" + md.strip() + "\n")


def _overhead_table(folder: Path):
    """Rows ``[piece, old (torch off), new (torch off), old (torch on), new (torch on)]`` from
    ``overhead_old.json`` / ``overhead_new.json`` of :mod:`benchmarks.gpu.overhead`."""
    runs = {}
    for label in ("old", "new"):
        f = folder / f"overhead_{label}.json"
        if f.is_file():
            runs[label] = json.loads(f.read_text(encoding="utf-8"))["results"]
    if len(runs) < 2:
        return None
    off, on = "torch not initialized", "torch initialized"
    rows = []
    for name in runs["new"][on]:
        cells = [name]
        for mode in (off, on):
            for label in ("old", "new"):
                v = runs[label][mode].get(name)
                cells.append("—" if v is None else f"{v:.1f}")
        rows.append(cells)
    return rows


def card_section(folder: Path, card: str) -> str:
    """The kernel benchmark (and host-overhead pieces, when present) of one run on another
    card, with the ratios to the baselines of the same run."""
    md = (folder / "gpu_bench.md").read_text(encoding="utf-8")
    times = {(c[0], c[1]): float(c[2]) for c in _rows(md)}
    copy = times.get(("cupy copyto (preallocated) fp16", "2^20"))
    scale = 2.98 / (512 * 2**20 / copy / 1e6) if copy else 1.0
    head = md.split("\n|", 1)[0].strip().lstrip("# ")
    parts = [f"## GPU kernels on an {card}: the same benchmark on another card", "",
             f"Run: `python3 -m benchmarks.gpu.bench` — {head}", "",
             "At N = 2^20; \"call\" is back-to-back backend calls, \"kernel\" the same calls' "
             "kernels replayed without host work. Floors: PERFORMANCE.md's H100 floors × "
             f"{scale:.2f}, the ratio of the H100's 2.98 TB/s to the bandwidth of a "
             "preallocated cupy copy in this run (1 where the run has none; targets are the "
             "H100's). Speed-ups against torch in the same run:",
             "", markdown_table(SUMMARY_HEAD, _summary(times, scale)), "",
             "Full table:", "", md.split("\n", 1)[1].split("\n\n", 1)[1].strip()]
    kv = folder / "gpu_kv_bench.md"
    if kv.is_file():
        parts += ["", f"Decode attention on the {card} (`python3 -m benchmarks.gpu.kv_bench`, "
                  "32 query / 4 KV heads, d = 128, 3-bit K and V, against torch fp16 SDPA in "
                  "the same run):", "", kv.read_text(encoding="utf-8").split("\n", 1)[1].strip()]
    over = _overhead_table(folder)
    if over:
        parts += ["", f"Host time per call on the {card} machine's host, before "
                  "(`overhead_old`) and after (`overhead_new`) the launch-path changes, "
                  "same run (`python3 -m benchmarks.gpu.overhead`, µs, least of 7 averages):",
                  "", markdown_table(["call or piece", "old, torch off", "new, torch off",
                                      "old, torch on", "new, torch on"], over)]
    return "\n".join(parts) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kernels", type=Path, help="folder with gpu_bench.md / parity.json")
    parser.add_argument("--attention", type=Path, help="folder with gpu_kv_bench.md")
    parser.add_argument("--shapes", type=Path, help="folder with gpu_shapes.md")
    parser.add_argument("--other-card", nargs=2, metavar=("DIR", "CARD"),
                        help="folder with gpu_bench.md (+ overhead_*.json) of a run on CARD")
    parser.add_argument("--shapes-card", default="H100", help="the card of --shapes")
    parser.add_argument("--score-tables", type=Path,
                        help="folder with gpu_score_tables.md")
    parser.add_argument("--suffix", default="",
                        help="appended to the section names (keeps earlier runs' sections)")
    args = parser.parse_args(argv)
    sections = {}
    if args.kernels:
        sections["gpu:kernels"] = kernels_section(args.kernels)
    if args.attention:
        sections["gpu:attention"] = attention_section(args.attention)
    if args.shapes:
        sections["gpu:shapes"] = shapes_section(args.shapes, args.shapes_card)
    if args.other_card:
        folder, card = args.other_card
        sections[f"gpu:{card.split()[-1].lower()}"] = card_section(Path(folder), card)
    if args.score_tables:
        sections["gpu:score-tables"] = score_tables_section(args.score_tables)
    print(write_sections({name + args.suffix: text for name, text in sections.items()}))


if __name__ == "__main__":
    main()
