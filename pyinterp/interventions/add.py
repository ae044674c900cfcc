"""Add a vector to a tensor's rows (steering), at every position or chosen ones."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError
from .base import Op, Target


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
        if not isinstance(self.scale, (int, float)) or isinstance(self.scale, bool) or not np.isfinite(self.scale):
            raise InputError(f"add {self.name}-{self.layer}: scale must be a finite number, got {self.scale!r}")
        name, layer, width = planner.row_tensor(self.name, self.layer, "add")
        row = planner.vector(self.vector, width, f"add {name}-{layer}") * np.float32(self.scale)
        if self.positions is None:
            return [Op("add", name, layer, seq=target.seq, data=row)]
        positions = tuple(planner.position(p, target.n_tokens, f"add {name}-{layer}") for p in self.positions)
        return [Op("add", name, layer, seq=target.seq, positions=positions, data=row)]
