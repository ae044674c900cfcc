"""Prompt sets on the main command (the target lens, the attribution) and on ``pyinterp heads``: every aggregate is
the statistic of the per-example values printed beside it, every per-example value is what a single-prompt run of the
same command gives, and bad rows are one-line errors naming FILE:LINE."""

from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pytest

from pyinterp.analysis.heads import KINDS, head_scores
from pyinterp.analysis.stats import summarize
from pyinterp.cli import main

ROWS = [
    {"prompt": "The capital of France is", "target": [" Paris", "Paris"]},
    {"prompt": "The capital of Japan is", "target": " Tokyo"},
    {"prompt": "Berlin is the capital of", "target": " Germany"},
    {"prompt": "The cat sat on the mat. The cat sat on the", "target": " mat"},
]
LAYERS = "0,1/3,2/3,last"


def write_set(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([*args[:1], "-c", "512", *args[1:]] if args and args[0] == "heads" else ["-c", "512", *args])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *args: str) -> dict:
    code, out, err = run_cli(capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out)


def assert_aggregate(aggregate: dict, values: np.ndarray, seed: int) -> None:
    """The printed aggregate is summarize() of the printed per-example values."""
    want = summarize(values, seed).to_dict()
    assert aggregate == want


@pytest.fixture(scope="module")
def set_path(tmp_path_factory):
    return write_set(tmp_path_factory.mktemp("sets") / "caps.jsonl", ROWS)


@pytest.mark.parametrize("per_decode", ["1", "4"])
def test_lens_set_matches_single_runs(capsys, set_path, per_decode):
    data = run_json(capsys, "--prompts", set_path, "--ll-layers", LAYERS, "--ll-pos", "-1,-2", "--seed", "7",
                    "--per-decode", per_decode)
    (lens,) = data["lens"]
    examples = lens["examples"]
    assert [e["line"] for e in examples] == [1, 2, 3, 4] and data["n_examples"] == 4 and data["seed"] == 7
    for key in ("p", "rank"):
        assert_aggregate(lens["aggregate"][key], np.array([e[key] for e in examples]), 7)
    top1 = np.array([e["rank"] for e in examples]) == 1
    assert_aggregate(lens["aggregate"]["top1"], top1.astype(float), 7)
    for row, example in zip(ROWS, examples):
        targets = row["target"] if isinstance(row["target"], list) else [row["target"]]
        single = run_json(capsys, "-p", row["prompt"], *[a for t in targets for a in ("--target", t)],
                          "--ll-layers", LAYERS, "--ll-pos", "-1,-2")
        (positions,) = [s["positions"] for s in single["target_lens"]]
        by_position = {p["position"]: p["layers"] for p in positions}
        for j, position in enumerate(example["positions"]):  # -1, then -2: the single run sorts them
            for li, layer in enumerate(by_position[position]):
                probs = [t["p"] for t in layer["targets"]]
                ranks = [t["rank"] for t in layer["targets"]]
                assert example["target_probs"][li][j] == probs  # bit for bit
                assert example["target_ranks"][li][j] == ranks
                assert example["p"][li][j] == float(np.sum(np.array(probs, np.float32).astype(np.float64)))
                assert example["rank"][li][j] == min(ranks)
                assert example["top"][li][j]["id"] == layer["top"]["id"]
    assert examples[0]["targets"][1]["str"] == "Paris" and len(examples[0]["target_probs"][0][0]) == 2
    assert lens["aggregate"]["top1"]["mean"][-1][0] > 0  # the model gets some answers right at the last layer


def test_lens_set_csv_md_png(capsys, tmp_path, set_path):
    csv_path, png = tmp_path / "s.csv", tmp_path / "t.png"
    data = run_json(capsys, "--prompts", set_path, "--ll-layers", LAYERS, "--csv", str(csv_path), "--target-png", str(png))
    examples = data["lens"][0]["examples"]
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(ROWS) * 4  # one row per example and cell (4 layers, 1 position)
    for row in rows:
        e = next(x for x in examples if x["line"] == int(row["line"]))
        li = data["lens"][0]["layers"].index(int(row["layer"]))
        assert float(row["p"]) == e["p"][li][0] and int(row["rank"]) == e["rank"][li][0]
        assert int(row["top1"]) == (e["rank"][li][0] == 1)
    image = cv2.imread(str(png))
    assert image is not None and image.shape[1] > 300
    code, out, err = run_cli(capsys, "--prompts", set_path, "--ll-layers", LAYERS, "--md", "--decimals", "6")
    assert code == 0, err
    agg = data["lens"][0]["aggregate"]["p"]
    lines = [line for line in out.splitlines() if line.startswith("| 29 |")]
    assert lines, out
    cells = [c.strip() for c in lines[0].strip("|").split("|")]
    assert cells[1] == f"{agg['mean'][-1][0]:.6f}" and cells[3] == f"[{agg['low'][-1][0]:.6f}, {agg['high'][-1][0]:.6f}]"


