"""What every intervention compiles to: records of the native op table (``pyinterp/csrc/interp.h``).

An intervention is an object with ``ops(target) -> list[Op]``: it checks itself against the model's
tensor table (``target.planner``) and the run (prompt length, sequence), then says which generic native
ops do it: ``mul`` (multiply, broadcast), ``set`` (replace rows), ``add`` (add, broadcast or rows) and
``capture`` (keep as an output); the batched engine also uses ``inject`` (replace the whole tensor, and skip
what led only to it). Ops on one tensor apply in order; two head masks multiply.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from pyinterp.engine.names import Planner


def op_kinds(header: str) -> dict[str, int]:
    """The op kinds ``enum pi_op_kind`` of the native header declares: name ("capture") -> value."""
    enum = re.search(r"enum pi_op_kind \{(.*?)\};", header, re.S)
    return {name.lower(): int(value) for name, value in re.findall(r"PI_OP_(\w+)\s*=\s*(\d+)", enum.group(1))}


# declared once, in C; read from the header so that this module does not load the native library
OP_KINDS = op_kinds((Path(__file__).resolve().parents[1] / "csrc" / "interp.h").read_text())


@dataclass(frozen=True)
class Op:
    """One record of the native op table.

    ``data`` is in numpy order (ggml's ``ne`` reversed): broadcast against the tensor (or, with positions or a
    sequence, against one token's slice of it), or with ``per_row`` one row per position ``[n_rows, width]``
    (row ``i`` for ``positions[i]``, or row ``p`` for position ``p`` when ``positions`` is None).
    ``seq`` -1 acts on every sequence of a decode.
    """

    kind: str
    name: str
    layer: int
    seq: int = -1
    positions: tuple[int, ...] | None = None
    data: np.ndarray | None = field(default=None, compare=False)
    per_row: bool = False

    def __post_init__(self) -> None:
        assert self.kind in OP_KINDS, self.kind


@dataclass(frozen=True)
class Target:
    """The run an intervention is compiled for."""

    planner: Planner            # the model's tensor table and sizes
    n_tokens: int               # tokens of the prompt
    seq: int = -1               # the llama.cpp sequence it acts on (-1: every sequence of the decode)
    scores_layers: frozenset[int] = frozenset()  # layers whose graph has attn_scores in this run


class Intervention(Protocol):
    def ops(self, target: Target) -> list[Op]:
        """The native ops that do this intervention in ``target``'s run; raises InputError when it does not fit."""
        ...
