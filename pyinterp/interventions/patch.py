"""Replace one token's row of a ``[n_tokens, width]`` tensor with a given vector (activation patching)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pyinterp.interventions.base import Op, Target


@dataclass(frozen=True)
class PatchRow:
    """Row ``position`` of ``name-layer`` becomes ``vector`` ``[width]``."""

    name: str
    layer: int
    position: int
    vector: np.ndarray = field(compare=False)

    def ops(self, target: Target) -> list[Op]:
        name, layer, position, row = target.planner.patch(self.name, self.layer, self.position, self.vector, target.n_tokens)
        return [Op("set", name, layer, seq=target.seq, positions=(position,), data=row[None, :], per_row=True)]
