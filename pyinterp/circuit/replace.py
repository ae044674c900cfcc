"""Transcoders in the graph: each layer's MLP input encoded inside the ggml graph, and the MLP outputs replaced
by the transcoders' (the replacement model), with feature edits that act on the real computation.

A :class:`~pyinterp.circuit.transcoder.TranscoderSet` of the model's every layer reads ``ffn_norm-l`` and writes
the architecture's FFN term ``out_l`` (``ffn_out-l``; Gemma's ``ffn_post_norm-l``), or ``ffn_out-l`` for a set
that writes the MLP module's output (``writes="ffn_out"``). Per token, with ``f_l`` the
features of the MLP input ``x_l`` and ``y_l = sum_{k <= l} f_k W_dec_k[l] + b_dec_l (+ x_l W_skip_l)`` the
transcoders' output (a per-layer transcoder: its own features only), a replaced layer's output becomes::

    keep_error=True  (default): out_l + sum_k (f'_k - f_k) W_dec_k[l]   (no edits: out_l, bit for bit)
    keep_error=False:           y_l + sum_k (f'_k - f_k) W_dec_k[l]     (= f' W_dec + b_dec (+ x W_skip))

``f'`` being the features after the edits (feature j of layer l set to a value, or scaled, at every token). The
features and the statistics ``|out_l - y_l|^2``, ``|out_l|^2`` and the active count are those of the run itself:
after an earlier layer's replacement, of the replaced model. Only each token's top-k features and three numbers
per token and layer leave the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from pyinterp.checks import is_int
from pyinterp.circuit.gguf_weights import vectors
from pyinterp.circuit.transcoder import TranscoderSet
from pyinterp.engine.arch import arch_of
from pyinterp.engine.readouts import TranscoderReadout, upload_transcoder
from pyinterp.errors import InputError

if TYPE_CHECKING:
    from pyinterp.engine.core import ModelLike

# every layer m of a cross-layer set adds a product per earlier layer to the graph, whose size llama.cpp fixes from
# the model's tensors: beyond this many layers it overflows (ggml aborts), so such sets are refused
CLT_MAX_LAYERS = 8
MLP_INPUT = "ffn_norm"  # llama.cpp's MLP input (after the pre-MLP norm, its weight included), every architecture


@dataclass
class TranscoderRun:
    """One pass with the transcoders in the graph. ``ids`` and ``values`` ``[n_layer, n_tokens, top_k]``: each
    token's most active features, largest first (id -1, value 0 where fewer are active); ``err`` ``|out - y|^2``,
    ``norm`` ``|out|^2`` and ``l0`` (active features) ``[n_layer, n_tokens]``; ``logits`` ``[n_tokens, n_vocab]``;
    ``captured``: ``(name, layer) ->`` tensor of the captures asked for (they see a tensor before the transcoders
    replace it: ``ffn_out-l`` is the real MLP's output, ``l_out-l`` the residual with the replaced one)."""

    tokens: list[int]
    logits: np.ndarray
    ids: np.ndarray
    values: np.ndarray
    err: np.ndarray
    norm: np.ndarray
    l0: np.ndarray
    captured: dict[tuple[str, int], np.ndarray]

    @property
    def rel_error(self) -> np.ndarray:
        """``[n_layer, n_tokens]`` ``|out - y| / |out|`` (NaN where the output is zero)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.norm > 0, np.sqrt(np.maximum(self.err, 0) / self.norm), np.nan)


def check_transcoders(model: ModelLike, transcoders: object) -> TranscoderSet:
    """``transcoders`` as a set of the model's every layer and width reading ``ffn_norm`` (a set reading it before
    the norm's weight gets the model's weights folded in, once per set and model); a one-line error otherwise."""
    if not isinstance(transcoders, TranscoderSet):
        raise InputError(f"transcoders must be a TranscoderSet, got {type(transcoders).__name__}")
    if transcoders.n_layer != model.n_layer:
        raise InputError(f"the transcoder set has {transcoders.n_layer} layers, the model {model.n_layer}: a set "
                         f"replaces every MLP of the model")
    if transcoders.d_model != model.n_embd:
        raise InputError(f"the transcoders read {transcoders.d_model} values per token, the model's MLP input has "
                         f"{model.n_embd}; are they this model's?")
    if transcoders.cross_layer and transcoders.n_layer > CLT_MAX_LAYERS:
        raise InputError(f"cross-layer transcoders of more than {CLT_MAX_LAYERS} layers do not fit llama.cpp's graph "
                         f"in pyinterp yet (this set has {transcoders.n_layer}); per-layer transcoders do")
    return reading_mlp_input(model, transcoders)


def reading_mlp_input(model: ModelLike, transcoders: TranscoderSet) -> TranscoderSet:
    """``transcoders`` reading the MLP input with its norm's weight: a set that reads it before the weight gets the
    model's ``ffn_norm`` weights folded in (:meth:`TranscoderSet.fold_norm`), once per set and model."""
    if transcoders.reads == MLP_INPUT:
        return transcoders
    names = [f"blk.{il}.{MLP_INPUT}.weight" for il in range(model.n_layer)]
    _, folded = model.engine.upload(("transcoders folded", id(transcoders)),
                                    lambda _: (transcoders, transcoders.fold_norm(vectors(model.path, names))))
    return folded


