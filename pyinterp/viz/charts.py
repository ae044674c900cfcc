"""Line charts: one chart per panel in a grid (the fidelity report's per-layer similarities; the model comparison's
curves over relative depth with their intervals as bands), drawn with the same fonts, margins and helpers as the
heatmaps of :mod:`pyinterp.viz.plot`."""

from __future__ import annotations

import math
from typing import Sequence

import cv2
import numpy as np

from pyinterp.errors import PyinterpError
from pyinterp.viz.plot import (GRAY, LABEL_PX, NICE_STEPS, PAD, TICK, TITLE_PX, canvas, font_px, label_step,
                               max_text_width, paste, paste_dark, step_labels, title_height, vertical_text)
from pyinterp.viz.text import cap_height, draw_text, line_extent, text_width

CHART_W = 360  # plot area of one line chart, pixels
CHART_H = 180
# line colours (BGR): blue, orange, green, red (matplotlib's first four)
SERIES_COLORS = ((180, 119, 31), (14, 127, 255), (44, 160, 44), (40, 39, 214))
# an axis maximum of 1, 2 or 5 (times a power of ten) is cut into this many intervals: steps of 0.2, 0.5, 1
_AXIS_INTERVALS = {1: 5, 2: 4, 5: 5}


def value_axis(value: float) -> tuple[float, int]:
    """A y axis for values up to ``value``: (maximum, intervals), the maximum the smallest 1, 2 or 5 times a
    power of ten that is >= ``value`` (1 for 0 or less), cut into round steps."""
    if not value > 0:
        return 1.0, 5
    scale = 10.0 ** math.floor(math.log10(value))
    for nice in (*NICE_STEPS, 10):
        if nice * scale >= value * (1 - 1e-12):
            return (scale * 10, 5) if nice == 10 else (nice * scale, _AXIS_INTERVALS[nice])
    raise AssertionError("unreachable: 10 * scale > value")


