"""Patching sweeps and head scans over a prompt set (pyinterp.analysis.set_sweep, ``pyinterp sweep --prompts``): each
example's cells against single runs written here (bit for bit), every aggregate against the same statistic of the
per-example values in the output, the outputs, and errors naming the line."""

from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pytest

import pyinterp
from pyinterp.analysis.patching import logit_diff, prob
from pyinterp.analysis.prompts import load_prompts
from pyinterp.analysis.set_sweep import set_sweep
from pyinterp.analysis.stats import normalized_patching, permutation_p, summarize
from pyinterp.cli import main
from pyinterp.interventions import PatchHead

# 8, 11 and 7 tokens (BOS first); the third row names no answers: --good/--bad apply
ROWS = [{"clean": "abc def", "corrupt": "abd daf", "good": "\x07", "bad": "\x0c"},
        {"clean": "abc def abc", "corrupt": "abd daf abd", "good": "g", "bad": "h"},
        {"clean": "abc de", "corrupt": "abd de"}]
IDS = {"\x07": 7, "\x0c": 12, "g": 103, "h": 104, "a": 97, "b": 98}
LAYERS = [0, 2, 3]


@pytest.fixture(scope="module")
def tiny(tiny_path):
    path = tiny_path("llama")
    with pyinterp.Model(path, n_ctx=64, n_threads=1) as model:
        yield model, path


@pytest.fixture(scope="module")
def set_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("sets-sweep") / "set.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def metric_ids(row: dict) -> tuple[int, int]:
    return IDS[row.get("good", "a")], IDS[row.get("bad", "b")]


def diff(logits: np.ndarray, good: int, bad: int) -> float:
    return float(logits[good]) - float(logits[bad])


def test_patching_cells_are_single_runs_aligned_from_the_end(tiny, set_path):
    model, _ = tiny
    examples = load_prompts(set_path, ["clean", "corrupt"])
    metrics = [logit_diff(*metric_ids(r)) for r in ROWS]
    result = set_sweep(model, examples, metrics, "patch", layers=LAYERS)
    assert result.values.shape == (3, 3, 7) and result.columns == [str(k) for k in range(-7, 0)]
    for i, row in enumerate(ROWS):
        clean, corrupt = model.tokenize(row["clean"]), model.tokenize(row["corrupt"])
        good, bad = metric_ids(row)
        assert result.clean[i] == diff(model.run(clean).logits[-1], good, bad)
        assert result.corrupt[i] == diff(model.run(corrupt).logits[-1], good, bad)
        rows = model.run(clean, capture=["l_out"])
        assert list(result.positions[i]) == list(range(len(clean) - 7, len(clean)))  # -1: each example's last
        for j, il in enumerate(LAYERS):
            for k, pos in enumerate(result.positions[i]):
                logits = model.run(corrupt, patch=[("l_out", il, pos, rows["l_out", il][pos])]).logits[-1]
                assert result.values[i, j, k] == diff(logits, good, bad), (i, il, pos)  # bit for bit
    assert result.tokens[0][-1] == model.token_str(model.tokenize("abc def")[-1])
    assert np.abs(result.values - result.corrupt[:, None, None]).max() > 1e-2  # patching does something


