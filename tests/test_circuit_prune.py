"""circuit-tracer's influence, pruning and graph scores (pyinterp.circuit.prune) on graphs small enough to work
out by hand, against the closed form (I - N)^-1, and against circuit-tracer's own torch functions (its package,
``pip install --no-deps circuit-tracer==0.5.0``, is part of the test install)."""

from __future__ import annotations

import numpy as np
import pytest

from circuit_graphs import random_graph
from pyinterp.circuit.graph import AttributionGraph
from pyinterp.circuit.prune import (compute_influence, cumulative_scores, edge_influence, find_threshold,
                                    graph_scores, logit_weights, node_influence, normalize_matrix, prune_graph)
from pyinterp.errors import InputError


def graph_of(edges: dict[tuple[int, int], float], n_feat_layers: list[int], n_layer: int,
             probabilities: list[float]) -> AttributionGraph:
    """A one-token graph: features at the given layers (position 0), ``edges[(target, source)] = weight``."""
    n_feat, n_logit = len(n_feat_layers), len(probabilities)
    n_node = n_feat + n_layer + 1 + n_logit
    adjacency = np.zeros((n_node, n_node), dtype=np.float32)
    for (target, source), weight in edges.items():
        adjacency[target, source] = weight
    return AttributionGraph(
        input_tokens=np.array([7]), input_strings=["x"],
        features=np.array([(layer, 0, 10 + i) for i, layer in enumerate(n_feat_layers)], dtype=np.int64),
        activations=np.ones(n_feat, dtype=np.float32), logit_tokens=np.arange(n_logit), logit_strings=["y"] * n_logit,
        logit_probabilities=np.array(probabilities, dtype=np.float32), adjacency=adjacency, n_layer=n_layer)


# The 5-node chain: feature f (layer 0) = node 0, errors e0, e1 = 1, 2, token = 3, logit = 4 (p = 0.8).
# f <- token 4; logit <- f 3, <- e0 -1, <- e1 0.5, <- token 0.5.
F, E0, E1, TOK, LOGIT = range(5)
CHAIN = {(F, TOK): 4.0, (LOGIT, F): 3.0, (LOGIT, E0): -1.0, (LOGIT, E1): 0.5, (LOGIT, TOK): 0.5}


def chain() -> AttributionGraph:
    return graph_of(CHAIN, [0], n_layer=2, probabilities=[0.8])


def test_chain_normalized_matrix_and_influence_by_hand():
    graph = chain()
    normalized = normalize_matrix(graph.adjacency)
    want = np.zeros((5, 5))
    want[F, TOK] = 1.0
    want[LOGIT, [F, E0, E1, TOK]] = [0.6, 0.2, 0.1, 0.1]   # |row| / 5
    np.testing.assert_allclose(normalized, want, rtol=1e-7)
    # 0.8 * logit row, then f's 0.48 flows on to the token: token 0.08 + 0.48
    np.testing.assert_allclose(node_influence(graph.adjacency, logit_weights(graph)),
                               [0.48, 0.16, 0.08, 0.56, 0.0], rtol=1e-7)


def test_influence_is_the_closed_form_series():
    graph = random_graph(n_pos=6, n_layer=4, seed=3)
    normalized = normalize_matrix(graph.adjacency)
    weights = logit_weights(graph)
    series = weights @ (np.linalg.inv(np.eye(graph.n_node) - normalized) - np.eye(graph.n_node))
    np.testing.assert_allclose(compute_influence(normalized, weights), series, rtol=1e-9, atol=1e-12)
    # rows normalised: every target with inputs has shares summing to 1, the rest 0
    sums = normalized.sum(axis=1)
    np.testing.assert_allclose(sums, (np.abs(graph.adjacency).sum(axis=1) > 0).astype(float), rtol=1e-12)


