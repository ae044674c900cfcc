"""Statistics of per-example values over a prompt set: the aggregate of every cell (mean, standard deviation, a
seeded bootstrap 95 % interval), a paired permutation test, the normalised patching metric and tables.

Values are ``[n_examples, *cells]``: one row per example, any cell shape (a sweep's ``[n_layers, n_positions]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pyinterp.errors import InputError

N_BOOT = 1000
N_PERM = 1000
LEVEL = 0.95


@dataclass
class Summary:
    """The aggregate of each cell over the examples; arrays of the cells' shape."""

    n: int
    mean: np.ndarray
    std: np.ndarray   # sample standard deviation (ddof 1; 0 for one example)
    low: np.ndarray   # bootstrap percentile interval at LEVEL
    high: np.ndarray

    def to_dict(self, decimals: int = 6) -> dict:
        return {"n": self.n, **{k: np.round(getattr(self, k), decimals).tolist() for k in ("mean", "std", "low", "high")}}


def _values(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.ndim < 1 or len(values) == 0:
        raise InputError("statistics need at least one example")
    return values


def summarize(values: np.ndarray, seed: int = 0, n_boot: int = N_BOOT) -> Summary:
    """Mean, standard deviation and the bootstrap interval (``n_boot`` resamples of the examples with replacement,
    seeded; the 2.5 and 97.5 percentiles of their means) of every cell of ``values`` ``[n_examples, *cells]``."""
    values = _values(values)
    n = len(values)
    mean = values.mean(axis=0)
    std = values.std(axis=0, ddof=1) if n > 1 else np.zeros_like(mean)
    rng = np.random.default_rng(seed)
    means = np.stack([values[rng.integers(0, n, n)].mean(axis=0) for _ in range(n_boot)])
    low, high = np.percentile(means, [100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2], axis=0)
    return Summary(n, mean, std, low, high)


def permutation_p(a: np.ndarray, b: np.ndarray, seed: int = 0, n_perm: int = N_PERM) -> np.ndarray:
    """Two-sided p-value of each cell for the mean of the paired differences ``a - b`` being 0 (``[n_examples,
    *cells]`` each): signs of the differences flipped at random (seeded), ``(1 + #(|mean| >= observed)) / (1 + n_perm)``."""
    diff = _values(a) - _values(b)
    observed = np.abs(diff.mean(axis=0))
    rng = np.random.default_rng(seed)
    hits = np.zeros_like(observed)
    for _ in range(n_perm):
        signs = rng.choice([-1.0, 1.0], size=len(diff)).reshape(-1, *([1] * (diff.ndim - 1)))
        hits += np.abs((signs * diff).mean(axis=0)) >= observed - 1e-12
    return (1 + hits) / (1 + n_perm)


def normalized_patching(patched: np.ndarray, clean: np.ndarray, corrupt: np.ndarray) -> np.ndarray:
    """``(patched - corrupt) / (clean - corrupt)``: 0 where patching changed nothing, 1 where it restored the clean
    value; NaN where clean equals corrupt (nothing to restore). ``clean``/``corrupt`` broadcast over ``patched``."""
    gap = np.asarray(clean, np.float64) - np.asarray(corrupt, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(gap != 0, (np.asarray(patched, np.float64) - corrupt) / np.where(gap != 0, gap, 1), np.nan)


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub markdown table (``|`` in cells escaped)."""
    def cell(v: object) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
