"""The logit lens, the direct logit attribution and the head scores over a prompt set: one value per example and
cell, for :func:`pyinterp.analysis.stats.summarize` to aggregate (see docs/prompt-sets.md).

The lens runs several prompts per decode (:meth:`Engine.run_contexts`, each prompt in its own KV sequence): the
native lens reads its statistics at rows of the whole decode, so each prompt's position is its first row's offset
plus the position, and the targets are the union of the decode's examples' targets (each example then keeps its
own). The attribution (one target per pass) and the head scores (attention weights, which a multi-sequence decode
does not capture) run one prompt per pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from pyinterp.analysis.heads import KINDS, scores_from_attention
from pyinterp.analysis.lens import check_lens_tensor, positions_in
from pyinterp.engine.readouts import LensReadout
from pyinterp.errors import InputError

if TYPE_CHECKING:
    from pyinterp.engine.core import ModelLike

RANK_BYTES = 128 << 20  # the native rank's [n_vocab, n_targets, n_positions] F32 temporary, at most, per decode


@dataclass
class SetLens:
    """The target lens of every example (see :func:`lens_over_set`).

    ``positions[i]`` are example i's token positions (non-negative) for the asked ``positions`` (in that order);
    ``target_probs[i]``/``target_ranks[i]`` are ``[n_layers, n_positions, n_targets_i]`` for its targets
    ``targets[i]``; ``top_ids``/``top_probs`` ``[n_examples, n_layers, n_positions]`` the lens's top-1 token.
    """

    tensor: str
    norm: bool
    layers: list[int]
    positions: list[list[int]]
    targets: list[list[int]]
    target_probs: list[np.ndarray]
    target_ranks: list[np.ndarray]
    top_ids: np.ndarray
    top_probs: np.ndarray

    @property
    def p(self) -> np.ndarray:
        """``[n_examples, n_layers, n_positions]``: the probability of the example's answer (the sum over its
        targets, alternative spellings of one answer)."""
        return np.stack([p.astype(np.float64).sum(axis=-1) for p in self.target_probs])

    @property
    def rank(self) -> np.ndarray:
        """``[n_examples, n_layers, n_positions]``: the best rank of the example's targets (1: the top-1)."""
        return np.stack([r.min(axis=-1) for r in self.target_ranks]).astype(np.int64)

    @property
    def top1(self) -> np.ndarray:
        """``[n_examples, n_layers, n_positions]``: 1.0 where one of the targets is the top-1 token, else 0.0."""
        return (self.rank == 1).astype(np.float64)


def example_positions(positions: Iterable[int], n_tokens: int, name: str | None = None) -> list[int]:
    """``positions`` (negative from the end) in a prompt of ``n_tokens``; an error starts with ``name``
    (``FILE:LINE``)."""
    try:
        return positions_in(positions, n_tokens)
    except InputError as e:
        raise InputError(f"{name}: {e}" if name is not None else str(e)) from None


def decode_groups(model: ModelLike, ids: Sequence[list[int]], targets: Sequence[list[int]], n_positions: int,
                  per_decode: int | None) -> list[list[int]]:
    """Example indices per decode: at most ``per_decode`` (default the engine's sequences), their tokens within the
    context, and the native rank's temporary within :data:`RANK_BYTES`."""
    most = min(per_decode or model.engine.n_seq_max, model.engine.n_seq_max)
    groups: list[list[int]] = []
    rows, union = 0, set()
    for i, example in enumerate(ids):
        fits = False
        if groups:
            size = 4 * model.n_vocab * len(union | set(targets[i])) * (len(groups[-1]) + 1) * n_positions
            fits = len(groups[-1]) < most and rows + len(example) <= model.n_ctx and size <= RANK_BYTES
        if not fits:
            groups.append([])
            rows, union = 0, set()
        groups[-1].append(i)
        rows += len(example)
        union |= set(targets[i])
    return groups


