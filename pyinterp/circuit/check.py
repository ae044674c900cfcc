"""Validation of an attribution graph by perturbation: scale a feature's activation and compare how the target
logit moves with what the graph predicts, in two models, both quantized with attention and norms live:

- the real model: the feature's decoder rows times the change added into the MLP outputs it writes, the real MLPs
  downstream;
- the replacement model (circuit-tracer's intervention model): every MLP replaced by its transcoder inside the
  graph (:func:`pyinterp.circuit.replace.run_replaced`, error dropped) plus the prompt's error terms, frozen; the
  change added as above, so later features respond to it.

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
from pyinterp.circuit.replace import CLT_MAX_LAYERS, run_replaced
from pyinterp.interventions import AddVector
from pyinterp.interventions.base import Op, Target

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
    replaced: float | None  # in the replacement model (None: its transcoders do not fit in the graph)


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


@dataclass(frozen=True)
class AddRows:
    """``rows`` ``[n_tokens, width]`` added to ``name-layer``, row p at position p."""

    name: str
    layer: int
    rows: np.ndarray

    def ops(self, target: Target) -> list[Op]:
        return [Op("add", self.name, self.layer, seq=target.seq, data=self.rows, per_row=True)]


def check_features(model: ModelLike, graph: AttributionGraph, transcoders: TranscoderSet, nodes: list[int],
                   factor: float = 0.0, logit: int = 0) -> list[FeatureCheck]:
    """Scale each feature node in ``nodes`` by ``factor`` (0: ablate) in the real model and in the replacement
    model, one pass each, and compare the change of logit node ``logit`` (the target's logit less the mean logit)
    with the graph's predictions."""
    if any(not 0 <= i < graph.n_feat for i in nodes):
        raise InputError(f"check: feature nodes are 0..{graph.n_feat - 1}")
    ids = [int(t) for t in graph.input_tokens]
    target = int(graph.logit_tokens[logit])
    arch = arch_of(model.arch)
    out_name = transcoders.output_tensor(arch.ffn_term)
    replaceable = not transcoders.cross_layer or transcoders.n_layer <= CLT_MAX_LAYERS

    def logit_of(logits: np.ndarray) -> float:
        return float(logits[target]) - float(np.mean(logits, dtype=np.float64))

    def replaced_run(adds: list) -> float:
        with model.engine.pushed(*errors, *adds):
            return logit_of(run_replaced(model, ids, transcoders, keep_error=False, top_k=1).logits[-1])

    plain = model.run(ids, capture=["ffn_norm", out_name])
    base = logit_of(plain.logits[-1])
    if replaceable:
        inputs = [plain["ffn_norm", l] for l in range(graph.n_layer)]
        y = transcoders.reconstruct([tc.encode(x) for tc, x in zip(transcoders.layers, inputs)], inputs)
        # the prompt's error terms, added after each layer (the transcoder's output replaces the MLP's first)
        errors = [AddRows(arch.residual, l, plain[out_name, l] - y[l]) for l in range(graph.n_layer)]
        replaced_base = replaced_run([])
    direct, predicted = predicted_changes(graph, nodes, factor, logit)
    checks = []
    for k, node in enumerate(nodes):
        layer, pos, feat = (int(v) for v in graph.features[node])
        a = float(graph.activations[node])
        tc = transcoders.layers[layer]
        rows = [(m, (factor - 1.0) * a * tc.decoder(m)[feat]) for m in range(layer, layer + tc.n_out)]
        real = logit_of(model.engine.run(ids, [AddVector(out_name, m, v, positions=(pos,)) for m, v in rows],
                                         logits="last").logits[-1]) - base
        replaced = replaced_run([AddVector(arch.residual, m, v, positions=(pos,)) for m, v in rows]) - replaced_base \
            if replaceable else None
        checks.append(FeatureCheck(node, (layer, pos, feat), a, float(direct[k]), float(predicted[k]), real, replaced))
    return checks
