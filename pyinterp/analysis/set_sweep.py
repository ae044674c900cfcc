"""Patching sweeps and head scans over a prompt set: every example's cells (each the sweep of
:mod:`pyinterp.analysis.patching` on that example, so each cell is bit for bit a run of its own), its clean and
corrupt baselines, and the aggregate of every cell (:mod:`pyinterp.analysis.stats`).

Kinds (``[n_examples, n_layers, n_columns]`` values):

- ``"patch"``: :func:`~pyinterp.analysis.patching.patch_sweep`, layers x positions. Prompts of a set may differ in
  length, so positions are **aligned from the end**: column ``-1`` is each example's last token, ``-2`` the one
  before, and so on back to the length of the shortest example (its first token). Within an example the clean
  and corrupted prompts must have as many tokens.
- ``"patch_heads"``: :func:`~pyinterp.analysis.patching.head_patch_scan`, layers x heads.
- ``"heads"``: :func:`~pyinterp.analysis.patching.head_ablation_scan` of the clean prompt (or ``prompt``), layers x
  heads; values are ``metric(ablated) - metric(plain)`` and there is no corrupted prompt.

Per cell, the aggregate is the :func:`~pyinterp.analysis.stats.summarize` of the raw values, a paired permutation
p-value of the patched values against the corrupt baseline (for ``"heads"``: of the change against 0), and for the
patching kinds the summary of the normalised metric ``(patched - corrupt) / (clean - corrupt)`` over the examples
whose clean and corrupt baselines differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import numpy as np

from pyinterp.analysis.patching import (Metric, MetricFn, bind_metric, checked_layers, head_ablation_scan, head_patch_scan,
                                        patch_sweep, run_metric)
from pyinterp.analysis.prompts import Example
from pyinterp.analysis.stats import Summary, normalized_patching, permutation_p, summarize
from pyinterp.errors import InputError

if TYPE_CHECKING:
    from pyinterp.model import Model

KINDS = ("patch", "patch_heads", "heads")


@dataclass
class SetAggregate:
    """The aggregate of every cell: ``raw`` (of the values), ``p`` ``[n_layers, n_columns]`` (permutation p-values)
    and ``normalized`` (None for head ablation, or when no example's baselines differ)."""

    raw: Summary
    p: np.ndarray
    normalized: Summary | None


@dataclass
class SetSweep:
    """A sweep over a prompt set (see the module doc).

    ``values`` ``[n_examples, n_layers, n_columns]``; ``clean``/``corrupt`` ``[n_examples]`` the metric of each
    example's plain clean and corrupted runs (``corrupt`` None for ``"heads"``); ``positions`` ``[n_examples,
    n_columns]`` each column's absolute token position in each example (None for the head kinds); ``tokens`` the
    text of those tokens (of the clean prompt); ``metrics`` each example's metric in words (None for callables)."""

    kind: str
    tensor: str | None
    layers: list[int]
    columns: list[str]
    examples: list[Example]
    metrics: list[str | None]
    clean: np.ndarray
    corrupt: np.ndarray | None
    values: np.ndarray
    positions: np.ndarray | None
    tokens: list[list[str]] | None

    def normalized(self) -> np.ndarray | None:
        """``(values - corrupt) / (clean - corrupt)`` per example ``[n_examples, n_layers, n_columns]`` (NaN for
        an example whose baselines are equal); None for head ablation."""
        if self.corrupt is None:
            return None
        return normalized_patching(self.values, self.clean[:, None, None], self.corrupt[:, None, None])

    def aggregate(self, seed: int = 0) -> SetAggregate:
        """Every cell's summary and permutation p-value, seeded (bootstrap and permutations)."""
        raw = summarize(self.values, seed)
        if self.corrupt is None:
            return SetAggregate(raw, permutation_p(self.values, np.zeros_like(self.values), seed), None)
        p = permutation_p(self.values, np.broadcast_to(self.corrupt[:, None, None], self.values.shape), seed)
        keep = self.clean != self.corrupt
        norm = summarize(self.normalized()[keep], seed) if keep.any() else None
        return SetAggregate(raw, p, norm)


def _example_ids(model: Model, ex: Example, kind: str, source: str) -> tuple[list[int], list[int] | None]:
    clean = ex.text
    if clean is None:
        raise InputError(f"{source}:{ex.line}: no 'clean' (or 'prompt') field")
    clean_ids = model.prompt_ids(clean)
    if kind == "heads":
        return clean_ids, None
    if ex.corrupt is None:
        raise InputError(f"{source}:{ex.line}: no 'corrupt' field (a patching sweep needs clean and corrupt)")
    corrupt_ids = model.prompt_ids(ex.corrupt)
    if len(clean_ids) != len(corrupt_ids):
        raise InputError(f"{source}:{ex.line}: the clean prompt has {len(clean_ids)} tokens and the corrupted one "
                         f"{len(corrupt_ids)}; patching needs equal counts")
    return clean_ids, corrupt_ids


def set_sweep(model: Model, examples: Sequence[Example], metrics: Sequence[Metric | MetricFn], kind: str = "patch", *,
              tensor: str = "l_out", layers: Iterable[int] | None = None, source: str = "prompt set",
              on_cell: Callable[[], None] | None = None) -> SetSweep:
    """Run the sweep ``kind`` (``"patch"``, ``"patch_heads"`` or ``"heads"``) on every example, with that example's
    metric (``metrics[i]``, a :class:`~pyinterp.analysis.patching.Metric` or a callable on the last token's
    logits). ``tensor``: the rows patched (``"patch"`` only). ``source`` names the file in errors
    (``FILE:LINE: ...``). ``on_cell`` is called after each cell of each example (progress)."""
    if kind not in KINDS:
        raise InputError(f"unknown sweep kind {kind!r}; one of {', '.join(KINDS)}")
    examples = list(examples)
    if not examples or len(metrics) != len(examples):
        raise InputError(f"need one metric per example, got {len(metrics)} for {len(examples)} examples")
    layers = checked_layers(model, layers)
    ids = [_example_ids(model, ex, kind, source) for ex in examples]
    n_pos = min(len(clean) for clean, _ in ids)
    offsets = list(range(-n_pos, 0))
    clean_v, corrupt_v, values = [], [], []
    for (clean_ids, corrupt_ids), metric in zip(ids, metrics, strict=True):
        fn = bind_metric(model, metric)
        clean_v.append(run_metric(model, clean_ids, fn))
        if kind == "heads":
            values.append(head_ablation_scan(model, clean_ids, fn, layers, on_cell=on_cell))
            continue
        corrupt_v.append(run_metric(model, corrupt_ids, fn))
        if kind == "patch":
            values.append(patch_sweep(model, clean_ids, corrupt_ids, metric=fn, tensor=tensor, layers=layers,
                                      positions=offsets, on_cell=on_cell))
        else:
            values.append(head_patch_scan(model, clean_ids, corrupt_ids, fn, layers, on_cell=on_cell))
    positions = tokens = None
    if kind == "patch":
        columns = [str(k) for k in offsets]
        positions = np.array([[len(clean) + k for k in offsets] for clean, _ in ids])
        tokens = [[model.token_str(clean[p]) for p in row] for (clean, _), row in zip(ids, positions, strict=True)]
    else:
        columns = [str(h) for h in range(model.n_head)]
    return SetSweep(kind, tensor if kind == "patch" else ("kqv_heads" if kind == "patch_heads" else None), layers,
                    columns, examples, [m.describe(model) if isinstance(m, Metric) else None for m in metrics],
                    np.array(clean_v), np.array(corrupt_v) if kind != "heads" else None, np.stack(values),
                    positions, tokens)


def example_rows(result: SetSweep) -> tuple[list[str], list[list]]:
    """The per-example table: one row per example and cell (header, rows), with both baselines beside each cell."""
    header = ["example", "line", "layer", "column", "position", "token", "value", "normalized", "clean_value",
              "corrupt_value"]
    norm = result.normalized()
    rows = []
    for i, ex in enumerate(result.examples):
        for j, il in enumerate(result.layers):
            for k, column in enumerate(result.columns):
                pos = "" if result.positions is None else int(result.positions[i, k])
                token = "" if result.tokens is None else result.tokens[i][k]
                rows.append([i, ex.line, il, column, pos, token, float(result.values[i, j, k]),
                             "" if norm is None else _num(norm[i, j, k]), float(result.clean[i]),
                             "" if result.corrupt is None else float(result.corrupt[i])])
    return header, rows


def aggregate_rows(result: SetSweep, agg: SetAggregate) -> tuple[list[str], list[list]]:
    """The aggregate table: one row per cell (header, rows)."""
    header = ["layer", "column", "n", "mean", "std", "low", "high", "p", "norm_n", "norm_mean", "norm_std",
              "norm_low", "norm_high"]
    rows = []
    for j, il in enumerate(result.layers):
        for k, column in enumerate(result.columns):
            raw = [float(getattr(agg.raw, s)[j, k]) for s in ("mean", "std", "low", "high")]
            norm = ["", "", "", "", ""] if agg.normalized is None else [agg.normalized.n, *(
                _num(getattr(agg.normalized, s)[j, k]) for s in ("mean", "std", "low", "high"))]
            rows.append([il, column, agg.raw.n, *raw, float(agg.p[j, k]), *norm])
    return header, rows


def _num(value: float) -> float | None:
    """A finite float, or None (NaN has no JSON)."""
    return float(value) if np.isfinite(value) else None
