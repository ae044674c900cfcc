"""Transcoders: sparse replacements of a model's MLPs, per layer or cross-layer, and their equations (numpy).

A transcoder of layer ``l`` reads that layer's MLP input (llama.cpp's ``ffn_norm-l``: after the pre-MLP norm,
its weight included) and predicts the MLP's output as the residual stream receives it (the architecture's FFN
term: ``ffn_out-l``, or Gemma's ``ffn_post_norm-l``; see :mod:`pyinterp.engine.arch`). Per token ``x [d_model]``::

    pre = x @ W_enc + b_enc                                                [d_tc]
    relu:     f = relu(pre)
    jumprelu: f = relu(pre) * (pre > threshold)
    topk:     f = relu(pre) on the k largest entries of pre, 0 elsewhere

A per-layer transcoder writes ``y_l = f_l @ W_dec + b_dec (+ x @ W_skip)``. A cross-layer transcoder (CLT)'s
layer-``l`` features write to every layer ``m >= l``: ``W_dec`` of layer ``l`` is ``[n_layer - l, d_tc,
d_model]`` and ``y_m = sum_{l <= m} f_l @ W_dec_l[m - l] + b_dec_m``.

Files of other tools may read or write a neighbouring tensor; a set records which (``reads``, ``writes``):

- ``reads="ffn_norm"``: the MLP input above (TransformerLens ``mlp.hook_in``, HF ``mlp`` module input);
  ``"ffn_norm_unweighted"``: the same before the norm's weight multiplies it (``x / rms(x)``: TransformerLens
  ``ln2.hook_normalized`` with ``fold_ln=False``, as circuit-tracer and SAELens load Gemma Scope's Gemma 2
  transcoders). :meth:`TranscoderSet.fold_norm` turns such a set into a ``"ffn_norm"`` one.
- ``writes="ffn_term"``: what the residual stream receives from the MLP (TransformerLens ``hook_mlp_out``);
  ``"ffn_out"``: the MLP module's output (``mlp.hook_out``, llama.cpp ``ffn_out``), the same tensor except on
  architectures with a post-FFN norm (Gemma), where it is the norm's input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from statistics import NormalDist

import numpy as np

from pyinterp.checks import is_int
from pyinterp.errors import InputError

ACTIVATIONS = ("relu", "jumprelu", "topk")
READS = ("ffn_norm", "ffn_norm_unweighted")
WRITES = ("ffn_term", "ffn_out")


@dataclass(frozen=True, eq=False)
class Transcoder:
    """The transcoder features read from layer ``layer``'s MLP input; arrays float32."""

    layer: int
    W_enc: np.ndarray                     # [d_model, d_tc]
    b_enc: np.ndarray                     # [d_tc]
    W_dec: np.ndarray                     # [d_tc, d_model]; a CLT's: [n_out, d_tc, d_model], out layers layer..
    b_dec: np.ndarray                     # [d_model] the output bias of layer `layer`'s MLP replacement
    activation: str = "relu"
    threshold: np.ndarray | None = None   # [d_tc], jumprelu only
    k: int | None = None                  # topk only
    W_skip: np.ndarray | None = None      # [d_model, d_model], skip transcoders only

    def __post_init__(self) -> None:
        what = f"transcoder of layer {self.layer}"
        if self.activation not in ACTIVATIONS:
            raise InputError(f"{what}: activation {self.activation!r} is not supported; pyinterp implements "
                             f"{', '.join(ACTIVATIONS)}")
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "W_skip"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, np.ascontiguousarray(value, dtype=np.float32))
        if self.W_enc.ndim != 2:
            raise InputError(f"{what}: W_enc must be [d_model, d_tc], got {list(self.W_enc.shape)}")
        d_model, d_tc = self.W_enc.shape
        dec = (d_tc, d_model) if self.W_dec.ndim == 2 else (self.W_dec.shape[0], d_tc, d_model)
        want = {"b_enc": (d_tc,), "W_dec": dec, "b_dec": (d_model,)}
        if self.activation == "jumprelu":
            want["threshold"] = (d_tc,)
        elif self.threshold is not None:
            raise InputError(f"{what}: a {self.activation} transcoder has no threshold (JumpReLU's)")
        if self.W_skip is not None:
            want["W_skip"] = (d_model, d_model)
        for name, shape in want.items():
            value = getattr(self, name)
            if value is None or value.shape != shape:
                raise InputError(f"{what}: {name} must be {list(shape)} (W_enc is [d_model, d_tc] = "
                                 f"{[d_model, d_tc]}), got {None if value is None else list(value.shape)}")
        for name in ("W_enc", *want):
            if not np.all(np.isfinite(getattr(self, name))):
                raise InputError(f"{what}: {name} has NaN or infinite values")
        if self.activation == "topk":
            if not is_int(self.k) or not 1 <= self.k <= d_tc:
                raise InputError(f"{what}: a topk transcoder needs k in 1..d_tc ({d_tc}), got {self.k!r}")
        elif self.k is not None:
            raise InputError(f"{what}: k is the number of features a topk transcoder keeps; this one is "
                             f"{self.activation}")

    @property
    def d_model(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_tc(self) -> int:
        return self.W_enc.shape[1]

    @property
    def n_out(self) -> int:
        """Layers its features write to: 1, or a CLT's ``n_layer - layer``."""
        return 1 if self.W_dec.ndim == 2 else self.W_dec.shape[0]

    def decoder(self, out_layer: int) -> np.ndarray:
        """``[d_tc, d_model]`` what its features write to layer ``out_layer``'s MLP output."""
        if self.W_dec.ndim == 2:
            return self.W_dec
        return self.W_dec[out_layer - self.layer]

    def pre(self, x: np.ndarray) -> np.ndarray:
        """Pre-activations ``[n_tokens, d_tc]`` of MLP inputs ``x`` ``[n_tokens, d_model]``."""
        return np.asarray(x, dtype=np.float32) @ self.W_enc + self.b_enc

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Feature activations ``[n_tokens, d_tc]`` of MLP inputs ``x`` ``[n_tokens, d_model]``."""
        pre = self.pre(x)
        f = np.maximum(pre, 0.0)
        if self.activation == "jumprelu":
            f = np.where(pre > self.threshold, f, 0.0).astype(np.float32)
        elif self.activation == "topk":
            drop = np.argsort(-pre, axis=1, kind="stable")[:, self.k:]
            np.put_along_axis(f, drop, 0.0, axis=1)
        return f


@dataclass(frozen=True, eq=False)
class TranscoderSet:
    """Transcoders for a model's MLPs, one per layer from 0 (``layers[l].layer == l``); a cross-layer transcoder
    when its features write to later layers too."""

    layers: tuple[Transcoder, ...]
    reads: str = "ffn_norm"    # see the module docstring
    writes: str = "ffn_term"

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers:
            raise InputError("a transcoder set needs at least one layer")
        if self.reads not in READS or self.writes not in WRITES:
            raise InputError(f"a transcoder set reads one of {', '.join(READS)} and writes one of "
                             f"{', '.join(WRITES)}; got reads={self.reads!r}, writes={self.writes!r}")
        n = len(self.layers)
        for i, tc in enumerate(self.layers):
            if tc.layer != i:
                raise InputError(f"transcoder {i} is of layer {tc.layer}; a set holds layers 0..{n - 1} in order")
            if tc.d_model != self.layers[0].d_model:
                raise InputError(f"transcoder of layer {i}: d_model {tc.d_model}, layer 0's is "
                                 f"{self.layers[0].d_model}")
            if tc.n_out not in (1, n - i) or (tc.W_dec.ndim == 3) != self.cross_layer:
                raise InputError(f"transcoder of layer {i}: W_dec writes to {tc.n_out} layers; a per-layer "
                                 f"transcoder writes to 1, a cross-layer one of {n} layers to {n - i}")

    @property
    def cross_layer(self) -> bool:
        return self.layers[0].W_dec.ndim == 3

    @property
    def n_layer(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return self.layers[0].d_model

    def output_tensor(self, ffn_term: str) -> str:
        """The llama.cpp tensor the set writes, given the architecture's FFN term (``Arch.ffn_term``)."""
        return ffn_term if self.writes == "ffn_term" else "ffn_out"

    def fold_norm(self, norm_weights: list[np.ndarray]) -> "TranscoderSet":
        """A ``reads="ffn_norm_unweighted"`` set as the equal ``"ffn_norm"`` one, given each layer's pre-MLP norm
        weight ``[d_model]`` as the model multiplies by it (llama.cpp's ``ffn_norm.weight``; Gemma's GGUF already
        holds HF's ``1 + weight``): ``x / rms = ffn_norm / w``, so ``W_enc`` and ``W_skip`` rows are divided by
        ``w``."""
        if self.reads == "ffn_norm":
            return self
        if len(norm_weights) != self.n_layer:
            raise InputError(f"fold_norm needs {self.n_layer} norm weights, got {len(norm_weights)}")
        layers = []
        for tc, w in zip(self.layers, norm_weights):
            w = np.asarray(w, dtype=np.float32)
            if w.shape != (self.d_model,) or not np.all(np.isfinite(w)) or np.any(w == 0):
                raise InputError(f"layer {tc.layer}'s norm weight must be {self.d_model} finite non-zero values to "
                                 f"fold into its transcoder, got shape {list(w.shape)}")
            skip = None if tc.W_skip is None else tc.W_skip / w[:, None]
            layers.append(replace(tc, W_enc=tc.W_enc / w[:, None], W_skip=skip))
        return replace(self, layers=tuple(layers), reads="ffn_norm")

    def reconstruct(self, features: list[np.ndarray], inputs: list[np.ndarray]) -> list[np.ndarray]:
        """Each layer's predicted MLP output ``[n_tokens, d_model]`` from every layer's feature activations
        ``features[l]`` ``[n_tokens, d_tc]`` and MLP inputs ``inputs[l]`` ``[n_tokens, d_model]`` (the skip path's)."""
        out = []
        for m, tc in enumerate(self.layers):
            y = np.broadcast_to(tc.b_dec, inputs[m].shape).astype(np.float32)
            for src in (self.layers[:m + 1] if self.cross_layer else (tc,)):
                y = y + features[src.layer] @ src.decoder(m)
            if tc.W_skip is not None:
                y = y + inputs[m] @ tc.W_skip
            out.append(y)
        return out


def random_transcoders(n_layer: int, d_model: int, d_tc: int, *, activation: str = "jumprelu", seed: int = 0,
                       cross_layer: bool = False, skip: bool = False, k: int = 8, density: float = 0.05,
                       input_scale: float | Sequence[float] = 1.0) -> TranscoderSet:
    """Random transcoders (for tests and examples): decoder rows of norm 1 (a CLT's split over the layers they
    write), encoder columns ``N(0, 1/d_model)`` over ``input_scale`` (one for every layer, or one per layer), and a
    bias (ReLU, TopK) or threshold (JumpReLU) at which about ``density`` of the features fire on inputs of rms
    ``input_scale``."""
    rng = np.random.default_rng(seed)
    z = NormalDist().inv_cdf(1.0 - density)  # pre-activations are about N(0, 1) on such inputs
    scales = np.broadcast_to(np.asarray(input_scale, dtype=np.float64), (n_layer,))
    layers = []
    for l in range(n_layer):
        W_enc = rng.normal(0, 1 / np.sqrt(d_model), (d_model, d_tc)) / scales[l]
        n_out = n_layer - l if cross_layer else 1
        W_dec = rng.normal(size=(n_out, d_tc, d_model))
        W_dec /= np.linalg.norm(W_dec, axis=2, keepdims=True) * np.sqrt(n_out)
        threshold = np.full(d_tc, z) if activation == "jumprelu" else None
        b_enc = np.full(d_tc, -z if activation == "relu" else 0.0)
        W_skip = rng.normal(0, 0.1 / np.sqrt(d_model), (d_model, d_model)) if skip else None
        layers.append(Transcoder(l, W_enc, b_enc, W_dec if cross_layer else W_dec[0], rng.normal(0, 0.01, d_model),
                                 activation, threshold, k if activation == "topk" else None, W_skip))
    return TranscoderSet(tuple(layers))