def _check_layers(layers: object, n_layer: int) -> list[int]:
    if layers is None:
        return list(range(n_layer))
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not all(is_int(l) for l in layers):
        raise InputError(f"layers must be a list of layer numbers, got {layers!r}")
    bad = [l for l in layers if not 0 <= l < n_layer]
    if bad:
        raise InputError(f"layer {bad[0]} out of range (the model has {n_layer} layers: 0..{n_layer - 1})")
    return sorted({int(l) for l in layers})


def _check_edits(edits: object, transcoders: TranscoderSet, layers: list[int]) -> list[dict[int, float]]:
    """``{(layer, feature): value}`` as one ``{feature: value}`` per layer."""
    if edits is None:
        edits = {}
    if not isinstance(edits, dict):
        raise InputError(f"edits must be a {{(layer, feature): value}} dict, got {type(edits).__name__}")
    out: list[dict[int, float]] = [{} for _ in range(transcoders.n_layer)]
    for key, value in edits.items():
        if not (isinstance(key, tuple) and len(key) == 2 and all(is_int(x) for x in key)):
            raise InputError(f"an edit's key must be (layer, feature), got {key!r}")
        layer, feature = (int(x) for x in key)
        if not 0 <= layer < transcoders.n_layer:
            raise InputError(f"edit {key}: layer {layer} out of range (0..{transcoders.n_layer - 1})")
        d_tc = transcoders.layers[layer].d_tc
        if not 0 <= feature < d_tc:
            raise InputError(f"edit {key}: feature {feature} out of range (layer {layer} has {d_tc} features)")
        if layer not in layers:
            raise InputError(f"edit {key}: layer {layer} is not replaced (edits act on the replaced layers {layers})")
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                or not np.isfinite(value):
            raise InputError(f"edit {key}: the value must be a finite number, got {value!r}")
        out[layer][feature] = float(value)
    return out


def _check_top_k(top_k: object, transcoders: TranscoderSet) -> int:
    d_tc = min(tc.d_tc for tc in transcoders.layers)
    if not is_int(top_k) or not 1 <= top_k <= d_tc:
        raise InputError(f"top_k must be an integer in 1..{d_tc} (the transcoders' features), got {top_k!r}")
    return int(top_k)


def _run(model: ModelLike, prompt: str | Sequence[int], transcoders: TranscoderSet, top_k: int, modes: list[str],
         edits: list[dict[int, float]], scale: bool, capture: Sequence[str] = ()) -> TranscoderRun:
    out_name = transcoders.output_tensor(arch_of(model.arch).ffn_term)
    natives = [upload_transcoder(model.engine, tc) for tc in transcoders.layers]
    readout = TranscoderReadout(natives, MLP_INPUT, out_name, top_k, modes, edits, scale)
    ids = model.prompt_ids(prompt)
    result = model.engine.run(ids, capture=capture, readout=readout, logits="all")
    tops, values, stats = (np.stack(a) for a in zip(*result.readout))
    order = np.argsort(-values, axis=2, kind="stable")
    tops, values = np.take_along_axis(tops, order, 2), np.take_along_axis(values, order, 2)
    return TranscoderRun(ids, result.logits, np.where(values > 0, tops, -1).astype(np.int64),
                         np.maximum(values, 0).astype(np.float32), stats[..., 0], stats[..., 1],
                         stats[..., 2].astype(np.int64), result.captured)


