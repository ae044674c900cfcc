"""Activation-patching sweeps and head scans: one metric of the final logits per cell, the cells run as
variants that reuse the plain run's unchanged positions and layers (:mod:`pyinterp.engine.batch`), each cell bit
for bit the :meth:`Model.run` it stands for.

- :func:`patch_sweep`: run the clean prompt once capturing a ``[n_tokens, width]`` tensor (``l_out`` by
  default), then for every (layer, position) run the corrupted prompt with that one row replaced by the
  clean row, and record the metric. ``[n_layers, n_positions]``.
- :func:`head_ablation_scan`: ablate one head at a time (zero, mean or resample ablation) and record how much
  the metric changes. ``[n_layers, n_head]``.
- :func:`head_patch_scan`: patch one head's output (``kqv_heads``) at a time, clean into corrupt.
  ``[n_layers, n_head]``.

A metric is any callable on the last token's logits ``[n_vocab] -> float``, or one built from tokens
(:func:`logit_diff`, :func:`prob`), which names its tokens by id or single-token text. Every sweep goes
through :func:`evaluate`, the one place that runs the variants.

``batched=False`` runs one :meth:`Model.run` per cell instead (the reference loop: the same numbers,
slower).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import numpy as np

from pyinterp.analysis.ablation import RefLike, head_ablation, head_reference
from pyinterp.analysis.lens import positions_in, resolve_target
from pyinterp.engine.batch import run_variants
from pyinterp.engine.names import as_list
from pyinterp.errors import InputError
from pyinterp.interventions import Intervention, PatchHead, PatchRow

if TYPE_CHECKING:
    from pyinterp.model import Model

Token = int | str
MetricFn = Callable[[np.ndarray], float]


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
        return Metric(self.kind, tuple(resolve_target(model, t) for t in self.tokens))

    def __call__(self, logits: np.ndarray) -> float:
        """The metric of the last token's logits ``[n_vocab]``, for a metric named by token ids (text needs a
        model to resolve it: :meth:`bind`)."""
        if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in self.tokens):
            raise InputError(f"{self.kind}{self.tokens!r} names tokens by text: bind it to a model first "
                             f"(metric.bind(model)), or name the tokens by id")
        logits = np.asarray(logits).reshape(-1)
        for t in self.tokens:
            if not 0 <= t < logits.shape[0]:
                raise InputError(f"{self.kind}: token id {t} out of range ({logits.shape[0]} logits)")
        if self.kind == "logit_diff":
            good, bad = self.tokens
            return float(logits[good]) - float(logits[bad])
        return float(np.exp(_log_softmax(logits)[self.tokens[0]]))

    def describe(self, model: Model) -> str:
        """The metric in words, e.g. ``logit(' Paris') - logit(' Rome')``."""
        names = [repr(model.token_str(resolve_target(model, t))) for t in self.tokens]
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


def _number(value: object) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InputError(f"the metric must return a number, got {value!r}") from None


def run_metric(model: Model, ids: Sequence[int], metric: MetricFn) -> float:
    """``metric`` of the last token's logits of one plain run of ``ids``."""
    return _number(metric(model.run(ids, logits="last").logits[-1]))


def evaluate(model: Model, ids: Sequence[int], variants: list[list[Intervention]], metric: MetricFn, batched: bool = True,
             on_cell: Callable[[], None] | None = None) -> tuple[float, np.ndarray]:
    """``metric`` of the last token's logits of the plain prompt, and of each variant (a list of interventions)
    ``[n_variants]``: batched (:func:`pyinterp.engine.batch.run_variants`) or one run per variant."""
    if batched:
        plain, logits = run_variants(model, ids, variants, on_variant=on_cell)
        return _number(metric(plain)), np.array([_number(metric(row)) for row in logits])
    plain = run_metric(model, ids, metric)
    values = np.empty(len(variants))
    for i, variant in enumerate(variants):
        values[i] = _number(metric(model.run(ids, interventions=variant, logits="last").logits[-1]))
        if on_cell is not None:
            on_cell()
    return plain, values


def _pair_ids(model: Model, clean: str | Sequence[int], corrupt: str | Sequence[int]) -> tuple[list[int], list[int]]:
    """The two prompts' ids, which patching needs of equal length."""
    clean_ids, corrupt_ids = model.prompt_ids(clean), model.prompt_ids(corrupt)
    if len(clean_ids) != len(corrupt_ids):
        raise InputError(f"the clean prompt has {len(clean_ids)} tokens and the corrupted one {len(corrupt_ids)}; "
                         f"patching needs equal counts")
    return clean_ids, corrupt_ids


