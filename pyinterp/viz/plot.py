"""Pictures of attention patterns, logit-lens tables and line charts, drawn with OpenCV.

Every function returns a BGR ``uint8`` image on a white background (the OpenCV convention), so the
result can be shown with ``cv2.imshow``, written with :func:`save_png`, or handed to any other
image code. Probabilities use one fixed colour scale, 0 to 1 on ``cv2.COLORMAP_VIRIDIS`` (dark
purple for 0, yellow for 1), so pictures of different heads or layers can be compared by eye.

Text is drawn with :mod:`pyinterp.viz.text` (Noto fonts, any script); token text goes through
:func:`sanitize_label` first.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np

from pyinterp.errors import PyinterpError
from pyinterp.io.atomic import atomic_write
from pyinterp.viz.text import cap_height, draw_text, line_extent, text_width

LABEL_PX = 12  # font sizes in pixels
TITLE_PX = 14
MAX_LABEL_CHARS = 12
PAD = 6
TICK = 3
BLACK = (0, 0, 0)
WHITE = (255, 255, 255)
GRAY = (128, 128, 128)

LENS_CELL_W = 64
LENS_CELL_H = 22
LENS_MAX_FULL_TOKENS = 60
SCORE_CELL_W = 40  # "0.93" and a margin
LENS_MIN_TEXT_W = 24  # narrower cells get no text: two or three characters is all that would fit

COLORBAR_W = 14
COLORBAR_MIN_H = 120
COLORBAR_TICKS = ((1.0, "1"), (0.5, "0.5"), (0.0, "0"))
MIN_TITLE_W = 360  # a title is wrapped to the picture's width, or this many pixels when that is less

# The colormap as a [256, 3] BGR lookup table: row i is the colour of probability i / 255.
COLORS = cv2.applyColorMap(np.arange(256, dtype=np.uint8).reshape(-1, 1), cv2.COLORMAP_VIRIDIS)[:, 0]
# A diverging lookup table for signed values scaled to 0..1 (0.5 = zero): blue, white, red (BGR)
_RAMP = np.linspace(-1.0, 1.0, 256)[:, None]
SIGNED_COLORS = np.round(np.where(_RAMP < 0, (1 + _RAMP) * np.array([247, 247, 247]) - _RAMP * np.array([172, 102, 33]),
                                  (1 - _RAMP) * np.array([247, 247, 247]) + _RAMP * np.array([43, 24, 178]))).astype(np.uint8)

NICE_STEPS = (1, 2, 5)


def sanitize_label(text: str, max_chars: int = MAX_LABEL_CHARS) -> str:
    """Make token text a one-line label that shows what the token holds.

    Newlines, tabs and carriage returns become ``\\n``, ``\\t`` and ``\\r``; a leading space (or the
    SentencePiece marker ``▁``) becomes ``_``; other characters that print nothing (controls, other
    spaces, zero-width marks) and U+FFFD (the replacement character of a token that holds part of a
    UTF-8 sequence) become ``?``; every other character, in any script, stays. The result is cut to
    ``max_chars`` characters.
    """
    text = text.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r").replace("\u2581", " ")
    if text.startswith(" "):
        text = "_" + text[1:]
    text = "".join(c if c.isprintable() and c != "\ufffd" else "?" for c in text)
    return text[:max_chars]


def label_step(n_labels: int, cell_px: int, font_px: int) -> int:
    """Draw every k-th of ``n_labels`` labels spaced ``cell_px`` apart so ``font_px``-high text never overlaps.

    k is the smallest of 1, 2, 5, 10, 20, 50, ... with ``k * cell_px >= font_px`` (round steps make
    the labelled positions easy to count), and at most ``n_labels``.
    """
    cell_px = max(cell_px, 1)
    scale = 1
    while True:
        for nice in NICE_STEPS:
            step = nice * scale
            if step * cell_px >= font_px or step >= n_labels:
                return max(min(step, n_labels), 1)
        scale *= 10


def default_cell(n_tokens: int) -> int:
    """Cell size in pixels for an ``n_tokens`` x ``n_tokens`` attention panel: about 480 px wide in all."""
    return min(max(480 // max(n_tokens, 1), 2), 24)


def attention_sheet(
    attn: np.ndarray,
    tokens: list[str],
    *,
    title: str = "",
    heads: Sequence[int] | None = None,
    cell: int | None = None,
) -> np.ndarray:
    """Draw the attention patterns of one layer's heads as a grid of heatmaps.

    ``attn`` is ``[n_head, n_token, n_token]`` attention probabilities (query x key) and ``tokens``
    the ``n_token`` token strings. Each panel shows one head: queries top to bottom, keys left to
    right, query labels on the left and key labels (vertical, reading upwards) below; when the
    labels do not fit, only every k-th one is drawn (see :func:`label_step`). Panels are titled
    ``"{title} head {h}"`` with the real head index ``h``; ``heads`` picks which heads to draw
    (default all). ``cell`` is the size of one query-key cell in pixels (default
    :func:`default_cell`). A colour scale for 0..1 is drawn at the right.
    """
    attn = np.asarray(attn)
    n = len(tokens)
    if attn.ndim != 3 or attn.shape[1:] != (n, n):
        raise PyinterpError(f"attention must be [n_head, {n}, {n}] for {n} tokens, got shape {attn.shape}")
    heads = list(range(attn.shape[0])) if heads is None else [int(h) for h in heads]
    if not heads or any(not 0 <= h < attn.shape[0] for h in heads):
        raise PyinterpError(f"heads must be a non-empty selection of 0..{attn.shape[0] - 1}, got {heads}")
    cell = default_cell(n) if cell is None else max(int(cell), 1)
    prefix = f"{title} " if title else ""
    panels = [_attention_panel(attn[h], tokens, f"{prefix}head {h}", cell) for h in heads]

    panel_h, panel_w = panels[0].shape[:2]
    n_cols = math.ceil(math.sqrt(len(panels)))
    n_rows = math.ceil(len(panels) / n_cols)
    heat_top = title_height()
    bar = colorbar(max(n * cell, COLORBAR_MIN_H))
    bar_top = max(heat_top - _colorbar_margin(), 0)
    sheet_h = max(n_rows * panel_h, bar_top + bar.shape[0])
    sheet = canvas(sheet_h, n_cols * panel_w + bar.shape[1] + PAD)
    for i, panel in enumerate(panels):
        paste(sheet, panel, (i % n_cols) * panel_w, (i // n_cols) * panel_h)
    paste(sheet, bar, n_cols * panel_w, bar_top)
    return sheet


def lens_heatmap(
    top_prob: np.ndarray,
    top_str: list[list[str]],
    tokens: list[str],
    *,
    title: str = "",
    row_labels: list[str] | None = None,
) -> np.ndarray:
    """Draw a logit-lens table: one row per layer, one column per input token.

    ``top_prob[r, t]`` (values in 0..1) colours the cell of row ``r`` and token ``t``, and the text
    ``top_str[r][t]`` (the top-1 prediction) is written inside it, cut to fit, in black or white,
    whichever contrasts with the cell. Row 0 is at the BOTTOM, so layers stack upwards to the output.
    Rows are labelled on the left with ``row_labels`` (default ``"0"``, ``"1"``, ...), columns below
    with ``tokens`` (vertical, reading upwards). Cells are 64 x 22 px; for more than 60 tokens they
    get narrower (the table stays about 3840 px wide), the in-cell text shorter (none below 24 px),
    and the token labels thinned as in :func:`attention_sheet`. A colour scale for 0..1 is drawn at
    the right.
    """
    top_prob = np.asarray(top_prob)
    n_rows, n_tok = len(top_str), len(tokens)
    if top_prob.shape != (n_rows, n_tok) or any(len(row) != n_tok for row in top_str):
        raise PyinterpError(
            f"top_prob and top_str must both be [{n_rows}, {n_tok}] (rows x tokens), got top_prob {top_prob.shape}"
        )
    row_labels = [str(r) for r in range(n_rows)] if row_labels is None else row_labels
    if len(row_labels) != n_rows:
        raise PyinterpError(f"need {n_rows} row labels, got {len(row_labels)}")
    cell_w = LENS_CELL_W if n_tok <= LENS_MAX_FULL_TOKENS else max(LENS_CELL_W * LENS_MAX_FULL_TOKENS // n_tok, 1)
    table = cell_table(top_prob, top_str, row_labels, tokens, title, cell_w, LENS_CELL_H)
    return _with_colorbar([table], title_height() if title else PAD, n_rows * LENS_CELL_H)


def score_grids(
    grids: Sequence[np.ndarray],
    names: Sequence[str],
    *,
    title: str = "",
    row_labels: list[str] | None = None,
    col_labels: list[str] | None = None,
    texts: Sequence[list[list[str]]] | None = None,
) -> np.ndarray:
    """Draw several ``[n_rows, n_cols]`` tables of scores in 0..1 side by side, with one colour scale.

    Each table is drawn as in :func:`lens_heatmap` (row 0 at the BOTTOM, each cell coloured by its
    score and labelled with it to two decimals), titled with its entry of ``names``; ``title`` goes
    above them all. ``row_labels``/``col_labels`` default to ``"0"``, ``"1"``, ... Used for head
    scores: rows are layers, columns heads. ``texts``: each table's cell labels instead of the scores (cells
    widen to fit), e.g. a mean and its interval.
    """
    grids = [np.asarray(g, dtype=np.float64) for g in grids]
    if not grids or len(names) != len(grids) or not all(names) or any(g.ndim != 2 or g.shape != grids[0].shape
                                                                       for g in grids):
        raise PyinterpError(f"need grids of one 2-D shape, each with a name; got {[g.shape for g in grids]} "
                            f"and names {list(names)}")
    n_rows, n_cols = grids[0].shape
    row_labels = [str(r) for r in range(n_rows)] if row_labels is None else row_labels
    col_labels = [str(c) for c in range(n_cols)] if col_labels is None else col_labels
    if len(row_labels) != n_rows or len(col_labels) != n_cols:
        raise PyinterpError(f"need {n_rows} row labels and {n_cols} column labels, "
                            f"got {len(row_labels)} and {len(col_labels)}")
    texts = texts or [[[f"{v:.2f}" for v in row] for row in g] for g in grids]
    cell_w = max(SCORE_CELL_W, max(text_width(t, LABEL_PX) for table in texts for row in table for t in row) + 8)
    tables = [cell_table(g, text, row_labels, col_labels, name, cell_w, LENS_CELL_H)
              for g, text, name in zip(grids, texts, names, strict=True)]
    return _with_colorbar(tables, title_height(), n_rows * LENS_CELL_H, title)


def cell_table(values: np.ndarray, texts: list[list[str]], row_labels: list[str], col_labels: list[str], title: str,
           cell_w: int, cell_h: int, colors: np.ndarray = COLORS, row_name: str = "", col_name: str = "") -> np.ndarray:
    """A titled heatmap of ``values`` (``[n_rows, n_cols]``, 0..1) with row 0 at the bottom, ``texts`` written
    in the cells (when they are at least ``LENS_MIN_TEXT_W`` wide), rows labelled on the left and columns
    below (vertical, thinned as in :func:`attention_sheet`); ``row_name`` (vertical, left) and ``col_name``
    (below) name the axes. The heatmap starts ``title_height()`` (or ``PAD`` without a title) from the top."""
    rows_up = [sanitize_label(s) for s in reversed(row_labels)]  # top to bottom: last row first
    name_w = font_px() + PAD if row_name else 0  # a vertical axis title is one line wide
    left = name_w + max_text_width(rows_up) + PAD + TICK
    top = title_height() if title else PAD
    heat = _heat_block(values[::-1], cell_w, cell_h, colors)
    if cell_w >= LENS_MIN_TEXT_W:
        heat[:, ::cell_w] = 255  # white lines between cells keep neighbouring texts apart
        heat[::cell_h] = 255
        _write_cells(heat, texts[::-1], cell_w, cell_h, values[::-1], colors)

    labels = step_labels(col_labels, label_step(len(col_labels), cell_w, font_px()))
    labels_h = TICK + PAD + max_text_width(labels.values()) + PAD
    bottom = labels_h + (font_px() + PAD if col_name else 0)
    heat_w = max(heat.shape[1], text_width(col_name, LABEL_PX))
    image = canvas(top + heat.shape[0] + bottom, left + max(heat_w, text_width(title, TITLE_PX)) + PAD)
    if title:
        draw_text(image, title, left, top - PAD, TITLE_PX)
    paste(image, heat, left, top)
    _draw_row_labels(image, dict(enumerate(rows_up)), left, top, cell_h)
    _draw_col_labels(image, labels, left, top + heat.shape[0], cell_w)
    if row_name:
        block = vertical_text(row_name)
        paste_dark(image, block, PAD // 2, top + (heat.shape[0] - block.shape[0]) // 2)
    if col_name:
        x = left + max((heat.shape[1] - text_width(col_name, LABEL_PX)) // 2, 0)
        draw_text(image, col_name, x, top + heat.shape[0] + labels_h + line_extent(LABEL_PX)[0], LABEL_PX)
    return image


def _with_colorbar(tables: list[np.ndarray], heat_top: int, heat_h: int, title: str = "", colors: np.ndarray = COLORS,
                   ticks: Sequence[tuple[float, str]] = COLORBAR_TICKS) -> np.ndarray:
    """``tables`` (from :func:`cell_table`, their heatmaps ``heat_top`` px from their tops and ``heat_h`` px high) side
    by side, ``title`` above them all, and a 0..1 colour scale (``colors``, labelled ``ticks``) at the right
    beside the heatmaps."""
    bar = colorbar(max(heat_h, COLORBAR_MIN_H), colors, ticks)
    return compose([(t, False) for t in tables] + [(bar, True)], heat_top, title)


def compose(parts: list[tuple[np.ndarray, bool]], heat_top: int, title: str = "") -> np.ndarray:
    """Blocks side by side, left to right, under ``title`` (wrapped to the blocks' width, at least
    ``MIN_TITLE_W``). A part is ``(image, is_bar)``: a table (from :func:`cell_table`, its heatmap ``heat_top`` px
    from its top) or a colour bar (from :func:`colorbar`), whose scale starts level with the heatmaps."""
    width = sum(image.shape[1] for image, _ in parts)
    lines = wrap_text(title, max(width, MIN_TITLE_W) - 2 * PAD) if title else []
    line_h = sum(line_extent(TITLE_PX)) + PAD // 2
    above = len(lines) * line_h + PAD if lines else 0
    bar_top = max(above + heat_top - _colorbar_margin(), 0)
    height = max((bar_top if is_bar else above) + image.shape[0] for image, is_bar in parts)
    image = canvas(height, max([width] + [text_width(line, TITLE_PX) + 2 * PAD for line in lines]))
    for k, line in enumerate(lines):
        draw_text(image, line, PAD, PAD + k * line_h + line_extent(TITLE_PX)[0], TITLE_PX)
    x = 0
    for block, is_bar in parts:
        paste(image, block, x, bar_top if is_bar else above)
        x += block.shape[1]
    return image


def wrap_text(text: str, max_px: int) -> list[str]:
    """``text`` as lines at most ``max_px`` wide at the title size, broken at spaces (and at its newlines); a word
    wider than that is a line of its own."""
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            longer = f"{line} {word}" if line else word
            if line and text_width(longer, TITLE_PX) > max_px:
                lines.append(line)
                longer = word
            line = longer
        lines.append(line)
    return lines


def save_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    """Write ``image`` encoded by ``cv2.imencode`` (format from the extension), whole or not at all (see
    :mod:`pyinterp.io.atomic`), and return the path.

    Raises :class:`PyinterpError` when the directory does not exist, the path is a directory, OpenCV cannot
    encode the image (unknown extension) or the file cannot be written.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise PyinterpError(f"cannot write PNG to {path}: directory {path.parent} does not exist")
    if path.is_dir():
        raise PyinterpError(f"cannot write PNG to {path}: it is a directory")
    try:
        ok, encoded = cv2.imencode(path.suffix, image)
    except cv2.error as exc:
        reason = " ".join(str(getattr(exc, "err", exc)).split())
        raise PyinterpError(f"cannot write PNG to {path}: {reason}") from None
    if not ok:
        raise PyinterpError(f"cannot write PNG to {path}: OpenCV could not encode the image")
    try:
        with atomic_write(path) as f:
            f.write(encoded.tobytes())
    except OSError as e:
        raise PyinterpError(f"cannot write PNG to {path}: {e.strerror or e}") from None
    return path


