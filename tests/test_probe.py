"""Linear probes across layers (pyinterp.analysis.probe, ``pyinterp probe``).

The planted task: whether a prompt names a country or an animal/object, the name early in the prompt and every
prompt ending with the same words, so the last token's row holds the label only if the model carried it there.
The probe must beat the majority baseline there and the control task (shuffled labels) must stay near chance.
The activations are compared with single runs (``Model.run``), the directions with the fitted pipeline's own
decision function, and the saved control vectors with what steering loads.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from pyinterp import ControlVector, InputError
from pyinterp.analysis.probe import ProbeResult, activations, directions, encode_labels, fold_accuracies, probe
from pyinterp.cli import main

COUNTRIES = ["France", "Germany", "Japan", "Brazil", "Canada", "Italy", "Spain", "Egypt", "India", "Mexico", "Kenya",
             "Norway", "Peru", "Chile", "Greece", "Sweden", "Turkey", "Poland", "Vietnam", "Argentina"]
OTHERS = ["giraffe", "hammer", "penguin", "bicycle", "elephant", "teapot", "dolphin", "chair", "tiger", "lamp",
          "rabbit", "spoon", "owl", "guitar", "horse", "pencil", "frog", "kettle", "camel", "umbrella"]
PROMPTS = [f"The word is: {w}. What does it name? It names" for w in COUNTRIES + OTHERS]
LABELS = ["country"] * len(COUNTRIES) + ["other"] * len(OTHERS)
LAYERS = [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 29]


@pytest.fixture(scope="module")
def planted(smollm2):
    return probe(smollm2, PROMPTS, LABELS, layers=LAYERS, folds=5, seed=0)


def test_planted_task_beats_baseline_and_control(planted):
    assert planted.baseline == 0.5
    acc, control = planted.accuracy.mean(1), planted.control.mean(1)
    assert acc.max() >= 0.9  # well above the 0.5 baseline at some layer
    assert 0.3 <= control.mean() <= 0.7  # the shuffled labels: chance, on average over layers
    assert (acc - control).max() >= 0.3
    assert planted.accuracy.shape == planted.control.shape == (len(LAYERS), 5)
    assert planted.layers == LAYERS and planted.classes == ["country", "other"] and planted.counts == [20, 20]


def test_directions_are_the_pipeline_in_activation_space(smollm2):
    """direction . x + intercept equals the fitted pipeline's decision function on the raw activations."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = activations(smollm2, PROMPTS, layers=[12])[:, 0]
    y, _ = encode_labels(LABELS, 5)
    d, b = directions(x, y, seed=0)
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x, y)
    expected = pipe.decision_function(x)
    np.testing.assert_allclose(x.astype(np.float64) @ d[0] + b[0], expected, rtol=1e-3,
                               atol=1e-3 * np.abs(expected).max())
    assert d.shape == (1, smollm2.n_embd) and d.dtype == np.float32


def test_activations_equal_single_runs(smollm2):
    prompts = PROMPTS[:3] + PROMPTS[-3:]
    n_bos = len(smollm2.tokenize(""))
    traces = [smollm2.run(p, capture=["l_out-4", "l_out-20"], logits=None) for p in prompts]
    last = np.stack([[t.act("l_out", il)[-1] for il in (4, 20)] for t in traces])
    mean = np.stack([[t.act("l_out", il)[n_bos:].mean(0) for il in (4, 20)] for t in traces])
    one = activations(smollm2, prompts, "l_out", [4, 20], per_decode=1)
    np.testing.assert_array_equal(one, last)  # one sequence per decode: bit for bit
    batched = activations(smollm2, prompts, "l_out", [4, 20])  # all in one decode
    np.testing.assert_allclose(batched, last, rtol=1e-4, atol=1e-4 * np.abs(last).max())
    np.testing.assert_allclose(activations(smollm2, prompts, "l_out", [4, 20], "mean"), mean, rtol=1e-4,
                               atol=1e-4 * np.abs(mean).max())
    assert not np.allclose(last, mean)


def test_saved_directions_load_as_control_vector(planted, tmp_path, capsys):
    files = planted.save(tmp_path / "out", n_embd=576)
    assert sorted(p.name for p in files) == ["probe.gguf", "probe.json", "probe.npz"]
    cv = ControlVector.load(tmp_path / "out" / "probe.gguf")
    assert cv.layers == tuple(il for il in LAYERS if il > 0)  # llama.cpp never steers layer 0
    assert cv.directions.shape == (max(LAYERS) + 1, 576) and cv.model_hint == "llama"
    for k, il in enumerate(LAYERS[1:], 1):
        np.testing.assert_array_equal(cv.directions[il], planted.directions[0, k])
    saved = np.load(tmp_path / "out" / "probe.npz")
    assert saved["directions"].shape == (1, 30, 576) and saved["directions"].dtype == np.float32
    np.testing.assert_array_equal(saved["directions"][0, LAYERS], planted.directions[0])
    assert not saved["directions"][0, 1].any()  # a layer not probed
    report = json.loads((tmp_path / "out" / "probe.json").read_text())
    assert [row["layer"] for row in report["layers"]] == LAYERS
    assert report["layers"][2]["accuracy_mean"] == pytest.approx(planted.accuracy[2].mean())
    # the steering flag takes it
    assert main(["-c", "512", "-p", "The word is", "--control-vector", str(tmp_path / "out" / "probe.gguf")]) == 0
    assert "next token" in capsys.readouterr().out


