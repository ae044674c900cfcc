"""Add a vector to a tensor's rows (steering), at every position or chosen ones."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pyinterp.checks import check_finite, check_float
from pyinterp.engine.names import as_list
from pyinterp.interventions.base import Op, Target


@dataclass(frozen=True)
class AddVector:
    """``scale * vector`` ``[width]`` is added to ``name-layer`` at ``positions`` (None: every token, generated
    ones included; negative positions count from the end of the prompt)."""

    name: str
    layer: int
    vector: np.ndarray = field(compare=False)
    positions: tuple[int, ...] | None = None
    scale: float = 1.0

    def ops(self, target: Target) -> list[Op]:
        planner = target.planner
        scale = check_float(self.scale, f"add {self.name}-{self.layer}: scale")
        name, layer, width = planner.row_tensor(self.name, self.layer, "add")
        with np.errstate(over="ignore"):  # a product beyond float32 is caught just below
            row = planner.vector(self.vector, width, f"add {name}-{layer}") * np.float32(scale)
        check_finite(row, f"add {name}-{layer}: scale times vector")
        if self.positions is None:
            return [Op("add", name, layer, seq=target.seq, data=row)]
        positions = tuple(planner.position(p, target.n_tokens, f"add {name}-{layer}")
                          for p in as_list(self.positions, "positions"))
        return [Op("add", name, layer, seq=target.seq, positions=positions, data=row)]
