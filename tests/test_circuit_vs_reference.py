"""pyinterp's attribution graphs (frozen forward passes in llama.cpp's graph) against the PyTorch reference
(tests/circuit_reference.py: the transformers model with patterns and norm scales detached, edges by autograd), on
F32 weights: the same active features, every edge and every node's influence within 1e-3 of the reference row's
scale."""

from __future__ import annotations

import numpy as np
import pytest

import pyinterp
from pyinterp.circuit import attribution_graph, random_transcoders
from pyinterp.circuit import build
from pyinterp.circuit.prune import logit_weights, node_influence
from pyinterp.engine.arch import arch_of

from circuit_reference import reference_graph, reference_influence, replay_targets
from reference import Reference

TOLERANCE = 1e-3


def node_map(graph, ref: dict) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the nodes both graphs have, in pyinterp's order and in the reference's."""
    ours = {tuple(row): i for i, row in enumerate(graph.features.tolist())}
    theirs = {tuple(row): i for i, row in enumerate(ref["features"].tolist())}
    common = sorted(set(ours) & set(theirs))
    n_rest = (graph.n_layer + 1) * graph.n_pos + graph.n_logit
    a = np.r_[[ours[k] for k in common], graph.n_feat + np.arange(n_rest)].astype(int)
    b = np.r_[[theirs[k] for k in common], len(ref["features"]) + np.arange(n_rest)].astype(int)
    return a, b


def compare(model, ref: Reference, transcoders, prompt: str) -> dict:
    """pyinterp's graph against the reference's on the nodes both have.

    The two compute the real pass each in its own way, so their error nodes differ by what their MLPs round
    differently (llama.cpp's GELU, for one): the columns of the feature and token sources are compared directly,
    and each error source's column against the reference's frozen model run forward on pyinterp's error vector."""
    ids = model.prompt_ids(prompt)
    graph = attribution_graph(model, ids, transcoders, max_features=None)
    want = reference_graph(ref, transcoders, ids, logit_tokens=list(graph.logit_tokens))
    # features that differ can only be ones at their threshold, a float rounding away from firing or not
    ours, theirs = {tuple(r) for r in graph.features.tolist()}, {tuple(r) for r in want["features"].tolist()}
    assert len(ours ^ theirs) <= max(2, len(theirs) // 500), (len(ours ^ theirs), len(theirs))
    a, b = node_map(graph, want)
    n_common = len(a) - (graph.n_layer + 1) * graph.n_pos - graph.n_logit
    errors = np.arange(n_common, n_common + graph.n_layer * graph.n_pos)
    direct = np.setdiff1d(np.arange(len(a)), errors)
    got, exp = graph.adjacency[np.ix_(a, a)].astype(np.float64), want["adjacency"][np.ix_(b, b)].astype(np.float64)
    scale = np.abs(exp[:, direct]).max(axis=1, keepdims=True)
    rows = scale[:, 0] > 0
    assert rows.sum() > 0.5 * len(theirs)
    worst = float((np.abs(got - exp)[:, direct][rows] / scale[rows]).max())
    assert worst <= TOLERANCE, worst
    # error sources: pyinterp's error vectors through the reference's frozen model
    arch_out = transcoders.output_tensor(arch_of(model.arch).ffn_term)
    t = model.run(ids, capture=[arch_out])
    error_vectors = np.stack([t[arch_out, l] for l in range(graph.n_layer)]) - \
        build.writes(transcoders, graph.features, graph.activations, graph.n_pos)
    worst_error = 0.0
    rng = np.random.default_rng(0)
    for k in rng.choice(len(errors), size=min(12, len(errors)), replace=False):
        layer, pos = divmod(int(k), graph.n_pos)
        leaves = np.zeros_like(error_vectors)
        leaves[layer, pos] = error_vectors[layer, pos]
        column = replay_targets(ref, want, transcoders, ids, np.zeros_like(want["embeddings"]), leaves)
        expected = column[np.r_[b[:n_common], len(want["features"]):len(want["features"]) + graph.n_logit]]
        ours_col = graph.adjacency[np.r_[a[:n_common], graph.n_node - graph.n_logit:graph.n_node], graph.error_node(layer, pos)]
        worst_error = max(worst_error, float(np.abs(ours_col - expected).max() / max(np.abs(expected).max(), 1e-30)))
    assert worst_error <= TOLERANCE, worst_error
    # node influence on the logits, over the whole graph of each
    ours_infl = node_influence(graph.adjacency.astype(np.float64), logit_weights(graph))[a]
    ref_infl = reference_influence(want["adjacency"], want["logit_probabilities"], len(want["logit_tokens"]))[b]
    infl_err = float(np.abs(ours_infl - ref_infl).max() / np.abs(ref_infl).max())
    assert infl_err <= TOLERANCE, infl_err
    print(f"\n{graph.model}: {graph.n_feat} features, worst edge {worst:.2e}, error columns {worst_error:.2e}, "
          f"influence {infl_err:.2e}")
    return {"n_feat": graph.n_feat, "worst_edge": worst, "influence": infl_err}


@pytest.fixture(scope="module")
def tiny_pair(tiny_path):
    path = tiny_path("llama", f32=True)
    with pyinterp.Model(path, n_ctx=512) as model:
        yield model, Reference(path)


def input_rms(model, prompt: str) -> float:
    t = model.run(prompt, capture=["ffn_norm"])
    return float(np.sqrt(np.mean([(t["ffn_norm", l] ** 2).mean() for l in range(model.n_layer)])))


@pytest.mark.parametrize("kind", ["jumprelu", "relu", "topk", "clt", "skip"])
def test_tiny_llama(tiny_pair, kind):
    model, ref = tiny_pair
    prompt = "the cat sat on the mat and then"
    tcs = random_transcoders(model.n_layer, model.n_embd, 64, density=0.1, input_scale=input_rms(model, prompt), seed=3,
                             activation={"relu": "relu", "topk": "topk"}.get(kind, "jumprelu"),
                             cross_layer=kind == "clt", skip=kind == "skip", k=6)
    figures = compare(model, ref, tcs, prompt)
    assert figures["n_feat"] > 50


def test_gemma3_270m(gemma3_f32, ref_gemma3):
    """Gemma 3 270M (its F32 twin) with a random transcoder of its width and 1024 features per layer."""
    prompt = "The capital of Germany is"
    tcs = random_transcoders(gemma3_f32.n_layer, gemma3_f32.n_embd, 1024, density=0.005,
                             input_scale=input_rms(gemma3_f32, prompt), seed=4)
    figures = compare(gemma3_f32, ref_gemma3, tcs, prompt)
    assert figures["n_feat"] > 200
