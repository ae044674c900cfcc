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

from pyinterp import InputError
from pyinterp.cli import main
from pyinterp.cli.prompt import process_escapes
from pyinterp.io.tensor_io import load_tensor, save_tensor

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
    cmd = [exe] if exe else [sys.executable, "-m", "pyinterp"]
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


def prompt_ids(data: dict) -> list[int]:
    return [t["id"] for t in data["prompt_tokens"]]


def test_prompt_file(capsys, tmp_path, smollm2):
    """-f reads the bytes as they are and drops one trailing newline, as llama-cli does."""
    path = tmp_path / "p.txt"
    for text, prompt in [(PROMPT, PROMPT), (PROMPT + "\n", PROMPT), (PROMPT + "\n\n", PROMPT + "\n"),
                         ("Q?\r\nA:\r\n", "Q?\r\nA:\r")]:
        path.write_bytes(text.encode())
        data = run_json(capsys, "-f", str(path))
        assert prompt_ids(data) == smollm2.tokenize(prompt), repr(text)
    path.write_bytes((PROMPT + "\n").encode())
    assert run_json(capsys, "-f", str(path))["next_token"][0]["str"] == " Paris"
    path.write_bytes(b"caf\xe9")
    code, _, err = run_cli(capsys, "-f", str(path))
    assert code == 2 and "is not UTF-8 text" in err and err.count("\n") == 1


def test_prompt_escapes(capsys, tmp_path, smollm2):
    """Escapes are expanded by default (-e/--escape), in -p and -f prompts alike; --no-escape keeps them."""
    typed = "Question: What is the capital of France?\\nAnswer:"  # what the shell passes for '...?\nAnswer:'
    meant = "Question: What is the capital of France?\nAnswer:"
    assert prompt_ids(run_json(capsys, "-p", typed)) == smollm2.tokenize(meant)
    assert prompt_ids(run_json(capsys, "-e", "-p", typed)) == smollm2.tokenize(meant)
    assert prompt_ids(run_json(capsys, "--no-escape", "-p", typed)) == smollm2.tokenize(typed)
    (tmp_path / "p.txt").write_text(typed + "\n")
    assert prompt_ids(run_json(capsys, "-f", str(tmp_path / "p.txt"))) == smollm2.tokenize(meant)


@pytest.mark.parametrize("typed, meant", [
    # llama.cpp common.cpp string_process_escapes: these six, and \x with exactly two hex digits (one byte)
    (r"a\nb\rc\td\'e\"f\\g", "a\nb\rc\td'e\"f\\g"),
    (r"\x41\x4a!", "AJ!"),
    (r"\xc3\xa9t\xC3\xA9", "été"),  # bytes, so two escapes make one UTF-8 character
    (r"\x4 \xg1 \x", r"\x4 \xg1 \x"),  # not two hex digits: kept
    (r"\q \0 \a \u00e9", r"\q \0 \a \u00e9"),  # other escapes: kept
    (r"\\n", r"\n"),  # an escaped backslash, then a plain n
    ("end\\", "end\\"),  # a backslash at the end: kept
    ("é\\tè", "é\tè"),
])
def test_process_escapes(typed, meant):
    assert process_escapes(typed) == meant


def test_process_escapes_bad_utf8():
    with pytest.raises(InputError, match="not UTF-8 text once its escapes are expanded"):
        process_escapes(r"\xff")


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


