"""Attention sheets, logit-lens tables, their text and PNG saving, on synthetic data; at the end, the
PNGs a real model's run writes (Gemma 3, whose vocabulary holds whole Cyrillic and CJK words).

Where a test needs to know where a heatmap lies in the picture, it draws the same layout twice with
different probabilities: the layout does not depend on the values, so the pixels that differ are
exactly the heatmap cells.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

import pyinterp
from pyinterp import PyinterpError
from pyinterp.viz.plot import (
    LABEL_PX, attention_sheet, default_cell, label_step, lens_heatmap, sanitize_label, save_png, score_grids,
)
from pyinterp.viz.text import draw_text, text_width

TOKENS = ["<|im_start|>", "The", " capital", " of", " France", " is", " Paris"]


def causal_attention(n_head: int, n: int, seed: int = 0) -> np.ndarray:
    """Random row-normalised lower-triangular [n_head, n, n] attention probabilities."""
    rng = np.random.default_rng(seed)
    attn = (rng.random((n_head, n, n)) + 0.05) * np.tril(np.ones((n, n)))
    return attn / attn.sum(-1, keepdims=True)


def changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mask of the pixels where two same-size images differ."""
    assert a.shape == b.shape
    return np.any(a != b, axis=-1)


def bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) bounds, end-exclusive, of the True pixels."""
    ys, xs = np.nonzero(mask)
    return ys.min(), ys.max() + 1, xs.min(), xs.max() + 1


def luma(pixel: np.ndarray) -> float:
    b, g, r = pixel.astype(float)
    return 0.114 * b + 0.587 * g + 0.299 * r


def test_sanitize_label():
    assert sanitize_label(" France") == "_France"
    assert sanitize_label("\n") == "\\n"
    assert sanitize_label("a\tb") == "a\\tb"
    assert sanitize_label("\u2581Paris") == "_Paris"
    assert sanitize_label("café") == "café"  # every script stays: pyinterp.viz.text draws it
    assert sanitize_label(" Москва") == "_Москва"
    assert sanitize_label("日本") == "日本"
    assert sanitize_label("\ufffd") == "?"  # part of a UTF-8 sequence (a byte-fallback token)
    assert sanitize_label("a\x00b\u200bc\u3000") == "a?b?c?"  # control, zero-width and wide spaces
    assert sanitize_label("x" * 40) == "x" * 12
    assert sanitize_label("<|im_start|>") == "<|im_start|>"
    assert sanitize_label("  two") == "_ two"  # only the leading space is marked
    assert sanitize_label("") == ""


def ink(text: str, px: int = LABEL_PX) -> np.ndarray:
    """``text`` drawn in black on white with :func:`draw_text`: a [h, w] mask of the inked pixels."""
    canvas = np.full((3 * px, 2 * px * (len(text) + 1), 3), 255, np.uint8)
    draw_text(canvas, text, px, 2 * px, px)
    return canvas.min(axis=-1) < 128


@pytest.mark.parametrize("word", ["Москва", "Київ", "Ωμέγα", "café", "Łódź", "Việt", "日本語", "中文", "한국어"])
def test_text_draws_every_script(word):
    drawn = ink(word)
    assert drawn.sum() > 10 * len(word)
    assert not np.array_equal(drawn, ink("?" * len(word)))
    for i, char in enumerate(word):  # each character is its own glyph, not a shared placeholder
        others = {c for c in word if c != char}
        assert all(not np.array_equal(ink(char), ink(c)) for c in others), (word, i)


def test_text_glyphs_are_the_fonts_letters():
    # Noto Sans draws Latin A, Cyrillic А and Greek Α alike, and other letters otherwise.
    assert np.array_equal(ink("A"), ink("\u0410")) and np.array_equal(ink("A"), ink("\u0391"))
    assert not np.array_equal(ink("\u0411"), ink("\u0412"))  # Б, В
    assert not np.array_equal(ink("日"), ink("本"))
    # é is e with an accent above: the same pixels on e's rows, more ink above them.
    e, e_acute = ink("e"), ink("é")
    rows = e.any(axis=1)
    assert np.array_equal(e[rows], e_acute[rows]) and e_acute[~rows].any()
    # CJK ideographs are one em wide; '?' is about half that.
    assert text_width("日本語", 12) == 36 and text_width("日本語", 24) == 72
    assert text_width("?", 12) < 8


def test_text_missing_glyph_is_a_box():
    box = ink("\U0001f600")  # an emoji: in neither font
    assert np.array_equal(box, ink("\U0001f9ea")) and not np.array_equal(box, ink("?"))
    y0, y1, x0, x1 = bbox(box)
    assert y1 - y0 > 5 and x1 - x0 > 3
    edges = box[y0, x0:x1], box[y1 - 1, x0:x1], box[y0:y1, x0], box[y0:y1, x1 - 1]
    assert all(edge.all() for edge in edges) and not box[y0 + 1 : y1 - 1, x0 + 1 : x1 - 1].any()


def test_label_step():
    assert label_step(7, 24, 14) == 1
    assert label_step(150, 3, 14) == 5
    assert label_step(150, 1, 14) == 20
    assert label_step(1000, 1, 14) == 20
    assert label_step(3, 1, 14) == 3  # never more than the number of labels
    assert label_step(10, 0, 14) == 10  # a zero cell counts as 1 px
    for n, cell, font in [(150, 3, 14), (500, 2, 14), (60, 7, 15), (9, 13, 14)]:
        k = label_step(n, cell, font)
        assert k * cell >= font or k == n


def test_default_cell():
    assert default_cell(7) == 24
    assert default_cell(150) == 3
    assert default_cell(2000) == 2
    for n in (20, 40, 100, 200):
        assert 200 <= n * default_cell(n) <= 600


def test_attention_sheet_panels():
    attn = causal_attention(4, len(TOKENS))
    sheet = attention_sheet(attn, TOKENS, title="layer 3")
    assert sheet.dtype == np.uint8 and sheet.ndim == 3 and sheet.shape[2] == 3
    assert sheet.shape[0] > 2 * 7 * 24 and sheet.shape[1] > 2 * 7 * 24  # a 2 x 2 grid of 7 x 7 cells of 24 px
    assert len(np.unique(sheet.reshape(-1, 3), axis=0)) > 20
    assert np.all(sheet[0, 0] == 255)  # white background

    # One blob of changed pixels per panel: the lower triangles (with the diagonal) of the four heads.
    mask = changed(sheet, attention_sheet(np.zeros_like(attn), TOKENS, title="layer 3"))
    n_blobs, _ = cv2.connectedComponents(mask.astype(np.uint8))
    assert n_blobs - 1 == 4


def test_attention_sheet_first_panel_heatmap_varies():
    attn = causal_attention(4, len(TOKENS))
    one = attention_sheet(attn, TOKENS, heads=[0])
    y0, y1, x0, x1 = bbox(changed(one, attention_sheet(np.zeros_like(attn), TOKENS, heads=[0])))
    assert y1 - y0 == x1 - x0 == 7 * 24  # the whole diagonal changed, so this is the full heatmap
    heat = one[y0:y1, x0:x1]
    assert len(np.unique(heat.reshape(-1, 3), axis=0)) >= 10
    assert heat.std() > 10
    assert np.all(heat[0, -1] == heat[0, -2])  # above the diagonal: all zero, one colour


def test_attention_sheet_head_selection():
    attn = causal_attention(4, len(TOKENS))
    full = attention_sheet(attn, TOKENS)
    two = attention_sheet(attn, TOKENS, heads=[1, 3])
    one = attention_sheet(attn, TOKENS, heads=[2])
    assert two.shape[0] < full.shape[0] and two.shape[1] == full.shape[1]  # 2 x 2 grid -> 1 x 2
    assert one.shape[1] < two.shape[1]
    assert not np.array_equal(one, attention_sheet(attn, TOKENS, heads=[0]))  # a different head is drawn
    with pytest.raises(PyinterpError, match="heads"):
        attention_sheet(attn, TOKENS, heads=[4])
    with pytest.raises(PyinterpError, match="attention must be"):
        attention_sheet(attn, TOKENS[:-1])


def test_attention_sheet_long_input():
    n = 150
    tokens = [f" tok{i}" for i in range(n)]
    attn = causal_attention(4, n)
    sheet = attention_sheet(attn, tokens, title="layer 0")
    assert 2 * n * default_cell(n) < sheet.shape[0] < 4000
    assert 2 * n * default_cell(n) < sheet.shape[1] < 4000
    assert label_step(n, default_cell(n), 14) == 5  # 14 px: a label line at the default font
    tiny = attention_sheet(attn[:1], tokens, cell=1)
    assert tiny.shape[0] < sheet.shape[0] / 2 + 100


def test_lens_heatmap_colour_follows_probability():
    tokens = ["The", " capital"]
    blank = [["", ""]]
    low_high = lens_heatmap(np.array([[0.05, 0.95]]), blank, tokens)
    y0, y1, x0, x1 = bbox(changed(low_high, lens_heatmap(np.array([[0.95, 0.05]]), blank, tokens)))
    width = (x1 - x0 + 1) // 2  # two cells; the first white separator column is not part of the box
    low = low_high[y0 + 1, x0 + 1]
    high = low_high[y0 + 1, x0 + width + 1]
    assert luma(high) > luma(low) + 100


def test_lens_heatmap_text_drawn():
    tokens = ["The", " capital"]
    probs = np.full((1, 2), 0.5)
    labelled = lens_heatmap(probs, [[" Paris", ""]], tokens)
    y0, y1, x0, x1 = bbox(changed(labelled, lens_heatmap(np.zeros((1, 2)), [["", ""]], tokens)))
    mid = (x0 + x1) // 2
    gray = cv2.cvtColor(labelled, cv2.COLOR_BGR2GRAY).astype(float)
    with_text = gray[y0 + 2 : y1 - 2, x0 + 2 : mid - 2]
    empty = gray[y0 + 2 : y1 - 2, mid + 2 : x1 - 2]
    assert empty.std() < 1
    assert with_text.std() > 20


def test_lens_heatmap_layer_zero_at_bottom():
    tokens = ["a", "b", "c"]
    probs = np.zeros((3, 3))
    probs[0] = 1.0  # layer 0 bright
    blank = [[""] * 3 for _ in range(3)]
    labels = ["emb", "l1", "out"]
    image = lens_heatmap(probs, blank, tokens, title="lens", row_labels=labels)
    dark = lens_heatmap(np.zeros((3, 3)), blank, tokens, title="lens", row_labels=labels)
    y0, y1, _, _ = bbox(changed(image, dark))
    assert y1 - y0 < 22  # only the layer-0 row changed ...
    assert y0 > image.shape[0] / 3  # ... and it is drawn below the others


def test_lens_heatmap_many_tokens():
    n = 200
    tokens = [f" t{i}" for i in range(n)]
    probs = np.random.default_rng(1).random((12, n))
    image = lens_heatmap(probs, [[" x"] * n for _ in range(12)], tokens)
    assert image.shape[1] < 4000 and image.shape[0] < 1000
    with pytest.raises(PyinterpError, match="rows x tokens"):
        lens_heatmap(probs[:, :-1], [[" x"] * n for _ in range(12)], tokens)
    with pytest.raises(PyinterpError, match="row labels"):
        lens_heatmap(probs, [[" x"] * n for _ in range(12)], tokens, row_labels=["0"])


def test_score_grids_side_by_side():
    """Three layers x heads grids: each grid's cells sit in its own third, row 0 at the bottom, and a
    cell's colour follows its score."""
    names = ["previous token", "duplicate token", "induction"]
    dark = [np.zeros((3, 2))] * 3
    base = score_grids(dark, names, title="head scores")
    boxes = []
    for i in range(3):
        grids = list(dark)
        grids[i] = np.array([[0.95, 0.0], [0.0, 0.0], [0.0, 0.0]])  # layer 0, head 0 bright
        image = score_grids(grids, names, title="head scores")
        assert image.shape == base.shape
        boxes.append(bbox(changed(image, base)))
        y0, y1, x0, x1 = boxes[-1]
        assert y1 - y0 <= 22 and x1 - x0 <= 40  # one cell ...
        assert y0 > base.shape[0] / 3  # ... in the bottom row
        assert luma(image[y0 + 2, x0 + 2]) > luma(base[y0 + 2, x0 + 2]) + 100
    assert boxes[0][3] < boxes[1][2] and boxes[1][3] < boxes[2][2]  # left to right in the given order
    with pytest.raises(PyinterpError, match="one 2-D shape"):
        score_grids([np.zeros((3, 2)), np.zeros((2, 2))], names[:2])
    with pytest.raises(PyinterpError, match="each with a name"):
        score_grids(dark, names[:2])


