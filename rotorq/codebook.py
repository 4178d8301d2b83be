"""Lloyd-Max scalar codebooks for the coordinates of randomly rotated unit vectors.

After a random rotation each coordinate of a unit vector in R^d follows
``f(x) ∝ (1 - x²)^((d-3)/2)`` on [-1, 1] ("beta"), close to N(0, 1/d) ("gaussian").
Both have closed-form cell probabilities and cell means, so the Lloyd iteration
needs no quadrature.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy import special, stats

SUPPORTED_BITS = tuple(range(1, 9))
_DISTRIBUTIONS = ("gaussian", "beta")


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise TypeError(f"bits must be an int, got {type(bits).__name__}")
    if int(bits) not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    return int(bits)


def _gaussian_cells(edges):
    """Probability and first moment of N(0, 1) over each cell [edges[i], edges[i+1]]."""
    cdf = special.ndtr(edges)
    pdf = stats.norm.pdf(edges)
    return np.diff(cdf), -np.diff(pdf)


def _beta_cells(edges, dim):
    """Probability and first moment of one coordinate of a uniform unit vector in R^dim."""
    # P(X <= t) = 1/2 + sign(t)/2 * I_{t^2}(1/2, (d-1)/2);  ∫ x f = -f-ish closed form.
    a, b = 0.5, (dim - 1) / 2.0
    t = np.clip(edges, -1.0, 1.0)
    cdf = 0.5 + 0.5 * np.sign(t) * special.betainc(a, b, t * t)
    log_norm = special.gammaln(dim / 2.0) - 0.5 * math.log(math.pi) - special.gammaln((dim - 1) / 2.0)
    antideriv = -np.exp(log_norm) * np.power(np.maximum(1.0 - t * t, 0.0), (dim - 1) / 2.0) / (dim - 1)
    return np.diff(cdf), np.diff(antideriv)


@functools.cache
def _lloyd_max_cached(bits: int, dim: int | None, distribution: str):
    levels = 1 << bits
    if distribution == "gaussian":
        cells = _gaussian_cells
        scale = 1.0
        centroids = stats.norm.ppf((np.arange(levels) + 0.5) / levels)
    else:
        cells = functools.partial(_beta_cells, dim=dim)
        # Work in units of 1/sqrt(dim) so the iteration sees O(1) numbers.
        scale = math.sqrt(dim)
        centroids = stats.norm.ppf((np.arange(levels) + 0.5) / levels) / scale
        centroids = np.clip(centroids, -0.999, 0.999)
    lo, hi = (-np.inf, np.inf) if distribution == "gaussian" else (-1.0, 1.0)
    for _ in range(20000):
        boundaries = 0.5 * (centroids[1:] + centroids[:-1])
        mass, moment = cells(np.concatenate(([lo], boundaries, [hi])))
        updated = moment / np.maximum(mass, 1e-300)
        # Symmetrize to remove the drift of rounding.
        updated = 0.5 * (updated - updated[::-1])
        if np.max(np.abs(updated - centroids)) * scale < 1e-13:
            centroids = updated
            break
        centroids = updated
    boundaries = 0.5 * (centroids[1:] + centroids[:-1])
    centroids.setflags(write=False)
    boundaries.setflags(write=False)
    return centroids, boundaries


def lloyd_max(bits, dim=None, *, distribution="gaussian"):
    """Lloyd-Max codebook for one coordinate of a randomly rotated unit vector.

    Parameters
    ----------
    bits : int
        Bits per coordinate, 1 to 8.
    dim : int, optional
        Vector dimension. With ``dim`` the codebook is scaled to N(0, 1/dim)
        ("gaussian") or is the exact sphere-coordinate optimum ("beta"); without
        it the unit-variance Gaussian codebook is returned.
    distribution : {"gaussian", "beta"}
        Coordinate model. ``"beta"`` needs ``dim >= 2``.

    Returns
    -------
    centroids : ndarray of float64, shape (2**bits,)
        Sorted reconstruction levels.
    boundaries : ndarray of float64, shape (2**bits - 1,)
        Sorted decision thresholds (midpoints); code ``i`` covers
        ``boundaries[i-1] <= y < boundaries[i]``.

    Examples
    --------
    >>> import rotorq
    >>> c, b = rotorq.lloyd_max(2)
    >>> [round(float(v), 4) for v in c]
    [-1.5104, -0.4528, 0.4528, 1.5104]
    """
    bits = _check_bits(bits)
    if distribution not in _DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {_DISTRIBUTIONS}, got {distribution!r}")
    if dim is not None:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        dim = int(dim)
    if distribution == "beta":
        if dim is None or dim < 2:
            raise ValueError("distribution='beta' needs dim >= 2")
        c, b = _lloyd_max_cached(bits, dim, "beta")
        return c.copy(), b.copy()
    c, b = _lloyd_max_cached(bits, None, "gaussian")
    scale = 1.0 if dim is None else 1.0 / math.sqrt(dim)
    return c * scale, b * scale


def codebook_mse(bits, dim=None, *, distribution="gaussian"):
    """Expected squared error of one coordinate under the model the codebook was built for.

    Multiplied by ``dim`` for a ``dim``-scaled codebook it is the per-vector MSE
    ``E‖x - x̂‖²`` of unit vectors (MATH.md §2).

    Examples
    --------
    >>> import rotorq
    >>> round(rotorq.codebook.codebook_mse(3), 5)
    0.03455
    """
    c, b = lloyd_max(bits, dim, distribution=distribution)
    if distribution == "gaussian":
        s = 1.0 if dim is None else 1.0 / math.sqrt(dim)
        edges = np.concatenate(([-np.inf], b / s, [np.inf]))
        mass, m1 = _gaussian_cells(edges)
        # E[x^2] over a cell of N(0,1): mass - [x φ(x)] evaluated at the edges.
        finite = np.isfinite(edges)
        xphi = np.zeros_like(edges)
        xphi[finite] = edges[finite] * stats.norm.pdf(edges[finite])
        m2 = mass - np.diff(xphi)
        cs = c / s
        return float(np.sum(m2 - 2 * cs * m1 + cs * cs * mass) * s * s)
    edges = np.concatenate(([-1.0], b, [1.0]))
    mass, m1 = _beta_cells(edges, dim)
    # E[x^2] per cell from the Beta(1/2, (d-1)/2) law of x^2, which has mean 1/d.
    t = edges
    m2_cdf = 0.5 + 0.5 * np.sign(t) * special.betainc(1.5, (dim - 1) / 2.0, t * t)
    m2 = np.diff(m2_cdf) / dim
    return float(np.sum(m2 - 2 * c * m1 + c * c * mass))