@pytest.mark.parametrize("name, terms", [
    ("smollm2", ["embd", "attn_out", "ffn_out", "l_out"]),
    # Gemma adds the scaled embedding and the post-normed attention and FFN outputs to its residual stream
    ("gemma3", ["inp_scaled", "attn_post_norm", "ffn_post_norm", "l_out"]),
])
def test_logit_lens_all_and_png(capsys, tmp_path, request, name, terms):
    """--ll all lenses exactly the residual-stream terms and says which."""
    model = request.getfixturevalue(name)
    data = run_json(capsys, "-m", name, "-p", PROMPT, "--ll", "all", "--ll-topk", "2", "--ll-png", str(tmp_path / "lens.png"))
    assert data["lensed"] == terms and [lens["tensor"] for lens in data["logit_lens"]] == terms
    layers = [[layer["layer"] for layer in lens["layers"]] for lens in data["logit_lens"]]
    assert layers == [["embd"]] + [list(range(model.n_layer))] * 3
    assert sorted(data["files"]) == sorted(str(tmp_path / f"lens-{t}.png") for t in terms)
    for path in data["files"]:
        image = cv2.imread(path)
        assert image is not None and image.shape[0] > 100 and image.std() > 10
    # the residual terms add up to the residual (numpy, from captures): these are the stream's terms
    trace = model.run(PROMPT, capture=terms)
    total = trace[terms[0], -1] + sum(trace[t, il] for il in range(model.n_layer) for t in terms[1:3])
    np.testing.assert_allclose(total, trace[terms[3], model.n_layer - 1], atol=2e-3 * np.abs(total).max())
    code, out, _ = run_cli(capsys, "-m", name, "-p", PROMPT, "--ll", "all", "--ll-topk", "1")
    assert code == 0 and out.startswith(f"lensed: {', '.join(terms)}\n")
    assert [line for line in out.splitlines() if "logit lens of" in line] == [f"norm logit lens of {t}, top 1" for t in terms]


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_logit_lens_of_the_embedding(capsys, request, name):
    """--ll embd: the embedding term of the model's residual stream (Gemma: scaled), shown as layer embd."""
    model = request.getfixturevalue(name)
    data = run_json(capsys, "-m", name, "-p", PROMPT, "--ll", "embd", "--ll-topk", "3")
    (lens,) = data["logit_lens"]
    assert data["lensed"] == [lens["tensor"]] == [{"smollm2": "embd", "gemma3": "inp_scaled"}[name]]
    (layer,) = lens["layers"]
    assert layer["layer"] == "embd"
    api = model.logit_lens(PROMPT, tensor=lens["tensor"], top_k=3)
    assert [[t["id"] for t in tok["top"]] for tok in layer["tokens"]] == api.ids[0].tolist()
    code, out, _ = run_cli(capsys, "-m", name, "-p", PROMPT, "--ll", "embd", "--ll-topk", "1")
    assert code == 0 and "\nlayer embd:\n" in out and out.count("\nlayer ") == 1
    # another tensor outside the layers is not the embedding: its row stays layer -1
    assert [layer["layer"] for layer in run_json(capsys, "-m", name, "-p", PROMPT, "--ll", "result_norm",
                                                 "--ll-topk", "1")["logit_lens"][0]["layers"]] == [-1]


def test_logit_lens_of_one_layer(capsys, smollm2):
    data = run_json(capsys, "-p", PROMPT, "--ll", "l_out-5", "--ll-topk", "3")
    (lens,) = data["logit_lens"]
    assert lens["tensor"] == "l_out" and [layer["layer"] for layer in lens["layers"]] == [5]
    full = smollm2.logit_lens(PROMPT, top_k=3)
    assert [[t["id"] for t in tok["top"]] for tok in lens["layers"][0]["tokens"]] == full.ids[5].tolist()
    code, out, _ = run_cli(capsys, "-p", PROMPT, "--ll", "ffn_out-29", "--ll-topk", "1")
    assert code == 0 and out.count("\nlayer ") == 1 and "\nlayer 29:\n" in out


def test_draw(capsys, tmp_path, monkeypatch, smollm2):
    data = run_json(capsys, "-p", PROMPT, "--draw", str(tmp_path / "attn.png"), "--draw-layers", "0,12")  # MIA's form
    assert sorted(os.path.basename(p) for p in data["files"]) == ["attn-L00.png", "attn-L12.png"]
    for path in data["files"]:
        image = cv2.imread(path)
        assert image is not None and min(image.shape[:2]) > 300 and len(np.unique(image.reshape(-1, 3), axis=0)) > 50
    data = run_json(capsys, "-p", PROMPT, "--draw", "--draw-path", str(tmp_path / "all.png"))
    assert len(data["files"]) == smollm2.n_layer
    # --draw-path alone draws too; --draw alone draws to attention-L<layer>.png
    (path,) = run_json(capsys, "-p", PROMPT, "--draw-path", str(tmp_path / "b.png"), "--draw-layers", "3")["files"]
    assert os.path.dirname(path) == str(tmp_path) and os.path.basename(path) in ("b-L3.png", "b-L03.png")
    monkeypatch.chdir(tmp_path)
    (path,) = run_json(capsys, "-p", PROMPT, "--draw", "--draw-layers", "4")["files"]
    assert path in ("attention-L4.png", "attention-L04.png") and os.path.exists(path)


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
    assert any(line.startswith("attn_scores-1 (scaled)") and "MUL" in line for line in lines)
    assert any(line.startswith("result_output ") and "MUL_MAT" in line for line in lines)


