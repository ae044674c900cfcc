"""circuit-tracer's graph JSON of the pruned graph (pyinterp.circuit.export): the schema its viewer loads, our
values read back, a hand-checked small graph, and circuit-tracer's own writer on the same graph (its package,
``pip install --no-deps circuit-tracer==0.5.0``, is part of the test install)."""

from __future__ import annotations

import importlib
import json
import re

import numpy as np
import pytest

from circuit_graphs import random_graph
from pyinterp.circuit.export import (cantor_pairing, check_graph_json, graph_json, nodes_and_links,
                                     write_graph_files)
from pyinterp.circuit.prune import prune_graph
from pyinterp.errors import InputError
from test_circuit_prune import CHAIN, LOGIT, TOK, F, as_circuit_tracer, chain


def test_chain_json_by_hand():
    data = graph_json(chain(), "chain", scan="tc")
    check_graph_json(data)
    assert data["metadata"] == {"slug": "chain", "scan": "tc", "transcoder_list": [], "prompt_tokens": ["x"],
                                "prompt": "", "node_threshold": 0.8, "schema_version": 1}
    assert data["qParams"] == {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "",
                               "sg_pos": ""}
    # kept: feature (layer 0, feature 10), token 7, the logit (token 0, two layers -> layer "3"); errors dropped
    feature, token, logit = data["nodes"]
    assert feature == {"node_id": "0_10_0", "feature": cantor_pairing(0, 10), "layer": "0", "ctx_idx": 0,
                       "feature_type": "cross layer transcoder", "token_prob": 0.0, "is_target_logit": False,
                       "run_idx": 0, "reverse_ctx_idx": 0, "jsNodeId": "0_10-0", "clerp": "",
                       "influence": pytest.approx(0.8125), "activation": 1.0}
    assert cantor_pairing(0, 10) == 65 and cantor_pairing(3, 5) == 41
    assert (token["node_id"], token["layer"], token["feature"], token["feature_type"], token["jsNodeId"],
            token["activation"]) == ("E_7_0", "E", 0, "embedding", "E_7-0", None)
    assert token["influence"] == pytest.approx(0.4375)
    assert (logit["node_id"], logit["layer"], logit["feature"], logit["ctx_idx"], logit["jsNodeId"],
            logit["influence"], logit["is_target_logit"], logit["clerp"]) == \
        ("3_0_0", "3", 0, 0, "L_0-0", None, True, 'Output "y" (p=0.800)')
    assert logit["token_prob"] == pytest.approx(0.8)
    assert [(link["source"], link["target"], link["weight"]) for link in data["links"]] == \
        [("E_7_0", "0_10_0", 4.0), ("0_10_0", "3_0_0", 3.0), ("E_7_0", "3_0_0", 0.5)]
    # with every node and edge kept, the error nodes appear with their own ids
    data = graph_json(chain(), "chain", node_threshold=1.0, edge_threshold=1.0)
    errors = [n for n in data["nodes"] if n["feature_type"] == "mlp reconstruction error"]
    assert [(n["node_id"], n["jsNodeId"], n["feature"]) for n in errors] == [("0_-1_0", "0_0-0", -1),
                                                                              ("1_-1_0", "1_0-0", -1)]
    assert len(data["links"]) == len(CHAIN)
    # an edge mask of every pair (circuit-tracer's at a zero edge threshold) with the errors dropped: only the
    # real edges between kept nodes are links
    node_mask = np.array([True, False, False, True, True])
    _, links, order = nodes_and_links(chain(), node_mask, np.ones((5, 5), bool), np.ones(5))
    assert order == [F, TOK, LOGIT]
    assert [(link["source"], link["target"]) for link in links] == \
        [("E_7_0", "0_10_0"), ("0_10_0", "3_0_0"), ("E_7_0", "3_0_0")]


