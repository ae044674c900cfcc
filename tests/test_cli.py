"""The pyinterp command: every flag, its output and files, exit codes and one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest

from pyinterp.cli import main
from pyinterp.tensor_io import load_tensor, save_tensor

PROMPT = "The capital of France is"


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run the command in-process; the context matches the fixtures' (512), so logits compare exactly."""
    code = main(["-c", "512", *args] if args else [])
    out, err = capsys.readouterr()
    return code, out, err


def top_p(logits: np.ndarray) -> float:
    """Probability of the most likely token."""
    x = logits.astype(np.float64)
    return float(1 / np.exp(x - x.max()).sum())


def run_json(capsys, *args: str) -> dict:
    code, out, err = run_cli(capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out)


def test_entry_point_subprocess():
    """The installed console script (or python -m) in a real process: output and exit codes."""
    exe = shutil.which("pyinterp")
    cmd = [exe] if exe else [sys.executable, "-m", "pyinterp.cli"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    done = subprocess.run([*cmd, "-p", PROMPT, "-n", "3"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(PROMPT) and done.stderr == ""
    bad = subprocess.run([*cmd, "-p", PROMPT, "-a", "0:99"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "head 99 out of range" in bad.stderr and "Traceback" not in bad.stderr


def test_prompt_pass_and_generation(capsys, smollm2):
    code, out, _ = run_cli(capsys, "-p", PROMPT)
    assert code == 0 and out.startswith("next token: ' Paris'")
    data = run_json(capsys, "-p", PROMPT, "-n", "6")
    gen = smollm2.generate(PROMPT, 6)
    assert data["generated"]["tokens"] == gen.tokens and data["generated"]["text"] == gen.text
    assert [t["id"] for t in data["prompt_tokens"]] == smollm2.tokenize(PROMPT)


def test_prompt_file(capsys, tmp_path):
    (tmp_path / "p.txt").write_text(PROMPT)
    assert run_json(capsys, "-f", str(tmp_path / "p.txt"))["next_token"][0]["str"] == " Paris"


def test_logit_lens_text_and_json(capsys, smollm2):
    code, out, _ = run_cli(capsys, "-p", PROMPT, "--ll", "l_out", "--ll-topk", "4")
    assert code == 0
    assert out.startswith("norm logit lens of l_out, top 4")
    n = len(smollm2.tokenize(PROMPT))
    assert out.count("\nlayer ") == smollm2.n_layer
    token_lines = [line for line in out.splitlines() if line.startswith("  [")]
    assert len(token_lines) == smollm2.n_layer * n and all(line.count(", ") >= 3 for line in token_lines)
    data = run_json(capsys, "-p", PROMPT, "--ll", "l_out", "--ll-topk", "4", "--raw-lens")
    (lens,) = data["logit_lens"]
    api = smollm2.logit_lens(PROMPT, top_k=4, norm=False)
    assert lens["norm"] is False and len(lens["layers"]) == smollm2.n_layer
    assert [t["id"] for t in lens["layers"][7]["tokens"][2]["top"]] == api.ids[7, 2].tolist()


def test_logit_lens_all_and_png(capsys, tmp_path, smollm2):
    data = run_json(capsys, "-p", PROMPT, "--ll", "all", "--ll-topk", "2", "--ll-png", str(tmp_path / "lens.png"))
    assert [lens["tensor"] for lens in data["logit_lens"]] == ["l_out", "attn_out", "ffn_out", "kqv_out"]
    assert len(data["files"]) == 4
    for path in data["files"]:
        image = cv2.imread(path)
        assert image is not None and image.shape[0] > 200 and image.std() > 10


def test_draw(capsys, tmp_path, smollm2):
    data = run_json(capsys, "-p", PROMPT, "--draw", "--draw-path", str(tmp_path / "attn.png"), "--draw-layers", "0,12")
    assert sorted(os.path.basename(p) for p in data["files"]) == ["attn-L00.png", "attn-L12.png"]
    for path in data["files"]:
        image = cv2.imread(path)
        assert image is not None and min(image.shape[:2]) > 300 and len(np.unique(image.reshape(-1, 3), axis=0)) > 50
    data = run_json(capsys, "-p", PROMPT, "--draw", "--draw-path", str(tmp_path / "all.png"))
    assert len(data["files"]) == smollm2.n_layer


def test_ablate_and_isolate_flags(capsys, smollm2):
    n = smollm2.n_head
    api = smollm2.run(PROMPT, ablate=[(3, 4), (5, 1)]).logits[-1]
    want = top_p(api)
    for spec in [f"{3 * n + 4},{5 * n + 1}", "3:4,5:1", f"{3 * n + 4},5:1"]:
        top = run_json(capsys, "-p", PROMPT, "-a", spec)["next_token"][0]
        assert top["id"] == int(api.argmax()) and top["p"] == pytest.approx(want, rel=1e-5)
    iso = smollm2.run(PROMPT, isolate=(2, 3)).logits[-1]
    top = run_json(capsys, "-p", PROMPT, "-s", "2", "3")["next_token"][0]
    assert top["p"] == pytest.approx(top_p(iso), rel=1e-5)
    gen = run_json(capsys, "-p", PROMPT, "-a", "3:4", "-n", "4")["generated"]["tokens"]
    with smollm2.ablated([(3, 4)]):
        assert gen == smollm2.generate(PROMPT, 4).tokens


def test_interventions_apply_to_the_lens(capsys, smollm2):
    """-a, -s and --patch hold for every pass of a run: the lens and the generation too."""
    data = run_json(capsys, "-p", PROMPT, "-s", "4", "1", "-a", "9:0", "--ll", "l_out", "--ll-topk", "2", "-n", "3")
    with smollm2.isolated(4, 1), smollm2.ablated([(9, 0)]):
        lens = smollm2.logit_lens(PROMPT, top_k=2)
        gen = smollm2.generate(PROMPT, 3)
    got = np.array([[[t["id"] for t in tok["top"]] for tok in layer["tokens"]] for layer in data["logit_lens"][0]["layers"]])
    np.testing.assert_array_equal(got, lens.ids)
    assert not np.array_equal(got, smollm2.logit_lens(PROMPT, top_k=2).ids)
    assert data["generated"]["tokens"] == gen.tokens


@pytest.mark.parametrize("suffix", [".bin", ".npy", ".npz"])
def test_save(capsys, tmp_path, smollm2, suffix):
    path = tmp_path / f"l_out-5{suffix}"
    data = run_json(capsys, "-p", PROMPT, "--save", "l_out-5", str(path))
    assert data["files"] == [str(path)]
    saved = load_tensor(path, smollm2.n_embd, "l_out-5")
    assert saved.tobytes() == smollm2.run(PROMPT, capture=["l_out-5"])["l_out", 5].tobytes()


def test_patch_and_patch_avg(capsys, tmp_path, smollm2):
    clean, corrupt = "The Eiffel Tower is located in the city of", "The Colosseum is located in the city of"
    a, b = tmp_path / "a.bin", tmp_path / "b.npy"
    run_json(capsys, "-p", clean, "--save", "l_out-8", str(a))
    run_json(capsys, "-p", corrupt, "--save", "l_out-8", str(b))
    rows_a, rows_b = load_tensor(a, 576), load_tensor(b, 576)
    api = smollm2.run(corrupt, patch=[("l_out", 8, 3, rows_a[2])]).logits[-1]
    top = run_json(capsys, "-p", corrupt, "--patch", "l_out-8", str(a), "2", "3")["next_token"][0]
    assert top["id"] == int(api.argmax())
    assert top["p"] == pytest.approx(top_p(api), rel=1e-5)
    avg = smollm2.run(corrupt, patch=[("l_out", 8, 3, (rows_a[2] + rows_b[2]) / 2)]).logits[-1]
    top = run_json(capsys, "-p", corrupt, "--patch", "l_out-8", str(a), "2", "3", "--patch-avg", str(b))["next_token"][0]
    assert top["p"] == pytest.approx(top_p(avg), rel=1e-5)


def test_load(capsys, tmp_path, smollm2):
    clean, corrupt = "The Eiffel Tower is located in the city of", "The Colosseum is located in the city of"
    path = tmp_path / "clean.npz"
    run_json(capsys, "-p", clean, "--save", "l_out-6", str(path))
    # replacing every row of l_out-6 with the clean run's gives the clean run's logits from layer 7 on
    loaded = run_json(capsys, "-p", corrupt, "--load", "l_out-6", str(path))["next_token"]
    plain = run_json(capsys, "-p", clean)["next_token"]
    assert [t["id"] for t in loaded] == [t["id"] for t in plain]
    assert loaded[0]["p"] == pytest.approx(plain[0]["p"], rel=1e-4)


def test_print_cgraph(capsys, smollm2):
    code, out, _ = run_cli(capsys, "-p", PROMPT, "--print-cgraph", "-a", "1:2")
    assert code == 0
    lines = out.splitlines()
    assert any(line.startswith("l_out-0 ") and "ADD" in line for line in lines)
    assert any("head mask" in line and "MUL" in line for line in lines)
    assert any(line.startswith("result_output ") and "MUL_MAT" in line for line in lines)


def test_gemma(capsys, tmp_path):
    data = run_json(capsys, "-m", "gemma3", "-p", PROMPT, "--ll", "l_out", "--ll-topk", "1", "--draw",
                    "--draw-layers", "5", "--draw-path", str(tmp_path / "g.png"), "-a", "5:1")
    assert data["model"]["arch"] == "gemma3" and len(data["logit_lens"][0]["layers"]) == 18
    assert os.path.exists(tmp_path / "g-L5.png")


@pytest.mark.parametrize("args, code, message", [
    ([], 2, "exactly one of -p/--prompt and -f/--file"),
    (["-p", "x", "-f", "y"], 2, "exactly one of"),
    (["-f", "/nonexistent/prompt.txt"], 2, "cannot read prompt file"),
    (["-m", "/nonexistent.gguf", "-p", "x"], 1, "model file not found"),
    (["-p", "x", "--ll", "nope"], 2, "unknown tensor name 'nope'"),
    (["-p", "x", "--save", "nope-3", "/tmp/x.bin"], 2, "unknown tensor name 'nope'"),
    (["-p", "x", "--save", "l_out", "/tmp/x.bin"], 2, "expected NAME-LAYER"),
    (["-p", "x", "-a", "300"], 2, "head index 300 out of range"),
    (["-p", "x", "-a", "30:0"], 2, "layer 30 out of range"),
    (["-p", "x", "-s", "0", "9"], 2, "head 9 out of range"),
    (["-p", "x", "--draw", "--draw-layers", "31"], 2, "layer 31 out of range"),
    (["-p", "x", "--ll-png", "/tmp/x.png"], 2, "--ll-png needs --ll"),
    (["-p", "x", "--patch-avg", "/tmp/x.bin"], 2, "--patch-avg goes with --patch"),
    (["-p", "x", "-n", "-1"], 2, "must be >= 0"),
    (["-p", "word " * 50, "-c", "16"], 2, "context holds 16"),
    (["-p", "x", "--bogus"], 2, "No such option"),
])
def test_errors(capsys, args, code, message):
    got, out, err = run_cli(capsys, *args)
    assert got == code, err
    assert message in err and err.count("\n") == 1 and err.startswith("pyinterp: error: ")


def test_file_errors(capsys, tmp_path):
    bad = tmp_path / "wrong.bin"
    save_tensor(bad, np.zeros((3, 100)))
    got, _, err = run_cli(capsys, "-p", PROMPT, "--patch", "l_out-3", str(bad), "0", "1")
    assert got == 2 and "not whole rows of 576" in err
    good = tmp_path / "good.bin"
    save_tensor(good, np.zeros((2, 576)))
    got, _, err = run_cli(capsys, "-p", PROMPT, "--patch", "l_out-3", str(good), "5", "1")
    assert got == 2 and "row 5 out of range" in err
    got, _, err = run_cli(capsys, "-p", PROMPT, "--patch", "l_out-3", str(good), "0", "40")
    assert got == 2 and "position 40 out of range" in err
    got, _, err = run_cli(capsys, "-p", PROMPT, "--draw", "--draw-layers", "0", "--draw-path", "/nonexistent/dir/a.png")
    assert got == 1 and "cannot write PNG" in err and err.count("\n") == 1
    truncated = tmp_path / "t.gguf"
    truncated.write_bytes(b"GGUF" + b"\0" * 100)
    got, _, err = run_cli(capsys, "-m", str(truncated), "-p", PROMPT)
    assert got == 1 and "cannot load model" in err and err.count("\n") == 1