def test_attribution_set_matches_api(capsys, set_path, smollm2):
    data = run_json(capsys, "--prompts", set_path, "--attribute", "--seed", "3")
    assert "lens" not in data or data["lens"] == []
    attr = data["attribution"]
    for key in ("logit", "embed", "attn", "ffn", "heads"):
        assert_aggregate(attr["aggregate"][key], np.array([e[key] for e in attr["examples"]]), 3)
    for row, example in zip(ROWS, attr["examples"]):
        first = row["target"][0] if isinstance(row["target"], list) else row["target"]
        a = smollm2.logit_attribution(row["prompt"], first)
        assert example["targets"][0]["id"] == a.target
        np.testing.assert_allclose(example["attn"][0], a.attn, rtol=0, atol=1e-6)
        np.testing.assert_allclose(example["heads"][0], a.heads, rtol=0, atol=1e-6)
        assert abs(example["logit"][0] - a.logit) < 1e-6


def test_heads_set(capsys, tmp_path, smollm2):
    rows = [{"prompt": "The cat sat on the mat. The cat sat on the"}, {"prompt": "one two three four one two three"},
            {"prompt": "Hello world"}]  # the last has no repeat: no duplicate-token or induction score
    path = write_set(tmp_path / "h.jsonl", rows)
    data = run_json(capsys, "heads", "--prompts", path, "--seed", "5", "--png", str(tmp_path / "h.png"))
    for kind in KINDS:
        values = [e[kind] for e in data["examples"] if e[kind] is not None]
        assert_aggregate(data["aggregate"][kind], np.array(values), 5)
    assert data["examples"][2]["induction"] is None and data["aggregate"]["induction"]["n"] == 2
    for row, example in zip(rows[:2], data["examples"]):
        want = head_scores(smollm2, prompt=row["prompt"])
        for kind in KINDS:
            np.testing.assert_allclose(example[kind], want.score(kind), rtol=0, atol=1e-6)
    assert cv2.imread(str(tmp_path / "h.png")) is not None


@pytest.mark.parametrize("rows, args, message", [
    ([{"prompt": "a b"}, {"prompt": "c d", "target": " x"}], (), "{path}:1: no 'target' field"),
    ([{"prompt": "The capital of France is", "target": " Paris"}, {"prompt": "x", "target": "Tokyo"}], (),
     "{path}:2: target 'Tokyo' is 2 tokens"),
    ([{"prompt": "The capital of France is", "target": " Paris"}, {"prompt": "Hi", "target": " x"}],
     ("--ll-pos", "-5"), "{path}:2: position -5 out of range"),
    ([{"prompt": "The capital", "target": " x"}, "not json"], (), "{path}:2: not JSON"),
])
def test_bad_rows(capsys, tmp_path, rows, args, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join((json.dumps(r) if isinstance(r, dict) else r) + "\n" for r in rows))
    code, out, err = run_cli(capsys, "--prompts", str(path), *args)
    assert code == 2 and err.startswith("pyinterp: error: " + message.format(path=path)), err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (("-p", "x"), "-p/--prompt does not go with --prompts"),
    (("--draw",), "--draw does not go with --prompts"),
    (("--attr-png", "a.png"), "--attr-png needs --attribute"),
])
def test_bad_options(capsys, set_path, args, message):
    code, _, err = run_cli(capsys, "--prompts", set_path, *args)
    assert code == 2 and message in err, err


def test_per_decode_needs_prompts(capsys):
    code, _, err = run_cli(capsys, "-p", "x", "--per-decode", "2")
    assert code == 2 and "--per-decode goes with --prompts" in err


def test_target_option_overrides_the_file(capsys, tmp_path):
    """--target on the command line: every example uses it, rows need no target; the values are the single runs'."""
    rows = [{"prompt": "The capital of France is"}, {"prompt": "I like to eat", "target": " Tokyo"}]
    path = write_set(tmp_path / "o.jsonl", rows)
    data = run_json(capsys, "--prompts", path, "--target", " the", "--ll-layers", "last", "--per-decode", "1")
    for row, example in zip(rows, data["lens"][0]["examples"]):
        assert [t["str"] for t in example["targets"]] == [" the"]
        single = run_json(capsys, "-p", row["prompt"], "--target", " the", "--ll-layers", "last")
        assert example["p"][0][0] == single["target_lens"][0]["positions"][0]["layers"][0]["targets"][0]["p"]
