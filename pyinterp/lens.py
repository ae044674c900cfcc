"""The logit lens (what each layer's residual stream, or one of its parts, would predict) and direct
logit attribution (how much each part adds to one logit)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
import numpy as np


@dataclass
class LogitLens:
    """Top-k tokens of ``tensor`` unembedded at every layer and token (see :meth:`Model.logit_lens`).

    ``ids`` and ``probs`` are ``[n_layer, n_tokens, k]``, most probable first; ``layers`` are the layer
    indices of the first axis; ``strs[l][t][j]`` is the text of ``ids[l, t, j]``.
    """

    tensor: str
    norm: bool
    layers: list[int]
    tokens: list[int]
    token_strs: list[str]
    ids: np.ndarray
    probs: np.ndarray
    strs: list[list[list[str]]]

    @property
    def title(self) -> str:
        return f"{'norm' if self.norm else 'raw'} logit lens of {self.tensor}"

    def to_png(self, path: str | os.PathLike, row_labels: list[str] | None = None) -> Path:
        """Write a layers x tokens heatmap of the top-1 probability, each cell labelled with its token;
        rows are labelled with ``row_labels`` (default: the layer indices)."""
        from .plot import lens_heatmap, save_png

        top_str = [[token[0] for token in layer] for layer in self.strs]
        image = lens_heatmap(self.probs[:, :, 0], top_str, self.token_strs, title=self.title,
                             row_labels=row_labels or [str(il) for il in self.layers])
        return save_png(image, path)


@dataclass
class Attribution:
    """Direct logit attribution of one target token at one position (see :meth:`Model.logit_attribution`).

    ``values[i]`` is the contribution of the residual term ``labels[i]`` (the embedding, then each layer's
    attention and FFN outputs); ``attn``/``ffn`` are the same per layer (``[n_layer]``). They add up to
    ``logit``, the model's own logit for the target, up to rounding.
    """

    target: int
    target_str: str
    position: int
    logit: float
    labels: list[str]
    values: np.ndarray
    attn: np.ndarray
    ffn: np.ndarray
    embed: float
