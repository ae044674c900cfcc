"""Attribution graphs built by the engine's frozen passes (pyinterp.circuit.build), on F32 models: the edges into
every node add up to its input in the real pass, causality, batch invariance, the perturbation check against the
transformers reference, and bad input."""

from __future__ import annotations

import numpy as np
import pytest

import pyinterp
from pyinterp.circuit import attribution_graph, check_features, random_transcoders
from pyinterp.circuit import build
from pyinterp.circuit.check import predicted_changes
from pyinterp.circuit.graph import AttributionGraph
from pyinterp.engine.arch import arch_of
from pyinterp.errors import InputError

PROMPT = "the cat sat on the mat and then"


@pytest.fixture(scope="module")
def tiny(tiny_path):
    with pyinterp.Model(tiny_path("llama", f32=True), n_ctx=512) as model:
        yield model


def mlp_inputs(model, ids) -> np.ndarray:
    """[n_layer, n_pos, d_model] each MLP's input in a plain run (independent of the circuit code)."""
    t = model.run(ids, capture=["ffn_norm"])
    return np.stack([t["ffn_norm", l] for l in range(model.n_layer)])


def transcoders_for(model, ids, **kwargs):
    rms = float(np.sqrt((mlp_inputs(model, ids) ** 2).mean()))
    return random_transcoders(model.n_layer, model.n_embd, 64, density=0.1, input_scale=rms, **kwargs)


def inputs_of(model, graph: AttributionGraph, transcoders, ids) -> np.ndarray:
    """What the edges into each target must add up to: feature pre-activations less b_enc, from a plain run's MLP
    inputs; the logits less the mean logit."""
    x = mlp_inputs(model, ids)
    feats = [x[l, p] @ transcoders.layers[l].W_enc[:, f] for l, p, f in graph.features]
    logits = model.run(ids).logits[-1].astype(np.float64)
    return np.array(feats + list(logits[graph.logit_tokens] - logits.mean()))


def target_rows(graph: AttributionGraph) -> np.ndarray:
    return np.r_[:graph.n_feat, graph.n_node - graph.n_logit:graph.n_node]


@pytest.mark.parametrize("kind", ["jumprelu", "relu", "topk", "clt", "skip"])
def test_edges_add_up_to_inputs(tiny, kind):
    ids = tiny.prompt_ids(PROMPT)
    tcs = transcoders_for(tiny, ids, activation="relu" if kind == "relu" else "topk" if kind == "topk" else "jumprelu",
                          cross_layer=kind == "clt", skip=kind == "skip", k=6)
    g = attribution_graph(tiny, ids, tcs)
    assert g.n_feat > 50 and g.n_logit >= 1
    want = inputs_of(tiny, g, tcs, ids)
    sums = g.adjacency[target_rows(g)].sum(axis=1, dtype=np.float64)
    np.testing.assert_allclose(sums, want, atol=1e-5 * np.abs(want).max())
    assert g.info["sum_error"] < 1e-5
    # every feature before the last layer reaches the logits (through the later layers' attention): no column left
    # unwritten
    early = np.nonzero(g.features[:, 0] < g.n_layer - 1)[0]
    assert len(early) and np.all(g.adjacency[g.logit_node(0), early] != 0)


def test_edges_are_causal(tiny):
    ids = tiny.prompt_ids(PROMPT)
    tcs = transcoders_for(tiny, ids)
    g = attribution_graph(tiny, ids, tcs)
    n = g.n_feat
    layer, pos = g.features[:, 0], g.features[:, 1]
    feature_edges = g.adjacency[:n, :n]
    later_or_same_layer = layer[None, :] >= layer[:, None]
    later_position = pos[None, :] > pos[:, None]
    assert np.all(feature_edges[later_or_same_layer | later_position] == 0)
    errors = g.adjacency[:n, n:n + g.n_layer * g.n_pos].reshape(n, g.n_layer, g.n_pos)
    for j in range(n):
        assert np.all(errors[j, layer[j]:] == 0) and np.all(errors[j, :, pos[j] + 1:] == 0)
    tokens = g.adjacency[:n, g.token_node(0):g.token_node(0) + g.n_pos]
    assert np.all(tokens[np.arange(g.n_pos)[None, :] > pos[:, None]] == 0)


