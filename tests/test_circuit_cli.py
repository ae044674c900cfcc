"""``pyinterp circuit`` on a tiny F32 model with random transcoders saved in circuit-tracer's format: the JSON
against the Python API, the graph files and the HTML view, --check, and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

import pyinterp
from pyinterp.circuit import (attribution_graph, check_features, graph_scores, load_transcoders, prune_graph,
                              random_transcoders, save_transcoders)
from pyinterp.circuit.export import check_graph_json
from pyinterp.circuit.prune import logit_weights, node_influence
from pyinterp.cli import main

PROMPT = "the cat sat on the mat and then"


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_path):
    root = tmp_path_factory.mktemp("cli_circuit")
    gguf = tiny_path("llama", f32=True)
    with pyinterp.Model(gguf, n_ctx=512) as model:
        t = model.run(PROMPT, capture=["ffn_norm"])
        rms = float(np.sqrt(np.mean([(t["ffn_norm", l] ** 2).mean() for l in range(model.n_layer)])))
        save_transcoders(random_transcoders(model.n_layer, model.n_embd, 64, density=0.1, input_scale=rms, seed=2),
                         root / "tc")
        save_transcoders(random_transcoders(model.n_layer, model.n_embd + 8, 16), root / "wide")
    return {"gguf": gguf, "tc": root / "tc", "wide": root / "wide", "root": root, "qwen2": tiny_path("qwen2", f32=True)}


def run(capsys, files, *args: str, model: str = "gguf") -> tuple[int, str, str]:
    code = main(["circuit", *args, "-m", str(files[model]), "-c", "512"])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_is_the_api(capsys, files):
    code, out, err = run(capsys, files, "--transcoders", str(files["tc"]), "-p", PROMPT, "--json", "--check", "3")
    assert code == 0, err
    got = json.loads(out)
    with pyinterp.Model(files["gguf"], n_ctx=512) as model:
        tcs = load_transcoders(files["tc"])
        g = attribution_graph(model, PROMPT, tcs)
        mask, _, _ = prune_graph(g)
        influence = node_influence(g.adjacency.astype(np.float64), logit_weights(g))
        kept = np.nonzero(mask[:g.n_feat])[0]
        top = kept[np.argsort(-influence[kept], kind="stable")][:3]
        checks = check_features(model, g, tcs, list(top))
    assert [t["id"] for t in got["targets"]] == list(g.logit_tokens)
    assert got["nodes"] == {"features": g.n_feat, "errors": g.n_layer * g.n_pos, "tokens": g.n_pos,
                            "logits": g.n_logit, "kept_features": len(kept), "kept": int(mask.sum())}
    assert (got["replacement_score"], got["completeness_score"]) == pytest.approx(graph_scores(g))
    assert [f["node"] for f in got["top_features"][:3]] == list(top)
    assert [c["real"] for c in got["check"]] == pytest.approx([c.real for c in checks])
    assert [c["graph"] for c in got["check"]] == pytest.approx([c.predicted for c in checks])
    assert got["info"]["sum_error"] < 1e-5


def test_files_and_table(capsys, files, tmp_path):
    out_dir, html = tmp_path / "graphs", tmp_path / "view.html"
    code, out, err = run(capsys, files, "--transcoders", str(files["tc"]), "-p", PROMPT, "-o", str(out_dir),
                         "--slug", "cat", "--html", str(html), "--md")
    assert code == 0, err
    data = json.loads((out_dir / "cat.json").read_text())
    check_graph_json(data)
    index = json.loads((out_dir / "graph-metadata.json").read_text())
    assert [g["slug"] for g in index["graphs"]] == ["cat"]
    text = html.read_text()
    assert text.startswith("<!DOCTYPE html>") and "feature_top_logits" not in out
    kept = int(out.split("pruned: ")[1].split(" kept")[0])
    assert len(data["nodes"]) == kept
    assert "| layer | pos | token | feature | activation | influence |" in out
    assert f"wrote {out_dir / 'cat.json'}" in out and f"wrote {html}" in out


@pytest.mark.parametrize("args, message", [
    (["--transcoders", "{root}/missing", "-p", "a"], "does not exist"),
    (["--transcoders", "{wide}", "-p", "a"], "d_model"),
    (["--transcoders", "{tc}", "-p", "a", "--slug", "a b"], "--slug"),
    (["--transcoders", "{tc}", "-p", "a", "--node-threshold", "2"], "--node-threshold"),
    (["--transcoders", "{tc}", "-p", "a", "--target", "not one token at all"], "target"),
    (["--transcoders", "{tc}"], "Missing option '-p'"),
])
def test_errors_are_one_line(capsys, files, args, message):
    paths = {name: str(path) for name, path in files.items()}
    code, out, err = run(capsys, files, *(a.format(**paths) for a in args))
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("pyinterp: error: "), err
    assert message.format(**paths) in err


def test_refuses_a_model_that_is_not_linear_when_frozen(capsys, files):
    code, out, err = run(capsys, files, "--transcoders", str(files["tc"]), "-p", "a", model="qwen2")
    assert code == 2 and len(err.splitlines()) == 1 and "not linear" in err


def test_listed_in_the_main_help(capsys):
    assert main(["--help"]) == 0
    assert "pyinterp circuit" in capsys.readouterr().out
