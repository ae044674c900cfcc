"""Validation of an attribution graph by perturbation: scale a feature's activation in the real model (quantized,
attention and norms live, real MLPs downstream: the feature's decoder rows added into the MLP outputs it writes)
and compare how the target logit moves with what the graph predicts.

The graph predicts two numbers for a change ``delta = (factor - 1) * a_f`` of feature ``f``'s activation:

- direct: ``delta / a_f * A[t, f]``, the edge from ``f`` into the logit;
- through the graph: features respond linearly (an active feature's activation follows its pre-activation, the
  error and token nodes stay as they are), ``d = (I - M)^-1 e_f delta`` over the feature nodes with
  ``M[j, i] = A[j, i] / a_i``, and the logit moves by ``sum_i A[t, i] / a_i * d_i``.

The logit is the graph's: the target's logit less the mean logit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pyinterp.circuit.graph import AttributionGraph
from pyinterp.circuit.transcoder import TranscoderSet
from pyinterp.engine.arch import arch_of
from pyinterp.errors import InputError
from pyinterp.interventions import AddVector

if TYPE_CHECKING:
    from pyinterp.engine.core import ModelLike


@dataclass
class FeatureCheck:
    """One perturbed feature: graph node, (layer, position, feature), and the logit's change three ways."""

    node: int
    feature: tuple[int, int, int]
    activation: float
    direct: float        # the graph's direct edge, scaled to the change
    predicted: float     # through the graph's features
    real: float          # in the real model


def predicted_changes(graph: AttributionGraph, nodes: list[int], factor: float, logit: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The graph's direct and through-the-graph change of logit node ``logit``'s input when each feature node in
    ``nodes`` has its activation times ``factor`` (see the module docstring): two ``[len(nodes)]`` arrays."""
    n = graph.n_feat
    a = graph.activations.astype(np.float64)
    M = graph.adjacency[:n, :n].astype(np.float64) / a[None, :]
    to_logit = graph.adjacency[graph.logit_node(logit), :n].astype(np.float64) / a
    # (I - M)^-1 as a series: M only links a layer's features to later layers' (nilpotent of degree <= n_layer)
    term = np.eye(n)[:, nodes]                                         # [n, len(nodes)] per unit activation
    total = term.copy()
    for _ in range(graph.n_layer):
        term = M @ term
        total += term
    delta = (factor - 1.0) * a[nodes]
    return to_logit[nodes] * delta, (to_logit @ total) * delta


def check_features(model: ModelLike, graph: AttributionGraph, transcoders: TranscoderSet, nodes: list[int],
                   factor: float = 0.0, logit: int = 0) -> list[FeatureCheck]:
    """Scale each feature node in ``nodes`` by ``factor`` (0: ablate) in the real model, one pass each, and compare
    the change of logit node ``logit`` (the target's logit less the mean logit) with the graph's predictions."""
    if any(not 0 <= i < graph.n_feat for i in nodes):
        raise InputError(f"check: feature nodes are 0..{graph.n_feat - 1}")
    ids = [int(t) for t in graph.input_tokens]
    target = int(graph.logit_tokens[logit])
    out_name = transcoders.output_tensor(arch_of(model.arch).ffn_term)

    def logit_of(logits: np.ndarray) -> float:
        return float(logits[target]) - float(np.mean(logits, dtype=np.float64))

    base = logit_of(model.engine.run(ids, logits="last").logits[-1])
    direct, predicted = predicted_changes(graph, nodes, factor, logit)
    checks = []
    for k, node in enumerate(nodes):
        layer, pos, feat = (int(v) for v in graph.features[node])
        a = float(graph.activations[node])
        tc = transcoders.layers[layer]
        adds = [AddVector(out_name, m, (factor - 1.0) * a * tc.decoder(m)[feat], positions=(pos,))
                for m in range(layer, layer + tc.n_out)]
        real = logit_of(model.engine.run(ids, adds, logits="last").logits[-1]) - base
        checks.append(FeatureCheck(node, (layer, pos, feat), a, float(direct[k]), float(predicted[k]), real))
    return checks