def test_batch_invariant(tiny, monkeypatch):
    """A source's column is bit for bit the same whatever sources share its decode: the graph with the sources in
    a shuffled order (other companions in every decode) equals the graph in node order."""
    ids = tiny.prompt_ids(PROMPT)
    tcs = transcoders_for(tiny, ids)
    ordered = attribution_graph(tiny, ids, tcs)
    assert ordered.info["frozen_decodes"] < ordered.info["sources"] / 4
    n_sources = ordered.info["sources"]
    monkeypatch.setattr(build, "source_order", lambda graph: np.random.default_rng(5).permutation(n_sources))
    shuffled = attribution_graph(tiny, ids, tcs)
    np.testing.assert_array_equal(shuffled.adjacency, ordered.adjacency)


def test_max_features_moves_the_rest_into_errors(tiny):
    ids = tiny.prompt_ids(PROMPT)
    tcs = transcoders_for(tiny, ids)
    full = attribution_graph(tiny, ids, tcs)
    capped = attribution_graph(tiny, ids, tcs, max_features=20)
    assert capped.n_feat == 20
    sizes = full.activations * np.array([np.linalg.norm(tcs.layers[l].W_dec[f]) for l, _, f in full.features])
    assert np.min(sizes[[np.nonzero((full.features == row).all(1))[0][0] for row in capped.features]]) >= \
        np.sort(sizes)[-20] - 1e-6
    want = inputs_of(tiny, capped, tcs, ids)
    np.testing.assert_allclose(capped.adjacency[target_rows(capped)].sum(1), want, atol=1e-5 * np.abs(want).max())


def test_drop_first(tiny):
    """No feature at position 0; their writes join the error nodes there, so the edges still add up."""
    ids = tiny.prompt_ids(PROMPT)
    tcs = transcoders_for(tiny, ids)
    full = attribution_graph(tiny, ids, tcs)
    g = attribution_graph(tiny, ids, tcs, drop_first=True)
    assert (full.features[:, 1] == 0).sum() > 0 and (g.features[:, 1] == 0).sum() == 0
    assert g.n_feat == full.n_feat - (full.features[:, 1] == 0).sum()
    want = inputs_of(tiny, g, tcs, ids)
    np.testing.assert_allclose(g.adjacency[target_rows(g)].sum(1), want, atol=1e-5 * np.abs(want).max())


def test_targets_given(tiny):
    ids = tiny.prompt_ids(PROMPT)
    g = attribution_graph(tiny, ids, transcoders_for(tiny, ids), targets=[5, 17])
    assert list(g.logit_tokens) == [5, 17]
    p = np.exp(tiny.run(ids).logits[-1].astype(np.float64))
    np.testing.assert_allclose(g.logit_probabilities, (p / p.sum())[[5, 17]], rtol=1e-5)


def test_salient_logits():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    ids, p = build.salient_logits(logits, max_n_logits=10, desired_prob=0.95)
    assert list(ids) == [0, 1, 2] and np.allclose(p, [0.5, 0.3, 0.15])
    ids, _ = build.salient_logits(logits, max_n_logits=2)
    assert list(ids) == [0, 1]