def test_gemma(capsys, tmp_path):
    data = run_json(capsys, "-m", "gemma3", "-p", PROMPT, "--ll", "l_out", "--ll-topk", "1", "--draw",
                    "--draw-layers", "5", "--draw-path", str(tmp_path / "g.png"), "-a", "5:1")
    assert data["model"]["arch"] == "gemma3" and len(data["logit_lens"][0]["layers"]) == 18
    assert os.path.exists(tmp_path / "g-L5.png")


def test_flash_and_kv_cache_flags(capsys):
    """-fa/-ctk/-ctv as llama-cli spells them reach the Model: the same distribution as the Python API with
    the same settings, and a different one from the default explicit path (flash attention sums differently)."""
    import pyinterp

    with pyinterp.Model("smollm2", n_ctx=512, flash_attn=True, type_k="q8_0", type_v="q8_0") as model:
        want = model.run(PROMPT).logits[-1]
    got = run_json(capsys, "-p", PROMPT, "-fa", "on", "-ctk", "q8_0", "-ctv", "q8_0")["next_token"][0]
    assert got["str"] == " Paris" and got["p"] == pytest.approx(top_p(want), abs=1e-6)
    default = run_json(capsys, "-p", PROMPT)["next_token"][0]
    assert default["p"] != pytest.approx(got["p"], abs=1e-6)


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
    (["-p", "x", "--draw", "a.png", "--draw-path", "b.png"], 2, "two drawing paths"),
    (["-p", "x", "--draw-layers", "3"], 2, "--draw-layers goes with --draw"),
    (["-p", "x", "--ll-topk", "3"], 2, "--ll-topk needs --ll"),
    (["-p", "x", "--raw-lens"], 2, "--raw-lens needs --ll"),
    (["-p", "x", "--ll", "l_out-30"], 2, "l_out is not computed on layer 30 (it is on layers 0..29)"),
    (["-p", "x", "--ll", "embd-3"], 2, "embd is not computed on layer 3"),
    (["-p", "x", "--ll", "attn_scores"], 2, "not a residual-width tensor"),
    (["-p", "x", "--ll", "nope-3"], 2, "unknown tensor name 'nope'"),
    (["-p", "x", "--ll-png", "/tmp/x.png"], 2, "--ll-png needs --ll"),
    (["-p", "x", "--patch-avg", "/tmp/x.bin"], 2, "--patch-avg goes with --patch"),
    (["-p", "x", "-n", "-1"], 2, "must be >= 0"),
    (["-p", "word " * 50, "-c", "16"], 2, "context holds 16"),
    (["-p", "x", "--bogus"], 2, "No such option"),
    (["-p", "x", "-ctk", "q9"], 2, "type_k must be one of f32, f16"),
    (["-p", "x", "-ctv", "q8_0"], 2, "quantized V cache (q8_0) needs flash attention"),
    (["-p", "x", "-fa", "sometimes"], 2, "Invalid value for '-fa'"),
])
def test_errors(capsys, args, code, message):
    got, out, err = run_cli(capsys, *args)
    assert got == code, err
    assert message in err and err.count("\n") == 1 and err.startswith("pyinterp: error: ")


def test_patch_checks_the_stored_name(capsys, tmp_path):
    """A .npz saved from l_out-8 is not patched into l_out-12."""
    path = tmp_path / "clean.npz"
    run_json(capsys, "-p", PROMPT, "--save", "l_out-8", str(path))
    got, _, err = run_cli(capsys, "-p", PROMPT, "--patch", "l_out-12", str(path), "0", "1")
    assert got == 2 and err.count("\n") == 1
    assert "holds l_out-8 (shape [5, 576]), not l_out-12 (rows of 576 values)" in err
    got, _, err = run_cli(capsys, "-p", PROMPT, "--load", "l_out-12", str(path))
    assert got == 2 and "not l_out-12" in err


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
