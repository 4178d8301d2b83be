"""Nearest-neighbour search on real sentence embeddings: rotorq against FAISS.

Data: all-MiniLM-L6-v2 embeddings (384-d, unit norm) of the ~2,500 real passages of
:func:`benchmarks.cpu.minilm.passages`; a seeded random ``N_QUERIES`` of them are held out as
queries, the rest is the database.  The true neighbour of a query is the database
vector of largest exact inner product.

Recall@1@k: the fraction of queries whose true neighbour is among the ``k`` database
vectors of largest *estimated* inner product (k = 1, 10, 100).

Methods at 2, 3 and 4 bits per coordinate (code bytes per vector as stored):

- rotorq ``TurboQuant`` MSE mode (rotations dense, hadamard, rotor) and prod mode
  (dense): ``scores`` on the codes + top-k.  Hadamard pads 384 to 512 coordinates and so
  stores a third more bytes; every rotorq code also holds a 2-byte float16 norm.
- faiss ``IndexPQ``, 192 sub-quantizers of 2 dimensions with ``2·b`` bits each (exactly
  ``48·b`` bytes, as many as ``b`` bits per coordinate).
- faiss ``IndexScalarQuantizer``: ``QT_{b}bit_tqmse`` (faiss's own TurboQuant MSE scalar
  quantizer, no rotation) at every ``b``, and the classic trained ``QT_4bit`` at 4 bits.
- faiss ``IndexRaBitQ`` with ``nb_bits = b`` (its codes add per-vector factors).

Indexing time, in two columns: *setup* is FAISS ``train`` (data-dependent) or building
rotorq's quantizer (rotation + codebook; data-independent, nothing is trained), *encode*
is FAISS ``add`` or rotorq ``quantize``.  Builds under ``SLOW_BUILD_S`` are timed as the
medians of ``REPEATS`` or more; rotorq's first call (Numba compilation) is excluded, see
:mod:`benchmarks.cpu.speed`.  FAISS's OpenMP threads are told not to spin
(:func:`benchmarks.tools.report.passive_openmp`): with the default policy its k-means ran 20–100×
slower on a 2-core machine shared with other processes.  numpy's multi-threaded OpenBLAS
has the same problem with the small QR of rotorq's dense rotation (11 ms on one thread,
up to seconds with two threads on a loaded machine), which shows in its setup column.

Run ``python -m benchmarks.cpu.nn_search``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import rotorq
from benchmarks.cpu import minilm
from benchmarks.tools.report import Progress, markdown_table, passive_openmp

N_QUERIES = 500
KS = (1, 10, 100)
REPEATS = 5
SLOW_BUILD_S = 5.0
SEED = 0


def dataset(progress=None) -> tuple[np.ndarray, np.ndarray]:
    """Database and query embeddings, float32 ``(n_db, 384)`` and ``(N_QUERIES, 384)``."""
    texts = minilm.passages()
    if progress is not None:
        progress(f"nn: embedding {len(texts)} passages (cached after the first run)")
    last = [0.0]

    def report(done, total):
        if progress is not None and time.perf_counter() - last[0] > 20:
            last[0] = time.perf_counter()
            progress(f"nn: embedded {done}/{total}")

    emb = minilm.cached_embeddings(texts, progress=report)
    order = np.random.default_rng(SEED).permutation(len(emb))
    return emb[order[N_QUERIES:]], emb[order[:N_QUERIES]]


def recall_at(true_top1: np.ndarray, ranked: np.ndarray, ks=KS) -> dict[int, float]:
    """Fraction of queries whose true neighbour is in the first ``k`` of ``ranked``.

    Parameters
    ----------
    true_top1 : numpy.ndarray
        ``(n_queries,)`` index of each query's exact nearest neighbour.
    ranked : numpy.ndarray
        ``(n_queries, >= max(ks))`` database indices by decreasing estimated score.
    ks : sequence of int

    Returns
    -------
    dict of int to float
    """
    hit = ranked == true_top1[:, None]
    return {k: float(hit[:, :k].any(1).mean()) for k in ks}


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest scores per row, in decreasing order."""
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, 1), axis=1, kind="stable")
    return np.take_along_axis(part, order, 1)


def _timed_build(setup, encode):
    """Time ``obj = setup()`` then ``encode(obj)`` separately.

    Builds under ``SLOW_BUILD_S`` are repeated ``REPEATS`` times (and for at least half a
    second) and the medians kept.

    Returns
    -------
    obj, setup_seconds, encode_seconds
    """
    runs = []
    while True:
        start = time.perf_counter()
        obj = setup()
        mid = time.perf_counter()
        encoded = encode(obj)
        runs.append((mid - start, time.perf_counter() - mid))
        total = sum(a + b for a, b in runs)
        if runs[0][0] + runs[0][1] >= SLOW_BUILD_S or (len(runs) >= REPEATS and total >= 0.5):
            break
    return (obj, encoded), statistics.median(a for a, _ in runs), statistics.median(
        b for _, b in runs)


def _rotorq_row(name, make, db, queries, true_top1, k_max):
    make().quantize(db)  # warm-up: Numba compilation or cache load
    (tq, codes), setup_s, encode_s = _timed_build(make, lambda tq: tq.quantize(db))
    ranked = top_k(np.asarray(tq.scores(queries, codes)), k_max)
    return {"method": name, "bytes": codes.nbytes / len(db), "setup_s": setup_s,
            "encode_s": encode_s, "recall": recall_at(true_top1, ranked)}