def checked_layers(model: Model, layers: Iterable[int] | None) -> list[int]:
    if layers is None:
        return list(range(model.n_layer))
    layers = as_list(layers, "layers")
    if not layers:
        raise InputError("layers is empty")
    for il in layers:
        if not isinstance(il, (int, np.integer)) or isinstance(il, bool) or not 0 <= il < model.n_layer:
            raise InputError(f"layer {il!r} out of range (the model has {model.n_layer} layers: 0..{model.n_layer - 1})")
    return [int(il) for il in layers]


def patch_sweep(model: Model, clean: str | Sequence[int], corrupt: str | Sequence[int], *,
                metric: Metric | MetricFn, tensor: str = "l_out", layers: Iterable[int] | None = None,
                positions: Iterable[int] | None = None, batched: bool = True,
                on_cell: Callable[[], None] | None = None) -> np.ndarray:
    """Activation patching, clean into corrupt.

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
    clean_ids, corrupt_ids = _pair_ids(model, clean, corrupt)
    layers = checked_layers(model, layers)
    positions = positions_in(positions, len(clean_ids))
    info = model.tensor_info()
    if tensor in info.shapes and info.rank(tensor) != 2:
        raise InputError(f"patch_sweep: {tensor!r} is not a [n_tokens, width] tensor (ggml shape {info.shapes[tensor]}); "
                         f"the native patch op replaces whole rows")
    trace = model.run(clean_ids, capture=[f"{tensor}-{il}" for il in layers], logits=None)
    variants = [[PatchRow(tensor, il, pos, trace[tensor, il][pos])] for il in layers for pos in positions]
    _, values = evaluate(model, corrupt_ids, variants, fn, batched, on_cell)
    return values.reshape(len(layers), len(positions))


def head_ablation_scan(model: Model, prompt: str | Sequence[int], metric: Metric | MetricFn,
                       layers: Iterable[int] | None = None, batched: bool = True,
                       on_cell: Callable[[], None] | None = None, *, mode: str = "zero", reference: RefLike = None,
                       per_position: bool = True, seed: int = 0) -> np.ndarray:
    """How much ablating each head alone changes the metric.

    Runs ``prompt`` once plainly and once per head of ``layers`` (default all) with that head ablated, and
    returns ``[n_layers, n_head]`` float64: ``metric(ablated) - metric(plain)``, negative where the head helps
    the metric. ``on_cell`` is called after each head (progress).

    ``mode``: ``"zero"`` (its attention weights zeroed, so its output is zero), ``"mean"`` (its output replaced
    by its mean over ``reference``, per position or, ``per_position=False``, over positions) or ``"resample"``
    (by its output in one prompt of ``reference`` drawn with ``seed``, the same for every head, the scanned prompt
    left out); ``reference``: a :class:`pyinterp.interventions.Reference` or prompts (texts or ids), whose head
    outputs are then captured once for every layer scanned (see :mod:`pyinterp.analysis.ablation`).
    """
    fn = bind_metric(model, metric)
    ids = model.prompt_ids(prompt)
    layers = checked_layers(model, layers)
    if mode in ("mean", "resample"):
        reference = head_reference(model, reference, layers, mode)
    variants = [[head_ablation(model, ((il, h),), mode, reference, ids, per_position, seed)]
                for il in layers for h in range(model.n_head)]
    plain, values = evaluate(model, ids, variants, fn, batched, on_cell)
    return (values - plain).reshape(len(layers), model.n_head)


def head_patch_scan(model: Model, clean: str | Sequence[int], corrupt: str | Sequence[int], metric: Metric | MetricFn,
                    layers: Iterable[int] | None = None, positions: Iterable[int] | None = None, batched: bool = True,
                    on_cell: Callable[[], None] | None = None) -> np.ndarray:
    """Activation patching per attention head, clean into corrupt.

    Runs ``clean`` once capturing every head's output (``kqv_heads``, ``[n_tokens, n_head, head_dim]``) on
    ``layers`` (default all), then for each head runs ``corrupt`` with that head's output at ``positions``
    (default every token) replaced by its clean output, and records ``metric``. Returns ``[n_layers, n_head]``
    float64, rows in the order of ``layers``.
    """
    fn = bind_metric(model, metric)
    clean_ids, corrupt_ids = _pair_ids(model, clean, corrupt)
    layers = checked_layers(model, layers)
    chosen = None if positions is None else tuple(positions_in(positions, len(clean_ids)))
    trace = model.run(clean_ids, capture=[f"kqv_heads-{il}" for il in layers], logits=None)
    variants = [[PatchHead(il, h, trace["kqv_heads", il][:, h], chosen)] for il in layers for h in range(model.n_head)]
    _, values = evaluate(model, corrupt_ids, variants, fn, batched, on_cell)
    return values.reshape(len(layers), model.n_head)
