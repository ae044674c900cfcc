"""Activations of a reference prompt set (:class:`Reference`), which mean and resample ablation
(:mod:`pyinterp.interventions.mean_ablate`, :mod:`pyinterp.interventions.resample_ablate`) put in place of a head's
output or a tensor's rows, and the generic ops that put values there.

Positions are aligned from the start: position p of a run takes position p of the reference prompts (the BOS at
0 takes the BOS's). Every value is a row of a ``[n_tokens, width]`` view of the tensor (``kqv_heads``:
``width = n_head * head_dim``, head h at ``[h * head_dim, (h + 1) * head_dim)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from pyinterp.engine.names import ATTENTION_TENSORS, as_list
from pyinterp.errors import InputError
from pyinterp.interventions.base import Op, Target

if TYPE_CHECKING:
    from pyinterp.engine.core import ModelLike

Key = tuple[str, int]


@dataclass(frozen=True, eq=False)
class Reference:
    """``ids``: each reference prompt's token ids; ``acts``: ``(name, layer)`` -> one ``[n_tokens_i, width]``
    float32 array per prompt, in the order of ``ids``."""

    ids: tuple[tuple[int, ...], ...]
    acts: dict[Key, tuple[np.ndarray, ...]]

    @classmethod
    def capture(cls, model: ModelLike, prompts: Iterable[str | Sequence[int]], tensors: Iterable[str]) -> "Reference":
        """Run ``prompts`` (texts or token ids) capturing ``tensors`` (``"kqv_heads-3"``, ``"l_out-5"``,
        ``"l_out"`` for every layer), several prompts per decode (``engine.run_contexts``). The model's pushed
        interventions (its context managers') apply to these runs too."""
        ids = [model.prompt_ids(p) for p in as_list(prompts, "prompts")]
        if not ids:
            raise InputError("the reference prompt set is empty")
        keys = model.engine.planner().captures(list(tensors))
        for name, layer in keys:
            if name in ATTENTION_TENSORS:
                raise InputError(f"reference: {name}-{layer} has no row per token; mean and resample ablation "
                                 f"replace per-token tensors")
        specs = [f"{name}-{layer}" for name, layer in keys]
        acts: dict[Key, list[np.ndarray]] = {key: [] for key in keys}
        for group in _groups(ids, model.engine.n_seq_max, model.n_ctx):
            captured = model.engine.run_contexts(group, specs).captured
            ends = np.cumsum([len(g) for g in group])
            for key in keys:
                rows = np.ascontiguousarray(captured[key].reshape(int(ends[-1]), -1), dtype=np.float32)
                acts[key].extend(np.split(rows, ends[:-1]))
        return cls(tuple(tuple(i) for i in ids), {key: tuple(v) for key, v in acts.items()})

    def without(self, ids: Sequence[int]) -> "Reference":
        """The set less the prompts whose tokens are ``ids`` (resampling a prompt from itself changes nothing)."""
        keep = [i for i, own in enumerate(self.ids) if own != tuple(ids)]
        if not keep:
            raise InputError("the reference prompt set holds only the prompt being run")
        return Reference(tuple(self.ids[i] for i in keep), {k: tuple(v[i] for i in keep) for k, v in self.acts.items()})

    def rows(self, key: Key, width: int, what: str) -> tuple[np.ndarray, ...]:
        """Every prompt's ``[n_tokens_i, width]`` rows of ``key``, checked against the model's ``width``."""
        if key not in self.acts:
            have = ", ".join(f"{n}-{il}" for n, il in self.acts) or "nothing"
            raise InputError(f"{what}: the reference has no {key[0]}-{key[1]} (it captured {have})")
        arrays = self.acts[key]
        if arrays[0].shape[1] != width:
            raise InputError(f"{what}: the reference's {key[0]}-{key[1]} rows have {arrays[0].shape[1]} values, this "
                             f"model's {width} (captured on another model?)")
        return arrays

    def mean(self, key: Key, width: int, n_tokens: int, per_position: bool, what: str) -> np.ndarray:
        """Per position ``[n_tokens, width]``: row p is the mean of row p over the prompts that have a position p
        (a run longer than every reference prompt is an InputError); else ``[width]``, the mean of every row of
        every prompt (each token weighs the same)."""
        arrays = self.rows(key, width, what)
        if not per_position:
            return np.concatenate(arrays).astype(np.float64).mean(axis=0).astype(np.float32)
        longest = max(len(a) for a in arrays)
        if n_tokens > longest:
            raise InputError(f"{what}: the run has {n_tokens} tokens, the longest reference prompt {longest}; a mean "
                             f"per position needs a reference prompt at every position (or take the mean over positions)")
        sums = np.zeros((n_tokens, width))
        counts = np.zeros((n_tokens, 1))
        for a in arrays:
            k = min(len(a), n_tokens)
            sums[:k] += a[:k]
            counts[:k] += 1
        return (sums / counts).astype(np.float32)

    def draw(self, n_tokens: int, seed: int, what: str) -> int:
        """The index of the prompt drawn (``seed``) among those with at least ``n_tokens`` tokens."""
        eligible = [i for i, own in enumerate(self.ids) if len(own) >= n_tokens]
        if not eligible:
            longest = max(len(own) for own in self.ids)
            raise InputError(f"{what}: the run has {n_tokens} tokens and no reference prompt has as many (longest "
                             f"{longest}); resampling takes every position from one prompt")
        return eligible[int(np.random.default_rng(seed).integers(len(eligible)))]


def _groups(ids: list[list[int]], per_decode: int, max_tokens: int) -> list[list[list[int]]]:
    """``ids`` in groups of up to ``per_decode`` prompts and ``max_tokens`` tokens together."""
    groups: list[list[list[int]]] = [[]]
    n = 0
    for one in ids:
        if groups[-1] and (len(groups[-1]) == per_decode or n + len(one) > max_tokens):
            groups.append([])
            n = 0
        groups[-1].append(one)
        n += len(one)
    return groups


def check_reference(reference: object, what: str) -> Reference:
    if not isinstance(reference, Reference):
        raise InputError(f"{what}: needs a Reference (Reference.capture(model, prompts, tensors)), got "
                         f"{type(reference).__name__}")
    return reference


def head_width(target: Target) -> int:
    """``n_head * head_dim``: the values per token of ``kqv_heads``."""
    head_dim, n_head = target.planner.info.shapes["kqv_heads"][:2]
    return head_dim * n_head


def heads_by_layer(target: Target, heads: object, tensors: object, what: str) -> dict[int, list[int]]:
    """``(layer, head)`` pairs checked against the model, grouped by layer; neither heads nor ``tensors`` is an
    InputError."""
    planner = target.planner
    if not as_list(heads, "ablate") and not as_list(tensors, "capture"):
        raise InputError(f"{what}: name heads or tensors")
    out: dict[int, list[int]] = {}
    for item in as_list(heads, "ablate"):
        layer, head = planner.pair(item, what, "(layer, head) pairs like [(3, 4)]")
        layer = planner.attention_layer(layer, what)
        out.setdefault(layer, [])
        if planner.head(head, what) not in out[layer]:
            out[layer].append(planner.head(head, what))
    return out


def tensor_key(target: Target, spec: object, what: str) -> tuple[str, int, int]:
    """``"l_out-5"`` or ``("l_out", 5)`` as ``(name, layer, width)`` of a per-token tensor of the model."""
    if isinstance(spec, str):
        name, layer = target.planner.key(spec)
        if layer < 0:
            raise InputError(f"{what}: name the layer of {spec!r} ('l_out-5')")
    else:
        name, layer = target.planner.pair(spec, what, "tensors like 'l_out-5' or ('l_out', 5)")
    return target.planner.row_tensor(name, layer, what)


def replace_heads(target: Target, layer: int, heads: Sequence[int], values: np.ndarray) -> list[Op]:
    """``heads`` of ``layer`` output ``values``: per position ``[n_tokens, n_head * head_dim]`` (row p at prompt
    position p), or ``[n_head * head_dim]`` at every token (generated ones included); only the heads' slices are
    read. A mask zeroes the heads, then their values are added."""
    head_dim, n_head = target.planner.info.shapes["kqv_heads"][:2]
    keep = np.ones(n_head, dtype=bool)
    keep[list(heads)] = False
    mask = keep.astype(np.float32).reshape(1, n_head, 1)       # ne [1, n_head, 1]
    rows = values.reshape(-1, n_head, head_dim) * ~keep[None, :, None]  # zero outside the heads
    if values.ndim == 2:
        positions = tuple(range(target.n_tokens))
        return [Op("mul", "kqv_heads", layer, seq=target.seq, positions=positions, data=mask),
                Op("add", "kqv_heads", layer, seq=target.seq, positions=positions,
                   data=rows.reshape(target.n_tokens, n_head * head_dim), per_row=True)]
    # every token: broadcast over the tensor, or with a sequence over its rows [width, n]
    row = rows.reshape(1, n_head, head_dim) if target.seq < 0 else rows.reshape(n_head * head_dim)
    return [Op("mul", "kqv_heads", layer, seq=target.seq, data=mask),
            Op("add", "kqv_heads", layer, seq=target.seq, data=np.ascontiguousarray(row, dtype=np.float32))]


def replace_rows(target: Target, name: str, layer: int, values: np.ndarray) -> list[Op]:
    """The rows of ``name-layer`` become ``values``: per position ``[n_tokens, width]`` (row p at prompt position
    p), or ``[width]`` at every token (generated ones included: zeroed, then ``values`` added)."""
    if values.ndim == 2:
        return [Op("set", name, layer, seq=target.seq, positions=tuple(range(target.n_tokens)), data=values,
                   per_row=True)]
    shape = target.planner.info.shapes[name][:-1][::-1]  # one token's slice, numpy order
    row = values.reshape(shape) if target.seq < 0 else values
    return [Op("mul", name, layer, seq=target.seq, data=np.zeros(1, dtype=np.float32)),
            Op("add", name, layer, seq=target.seq, data=np.ascontiguousarray(row, dtype=np.float32))]
