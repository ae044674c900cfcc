"""The logit lens: what each layer's residual stream (or one of its parts) would predict, as the top-k tokens
and as the probability and rank of chosen target tokens, computed inside the ggml graph."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from pyinterp.checks import check_bool, check_int
from pyinterp.engine.names import as_list, split_name
from pyinterp.engine.readouts import LensReadout
from pyinterp.errors import InputError

if TYPE_CHECKING:
    from pyinterp.engine.core import ModelLike


@dataclass
class LogitLens:
    """Top-k tokens of ``tensor`` unembedded at every layer and kept position, and the targets' statistics
    (see :func:`logit_lens`).

    ``ids`` and ``probs`` are ``[n_layers, n_positions, k]``, most probable first; ``layers`` are the layer
    indices of the first axis (-1: a tensor outside the layers), ``positions`` the token positions of the
    second (every token unless asked otherwise); ``strs[l][p][j]`` is the text of ``ids[l, p, j]``.
    ``target_logits``, ``target_probs`` and ``target_ranks`` are ``[n_layers, n_positions, n_targets]`` for the
    token ids ``targets``: the target's logit, its probability (the softmax over the vocabulary) and its rank,
    1 + the number of tokens with a greater logit (1: the top prediction). ``entropy`` ``[n_layers, n_positions]``
    is the entropy of each distribution, in nats (None unless asked for). Probabilities and entropy are at temperature ``temp`` (the
    softmax of logit / temp); logits and ranks do not depend on it.
    """

    tensor: str
    norm: bool
    layers: list[int]
    tokens: list[int]
    token_strs: list[str]
    positions: list[int]
    ids: np.ndarray
    probs: np.ndarray
    strs: list[list[list[str]]]
    targets: list[int]
    target_strs: list[str]
    target_logits: np.ndarray
    target_probs: np.ndarray
    target_ranks: np.ndarray
    entropy: np.ndarray | None = None
    temp: float = 1.0

    @property
    def title(self) -> str:
        return f"{'norm' if self.norm else 'raw'} logit lens of {self.tensor}"

    @property
    def position_strs(self) -> list[str]:
        """The text of the token at each kept position."""
        return [self.token_strs[p] for p in self.positions]

    def to_png(self, path: str | os.PathLike, row_labels: list[str] | None = None) -> Path:
        """Write a layers x positions heatmap of the top-1 probability, each cell labelled with its token;
        rows are labelled with ``row_labels`` (default: the layer indices)."""
        from pyinterp.viz.plot import lens_heatmap, save_png

        top_str = [[token[0] for token in layer] for layer in self.strs]
        image = lens_heatmap(self.probs[:, :, 0], top_str, self.position_strs, title=self.title,
                             row_labels=row_labels or [str(il) for il in self.layers])
        return save_png(image, path)

    def targets_to_png(self, path: str | os.PathLike, row_labels: list[str] | None = None) -> Path:
        """Write the targets' probabilities as layers (0 at the bottom) x targets heatmaps, one per kept
        position, each cell labelled with its probability; rows labelled ``row_labels`` (default the layers)."""
        from pyinterp.viz.plot import save_png, score_grids

        if not self.targets:
            raise InputError("this lens has no targets")
        probs = self.target_probs
        names = [f"position {p} {token!r}" for p, token in zip(self.positions, self.position_strs, strict=True)]
        image = score_grids([probs[:, i, :] for i in range(len(self.positions))], names,
                            title=f"P(target), {self.title}", row_labels=row_labels or [str(il) for il in self.layers],
                            col_labels=self.target_strs)
        return save_png(image, path)


def resolve_target(model: ModelLike, target: int | str) -> int:
    """A target token: an id, or a text that is exactly one token (tokenized as given, no BOS). A text of
    several tokens is a one-line error that names the variants (leading space or not, case) that are one."""
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        return model.engine.check_ids([target])[0]
    if not isinstance(target, str):
        raise InputError(f"a target is a token id or a text, got {target!r}")
    pieces = model.tokenize(target, add_bos=False)
    if len(pieces) == 1:
        return pieces[0]
    if not target.strip():
        raise InputError(f"target {target!r} is {len(pieces)} tokens, not one")
    shown = ", ".join(repr(model.token_str(t)) for t in pieces)
    variants = single_token_variants(model, target)
    hint = ("; single-token variants: " + ", ".join(f"{v!r} (id {i})" for v, i in variants) if variants
            else "; no variant with or without a leading space, or in another case, is one token")
    raise InputError(f"target {target!r} is {len(pieces)} tokens ({shown}), not one{hint}")


def single_token_variants(model: ModelLike, text: str) -> list[tuple[str, int]]:
    """``(text, id)`` of the variants of ``text`` other than itself that are one token: with and without a
    leading space, as given, capitalized and lower-case."""
    core = text.strip()
    out: list[tuple[str, int]] = []
    for word in dict.fromkeys([core, core.capitalize(), core.lower()]):
        for variant in (" " + word, word):
            if variant == text or any(variant == v for v, _ in out):
                continue
            pieces = model.tokenize(variant, add_bos=False)
            if len(pieces) == 1:
                out.append((variant, pieces[0]))
    return out


def check_lens_tensor(model: ModelLike, tensor: str, top_k: int, layers: Iterable[int] | None) -> list[int] | None:
    """Check the lens arguments; returns the layers asked for (sorted, each once), or None for all."""
    info = model.tensor_info()
    if not isinstance(tensor, str):
        raise InputError(f"logit lens: tensor must be a name like 'l_out', got {tensor!r}")
    name, layer = split_name(tensor)
    if layer is not None:
        raise InputError(f"logit lens: tensor takes a base name; for one layer: tensor={name!r}, layers=[{layer}]")
    if tensor not in info.layers:
        model.engine.planner().captures([tensor])  # raises the unknown-name error
    width = info.shapes[tensor][0]
    if info.rank(tensor) != 2 or width != model.n_embd:
        raise InputError(f"logit lens: {tensor} is not a residual-width tensor "
                         f"(ggml shape {info.shapes[tensor]}, the model's n_embd is {model.n_embd})")
    check_int(top_k, "logit lens: top_k", 1, model.n_vocab)
    if layers is None:
        return None
    on, layers = info.layers[tensor], as_list(layers, "layers")
    if not layers:
        raise InputError("logit lens: layers is empty")
    for il in layers:
        if not isinstance(il, (int, np.integer)) or isinstance(il, bool) or il not in on:
            where = "outside the layers (-1)" if on == {-1} else f"on layers {min(on)}..{max(on)}"
            raise InputError(f"logit lens: {tensor} is not computed on layer {il!r} (it is {where})")
    return sorted({int(il) for il in layers})


def check_temp(temp: float) -> float:
    """A lens temperature: a finite number > 0."""
    if isinstance(temp, bool) or not isinstance(temp, (int, float, np.integer, np.floating)) or not 0 < temp < np.inf:
        raise InputError(f"logit lens: temp must be a number > 0, got {temp!r}")
    return float(temp)


def positions_in(positions: Iterable[int] | None, n_tokens: int) -> list[int]:
    """Token positions (negative from the end) as non-negative indices, in the order given; None: all."""
    if positions is None:
        return list(range(n_tokens))
    positions = as_list(positions, "positions")
    if not positions:
        raise InputError("positions is empty")
    for p in positions:
        if not isinstance(p, (int, np.integer)) or isinstance(p, bool) or not -n_tokens <= p < n_tokens:
            raise InputError(f"position {p!r} out of range (the prompt has {n_tokens} tokens)")
    return [int(p) % n_tokens for p in positions]


def check_positions(positions: Iterable[int] | None, n_tokens: int) -> list[int]:
    """Token positions (negative from the end) as sorted non-negative indices, each once; None: all."""
    return sorted(set(positions_in(positions, n_tokens)))


def logit_lens(model: ModelLike, tokens_or_text: str | Sequence[int], tensor: str = "l_out", top_k: int = 10,
               norm: bool = True, layers: Iterable[int] | None = None, targets: Iterable[int | str] = (),
               positions: Iterable[int] | None = None, temp: float = 1.0, entropy: bool = False) -> LogitLens:
    """Unembed ``tensor`` of every layer (or of ``layers``) at every token and keep the top-k tokens and the
    logit, log-probability and rank of each of ``targets`` (token ids or single-token texts).

    ``norm=True`` (the norm lens) applies the model's final norm first, as the model does to its last
    layer; ``norm=False`` (the raw lens) unembeds the tensor as it is. Computed inside the ggml graph with
    the model's own (quantized, possibly tied) unembedding: only the top-k and ``[n_targets, n_tokens]``
    values per layer leave it. ``positions`` (negative from the end): only those tokens are unembedded (default
    all): the rows are selected before the final norm and the unembedding, so a last-position lens costs one row
    of the unembedding per layer. ``temp``: the probabilities are the softmax of logit / temp. ``entropy``: also the
    entropy of every lensed distribution (four more passes over the vocabulary per position and layer).
    Interventions of the context managers apply. A tensor outside the layers (the embedding) has layer -1.
    The rank compares every logit with every target's at every kept position: a
    ``[n_vocab, n_targets, n_positions]`` temporary per layer.
    """
    model.engine.check_live()
    ids = model.prompt_ids(tokens_or_text)
    layers = check_lens_tensor(model, tensor, top_k, layers)
    top_k, norm = int(top_k), check_bool(norm, "logit lens: norm")
    temp, entropy = check_temp(temp), check_bool(entropy, "logit lens: entropy")
    targets = [resolve_target(model, t) for t in as_list(targets, "targets")]
    positions = check_positions(positions, len(ids))
    lens = model.engine.run(ids, readout=LensReadout(model.n_layer, tensor, norm, top_k, targets, positions, temp, entropy,
                                                     [0] if positions == [len(ids) - 1] else None),
                            logits="last").readout
    layers = sorted(lens) if layers is None else layers
    top_ids = np.stack([lens[il][0] for il in layers])
    stats = np.stack([lens[il][2] for il in layers])  # [n_layers, n_positions, n_targets, 3]
    names = {int(i): model.token_str(int(i)) for i in np.unique(top_ids)}
    return LogitLens(
        tensor=tensor, norm=norm, layers=layers, tokens=ids, token_strs=[model.token_str(t) for t in ids],
        positions=positions, ids=top_ids, probs=np.stack([lens[il][1] for il in layers]),
        strs=[[[names[int(i)] for i in row] for row in layer] for layer in top_ids],
        targets=targets, target_strs=[model.token_str(t) for t in targets],
        target_logits=stats[..., 0], target_probs=stats[..., 1], target_ranks=stats[..., 2].astype(np.int64) + 1,
        entropy=np.stack([lens[il][3] for il in layers]) if entropy else None, temp=temp,
    )
