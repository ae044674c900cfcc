"""Influence, pruning and the replacement / completeness scores of an attribution graph, as circuit-tracer defines them.

The definitions follow circuit-tracer 0.5.0's ``circuit_tracer/graph.py`` (``normalize_matrix``,
``compute_influence``, ``compute_node_influence``, ``compute_edge_influence``, ``find_threshold``, ``prune_graph``,
``compute_graph_scores``); this is an independent numpy implementation of the same formulas, in float64.

Notation, for a graph of ``n`` nodes in the order of :class:`~pyinterp.circuit.graph.AttributionGraph`:
  ``A``   ``[n, n]`` adjacency, ``A[t, s]`` the direct effect of source ``s`` on target ``t``
  ``N``   ``[n, n]`` the normalised matrix ``N[t, s] = |A[t, s]| / max(sum_s' |A[t, s']|, 1e-10)``: each target's
          inputs as shares of its total absolute input
  ``w``   ``[n]`` the logit weights: the logit nodes' probabilities, zero elsewhere
The influence of every node on the output is ``w (N + N^2 + N^3 + ...) = w ((I - N)^-1 - I)``: the share of the
probability-weighted logits that flows through each node along every path (the series ends, since the graph has
no cycles and ``N`` is nilpotent).
"""

from __future__ import annotations

import numpy as np

from pyinterp.circuit.graph import AttributionGraph
from pyinterp.errors import InputError


def normalize_matrix(adjacency: np.ndarray) -> np.ndarray:
    """``N[t, s] = |A[t, s]| / max(sum_s' |A[t, s']|, 1e-10)``: the rows of ``|A|`` summing to 1 (all-zero rows
    stay zero). [n, n] -> [n, n] float64. (circuit-tracer: ``graph.normalize_matrix``.)"""
    magnitude = np.abs(np.asarray(adjacency, dtype=np.float64))
    return magnitude / np.maximum(magnitude.sum(axis=1, keepdims=True), 1e-10)


def compute_influence(normalized: np.ndarray, weights: np.ndarray, max_iter: int = 1000) -> np.ndarray:
    """``w N + w N^2 + w N^3 + ...`` for a row vector ``w`` [n] and ``N`` [n, n], summed until a term is exactly
    zero (``N`` of an acyclic graph is nilpotent). [n] float64. A graph with a cycle never ends: InputError after
    ``max_iter`` terms. (circuit-tracer: ``graph.compute_influence``.)"""
    term = np.asarray(weights, dtype=np.float64) @ normalized
    influence = term.copy()
    for _ in range(max_iter):
        if not term.any():
            return influence
        term = term @ normalized
        influence += term
    raise InputError(f"the influence did not converge after {max_iter} steps: the graph has a cycle")


def logit_weights(graph: AttributionGraph) -> np.ndarray:
    """``w`` [n_node] float64: the logit nodes' probabilities, zero for every other node."""
    weights = np.zeros(graph.n_node)
    weights[graph.n_node - graph.n_logit:] = graph.logit_probabilities
    return weights


