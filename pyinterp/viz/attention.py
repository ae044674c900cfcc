"""Attention pictures: one PNG per layer, a grid of heads, each a query x key heatmap."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

from pyinterp.engine.trace import Trace
from pyinterp.errors import InputError


def layer_paths(path: str | os.PathLike, layers: Sequence[int]) -> dict[int, Path]:
    """``attn.png`` -> ``{0: attn-L00.png, 1: attn-L01.png, ...}`` (zero-padded to the largest layer)."""
    path = Path(path)
    width = len(str(max(layers)))
    return {il: path.with_name(f"{path.stem}-L{il:0{width}d}{path.suffix or '.png'}") for il in layers}


def draw_attention(trace: Trace, path: str | os.PathLike, layers: Sequence[int] | None = None,
                   heads: Sequence[int] | None = None, on_layer: Callable[[int], None] | None = None) -> list[Path]:
    """Write the attention of ``layers`` (default: every captured one) as ``path-L<layer>.png`` files.

    The trace must hold ``attn_scores`` (``model.run(..., capture=["attn_scores"])``). Each file is a grid
    of ``heads`` (default all), query tokens down, key tokens across, probabilities on a fixed 0..1 colour
    scale. ``on_layer`` is called after each layer is written (progress). Returns the paths written.
    """
    from pyinterp.viz.plot import attention_sheet, save_png

    captured = sorted(il for name, il in trace.keys() if name == "attn_scores")
    layers = captured if layers is None else list(layers)
    if not layers:
        raise InputError("no attention to draw: capture attn_scores first (model.run(..., capture=['attn_scores']))")
    written = []
    for il, file in layer_paths(path, layers).items():
        image = attention_sheet(trace.attention(il), trace.token_strs, title=f"layer {il}", heads=heads)
        written.append(save_png(image, file))
        if on_layer is not None:
            on_layer(il)
    return written