def _attention_panel(probs: np.ndarray, tokens: list[str], title: str, cell: int) -> np.ndarray:
    """One head's query x key heatmap with its title and token labels; same size for the same tokens."""
    n = len(tokens)
    labels = step_labels(tokens, label_step(n, cell, font_px()))
    label_w = max_text_width(labels.values())
    left = label_w + PAD + TICK
    top = title_height()
    heat = n * cell
    width = left + max(heat, text_width(title, TITLE_PX)) + PAD
    panel = canvas(top + heat + TICK + PAD + label_w + PAD, width)
    draw_text(panel, title, left, top - PAD, TITLE_PX)
    paste(panel, _heat_block(probs, cell, cell), left, top)
    _draw_row_labels(panel, labels, left, top, cell)
    _draw_col_labels(panel, labels, left, top + heat, cell)
    return panel


def _heat_block(values: np.ndarray, cell_w: int, cell_h: int, colors: np.ndarray = COLORS) -> np.ndarray:
    """Colour ``values`` (clipped to 0..1) with the lookup table ``colors`` and blow each one up to a
    ``cell_h`` x ``cell_w`` block."""
    index = np.round(np.clip(np.nan_to_num(values), 0.0, 1.0) * 255).astype(np.uint8)
    return np.repeat(np.repeat(colors[index], cell_h, axis=0), cell_w, axis=1)


