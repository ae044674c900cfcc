"""Activation-patching sweeps and head scans: one forward pass per cell, one metric of the final logits each.

- :func:`patch_sweep`: run the clean prompt once capturing a ``[n_tokens, width]`` tensor (``l_out`` by
  default), then for every (layer, position) run the corrupted prompt with that one row replaced by the
  clean row, and record the metric. ``[n_layers, n_positions]``.
- :func:`head_ablation_scan`: ablate one head at a time and record how much the metric changes.
  ``[n_layers, n_head]``.

A metric is any callable on the last token's logits ``[n_vocab] -> float``, or one built from tokens
(:func:`logit_diff`, :func:`prob`), which names its tokens by id or single-token text. Every cell goes
through :func:`run_metric`, the one place that runs the model.

Patching single heads (``kqv_heads`` is ``[n_tokens, n_head, head_dim]``) is not offered: the native patch
op replaces whole rows of ``[n_tokens, width]`` tensors only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import numpy as np

from .errors import InputError
from .hooks import Head, Patch, as_list

if TYPE_CHECKING:
    from .model import Model

Token = int | str
MetricFn = Callable[[np.ndarray], float]


def token_id(model: Model, token: Token) -> int:
    """A token id, or the id of single-token text (no BOS added); anything else is an InputError."""
    if isinstance(token, str):
        pieces = model.tokenize(token, add_bos=False)
        if len(pieces) != 1:
            raise InputError(f"token {token!r} is {len(pieces)} tokens, not one")
        return pieces[0]
    if not isinstance(token, (int, np.integer)) or isinstance(token, bool):
        raise InputError(f"a token must be an id or single-token text, got {token!r}")
    if not 0 <= token < model.n_vocab:
        raise InputError(f"token id {token} out of range (vocabulary has {model.n_vocab} tokens)")
    return int(token)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


@dataclass(frozen=True)
class Metric:
    """A metric named by tokens (ids or single-token text); :meth:`bind` resolves them against a model.

    ``kind`` is ``"logit_diff"`` (``logits[good] - logits[bad]``) or ``"prob"`` (softmax probability of
    ``tokens[0]``)."""

    kind: str
    tokens: tuple[Token, ...]

    def bind(self, model: Model) -> MetricFn:
        """The metric as a function of the last token's logits ``[n_vocab] -> float``."""
        ids = [token_id(model, t) for t in self.tokens]
        if self.kind == "logit_diff":
            good, bad = ids
            return lambda logits: float(logits[good]) - float(logits[bad])
        (target,) = ids
        return lambda logits: float(np.exp(_log_softmax(logits)[target]))

    def describe(self, model: Model) -> str:
        """The metric in words, e.g. ``logit(' Paris') - logit(' Rome')``."""
        names = [repr(model.token_str(token_id(model, t))) for t in self.tokens]
        return f"logit({names[0]}) - logit({names[1]})" if self.kind == "logit_diff" else f"p({names[0]})"


def logit_diff(good: Token, bad: Token) -> Metric:
    """``logits[good] - logits[bad]`` at the last token."""
    return Metric("logit_diff", (good, bad))


def prob(token: Token) -> Metric:
    """The probability of ``token`` at the last token (softmax over the whole vocabulary)."""
    return Metric("prob", (token,))


def bind_metric(model: Model, metric: Metric | MetricFn) -> MetricFn:
    """``metric`` as a function of the last token's logits ``[n_vocab] -> float``."""
    if isinstance(metric, Metric):
        return metric.bind(model)
    if not callable(metric):
        raise InputError(f"metric must be logit_diff(...), prob(...) or a callable on the logits, got {metric!r}")
    return metric


def run_metric(model: Model, ids: Sequence[int], metric: MetricFn, *, patch: Iterable[Patch] = (),
               ablate: Iterable[Head] = ()) -> float:
    """One forward pass of ``ids`` under these interventions; ``metric`` of the last token's logits.
    The one place a sweep runs the model (only the last row of logits is computed)."""
    logits = model.run(ids, patch=patch, ablate=ablate, logits="last").logits[-1]
    value = metric(logits)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InputError(f"the metric must return a number, got {value!r}") from None


