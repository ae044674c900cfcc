"""Outputs a researcher uses as they are: the sweeps' baselines beside the cells (JSON, CSV), the interventions
echoed (text, JSON), and the attention weights as numbers (``--attn-out FILE.npz|csv``)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from pyinterp.cli import main

PROMPT = "The capital of France is"
CLEAN = "The Eiffel Tower is located in the city of"
CORRUPT = "The Colosseum is located in the city of"


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([args[0], "-c", "512", *args[1:]] if args and args[0] == "sweep" else ["-c", "512", *args])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *args: str) -> dict:
    code, out, err = run_cli(capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out)


def logit_diff(model, text: str, good: str, bad: str) -> float:
    """logit(good) - logit(bad) at the last token of a plain run (both single tokens)."""
    [g], [b] = model.tokenize(good, add_bos=False), model.tokenize(bad, add_bos=False)
    logits = model.run(text).logits[-1].astype(np.float64)
    return float(logits[g] - logits[b])


def test_sweep_baselines_in_json_and_csv(capsys, smollm2, tmp_path):
    clean_value = logit_diff(smollm2, CLEAN, " Paris", " Rome")
    corrupt_value = logit_diff(smollm2, CORRUPT, " Paris", " Rome")
    path = tmp_path / "sweep.csv"
    data = run_json(capsys, "sweep", "--clean", CLEAN, "--corrupt", CORRUPT, "--good", " Paris", "--bad", " Rome",
                    "--layers", "0", "--csv", str(path))
    assert data["baselines"]["clean"] == pytest.approx(clean_value, abs=1e-4)
    assert data["baselines"]["corrupt"] == pytest.approx(corrupt_value, abs=1e-4)
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0][-2:] == ["baseline_clean", "baseline_corrupt"] and len(rows) == 2  # one layer
    assert float(rows[1][-2]) == pytest.approx(clean_value, abs=1e-4)
    assert float(rows[1][-1]) == pytest.approx(corrupt_value, abs=1e-4)
    assert [float(v) for v in rows[1][1:-2]] == pytest.approx(data["values"][0], abs=1e-4)  # the cells stay

    data = run_json(capsys, "sweep", "--clean", CLEAN, "--heads", "--good", " Paris", "--bad", " Rome", "--layers", "0",
                    "--csv", str(path))
    assert list(data["baselines"]) == ["plain"]
    assert data["baselines"]["plain"] == pytest.approx(clean_value, abs=1e-4)
    with open(path, newline="", encoding="utf-8") as f:
        header, row = list(csv.reader(f))
    assert header == ["layer", *map(str, range(smollm2.n_head)), "baseline_plain"]
    assert float(row[-1]) == pytest.approx(clean_value, abs=1e-4)


def test_interventions_echoed(capsys, smollm2, tmp_path):
    index = 211
    layer, head = index // smollm2.n_head, index % smollm2.n_head  # MIA's global head index
    saved = tmp_path / "l_out-3.npy"
    run_cli(capsys, "-p", PROMPT, "--save", "l_out-3", str(saved))
    args = ["-p", PROMPT, "-a", f"{index},5:1", "-s", "2", "3", "--patch", "l_out-3", str(saved), "1", "2"]
    data = run_json(capsys, *args)
    ablate = [r for r in data["interventions"] if r["kind"] == "ablate"]
    assert [(r["layer"], r["head"], r["option"]) for r in ablate] == [(layer, head, "-a 211"), (5, 1, "-a 5:1")]
    [isolate] = [r for r in data["interventions"] if r["kind"] == "isolate"]
    assert (isolate["layer"], isolate["head"]) == (2, 3)
    assert isolate["ablated_heads"] == [h for h in range(smollm2.n_head) if h != 3]
    [patch] = [r for r in data["interventions"] if r["kind"] == "patch"]
    assert (patch["tensor"], patch["layer"], patch["file"], patch["rows"]) == ("l_out", 3, str(saved),
                                                                                [{"from": 1, "to": 2}])
    code, out, _ = run_cli(capsys, *args)
    assert code == 0
    lines = [line for line in out.splitlines() if line.startswith("intervention: ")]
    assert lines[0] == f"intervention: ablate head {head} of layer {layer} (-a 211)"
    assert len(lines) == 4 and "isolate head 3 of layer 2" in lines[3] and "row 1 -> position 2" in lines[2]
    assert run_json(capsys, "-p", PROMPT)["interventions"] == []


@pytest.mark.parametrize("layers", ["0,12", None])
def test_attn_out_npz(capsys, smollm2, tmp_path, layers):
    path = tmp_path / "attn.npz"
    data = run_json(capsys, "-p", PROMPT, "--attn-out", str(path), *(["--draw-layers", layers] if layers else []))
    assert data["files"] == [str(path)]
    want = [0, 12] if layers else list(range(smollm2.n_layer))
    trace = smollm2.run(PROMPT, capture=[f"attn_scores-{il}" for il in want])
    with np.load(path, allow_pickle=False) as z:
        assert z["layers"].tolist() == want and sorted(z.files) == sorted(
            ["layers", "tokens", "token_ids", *(f"layer_{il}" for il in want)])
        assert z["tokens"].tolist() == trace.token_strs and z["token_ids"].tolist() == list(trace.tokens)
        for il in want:
            assert z[f"layer_{il}"].shape == (smollm2.n_head, len(trace.tokens), len(trace.tokens))
            np.testing.assert_array_equal(z[f"layer_{il}"], trace.attention(il))


def test_attn_out_csv(capsys, smollm2, tmp_path):
    path = tmp_path / "attn.csv"
    run_json(capsys, "-p", PROMPT, "--attn-out", str(path), "--draw-layers", "5")
    attn = smollm2.run(PROMPT, capture=["attn_scores-5"]).attention(5)
    tokens = smollm2.run(PROMPT).token_strs
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    n = len(tokens)
    assert len(rows) == smollm2.n_head * n * n
    got = np.zeros_like(attn)
    for row in rows:
        assert row["layer"] == "5"
        h, q, k = int(row["head"]), int(row["query"]), int(row["key"])
        assert (row["query_token"], row["key_token"]) == (tokens[q], tokens[k])
        got[h, q, k] = float(row["weight"])
    np.testing.assert_allclose(got, attn, rtol=1e-7, atol=0)
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)  # each query's weights sum to 1


@pytest.mark.parametrize("args, code, message", [
    (["--attn-out", "attn.png"], 2, "must end in .npz or .csv"),
    (["--attn-out", "/nonexistent/dir/attn.npz"], 1, "attn.npz"),
    (["--draw-layers", "3"], 2, "--draw-layers goes with --draw or --attn-out"),
])
def test_attn_out_errors(capsys, args, code, message):
    got, out, err = run_cli(capsys, "-p", PROMPT, *args)
    assert got == code and out == ""
    assert err.startswith("pyinterp: error:") and message in err and err.count("\n") == 1
