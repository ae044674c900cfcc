"""Keep tensors as graph outputs: ``Capture("l_out")`` (every layer), ``Capture("attn_scores-3")``,
TransformerLens names (``"blocks.5.hook_resid_post"``)."""

from __future__ import annotations

from dataclasses import dataclass

from pyinterp.interventions.base import Op, Target


@dataclass(frozen=True)
class Capture:
    spec: str

    def ops(self, target: Target) -> list[Op]:
        return [Op("capture", name, il, seq=target.seq if target.seq >= 0 else -1)
                for name, il in target.planner.captures([self.spec])]
