"""The logit attribution as a readout: each residual term's (and each head's) contribution to one logit, through
the final norm's frozen scale and the target's unembedding row, inside the graph (native recipe:
csrc/attribution.c). The analysis is :mod:`pyinterp.analysis.attribution`."""

from __future__ import annotations

import numpy as np

from pyinterp.engine.backend import Backend
from pyinterp.errors import PyinterpError


class AttributionReadout:
    """``terms``: ``(name, layer)`` of each residual term; ``by_head[i]``: split term i by attention head."""

    def __init__(self, terms: list[tuple[str, int]], by_head: list[bool], target: int) -> None:
        self.terms, self.by_head, self.target = terms, by_head, target

    def setup(self, backend: Backend) -> None:
        backend.set_attribution(self.terms, self.by_head, self.target)

    def read(self, backend: Backend, n_tokens: int) -> tuple[list[np.ndarray], dict[int, np.ndarray]]:
        """Each term's contribution ``[n_tokens]`` and, for the terms split by head, each head's ``[n_tokens, n_head]``."""
        values, heads = [], {}
        for i, (name, il) in enumerate(self.terms):
            out = backend.attribution_result(i, n_tokens)
            if out is None:
                raise PyinterpError(f"logit attribution: {name}-{il} was not in the graph")
            values.append(out)
            if self.by_head[i]:
                heads[i] = backend.attribution_heads(i, n_tokens)
        return values, heads
