"""The result of one forward pass: tokens, logits and the captured tensors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from pyinterp.engine.names import split_name
from pyinterp.errors import PyinterpError


@dataclass
class Trace:
    """Tokens, logits and captured activations of one run.

    ``logits`` is ``[n_tokens, n_vocab]`` float32 (``[1, n_vocab]``, the last token's, with ``run(logits="last")``;
    None with ``logits=None``). Captured tensors are keyed by ``(name, layer)``
    (layer -1 for tensors outside the layers) and laid out as numpy views of the ggml tensors with the
    dimensions reversed: ``l_out`` is ``[n_tokens, n_embd]``, ``Qcur`` ``[n_tokens, n_head, head_dim]``,
    ``attn_scores`` ``[n_head, n_tokens, n_tokens]`` (query x key, KV padding removed).
    """

    tokens: list[int]
    logits: np.ndarray | None
    captured: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    token_strs: list[str] = field(default_factory=list)
    # a name as run(capture=...) takes it -> its (name, layer) key (the model's aliases: TransformerLens names)
    resolve: Callable[[str], tuple[str, int]] | None = field(default=None, repr=False, compare=False)

    def __getitem__(self, key: tuple[str, int] | str) -> np.ndarray:
        """``trace["l_out", 5]``, ``trace["l_out-5"]`` or any name ``capture`` took: ``trace["blocks.5.hook_resid_post"]``."""
        if isinstance(key, str):
            if self.resolve is not None:
                key = self.resolve(key)
            else:
                name, layer = split_name(key)
                key = (name, -1 if layer is None else layer)
        elif isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], str) and self.resolve is not None:
            name, layer = self.resolve(key[0])
            key = (name, key[1]) if layer == -1 else (name, layer)
        if key not in self.captured:
            name, layer = key
            label = name if layer < 0 else f"{name}-{layer}"
            raise PyinterpError(f"{label} was not captured; pass capture=[{name!r}] (or {label!r}) to run()")
        return self.captured[key]

    def keys(self) -> list[tuple[str, int]]:
        """The captured ``(name, layer)`` pairs, in capture order."""
        return list(self.captured)

    def act(self, name: str, layer: int) -> np.ndarray:
        """The captured tensor ``name-layer``; 2-D tensors are ``[n_tokens, width]``."""
        return self[name, layer]

    def attention(self, layer: int) -> np.ndarray:
        """Attention probabilities of a layer, ``[n_head, n_query, n_key]`` (needs ``capture=["attn_scores"]``)."""
        return self["attn_scores", layer]

    def stack(self, name: str = "l_out") -> np.ndarray:
        """All captured layers of ``name`` stacked: ``[n_layer, n_tokens, width]`` (the residual stack for l_out)."""
        layers = sorted(il for n, il in self.captured if n == name and il >= 0)
        if not layers:
            raise PyinterpError(f"{name} was not captured; pass capture=[{name!r}] to run()")
        return np.stack([self.captured[name, il] for il in layers])
