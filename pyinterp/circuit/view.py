"""pyinterp's own view of a pruned attribution graph: one self-contained HTML file (no network).

The page (the template ``view.html`` next to this module: HTML, CSS and vanilla JavaScript drawing SVG) places the
nodes that circuit-tracer's JSON writer keeps (:func:`pyinterp.circuit.export.nodes_and_links`) in a grid: one
column per prompt position, labelled with its token, one row per layer, the token embeddings at the bottom and the
logits at the top. Edges are drawn with width and opacity by ``|weight|`` (relative to the largest drawn edge),
blue for positive and red for negative weights. Hovering a node shows its kind, layer, position, feature id,
activation, influence, and for features their top logits when the graph carries them:
``graph.info[TOP_LOGITS_KEY][i]`` = ``[(token string, value), ...]`` for feature ``i`` (the graph's feature
order). Clicking a node highlights its edges and the nodes they join; clicking the background clears it.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from pyinterp.circuit.export import nodes_and_links
from pyinterp.circuit.graph import AttributionGraph
from pyinterp.circuit.prune import Pruned, graph_scores, logit_weights, node_influence, prune_graph
from pyinterp.errors import InputError
from pyinterp.io.atomic import atomic_write
from pyinterp.viz.dashboard import embed_json

TOP_LOGITS_KEY = "feature_top_logits"
_PLACEHOLDER = "__PYINTERP_GRAPH__"


def _top_logits(graph: AttributionGraph) -> list | None:
    """``graph.info[TOP_LOGITS_KEY]`` checked: one list of (token, value) pairs per feature, or None."""
    top = graph.info.get(TOP_LOGITS_KEY)
    if top is None:
        return None
    if len(top) != graph.n_feat:
        raise InputError(f"graph.info[{TOP_LOGITS_KEY!r}] has {len(top)} entries for {graph.n_feat} features")
    for entry in top:
        if not all(len(pair) == 2 and isinstance(pair[0], str) for pair in entry):
            raise InputError(f"graph.info[{TOP_LOGITS_KEY!r}] entries are lists of (token string, value) pairs")
    return [[[token, float(value)] for token, value in entry] for entry in top]


def _view_node(graph: AttributionGraph, index: int, influence: float, cumulative: float, top: list | None) -> dict:
    """The page's record of graph node ``index``: kind, row (layer; -1 the embeddings, n_layer the logits),
    position, label and the hover details."""
    errors_end = graph.n_feat + graph.n_layer * graph.n_pos
    node = {"influence": influence, "cumulative": cumulative}
    if index < graph.n_feat:
        layer, pos, feature = (int(v) for v in graph.features[index])
        node.update(kind="feature", layer=layer, pos=pos, feature=feature, label=f"L{layer} #{feature}",
                    activation=float(graph.activations[index]))
        if top is not None:
            node["top_logits"] = top[index]
    elif index < errors_end:
        layer, pos = divmod(index - graph.n_feat, graph.n_pos)
        node.update(kind="error", layer=layer, pos=pos, label=f"error L{layer}")
    elif index < errors_end + graph.n_pos:
        pos = index - errors_end
        node.update(kind="token", layer=-1, pos=pos, label=graph.input_strings[pos],
                    token_id=int(graph.input_tokens[pos]))
    else:
        i = index - errors_end - graph.n_pos
        node.update(kind="logit", layer=graph.n_layer, pos=graph.n_pos - 1, label=graph.logit_strings[i],
                    token_id=int(graph.logit_tokens[i]), probability=float(graph.logit_probabilities[i]))
    return node


def view_data(graph: AttributionGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98,
              pruned: Pruned | None = None) -> dict:
    """The data the page draws: the graph pruned at the thresholds (the nodes and links of its circuit-tracer
    JSON; ``pruned``: what :func:`prune_graph` gave for them, when the caller has it already), each node's influence
    (share of the probability-weighted logits through it) and cumulative score, the links as ``[source, target,
    weight]`` with indices into ``nodes``, and the unpruned graph's scores."""
    node_mask, edge_mask, cumulative = pruned if pruned is not None else prune_graph(graph, node_threshold,
                                                                                     edge_threshold)
    json_nodes, json_links, order = nodes_and_links(graph, node_mask, edge_mask, cumulative)
    influence = node_influence(graph.adjacency, logit_weights(graph))
    top = _top_logits(graph)
    nodes = [_view_node(graph, i, float(influence[i]), float(cumulative[i]), top) for i in order]
    for node, json_node in zip(nodes, json_nodes):
        node["id"] = json_node["node_id"]
    where = {node["id"]: k for k, node in enumerate(nodes)}
    links = [[where[link["source"]], where[link["target"]], link["weight"]] for link in json_links]
    replacement, completeness = graph_scores(graph)
    return {"prompt": graph.prompt, "tokens": list(graph.input_strings), "n_layer": graph.n_layer,
            "model": graph.model, "transcoders": graph.transcoders, "node_threshold": node_threshold,
            "edge_threshold": edge_threshold, "replacement_score": replacement, "completeness_score": completeness,
            "n_feat_total": graph.n_feat, "nodes": nodes, "links": links}


def render_view(graph: AttributionGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98,
                pruned: Pruned | None = None) -> str:
    """The HTML page of ``graph`` pruned at the thresholds (see the module docstring; ``pruned`` as
    :func:`view_data` takes it)."""
    data = view_data(graph, node_threshold, edge_threshold, pruned)
    template = resources.files("pyinterp.circuit").joinpath("view.html").read_text(encoding="utf-8")
    before, placeholder, after = template.partition(_PLACEHOLDER)
    assert placeholder, "view.html has lost its data placeholder"
    return before + embed_json(data) + after


def write_view(graph: AttributionGraph, path: str | os.PathLike, node_threshold: float = 0.8,
               edge_threshold: float = 0.98, pruned: Pruned | None = None) -> None:
    """Write the view of ``graph`` to ``path``: one self-contained HTML file, written whole or not at all
    (``pruned`` as :func:`view_data` takes it)."""
    html = render_view(graph, node_threshold, edge_threshold, pruned)
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(f"cannot write the graph view to {path}: {path.parent} is not a directory")
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(html)

