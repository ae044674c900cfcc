"""Replace one attention head's output (its slice of ``kqv_heads``) with given values: per-head patching."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pyinterp.checks import check_finite
from pyinterp.engine.names import as_list
from pyinterp.errors import InputError
from pyinterp.interventions.base import Op, Target


@dataclass(frozen=True)
class PatchHead:
    """Head ``head`` of ``layer`` outputs ``values`` ``[n_tokens, head_dim]`` (row p at position p, e.g. the same
    head's output in another run) at ``positions`` (None: every token of the prompt).

    Two generic ops on those tokens' ``kqv_heads`` rows: a head mask zeroes the head, then the values are
    added into its slice."""

    layer: int
    head: int
    values: np.ndarray = field(compare=False)
    positions: tuple[int, ...] | None = None

    def ops(self, target: Target) -> list[Op]:
        planner = target.planner
        what = f"patch head {self.layer}:{self.head}"
        layer = planner.attention_layer(self.layer, what)
        head = planner.head(self.head, what)
        head_dim, n_head = planner.info.shapes["kqv_heads"][:2]
        values = check_finite(self.values, f"{what}: values")
        if values.shape != (target.n_tokens, head_dim):
            raise InputError(f"{what}: values must be [{target.n_tokens}, {head_dim}] (n_tokens, head_dim), "
                             f"got {list(values.shape)}")
        positions = tuple(range(target.n_tokens)) if self.positions is None else \
            tuple(planner.position(p, target.n_tokens, what) for p in as_list(self.positions, "positions"))
        rows = np.zeros((len(positions), n_head, head_dim), dtype=np.float32)
        rows[:, head] = values[list(positions)]
        mask = np.ones((1, n_head, 1), dtype=np.float32)  # ne [1, n_head, 1]: one token's [head_dim, n_head] slice
        mask[0, head, 0] = 0.0
        return [Op("mul", "kqv_heads", layer, seq=target.seq, positions=positions, data=mask),
                Op("add", "kqv_heads", layer, seq=target.seq, positions=positions,
                   data=rows.reshape(len(positions), n_head * head_dim), per_row=True)]
