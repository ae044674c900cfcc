"""circuit-tracer's graph JSON of a pruned attribution graph: the file its local viewer and Neuronpedia load.

The schema is circuit-tracer 0.5.0's (``circuit_tracer/frontend/graph_models.py``: ``Metadata``, ``QParams``,
``Node``, ``Model``; written by ``circuit_tracer/utils/create_graph_files.py``)::

    {"metadata": {"slug", "scan", "transcoder_list": [], "prompt_tokens": [str], "prompt", "node_threshold",
                  "schema_version": 1},
     "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
     "nodes": [{"node_id", "feature", "layer", "ctx_idx", "feature_type", "token_prob", "is_target_logit",
                "run_idx": 0, "reverse_ctx_idx": 0, "jsNodeId", "clerp", "influence", "activation"}],
     "links": [{"source": node_id, "target": node_id, "weight"}]}

Nodes (kept by :func:`pyinterp.circuit.prune.prune_graph`, in graph order):
  feature  node_id ``"{layer}_{feature}_{pos}"``, feature = Cantor pairing of (layer, feature), layer ``"{layer}"``,
           feature_type ``"cross layer transcoder"`` (circuit-tracer's name for every transcoder feature),
           jsNodeId ``"{layer}_{feature}-0"``, activation
  error    node_id ``"{layer}_-1_{pos}"``, feature -1, feature_type ``"mlp reconstruction error"``, jsNodeId
           ``"{layer}_{pos}-0"``. (circuit-tracer 0.5.0 writes ``"0_{layer}_{pos}"``, which collides with the
           layer-0 feature whose id equals ``layer``; its upstream fix, decoderesearch/circuit-tracer#102, uses
           this form.)
  token    node_id ``"E_{token id}_{pos}"``, feature = pos, layer ``"E"``, feature_type ``"embedding"``, jsNodeId
           ``"E_{token id}-{pos}"``
  logit    node_id ``"{n_layer + 1}_{token id}_{last pos}"``, feature = token id, layer ``"{n_layer + 1}"``,
           ctx_idx = the last position, feature_type ``"logit"``, token_prob, is_target_logit for the first (most
           probable) logit, jsNodeId ``"L_{token id}-{last pos}"``, clerp ``'Output "{token}" (p={p:.3f})'``
``influence`` is the node's cumulative influence score (the viewer hides nodes above its pruning threshold by it;
null for logits), ``activation`` null except for features. Links: every kept edge between two kept nodes, weight
``adjacency[target, source]``, in (target, source) order; nodes without any link are left out except tokens and
logits, as circuit-tracer does. One difference: pairs of nodes without an edge (weight 0) are never links, while
circuit-tracer writes them when the edge threshold comes out 0 (its edge mask then holds every pair).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from pyinterp.circuit.graph import AttributionGraph
from pyinterp.circuit.prune import Pruned, prune_graph
from pyinterp.errors import InputError
from pyinterp.io.atomic import atomic_write

FEATURE, ERROR, EMBEDDING, LOGIT = "cross layer transcoder", "mlp reconstruction error", "embedding", "logit"


def cantor_pairing(x: int, y: int) -> int:
    """The integer ``(x + y)(x + y + 1) / 2 + y``, unique for each pair of non-negative integers."""
    return (x + y) * (x + y + 1) // 2 + y


def _node(node_id: str, feature: int, layer: str, ctx_idx: int, feature_type: str, js_node_id: str,
          influence: float | None, activation: float | None = None, token_prob: float = 0.0,
          is_target_logit: bool = False, clerp: str = "") -> dict:
    """One node dict, its keys in circuit-tracer's order."""
    return {"node_id": node_id, "feature": feature, "layer": layer, "ctx_idx": ctx_idx, "feature_type": feature_type,
            "token_prob": token_prob, "is_target_logit": is_target_logit, "run_idx": 0, "reverse_ctx_idx": 0,
            "jsNodeId": js_node_id, "clerp": clerp, "influence": influence, "activation": activation}


def graph_node(graph: AttributionGraph, index: int, influence: float) -> dict:
    """The JSON node of node ``index`` of ``graph`` (see the module docstring), ``influence`` its cumulative score."""
    errors_end = graph.n_feat + graph.n_layer * graph.n_pos
    if index < graph.n_feat:
        layer, pos, feature = (int(v) for v in graph.features[index])
        return _node(f"{layer}_{feature}_{pos}", cantor_pairing(layer, feature), str(layer), pos, FEATURE,
                     f"{layer}_{feature}-0", influence, float(graph.activations[index]))
    if index < errors_end:
        layer, pos = divmod(index - graph.n_feat, graph.n_pos)
        return _node(f"{layer}_-1_{pos}", -1, str(layer), pos, ERROR, f"{layer}_{pos}-0", influence)
    if index < errors_end + graph.n_pos:
        pos = index - errors_end
        token = int(graph.input_tokens[pos])
        return _node(f"E_{token}_{pos}", pos, "E", pos, EMBEDDING, f"E_{token}-{pos}", influence)
    i = index - (errors_end + graph.n_pos)
    token, probability, layer, pos = int(graph.logit_tokens[i]), float(graph.logit_probabilities[i]), \
        str(graph.n_layer + 1), graph.n_pos - 1
    return _node(f"{layer}_{token}_{pos}", token, layer, pos, LOGIT, f"L_{token}-{pos}", None,
                 token_prob=probability, is_target_logit=i == 0,
                 clerp=f'Output "{graph.logit_strings[i]}" (p={probability:.3f})')


