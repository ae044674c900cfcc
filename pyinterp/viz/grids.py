"""Heatmaps of values in the data's own units (patching sweeps, head scans, logit attribution, SAE activations).

Signed values go on a diverging scale centred on 0: blue for negative, white for 0, red for positive, with
symmetric limits ``±max|v|`` so that the hue says the sign and the depth the magnitude. Other values go on the
sequential scale of :mod:`pyinterp.viz.plot` from their minimum to their maximum. Either way the colour bar's
ticks are values of the data (round numbers and the two ends), and the bar is labelled with the unit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from pyinterp.errors import PyinterpError
from pyinterp.viz.plot import (COLORBAR_MIN_H, COLORS, LABEL_PX, LENS_CELL_H, NICE_STEPS, PAD, SCORE_CELL_W, SIGNED_COLORS,
                               colorbar, cell_table, compose, font_px, title_height)
from pyinterp.viz.text import text_width

MAX_INTERVALS = 6  # round ticks a colour bar gets between its ends, at most this many intervals


def nice_step(span: float, max_intervals: int = MAX_INTERVALS) -> float:
    """The smallest 1, 2 or 5 times a power of ten that cuts ``span`` (> 0) into at most ``max_intervals``."""
    scale = 10.0 ** math.floor(math.log10(span / max_intervals))
    for k in (1, 10):
        for nice in NICE_STEPS:
            if span / (nice * scale * k) <= max_intervals * (1 + 1e-9):
                return nice * scale * k
    raise AssertionError("unreachable: 10 * scale >= span / max_intervals")


def tick_text(value: float) -> str:
    """A tick label: three significant digits, no trailing zeros, ``0`` for zero."""
    return "0" if value == 0 else f"{value:.3g}"


def data_ticks(lo: float, hi: float, height: int) -> list[tuple[float, str]]:
    """Ticks of a colour bar ``height`` px high mapping ``lo``..``hi`` (``lo < hi``) to 0..1: ``(position in 0..1,
    label)`` for both ends, labelled with their values, and each round value between them (:func:`nice_step`)
    at least one label line away from the ends; 0 whenever it is in range."""
    step = nice_step(hi - lo)
    room = font_px() / max(height - 1, 1)  # one label line, as a fraction of the bar
    ticks = [(0.0, tick_text(lo)), (1.0, tick_text(hi))]
    for k in range(math.ceil(lo / step), math.floor(hi / step) + 1):
        position = (k * step - lo) / (hi - lo)
        if room <= position <= 1 - room:
            ticks.append((position, tick_text(round(k * step, 12))))
    return ticks


def _cell_texts(values: np.ndarray, texts: list[list[str]] | None = None) -> tuple[list[list[str]], int]:
    """Each value to two decimals (or the ``texts`` given), and a cell width that fits the widest."""
    texts = texts or [[f"{v:.2f}" for v in row] for row in values]
    return texts, max(SCORE_CELL_W, max(text_width(t, LABEL_PX) for row in texts for t in row) + 8)


def _check(values: np.ndarray, row_labels: list[str], col_labels: list[str]) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape != (len(row_labels), len(col_labels)) or not np.all(np.isfinite(values)):
        raise PyinterpError(f"need a finite 2-D table of {len(row_labels)} x {len(col_labels)} values, "
                            f"got shape {values.shape}")
    return values


def value_grid(values: np.ndarray, *, title: str, row_labels: list[str], col_labels: list[str], signed: bool = False,
               unit: str = "", row_name: str = "", col_name: str = "") -> np.ndarray:
    """Draw one ``[n_rows, n_cols]`` table of real values: row 0 at the BOTTOM, each cell labelled with its value
    to two decimals (cells widen to fit). ``signed``: white at 0, red up to ``+max|v|``, blue down to ``-max|v|``;
    otherwise the table's minimum to its maximum on the sequential scale (a constant table is all its lowest
    colour). The colour bar's ticks are values of the table (:func:`data_ticks`) and it is labelled ``unit``;
    ``row_name``/``col_name`` name the axes; ``title`` goes above, wrapped to the picture's width."""
    values = _check(values, row_labels, col_labels)
    if signed:
        return signed_grid(values, title=title, row_labels=row_labels, col_labels=col_labels, unit=unit,
                           row_name=row_name, col_name=col_name)
    lo, hi = float(values.min()), float(values.max())
    colour = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    texts, cell_w = _cell_texts(values)
    table = cell_table(colour, texts, row_labels, col_labels, "", cell_w, LENS_CELL_H, COLORS, row_name, col_name)
    height = max(values.shape[0] * LENS_CELL_H, COLORBAR_MIN_H)
    ticks = data_ticks(lo, hi, height) if hi > lo else [(0.0, tick_text(lo))]
    return compose([(table, False), (colorbar(height, COLORS, ticks, unit), True)], PAD, title)


def signed_grid(values: np.ndarray, *, title: str = "", row_labels: list[str], col_labels: list[str],
                blocks: Sequence[tuple[int, int, str, str]] | None = None, unit: str = "", row_name: str = "",
                col_name: str = "", texts: list[list[str]] | None = None) -> np.ndarray:
    """Draw a ``[n_rows, n_cols]`` table of signed values (logit contributions, metric changes) on the diverging
    scale: white for 0, red for ``+s``, blue for ``-s``, row 0 at the BOTTOM, each cell labelled with its value.

    ``blocks``: ``(first column, end column, name, axis title)`` of column ranges drawn as separate titled tables
    (default one block, no name, ``col_name`` its columns' axis title), each with
    its own symmetric scale ``s = max|v|`` over its cells and its own colour bar, so that one large term in one
    block does not wash out the others (say so in ``title``). Each colour bar's
    ticks are values (:func:`data_ticks`) and it is labelled ``unit``. ``texts``: the cells' labels instead of
    their values (a mean and its interval)."""
    values = _check(values, row_labels, col_labels)
    blocks = [(0, values.shape[1], "", col_name)] if blocks is None else list(blocks)
    named = any(name for _, _, name, _ in blocks)
    texts, cell_w = _cell_texts(values, texts)
    height = max(values.shape[0] * LENS_CELL_H, COLORBAR_MIN_H)
    parts = []
    for first, end, name, axis in blocks:
        part = values[:, first:end]
        scale = float(np.abs(part).max()) or 1.0
        table = cell_table(0.5 + part / (2 * scale), [row[first:end] for row in texts], row_labels, col_labels[first:end],
                       name or (" " if named else ""), cell_w, LENS_CELL_H, SIGNED_COLORS, row_name, axis)
        parts += [(table, False), (colorbar(height, SIGNED_COLORS, data_ticks(-scale, scale, height), unit), True)]
    return compose(parts, title_height() if named else PAD, title)