def test_cycle_is_an_error():
    cyclic = np.array([[0.0, 1.0], [1.0, 0.0]])
    with pytest.raises(InputError, match="cycle"):
        compute_influence(normalize_matrix(cyclic), np.array([1.0, 0.0]), max_iter=50)


def test_chain_prune_by_hand():
    node_mask, edge_mask, cumulative = prune_graph(chain())
    # influence sorted: token 0.56, f 0.48, e0 0.16, e1 0.08, logit 0 (total 1.28); cumulative
    # 0.4375, 0.8125, 0.9375, 1, 1: 0.8 is reached at f, so nodes >= 0.48 stay (+ token and logit)
    np.testing.assert_allclose(cumulative, [0.8125, 0.9375, 1.0, 0.4375, 1.0], rtol=1e-7)
    assert node_mask.tolist() == [True, False, False, True, True]
    # pruned edges f <- token 1, logit <- f 6/7, logit <- token 1/7; node influence on it: f 4.8/7; edge scores
    # f<-token 4.8/7, logit<-f 0.8*6/7, logit<-token 0.8/7: all three needed to reach 0.98
    assert sorted(zip(*np.nonzero(edge_mask))) == [(F, TOK), (LOGIT, F), (LOGIT, TOK)]
    pruned = CHAIN.copy()
    for key in [(LOGIT, E0), (LOGIT, E1)]:
        del pruned[key]
    scores = edge_influence(graph_of(pruned, [0], 2, [0.8]).adjacency, logit_weights(chain()))
    np.testing.assert_allclose(scores[[F, LOGIT, LOGIT], [TOK, F, TOK]], [4.8 / 7, 4.8 / 7, 0.8 / 7], rtol=1e-7)
    # at 0.9 the two 4.8/7 edges are enough (cumulative 0.4615, 0.923)
    _, edge_mask, _ = prune_graph(chain(), edge_threshold=0.9)
    assert sorted(zip(*np.nonzero(edge_mask))) == [(F, TOK), (LOGIT, F)]


def test_chain_scores_by_hand():
    replacement, completeness = graph_scores(chain())
    assert replacement == pytest.approx(0.56 / (0.56 + 0.24), rel=1e-7)
    # non-error shares: f 1, e0 1, e1 1, token 1, logit 1 - 0.3; weights: influence + 0.8 for the logit
    assert completeness == pytest.approx((0.48 + 0.16 + 0.08 + 0.56 + 0.8 * 0.7) / (1.28 + 0.8), rel=1e-7)


def test_nodes_without_kept_edges_are_dropped_round_after_round():
    # f0 (layer 0) <- token; f1 (layer 1) <- f0 only; both logits (p 0.5 each) <- f1 1, <- token 19.
    # Influence: f1 = f0 = 0.05, token 1. Edge scores: f0<-token 0.05, f1<-f0 0.05, logit<-f1 0.025 each,
    # logit<-token 0.475 each (total 1.1): at 0.95 the logit<-f1 edges go, so f1 has no outgoing edge (round 1),
    # then f0's only outgoing edge (into f1) is cleared and f0 goes too (round 2).
    f0, f1, tok, l0, l1 = 0, 1, 4, 5, 6
    edges = {(f0, tok): 1.0, (f1, f0): 1.0, (l0, f1): 1.0, (l1, f1): 1.0, (l0, tok): 19.0, (l1, tok): 19.0}
    graph = graph_of(edges, [0, 1], n_layer=2, probabilities=[0.5, 0.5])
    node_mask, edge_mask, _ = prune_graph(graph, node_threshold=0.9999, edge_threshold=0.95)
    assert np.nonzero(node_mask)[0].tolist() == [tok, l0, l1]
    assert sorted(zip(*np.nonzero(edge_mask))) == [(l0, tok), (l1, tok)]
    # with every edge kept both features stay
    node_mask, edge_mask, _ = prune_graph(graph, node_threshold=0.9999, edge_threshold=0.99)
    assert np.nonzero(node_mask)[0].tolist() == [f0, f1, tok, l0, l1]
    assert edge_mask.sum() == len(edges)