def _write_cells(heat: np.ndarray, texts: list[list[str]], cell_w: int, cell_h: int, values: np.ndarray,
                 lut: np.ndarray = COLORS) -> None:
    """Write ``texts[r][c]``, cut to fit, centred in each cell, black on light cells and white on dark."""
    colors = lut[np.round(np.clip(np.nan_to_num(values), 0.0, 1.0) * 255).astype(np.uint8)].astype(float)
    luma = colors @ np.array([0.114, 0.587, 0.299])  # BGR weights
    text_h = cap_height(LABEL_PX)
    for r, row in enumerate(texts):
        for c, raw in enumerate(row):
            text = _fit_text(sanitize_label(raw), cell_w - 4)
            if not text:
                continue
            x = c * cell_w + (cell_w - text_width(text, LABEL_PX)) // 2
            y = r * cell_h + (cell_h + text_h) // 2
            draw_text(heat, text, x, y, LABEL_PX, BLACK if luma[r, c] > 128 else WHITE)


def _fit_text(text: str, max_px: int) -> str:
    """The longest prefix of ``text`` that is at most ``max_px`` wide."""
    while text and text_width(text, LABEL_PX) > max_px:
        text = text[:-1]
    return text


def step_labels(tokens: list[str], step: int) -> dict[int, str]:
    """Sanitized labels of every ``step``-th token, by position."""
    return {i: sanitize_label(tokens[i]) for i in range(0, len(tokens), step)}