def lens_over_set(model: ModelLike, ids: Sequence[list[int]], targets: Sequence[list[int]], tensor: str = "l_out",
                  norm: bool = True, layers: Iterable[int] | None = None, positions: Iterable[int] = (-1,),
                  per_decode: int | None = None, names: Sequence[str] | None = None,
                  on_decode=None) -> SetLens:
    """The ``tensor`` lens of every example ``ids[i]`` (checked token ids) at ``positions`` (negative from its end),
    with the probability and rank of its ``targets[i]`` (token ids) at ``layers`` (default every layer).

    ``per_decode`` prompts per decode (default as many as the engine's sequences and the context hold); 1 runs
    each prompt alone, as :func:`pyinterp.analysis.lens.logit_lens` does (the same values, bit for bit); more give
    the same values up to the rounding of a longer KV cache (on SmolLM2 Q4_1, 32 prompts of ~24 tokens in one
    decode: the first layers bit for bit, P(target) up to 2e-2 apart at the late layers). ``names`` (``FILE:LINE``) name the examples in errors;
    ``on_decode(n_examples)`` is called after each decode. Interventions of the context managers apply.
    """
    model.engine.check_live()
    layers = check_lens_tensor(model, tensor, 1, layers)
    positions = list(positions)
    where = [example_positions(positions, len(x), names[i] if names else None) for i, x in enumerate(ids)]
    if any(not t for t in targets):
        raise InputError("every example needs at least one target")
    probs: list[np.ndarray] = [np.empty(0)] * len(ids)
    ranks: list[np.ndarray] = [np.empty(0)] * len(ids)
    top_ids: list[np.ndarray] = [np.empty(0)] * len(ids)
    top_probs: list[np.ndarray] = [np.empty(0)] * len(ids)
    for group in decode_groups(model, ids, targets, len(positions), per_decode):
        offsets = np.cumsum([0] + [len(ids[i]) for i in group])
        rows = [int(offsets[k]) + p for k, i in enumerate(group) for p in where[i]]
        union = sorted({t for i in group for t in targets[i]})
        readout = LensReadout(model.n_layer, tensor, norm, 1, union, rows)
        lens = model.engine.run_contexts([ids[i] for i in group], (), readout=readout).readout
        kept = sorted(lens) if layers is None else layers
        stats = np.stack([lens[il][2] for il in kept])  # [n_layers, n_rows_read, n_union, 3]
        for k, i in enumerate(group):
            read = slice(k * len(positions), (k + 1) * len(positions))
            columns = [union.index(t) for t in targets[i]]
            probs[i] = stats[:, read][..., columns, 1]
            ranks[i] = stats[:, read][..., columns, 2].astype(np.int64) + 1
            top_ids[i] = np.stack([lens[il][0][read, 0] for il in kept])  # the lens reads only the rows asked for
            top_probs[i] = np.stack([lens[il][1][read, 0] for il in kept])
        if on_decode is not None:
            on_decode(len(group))
    return SetLens(tensor=tensor, norm=norm, layers=kept, positions=where, targets=[list(t) for t in targets],
                   target_probs=probs, target_ranks=ranks, top_ids=np.stack(top_ids), top_probs=np.stack(top_probs))


@dataclass
class SetAttribution:
    """Direct logit attribution of each example's target (see :func:`attribution_over_set`): ``embed``/``logit``
    ``[n_examples, n_positions]``, ``attn``/``ffn`` ``[n_examples, n_positions, n_layer]``, ``heads``
    ``[n_examples, n_positions, n_layer, n_head]``; ``targets[i][j]`` the token attributed at example i's position j."""

    targets: list[list[int]]
    positions: list[list[int]]
    logit: np.ndarray
    embed: np.ndarray
    attn: np.ndarray
    ffn: np.ndarray
    heads: np.ndarray


def attribution_over_set(model: ModelLike, ids: Sequence[list[int]], targets: Sequence[int | None],
                         positions: Iterable[int] = (-1,), names: Sequence[str] | None = None,
                         on_example=None) -> SetAttribution:
    """:func:`pyinterp.analysis.attribution.logit_attribution` of ``targets[i]`` over ``ids[i]`` at each of
    ``positions``, one prompt per pass (the attribution takes one target per pass); a target None is the
    model's top prediction at each position."""
    positions = list(positions)
    where = [example_positions(positions, len(x), names[i] if names else None) for i, x in enumerate(ids)]
    out: dict[str, list] = {k: [] for k in ("logit", "embed", "attn", "ffn", "heads")}
    attributed = []
    for i, example in enumerate(ids):
        done = [model.logit_attribution(example, targets[i], p) for p in where[i]]
        attributed.append([a.target for a in done])
        out["logit"].append([a.logit for a in done])
        out["embed"].append([a.embed for a in done])
        for key in ("attn", "ffn", "heads"):
            out[key].append(np.stack([getattr(a, key) for a in done]))
        if on_example is not None:
            on_example(1)
    return SetAttribution(targets=attributed, positions=where,
                          **{k: np.asarray(v, dtype=np.float64) for k, v in out.items()})


def heads_over_set(model: ModelLike, ids: Sequence[list[int]], on_example=None) -> dict[str, np.ndarray]:
    """Previous-token, duplicate-token and induction scores of every head on each example, one prompt per pass:
    ``[n_examples, n_layer, n_head]`` per kind, NaN where the example has no query of that kind (no repeat)."""
    out: dict[str, list[np.ndarray]] = {kind: [] for kind in KINDS}
    for example in ids:
        trace = model.run(example, capture=["attn_scores"])
        attn = np.stack([trace.attention(il) for il in range(model.n_layer)])
        scores = scores_from_attention(attn, example, missing_nan=True)
        for kind in KINDS:
            out[kind].append(scores[kind])
        if on_example is not None:
            on_example(1)
    return {kind: np.stack(values) for kind, values in out.items()}
