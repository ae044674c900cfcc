"""``pyinterp sae`` on a tiny random model and a random SAE saved to disk: the JSON against the Python API and a
numpy encode of the captured activation, the table, the heatmap, --steer against plain runs, and one-line
errors."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

import pyinterp
from pyinterp.cli import main
from pyinterp.analysis.sae import random_sae, sae_features

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import tiny_gguf  # noqa: E402

PROMPT = "The tiny model reads this"
HOOK = "blocks.1.hook_resid_post"
D_SAE = 200
DEAD = 7  # a feature whose encoder bias keeps it at 0 on every token


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_path):
    """The tiny model's GGUF and SAE directories: the SAE under test, one of the wrong width, a broken cfg."""
    root = tmp_path_factory.mktemp("cli_sae")
    gguf = tiny_path("llama")
    sae = random_sae(tiny_gguf.SPECS["llama"].n_embd, D_SAE, "standard", seed=4, hook_name=HOOK)
    b_enc = sae.b_enc.copy()
    b_enc[DEAD] = -1e3
    replace(sae, b_enc=b_enc).save(root / "sae")
    random_sae(64, 20, hook_name=HOOK).save(root / "narrow")
    (root / "broken").mkdir()
    (root / "broken" / "cfg.json").write_text("{")
    return {"gguf": gguf, "sae": root / "sae", "narrow": root / "narrow", "broken": root / "broken", "root": root}


@pytest.fixture(scope="module")
def tiny(files):
    with pyinterp.Model(files["gguf"], n_ctx=64, n_threads=1) as model:
        yield model


def run_sae(capsys, files, *args: str) -> tuple[int, str, str]:
    """``pyinterp sae`` in-process on the tiny model, its context and threads as the fixture's."""
    code = main(["sae", *args, "-m", str(files["gguf"]), "-c", "64", "-t", "1"])
    out, err = capsys.readouterr()
    return code, out, err


def sae_json(capsys, files, *args: str) -> dict:
    code, out, err = run_sae(capsys, files, str(files["sae"]), "-p", PROMPT, "--json", *args)
    assert code == 0, err
    return json.loads(out)


def probs(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    p = np.exp(x - x.max())
    return p / p.sum()


def test_json_matches_the_api_and_numpy(capsys, files, tiny):
    data = sae_json(capsys, files, "--top", "6")
    sae = pyinterp.SAE.load(files["sae"])
    want = sae_features(tiny, sae, PROMPT, top_k=6)
    assert data["sae"]["hook_name"] == HOOK and data["sae"]["tensor"] == "l_out-1" and data["sae"]["d_sae"] == D_SAE
    assert data["top"] == 6 and data["files"] == [] and "steer" not in data
    tokens = data["tokens"]
    assert [t["id"] for t in tokens] == tiny.prompt_ids(PROMPT) and [t["str"] for t in tokens] == want.token_strs
    assert [t["position"] for t in tokens] == list(range(len(tokens)))
    np.testing.assert_array_equal([t["l0"] for t in tokens], want.l0)
    np.testing.assert_allclose([t["rel_error"] for t in tokens], want.rel_error, rtol=1e-5)
    np.testing.assert_allclose([t["cosine"] for t in tokens], want.cosine, rtol=1e-5)
    # the activation encoded in numpy: the same top features (this random SAE keeps many more than 6 active)
    f = sae.encode(tiny.run(PROMPT, capture=["l_out-1"]).act("l_out", 1))
    for t, token in enumerate(tokens):
        ids = [e["id"] for e in token["features"]]
        values = [e["value"] for e in token["features"]]
        assert ids == want.ids[t].tolist() and len(ids) == 6
        np.testing.assert_allclose(values, want.values[t], atol=1e-5)
        np.testing.assert_allclose(values, np.sort(f[t])[::-1][:6], rtol=1e-4, atol=1e-4)
        assert ids == np.argsort(-f[t], kind="stable")[:6].tolist()
        assert token["l0"] == int((f[t] > 0).sum()) and DEAD not in ids


def test_table_has_one_row_per_token(capsys, files, tiny):
    code, out, err = run_sae(capsys, files, str(files["sae"]), "-p", PROMPT, "--top", "3")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"SAE {HOOK} -> l_out-1 (standard, d_in 128, d_sae {D_SAE})")
    assert lines[1].split()[:5] == ["pos", "token", "L0", "rel.err", "cosine"]
    rows = lines[2:]
    want = sae_features(tiny, pyinterp.SAE.load(files["sae"]), PROMPT, top_k=3)
    assert len(rows) == len(want.tokens) == len(tiny.prompt_ids(PROMPT))
    for t, row in enumerate(rows):
        assert row.split()[0] == str(t)
        assert repr(want.token_strs[t]) in row
        *_, l0, rel, cos, a, b, c = row.split()
        assert int(l0) == want.l0[t]
        assert float(rel) == pytest.approx(want.rel_error[t], abs=1e-3)
        assert float(cos) == pytest.approx(want.cosine[t], abs=1e-3)
        pairs = [p.split(":") for p in (a, b, c)]
        assert [int(j) for j, _ in pairs] == want.ids[t].tolist()
        np.testing.assert_allclose([float(v) for _, v in pairs], want.values[t], atol=1e-3)