def _layers(model: Model, layers: Iterable[int] | None) -> list[int]:
    if layers is None:
        return list(range(model.n_layer))
    layers = as_list(layers, "layers")
    if not layers:
        raise InputError("layers is empty")
    for il in layers:
        if not isinstance(il, (int, np.integer)) or isinstance(il, bool) or not 0 <= il < model.n_layer:
            raise InputError(f"layer {il!r} out of range (the model has {model.n_layer} layers: 0..{model.n_layer - 1})")
    return [int(il) for il in layers]


def _positions(positions: Iterable[int] | None, n_tokens: int) -> list[int]:
    if positions is None:
        return list(range(n_tokens))
    positions = as_list(positions, "positions")
    if not positions:
        raise InputError("positions is empty")
    for pos in positions:
        if not isinstance(pos, (int, np.integer)) or isinstance(pos, bool) or not -n_tokens <= pos < n_tokens:
            raise InputError(f"position {pos!r} out of range (the prompts have {n_tokens} tokens)")
    return [int(pos) % n_tokens for pos in positions]


def patch_sweep(model: Model, clean: str | Sequence[int], corrupt: str | Sequence[int], *,
                metric: Metric | MetricFn, tensor: str = "l_out", layers: Iterable[int] | None = None,
                positions: Iterable[int] | None = None,
                on_cell: Callable[[], None] | None = None) -> np.ndarray:
    """Activation patching, clean into corrupt, one cell at a time.

    Runs ``clean`` once capturing ``tensor`` (a ``[n_tokens, width]`` tensor: ``l_out``, ``attn_out``,
    ``ffn_out``, ...) on ``layers`` (default all), then for each layer and each of ``positions`` (default
    all; negative counts from the end) runs ``corrupt`` with that row of ``tensor-layer`` replaced by the
    clean row, and records ``metric`` of the last token's logits. The prompts (text or ids) must have as
    many tokens. ``on_cell`` is called after each cell (progress). Interventions of the model's context
    managers apply to every run.

    Returns ``[n_layers, n_positions]`` float64, rows in the order of ``layers``, columns in the order of
    ``positions``.
    """
    fn = bind_metric(model, metric)
    clean_ids, corrupt_ids = model.prompt_ids(clean), model.prompt_ids(corrupt)
    if len(clean_ids) != len(corrupt_ids):
        raise InputError(f"the clean prompt has {len(clean_ids)} tokens and the corrupted one {len(corrupt_ids)}; "
                         f"patching needs equal counts")
    layers = _layers(model, layers)
    positions = _positions(positions, len(clean_ids))
    info = model.tensor_info()
    if tensor in info.shapes and info.rank(tensor) != 2:
        raise InputError(f"patch_sweep: {tensor!r} is not a [n_tokens, width] tensor (ggml shape {info.shapes[tensor]}); "
                         f"the native patch op replaces whole rows")
    trace = model.run(clean_ids, capture=[f"{tensor}-{il}" for il in layers], logits=None)
    out = np.empty((len(layers), len(positions)))
    for i, il in enumerate(layers):
        rows = trace[tensor, il]
        for j, pos in enumerate(positions):
            out[i, j] = run_metric(model, corrupt_ids, fn, patch=[(tensor, il, pos, rows[pos])])
            if on_cell is not None:
                on_cell()
    return out


def head_ablation_scan(model: Model, prompt: str | Sequence[int], metric: Metric | MetricFn,
                       layers: Iterable[int] | None = None,
                       on_cell: Callable[[], None] | None = None) -> np.ndarray:
    """How much ablating each head alone changes the metric.

    Runs ``prompt`` once plainly and once per head of ``layers`` (default all) with that head ablated
    (its attention weights zeroed, so its output is zero). Returns ``[n_layers, n_head]`` float64:
    ``metric(ablated) - metric(plain)``, negative where the head helps the metric. ``on_cell`` is called
    after each head (progress).
    """
    fn = bind_metric(model, metric)
    ids = model.prompt_ids(prompt)
    layers = _layers(model, layers)
    base = run_metric(model, ids, fn)
    out = np.empty((len(layers), model.n_head))
    for i, il in enumerate(layers):
        for h in range(model.n_head):
            out[i, h] = run_metric(model, ids, fn, ablate=[(il, h)]) - base
            if on_cell is not None:
                on_cell()
    return out