def test_head_scans_are_single_runs(tiny, set_path):
    model, _ = tiny
    examples = load_prompts(set_path, ["clean"])
    metrics = [prob(metric_ids(r)[0]) for r in ROWS]
    ablation = set_sweep(model, examples, metrics, "heads", layers=[1, 3])
    patched = set_sweep(model, examples, metrics, "patch_heads", layers=[1, 3])
    assert ablation.corrupt is None and ablation.normalized() is None
    for i, row in enumerate(ROWS):
        good = metric_ids(row)[0]
        clean, corrupt = model.tokenize(row["clean"]), model.tokenize(row["corrupt"])
        p = lambda logits: float(np.exp(logits[good] - np.logaddexp.reduce(logits.astype(np.float64))))  # noqa: E731
        plain = model.run(clean).logits[-1]
        heads = model.run(clean, capture=["kqv_heads-1", "kqv_heads-3"])
        for j, il in enumerate([1, 3]):
            for h in range(model.n_head):
                ablated = model.run(clean, ablate=[(il, h)]).logits[-1]
                assert ablation.values[i, j, h] == pytest.approx(p(ablated) - p(plain), abs=1e-9)
                logits = model.run(corrupt, interventions=[PatchHead(il, h, heads["kqv_heads", il][:, h], None)])
                assert patched.values[i, j, h] == pytest.approx(p(logits.logits[-1]), abs=1e-9)


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def read_csv(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_cli_aggregates_equal_statistics_of_the_per_example_values(capsys, tmp_path, tiny, set_path):
    model, path = tiny
    agg_csv, per_csv, per_json, png = (tmp_path / n for n in ("agg.csv", "per.csv", "per.json", "sweep.png"))
    base = ["sweep", "-m", str(path), "-t", "1", "-c", "64", "--prompts", str(set_path), "--good", "a", "--bad", "b",
            "--layers", "0,2-3", "--seed", "5"]
    code, out, err = run_cli(capsys, *base, "--json", "--csv", str(agg_csv), "--per-example", str(per_csv),
                             "--png", str(png))
    assert code == 0, err
    data = json.loads(out)
    assert data["layers"] == LAYERS and data["n"] == 3 and data["files"] == [str(per_csv), str(agg_csv), str(png)]
    assert "-1 is each example's last token" in data["alignment"]
    values = np.array([e["values"] for e in data["examples"]])
    clean = np.array([e["clean_value"] for e in data["examples"]])
    corrupt = np.array([e["corrupt_value"] for e in data["examples"]])
    for e, row in zip(data["examples"], ROWS):  # each row's answers, else --good/--bad
        assert e["metric"] == f"logit({row.get('good', 'a')!r}) - logit({row.get('bad', 'b')!r})"
    s = summarize(values, seed=5)
    for stat in ("mean", "std", "low", "high"):
        np.testing.assert_allclose(data["raw"][stat], getattr(s, stat), rtol=0, atol=1e-6)
    np.testing.assert_allclose(data["raw"]["mean"], values.mean(0), atol=1e-6)
    np.testing.assert_allclose(data["raw"]["std"], values.std(0, ddof=1), atol=1e-6)
    np.testing.assert_allclose(data["p"], permutation_p(values, np.broadcast_to(corrupt[:, None, None], values.shape),
                                                        seed=5), atol=1e-6)
    norm = (values - corrupt[:, None, None]) / (clean - corrupt)[:, None, None]
    np.testing.assert_allclose(data["normalized"]["mean"], norm.mean(0), atol=1e-6)
    np.testing.assert_allclose(data["normalized"]["low"], summarize(norm, seed=5).low, atol=1e-6)

    # the CSVs: one row per example and cell with both baselines, one per cell; the same numbers
    per = read_csv(per_csv)
    assert len(per) == 3 * 3 * 7 and per[0].keys() >= {"line", "layer", "column", "position", "token", "clean_value"}
    flat = np.array([float(r["value"]) for r in per]).reshape(3, 3, 7)
    np.testing.assert_array_equal(flat, values)
    assert [float(r["corrupt_value"]) for r in per[::21]] == list(corrupt)
    np.testing.assert_allclose([float(r["normalized"]) for r in per], np.ravel(norm), rtol=1e-12)
    agg = read_csv(agg_csv)
    sf = summarize(flat, seed=5)
    np.testing.assert_array_equal([float(r["mean"]) for r in agg], np.ravel(sf.mean))
    np.testing.assert_array_equal([float(r["high"]) for r in agg], np.ravel(sf.high))
    np.testing.assert_array_equal([float(r["norm_std"]) for r in agg],
                                  np.ravel(summarize(normalized_patching(flat, clean[:, None, None],
                                                                         corrupt[:, None, None]), 5).std))
    image = cv2.imread(str(png))
    assert image is not None and image.shape[0] > 2 * 3 * 22  # the mean above the interval's width

    code, out, err = run_cli(capsys, *base, "--per-example", str(per_json), "--md")
    assert code == 0, err
    assert json.loads(per_json.read_text())[0]["value"] == values[0, 0, 0]
    assert "**raw metric: mean ± half-width of the 95% bootstrap interval**" in out
    assert "| layer | -7 | -6 |" in out and "permutation p-value" in out

    code, out, err = run_cli(capsys, *base, "--heads", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["normalized"] is None and np.array(data["examples"][0]["values"]).shape == (3, model.n_head)
    values = np.array([e["values"] for e in data["examples"]])
    np.testing.assert_allclose(data["raw"]["mean"], values.mean(0), atol=1e-6)
    np.testing.assert_allclose(data["p"], permutation_p(values, np.zeros_like(values), seed=5), atol=1e-6)


@pytest.mark.parametrize("rows, args, message", [
    ([ROWS[0], {"clean": "abc def"}], [], "set.jsonl:2: no 'corrupt' field"),
    ([ROWS[0], ROWS[1], {"clean": "abc def", "corrupt": "abd"}], [], "set.jsonl:3: the clean prompt has 8 tokens"),
    ([{"clean": "abc def", "corrupt": "abd daf", "good": "abc"}], [], "set.jsonl:1: "),
    ([ROWS[0]], ["--clean", "abc"], "--prompts takes the clean and corrupted prompts from the file"),
    ([{"corrupt": "abd daf"}], ["--heads"], "set.jsonl:1: no 'clean' field"),
])
def test_cli_errors_name_the_line(capsys, tmp_path, tiny, rows, args, message):
    _, path = tiny
    prompts = tmp_path / "set.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = run_cli(capsys, "sweep", "-m", str(path), "-t", "1", "-c", "64", "--prompts", str(prompts),
                             "--good", "a", "--bad", "b", *args)
    assert code == 2 and out == ""
    assert err.startswith("pyinterp: error:") and message in err and err.count("\n") == 1