def test_find_threshold_and_cumulative_scores():
    scores = np.array([1.0, 5.0, 2.0, 2.0, 0.0])      # sorted 5 2 2 1 0, cumulative 0.5 0.7 0.9 1 1
    assert find_threshold(scores, 0.5) == 5.0
    assert find_threshold(scores, 0.6) == 2.0
    assert find_threshold(scores, 0.95) == 1.0
    assert find_threshold(scores, 1.0) == 1.0
    np.testing.assert_allclose(cumulative_scores(scores), [1.0, 0.5, 0.7, 0.9, 1.0])


def test_bad_thresholds_and_shapes():
    for kwargs in ({"node_threshold": 1.5}, {"edge_threshold": -0.1}):
        with pytest.raises(InputError, match="between 0 and 1"):
            prune_graph(chain(), **kwargs)
    graph = chain()
    graph.adjacency = graph.adjacency[:4, :4]
    with pytest.raises(InputError, match="nodes"):
        prune_graph(graph)
    graph = chain()
    graph.adjacency[:] = 0
    with pytest.raises(InputError, match="no inputs"):
        prune_graph(graph)


def circuit_tracer_graph_module():
    """circuit-tracer's ``graph`` module (its pure-torch prune_graph / compute_graph_scores): a reference of the
    test install (``pip install --no-deps circuit-tracer==0.5.0``), so an error when missing, never a skip."""
    from circuit_tracer import graph as ct_graph

    return ct_graph


def as_circuit_tracer(graph: AttributionGraph):
    """The attributes circuit-tracer's prune_graph and compute_graph_scores read, on a duck-typed graph."""
    import types

    import torch
    return types.SimpleNamespace(
        input_string=graph.prompt, input_tokens=torch.tensor(graph.input_tokens),
        adjacency_matrix=torch.tensor(graph.adjacency),
        selected_features=torch.arange(graph.n_feat), active_features=torch.tensor(graph.features),
        activation_values=torch.tensor(graph.activations), n_pos=graph.n_pos,
        logit_targets=[(s, int(t)) for s, t in zip(graph.logit_strings, graph.logit_tokens)],
        logit_probabilities=torch.tensor(graph.logit_probabilities), cfg=types.SimpleNamespace(n_layers=graph.n_layer))


@pytest.mark.parametrize("seed", range(6))
def test_matches_circuit_tracer(seed):
    ct_graph = circuit_tracer_graph_module()
    graph = random_graph(n_pos=7, n_layer=5, features_per_site=3, density=0.35, n_logit=1 + seed % 4, seed=seed)
    theirs = as_circuit_tracer(graph)
    kept = []
    for node_threshold, edge_threshold in ((0.8, 0.98), (0.5, 0.9), (0.95, 0.995)):
        node_mask, edge_mask, cumulative = prune_graph(graph, node_threshold, edge_threshold)
        want = ct_graph.prune_graph(theirs, node_threshold, edge_threshold)
        assert node_mask.tolist() == want.node_mask.tolist()
        assert np.array_equal(edge_mask, want.edge_mask.numpy())
        np.testing.assert_allclose(cumulative, want.cumulative_scores.numpy(), rtol=1e-5)
        kept.append(node_mask[:graph.n_feat].sum())
    assert any(0 < k < graph.n_feat for k in kept), kept   # some features pruned, some kept
    np.testing.assert_allclose(graph_scores(graph), ct_graph.compute_graph_scores(theirs), rtol=1e-5)
    weights = logit_weights(graph)
    np.testing.assert_allclose(node_influence(graph.adjacency, weights),
                               ct_graph.compute_node_influence(torch_of(graph.adjacency), torch_of(weights)).numpy(),
                               rtol=1e-4, atol=1e-7)


def torch_of(array: np.ndarray):
    import torch
    return torch.tensor(np.asarray(array, dtype=np.float32))