def nodes_and_links(graph: AttributionGraph, node_mask: np.ndarray, edge_mask: np.ndarray,
                    cumulative: np.ndarray) -> tuple[list[dict], list[dict], list[int]]:
    """The JSON nodes and links of a pruned graph, and each JSON node's index in ``graph`` (see the module
    docstring for which nodes and edges are written)."""
    kept = {int(i): graph_node(graph, int(i), float(cumulative[i])) for i in np.flatnonzero(node_mask)}
    targets, sources = np.nonzero(edge_mask)
    links, linked = [], set()
    for target, source in zip(targets.tolist(), sources.tolist()):
        if target in kept and source in kept and graph.adjacency[target, source] != 0:
            links.append({"source": kept[source]["node_id"], "target": kept[target]["node_id"],
                          "weight": float(graph.adjacency[target, source])})
            linked.update((source, target))
    order = [i for i, node in kept.items() if i in linked or node["feature_type"] in (EMBEDDING, LOGIT)]
    return [kept[i] for i in order], links, order


def graph_json(graph: AttributionGraph, slug: str, scan: str | None = None, node_threshold: float = 0.8,
               edge_threshold: float = 0.98, pruned: Pruned | None = None) -> dict:
    """circuit-tracer's graph JSON (a dict) of ``graph`` pruned at the thresholds (``pruned``: what
    :func:`prune_graph` gave for them, when the caller has it already); ``scan`` names the transcoders (default:
    ``graph.transcoders``)."""
    if not slug or any(c in slug for c in "/\\") or slug in (".", ".."):
        raise InputError(f"bad graph slug {slug!r}: it names a file, without slashes")
    node_mask, edge_mask, cumulative = pruned if pruned is not None else prune_graph(graph, node_threshold,
                                                                                     edge_threshold)
    nodes, links, _ = nodes_and_links(graph, node_mask, edge_mask, cumulative)
    metadata = {"slug": slug, "scan": scan if scan is not None else (graph.transcoders or "pyinterp"),
                "transcoder_list": [], "prompt_tokens": list(graph.input_strings), "prompt": graph.prompt,
                "node_threshold": node_threshold, "schema_version": 1}
    q_params = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": q_params, "nodes": nodes, "links": links}


def _dumps(value: dict) -> str:
    try:
        return json.dumps(value, indent=2, ensure_ascii=False, allow_nan=False)
    except ValueError:
        raise InputError("the graph holds a NaN or infinite value: it cannot be written as JSON") from None


def write_graph_files(graph: AttributionGraph, slug: str, output_dir: str | os.PathLike, scan: str | None = None,
                      node_threshold: float = 0.8, edge_threshold: float = 0.98, pruned: Pruned | None = None) -> Path:
    """As circuit-tracer's ``create_graph_files``: write ``{slug}.json`` into ``output_dir`` (created if needed)
    and add its metadata to ``output_dir/graph-metadata.json`` (``{"graphs": [metadata, ...]}``, replacing an
    entry of the same slug), the index circuit-tracer's local server lists; ``pruned`` as :func:`graph_json`
    takes it. Returns the graph file's path."""
    data = graph_json(graph, slug, scan, node_threshold, edge_threshold, pruned)
    directory = Path(output_dir)
    if directory.exists() and not directory.is_dir():
        raise InputError(f"cannot write the graph files into {directory}: it is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{slug}.json"
    text = _dumps(data)
    index_path = directory / "graph-metadata.json"
    index = {"graphs": []}
    if index_path.exists():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            graphs = [g for g in index["graphs"] if g.get("slug") != slug]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise InputError(f"{index_path} is not a graph-metadata.json file ({{\"graphs\": [...]}})") from None
        index["graphs"] = graphs
    index["graphs"].append(data["metadata"])
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)
    with atomic_write(index_path, "w", encoding="utf-8") as f:
        f.write(_dumps(index))
    return path


def check_graph_json(data: dict) -> None:
    """Raise InputError unless ``data`` has the structure circuit-tracer's viewer loads: the four sections, every
    node with its fields of the right types, node ids unique, every link between two nodes with a finite weight."""
    if not isinstance(data, dict) or set(data) != {"metadata", "qParams", "nodes", "links"}:
        raise InputError("a graph JSON holds exactly metadata, qParams, nodes and links")
    types = {"node_id": str, "feature": int, "layer": str, "ctx_idx": int, "feature_type": str,
             "token_prob": float, "is_target_logit": bool, "run_idx": int, "reverse_ctx_idx": int, "jsNodeId": str,
             "clerp": str, "influence": (float, type(None)), "activation": (float, type(None))}
    meta = data["metadata"]
    if not all(isinstance(meta.get(k), str) for k in ("slug", "scan", "prompt")) or \
            not all(isinstance(t, str) for t in meta.get("prompt_tokens", [None])):
        raise InputError("the graph JSON's metadata lacks slug, scan, prompt or prompt_tokens")
    ids = set()
    for node in data["nodes"]:
        if list(node) != list(types):
            raise InputError(f"graph JSON node {node.get('node_id')!r} has the fields {list(node)}")
        for key, kind in types.items():
            if not isinstance(node[key], kind) or (kind is int and isinstance(node[key], bool)):
                raise InputError(f"graph JSON node {node['node_id']!r}: {key} is {node[key]!r}")
        if node["node_id"] in ids:
            raise InputError(f"graph JSON node id {node['node_id']!r} is not unique")
        if not 0 <= node["ctx_idx"] < len(meta["prompt_tokens"]):
            raise InputError(f"graph JSON node {node['node_id']!r}: ctx_idx out of the prompt")
        ids.add(node["node_id"])
    for link in data["links"]:
        if list(link) != ["source", "target", "weight"] or link["source"] not in ids or link["target"] not in ids \
                or not isinstance(link["weight"], float) or not math.isfinite(link["weight"]):
            raise InputError(f"graph JSON link {link} does not join two nodes with a finite weight")
