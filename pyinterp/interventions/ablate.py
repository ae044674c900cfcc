"""Silence attention heads: their output becomes zero (MIA's ablation)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pyinterp.engine.names import as_list
from pyinterp.interventions.base import Op, Target


def head_mask(target: Target, layer: int, mask: np.ndarray) -> Op:
    """Multiply ``layer``'s heads by ``mask`` ``[n_head]``: the attention weights where the run computes them
    for every sequence (so captured ``attn_scores`` show it), else each head's output ``kqv_heads`` (the same
    downstream: zero weights give a zero output), which can also be limited to one sequence."""
    if target.seq < 0 and layer in target.scores_layers:
        return Op("mul", "attn_scores", layer, data=mask.reshape(-1, 1, 1))   # ne [1, 1, n_head]
    return Op("mul", "kqv_heads", layer, seq=target.seq, data=mask.reshape(1, -1, 1))  # ne [1, n_head, 1]


@dataclass(frozen=True)
class AblateHeads:
    """``heads``: ``(layer, head)`` pairs."""

    heads: tuple[tuple[int, int], ...]

    def ops(self, target: Target) -> list[Op]:
        planner = target.planner
        masks: dict[int, np.ndarray] = {}
        for item in as_list(self.heads, "ablate"):
            layer, head = planner.pair(item, "ablate", "(layer, head) pairs like [(3, 4)]")
            layer = planner.attention_layer(layer, "ablate")
            masks.setdefault(layer, np.ones(planner.n_head, dtype=np.float32))[planner.head(head, "ablate")] = 0.0
        return [head_mask(target, layer, mask) for layer, mask in masks.items()]
