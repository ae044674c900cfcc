"""pyinterp's HTML view of a pruned attribution graph (pyinterp.circuit.view), loaded in real headless chromium
(the helpers of tests/test_dashboard.py): it renders without errors, draws exactly the pruned graph's nodes and
edges, shows a node's details on hover and highlights its edges on click."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from circuit_graphs import random_graph
from pyinterp.circuit.export import graph_json
from pyinterp.circuit.view import TOP_LOGITS_KEY, render_view, view_data, write_view
from pyinterp.errors import InputError
from test_dashboard import Browser, load, needs_chromium

COUNT = "[document.querySelectorAll('svg .node').length, document.querySelectorAll('svg path.edge').length]"


def test_view_data_is_the_pruned_graph():
    graph = random_graph(n_pos=8, n_layer=5, features_per_site=3, density=0.3, seed=4, top_logits=True)
    data = view_data(graph)
    want = graph_json(graph, "g")
    assert [n["id"] for n in data["nodes"]] == [n["node_id"] for n in want["nodes"]]
    ids = [n["id"] for n in data["nodes"]]
    assert [[ids[s], ids[t], w] for s, t, w in data["links"]] == \
        [[link["source"], link["target"], link["weight"]] for link in want["links"]]
    features = {f"{layer}_{f}_{pos}": i for i, (layer, pos, f) in enumerate(graph.features.tolist())}
    for node in data["nodes"]:
        if node["kind"] == "feature":
            i = features[node["id"]]
            assert node["top_logits"] == [[t, v] for t, v in graph.info[TOP_LOGITS_KEY][i]]
            assert node["activation"] == float(graph.activations[i])
    graph.info[TOP_LOGITS_KEY] = graph.info[TOP_LOGITS_KEY][:-1]
    with pytest.raises(InputError, match="entries"):
        view_data(graph)


@needs_chromium
def test_view_renders_every_node_and_edge(tmp_path):
    graph = random_graph(n_pos=6, n_layer=4, features_per_site=3, density=0.4, seed=7, top_logits=True)
    path = tmp_path / "graph.html"
    write_view(graph, path)
    data = view_data(graph)
    dom, attrs, console = load(path, tmp_path)
    assert attrs.get("data-ready") == "1" and "data-errors" not in attrs and console == []
    assert "data-pwned" not in attrs
    assert len(re.findall(r'<(?:circle|rect)[^>]*class="node ', dom)) == len(data["nodes"])
    assert len(re.findall(r'<path[^>]*class="edge"', dom)) == len(data["links"]) > 10
    kinds = re.findall(r'class="node (\w+)"', dom)
    assert kinds.count("token") == graph.n_pos and kinds.count("logit") == graph.n_logit
    assert 0 < kinds.count("feature") < graph.n_feat
    labels = re.findall(r'<text class="collabel"[^>]*>(.*?)<title>', dom)
    assert len(labels) == graph.n_pos


@needs_chromium
def test_hover_and_click(tmp_path):
    graph = random_graph(n_pos=6, n_layer=4, features_per_site=3, density=0.4, seed=7, top_logits=True)
    data = view_data(graph)
    path = tmp_path / "graph.html"
    write_view(graph, path)
    browser = Browser(tmp_path)
    try:
        browser.open(path.as_uri())
        assert browser.js(COUNT) == [len(data["nodes"]), len(data["links"])]
        # the most connected feature, hovered with the real mouse at its centre
        degree = np.bincount(np.array([[s, t] for s, t, _ in data["links"]]).ravel(), minlength=len(data["nodes"]))
        i = max((k for k, n in enumerate(data["nodes"]) if n["kind"] == "feature"), key=lambda k: degree[k])
        node = data["nodes"][i]
        box = browser.js(f"(() => {{ const e = document.querySelector('.node[data-i=\"{i}\"]'); e.scrollIntoView();"
                         " const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        assert browser.js(f"document.elementFromPoint({box[0]}, {box[1]}).getAttribute('data-i')") == str(i)
        browser.call("Input.dispatchMouseEvent", session=browser.session, type="mouseMoved", x=box[0], y=box[1])
        tip = browser.js("[getComputedStyle(document.getElementById('tip')).display,"
                         " document.getElementById('tip').innerText]")
        assert tip[0] == "block"
        text = tip[1]
        assert f"L{node['layer']} #{node['feature']}" in text
        quoted = json.dumps(graph.input_strings[node["pos"]], ensure_ascii=False)
        assert re.search(rf"position\s+{node['pos']} {re.escape(quoted)}\n", text)
        activation = f"{node['activation']:.4g}"
        assert re.search(rf"activation\s+{re.escape(activation)}\n", text)
        assert re.search(rf"node id\s+{node['id']}\n", text)
        for token, value in node["top_logits"]:
            assert f"{json.dumps(token, ensure_ascii=False)} {value:.3g}" in text
        # click: its edges highlighted, nothing else
        browser.call("Input.dispatchMouseEvent", session=browser.session, type="mousePressed", x=box[0], y=box[1],
                     button="left", clickCount=1)
        browser.call("Input.dispatchMouseEvent", session=browser.session, type="mouseReleased", x=box[0], y=box[1],
                     button="left", clickCount=1)
        highlighted = browser.js("[...document.querySelectorAll('path.edge.hi')].map((e) => Number(e.dataset.i))")
        want = [k for k, (s, t, _) in enumerate(data["links"]) if i in (s, t)]
        assert sorted(highlighted) == want and len(want) == degree[i] > 0
        assert browser.js("document.getElementById('graph').classList.contains('focus')")
        assert browser.errors == []
    finally:
        browser.close()


@needs_chromium
def test_twenty_tokens_eighteen_layers(tmp_path):
    graph = random_graph(n_pos=20, n_layer=18, features_per_site=3, density=0.1, n_logit=4, seed=5, top_logits=True)
    data = view_data(graph)
    assert 150 <= len(data["nodes"]) <= 300
    path = tmp_path / "big.html"
    write_view(graph, path)
    browser = Browser(tmp_path)
    try:
        browser.open(path.as_uri())
        assert browser.js(COUNT) == [len(data["nodes"]), len(data["links"])]
        # no two nodes drawn on top of each other, and the page stays a sane size
        centres = browser.js("[...document.querySelectorAll('svg .node')].map((e) => {"
                             " const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })")
        centres = np.array(centres)
        gaps = np.sqrt(((centres[:, None] - centres[None]) ** 2).sum(-1)) + np.eye(len(centres)) * 1e9
        assert gaps.min() >= 8
        size = browser.js("[document.getElementById('graph').width.baseVal.value,"
                          " document.getElementById('graph').height.baseVal.value]")
        assert size[0] <= 20 * 160 + 400 and size[1] <= 20 * 34 + 200
        assert browser.errors == []
    finally:
        browser.close()


def test_injection_is_escaped(tmp_path):
    graph = random_graph(seed=1)
    graph.input_strings[0] = "</script><script>document.documentElement.setAttribute('data-pwned','1')</script>"
    html = render_view(graph)
    assert "</script><script>document" not in html
    with pytest.raises(InputError, match="not a directory"):
        write_view(graph, tmp_path / "missing" / "g.html")
