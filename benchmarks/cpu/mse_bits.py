"""Reconstruction MSE vs bits for each rotation, on data that can tell rotations apart.

On isotropic data every orthogonal transform gives the same MSE (docs/math.md §6), so the
data kinds here are

- ``isotropic``: Gaussian vectors, d = 128 (the Lloyd-Max value of docs/math.md §2);
- ``outliers``: 4 fixed channels scaled ×15 (docs/math.md §6), d = 128;
- ``low-rank``: rank-8 Gaussian factors through a fixed 8 × 128 matrix plus 5 % isotropic
  noise, d = 128;
- ``real keys`` / ``real values``: SmolLM2-135M post-RoPE keys and values of every layer
  and KV head (d = 64), see :mod:`benchmarks.cpu.realkv_fidelity`.

The metric is ``mean ‖x − x̂‖² / ‖x‖²`` with TurboQuant MSE mode.

Run ``python -m benchmarks.cpu.mse_bits``.
"""

from __future__ import annotations

import argparse

import numpy as np

import rotorq
from benchmarks.cpu import realkv_fidelity
from benchmarks.tools.report import markdown_table

ROTATIONS = ("hadamard", "dense", "rotor")
BITS = (1, 2, 3, 4)
N_VECTORS = 8192
GAUSSIAN_MSE = {1: 0.36338, 2: 0.11748, 3: 0.03455, 4: 0.00950}
"""Lloyd-Max MSE per coordinate of a unit-variance Gaussian (docs/math.md §2)."""


def datasets(n: int = N_VECTORS, seed: int = 0, real: dict | None = None) -> dict:
    """The data kinds, each float32 ``(n, d)``.

    Parameters
    ----------
    n : int
        Vectors per kind.
    seed : int
        Seed of the synthetic data and of the subsample of real vectors.
    real : dict, optional
        ``{"k": ..., "v": ...}`` arrays ``(..., d)`` of real keys and values (e.g. from
        :func:`benchmarks.cpu.realkv_fidelity.capture`); the real kinds are left out
        without it.

    Returns
    -------
    dict of str to numpy.ndarray
    """
    rng = np.random.default_rng(seed)
    d = 128
    out = {"isotropic": rng.standard_normal((n, d))}
    x = rng.standard_normal((n, d))
    x[:, rng.choice(d, 4, replace=False)] *= 15.0
    out["outliers"] = x
    basis = rng.standard_normal((8, d))
    out["low-rank"] = rng.standard_normal((n, 8)) @ basis + 0.05 * rng.standard_normal((n, d))
    if real is not None:
        for name, key in (("real keys", "k"), ("real values", "v")):
            flat = real[key].reshape(-1, real[key].shape[-1])
            out[name] = flat[rng.choice(len(flat), min(n, len(flat)), replace=False)]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def relative_mse(x: np.ndarray, rotation: str, bits: int, seed: int = 0) -> float:
    """``mean ‖x − x̂‖² / ‖x‖²`` of TurboQuant MSE mode on rows ``x``."""
    tq = rotorq.TurboQuant(x.shape[1], bits, rotation=rotation, seed=seed)
    err = tq.dequantize(tq.quantize(x)) - x
    return float(np.mean(np.square(err).sum(1) / np.square(x).sum(1)))


def run(bits=BITS, n: int = N_VECTORS, real: bool = True, progress=None) -> dict:
    """Relative MSE of every (data kind, rotation, bits).

    Parameters
    ----------
    bits : sequence of int
    n : int
        Vectors per kind.
    real : bool, default True
        Include SmolLM2's real keys and values (captured and cached on first use).
    progress : callable, optional

    Returns
    -------
    dict
        ``bits`` and ``mse``: ``(kind, rotation)`` → list of MSE per bit width.
    """
    data = datasets(n, real=realkv_fidelity.capture(progress=progress) if real else None)
    mse = {(kind, r): [relative_mse(x, r, b) for b in bits]
           for kind, x in data.items() for r in ROTATIONS}
    if progress is not None:
        progress("mse: done")
    return {"bits": tuple(bits), "mse": mse}


def table(result: dict) -> str:
    """Markdown table: one row per (data kind, rotation), one column per bit width."""
    rows = [[kind, r] + [f"{v:.4f}" for v in vals] for (kind, r), vals in result["mse"].items()]
    rows.append(["Lloyd-Max Gaussian (docs/math.md §2)", "—"]
                + [f"{GAUSSIAN_MSE[b]:.4f}" for b in result["bits"]])
    return markdown_table(["data", "rotation"] + [f"{b} bits" for b in result["bits"]], rows,
                          "ll" + "r" * len(result["bits"]))


def plot(result: dict, path) -> None:
    """One panel per data kind: relative MSE vs bits (log scale), a line per rotation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(kind for kind, _ in result["mse"]))
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.2 * len(kinds), 3.4), sharey=True)
    axes = np.atleast_1d(axes)
    bits = result["bits"]
    for ax, kind in zip(axes, kinds, strict=True):
        for r in ROTATIONS:
            ax.plot(bits, result["mse"][(kind, r)], "o-", label=r)
        ax.plot(bits, [GAUSSIAN_MSE[b] for b in bits], "k:", label="Lloyd-Max")
        ax.set_yscale("log")
        ax.set_title(kind)
        ax.set_xlabel("bits / coordinate")
        ax.set_xticks(bits)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("relative MSE  ‖x−x̂‖²/‖x‖²")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    """Command line: print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic-only", action="store_true",
                        help="skip the real SmolLM2 keys and values")
    args = parser.parse_args(argv)
    print(table(run(real=not args.synthetic_only)))


if __name__ == "__main__":
    main()
