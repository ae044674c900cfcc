"""Independent HuggingFace-transformers reference for faithfulness tests.

Loads a GGUF file through ``transformers`` (dequantised to float32, eager
attention) and runs the same interventions pyinterp offers, so llama.cpp
results can be compared against a second implementation.  Token ids are
always supplied by the caller; nothing here tokenises.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from transformers import AutoModelForCausalLM


@dataclass
class RefResult:
    """Outputs of one reference forward pass (float32 numpy arrays)."""

    logits: np.ndarray  # [n_tokens, n_vocab]
    attentions: list[np.ndarray]  # per layer: [n_head, n_tokens, n_tokens], post-softmax
    l_out: list[np.ndarray]  # per layer: [n_tokens, n_embd], residual stream after the layer
    attn_out: list[np.ndarray]  # per layer: [n_tokens, n_embd], what attention adds to the residual stream
    ffn_out: list[np.ndarray]  # per layer: [n_tokens, n_embd], what the FFN adds


def _hidden(output):
    """The hidden-state tensor of a decoder layer output (tensor or tuple)."""
    return output[0] if isinstance(output, tuple) else output


def residual_modules(block) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The modules whose outputs a decoder block adds to the residual stream: (attention, FFN).
    Gemma normalises both before adding them (its post norms)."""
    if hasattr(block, "post_feedforward_layernorm"):
        return block.post_attention_layernorm, block.post_feedforward_layernorm
    return block.self_attn, block.mlp