def test_png_heatmap(capsys, files, tiny, tmp_path):
    png = tmp_path / "feats.png"
    code, out, err = run_sae(capsys, files, str(files["sae"]), "-p", PROMPT, "--top", "2", "--png", str(png))
    assert code == 0, err
    assert out.splitlines()[-1] == f"wrote {png}"
    image = cv2.imread(str(png))
    assert image is not None and image.ndim == 3
    want = sae_features(tiny, pyinterp.SAE.load(files["sae"]), PROMPT, top_k=2)
    n_features, n_tokens = len(set(want.ids.ravel().tolist()) - {-1}), len(want.tokens)
    height, width = image.shape[:2]
    assert 22 * n_features < height < 22 * n_features + 400  # a row per feature, a title and token labels
    assert 20 * n_tokens < width < 60 * n_tokens + 400  # a column per token and the colour bar
    # coloured cells, from dark purple to yellow (viridis in BGR), not just text on white
    b, g, r = (image[..., i].astype(int) for i in range(3))
    assert np.mean((r > 200) & (g > 200) & (b < 80)) > 0 and np.mean((r < 90) & (b > 60) & (g < 40)) > 0.05
    code, out, _ = run_sae(capsys, files, str(files["sae"]), "-p", PROMPT, "--json", "--png", str(tmp_path / "b.png"))
    assert code == 0 and json.loads(out)["files"] == [str(tmp_path / "b.png")]


def test_steer(capsys, files, tiny):
    ids = tiny.prompt_ids(PROMPT)
    plain = probs(tiny.run(PROMPT).logits[-1])
    f = pyinterp.SAE.load(files["sae"]).encode(tiny.run(PROMPT, capture=["l_out-1"]).act("l_out", 1))
    assert np.all(f[:, DEAD] == 0)
    active = int(np.argmax(f[-1]))

    for edits in (["--steer", f"{DEAD}=0"], ["--steer", f"{DEAD}=0", "--steer", f"{active}=1", "--scale"]):
        data = sae_json(capsys, files, *edits)
        steer = data["steer"]
        assert steer["scale"] == ("--scale" in edits) and steer["last_token"] == tiny.token_str(ids[-1])
        assert [t["id"] for t in steer["before"]] == np.argsort(-plain)[:5].tolist()
        np.testing.assert_allclose([t["p"] for t in steer["before"]], np.sort(plain)[::-1][:5], atol=1e-5)
        assert [t["id"] for t in steer["after"]] == [t["id"] for t in steer["before"]]
        np.testing.assert_allclose([t["p"] for t in steer["after"]], [t["p"] for t in steer["before"]], atol=1e-4)

    data = sae_json(capsys, files, "--steer", f"{DEAD}=60")
    assert data["steer"]["edits"] == {str(DEAD): 60.0}
    before = {t["id"]: t["p"] for t in data["steer"]["before"]}
    after = {t["id"]: t["p"] for t in data["steer"]["after"]}
    assert before != after
    assert max(abs(after.get(i, 0) - before.get(i, 0)) for i in before.keys() | after.keys()) > 1e-2
    # the features themselves are the plain run's
    assert data["tokens"] == sae_json(capsys, files)["tokens"]

    code, out, err = run_sae(capsys, files, str(files["sae"]), "-p", PROMPT, "--steer", f"{DEAD}=60")
    assert code == 0, err
    tail = out.splitlines()[-3:]
    assert tail[0].startswith(f"steering features at every token: {DEAD} clamped to 60")
    assert tail[1].startswith("  before: ") and tail[2].startswith("  after:  ")


@pytest.mark.parametrize("args, message", [
    (["{root}/missing", "-p", "a"], "cannot read {root}/missing/cfg.json"),
    (["{broken}", "-p", "a"], "cfg.json is not JSON"),
    (["{narrow}", "-p", "a"], "the SAE reads 64 values per token but l_out-1's rows have 128"),
    (["{sae}"], "Missing option '-p'"),
    (["{sae}", "-p", "a", "--steer", "x=1"], "expected FEATURE=VALUE"),
    (["{sae}", "-p", "a", "--steer", "3"], "expected FEATURE=VALUE"),
    (["{sae}", "-p", "a", "--steer", "3=abc"], "expected FEATURE=VALUE"),
    (["{sae}", "-p", "a", "--steer", "3=nan"], "expected FEATURE=VALUE"),
    (["{sae}", "-p", "a", "--steer", f"{D_SAE}=1"], f"feature {D_SAE} out of range"),
    (["{sae}", "-p", "a", "--steer", "-1=1"], "feature -1 out of range"),
    (["{sae}", "-p", "a", "--steer", "3=1", "--steer", "3=2"], "feature 3 given twice"),
    (["{sae}", "-p", "a", "--scale"], "--scale goes with --steer"),
    (["{sae}", "-p", "a", "--top", "0"], "--top"),
    (["{sae}", "-p", "a", "--top", str(D_SAE + 1)], f"more than the SAE's {D_SAE} features"),
])
def test_errors_are_one_line(capsys, files, args, message):
    paths = {name: str(path) for name, path in files.items()}
    code, out, err = run_sae(capsys, files, *(a.format(**paths) for a in args))
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("pyinterp: error: ")
    assert message.format(**paths) in err


def test_listed_in_the_main_help(capsys):
    assert main(["--help"]) == 0
    assert "pyinterp sae" in capsys.readouterr().out
