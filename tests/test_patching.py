"""Patching sweeps and head scans (pyinterp.analysis.patching, ``pyinterp sweep``): against loops of single runs written
here, against the transformers reference doing the same sweep with hooks, metrics, errors and the CLI."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

import pyinterp
from conftest import corr
from pyinterp import InputError
from pyinterp.cli import main
from pyinterp.analysis.patching import head_ablation_scan, logit_diff, patch_sweep, prob

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import tiny_gguf  # noqa: E402

CLEAN = "The Eiffel Tower is located in the city of"
CORRUPT = "The Colosseum is located in the city of"


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> Path:
    return tiny_gguf.write("llama", tmp_path_factory.mktemp("tiny-sweep") / "llama.gguf", seed=0)


@pytest.fixture(scope="module")
def tiny(tiny_path):
    """A tiny llama on one thread (fast on a busy machine) and two prompts of 7 ids that differ at 2 and 4."""
    with pyinterp.Model(tiny_path, n_ctx=64, n_threads=1) as model:
        yield model, [1, 20, 31, 42, 53, 64, 75], [1, 20, 9, 42, 11, 64, 75]


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - x.max())
    return e / e.sum()


def test_patch_sweep_equals_a_loop_of_runs(tiny):
    model, clean, corrupt = tiny
    layers = list(range(model.n_layer))  # the last layer included: its rows are kept for the patch
    good, bad = 7, 12
    got = patch_sweep(model, clean, corrupt, metric=logit_diff(good, bad), layers=layers)
    got_p = patch_sweep(model, clean, corrupt, metric=prob(good), layers=layers[::-1], positions=[-1, 2])
    rows = model.run(clean, capture=["l_out"])
    want = np.empty((len(layers), len(clean)))
    for il in layers:
        for pos in range(len(clean)):
            logits = model.run(corrupt, patch=[("l_out", il, pos, rows["l_out", il][pos])]).logits[-1]
            want[il, pos] = float(logits[good]) - float(logits[bad])  # as the metric: in float64
            if il == 0 and pos in (2, len(clean) - 1):
                p = softmax(logits)[good]
                assert got_p[len(layers) - 1, 1 if pos == 2 else 0] == pytest.approx(p, rel=1e-5)
    assert got.shape == (model.n_layer, len(clean))
    np.testing.assert_array_equal(got, want)  # each cell is its own run, bit for bit
    plain = model.run(corrupt).logits[-1]
    clean_logits = model.run(clean).logits[-1]
    # a position where the prompts agree changes nothing; one where they differ does, before the last layer; in the
    # last layer only the last row reaches the logits, and it brings the clean ones
    np.testing.assert_array_equal(got[:, 0], float(plain[good]) - float(plain[bad]))
    assert abs(got[0, 2] - (plain[good] - plain[bad])) > 1e-2
    np.testing.assert_allclose(got[-1, :-1], plain[good] - plain[bad], atol=1e-4)
    assert got[-1, -1] == pytest.approx(clean_logits[good] - clean_logits[bad], abs=1e-4)


def test_other_tensors_and_callable_metrics(tiny):
    model, clean, corrupt = tiny
    metric = lambda logits: float(logits[:10].sum())  # noqa: E731
    got = patch_sweep(model, clean, corrupt, metric=metric, tensor="attn_out", layers=[1], positions=[2, 4])
    rows = model.run(clean, capture=["attn_out-1"])["attn_out", 1]
    for j, pos in enumerate([2, 4]):
        logits = model.run(corrupt, patch=[("attn_out", 1, pos, rows[pos])]).logits[-1]
        assert got[0, j] == pytest.approx(float(logits[:10].sum()), abs=1e-3)


def test_head_ablation_scan_equals_a_loop(tiny):
    model, clean, _ = tiny
    got = head_ablation_scan(model, clean, prob(7), layers=[1, 0])
    base = softmax(model.run(clean).logits[-1])[7]
    assert got.shape == (2, model.n_head)
    for i, il in enumerate([1, 0]):
        for h in range(model.n_head):
            want = softmax(model.run(clean, ablate=[(il, h)]).logits[-1])[7] - base
            assert got[i, h] == pytest.approx(want, abs=1e-6)
    assert np.abs(got).max() > 1e-4


@pytest.mark.parametrize("call, message", [
    (lambda m, c, k: patch_sweep(m, c, k[:-1], metric=prob(7)), "7 tokens and the corrupted one 6"),
    (lambda m, c, k: patch_sweep(m, c, k, metric=prob(7), layers=[m.n_layer]), "out of range"),
    (lambda m, c, k: patch_sweep(m, c, k, metric=prob(7), layers=[]), "layers is empty"),
    (lambda m, c, k: patch_sweep(m, c, k, metric=prob(7), positions=[7]), "position 7 out of range"),
    (lambda m, c, k: patch_sweep(m, c, k, metric=prob(7), tensor="attn_scores"), "not a \\[n_tokens, width\\]"),
    (lambda m, c, k: patch_sweep(m, c, k, metric=prob(7), tensor="nope"), "unknown tensor name"),
    (lambda m, c, k: patch_sweep(m, c, k, metric="prob"), "metric must be"),
    (lambda m, c, k: patch_sweep(m, c, k, metric=lambda x: "x", layers=[0], positions=[0]), "return a number"),
    (lambda m, c, k: patch_sweep(m, c, k, metric=prob(10**6)), "token id 1000000 out of range"),
    (lambda m, c, k: patch_sweep(m, c, k, metric=prob("a long text")), r"tokens \(.*\), not one"),
    (lambda m, c, k: patch_sweep(m, c, k, metric=logit_diff(1.5, 2)), "a target is a token id or a text"),
    (lambda m, c, k: head_ablation_scan(m, c, prob(7), layers=[-1]), "out of range"),
])
def test_errors(tiny, call, message):
    model, clean, corrupt = tiny
    with pytest.raises(InputError, match=message) as info:
        call(model, clean, corrupt)
    assert "\n" not in str(info.value)


def test_against_the_reference_sweep(smollm2, ref_smollm2):
    """The same sweep with transformers hooks (the reference replaces a row of a decoder layer's output)."""
    clean, corrupt = smollm2.tokenize(CLEAN), smollm2.tokenize(CORRUPT)
    good, bad = smollm2.tokenize(" Paris", add_bos=False)[0], smollm2.tokenize(" Rome", add_bos=False)[0]
    layers = [2, 12, 24]
    got = patch_sweep(smollm2, CLEAN, CORRUPT, metric=logit_diff(" Paris", " Rome"), layers=layers)
    rows = ref_smollm2.run(clean).l_out
    want = np.empty_like(got)
    for i, il in enumerate(layers):
        for pos in range(len(clean)):
            logits = ref_smollm2.run(corrupt, patch=[(il, pos, rows[il][pos])]).logits[-1]
            want[i, pos] = logits[good] - logits[bad]
    assert corr(got, want) >= 0.95  # measured 0.9993
    assert np.abs(got - want).max() <= 1.0  # measured 0.36 (the metric spans -9.5..5)
    # early on the Eiffel tokens carry the answer, late the last token does: the clean answer wins only there
    for sweep in (got, want):
        assert (sweep[:2, 2] > 0).all() and sweep[2, -1] > 0 and (sweep[:, [0, 5, 6]] < 0).all()


def test_against_the_reference_head_ablation(smollm2, ref_smollm2):
    ids = smollm2.tokenize(CLEAN)
    good, bad = smollm2.tokenize(" Paris", add_bos=False)[0], smollm2.tokenize(" Rome", add_bos=False)[0]
    layers = [0, 5]
    got = head_ablation_scan(smollm2, CLEAN, logit_diff(" Paris", " Rome"), layers=layers)
    base = ref_smollm2.run(ids).logits[-1]
    want = np.empty_like(got)
    for i, il in enumerate(layers):
        for h in range(smollm2.n_head):
            logits = ref_smollm2.run(ids, ablate=[(il, h)]).logits[-1]
            want[i, h] = (logits[good] - logits[bad]) - (base[good] - base[bad])
    assert corr(got, want) >= 0.9  # measured 0.981


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_sweep_outputs(capsys, tmp_path, tiny, tiny_path):
    model, _, _ = tiny
    clean, corrupt = "abc def", "abd daf"
    n = len(model.tokenize(clean))
    assert len(model.tokenize(corrupt)) == n
    base = ["sweep", "-m", str(tiny_path), "-t", "1", "-c", "64", "--clean", clean]
    good, bad = model.token_str(7), model.token_str(12)
    csv_path, png_path = tmp_path / "s.csv", tmp_path / "s.png"
    code, out, err = run_cli(capsys, *base, "--corrupt", corrupt, "--good", good, "--bad", bad, "--layers", "0-1",
                             "--json", "--csv", str(csv_path), "--png", str(png_path))
    assert code == 0, err
    data = json.loads(out)
    want = patch_sweep(model, clean, corrupt, metric=logit_diff(7, 12), layers=[0, 1])
    np.testing.assert_allclose(data["values"], want, atol=1e-5)
    assert data["layers"] == [0, 1] and data["files"] == [str(csv_path), str(png_path)]
    assert data["columns"] == [model.token_str(t) for t in model.tokenize(clean)]
    plain = model.run(corrupt).logits[-1]
    assert data["corrupt_value"] == pytest.approx(plain[7] - plain[12], abs=1e-5)
    with open(csv_path, newline="", encoding="utf-8") as f:
        table = list(csv.reader(f))
    assert table[0] == ["layer", *data["columns"], "baseline_clean", "baseline_corrupt"]
    assert [r[0] for r in table[1:]] == ["0", "1"]
    np.testing.assert_allclose(np.array([r[1:-2] for r in table[1:]], dtype=float), want, rtol=1e-5, atol=1e-5)
    image = cv2.imread(str(png_path))
    assert image is not None and image.shape[1] > 100

    code, out, err = run_cli(capsys, *base, "--heads", "--metric", "prob", "--good", good, "--layers", "1")
    assert code == 0, err
    lines = out.splitlines()
    assert "head ablation" in lines[0] and lines[2].split()[0] == "layer" and len(lines) == 4
    want = head_ablation_scan(model, clean, prob(7), layers=[1])
    np.testing.assert_allclose([float(v) for v in lines[3].split()[1:]], want[0], atol=0.006)


@pytest.mark.parametrize("args, message", [
    (["--heads", "--corrupt", "x"], "not both"),
    ([], "not both"),
    (["--corrupt", "abd daf", "--layers", "0-9"], "--layers: layer 9 out of range (the model has 4 layers: 0..3"),
    (["--corrupt", "abd daf", "--layers", "2-1"], "--layers: range 2-1 is empty"),
    (["--corrupt", "abd daf", "--layers", "a"], "'a' is neither a layer, 'last' nor a depth fraction"),
    (["--corrupt", "abd daf", "--metric", "prob", "--bad", "a"], "--bad goes with"),
    (["--heads"], "needs --bad TOKEN"),
    (["--corrupt", "abd", "--good", "a", "--bad", "b"], "tokens"),
    (["--corrupt", "abd daf", "--good", "abc def", "--bad", "a"], "not one"),
])
def test_cli_errors(capsys, tiny_path, args, message):
    code, out, err = run_cli(capsys, "sweep", "-m", str(tiny_path), "-t", "1", "-c", "64", "--clean", "abc def", *args)
    assert code == 2 and out == ""
    assert err.startswith("pyinterp: error:") and message in err and err.count("\n") == 1



def test_value_grid_errors():
    from pyinterp.errors import PyinterpError
    from pyinterp.viz.grids import value_grid

    assert value_grid(np.zeros((1, 1)), title="t", row_labels=["0"], col_labels=["a"]).ndim == 3  # constant: no 0/0
    for bad, rows in ((np.array([[np.nan]]), ["0"]), (np.zeros((1, 1)), ["0", "1"])):
        with pytest.raises(PyinterpError, match="finite 2-D table"):
            value_grid(bad, title="t", row_labels=rows, col_labels=["a"])