class Reference:
    """A GGUF model loaded with transformers, with head ablation and residual patching."""

    def __init__(self, gguf_path: str | os.PathLike) -> None:
        """Load (and dequantise) the GGUF model once."""
        path = os.fspath(gguf_path)
        self.model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(os.path.abspath(path)),
            gguf_file=os.path.basename(path),
            dtype=torch.float32,
            attn_implementation="eager",
        )
        self.model.eval()
        cfg = self.model.config
        self.layers = self.model.model.layers
        self.n_layer: int = cfg.num_hidden_layers
        self.n_head: int = cfg.num_attention_heads
        self.n_embd: int = cfg.hidden_size
        self.head_dim: int = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.n_vocab: int = self.model.lm_head.out_features

    def _zero_heads_hook(self, heads: list[int]):
        """Forward pre-hook for ``o_proj`` that zeroes the given heads' input slices."""
        d = self.head_dim

        def hook(module, args):
            x = args[0].clone()
            for h in heads:
                x[..., h * d : (h + 1) * d] = 0
            return (x, *args[1:])

        return hook

    def run(
        self,
        ids: list[int],
        *,
        ablate: Iterable[tuple[int, int]] = (),
        isolate: tuple[int, int] | None = None,
        patch: Iterable[tuple[int, int, np.ndarray]] = (),
        steer: dict[int, np.ndarray] | None = None,
        add: Iterable[tuple[int, Iterable[int], np.ndarray]] = (),
        patch_heads: Iterable[tuple[int, int, Iterable[int], np.ndarray]] = (),
    ) -> RefResult:
        """Run ``ids`` (BOS already included) through the model with optional interventions.

        ablate:  (layer, head) pairs whose attention output is zeroed before ``o_proj``.
        isolate: (layer, head) keeps only that head of the layer (all others zeroed).
        patch:   (layer, position, vector[n_embd]) replaces that row of the layer's output.
        steer:   {layer: vector[n_embd]} added to every row of the layer's output (a control vector),
                 before the patches, as llama.cpp adds it before naming the output l_out.
        add:     (layer, positions, vector[n_embd]) added to those rows of the layer's output.
        patch_heads: (layer, head, positions, values[n_tokens, head_dim]) replace that head's slice of the
                 ``o_proj`` input at those positions (row p of values at position p).
        """
        zeroed: dict[int, list[int]] = {}
        for layer, head in ablate:
            zeroed.setdefault(layer, []).append(head)
        if isolate is not None:
            layer, head = isolate
            zeroed.setdefault(layer, []).extend(h for h in range(self.n_head) if h != head)

        patches: dict[int, list[tuple[int, torch.Tensor]]] = {}
        for layer, pos, vec in patch:
            v = torch.as_tensor(np.asarray(vec, dtype=np.float32).reshape(self.n_embd))
            patches.setdefault(layer, []).append((pos, v))

        l_out: list[torch.Tensor | None] = [None] * self.n_layer
        terms: dict[tuple[str, int], torch.Tensor] = {}

        def patch_hook(rows):
            def hook(module, args, output):
                h = _hidden(output).clone()
                for pos, v in rows:
                    h[0, pos] = v
                return (h, *output[1:]) if isinstance(output, tuple) else h

            return hook

        def steer_hook(vec):
            v = torch.as_tensor(np.asarray(vec, dtype=np.float32).reshape(self.n_embd))

            def hook(module, args, output):
                h = _hidden(output) + v
                return (h, *output[1:]) if isinstance(output, tuple) else h

            return hook

        def capture_hook(i):
            def hook(module, args, output):
                l_out[i] = _hidden(output)[0].detach().clone()

            return hook

        def term_hook(key):
            def hook(module, args, output):
                terms[key] = _hidden(output)[0].detach().clone()

            return hook

        def add_hook(positions, vec):
            v = torch.as_tensor(np.asarray(vec, dtype=np.float32).reshape(self.n_embd))

            def hook(module, args, output):
                h = _hidden(output).clone()
                h[0, list(positions)] += v
                return (h, *output[1:]) if isinstance(output, tuple) else h

            return hook

        def head_hook(head, positions, values):
            d, rows = self.head_dim, torch.as_tensor(np.asarray(values, dtype=np.float32))

            def hook(module, args):
                x = args[0].clone()
                for pos in positions:
                    x[0, pos, head * d:(head + 1) * d] = rows[pos]
                return (x, *args[1:])

            return hook

        handles = []
        try:
            for layer, head, positions, values in patch_heads:
                o_proj = self.layers[layer].self_attn.o_proj
                handles.append(o_proj.register_forward_pre_hook(head_hook(head, list(positions), values)))
            for layer, positions, vec in add:
                handles.append(self.layers[layer].register_forward_hook(add_hook(list(positions), vec)))
            for layer, heads in zeroed.items():
                o_proj = self.layers[layer].self_attn.o_proj
                handles.append(o_proj.register_forward_pre_hook(self._zero_heads_hook(heads)))
            for layer, vec in (steer or {}).items():
                handles.append(self.layers[layer].register_forward_hook(steer_hook(vec)))
            # Patch hooks are registered first so the captured l_out shows the patched rows.
            for layer, rows in patches.items():
                handles.append(self.layers[layer].register_forward_hook(patch_hook(rows)))
            for i, block in enumerate(self.layers):
                handles.append(block.register_forward_hook(capture_hook(i)))
                attn, ffn = residual_modules(block)
                handles.append(attn.register_forward_hook(term_hook(("attn", i))))
                handles.append(ffn.register_forward_hook(term_hook(("ffn", i))))
            with torch.no_grad():
                out = self.model(
                    input_ids=torch.tensor([list(ids)], dtype=torch.long),
                    output_attentions=True,
                    use_cache=False,
                )
        finally:
            for h in handles:
                h.remove()

        return RefResult(
            logits=out.logits[0].float().numpy(),
            attentions=[a[0].float().numpy() for a in out.attentions],
            l_out=[t.float().numpy() for t in l_out],
            attn_out=[terms["attn", i].float().numpy() for i in range(self.n_layer)],
            ffn_out=[terms["ffn", i].float().numpy() for i in range(self.n_layer)],
        )

    def head_outputs(self, ids: list[int]) -> list[np.ndarray]:
        """Each layer's attention heads' outputs (the ``o_proj`` input), ``[n_tokens, n_head, head_dim]`` per layer."""
        out: list[np.ndarray] = []

        def keep(module, args):
            out.append(args[0][0].detach().float().numpy().reshape(len(ids), self.n_head, self.head_dim))

        handles = [layer.self_attn.o_proj.register_forward_pre_hook(keep) for layer in self.layers]
        try:
            with torch.no_grad():
                self.model(input_ids=torch.tensor([list(ids)], dtype=torch.long), use_cache=False)
        finally:
            for h in handles:
                h.remove()
        return out

    def embedding(self, ids: list[int]) -> np.ndarray:
        """The first term of the residual stream, [n_tokens, n_embd]: the token embeddings as the model
        adds them (Gemma's embedding module scales them by sqrt(n_embd))."""
        with torch.no_grad():
            return self.model.model.embed_tokens(torch.tensor([ids]))[0].float().numpy()

    def unembed(self, resid: np.ndarray, norm: bool = True) -> np.ndarray:
        """Map residual rows [n, n_embd] to logits [n, n_vocab] (logit lens).

        Applies the final norm (if ``norm``), the (possibly tied) lm_head, and
        final logit soft-capping when the config defines it.
        """
        x = torch.as_tensor(np.asarray(resid, dtype=np.float32)).reshape(-1, self.n_embd)
        with torch.no_grad():
            if norm:
                x = self.model.model.norm(x)
            logits = self.model.lm_head(x)
            cap = getattr(self.model.config, "final_logit_softcapping", None)
            if cap is not None:
                logits = torch.tanh(logits / cap) * cap
        return logits.numpy()

    def attribution(self, ids: list[int], target: int, position: int) -> np.ndarray:
        """Direct logit attribution of ``target`` at ``position``: the embedding's, then each layer's
        attention and FFN contributions, through the final RMS norm frozen at the final residual's scale
        and the target's ``lm_head`` row (Gemma: the post-norm outputs are the residual terms)."""
        embedding: list[torch.Tensor] = []

        def keep(module, args, output):
            embedding.append(_hidden(output)[0, position].detach().clone())

        handle = self.model.model.embed_tokens.register_forward_hook(keep)
        try:
            result = self.run(ids)
        finally:
            handle.remove()
        terms = [embedding[0]]
        for i in range(self.n_layer):
            terms += [torch.as_tensor(result.attn_out[i][position]), torch.as_tensor(result.ffn_out[i][position])]
        norm = self.model.model.norm
        weight = norm.weight.detach().float()
        if "Gemma" in type(norm).__name__:
            weight = 1.0 + weight  # Gemma's RMS norm scales by (1 + w)
        eps = getattr(norm, "variance_epsilon", None) or norm.eps
        final = torch.as_tensor(result.l_out[-1][position])
        scale = torch.rsqrt(final.pow(2).mean() + eps)
        row = self.model.lm_head.weight[target].detach().float()
        return np.array([float((term * scale * weight) @ row) for term in terms], dtype=np.float32)

    @staticmethod
    def _norm_weight_eps(norm: torch.nn.Module) -> tuple[torch.Tensor, float]:
        """An RMS norm module's effective weight (Gemma's scales by 1 + w) and epsilon."""
        weight = norm.weight.detach().float()
        if "Gemma" in type(norm).__name__:
            weight = 1.0 + weight
        return weight, getattr(norm, "variance_epsilon", None) or norm.eps

    def head_attribution(self, ids: list[int], target: int, position: int) -> np.ndarray:
        """Each head's direct logit attribution of ``target`` at ``position``, ``[n_layer, n_head]``: the head's
        slice of ``o_proj``'s input times its columns of ``o_proj``'s weight (Gemma: through the attention
        post-norm, its scale frozen at the whole ``o_proj`` output's), then the final norm frozen at the final
        residual's scale and the target's ``lm_head`` row."""
        inputs: dict[int, torch.Tensor] = {}
        outputs: dict[int, torch.Tensor] = {}

        def keep(i):
            def pre(module, args):
                inputs[i] = args[0][0, position].detach().clone()

            def post(module, args, output):
                outputs[i] = output[0, position].detach().clone()

            return pre, post

        handles = []
        try:
            for i, block in enumerate(self.layers):
                pre, post = keep(i)
                handles.append(block.self_attn.o_proj.register_forward_pre_hook(pre))
                handles.append(block.self_attn.o_proj.register_forward_hook(post))
            result = self.run(ids)
        finally:
            for h in handles:
                h.remove()
        weight, eps = self._norm_weight_eps(self.model.model.norm)
        final = torch.as_tensor(result.l_out[-1][position])
        readout = torch.rsqrt(final.pow(2).mean() + eps) * weight * self.model.lm_head.weight[target].detach().float()
        d = self.head_dim
        out = np.zeros((self.n_layer, self.n_head), dtype=np.float32)
        for i, block in enumerate(self.layers):
            w_o = block.self_attn.o_proj.weight.detach().float()  # [n_embd, n_head * d]
            post = torch.ones(self.n_embd)
            if hasattr(block, "post_feedforward_layernorm"):  # Gemma: the post-norm, frozen
                w, e = self._norm_weight_eps(block.post_attention_layernorm)
                post = torch.rsqrt(outputs[i].pow(2).mean() + e) * w
            for h in range(self.n_head):
                y = w_o[:, h * d:(h + 1) * d] @ inputs[i][h * d:(h + 1) * d]
                out[i, h] = float((y * post) @ readout)
        return out