def blobs(n_classes: int, n: int = 30, width: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points per class around class centres far apart in ``width`` dimensions."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 4, (n_classes, width))
    y = np.repeat(np.arange(n_classes), n)
    return (centres[y] + rng.normal(0, 1, (len(y), width))).astype(np.float32), y


def test_folds_and_control_on_synthetic_classes(tmp_path):
    """Separable classes: accuracy 1 on every fold; shuffled: near chance. Three classes: one direction each."""
    x, y = blobs(3)
    assert fold_accuracies(x, y, 5, seed=0).min() == 1.0
    assert fold_accuracies(x, np.random.default_rng(0).permutation(y), 5, seed=0).mean() < 0.6
    d, b = directions(x, y, seed=0)
    assert d.shape == (3, 8) and b.shape == (3,)
    assert (np.argmax(x @ d.T + b, 1) == y).all()
    result = ProbeResult("m", "llama", 4, "l_out", "last", [0, 2], ["a", "b", "c"], [30, 30, 30], 5, 0,
                         np.ones((2, 5)), np.full((2, 5), 0.3), np.stack([d, d], 1), np.stack([b, b], 1))
    names = sorted(p.name for p in result.save(tmp_path, n_embd=8))
    assert names == ["probe-0.gguf", "probe-1.gguf", "probe-2.gguf", "probe.json", "probe.npz"]
    for k in range(3):
        np.testing.assert_array_equal(ControlVector.load(tmp_path / f"probe-{k}.gguf").directions[2], d[k])


@pytest.mark.parametrize("labels, folds, message", [
    (["a"] * 10, 5, "at least two classes"),
    (["a"] * 6 + ["b"] * 3, 5, "label 'b' has 3 examples, fewer than the 5 folds"),
    ([1, 2, 1, 2], 5, "label 1 has 2 examples"),
    (["a", "b", 1.5, "a"], 2, "example 3: label must be a string or an integer"),
    (["a", "b"], 1, "--folds must be at least 2"),
    ([], 2, "no examples"),
])
def test_bad_labels(labels, folds, message):
    with pytest.raises(InputError, match=message):
        encode_labels(labels, folds)


def write_set(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run(capsys, *args):
    code = main(["probe", "-c", "512", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "a", "label": 1}, {"prompt": "b"}], ":2: no 'label'"),
    ([{"prompt": "a", "label": "x"}] * 6, "at least two classes"),
    ([{"prompt": "a", "label": "x"}] * 3 + [{"prompt": "b", "label": "y"}] * 3, "fewer than the 5 folds"),
    ([{"prompt": "a", "label": [1]}], "label must be a string or an integer"),
    ([{"prompt": "a", "label": True}], "label must be a string or an integer"),
])
def test_cli_bad_input(tmp_path, capsys, rows, message):
    code, out, err = run(capsys, "--prompts", write_set(tmp_path / "set.jsonl", rows))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and err.startswith("pyinterp: error:")


def test_cli_bad_tensor_and_missing_sklearn(tmp_path, capsys, monkeypatch):
    path = write_set(tmp_path / "set.jsonl", [{"prompt": p, "label": l} for p, l in zip(PROMPTS, LABELS)])
    code, _, err = run(capsys, "--prompts", path, "-t", "attn_scores")
    assert code == 2 and "attention weights" in err
    code, _, err = run(capsys, "--prompts", path, "--layers", "40")
    assert code == 2 and "out of range" in err
    for name in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")]:
        monkeypatch.setitem(sys.modules, name, None)  # import sklearn... fails as where it is not installed
    code, _, err = run(capsys, "--prompts", path)
    assert code == 2 and 'pip install "pyinterp[probe]"' in err and len(err.strip().splitlines()) == 1


def test_cli(tmp_path, capsys):
    some = list(range(8)) + list(range(len(PROMPTS) - 8, len(PROMPTS)))
    rows = [{"prompt": PROMPTS[i], "label": int(LABELS[i] == "country")} for i in some]
    path = write_set(tmp_path / "set.jsonl", rows)
    args = ["--prompts", path, "--layers", "2,15", "--folds", "4", "--position", "mean"]
    code, out, err = run(capsys, *args, "--json", "--png", str(tmp_path / "acc.png"), "--save", str(tmp_path / "d"))
    assert code == 0, err
    report = json.loads(out)
    assert [r["layer"] for r in report["layers"]] == [2, 15] and report["folds"] == 4
    assert report["position"] == "mean" and report["baseline"] == 0.5 and report["directions"] == "towards 1"
    assert all(len(r["accuracy_folds"]) == 4 for r in report["layers"])
    assert (tmp_path / "acc.png").stat().st_size > 0 and (tmp_path / "d" / "probe.gguf").exists()
    code, out, err = run(capsys, *args, "--md")
    assert code == 0 and out.startswith("**linear probes of l_out") and "| layer | accuracy |" in out
    assert json.loads((tmp_path / "d" / "probe.json").read_text())["layers"][1]["accuracy_mean"] == pytest.approx(
        report["layers"][1]["accuracy_mean"])