def test_save_png_round_trip(tmp_path):
    image = attention_sheet(causal_attention(2, 3), ["a", "b", "c"])
    path = save_png(image, tmp_path / "sheet.png")
    assert path == tmp_path / "sheet.png"
    back = cv2.imread(str(path))
    assert back is not None and back.shape == image.shape
    np.testing.assert_array_equal(back, image)
    assert save_png(image, str(tmp_path / "again.png")).exists()


@pytest.mark.parametrize("name", ["missing/out.png", "a_directory", "bad.extension_xyz"])
def test_save_png_errors(tmp_path, name):
    (tmp_path / "a_directory").mkdir()
    image = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(PyinterpError, match="cannot write PNG to") as info:
        save_png(image, tmp_path / name)
    assert "\n" not in str(info.value)


NON_ASCII_PROMPT = "Москва — столица России, а 東京 — 日本の首都. Café"
NON_ASCII_TOKENS = ["Москва", " России", " 東京", " 日本", " Café"]


def label_template(token: str, vertical: bool) -> np.ndarray:
    """The label of ``token`` drawn black on white (turned anticlockwise when ``vertical``), cut to its ink."""
    text = sanitize_label(token)
    canvas = np.full((3 * LABEL_PX, text_width(text, LABEL_PX) + 2 * LABEL_PX, 3), 255, np.uint8)
    draw_text(canvas, text, LABEL_PX, 2 * LABEL_PX, LABEL_PX)
    if vertical:
        canvas = cv2.rotate(canvas, cv2.ROTATE_90_COUNTERCLOCKWISE)
    y0, y1, x0, x1 = bbox(canvas.min(axis=-1) < 255)
    return canvas[y0:y1, x0:x1]


