"""Independent PyTorch reference for attribution graphs (test helper; see pyinterp/circuit/graph.py).

It builds a prompt's local replacement model from the transformers model of :mod:`reference` and takes its edges
with autograd, without pyinterp's engine or transcoder code (only the :class:`TranscoderSet`'s arrays are read):

* attention: a registered attention function computes eager attention with its post-softmax weights detached;
* every RMSNorm (final norm and Gemma's QK norms included) is recomputed by a forward hook as
  ``x * detach(1 / rms(x)) * w`` (Gemma: ``1 + w``), and checked against the module's own output;
* each layer's MLP output, as the residual stream receives it (llama: ``mlp``'s output, Gemma: the
  ``post_feedforward_layernorm``'s), and the token embeddings are replaced by leaf tensors holding their values.

The frozen model is then linear and homogeneous in those leaves, so a target's gradient with respect to the leaves,
dotted with what a source writes into them, is the edge; the edges into a node add up to its input. A recorded run's
patterns and scales can be replayed with other leaf values (:func:`replay_targets`): the frozen model run forward,
for finite-difference checks of the edges.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from pyinterp.circuit.transcoder import TranscoderSet
from reference import Reference, residual_modules

ATTENTION = "pyinterp_frozen_eager"


@dataclass
class Frozen:
    """The attention patterns and norm scales of one recorded run, replayed when ``replay`` is set."""

    patterns: dict[int, torch.Tensor] = field(default_factory=dict)   # layer -> [1, n_head, n_pos, n_pos]
    scales: dict[str, torch.Tensor] = field(default_factory=dict)     # norm module name -> 1 / rms, [..., 1]
    replay: bool = False
    freeze_norms: bool = True  # False only to show that the checks catch an unfrozen norm


_active: list[Frozen] = []  # the Frozen of the run in progress (the attention function is global)


def _frozen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
    """Eager attention (GQA, optional logit soft-capping, additive mask) with the post-softmax weights detached, or
    the recorded weights when replaying. Shapes: query [1, n_head, n_pos, d], key and value [1, n_kv, n_pos, d]."""
    frozen = _active[-1]
    groups = query.shape[1] // key.shape[1]
    value = value.repeat_interleave(groups, dim=1)
    if frozen.replay:
        weights = frozen.patterns[module.layer_idx]
    else:
        key = key.repeat_interleave(groups, dim=1)
        scores = query @ key.transpose(2, 3) * (module.head_dim ** -0.5 if scaling is None else scaling)
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if attention_mask is not None:
            scores = scores + attention_mask
        weights = torch.softmax(scores.float(), dim=-1).detach()
        frozen.patterns[module.layer_idx] = weights
    return (weights @ value).transpose(1, 2).contiguous(), weights


ALL_ATTENTION_FUNCTIONS.register(ATTENTION, _frozen_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, eager_mask)


def _norm_hook(name: str, module: torch.nn.Module, frozen: Frozen):
    """A forward hook recomputing an RMSNorm with 1/rms detached (or replayed): ``x * s * w``."""
    weight, eps = Reference._norm_weight_eps(module)

    def hook(mod, args, output):
        x = args[0].float()
        if frozen.replay:
            scale = frozen.scales[name]
        else:
            scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
            if frozen.freeze_norms:
                scale = scale.detach()
            frozen.scales[name] = scale.detach()
            y = x * scale * weight
            assert torch.allclose(y, output, rtol=1e-5, atol=1e-5 * float(output.detach().abs().max())), name
        return x * scale * weight

    return hook


@dataclass
class _Run:
    """One frozen forward: its leaves and what the targets read."""

    embedding: torch.Tensor          # [n_pos, d] leaf: the residual stream's first term
    mlp_out: list[torch.Tensor]      # per layer [n_pos, d] leaf: the MLP output as the residual receives it
    mlp_in: list[torch.Tensor]       # per layer [n_pos, d]: the MLP input (transcoder input)
    final: torch.Tensor              # [n_pos, d] the final norm's output


def _run_frozen(ref: Reference, ids: list[int], frozen: Frozen, embedding: torch.Tensor | None = None,
                mlp_out: torch.Tensor | None = None) -> _Run:
    """Run ``ids`` through the frozen model. Recording (``embedding``/``mlp_out`` None): leaves hold the model's
    own values and ``frozen`` records patterns and scales. Replaying: the given leaf values ``[n_pos, d]`` and
    ``[n_layer, n_pos, d]`` are used, with ``frozen``'s patterns and scales."""
    model = ref.model
    emb_leaf: list[torch.Tensor] = []
    leaves: list[torch.Tensor | None] = [None] * ref.n_layer
    inputs: list[torch.Tensor | None] = [None] * ref.n_layer

    def leaf(value):
        return value.detach().clone().requires_grad_(not frozen.replay)

    def embed_hook(module, args, output):
        emb_leaf.append(leaf(output[0] if embedding is None else embedding))
        return emb_leaf[0][None]

    def mlp_in_hook(i):
        def hook(module, args):
            inputs[i] = args[0][0]
        return hook

    def mlp_out_hook(i):
        def hook(module, args, output):
            leaves[i] = leaf(output[0] if mlp_out is None else mlp_out[i])
            return leaves[i][None]
        return hook

    handles = [model.model.embed_tokens.register_forward_hook(embed_hook)]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    previous = model.config._attn_implementation
    try:
        for name, module in model.named_modules():
            if type(module).__name__.endswith("RMSNorm"):
                handles.append(module.register_forward_hook(_norm_hook(name, module, frozen)))
        for i, block in enumerate(ref.layers):  # after the norm hooks: Gemma's post-FFN norm output is replaced
            handles.append(block.mlp.register_forward_pre_hook(mlp_in_hook(i)))
            handles.append(residual_modules(block)[1].register_forward_hook(mlp_out_hook(i)))
        for p, _ in grads:
            p.requires_grad_(False)
        model.set_attn_implementation(ATTENTION)
        _active.append(frozen)
        final = model.model(input_ids=torch.tensor([list(ids)]), use_cache=False).last_hidden_state[0]
    finally:
        if _active and _active[-1] is frozen:
            _active.pop()
        model.set_attn_implementation(previous)
        for p, g in grads:
            p.requires_grad_(g)
        for h in handles:
            h.remove()
    return _Run(emb_leaf[0], leaves, inputs, final)