def line_charts(
    panels: Sequence[tuple[str, dict[str, np.ndarray]]],
    x_labels: list[str],
    *,
    title: str = "",
    x_name: str = "layer",
    n_cols: int = 2,
    legend_bottom: bool = False,
    bands: Sequence[dict[str, tuple[np.ndarray, np.ndarray]]] | None = None,
) -> np.ndarray:
    """Draw one line chart per panel in a grid of ``n_cols`` columns, ``title`` above them all.

    A panel is ``(name, {series name: values})``, every series ``[len(x_labels)]``; it is drawn as lines
    with a dot per value over x positions labelled with ``x_labels`` (thinned as in :func:`attention_sheet`)
    and named ``x_name``, on a y axis from 0 to a round number above the panel's largest value, with
    labelled ticks at round steps (:func:`value_axis`). A panel with several series gets a legend in its
    top left corner (``legend_bottom``: bottom left, for values near the top, as accuracies). A ``title`` with
    newlines is several lines. ``bands`` (one dict per panel): a series' interval ``(low, high)``, drawn as a light
    band of its colour behind its line.
    """
    n = len(x_labels)
    if not panels or n == 0 or any(not series or any(np.shape(v) != (n,) for v in series.values())
                                   for _, series in panels):
        raise PyinterpError(f"need panels with series of {n} values each, got "
                            f"{[(name, [np.shape(v) for v in s.values()]) for name, s in panels]}")
    bands = bands or [{} for _ in panels]
    if len(bands) != len(panels):
        raise PyinterpError(f"need one dict of bands per panel, got {len(bands)} for {len(panels)} panels")
    charts = [_line_chart(name, series, x_labels, x_name, band, legend_bottom)
              for (name, series), band in zip(panels, bands)]
    h, w = charts[0].shape[:2]
    n_rows = math.ceil(len(charts) / n_cols)
    lines = title.split("\n") if title else []
    line_h = sum(line_extent(TITLE_PX)) + PAD
    above = len(lines) * line_h + PAD if lines else 0
    width = max([min(n_cols, len(charts)) * w] + [text_width(line, TITLE_PX) + 2 * PAD for line in lines])
    image = canvas(above + n_rows * h, width)
    for k, line in enumerate(lines):
        draw_text(image, line, PAD, PAD + k * line_h + line_extent(TITLE_PX)[0], TITLE_PX)
    for i, chart in enumerate(charts):
        paste(image, chart, (i % n_cols) * w, above + (i // n_cols) * h)
    return image


def _line_chart(name: str, series: dict[str, np.ndarray], x_labels: list[str], x_name: str,
                bands: dict[str, tuple[np.ndarray, np.ndarray]], legend_bottom: bool = False) -> np.ndarray:
    """One titled chart of ``series`` (and their ``bands``) over ``x_labels``; every chart has the same size."""
    highs = [float(np.nanmax(v)) for v in series.values()] + [float(np.nanmax(hi)) for _, hi in bands.values()]
    top_value, intervals = value_axis(max(highs))
    ticks = [top_value * i / intervals for i in range(intervals + 1)]
    tick_text = [f"{v:.3g}" for v in ticks]
    left = 2 * PAD + max_text_width(["0.0000"]) + TICK  # the same for every chart, so a grid lines up
    top = title_height()
    step = CHART_W / max(len(x_labels) - 1, 1)
    labels = step_labels(x_labels, label_step(len(x_labels), int(step), font_px()))
    label_h = max_text_width(labels.values())
    image = canvas(top + CHART_H + TICK + PAD + label_h + PAD + font_px() + PAD, left + CHART_W + 3 * PAD)
    draw_text(image, name, left, top - PAD, TITLE_PX)
    cv2.rectangle(image, (left, top), (left + CHART_W, top + CHART_H), GRAY, 1)
    text_h = cap_height(LABEL_PX)
    for value, text in zip(ticks, tick_text, strict=True):
        y = top + CHART_H - round(value / top_value * CHART_H)
        cv2.line(image, (left - TICK, y), (left, y), GRAY, 1)
        draw_text(image, text, left - TICK - 2 - text_width(text, LABEL_PX), y + text_h // 2, LABEL_PX)

    def point(i: int, value: float) -> tuple[int, int]:
        return left + round(i * step), top + CHART_H - round(float(value) / top_value * CHART_H)

    for i, text in labels.items():
        x = point(i, 0)[0]
        cv2.line(image, (x, top + CHART_H), (x, top + CHART_H + TICK), GRAY, 1)
        block = vertical_text(text)
        paste_dark(image, block, x - block.shape[1] // 2, top + CHART_H + TICK + 2)
    axis_y = top + CHART_H + TICK + PAD + label_h + PAD + font_px()
    draw_text(image, x_name, left + (CHART_W - text_width(x_name, LABEL_PX)) // 2, axis_y, LABEL_PX)

    for k, label in enumerate(series):
        if label in bands:
            low, high = (np.nan_to_num(np.asarray(v, dtype=np.float64)) for v in bands[label])
            outline = [point(i, v) for i, v in enumerate(high)] + [point(i, v) for i, v in reversed(list(enumerate(low)))]
            shade = image.copy()
            cv2.fillPoly(shade, [np.array(outline, dtype=np.int32)], SERIES_COLORS[k % len(SERIES_COLORS)], cv2.LINE_AA)
            image[:] = cv2.addWeighted(shade, 0.25, image, 0.75, 0)
    for k, values in enumerate(series.values()):
        color = SERIES_COLORS[k % len(SERIES_COLORS)]
        points = np.array([point(i, v) for i, v in enumerate(np.nan_to_num(values))], dtype=np.int32)
        cv2.polylines(image, [points], False, color, 2, cv2.LINE_AA)
        for x, y in points:
            cv2.circle(image, (int(x), int(y)), 3, color, -1, cv2.LINE_AA)
    if len(series) > 1:
        for k, label in enumerate(series):
            y = top + PAD + k * font_px() + text_h // 2
            if legend_bottom:
                y += CHART_H - 2 * PAD - len(series) * font_px()
            cv2.line(image, (left + PAD, y), (left + PAD + 16, y), SERIES_COLORS[k % len(SERIES_COLORS)], 2)
            draw_text(image, label, left + 2 * PAD + 16, y + text_h // 2, LABEL_PX)
    return image


def band_charts(
    panels: Sequence[tuple[str, dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]], bool]],
    *,
    title: str = "",
    x_name: str = "relative depth",
    n_cols: int = 3,
) -> np.ndarray:
    """Line charts over a continuous x axis from 0 to 1, each line with a shaded band: one chart per panel.

    A panel is ``(name, {series name: (x, mean, low, high)}, log)``; the arrays of one series share a length, the
    series of a panel may differ (models of different depths); ``log``: a log10 y axis (values > 0, decade ticks),
    else linear from 0 to a round number above the largest ``high``. Series keep their colour across panels; the
    legend is in the first panel.
    """
    if not panels or any(not series for _, series, _ in panels):
        raise PyinterpError("need panels with at least one series each")
    charts = [_band_chart(name, series, log, x_name, legend=i == 0) for i, (name, series, log) in enumerate(panels)]
    h, w = charts[0].shape[:2]
    n_rows = math.ceil(len(charts) / n_cols)
    above = title_height() + PAD if title else 0
    image = canvas(above + n_rows * h, max(min(n_cols, len(charts)) * w, text_width(title, TITLE_PX) + 2 * PAD))
    if title:
        draw_text(image, title, PAD, PAD + line_extent(TITLE_PX)[0], TITLE_PX)
    for i, chart in enumerate(charts):
        paste(image, chart, (i % n_cols) * w, above + (i // n_cols) * h)
    return image


def _band_chart(name: str, series: dict[str, tuple[np.ndarray, ...]], log: bool, x_name: str,
                legend: bool) -> np.ndarray:
    """One chart of ``band_charts``; every chart has the same size."""
    highs = [float(np.nanmax(s[3])) for s in series.values()]
    if log:
        lo_exp = 0
        hi_exp = max(1, math.ceil(math.log10(max(max(highs), 1.0))))
        ticks = [float(10**e) for e in range(lo_exp, hi_exp + 1)]
        tick_text = [f"{10**e:g}" if e < 4 else f"1e{e}" for e in range(lo_exp, hi_exp + 1)]

        def frac(v: np.ndarray) -> np.ndarray:
            return (np.log10(np.maximum(v, 1.0)) - lo_exp) / (hi_exp - lo_exp)
    else:
        top_value, intervals = value_axis(max(highs))
        ticks = [top_value * i / intervals for i in range(intervals + 1)]
        tick_text = [f"{v:.3g}" for v in ticks]

        def frac(v: np.ndarray) -> np.ndarray:
            return np.asarray(v, np.float64) / top_value
    left = 2 * PAD + max_text_width(["0.0000"]) + TICK
    top = title_height()
    image = canvas(top + CHART_H + TICK + 2 * PAD + 2 * font_px() + PAD, left + CHART_W + 3 * PAD)
    draw_text(image, name, left, top - PAD, TITLE_PX)
    cv2.rectangle(image, (left, top), (left + CHART_W, top + CHART_H), GRAY, 1)
    text_h = cap_height(LABEL_PX)

    def points(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        fy = np.clip(np.nan_to_num(frac(y)), 0, 1)
        return np.stack([left + np.round(np.asarray(x) * CHART_W), top + CHART_H - np.round(fy * CHART_H)], 1).astype(np.int32)

    for value, text in zip(ticks, tick_text, strict=True):
        y = int(points(np.zeros(1), np.array([value]))[0, 1])
        cv2.line(image, (left - TICK, y), (left, y), GRAY, 1)
        draw_text(image, text, left - TICK - 2 - text_width(text, LABEL_PX), y + text_h // 2, LABEL_PX)
    for k in range(7):  # x ticks at sixths
        x = left + round(k / 6 * CHART_W)
        text = ("0", "1/6", "1/3", "1/2", "2/3", "5/6", "1")[k]
        cv2.line(image, (x, top + CHART_H), (x, top + CHART_H + TICK), GRAY, 1)
        draw_text(image, text, x - text_width(text, LABEL_PX) // 2, top + CHART_H + TICK + PAD + text_h, LABEL_PX)
    draw_text(image, x_name, left + (CHART_W - text_width(x_name, LABEL_PX)) // 2,
              top + CHART_H + TICK + 2 * PAD + text_h + font_px(), LABEL_PX)
    for k, (x, mean, low, high) in enumerate(series.values()):
        color = SERIES_COLORS[k % len(SERIES_COLORS)]
        band = np.concatenate([points(x, high), points(x, low)[::-1]])
        shade = image.copy()
        cv2.fillPoly(shade, [band], color, cv2.LINE_AA)
        cv2.addWeighted(shade, 0.2, image, 0.8, 0, dst=image)
        cv2.polylines(image, [points(x, mean)], False, color, 2, cv2.LINE_AA)
    if legend:
        for k, label in enumerate(series):
            y = top + PAD + k * font_px() + text_h // 2
            cv2.line(image, (left + PAD, y), (left + PAD + 16, y), SERIES_COLORS[k % len(SERIES_COLORS)], 2)
            draw_text(image, label, left + 2 * PAD + 16, y + text_h // 2, LABEL_PX)
    return image