def shows(image: np.ndarray, template: np.ndarray) -> bool:
    """Whether ``template`` appears in ``image`` pixel for pixel (at the best match OpenCV finds)."""
    scores = cv2.matchTemplate(image, template, cv2.TM_SQDIFF)
    y, x = np.unravel_index(scores.argmin(), scores.shape)
    return np.array_equal(image[y : y + template.shape[0], x : x + template.shape[1]], template)


def ascii_only(token: str) -> str:
    """The token as labels used to be drawn: every non-ASCII character a '?'."""
    return "".join(c if c < "\x7f" else "?" for c in token)


def test_draw_attention_labels_non_ascii_tokens(gemma3, tmp_path):
    trace = gemma3.run(NON_ASCII_PROMPT, capture=["attn_scores-0"])
    assert set(NON_ASCII_TOKENS) <= set(trace.token_strs)
    [path] = pyinterp.draw_attention(trace, tmp_path / "attn.png", heads=[0])
    image = cv2.imread(str(path))
    for token in NON_ASCII_TOKENS:  # row labels (queries) and column labels (keys)
        for vertical in (False, True):
            assert shows(image, label_template(token, vertical)), (token, vertical)
            assert not shows(image, label_template(ascii_only(token), vertical)), (token, vertical)


def test_lens_png_labels_non_ascii_tokens(gemma3, tmp_path):
    lens = gemma3.logit_lens(NON_ASCII_PROMPT, tensor="l_out", top_k=1)
    image = cv2.imread(str(lens.to_png(tmp_path / "lens.png")))
    for token in NON_ASCII_TOKENS:  # the column labels below the table
        assert shows(image, label_template(token, vertical=True)), token
        assert not shows(image, label_template(ascii_only(token), vertical=True)), token