def _encode(tc, x: torch.Tensor) -> torch.Tensor:
    """Feature activations ``[n_pos, d_tc]`` of MLP inputs ``x`` ``[n_pos, d]`` (relu, jumprelu, topk)."""
    pre = x @ torch.as_tensor(tc.W_enc) + torch.as_tensor(tc.b_enc)
    act = torch.relu(pre)
    if tc.activation == "jumprelu":
        act = act * (pre > torch.as_tensor(tc.threshold))
    elif tc.activation == "topk":
        keep = torch.zeros_like(act).scatter_(1, pre.topk(tc.k, dim=1).indices, 1.0)
        act = act * keep
    return act


def _written(transcoders: TranscoderSet, features: np.ndarray, activations: np.ndarray, n_layer: int):
    """What each feature writes into each MLP output: per out layer m, (feature indices, [n, d] vectors)."""
    out = []
    for m in range(n_layer):
        rows = [i for i, (l, _, _) in enumerate(features) if l == m or (transcoders.cross_layer and l < m)]
        vecs = [activations[i] * _decoder_row(transcoders, features[i], m) for i in rows]
        out.append((np.array(rows, dtype=np.int64), torch.as_tensor(np.array(vecs, dtype=np.float32).reshape(-1,
                    transcoders.d_model))))
    return out


def _decoder_row(transcoders: TranscoderSet, feature, out_layer: int) -> np.ndarray:
    """Feature (layer, pos, id)'s decoder row into ``out_layer`` [d] (a CLT's W_dec is [n_out, d_tc, d])."""
    tc = transcoders.layers[feature[0]]
    return tc.W_dec[feature[2]] if tc.W_dec.ndim == 2 else tc.W_dec[out_layer - feature[0], feature[2]]


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits.astype(np.float64) - logits.max())
    return z / z.sum()


