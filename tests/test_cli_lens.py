"""The command line's target lens (--target), layer and position choice, and logit attribution (--attribute):
text, JSON, CSV and PNG outputs, and one-line errors."""

from __future__ import annotations

import csv
import json
import re

import cv2
import numpy as np
import pytest

from pyinterp.cli import main
from pyinterp.cli.options import parse_layers

PROMPT = "The capital of France is"


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["-c", "512", *args])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *args: str) -> dict:
    code, out, err = run_cli(capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize("spec, want", [
    ("0,1/6,1/3,1/2", [0, 5, 10, 15]),
    ("-1", [29]), ("last,0.5,1.0", [15, 29]), ("1,1/1", [1, 29]), ("3, 3,-30", [0, 3]),
])
def test_parse_layers(spec, want):
    assert parse_layers(spec, 30) == want


def test_target_table(capsys, smollm2):
    """P(' Paris') at each layer: the table's numbers are the API's (rounded), its last row the model's output."""
    code, out, err = run_cli(capsys, "-p", PROMPT, "--target", " Paris", "--target", "Paris", "--decimals", "4")
    assert code == 0, err
    paris, bare = smollm2.tokenize(" Paris", add_bos=False)[0], smollm2.tokenize("Paris", add_bos=False)[0]
    lines = out.splitlines()
    assert lines[0] == f"target ' Paris' = id {paris} (also one token: 'Paris' = id {bare})"
    assert lines[1] == f"target 'Paris' = id {bare} (also one token: ' Paris' = id {paris})"
    n = len(smollm2.tokenize(PROMPT))
    assert f"norm logit lens of l_out at position {n - 1} (' is')" in out
    rows = [line.split() for line in lines if line[:5].strip().isdigit()]
    assert [int(r[0]) for r in rows] == list(range(smollm2.n_layer))
    api = smollm2.logit_lens(PROMPT, top_k=1, targets=[paris, bare], positions=[-1])
    for il, row in enumerate(rows):
        assert row[1] == f"{api.target_probs[il, 0, 0]:.4f}" and row[2] == f"r{api.target_ranks[il, 0, 0]}"
    probs = np.exp(smollm2.run(PROMPT).logits[-1].astype(np.float64))
    assert abs(float(rows[-1][1]) - probs[paris] / probs.sum()) < 1e-4 and rows[-1][2] == "r1"


def test_target_json_csv_png(capsys, tmp_path, smollm2):
    data = run_json(capsys, "-p", PROMPT, "--target", " Paris", "--target", "7042", "--ll-layers", "0,1/2,last",
                    "--ll-pos", "-1,2", "--raw-lens", "--csv", str(tmp_path / "t.csv"), "--target-png", str(tmp_path / "t.png"))
    (lens,) = data["target_lens"]
    assert lens["norm"] is False and [t["id"] for t in lens["targets"]][1] == 7042
    assert [p["position"] for p in lens["positions"]] == [2, 4]
    assert [layer["layer"] for layer in lens["positions"][0]["layers"]] == [0, 15, 29]
    api = smollm2.logit_lens(PROMPT, top_k=1, norm=False, targets=[" Paris", 7042], layers=[0, 15, 29], positions=[2, 4])
    got = np.array([[[t["rank"] for t in layer["targets"]] for layer in p["layers"]] for p in lens["positions"]])
    np.testing.assert_array_equal(got, api.target_ranks.transpose(1, 0, 2))
    with open(tmp_path / "t.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 2 * 2 and rows[0]["lens"] == "raw" and rows[0]["target"] == " Paris"
    assert float(rows[0]["p"]) == pytest.approx(float(api.target_probs[0, 0, 0]), rel=1e-5)
    image = cv2.imread(str(tmp_path / "t.png"))
    assert image is not None and image.shape[1] > 200 and image.std() > 10
    assert sorted(data["files"]) == sorted([str(tmp_path / "t.csv"), str(tmp_path / "t.png")])


def test_target_with_ll(capsys, smollm2):
    """--target follows --ll's tensor and --ll-pos restricts the top-k table too."""
    data = run_json(capsys, "-p", PROMPT, "--ll", "attn_out", "--ll-topk", "2", "--target", " Paris", "--ll-pos", "1")
    assert data["target_lens"][0]["tensor"] == "attn_out" == data["logit_lens"][0]["tensor"]
    assert [t["position"] for t in data["logit_lens"][0]["layers"][0]["tokens"]] == [1]


def test_attribute(capsys, tmp_path, smollm2):
    code, out, err = run_cli(capsys, "-p", PROMPT, "--attribute", "--attr-png", str(tmp_path / "a.png"),
                             "--csv", str(tmp_path / "out.csv"), "--target", " London")
    assert code == 0, err
    a = smollm2.logit_attribution(PROMPT)
    assert f"direct logit attribution of {a.target_str!r} (id {a.target}) at position {a.position}" in out
    rows = [line.split() for line in out.splitlines() if line[:5].strip().isdigit() and "|" in line]
    assert len(rows) == smollm2.n_layer and len(rows[0]) == 3 + 1 + smollm2.n_head
    assert float(rows[7][1]) == pytest.approx(a.attn[7], abs=1e-3) and float(rows[7][4 + 2]) == pytest.approx(a.heads[7, 2], abs=1e-3)
    assert (tmp_path / "out-lens.csv").is_file() and (tmp_path / "out-attribution.csv").is_file()
    with open(tmp_path / "out-attribution.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    heads = {(int(r["layer"]), int(r["head"])): float(r["value"]) for r in rows if r["term"] == "head"}
    assert len(heads) == smollm2.n_layer * smollm2.n_head and heads[7, 2] == pytest.approx(a.heads[7, 2], rel=1e-5)
    image = cv2.imread(str(tmp_path / "a.png"))
    assert image is not None and image.shape[0] > smollm2.n_layer * 20 and image.std() > 10
    data = run_json(capsys, "-p", PROMPT, "--attribute", " London", "--ll-pos", "1,-1")
    assert [(x["position"], x["target"]["str"]) for x in data["attribution"]] == [(1, " London"), (4, " London")]
    assert data["attribution"][1]["layers"][3]["heads"] == pytest.approx(
        smollm2.logit_attribution(PROMPT, " London").heads[3].tolist(), abs=1e-6)


@pytest.mark.parametrize("args, code, message", [
    (["--target", "Berlin"], 2, "not one; single-token variants: ' Berlin'"),
    (["--target", "999999"], 2, "token id 999999 out of range"),
    (["--target", " Paris", "--ll-pos", "7"], 2, "position 7 out of range"),
    (["--target", " Paris", "--ll-pos", "a"], 2, "not a comma list of positions"),
    (["--target", " Paris", "--ll-layers", "30"], 2, "layer 30 out of range"),
    (["--target", " Paris", "--ll-layers", "3/2"], 2, "depth fraction 3/2 is not in 0..1"),
    (["--target", " Paris", "--ll-layers", "x"], 2, "neither a layer, 'last' nor a depth fraction"),
    (["--ll", "l_out-3", "--ll-layers", "4"], 2, "both choose layers"),
    (["--ll-layers", "4"], 2, "--ll-layers needs --ll NAME or --target"),
    (["--ll-pos", "1"], 2, "--ll-pos needs --ll, --target or --attribute"),
    (["--target-png", "x.png"], 2, "--target-png needs --target"),
    (["--attr-png", "x.png"], 2, "--attr-png needs --attribute"),
    (["--csv", "x.csv"], 2, "--csv needs --target or --attribute"),
    (["--attribute", " Parisian tower"], 2, "not one"),
    (["--target", " Paris", "--csv", "/nonexistent/dir/x.csv"], 1, "cannot write CSV to /nonexistent/dir/x.csv"),
])
def test_errors(capsys, args, code, message):
    got, _, err = run_cli(capsys, "-p", PROMPT, *args)
    assert got == code, err
    assert message in err and err.count("\n") == 1 and err.startswith("pyinterp: error: ")


def test_markdown_tables_hold_the_json_values(capsys):
    """--md prints the lens, target and attribution tables as Markdown, with the values the JSON holds."""
    data = run_json(capsys, "-p", PROMPT, "--target", " Paris", "--attribute", "--ll", "l_out", "--ll-layers", "last",
                    "--ll-topk", "2")
    code, out, err = run_cli(capsys, "-p", PROMPT, "--target", " Paris", "--attribute", "--ll", "l_out",
                             "--ll-layers", "last", "--ll-topk", "2", "--md")
    assert code == 0, err
    tables = [line for line in out.splitlines() if line.startswith("| ")]
    assert "| layer | position | token | top 2 |" in tables and "| layer | ' Paris' | top-1 |" in tables
    last = data["target_lens"][0]["positions"][0]["layers"][-1]
    cell = re.escape(f"{last['targets'][0]['p']:.3f}") + f" +r{last['targets'][0]['rank']}"
    assert any(re.match(rf"\| {last['layer']} \| {cell} \|", line) for line in tables)
    layer0 = data["attribution"][0]["layers"][0]
    assert any(line.startswith(f"| 0 | {layer0['attn']:.3f} | {layer0['ffn']:.3f} |") for line in tables)
    top = data["logit_lens"][0]["layers"][0]["tokens"][-1]["top"][0]
    assert any(f"{top['str']!r} {top['p']:.3f}" in line for line in tables)