def test_check_real_change_matches_reference(tiny, tiny_path):
    """--check's real-model change equals the transformers reference with the feature's decoder row added to the
    layer's output (the MLP output it writes) at its position."""
    from reference import Reference

    ids = tiny.prompt_ids(PROMPT)
    tcs = transcoders_for(tiny, ids)
    g = attribution_graph(tiny, ids, tcs)
    nodes = [0, g.n_feat // 2, g.n_feat - 1]
    checks = check_features(tiny, g, tcs, nodes, factor=0.0)
    ref = Reference(tiny_path("llama", f32=True))
    target = int(g.logit_tokens[0])

    def demeaned(logits):
        logits = np.asarray(logits, dtype=np.float64)[-1]
        return logits[target] - logits.mean()

    base = demeaned(ref.run(ids).logits)
    for c in checks:
        layer, pos, feat = c.feature
        vec = -c.activation * tcs.layers[layer].W_dec[feat]
        real = demeaned(ref.run(ids, add=[(layer, [pos], vec)]).logits) - base
        assert abs(c.real - real) <= 1e-3 * max(abs(real), 1e-2), (c, real)


def test_check_replacement_model(tiny):
    """In the replacement model (MLPs replaced by the transcoders, the prompt's error terms frozen) a last-layer
    feature's change reaches the logit as in the real model (no MLP after it); an earlier feature's differs (later
    transcoder features respond instead of real MLPs); with the factor 1 nothing moves."""
    ids = tiny.prompt_ids(PROMPT)
    tcs = transcoders_for(tiny, ids)
    g = attribution_graph(tiny, ids, tcs)
    last = [int(i) for i in np.nonzero(g.features[:, 0] == tiny.n_layer - 1)[0][:3]]
    first = [int(i) for i in np.nonzero((g.features[:, 0] == 0) & (g.features[:, 1] < g.n_pos - 1))[0][:3]]
    checks = check_features(tiny, g, tcs, last + first, factor=0.0)
    for c in checks[:len(last)]:
        assert c.replaced == pytest.approx(c.real, rel=1e-3, abs=1e-5)
    assert any(abs(c.replaced - c.real) > 1e-3 * abs(c.real) for c in checks[len(last):])
    for c in check_features(tiny, g, tcs, last + first, factor=1.0):
        assert c.real == pytest.approx(0, abs=1e-5) and c.replaced == pytest.approx(0, abs=1e-5) and c.predicted == 0


def test_predicted_changes_by_hand():
    """Three features in a chain f0 -> f1 -> logit, plus f0 -> logit: ablating f0 moves the logit by its direct edge
    plus, through f1, (A[f1, f0] / a0) * (A[logit, f1] / a1) per unit of f0."""
    a = np.array([2.0, 4.0], np.float32)
    n_node = 2 + 2 * 1 + 1 + 1  # 2 features, 2 layers x 1 position errors, 1 token, 1 logit
    A = np.zeros((n_node, n_node), np.float32)
    A[1, 0] = 1.0        # f0 -> f1
    A[5, 0] = 0.5        # f0 -> logit
    A[5, 1] = 3.0        # f1 -> logit
    g = AttributionGraph(np.array([7]), ["x"], np.array([[0, 0, 3], [1, 0, 9]]), a, np.array([1]), ["y"],
                         np.array([1.0], np.float32), A, n_layer=2)
    direct, through = predicted_changes(g, [0, 1], factor=0.0)
    np.testing.assert_allclose(direct, [-0.5, -3.0])
    # f0 ablated: delta a0 = -2; f1 moves by (1/2) * -2 = -1; logit: 0.5/2 * -2 + 3/4 * -1 = -1.25
    np.testing.assert_allclose(through, [-1.25, -3.0])


def test_bad_input(tiny, tiny_path):
    ids = tiny.prompt_ids(PROMPT)
    with pytest.raises(InputError, match="transcoders are for"):
        attribution_graph(tiny, ids, random_transcoders(tiny.n_layer - 1, tiny.n_embd, 16))
    with pytest.raises(InputError, match="transcoders are for"):
        attribution_graph(tiny, ids, random_transcoders(tiny.n_layer, tiny.n_embd + 1, 16))
    with pyinterp.Model(tiny_path("qwen2", f32=True), n_ctx=512) as qwen2:
        with pytest.raises(InputError, match="not linear"):
            attribution_graph(qwen2, "a b", random_transcoders(qwen2.n_layer, qwen2.n_embd, 16))
    vector = np.zeros(tiny.n_embd, np.float32)
    with tiny.intervened(pyinterp.interventions.AddVector("l_out", 0, vector)):
        with pytest.raises(InputError, match="pushed interventions"):
            attribution_graph(tiny, ids, transcoders_for(tiny, ids))


def test_gemma_writes_before_post_norm(gemma3_f32):
    """A set that writes the MLP's output before Gemma's post-FFN norm: that norm is frozen too, and the edges
    still add up to the inputs."""
    from dataclasses import replace

    ids = gemma3_f32.prompt_ids("The capital of France is")
    tcs = replace(transcoders_for(gemma3_f32, ids), writes="ffn_out")
    assert tcs.output_tensor(arch_of("gemma3").ffn_term) == "ffn_out"
    g = attribution_graph(gemma3_f32, ids, tcs, max_features=300)
    want = inputs_of(gemma3_f32, g, tcs, ids)
    np.testing.assert_allclose(g.adjacency[target_rows(g)].sum(1), want, atol=1e-4 * np.abs(want).max())