def _faiss_row(name, make, db, queries, true_top1, k_max):
    def setup():
        index = make()
        index.train(db)
        return index

    (index, _), setup_s, encode_s = _timed_build(setup, lambda index: index.add(db))
    _, ranked = index.search(queries, k_max)
    return {"method": name, "bytes": float(index.code_size), "setup_s": setup_s,
            "encode_s": encode_s, "recall": recall_at(true_top1, ranked)}


def _pq(dim, n_sub, nbits):
    """``IndexPQ`` for inner products; its k-means warning about < 39 training points per
    centroid is silenced (the database is all there is to train on)."""
    import faiss

    index = faiss.IndexPQ(dim, n_sub, nbits, faiss.METRIC_INNER_PRODUCT)
    index.pq.cp.min_points_per_centroid = 1
    return index


def run(bits=(2, 3, 4), progress=None) -> dict:
    """Recall and encode time of every method at every bit width.

    Parameters
    ----------
    bits : sequence of int
        Bits per coordinate.
    progress : callable, optional
        Receives a message per bit width.

    Returns
    -------
    dict
        ``n_db``, ``n_queries``, ``dim`` and ``rows``: list of dicts with ``bits``,
        ``method``, ``bytes`` (code bytes per vector), ``setup_s``, ``encode_s`` and
        ``recall`` (k → recall@1@k).
    """
    import faiss

    progress = progress or (lambda message: None)
    db, queries = dataset(progress)
    n_db, dim = db.shape
    true_top1 = (queries @ db.T).argmax(1)
    k_max = max(KS)
    ip = faiss.METRIC_INNER_PRODUCT
    sq = faiss.ScalarQuantizer
    rows = []
    for b in bits:  # every rotorq row before the first FAISS call: no thread-pool interplay
        candidates = [
            (f"rotorq mse/{r}", lambda b=b, r=r: rotorq.TurboQuant(dim, b, rotation=r, seed=SEED))
            for r in ("dense", "hadamard", "rotor")]
        candidates.append(("rotorq prod/dense",
                           lambda b=b: rotorq.TurboQuant(dim, b, mode="prod", rotation="dense",
                                                         seed=SEED)))
        for name, make in candidates:
            rows.append({"bits": b, **_rotorq_row(name, make, db, queries, true_top1, k_max)})
        progress(f"nn: rotorq {b}-bit done")
    for b in bits:
        faiss_candidates = [
            (f"faiss PQ{dim // 2}x{2 * b}", lambda b=b: _pq(dim, dim // 2, 2 * b)),
            (f"faiss SQ QT_{b}bit_tqmse",
             lambda b=b: faiss.IndexScalarQuantizer(dim, getattr(sq, f"QT_{b}bit_tqmse"), ip)),
            (f"faiss RaBitQ {b}-bit", lambda b=b: faiss.IndexRaBitQ(dim, ip, b)),
        ]
        if b == 4:
            faiss_candidates.append(
                ("faiss SQ QT_4bit", lambda: faiss.IndexScalarQuantizer(dim, sq.QT_4bit, ip)))
        for name, make in faiss_candidates:
            rows.append({"bits": b, **_faiss_row(name, make, db, queries, true_top1, k_max)})
        progress(f"nn: faiss {b}-bit done")
    rows.sort(key=lambda r: r["bits"])  # stable: rotorq rows first within each bit width
    return {"n_db": n_db, "n_queries": len(queries), "dim": dim, "rows": rows}


def table(result: dict) -> str:
    """Markdown table of recall@1@k, code bytes, setup (training) and encode times."""
    rows = [[r["bits"], r["method"], f"{r['bytes']:.0f}"]
            + [f"{r['recall'][k]:.3f}" for k in KS]
            + [f"{1e3 * r['setup_s']:.1f}", f"{1e3 * r['encode_s']:.1f}"] for r in result["rows"]]
    return markdown_table(["bits", "method", "code bytes/vector"]
                          + [f"recall@1@{k}" for k in KS]
                          + ["setup / train ms", f"encode / add ms ({result['n_db']} vectors)"],
                          rows, "rlrrrrrr")


def plot(result: dict, path) -> None:
    """Recall@1@1 vs code bytes per vector, one marker style per method family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    families: dict[str, list] = {}
    for r in result["rows"]:
        family = r["method"].rsplit("x", 1)[0] if r["method"].startswith("faiss PQ") else r["method"]
        family = family.replace(f"QT_{r['bits']}bit_tqmse", "QT_bbit_tqmse")
        family = family.replace(f"RaBitQ {r['bits']}-bit", "RaBitQ")
        families.setdefault(family, []).append(r)
    for family, group in families.items():
        group.sort(key=lambda r: r["bytes"])
        style = "o-" if family.startswith("rotorq") else "s--"
        ax.plot([r["bytes"] for r in group], [r["recall"][1] for r in group], style,
                label=family)
    ax.set_xlabel("code bytes per vector")
    ax.set_ylabel("recall@1@1")
    ax.set_title(f"all-MiniLM-L6-v2, {result['n_db']} passages, "
                 f"{result['n_queries']} held-out queries")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    """Command line: print the recall table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 bits only")
    args = parser.parse_args(argv)
    passive_openmp()
    print(table(run(bits=(3,) if args.quick else (2, 3, 4), progress=Progress())))


if __name__ == "__main__":
    main()
