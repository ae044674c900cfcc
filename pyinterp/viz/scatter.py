"""A log-log scatter plot (drift of feature densities), drawn with the fonts and helpers of
:mod:`pyinterp.viz.plot`."""

from __future__ import annotations

import math

import cv2
import numpy as np

from pyinterp.errors import PyinterpError
from pyinterp.viz.charts import SERIES_COLORS
from pyinterp.viz.plot import GRAY, LABEL_PX, PAD, TICK, TITLE_PX, canvas, paste_dark, title_height, vertical_text
from pyinterp.viz.text import cap_height, draw_text, text_width

SIDE = 420  # plot area, pixels
# group colours (BGR): grey for the first group, then matplotlib's red, orange, green
GROUP_COLORS = ((170, 170, 170), SERIES_COLORS[3], SERIES_COLORS[1], SERIES_COLORS[2])


def loglog_scatter(x: np.ndarray, y: np.ndarray, group: np.ndarray, names: list[str], *, title: str,
                   x_name: str, y_name: str) -> np.ndarray:
    """Points ``(x[i], y[i])`` (all > 0, ``[n]``) on shared log axes with decade ticks and the diagonal
    ``y = x``; ``group[i]`` indexes ``names`` and picks the colour (group 0 first, so the others sit on top);
    a legend of the groups present. Returns a BGR image."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.size == 0 or not (np.all(x > 0) and np.all(y > 0)):
        raise PyinterpError("a log-log scatter needs the same number (> 0) of positive x and y values")
    lo = math.floor(math.log10(min(x.min(), y.min())))
    hi = max(math.ceil(math.log10(max(x.max(), y.max()))), lo + 1)
    left, top = 2 * PAD + text_width("1e-10", LABEL_PX) + TICK + cap_height(LABEL_PX) + PAD, title_height() + PAD
    image = canvas(top + SIDE + TICK + 3 * PAD + 2 * cap_height(LABEL_PX) + PAD,
                   max(left + SIDE + 2 * PAD, text_width(title, TITLE_PX) + 2 * PAD))
    draw_text(image, title, PAD, top - PAD, TITLE_PX)

    def px(vx: np.ndarray, vy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        fx = (np.log10(vx) - lo) / (hi - lo)
        fy = (np.log10(vy) - lo) / (hi - lo)
        return np.round(left + fx * SIDE).astype(int), np.round(top + SIDE - fy * SIDE).astype(int)

    cv2.rectangle(image, (left, top), (left + SIDE, top + SIDE), GRAY, 1)
    text_h = cap_height(LABEL_PX)
    for e in range(lo, hi + 1):
        (gx,), (gy,) = px(np.array([10.0**e]), np.array([10.0**e]))
        label = f"1e{e}"
        cv2.line(image, (gx, top + SIDE), (gx, top + SIDE + TICK), GRAY, 1)
        draw_text(image, label, gx - text_width(label, LABEL_PX) // 2, top + SIDE + TICK + PAD + text_h, LABEL_PX)
        cv2.line(image, (left - TICK, gy), (left, gy), GRAY, 1)
        draw_text(image, label, left - TICK - 2 - text_width(label, LABEL_PX), gy + text_h // 2, LABEL_PX)
    cv2.line(image, (left, top + SIDE), (left + SIDE, top), (210, 210, 210), 1, cv2.LINE_AA)
    draw_text(image, x_name, left + (SIDE - text_width(x_name, LABEL_PX)) // 2,
              top + SIDE + TICK + 3 * PAD + 2 * text_h, LABEL_PX)
    block = vertical_text(y_name)
    paste_dark(image, block, PAD, top + (SIDE - block.shape[0]) // 2)
    gx, gy = px(x, y)
    for g in range(len(names)):
        for cx, cy in zip(gx[group == g], gy[group == g], strict=True):
            cv2.circle(image, (int(cx), int(cy)), 3, GROUP_COLORS[g % len(GROUP_COLORS)], -1, cv2.LINE_AA)
    present = [g for g in range(len(names)) if np.any(group == g)]
    for k, g in enumerate(present):
        ly = top + PAD + k * (text_h + PAD) + text_h // 2
        cv2.circle(image, (left + 2 * PAD, ly), 4, GROUP_COLORS[g % len(GROUP_COLORS)], -1, cv2.LINE_AA)
        draw_text(image, f"{names[g]} ({int(np.sum(group == g))})", left + 3 * PAD + 4, ly + text_h // 2, LABEL_PX)
    return image