# Heatmaps of values in the data's units (pyinterp.viz.grids): sweeps, head scans, attribution.

from pyinterp.viz.grids import data_ticks, nice_step, signed_grid, value_grid  # noqa: E402
from pyinterp.viz.plot import COLORS, SIGNED_COLORS  # noqa: E402


def cell_pixels(a: np.ndarray, b: np.ndarray, n: int) -> list[np.ndarray]:
    """The colours of the ``n`` adjacent cells where two same-layout pictures differ, left to right (a pixel
    inside each, clear of the white separators and of the text in the middle)."""
    y0, _, x0, x1 = bbox(changed(a, b))
    width = (x1 - x0 + 1) // n
    return [a[y0 + 2, x0 + i * width + 2] for i in range(n)]


def test_signed_grid_colours_centred_on_zero():
    """0 is white, the largest magnitude the extreme colour, the sign the hue; -8 sets the scale for +5.6 too."""
    rows, cols = ["0"], ["a", "b", "c"]
    first = signed_grid(np.array([[-8.0, 0.0, 5.6]]), row_labels=rows, col_labels=cols)
    second = signed_grid(np.array([[0.0, -8.0, 5.6]]), row_labels=rows, col_labels=cols)  # same texts, same scale
    assert first.shape == second.shape
    blue, white = cell_pixels(first, second, 2)
    np.testing.assert_array_equal(blue, SIGNED_COLORS[0])  # -max|v|: the blue end
    assert blue[0] > blue[2] + 100  # B >> R
    assert np.all(white >= 240) and np.ptp(white.astype(int)) <= 2  # 0: white, no hue
    third = signed_grid(np.array([[-8.0, 5.6, 0.0]]), row_labels=rows, col_labels=cols)
    red = cell_pixels(third, first, 2)[0]
    np.testing.assert_array_equal(red, SIGNED_COLORS[round((0.5 + 5.6 / 16) * 255)])
    assert red[2] > red[0] + 60  # R >> B: positive is red, paler than the -8 cell is blue
    top = signed_grid(np.array([[8.0, 0.0, 5.6]]), row_labels=rows, col_labels=cols)
    np.testing.assert_array_equal(cell_pixels(top, second, 1)[0], SIGNED_COLORS[255])  # +max|v|: the red end


