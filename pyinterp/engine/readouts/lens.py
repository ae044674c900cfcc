"""The logit lens as a readout: the top-k tokens and the targets' statistics of one tensor at every layer,
unembedded inside the graph (native recipe: csrc/lens.c). The analysis is :mod:`pyinterp.analysis.lens`."""

from __future__ import annotations

import numpy as np

from pyinterp.engine.backend import Backend


class LensReadout:
    """``tensor`` (a base name) unembedded at every layer it is on, at the token rows ``positions`` only (the others
    are not unembedded); ``norm``: through the final norm first; probabilities at temperature ``temp``;
    ``entropy``: their entropy too (a few passes over the vocabulary per row)."""

    def __init__(self, n_layer: int, tensor: str, norm: bool, top_k: int, targets: list[int], positions: list[int],
                 temp: float = 1.0, entropy: bool = False, out_positions: list[int] | None = None) -> None:
        self.n_layer, self.tensor, self.norm, self.top_k = n_layer, tensor, norm, top_k
        self.targets, self.positions, self.temp, self.entropy = targets, positions, temp, entropy
        # ``out_positions``: each position's index among the rows a pass keeping only the last token of every
        # sequence outputs (every position such a token), so the pass need not keep every token's row on the last
        # layer; None: it must (every_row)
        self.out_positions = out_positions
        self.every_row = out_positions is None

    def setup(self, backend: Backend) -> None:
        backend.set_lens(self.tensor, self.norm, self.top_k, self.targets, self.positions, self.out_positions, self.temp,
                         self.entropy)

    def read(self, backend: Backend, n_tokens: int) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]]:
        """Per layer present: top-k ids and probabilities ``[n_positions, k]`` (most probable first), the
        targets' statistics ``[n_positions, n_targets, 3]`` (logit, probability, number of greater logits) and the
        entropy of the probabilities ``[n_positions]`` (nats; None unless asked for)."""
        out = {}
        for il in range(-1, self.n_layer):  # -1: a tensor outside the layers (the embedding)
            layer = backend.lens_result(il, self.top_k, len(self.targets), len(self.positions), self.entropy)
            if layer is None:
                continue
            ids, probs, stats, entropy = layer
            order = np.argsort(-probs, axis=1, kind="stable")
            out[il] = (np.take_along_axis(ids, order, 1), np.take_along_axis(probs, order, 1), stats, entropy)
        return out
