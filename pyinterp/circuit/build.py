"""Attribution graphs on GGUF: the prompt's local replacement model, computed by the engine.

1. A normal pass (the real, quantized model) measures what the local replacement model freezes: each layer's
   attention weights ``[n_head, n_pos, n_pos]`` and each RMS norm's per-token scale ``1/rms(x)``; it captures the
   MLP inputs and outputs and the token embeddings. The transcoders encode the MLP inputs (numpy): the active
   features, and each MLP's error term (its output less what the graph's features write there).
2. Every source node (feature, error, token) writes one vector into the residual stream: ``a_f * W_dec[f]`` at the
   MLP output of each layer it writes (a CLT's features: every later layer too), the error vector there, or the
   token's embedding. With the norms and attention frozen (:class:`pyinterp.engine.readouts.Frozen`) and every
   MLP output replaced by the injected writes, the graph is linear in them, so one forward pass of a source's
   writes alone gives its direct effect on every target: the frozen MLP input of every layer (dotted with the
   encoder columns of the features there) and the frozen final norm at the last position (dotted with the
   demeaned unembedding rows of the logits). That is column ``s`` of the adjacency matrix.
3. The sources go through the engine's multi-sequence decode: each sequence a copy of the prompt carrying one
   source's writes, about 512 tokens per decode; nothing after the final norm is computed, nor the MLPs and the
   attention scores (their outputs are replaced).

Forward passes of injected sources (one per source, batched as sequences) rather than backward passes (one per
target, as circuit-tracer does with autograd): llama.cpp builds inference graphs only, and a backward graph would
need a gradient for every op of every architecture on every backend; a forward pass gives a source's edges to every
target at once, the whole column, in exactly the computation (the same kernels, on every backend) the model runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from pyinterp.circuit.gguf_weights import unembedding
from pyinterp.circuit.graph import AttributionGraph
from pyinterp.circuit.replace import reading_mlp_input
from pyinterp.circuit.transcoder import TranscoderSet
from pyinterp.engine.arch import arch_of
from pyinterp.engine.readouts import Frozen, NormScales
from pyinterp.errors import InputError

if TYPE_CHECKING:
    from pyinterp.engine.core import ModelLike

# the per-layer RMS norms the local replacement model freezes (those the model's graph has), and the final one;
# the post-FFN norm (Gemma) too when the transcoders write the MLP's output before it
LAYER_NORMS = ("attn_norm", "attn_post_norm", "ffn_norm")
POST_FFN_NORM = "ffn_post_norm"
FINAL_NORM = ("result_norm", -1)
# architectures whose residual stream is linear once norms and attention are frozen (no attention biases, no
# final logit soft-capping)
LINEAR_ARCHS = ("llama", "qwen3", "phi3", "gemma3")
DECODE_TOKENS = 512   # tokens per frozen decode
TARGET_CHUNK = 512    # target features dotted at once


@dataclass
class Measured:
    """What one normal pass over the prompt gives the local replacement model (``n_pos`` tokens)."""

    mlp_in: np.ndarray     # [n_layer, n_pos, d_model] each MLP's input (ffn_norm)
    mlp_out: np.ndarray    # [n_layer, n_pos, d_model] each MLP's output as the residual stream receives it
    embedding: np.ndarray  # [n_pos, d_model] the token embeddings as the residual stream receives them
    weights: dict[int, np.ndarray]               # layer -> [n_head, n_pos, n_pos] attention weights
    scales: dict[tuple[str, int], np.ndarray]    # (norm, layer) -> [n_pos] 1/rms
    logits: np.ndarray     # [n_vocab] of the last position


def measure(model: ModelLike, ids: list[int], out_name: str) -> Measured:
    """The normal pass: attention weights, norm scales, MLP inputs and outputs (``out_name``: the tensor the
    transcoders write), embeddings, last logits."""
    arch = arch_of(model.arch)
    info = model.tensor_info()
    n_layer = model.n_layer
    names = LAYER_NORMS + ((POST_FFN_NORM,) if out_name != arch.ffn_term else ())
    norms = [(name, il) for name in names for il in range(n_layer) if il in info.layers.get(name, ())]
    capture = ["attn_scores", "ffn_norm", out_name, arch.embedding]
    done = model.engine.run(ids, capture=capture, readout=NormScales([*norms, FINAL_NORM]), logits="last")
    got = done.captured
    return Measured(
        mlp_in=np.stack([got["ffn_norm", il] for il in range(n_layer)]),
        mlp_out=np.stack([got[out_name, il] for il in range(n_layer)]),
        embedding=got[arch.embedding, -1],
        weights={il: got["attn_scores", il] for il in range(n_layer) if ("attn_scores", il) in got},
        scales=done.readout,
        logits=done.logits[-1])


def active_features(transcoders: TranscoderSet, mlp_in: np.ndarray, max_features: int | None,
                    drop_first: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The active features ``[n, 3]`` (layer, position, feature; sorted) and their activations ``[n]``; with
    ``max_features``, the ones writing the most (activation times decoder norm) among them; ``drop_first``: none at
    position 0."""
    found, acts = [], []
    for tc in transcoders.layers:
        f = tc.encode(mlp_in[tc.layer])
        f[:int(drop_first)] = 0
        pos, feat = np.nonzero(f > 0)
        found.append(np.stack([np.full_like(pos, tc.layer), pos, feat], axis=1))
        acts.append(f[pos, feat])
    features, activations = np.concatenate(found).astype(np.int64), np.concatenate(acts).astype(np.float32)
    if max_features is not None and len(features) > max_features:
        norms = [np.linalg.norm(tc.W_dec.reshape(-1, tc.d_tc, tc.d_model), axis=2).sum(0) for tc in transcoders.layers]
        size = activations * np.array([norms[l][f] for l, _, f in features])
        keep = np.sort(np.argsort(-size, kind="stable")[:max_features])
        features, activations = features[keep], activations[keep]
    return features, activations