def test_colorbar_ticks_are_data_values():
    """The colour bar is labelled with values of the data (its ends and round values), at the positions those
    values have on the scale; the picture shows those labels, not 0 / 0.5 / 1."""
    ticks = data_ticks(-8.0, 5.6, 300)
    labels = [text for _, text in ticks]
    assert labels[:2] == ["-8", "5.6"] and {"-5", "0", "5"} <= set(labels) and "0.5" not in labels
    for position, text in ticks:  # read back: the label is the value at its place on the bar
        assert float(text) == pytest.approx(-8.0 + position * 13.6, abs=1e-9)
    symmetric = data_ticks(-10.16, 10.16, 660)
    assert [t for _, t in symmetric][:2] == ["-10.2", "10.2"] and "10" not in [t for _, t in symmetric]  # too close
    assert nice_step(20.32) == 5 and nice_step(1.0) == 0.2 and nice_step(0.03) == 0.005

    image = signed_grid(np.array([[-8.0, 0.0, 5.6]]), row_labels=["0"], col_labels=["a", "b", "c"],
                        unit="logit difference", row_name="layer", col_name="position")
    for _, text in data_ticks(-8.0, 8.0, 120):  # the bar's height: 120 px at least
        assert shows(image, label_template(text, vertical=False)), text
    assert not shows(image, label_template("0.5", vertical=False))
    assert shows(image, label_template("logit difference", vertical=True))  # the unit beside the bar
    assert shows(image, label_template("layer", vertical=True))  # the axis titles
    assert shows(image, label_template("position", vertical=False))


