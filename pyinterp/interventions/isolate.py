"""Keep one attention head of a layer: every other head of that layer is ablated."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pyinterp.interventions.ablate import head_mask
from pyinterp.interventions.base import Op, Target


@dataclass(frozen=True)
class IsolateHead:
    layer: int
    head: int

    def ops(self, target: Target) -> list[Op]:
        planner = target.planner
        layer = planner.attention_layer(self.layer, "isolate")
        mask = np.zeros(planner.n_head, dtype=np.float32)
        mask[planner.head(self.head, "isolate")] = 1.0
        return [head_mask(target, layer, mask)]
