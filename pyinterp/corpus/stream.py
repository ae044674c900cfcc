"""A model run over a corpus's contexts, a decode of several contexts at a time: the captured tensors of every
token, with its token id, document, position and context (:class:`Batch`).

Each decode holds up to ``per_decode`` contexts (and no more tokens than the model's context, ``n_ctx``), each
in its own sequence (:meth:`pyinterp.engine.Engine.run_contexts`). The pass is truncated: the layers after the
last tensor captured (or encoded by an SAE) are not computed, nor the logits. A row's values are those of a run
of its context alone up to the rounding of the longer KV cache; with ``per_decode=1`` they are bit for bit
``Model.run(context, capture=...)``'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np

from pyinterp.corpus.packing import Context
from pyinterp.engine.names import ATTENTION_TENSORS
from pyinterp.errors import InputError

if TYPE_CHECKING:
    from pyinterp.engine.core import ModelLike, Readout


@dataclass
class Batch:
    """The rows of one decode: every token of its contexts, the contexts one after the other."""

    token_ids: np.ndarray           # [n_rows] int32
    doc: np.ndarray                 # [n_rows] int64: the row's document
    pos: np.ndarray                 # [n_rows] int32: its position in the document (-1: an added BOS or separator)
    context: np.ndarray             # [n_rows] int64: its context's global number
    tensors: dict[str, np.ndarray]  # tensor name as given -> [n_rows, width] float32
    sae: tuple[np.ndarray, np.ndarray] | None = None  # SAE feature ids [n_rows, k] int32 and values [n_rows, k] float32

    @property
    def n_rows(self) -> int:
        return len(self.token_ids)


def tensor_keys(model: ModelLike, names: Iterable[str]) -> dict[str, tuple[str, int]]:
    """Each tensor name (a capturable name or TransformerLens alias of one layer's tensor) -> its ``(name, layer)``
    key; one-line errors for unknown names, names of several tensors and attention weights."""
    planner = model.engine.planner()
    keys = {}
    for spec in names:
        found = planner.captures([spec])  # checks the name against the model's graph
        if len(found) != 1:
            raise InputError(f"tensor {spec!r} names {len(found)} tensors; name one layer's (like {found[0][0]}-{found[0][1]})")
        if found[0][0] in ATTENTION_TENSORS:
            raise InputError(f"tensor {spec!r}: attention weights have no fixed width per token; extract another tensor")
        keys[spec] = found[0]
    if len(set(keys.values())) != len(keys):
        raise InputError("two tensor names name the same tensor")
    return keys


def widths(model: ModelLike, keys: dict[str, tuple[str, int]]) -> dict[str, int]:
    """Values per token of each tensor (the product of its ggml shape but the token axis)."""
    info = model.tensor_info()
    out = {}
    for spec, (name, _) in keys.items():
        shape = info.shapes[name]
        out[spec] = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    return out


def decode_groups(contexts: Iterable[Context], per_decode: int, max_tokens: int) -> Iterator[list[Context]]:
    """``contexts`` in groups of up to ``per_decode`` holding up to ``max_tokens`` tokens together."""
    group: list[Context] = []
    n = 0
    for context in contexts:
        if group and (len(group) == per_decode or n + len(context.ids) > max_tokens):
            yield group
            group, n = [], 0
        group.append(context)
        n += len(context.ids)
    if group:
        yield group


def batches(model: ModelLike, contexts: Iterable[Context], names: Iterable[str], *, per_decode: int,
            first_context: int = 0, readout: Readout | None = None) -> Iterator[Batch]:
    """One :class:`Batch` per decode of ``contexts`` (numbered from ``first_context``), capturing ``names``;
    ``readout``: an SAE readout (:class:`pyinterp.engine.readouts.SAEReadout`) whose features fill ``Batch.sae``."""
    keys = tensor_keys(model, names)
    number = first_context
    for group in decode_groups(contexts, per_decode, model.n_ctx):
        result = model.engine.run_contexts([c.ids.tolist() for c in group], list(keys), readout=readout)
        n_rows = sum(len(c.ids) for c in group)
        tensors = {spec: result.captured[key].reshape(n_rows, -1) for spec, key in keys.items()}
        sae = None if readout is None else (result.readout[0], result.readout[1])
        lengths = [len(c.ids) for c in group]
        yield Batch(np.concatenate([c.ids for c in group]), np.concatenate([c.doc for c in group]),
                    np.concatenate([c.pos for c in group]),
                    np.repeat(np.arange(number, number + len(group), dtype=np.int64), lengths), tensors, sae)
        number += len(group)