def test_value_grid_sequential_min_to_max():
    rows, cols = ["0"], ["a", "b"]
    low_high = value_grid(np.array([[0.2, 0.7]]), title="", row_labels=rows, col_labels=cols)
    high_low = value_grid(np.array([[0.7, 0.2]]), title="", row_labels=rows, col_labels=cols)
    low, high = cell_pixels(low_high, high_low, 2)
    np.testing.assert_array_equal(low, COLORS[0])
    np.testing.assert_array_equal(high, COLORS[255])
    assert [t for _, t in data_ticks(0.2, 0.7, 120)][:2] == ["0.2", "0.7"]
    signed = value_grid(np.array([[0.2, 0.7]]), title="", row_labels=rows, col_labels=cols, signed=True)
    assert not np.array_equal(signed, low_high)


def test_signed_grid_blocks_have_their_own_scale(tmp_path):
    """Attribution: one large layer total must not wash out the heads. The heads and the totals each have their
    own colour bar and scale, so the largest head (0.5) is as red as the largest total (100)."""
    from pyinterp.analysis.attribution import Attribution

    heads = np.array([[0.5, -0.1], [0.05, 0.0]])
    attn, ffn = heads.sum(1), np.array([-3.0, 100.0])
    a = Attribution(target=1, target_str=" x", position=-1, logit=float(attn.sum() + ffn.sum()), labels=[],
                    values=np.concatenate([attn, ffn]), attn=attn, ffn=ffn, embed=0.0, heads=heads)
    image = cv2.imread(str(a.to_png(tmp_path / "attr.png")))

    def columns(color: np.ndarray) -> np.ndarray:
        return np.nonzero(np.all(image == color, axis=-1).any(axis=0))[0]

    blue = columns(SIGNED_COLORS[0])  # only the colour bars' bottom ends: no cell is at -max|v| of its block
    assert np.count_nonzero(np.diff(blue) > 1) + 1 == 2  # two colour bars
    assert columns(SIGNED_COLORS[255]).min() < blue.min()  # the 0.5 head is as red as the 100 FFN term
    shared = signed_grid(np.concatenate([heads, attn[:, None], ffn[:, None]], 1), row_labels=["0", "1"],
                         col_labels=["h0", "h1", "attn", "ffn"])
    assert np.count_nonzero(np.all(shared == SIGNED_COLORS[255], axis=-1)) < np.count_nonzero(
        np.all(image == SIGNED_COLORS[255], axis=-1))  # on one scale, only the FFN cell is at the end


def test_sweep_picture_compact():
    """A 30-layer x 10-token sweep with a long title: as wide as its cells and colour bar, not its title
    (the title wraps); it was 1173 x 758 px, mostly blank."""
    from pyinterp.cli.sweep import sweep_picture

    values = np.random.default_rng(0).normal(size=(30, 10)) * 4
    clean, corrupt = "The Eiffel Tower is located in the city of", "The Colosseum is located in the city of"
    result = {"kind": "patching l_out clean -> corrupt", "metric": "logit(' Paris') - logit(' Rome')",
              "clean": clean, "corrupt": corrupt, "layers": list(range(30)), "columns": [f" t{i}" for i in range(10)],
              "baselines": {"clean": 4.93, "corrupt": -9.09}}
    image = sweep_picture(result, values, False, "logit-diff")
    assert image.shape[1] < 600 and image.shape[0] < 30 * 22 + 200
    blank_columns = np.all(image == 255, axis=(0, 2))
    assert blank_columns.mean() < 0.2
    ablation = sweep_picture({**result, "baselines": {"plain": 4.93}}, values, True, "prob")  # a change: signed
    assert np.any(np.all(ablation == SIGNED_COLORS[0], axis=-1)) or np.any(np.all(ablation == SIGNED_COLORS[255], axis=-1))
    probs = sweep_picture(result, np.abs(values) / 20, False, "prob")
    assert np.any(np.all(probs == COLORS[255], axis=-1))  # a probability: the sequential scale