def node_influence(adjacency: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Each node's influence on the weighted logits, ``w ((I - N)^-1 - I)`` with ``N`` = normalize_matrix(A).
    [n] float64; the logits' own weight is not included. (circuit-tracer: ``graph.compute_node_influence``.)"""
    return compute_influence(normalize_matrix(adjacency), weights)


def edge_influence(adjacency: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Each edge's influence: ``E[t, s] = N[t, s] * (I_t + w_t)`` with ``N`` = normalize_matrix(A) and ``I`` the
    node influence on ``N``; the target's total influence (a logit's own weight included) shared among its inputs.
    [n, n] float64. (circuit-tracer: ``graph.compute_edge_influence``.)"""
    normalized = normalize_matrix(adjacency)
    target_influence = compute_influence(normalized, weights) + weights
    return normalized * target_influence[:, None]


def find_threshold(scores: np.ndarray, fraction: float) -> float:
    """The smallest score among the top scores that together reach ``fraction`` of the total: scores sorted in
    descending order ``s_1 >= s_2 >= ...``, ``c_k = (s_1 + ... + s_k) / sum(s)``, the threshold is ``s_k`` for the
    first ``k`` with ``c_k >= fraction`` (the last score when none). (circuit-tracer: ``graph.find_threshold``.)"""
    ordered = np.sort(np.asarray(scores, dtype=np.float64).ravel())[::-1]
    cumulative = np.cumsum(ordered) / ordered.sum()
    index = int(np.searchsorted(cumulative, fraction, side="left"))
    return float(ordered[min(index, len(ordered) - 1)])


def cumulative_scores(influence: np.ndarray) -> np.ndarray:
    """Each node's place in the influence ranking: the share of the total influence held by the nodes ranked
    before it and itself (descending order; ties ranked in node order). [n] float64, in (0, 1]."""
    order = np.argsort(-influence, kind="stable")
    ranked = np.empty_like(influence)
    ranked[order] = np.cumsum(influence[order]) / influence.sum()
    return ranked


def _drop_dangling(node_mask: np.ndarray, edge_mask: np.ndarray, sources_end: int, n_feat: int) -> None:
    """In place: drop the features and errors (nodes ``< sources_end``) with no kept outgoing edge, and the
    features (nodes ``< n_feat``) with no kept incoming edge."""
    node_mask[:sources_end] &= edge_mask[:, :sources_end].any(axis=0)
    node_mask[:n_feat] &= edge_mask[:n_feat].any(axis=1)


# what prune_graph gives: node_mask [n] bool, edge_mask [n, n] bool, cumulative_scores [n] float64
Pruned = tuple[np.ndarray, np.ndarray, np.ndarray]


def prune_graph(graph: AttributionGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    """circuit-tracer's pruning (``graph.prune_graph``): ``(node_mask [n] bool, edge_mask [n, n] bool,
    cumulative_scores [n] float64)``, ``edge_mask[t, s]`` for the edge from ``s`` into ``t``.

    1. Nodes: keep the nodes of node influence >= find_threshold(node influence, node_threshold), i.e. the most
       influential nodes that together hold ``node_threshold`` of the total; tokens and logits are always kept.
    2. Edges: zero the rows and columns of the dropped nodes in ``A``, compute the edge influence of that matrix,
       and keep the edges of influence >= find_threshold(all edge influences, edge_threshold).
    3. Drop every feature or error node without a kept outgoing edge, and every feature without a kept incoming
       edge; while that dropped a node: clear the edges of all dropped nodes and drop again. (When the first round
       drops nothing, the edges of the nodes dropped in step 1 stay in the mask: they have zero influence and pass
       only a zero threshold (edge_threshold=1.0 can give one through rounding); the JSON writer keeps only edges
       between kept nodes.)
    ``cumulative_scores`` are those of the unpruned node influence (see :func:`cumulative_scores`); circuit-tracer
    writes them as each node's ``influence`` in its JSON.
    """
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise InputError(f"{name} must be between 0 and 1, not {value}")
    adjacency = np.asarray(graph.adjacency, dtype=np.float64)
    n_node = graph.n_node
    if adjacency.shape != (n_node, n_node):
        raise InputError(f"the adjacency is {adjacency.shape}, the graph has {n_node} nodes")
    weights = logit_weights(graph)
    sources_end = graph.n_feat + graph.n_layer * graph.n_pos  # features and errors: [0, sources_end)

    influence = node_influence(adjacency, weights)
    if not influence.any():
        raise InputError("no node has any influence on the logits: the logit nodes have no inputs")
    node_mask = influence >= find_threshold(influence, node_threshold)
    node_mask[sources_end:] = True

    pruned = adjacency.copy()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    edge_scores = edge_influence(pruned, weights)
    edge_mask = edge_scores >= find_threshold(edge_scores, edge_threshold)

    before = node_mask.copy()
    _drop_dangling(node_mask, edge_mask, sources_end, graph.n_feat)
    while not np.array_equal(before, node_mask):
        before = node_mask.copy()
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        _drop_dangling(node_mask, edge_mask, sources_end, graph.n_feat)
    return node_mask, edge_mask, cumulative_scores(influence)


def graph_scores(graph: AttributionGraph) -> tuple[float, float]:
    """circuit-tracer's ``graph.compute_graph_scores``: ``(replacement_score, completeness_score)`` of the unpruned
    graph, with ``I`` = node_influence(A, w) and ``N`` = normalize_matrix(A).

    replacement  = sum_tokens I / (sum_tokens I + sum_errors I): the share of the end-to-end influence that
                   starts at the tokens rather than at the error nodes.
    completeness = sum_t f_t (I_t + w_t) / sum_t (I_t + w_t), with ``f_t = 1 - sum_{s error} N[t, s]`` the share
                   of node t's absolute input that does not come from error nodes (1 for the nodes without
                   inputs: tokens and errors).
    """
    adjacency = np.asarray(graph.adjacency, dtype=np.float64)
    errors = slice(graph.n_feat, graph.n_feat + graph.n_layer * graph.n_pos)
    tokens = slice(errors.stop, errors.stop + graph.n_pos)
    weights = logit_weights(graph)
    normalized = normalize_matrix(adjacency)
    influence = compute_influence(normalized, weights)
    token_influence, error_influence = influence[tokens].sum(), influence[errors].sum()
    replacement = token_influence / (token_influence + error_influence)
    non_error = 1.0 - normalized[:, errors].sum(axis=1)
    output_influence = influence + weights
    completeness = (non_error * output_influence).sum() / output_influence.sum()
    return float(replacement), float(completeness)
