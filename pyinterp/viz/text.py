"""Unicode text on OpenCV images: measure and draw labels with the Noto fonts, rasterised by Pillow.

OpenCV's own (Hershey) fonts draw ASCII only. Here each character is drawn with Noto Sans (Latin,
Greek, Cyrillic and their accented and extended letters) or, where Noto Sans lacks it, with Noto Sans
CJK (Chinese, Japanese kana, Korean Hangul); a character neither font has is drawn as Noto Sans's
missing-glyph box. Both fonts are pip dependencies, so pictures look the same on every machine.
Sizes ``px`` are the font size in pixels (one em); positions are a baseline's left end, as with
``cv2.putText``. Images are BGR ``uint8`` ``[height, width, 3]`` arrays, drawn on in place.
"""

from __future__ import annotations

import functools

import fontpkg
import noto_cjk_sans_jp_regular
import numpy as np
from PIL import Image, ImageDraw, ImageFont

_NOTO_SANS = fontpkg.path("noto-sans")  # the fontpkg-noto-sans package; weight 400, the Regular
_NOTO_CJK = noto_cjk_sans_jp_regular.FONT_PATH
_MISSING = "\U0010fffd"  # a private-use code point that neither font maps: it draws the missing-glyph box
_PROBE_PX = 16
_TALL = "Ag|日"  # the tallest ascenders and deepest descenders of both fonts (日 is in Noto Sans CJK)


def text_width(text: str, px: int) -> int:
    """Advance width of ``text`` in pixels (rounded up)."""
    return int(np.ceil(sum(_advance(run, font) for run, font in _runs(text, px))))


def cap_height(px: int) -> int:
    """Height of a capital letter above the baseline, for centring text on a row."""
    return -_fonts(px)[0].getbbox("A", anchor="ls")[1]


def line_extent(px: int) -> tuple[int, int]:
    """(ascent, descent): pixels above and below the baseline that the tallest glyphs reach."""
    boxes = [font.getbbox(run, anchor="ls") for run, font in _runs(_TALL, px)]
    return -min(box[1] for box in boxes), max(box[3] for box in boxes)


def draw_text(
    image: np.ndarray, text: str, x: int, y: int, px: int, color: tuple[int, int, int] = (0, 0, 0)
) -> None:
    """Anti-aliased ``text`` in BGR ``color`` with its baseline's left end at (x, y); clipped to ``image``."""
    pen = float(x)
    for run, font in _runs(text, px):
        alpha, left, top = _mask(run, font)
        _blend(image, alpha, round(pen) + left, int(y) + top, color)
        pen += _advance(run, font)


@functools.lru_cache(maxsize=None)
def _fonts(px: int) -> tuple[ImageFont.FreeTypeFont, ImageFont.FreeTypeFont]:
    """(Noto Sans, Noto Sans CJK) at ``px``; basic layout (no shaping library), the same on every machine."""
    basic = ImageFont.Layout.BASIC
    return (ImageFont.truetype(str(_NOTO_SANS), px, layout_engine=basic),
            ImageFont.truetype(str(_NOTO_CJK), px, layout_engine=basic))


@functools.lru_cache(maxsize=None)
def _font_index(char: str) -> int:
    """0 when Noto Sans has ``char``, else 1 when Noto Sans CJK has it, else 0 (the missing-glyph box).

    Pillow does not expose a font's character map, but FreeType draws the missing-glyph box for
    any character the font lacks: a character drawn exactly like an unmapped code point is missing.
    """
    for index, font in enumerate(_fonts(_PROBE_PX)):
        missing = _mask(_MISSING, font)
        drawn = _mask(char, font)
        if drawn[1:] != missing[1:] or not np.array_equal(drawn[0], missing[0]):
            return index
    return 0


def _runs(text: str, px: int) -> list[tuple[str, ImageFont.FreeTypeFont]]:
    """``text`` cut into maximal runs of characters drawn with the same font."""
    fonts = _fonts(px)
    runs: list[tuple[str, ImageFont.FreeTypeFont]] = []
    for char in text:
        font = fonts[_font_index(char)]
        if runs and runs[-1][1] is font:
            runs[-1] = (runs[-1][0] + char, font)
        else:
            runs.append((char, font))
    return runs


@functools.lru_cache(maxsize=65536)
def _advance(run: str, font: ImageFont.FreeTypeFont) -> float:
    """Advance width of ``run`` in ``font``, in (fractional) pixels; cached, labels repeat."""
    return font.getlength(run)


@functools.lru_cache(maxsize=4096)
def _mask(text: str, font: ImageFont.FreeTypeFont) -> tuple[np.ndarray, int, int]:
    """(alpha ``[h, w]`` uint8, left, top): the coverage of ``text`` drawn with its baseline's left end at
    the origin, and the offset of that box's top-left corner from the origin."""
    left, top, right, bottom = font.getbbox(text, anchor="ls")
    canvas = Image.new("L", (max(right - left, 0), max(bottom - top, 0)), 0)
    ImageDraw.Draw(canvas).text((-left, -top), text, font=font, fill=255, anchor="ls")
    return np.asarray(canvas), left, top


def _blend(image: np.ndarray, alpha: np.ndarray, x: int, y: int, color: tuple[int, int, int]) -> None:
    """Paint ``color`` over ``image`` with coverage ``alpha`` placed at (x, y), clipped to the image."""
    x0, y0 = max(x, 0), max(y, 0)
    region = image[y0 : y + alpha.shape[0], x0 : x + alpha.shape[1]]
    a = alpha[y0 - y : y0 - y + region.shape[0], x0 - x : x0 - x + region.shape[1], None] / 255.0
    region[:] = np.round(region * (1.0 - a) + np.asarray(color, dtype=float) * a).astype(np.uint8)