def salient_logits(logits: np.ndarray, max_n: int = 10, mass: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """circuit-tracer's choice: the fewest top tokens whose probabilities sum to >= ``mass``, at most ``max_n``.
    Returns (token ids, probabilities)."""
    probs = _softmax(logits)
    top = np.argsort(-probs, kind="stable")[:max_n]
    n = min(int(np.searchsorted(np.cumsum(probs[top]), mass)) + 1, max_n)
    return top[:n], probs[top[:n]].astype(np.float32)


def _logits(ref: Reference, final_row: torch.Tensor) -> np.ndarray:
    """The model's logits [n_vocab] from the final norm's output row (with final soft-capping, if any)."""
    with torch.no_grad():
        logits = ref.model.lm_head(final_row)
        cap = getattr(ref.model.config, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
    return logits.numpy()


def _unembedding(ref: Reference, tokens: np.ndarray) -> torch.Tensor:
    """The logit nodes' read vectors [n_logit, d]: demeaned unembedding rows ``U[t] - U.mean(0)``."""
    U = ref.model.lm_head.weight.detach().float()
    return U[torch.as_tensor(tokens)] - U.mean(0)


def _targets(run: _Run, transcoders: TranscoderSet, features: np.ndarray, readout: torch.Tensor) -> torch.Tensor:
    """The inputs [n_feat + n_logit] of targets ``features`` [n_feat, 3] (``x . W_enc[:, f]``), then of the logits
    whose demeaned unembedding rows ``readout`` [n_logit, d] holds (before any final soft-capping)."""
    parts = []
    for l, tc in enumerate(transcoders.layers):
        rows = features[features[:, 0] == l]
        if len(rows):
            cols = torch.as_tensor(tc.W_enc[:, rows[:, 2]].T)  # [n, d]
            # rows picked by a one-hot product: vmap batches its backward (an index's backward it loops over)
            pick = torch.nn.functional.one_hot(torch.as_tensor(rows[:, 1]), len(run.final)).float()  # [n, n_pos]
            parts.append(((pick @ run.mlp_in[l]) * cols).sum(-1))
    if len(readout):  # (an empty part would still send zeros back through the whole model)
        parts.append(readout @ run.final[-1])
    return torch.cat(parts)


def replay_targets(ref: Reference, graph: dict, transcoders: TranscoderSet, ids: list[int], embedding: np.ndarray,
                   mlp_out: np.ndarray) -> np.ndarray:
    """Run the frozen model of ``graph`` (patterns and norm scales of its recorded run) forward with leaf values
    ``embedding`` [n_pos, d] and ``mlp_out`` [n_layer, n_pos, d]; returns the targets' inputs [n_feat + n_logit]
    (float64), in the graph's node order."""
    frozen = Frozen(graph["frozen"].patterns, graph["frozen"].scales, replay=True)
    with torch.no_grad():
        run = _run_frozen(ref, ids, frozen, torch.as_tensor(embedding, dtype=torch.float32),
                          torch.as_tensor(mlp_out, dtype=torch.float32))
        readout = _unembedding(ref, graph["logit_tokens"])
        return _targets(run, transcoders, graph["features"], readout).double().numpy()


def _source_edges(g_emb: torch.Tensor | None, g_mlp: list[torch.Tensor | None], written: list, features: np.ndarray,
                  errors: torch.Tensor, emb: torch.Tensor, n_node: int) -> np.ndarray:
    """A batch of targets' rows [B, n_node] from their gradients [B, n_pos, d] with respect to the embedding and each
    MLP output leaf (None: no path): each source's written value dotted with the gradient where it is written."""
    n_feat, (n_layer, n_pos, _) = len(features), errors.shape
    batch = next(g for g in (g_emb, *g_mlp) if g is not None).shape[0]
    row = np.zeros((batch, n_node), dtype=np.float32)
    for m, g in enumerate(g_mlp):
        if g is None:
            continue
        rows, vecs = written[m]
        if len(rows):
            row[:, rows] += (g[:, torch.as_tensor(features[rows, 1])] * vecs).sum(-1).numpy()
        row[:, n_feat + m * n_pos:n_feat + (m + 1) * n_pos] = torch.einsum("bpd,pd->bp", g, errors[m]).numpy()
    if g_emb is not None:
        row[:, n_feat + n_layer * n_pos:n_feat + (n_layer + 1) * n_pos] = torch.einsum("bpd,pd->bp", g_emb, emb).numpy()
    return row


def reference_graph(ref: Reference, transcoders: TranscoderSet, ids: list[int], logit_tokens: list[int] | None = None,
                    *, batch: int = 64, freeze_norms: bool = True) -> dict:
    """The attribution graph of ``ids`` (BOS included) by autograd through the frozen model; float32 numpy arrays:

    features [n_feat, 3] (layer, pos, feature) sorted; activations [n_feat]; logit_tokens [n_logit] and
    logit_probabilities [n_logit] (``salient_logits`` of the last position unless given); adjacency
    [n_node, n_node] as ``adjacency[target, source]`` in pyinterp.circuit.graph's node order; pre [n_node] each
    node's input (feature: pre-activation - b_enc; logit: logit - mean logit, before any final soft-capping; 0 for
    error and token nodes); mlp_out and errors [n_layer, n_pos, d]; embeddings [n_pos, d]; logits [n_vocab] of the
    last position; frozen (the recorded patterns and scales, for ``replay_targets``).

    Targets are batched ``batch`` at a time, in node order: one recorded forward (graph retained), then per batch
    its targets' values [B] from the recorded MLP inputs and final norm output, and one ``torch.autograd.grad``
    with ``is_grads_batched`` (grad_outputs the identity [B, B]) for the gradients [B, ...] of every leaf.
    ``freeze_norms=False`` leaves 1/rms on the gradient path: a wrong graph, for showing the checks catch it."""
    if transcoders.n_layer != ref.n_layer or transcoders.d_model != ref.n_embd:
        raise ValueError(f"transcoders of {transcoders.n_layer} layers x {transcoders.d_model}, model "
                         f"{ref.n_layer} x {ref.n_embd}")
    frozen = Frozen(freeze_norms=freeze_norms)
    run = _run_frozen(ref, ids, frozen)
    n_layer, n_pos = ref.n_layer, len(ids)
    with torch.no_grad():
        acts = [_encode(tc, run.mlp_in[l].detach()) for l, tc in enumerate(transcoders.layers)]
    features = np.array([(l, p, f) for l in range(n_layer) for p, f in zip(*np.nonzero(acts[l].numpy()))],
                        dtype=np.int64).reshape(-1, 3)
    activations = np.array([float(acts[l][p, f]) for l, p, f in features], dtype=np.float32)
    logits = _logits(ref, run.final[-1].detach())
    if logit_tokens is None:
        tokens, probs = salient_logits(logits)
    else:
        tokens = np.asarray(logit_tokens, dtype=np.int64)
        probs = _softmax(logits)[tokens].astype(np.float32)
    readout = _unembedding(ref, tokens)
    with torch.no_grad():
        pre_targets = _targets(run, transcoders, features, readout)

    mlp_out = torch.stack([leaf.detach() for leaf in run.mlp_out])  # [n_layer, n_pos, d]
    written = _written(transcoders, features, activations, n_layer)
    errors = mlp_out.clone()
    for m, (rows, vecs) in enumerate(written):
        errors[m].index_add_(0, torch.as_tensor(features[rows, 1]), -vecs)
    emb = run.embedding.detach()
    n_feat, n_target = len(features), len(pre_targets)
    n_node = n_feat + (n_layer + 1) * n_pos + len(tokens)
    adjacency = np.zeros((n_node, n_node), dtype=np.float32)
    target_rows = np.r_[np.arange(n_feat), n_node - len(tokens) + np.arange(len(tokens))]
    leaves = [run.embedding, *run.mlp_out]
    for start in range(0, n_target, batch):
        chunk = np.arange(start, min(start + batch, n_target))
        # only this chunk's targets: the backward then reaches no deeper than its deepest target
        targets = _targets(run, transcoders, features[chunk[chunk < n_feat]], readout[chunk[chunk >= n_feat] - n_feat])
        grads = torch.autograd.grad(targets, leaves, torch.eye(len(chunk)), retain_graph=True,
                                    is_grads_batched=True, allow_unused=True)
        row = _source_edges(grads[0], grads[1:], written, features, errors, emb, n_node)
        adjacency[target_rows[chunk]] = row
    pre = np.zeros(n_node, dtype=np.float32)
    pre[target_rows] = pre_targets.numpy()
    return {"features": features, "activations": activations, "logit_tokens": tokens, "logit_probabilities": probs,
            "adjacency": adjacency, "pre": pre, "mlp_out": mlp_out.numpy(), "errors": errors.numpy(),
            "embeddings": emb.numpy(), "logits": logits, "frozen": frozen}


def reference_influence(adjacency: np.ndarray, logit_probabilities: np.ndarray, n_logit: int) -> np.ndarray:
    """circuit-tracer's node influence [n_node] (float64), computed by a linear solve instead of its power series.

    ``A = |adjacency|`` with each row divided by its sum (rows summing to 0 stay 0): how much of a target's input
    each source makes up. ``w`` [n_node] holds the logit probabilities at the last ``n_logit`` nodes, 0 elsewhere.
    Influence = ``w (A + A^2 + A^3 + ...)`` = ``w ((I - A)^-1 - I)``: the probability-weighted share of the
    logits that flows through each node, over paths of every length (A is nilpotent: the graph is acyclic)."""
    a = np.abs(np.asarray(adjacency, dtype=np.float64))
    a /= np.maximum(a.sum(1, keepdims=True), 1e-10)
    w = np.zeros(len(a))
    w[len(a) - n_logit:] = logit_probabilities
    x = np.linalg.solve((np.eye(len(a)) - a).T, w)  # x = w (I - A)^-1
    return x - w
