"""``pyinterp compare``: models by relative depth over a prompt set. The last layer's values equal each model's own
output (softmax of a plain run's last logits), the table equals the means of the per-example values, multi-token
targets are reported, bad input is a one-line error."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from pyinterp.analysis.compare import compare_model
from pyinterp.analysis.prompts import load_prompts
from pyinterp.cli import main

CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Japan", "Tokyo")]


def write_set(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def capitals(tmp_path: Path) -> Path:
    return write_set(tmp_path / "capitals.jsonl",
                     [{"prompt": f"The capital of {c} is", "target": a} for c, a in CAPITALS])


def softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.mark.parametrize("name", ["smollm2_f32", "gemma3_f32"])
@pytest.mark.parametrize("temp", [1.0, 2.5])
def test_last_layer_is_the_models_own_prediction(request, tmp_path, name, temp):
    """Last layer: P(target), rank and entropy equal numpy's on the softmax (at the temperature) of a plain run's
    last logits, for every prompt; the prompts ran together in one batched decode. On the F32 twins: a prompt in
    other KV cells of a batch rounds differently (2e-7 in P here), which the quantized models' q8 activations can
    amplify (SmolLM2 Q4_1: P(' Tokyo') 0.704 alone, 0.724 as the 4th of 4 copies)."""
    model = request.getfixturevalue(name)
    examples = load_prompts(capitals(tmp_path), needs=["prompt", "target"])
    curves = compare_model(model, examples, temp=temp)
    assert curves.lines == [1, 2, 3, 4] and curves.values["p"].shape == (4, model.n_layer)
    for r, (country, answer) in enumerate(CAPITALS):
        target = model.tokenize(" " + answer, add_bos=False)
        assert curves.targets[r].ids == (target[0],) and curves.targets[r].texts == (" " + answer,)
        logits = model.run(f"The capital of {country} is").logits[-1]
        p = softmax(logits / temp)
        assert abs(curves.values["p"][r, -1] - p[target[0]]) <= 2e-5
        assert curves.values["rank"][r, -1] == 1 + np.sum(logits > logits[target[0]])
        assert abs(curves.values["entropy"][r, -1] - float(-(p * np.log(np.maximum(p, 1e-300))).sum())) <= 1e-3
    # an earlier layer is not the output (the values are per layer)
    assert not np.allclose(curves.values["p"][:, 0], curves.values["p"][:, -1])


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["compare", "-c", "256", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_table_is_the_mean_of_the_examples(capsys, tmp_path, tiny_path):
    """The table at each depth (nearest layer) holds the mean of the per-example values and their bootstrap
    interval around it; the CSV and Markdown hold the same numbers; the PNG is written."""
    a, b = tiny_path("llama"), tiny_path("qwen3", seed=1)
    rows = [{"prompt": "a b c d", "target": "e"}, {"prompt": "the cat sat on", "target": ["the", "a"]},
            {"prompt": "one two", "target": "three"}]
    prompts = write_set(tmp_path / "set.jsonl", rows)
    code, out, err = run_cli(capsys, "-m", str(a), "-m", str(b), "--prompts", str(prompts), "--json",
                             "--depths", "0,1/3,1/2,1", "--csv", str(tmp_path / "t.csv"), "--png", str(tmp_path / "c.png"))
    assert code == 0, err
    got = json.loads(out)
    assert [m["model"] for m in got["models"]] == [a.name, b.name] and len(got["table"]) == 4 * 2
    for row in got["table"]:
        model = next(m for m in got["models"] if m["model"] == row["model"])
        layer = {"0": 0, "1/3": 1, "1/2": 2, "1": 3}[row["depth"]]  # 4 layers: depths 0, 1/3, 2/3, 1
        assert row["layer"] == layer and row["n"] == 3
        for metric in ("p", "rank", "entropy"):
            values = [ex[metric][layer] for ex in model["examples"]]
            assert row[f"{metric}_mean"] == pytest.approx(np.mean(values), abs=2e-6)
            assert row[f"{metric}_low"] <= row[f"{metric}_mean"] + 1e-9 <= row[f"{metric}_high"] + 2e-9
            assert model["layers"][metric]["mean"][layer] == pytest.approx(np.mean(values), abs=2e-6)
    # two targets: the sum of their probabilities, the best rank
    two = got["models"][0]["examples"][1]
    assert two["targets"] == [" the", " a"] and len(two["ids"]) == 2
    with open(tmp_path / "t.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [float(r["p_mean"]) for r in table] == pytest.approx([r["p_mean"] for r in got["table"]], abs=1e-9)
    assert (tmp_path / "c.png").stat().st_size > 1000
    code, out, _ = run_cli(capsys, "-m", str(a), "-m", str(b), "--prompts", str(prompts), "--md", "--decimals", "4")
    assert code == 0 and out.splitlines()[1].startswith("| depth | model | layer | n |")
    first = got["table"][0]
    assert f"{first['p_mean']:.4f} [{first['p_low']:.4f}, {first['p_high']:.4f}]" in out.splitlines()[3]


def test_multi_token_targets_are_reported(capsys, tmp_path, tiny_path):
    """A target of several tokens: scored by its first token and reported (model, line), or its row skipped."""
    a, b = tiny_path("llama"), tiny_path("qwen3", seed=1)
    long = "abcdefghij"  # several tokens of the tiny vocabulary, with or without a leading space
    prompts = write_set(tmp_path / "set.jsonl", [{"prompt": "a b c", "target": "d"}, {"prompt": "x y", "target": long}])
    code, out, err = run_cli(capsys, "-m", str(a), "-m", str(b), "--prompts", str(prompts), "--json")
    assert code == 0, err
    got = json.loads(out)
    for model in got["models"]:
        assert len(model["notes"]) == 1 and f"{model['model']}: line 2: target ' {long}' is" in model["notes"][0]
        assert "first token" in model["notes"][0] and [len(ex["ids"]) for ex in model["examples"]] == [1, 1]
        assert model["notes"][0] in err
    code, out, err = run_cli(capsys, "-m", str(a), "-m", str(b), "--prompts", str(prompts), "--json",
                             "--multi-token", "skip")
    got = json.loads(out)
    assert code == 0 and all("row skipped" in m["notes"][0] and len(m["examples"]) == 1 for m in got["models"])
    assert got["table"][0]["n"] == 1


def test_bad_input(capsys, tmp_path, tiny_path):
    a = str(tiny_path("llama"))
    good = str(capitals(tmp_path))
    no_target = str(write_set(tmp_path / "bad.jsonl", [{"prompt": "a b", "target": "c"}, {"prompt": "d e"}]))
    cases = [
        (["-m", a, "-m", str(tmp_path / "missing.gguf"), "--prompts", good], "model file not found"),
        (["-m", a, "--prompts", good], "two models or more"),
        (["-m", a, "-m", a, "--prompts", no_target], "bad.jsonl:2: no 'target' field"),
        (["-m", a, "-m", a, "--prompts", str(tmp_path / "none.jsonl")], "does not exist"),
        (["-m", a, "-m", a], "needs --prompts"),
        (["-m", a, "-m", a, "--prompts", good, "--depths", "0,2"], "not in 0..1"),
        (["-m", a, "-m", a, "--prompts", good, "--temp", "0"], "--temp"),
    ]
    for args, message in cases:
        code, out, err = run_cli(capsys, *args)
        assert code == 2 and message in err and err.count("\n") == 1 and err.startswith("pyinterp: error:"), (args, err)