def test_random_graph_file_round_trips(tmp_path):
    graph = random_graph(n_pos=8, n_layer=6, features_per_site=3, density=0.3, n_logit=4, seed=1)
    path = write_graph_files(graph, "random-1", tmp_path / "graphs", node_threshold=0.7, edge_threshold=0.95)
    data = json.loads(path.read_text(encoding="utf-8"))
    check_graph_json(data)
    assert data["metadata"]["prompt_tokens"] == graph.input_strings and data["metadata"]["prompt"] == graph.prompt
    node_mask, edge_mask, cumulative = prune_graph(graph, 0.7, 0.95)
    index = {}
    for i in np.flatnonzero(node_mask):
        if i < graph.n_feat:
            layer, pos, feature = graph.features[i]
            index[f"{layer}_{feature}_{pos}"] = i
        elif i < graph.n_feat + graph.n_layer * graph.n_pos:
            layer, pos = divmod(i - graph.n_feat, graph.n_pos)
            index[f"{layer}_-1_{pos}"] = i
        elif i < graph.n_feat + (graph.n_layer + 1) * graph.n_pos:
            pos = i - graph.n_feat - graph.n_layer * graph.n_pos
            index[f"E_{graph.input_tokens[pos]}_{pos}"] = i
        else:
            index[f"{graph.n_layer + 1}_{graph.logit_tokens[i - graph.n_node + graph.n_logit]}_{graph.n_pos - 1}"] = i
    by_id = {node["node_id"]: node for node in data["nodes"]}
    assert set(by_id) <= set(index)
    for node_id, node in by_id.items():
        i = index[node_id]
        if node["feature_type"] == "logit":
            assert node["token_prob"] == float(graph.logit_probabilities[i - graph.n_node + graph.n_logit])
        else:
            assert node["influence"] == float(cumulative[i])
        if i < graph.n_feat:
            assert node["activation"] == float(graph.activations[i])
    # every kept edge between written nodes, with its adjacency weight; tokens and logits always written
    want = {(index_id, jd) for index_id in by_id for jd in by_id if edge_mask[index[jd], index[index_id]]}
    assert {(link["source"], link["target"]) for link in data["links"]} == want and len(want) == len(data["links"])
    for link in data["links"]:
        assert link["weight"] == float(graph.adjacency[index[link["target"]], index[link["source"]]])
    assert sum(n["feature_type"] == "embedding" for n in data["nodes"]) == graph.n_pos
    assert sum(n["feature_type"] == "logit" for n in data["nodes"]) == graph.n_logit
    assert 0 < sum(n["feature_type"] == "cross layer transcoder" for n in data["nodes"]) < graph.n_feat
    # the index lists the graph once, a second graph next to it
    write_graph_files(graph, "random-1", tmp_path / "graphs")
    write_graph_files(graph, "other", tmp_path / "graphs")
    index_file = json.loads((tmp_path / "graphs" / "graph-metadata.json").read_text(encoding="utf-8"))
    assert [g["slug"] for g in index_file["graphs"]] == ["random-1", "other"]
    assert index_file["graphs"][0]["node_threshold"] == 0.8


def test_check_graph_json_rejects_broken_files():
    good = graph_json(random_graph(seed=2), "g")
    check_graph_json(good)
    broken = json.loads(json.dumps(good))
    broken["nodes"].append(dict(broken["nodes"][0]))
    with pytest.raises(InputError, match="not unique"):
        check_graph_json(broken)
    broken = json.loads(json.dumps(good))
    broken["links"][0]["target"] = "nowhere"
    with pytest.raises(InputError, match="two nodes"):
        check_graph_json(broken)
    broken = json.loads(json.dumps(good))
    broken["nodes"][0]["layer"] = 3
    with pytest.raises(InputError, match="layer"):
        check_graph_json(broken)


def test_bad_slug_and_output_dir(tmp_path):
    with pytest.raises(InputError, match="slug"):
        graph_json(chain(), "a/b")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        write_graph_files(chain(), "g", tmp_path / "file")
    (tmp_path / "graph-metadata.json").write_text("[1]")
    with pytest.raises(InputError, match="graph-metadata"):
        write_graph_files(chain(), "g", tmp_path)
    graph = chain()
    graph.activations[0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        write_graph_files(graph, "g", tmp_path / "new")


@pytest.mark.parametrize("seed", range(3))
def test_matches_circuit_tracers_writer(seed):
    from circuit_tracer.graph import prune_graph as ct_prune_graph  # the test install's (--no-deps)
    ct_files = importlib.import_module("circuit_tracer.utils.create_graph_files")
    graph = random_graph(n_pos=6, n_layer=4, features_per_site=3, density=0.4, n_logit=3, seed=seed)
    theirs = as_circuit_tracer(graph)
    node_mask, edge_mask, cumulative = ct_prune_graph(theirs, 0.8, 0.98)

    class Tokenizer:
        def decode(self, token):
            return graph.input_strings[list(graph.input_tokens).index(int(token))]

    nodes = ct_files.create_nodes(theirs, node_mask, Tokenizer(), cumulative)
    used_nodes, used_edges = ct_files.create_used_nodes_and_edges(theirs, nodes, edge_mask)
    model = ct_files.build_model(theirs, used_nodes, used_edges, "s", "tc", 0.8, Tokenizer())
    want = json.loads(model.model_dump_json(indent=2))
    fixed = re.compile(r"^0_(\d+)_(\d+)$")   # 0.5.0's error ids "0_{layer}_{pos}" -> "{layer}_-1_{pos}"
    error_ids = {n["node_id"]: fixed.sub(r"\1_-1_\2", n["node_id"]) for n in want["nodes"]
                 if n["feature_type"] == "mlp reconstruction error"}
    for node in want["nodes"]:
        node["node_id"] = error_ids.get(node["node_id"], node["node_id"])
    for link in want["links"]:
        link["source"], link["target"] = (error_ids.get(link[k], link[k]) for k in ("source", "target"))
    got = graph_json(graph, "s", scan="tc")
    assert got["metadata"] == want["metadata"] and got["qParams"] == want["qParams"]
    assert [n["node_id"] for n in got["nodes"]] == [n["node_id"] for n in want["nodes"]]
    for mine, reference in zip(got["nodes"], want["nodes"]):
        assert list(mine) == list(reference)
        for key, value in reference.items():
            if isinstance(value, float):
                assert mine[key] == pytest.approx(value, rel=1e-5), (mine["node_id"], key)
            else:
                assert mine[key] == value, (mine["node_id"], key)
    assert got["links"] == want["links"]
