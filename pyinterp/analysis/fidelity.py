"""Quantization fidelity: how far a quantized model's activations are from the same weights in fp32.

The reference is the same GGUF with every quantized tensor dequantized to F32 (:mod:`pyinterp.io.dequant`,
cached), run by pyinterp on the same graph, same settings and token ids. Both runs capture ``l_out`` and
``attn_scores`` of every layer; per layer the report gives, for the residual stream ``l_out``
(``[n_tokens, n_embd]``, q quantized, f fp32):

- **cosine**: cos(q_t, f_t) per position t, its mean and its minimum over positions;
- **relative L2 error**: ||q_t - f_t|| / ||f_t|| per position, averaged over positions (one over the whole
  layer would be the error of the few positions with huge norms, such as BOS);

for the attention weights (``[n_head, n_query, n_key]``, post-softmax), over the causal entries only
(key <= query; the others are 0 in both): the **mean |diff|** and the **max |diff|**; and for the logits
(``[n_tokens, n_vocab]``), per position: the Pearson **correlation**, **KL(fp32 || quantized)** of the
next-token distributions (nats) and whether the **top-1** tokens agree.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from pyinterp import zoo
from pyinterp.engine.trace import Trace
from pyinterp.io.dequant import F32Copy, type_counts
from pyinterp.model import Model

CAPTURE = ["l_out", "attn_scores"]


def residual_errors(quant: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, float]:
    """Cosine and relative L2 error ||q_t - f_t|| / ||f_t|| of ``quant`` against ``ref`` (both
    ``[n_tokens, n_embd]``) per position, each ``[n_tokens]``."""
    q, f = quant.astype(np.float64), ref.astype(np.float64)
    norm_f = np.linalg.norm(f, axis=1)
    cos = np.sum(q * f, axis=1) / (np.linalg.norm(q, axis=1) * norm_f)
    return cos, np.linalg.norm(q - f, axis=1) / norm_f


def attention_errors(quant: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """Mean and max |quant - ref| over the causal entries (key <= query) of ``[n_head, n, n]`` attention."""
    n = quant.shape[-1]
    diff = np.abs(quant.astype(np.float64) - ref)[:, np.tril(np.ones((n, n), dtype=bool))]
    return float(diff.mean()), float(diff.max())


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p of ``[n_tokens, n_vocab]`` logits, row by row, in float64."""
    x = logits.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def logit_errors(quant: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per position of ``[n_tokens, n_vocab]`` logits: Pearson correlation, KL(ref || quant) in nats and
    top-1 agreement (bool), each ``[n_tokens]``."""
    q, f = quant.astype(np.float64), ref.astype(np.float64)
    qc, fc = q - q.mean(axis=1, keepdims=True), f - f.mean(axis=1, keepdims=True)
    corr = np.sum(qc * fc, axis=1) / (np.linalg.norm(qc, axis=1) * np.linalg.norm(fc, axis=1))
    log_q, log_f = log_softmax(q), log_softmax(f)
    kl = np.sum(np.exp(log_f) * (log_f - log_q), axis=1)
    return corr, kl, q.argmax(axis=1) == f.argmax(axis=1)


@dataclass
class Fidelity:
    """How far a quantized model is from its weights in fp32 on one prompt (see the module doc).

    Per layer (``[n_layer]``): ``cos_mean``/``cos_min`` (``l_out`` cosine over positions), ``rel_l2`` (its
    relative L2 error, mean over positions),
    ``attn_mean``/``attn_max`` (|diff| of the attention weights). Per position (``[n_tokens]``): ``logit_corr``,
    ``kl`` (KL(fp32 || quantized), nats) and ``top1`` (the top-1 tokens agree). ``types`` counts the quantized
    file's tensors by ggml type; ``reference`` is the F32 copy that was run.
    """

    model: str
    types: dict[str, int]
    reference: str
    tokens: list[int]
    token_strs: list[str]
    cos_mean: np.ndarray
    cos_min: np.ndarray
    rel_l2: np.ndarray
    attn_mean: np.ndarray
    attn_max: np.ndarray
    logit_corr: np.ndarray
    kl: np.ndarray
    top1: np.ndarray

    @property
    def title(self) -> str:
        types = ", ".join(f"{name} x{n}" for name, n in self.types.items())
        return f"quantization fidelity of {self.model} ({types}) against its F32 copy, {len(self.tokens)} tokens"

    @property
    def logits_line(self) -> str:
        """The logit metrics in one line."""
        return (f"logits: corr {self.logit_corr.mean():.5f} (mean over positions), KL(fp32 || quant) "
                f"{self.kl.mean():.4g} mean, {self.kl[-1]:.4g} last position (nats), "
                f"top-1 agreement {int(self.top1.sum())}/{len(self.top1)}")

    def table(self) -> str:
        """The report as text: the title, one row per layer, the logit line."""
        head = (f"{'layer':>5}  {'l_out cos mean':>14}  {'cos min':>8}  {'rel L2':>7}  "
                f"{'attn mean|diff|':>15}  {'attn max|diff|':>14}")
        rows = [f"{il:>5}  {self.cos_mean[il]:>14.5f}  {self.cos_min[il]:>8.5f}  {self.rel_l2[il]:>7.4f}  "
                f"{self.attn_mean[il]:>15.5f}  {self.attn_max[il]:>14.4f}" for il in range(len(self.cos_mean))]
        return "\n".join([self.title, head, *rows, self.logits_line])

    def to_dict(self) -> dict:
        per_layer = [{"layer": il, "l_out_cos_mean": float(self.cos_mean[il]), "l_out_cos_min": float(self.cos_min[il]),
                      "l_out_rel_l2": float(self.rel_l2[il]), "attn_mean_abs_diff": float(self.attn_mean[il]),
                      "attn_max_abs_diff": float(self.attn_max[il])} for il in range(len(self.cos_mean))]
        return {
            "model": self.model, "types": self.types, "reference": self.reference,
            "tokens": self.tokens, "token_strs": self.token_strs, "layers": per_layer,
            "logits": {"corr_mean": float(self.logit_corr.mean()), "kl_mean": float(self.kl.mean()),
                       "kl_last": float(self.kl[-1]), "top1_agreement": float(self.top1.mean()),
                       "corr": self.logit_corr.tolist(), "kl": self.kl.tolist(), "top1": self.top1.tolist()},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    def to_png(self, path: str | os.PathLike) -> Path:
        """Write per-layer curves: 1 - cosine of ``l_out`` (mean and worst position), its relative L2 error,
        and the attention's mean and max |diff|; the logit metrics are in the title."""
        from pyinterp.viz.charts import line_charts
        from pyinterp.viz.plot import save_png

        panels = [
            ("l_out: 1 - cosine", {"mean over positions": 1 - self.cos_mean, "worst position": 1 - self.cos_min}),
            ("l_out: relative L2 error", {"mean over positions": self.rel_l2}),
            ("attention: mean |diff|", {"mean": self.attn_mean}),
            ("attention: max |diff|", {"max": self.attn_max}),
        ]
        image = line_charts(panels, [str(il) for il in range(len(self.cos_mean))],
                            title=f"{self.title}\n{self.logits_line}")
        return save_png(image, path)


def compare(quant: Trace, ref: Trace, model: str, types: dict[str, int], reference: str) -> Fidelity:
    """The report from a quantized and an fp32 run of the same tokens, each holding ``l_out`` and
    ``attn_scores`` of every layer; ``model``, ``types`` and ``reference`` label it."""
    n_layer = len(quant.stack("l_out"))
    residual = [residual_errors(quant.act("l_out", il), ref.act("l_out", il)) for il in range(n_layer)]
    attention = np.array([attention_errors(quant.attention(il), ref.attention(il)) for il in range(n_layer)])
    corr, kl, top1 = logit_errors(quant.logits, ref.logits)
    return Fidelity(
        model=model, types=types, reference=reference, tokens=quant.tokens, token_strs=quant.token_strs,
        cos_mean=np.array([cos.mean() for cos, _ in residual]), cos_min=np.array([cos.min() for cos, _ in residual]),
        rel_l2=np.array([rel.mean() for _, rel in residual]), attn_mean=attention[:, 0], attn_max=attention[:, 1],
        logit_corr=corr, kl=kl, top1=top1,
    )


def fidelity(model_or_path: Model | str | os.PathLike | None, prompt: str | Sequence[int], *, n_ctx: int | None = None,
             n_threads: int | None = None, on_write: Callable[[int, int], None] | None = None,
             verbose: bool = False, **settings: Any) -> Fidelity:
    """Compare a quantized GGUF with the same weights dequantized to F32 on ``prompt`` (text or token ids).

    ``model_or_path``: a GGUF path or known name (None: the default model), or a :class:`Model`, which gives
    its path and ``n_ctx``; both sides are loaded fresh with the same settings (``n_ctx`` default 2048, the
    others :class:`Model`'s), so they run the same graph and no intervention of the Model applies. The F32 copy is written on first
    use (see :mod:`pyinterp.io.dequant`); ``on_write(n, total)`` is called after each tensor with the bytes
    just written and the total (progress). Raises :class:`InputError` for a model with nothing to compare
    (every weight already F32) and for a prompt the context cannot hold, before writing anything.
    ``verbose`` shows llama.cpp's log. ``settings``: more :class:`Model` keyword arguments (``n_gpu_layers``,
    ``flash_attn``, ``type_k``, ``type_v``, ``rpc``), the same for both sides.
    """
    if isinstance(model_or_path, Model):
        path, n_ctx = model_or_path.path, model_or_path.n_ctx if n_ctx is None else n_ctx
    else:
        path = zoo.resolve(model_or_path)
    n_ctx = 2048 if n_ctx is None else n_ctx
    copy = F32Copy(path)
    with Model(path, n_ctx=n_ctx, n_threads=n_threads, verbose=verbose, **settings) as model:
        ids = model.prompt_ids(prompt)
        quant = model.run(ids, capture=CAPTURE)
    total = copy.nbytes
    reference = copy.write(None if on_write is None else lambda n: on_write(n, total))
    with Model(reference, n_ctx=n_ctx, n_threads=n_threads, verbose=verbose, **settings) as model:
        ref = model.run(ids, capture=CAPTURE)
    return compare(quant, ref, path.name, type_counts(copy.tensors), str(reference))