def _draw_row_labels(image: np.ndarray, labels: dict[int, str], left: int, top: int, cell: int) -> None:
    """Right-aligned labels with ticks left of a heatmap at (left, top), centred on their rows."""
    text_h = cap_height(LABEL_PX)
    for i, text in labels.items():
        y = top + i * cell + cell // 2
        cv2.line(image, (left - TICK, y), (left - 1, y), GRAY, 1)
        draw_text(image, text, left - TICK - 2 - text_width(text, LABEL_PX), y + text_h // 2, LABEL_PX)


def _draw_col_labels(image: np.ndarray, labels: dict[int, str], left: int, bottom: int, cell: int) -> None:
    """Vertical labels (reading upwards, ending at the axis) with ticks below a heatmap edge at ``bottom``."""
    for i, text in labels.items():
        x = left + i * cell + cell // 2
        cv2.line(image, (x, bottom), (x, bottom + TICK - 1), GRAY, 1)
        if text:
            block = vertical_text(text)
            paste_dark(image, block, x - block.shape[1] // 2, bottom + TICK + 2)


def vertical_text(text: str) -> np.ndarray:
    """``text`` in black on white, turned 90 degrees anticlockwise (OpenCV cannot draw rotated text)."""
    ascent, descent = line_extent(LABEL_PX)
    block = canvas(ascent + descent + 2, text_width(text, LABEL_PX) + 2)
    draw_text(block, text, 1, ascent + 1, LABEL_PX)
    return cv2.rotate(block, cv2.ROTATE_90_COUNTERCLOCKWISE)


def colorbar(height: int, colors: np.ndarray = COLORS, ticks: Sequence[tuple[float, str]] = COLORBAR_TICKS,
              label: str = "") -> np.ndarray:
    """A vertical 0..1 colour scale ``height`` px high (1 at the top) with ``ticks`` (position in 0..1, text): by
    default at 1, 0.5 and 0; ``label`` (the values' unit) is written vertically at its right.

    The bar starts ``_colorbar_margin()`` px below the top of the returned block, leaving room for
    the end labels.
    """
    margin = _colorbar_margin()
    text_h = cap_height(LABEL_PX)
    texts_w = TICK + 2 + max_text_width(t for _, t in ticks) + PAD
    name = vertical_text(label) if label else None
    block = canvas(max(height + 2 * margin, 0 if name is None else name.shape[0] + margin),
                   PAD + COLORBAR_W + texts_w + (0 if name is None else name.shape[1] + PAD))
    ramp = np.linspace(1.0, 0.0, height).reshape(-1, 1)
    paste(block, _heat_block(ramp, COLORBAR_W, 1, colors), PAD, margin)
    cv2.rectangle(block, (PAD - 1, margin - 1), (PAD + COLORBAR_W, margin + height), GRAY, 1)
    for value, text in ticks:
        y = margin + round((1.0 - value) * (height - 1))
        x = PAD + COLORBAR_W
        cv2.line(block, (x, y), (x + TICK, y), BLACK, 1)
        draw_text(block, text, x + TICK + 2, y + text_h // 2, LABEL_PX)
    if name is not None:
        paste_dark(block, name, PAD + COLORBAR_W + texts_w, margin + max((height - name.shape[0]) // 2, 0))
    return block


def _colorbar_margin() -> int:
    """Space above and below the colour bar for its end labels."""
    return cap_height(LABEL_PX)


def title_height() -> int:
    """Height of the band above a heatmap that holds its title (baseline ``PAD`` above the heatmap)."""
    return line_extent(TITLE_PX)[0] + 3 * PAD


def font_px() -> int:
    """Height one label line needs, descenders included, for :func:`label_step`."""
    return sum(line_extent(LABEL_PX))


def max_text_width(texts: Iterable[str]) -> int:
    return max((text_width(t, LABEL_PX) for t in texts), default=0)


def canvas(height: int, width: int) -> np.ndarray:
    return np.full((height, width, 3), 255, dtype=np.uint8)


def paste(image: np.ndarray, block: np.ndarray, x: int, y: int) -> None:
    image[y : y + block.shape[0], x : x + block.shape[1]] = block


def paste_dark(image: np.ndarray, block: np.ndarray, x: int, y: int) -> None:
    """Paste dark-on-white ``block`` so its white leaves what is underneath; clipped to the image."""
    x0, y0 = max(x, 0), max(y, 0)
    region = image[y0 : y + block.shape[0], x0 : x + block.shape[1]]
    part = block[y0 - y : y0 - y + region.shape[0], x0 - x : x0 - x + region.shape[1]]
    np.minimum(region, part, out=region)