def transcoder_features(model: ModelLike, prompt: str | Sequence[int], transcoders: TranscoderSet,
                        top_k: int = 10) -> TranscoderRun:
    """Every layer's transcoder features of a prompt, encoded in the graph of a plain run (logits unchanged),
    with the reconstruction statistics of every layer."""
    transcoders = check_transcoders(model, transcoders)
    n = transcoders.n_layer
    return _run(model, prompt, transcoders, _check_top_k(top_k, transcoders), ["encode"] * n, [{}] * n, False)


def run_replaced(model: ModelLike, prompt: str | Sequence[int], transcoders: TranscoderSet,
                 layers: Sequence[int] | None = None, keep_error: bool = True,
                 edits: dict[tuple[int, int], float] | None = None, scale: bool = False,
                 top_k: int = 10, capture: Sequence[str] = ()) -> TranscoderRun:
    """A pass with the MLPs of ``layers`` (None: all) replaced by the transcoders: the error term kept (then only
    the edits change anything) or dropped. ``edits``: ``{(layer, feature): value}``, feature set to value (or
    multiplied by it, ``scale``) at every token; an edited layer must be replaced (a cross-layer transcoder's
    edit writes to every later replaced layer). ``capture``: tensor names, as :meth:`pyinterp.Model.run` takes."""
    transcoders = check_transcoders(model, transcoders)
    if not isinstance(keep_error, bool) or not isinstance(scale, bool):
        raise InputError("keep_error and scale must be True or False")
    layers = _check_layers(layers, transcoders.n_layer)
    per_layer = _check_edits(edits, transcoders, layers)
    mode = "keep_error" if keep_error else "drop_error"
    modes = [mode if l in layers else "encode" for l in range(transcoders.n_layer)]
    return _run(model, prompt, transcoders, _check_top_k(top_k, transcoders), modes, per_layer, scale, capture)


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """``KL(p || q)`` per row of two ``[n, n_vocab]`` logit arrays, in nats (float64)."""
    lp = _log_softmax(np.asarray(p_logits, np.float64))
    lq = _log_softmax(np.asarray(q_logits, np.float64))
    return np.sum(np.exp(lp) * (lp - lq), axis=-1)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@dataclass
class ReconstructionReport:
    """How well the transcoders replace the MLPs over prompts, per layer ``[n_layer]``: ``rel_error``
    ``sqrt(sum |out - y|^2 / sum |out|^2)`` over every token (plain run), ``l0`` the mean active features,
    ``kl`` the mean over every token of the next-token ``KL(real || that layer's MLP replaced, error dropped)``;
    ``kl_all``: the same with every MLP replaced. ``n_tokens``: tokens over all prompts."""

    n_tokens: int
    rel_error: np.ndarray
    l0: np.ndarray
    kl: np.ndarray
    kl_all: float

    def to_dict(self) -> dict:
        return {"n_tokens": self.n_tokens, "kl_all": float(self.kl_all),
                "layers": [{"layer": l, "rel_error": float(self.rel_error[l]), "l0": float(self.l0[l]),
                            "kl": float(self.kl[l])} for l in range(len(self.kl))]}


def reconstruction_report(model: ModelLike, prompts: str | Sequence[str | Sequence[int]],
                          transcoders: TranscoderSet) -> ReconstructionReport:
    """Per-layer reconstruction error and KL of replacing each MLP (and all) by its transcoder, error dropped,
    over ``prompts`` (one prompt or a list): ``n_layer + 2`` passes per prompt."""
    transcoders = check_transcoders(model, transcoders)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise InputError("reconstruction_report needs at least one prompt")
    n = transcoders.n_layer
    err, norm, l0, kl, kl_all, n_tokens = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n), 0.0, 0
    for prompt in prompts:
        plain = transcoder_features(model, prompt, transcoders, top_k=1)
        err += plain.err.sum(axis=1)
        norm += plain.norm.sum(axis=1)
        l0 += plain.l0.sum(axis=1)
        for layer in range(n):
            replaced = run_replaced(model, plain.tokens, transcoders, layers=[layer], keep_error=False, top_k=1)
            kl[layer] += kl_divergence(plain.logits, replaced.logits).sum()
        replaced = run_replaced(model, plain.tokens, transcoders, keep_error=False, top_k=1)
        kl_all += float(kl_divergence(plain.logits, replaced.logits).sum())
        n_tokens += len(plain.tokens)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel_error = np.where(norm > 0, np.sqrt(err / norm), np.nan)
    return ReconstructionReport(n_tokens, rel_error, l0 / n_tokens, kl / n_tokens, kl_all / n_tokens)