def writes(transcoders: TranscoderSet, features: np.ndarray, activations: np.ndarray,
           n_pos: int) -> np.ndarray:
    """What the graph's features write ``[n_layer, n_pos, d_model]`` into each MLP output."""
    out = np.zeros((transcoders.n_layer, n_pos, transcoders.d_model), np.float32)
    for (l, p, f), a in zip(features, activations):
        tc = transcoders.layers[l]
        for m in range(l, l + tc.n_out):
            out[m, p] += a * tc.decoder(m)[f]
    return out


def salient_logits(logits: np.ndarray, max_n_logits: int = 10, desired_prob: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """The fewest top tokens whose probabilities reach ``desired_prob``, at most ``max_n_logits``: ids and
    probabilities."""
    p = np.exp(logits.astype(np.float64) - logits.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")[:max_n_logits]
    n = int(np.searchsorted(np.cumsum(p[order]), desired_prob) + 1)
    order = order[:min(n, max_n_logits)]
    return order.astype(np.int64), p[order].astype(np.float32)


def for_model(model: ModelLike, transcoders: TranscoderSet) -> TranscoderSet:
    """The transcoders checked against the model, reading its MLP input (:func:`reading_mlp_input`)."""
    engine = model.engine
    engine.check_live()
    if model.arch not in LINEAR_ARCHS:
        raise InputError(f"circuit: a {model.arch} model is not linear with its norms and attention frozen (attention "
                         f"biases or logit soft-capping); circuits run on {', '.join(LINEAR_ARCHS)}")
    if engine.steering or engine.interventions:
        raise InputError("circuit: not under pushed interventions or a control vector")
    if transcoders.n_layer != model.n_layer or transcoders.d_model != model.n_embd:
        raise InputError(f"circuit: the transcoders are for {transcoders.n_layer} layers of width {transcoders.d_model}; "
                         f"the model has {model.n_layer} layers of width {model.n_embd}")
    return reading_mlp_input(model, transcoders)


def attribution_graph(model: ModelLike, tokens_or_text: str | Sequence[int], transcoders: TranscoderSet, *,
                      targets: Sequence[int] | None = None, max_n_logits: int = 10, desired_logit_prob: float = 0.95,
                      max_features: int | None = 8192, drop_first: bool = False,
                      progress: Callable[[int, int], None] | None = None) -> AttributionGraph:
    """The attribution graph of the prompt's last position (see the module docstring): its targets are ``targets``
    (token ids) or the salient logits; ``drop_first``: no feature nodes at position 0 (circuit-tracer's convention: it
    leaves out the first token, usually BOS, whose activations are outliers; here their writes go to the error
    nodes); ``max_features``: the most features kept as nodes (the others' writes go to the error nodes); ``progress(done, total)`` after each frozen decode."""
    transcoders = for_model(model, transcoders)
    out_name = transcoders.output_tensor(arch_of(model.arch).ffn_term)
    started = time.perf_counter()
    ids = model.prompt_ids(tokens_or_text)
    n_pos = len(ids)
    m = measure(model, ids, out_name)
    features, activations = active_features(transcoders, m.mlp_in, max_features, drop_first)
    errors = m.mlp_out - writes(transcoders, features, activations, n_pos)
    if targets is None:
        logit_tokens, logit_p = salient_logits(m.logits, max_n_logits, desired_logit_prob)
    else:
        logit_tokens = np.asarray(targets, dtype=np.int64)
        p = np.exp(m.logits.astype(np.float64) - m.logits.max())
        logit_p = (p / p.sum())[logit_tokens].astype(np.float32)
    rows, mean = unembedding(model.path, [int(t) for t in logit_tokens])
    graph = AttributionGraph(
        input_tokens=np.asarray(ids, dtype=np.int64), input_strings=[model.token_str(t) for t in ids],
        features=features, activations=activations, logit_tokens=logit_tokens,
        logit_strings=[model.token_str(int(t)) for t in logit_tokens], logit_probabilities=logit_p,
        adjacency=np.zeros((0, 0), np.float32), n_layer=model.n_layer, cross_layer=transcoders.cross_layer,
        model=model.path.name, prompt=tokens_or_text if isinstance(tokens_or_text, str) else "")
    graph.adjacency = np.zeros((graph.n_node, graph.n_node), np.float32)
    measured = time.perf_counter()
    n_decodes = _fill(model, graph, transcoders, m, errors, rows - mean, out_name, progress)
    graph.info.update(measure_s=measured - started, frozen_s=time.perf_counter() - measured, frozen_decodes=n_decodes,
                      sources=graph.n_feat + (model.n_layer + 1) * n_pos,
                      sum_error=_sum_error(graph, transcoders, m))
    return graph


def _sum_error(graph: AttributionGraph, transcoders: TranscoderSet, m: Measured) -> float:
    """How far the edges into the targets fall from adding up to their inputs in the real pass (features'
    pre-activations less the encoder bias, logits less the mean logit), relative to the largest input: float
    rounding on F32 weights; on quantized weights also the rounding of the activations the quantized matrix
    products make, which differs between one source's writes and all of them together."""
    inputs = [m.mlp_in[l, p] @ transcoders.layers[l].W_enc[:, f] for l, p, f in graph.features]
    inputs += list(m.logits[graph.logit_tokens] - np.mean(m.logits, dtype=np.float64))
    inputs = np.asarray(inputs, dtype=np.float64)
    sums = graph.adjacency[np.r_[:graph.n_feat, graph.n_node - graph.n_logit:graph.n_node]].sum(axis=1, dtype=np.float64)
    return float(np.abs(sums - inputs).max() / max(np.abs(inputs).max(), 1e-30))


def _source_writes(graph: AttributionGraph, transcoders: TranscoderSet, m: Measured, errors: np.ndarray,
                   s: int) -> list[tuple[int, int, np.ndarray]]:
    """Source node ``s``'s writes: ``(layer, position, vector)``, layer -1 for the embedding."""
    if s < graph.n_feat:
        (l, p, f), a = graph.features[s], graph.activations[s]
        tc = transcoders.layers[l]
        return [(mm, p, a * tc.decoder(mm)[f]) for mm in range(l, l + tc.n_out)]
    s -= graph.n_feat
    if s < graph.n_layer * graph.n_pos:
        return [(s // graph.n_pos, s % graph.n_pos, errors[s // graph.n_pos, s % graph.n_pos])]
    s -= graph.n_layer * graph.n_pos
    return [(-1, s, m.embedding[s])]


def _fill(model: ModelLike, graph: AttributionGraph, transcoders: TranscoderSet, m: Measured, errors: np.ndarray,
          logit_rows: np.ndarray, out_name: str, progress: Callable[[int, int], None] | None) -> int:
    """Every source's column of the adjacency matrix, from frozen decodes of ``batch`` sources each; returns the
    number of decodes."""
    arch = arch_of(model.arch)
    engine = model.engine
    n_pos, n_layer, d = graph.n_pos, graph.n_layer, transcoders.d_model
    n_sources = graph.n_feat + (n_layer + 1) * n_pos
    batch = max(1, min(engine.n_seq_max, DECODE_TOKENS // n_pos))
    by_layer = {l: np.nonzero(graph.features[:, 0] == l)[0] for l in range(n_layer)}
    target_layers = [l for l in range(n_layer) if len(by_layer[l])]
    first_logit = graph.n_node - graph.n_logit
    n_decodes = 0
    order = source_order(graph)
    for start in range(0, n_sources, batch):
        # every decode holds `batch` sequences (the last padded with empty ones): a source's column is computed by
        # the same kernels whatever sources share its decode, bit for bit
        sources = order[start:start + batch]
        b = batch
        inject = np.zeros((n_layer + 1, b * n_pos, d), np.float32)  # slot 0: the embedding, slot l + 1: layer l
        first = n_layer
        for i, s in enumerate(sources):
            for l, p, vector in _source_writes(graph, transcoders, m, errors, s):
                inject[l + 1, i * n_pos + p] += vector
                first = min(first, l)
        # nothing is written before layer `first`'s MLP output: the residual stream there is zero, and the layers
        # before are not computed (but for the last layer's, whose attention reads llama.cpp's output rows)
        rows = {(arch.embedding, -1): inject[0], **{(out_name, l): inject[l + 1] for l in range(n_layer)}}
        if 0 <= first < n_layer - 1:
            rows = {(arch.resid_mid, first): np.zeros_like(inject[0]),
                    **{(out_name, l): inject[l + 1] for l in range(first, n_layer)}}
        reads = [l for l in target_layers if l > first]
        frozen = Frozen(m.scales, m.weights, rows)
        got = engine.run_contexts([list(map(int, graph.input_tokens))] * b,
                                  [f"ffn_norm-{l}" for l in reads] + [FINAL_NORM[0]], readout=frozen).captured
        for l in reads:
            u = got["ffn_norm", l].reshape(b, n_pos, d)
            nodes = by_layer[l]
            for c in range(0, len(nodes), TARGET_CHUNK):
                chunk = nodes[c:c + TARGET_CHUNK]
                pos, feat = graph.features[chunk, 1], graph.features[chunk, 2]
                enc = transcoders.layers[l].W_enc[:, feat]                     # [d, n_chunk]
                edges = np.einsum("bjd,dj->jb", u[:, pos, :], enc)[:, :len(sources)]
                graph.adjacency[chunk[:, None], sources[None, :]] = edges
        final = got[FINAL_NORM]
        final = final.reshape(b, n_pos, d)[:, -1] if len(final) == b * n_pos else final.reshape(b, d)
        # einsum's own loop, not BLAS: a column's sums do not depend on its place in the matrix
        graph.adjacency[first_logit:, sources] = np.einsum("jd,bd->jb", logit_rows, final)[:, :len(sources)]
        n_decodes += 1
        if progress is not None:
            progress(start + len(sources), n_sources)
    return n_decodes


def source_order(graph: AttributionGraph) -> np.ndarray:
    """The order the sources go through the frozen decodes: node order, so that a decode's sources are of about
    the same layer and the layers before them are not computed."""
    return np.arange(graph.n_feat + (graph.n_layer + 1) * graph.n_pos)
