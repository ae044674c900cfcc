"""What every command shares: the model options reach the Model on each command (and take effect), one
layer-list syntax, one-line errors for bad command-line inputs, streamed generation and Ctrl-C."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pyinterp import InputError
from pyinterp import model as model_module
from pyinterp.cli.main import main, subcommands
from pyinterp.cli.options import parse_layers
from pyinterp.cli.prompt import stream_generation
from pyinterp.analysis.sae import random_sae

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import tiny_gguf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The tiny model reads this"
LONG = "a b c d " * 10  # more than 16 tokens


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_path):
    """The tiny model (4 layers, Q8_0), an SAE on it, prompt pairs for cvector, and F32-copy cache."""
    root = tmp_path_factory.mktemp("cli_options")
    (root / "llama.gguf").symlink_to(tiny_path("llama"))
    random_sae(tiny_gguf.SPECS["llama"].n_embd, 20, hook_name="blocks.1.hook_resid_post").save(root / "sae")
    (root / "pos.txt").write_text("I love this\nA fine day\n")
    (root / "neg.txt").write_text("I hate this\nA grim day\n")
    (root / "cache").mkdir()
    return root


def commands(root: Path, prompt: str) -> dict[str, list[str]]:
    """Each command, run on the tiny model with ``prompt``."""
    return {
        "main": ["-p", prompt],
        "sweep": ["sweep", "--clean", prompt, "--heads", "--metric", "prob", "--layers", "1"],
        "heads": ["heads", "-p", prompt],
        "sae": ["sae", str(root / "sae"), "-p", prompt],
        "cvector": ["cvector", "--positive-file", str(root / ("long.txt" if prompt == LONG else "pos.txt")),
                    "--negative-file", str(root / "neg.txt"), "-o", str(root / "cv.gguf")],
        "fidelity": ["fidelity", "-p", prompt],
    }


def run(capsys, monkeypatch, root: Path, args: list[str]) -> tuple[int, str, str]:
    """``pyinterp ARGS`` in-process on the tiny model, by default with 1 thread and a context of 256 (its
    training context is 512)."""
    monkeypatch.setenv("PYINTERP_CACHE", str(root / "cache"))
    head, tail = (args[:1], args[1:]) if args and args[0] in subcommands() else ([], args)
    code = main([*head, "-m", str(root / "llama.gguf"), "-t", "1", "-c", "256", *tail])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str) -> None:
    assert code == 2, err
    assert err.startswith("pyinterp: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and "internal error" not in err


@pytest.mark.parametrize("command", ["main", "sweep", "heads", "sae", "cvector", "fidelity"])
def test_every_command_takes_the_model_options(capsys, monkeypatch, files, command):
    """The options reach Model(...) as given (every Model the command opens), and the command runs."""
    opened = []
    real_init = model_module.Model.__init__

    def spy(self, path=None, **kwargs):
        opened.append(kwargs)
        real_init(self, path, **kwargs)

    monkeypatch.setattr(model_module.Model, "__init__", spy)
    args = [*commands(files, PROMPT)[command], "-t", "1", "-c", "256", "-fa", "on", "-ctk", "f16", "-ctv", "f16",
            "-ngl", "0"]
    code, out, err = run(capsys, monkeypatch, files, args)
    assert code == 0, err
    want = {"n_ctx": 256, "n_threads": 1, "n_gpu_layers": 0, "flash_attn": True, "type_k": "f16", "type_v": "f16",
            "rpc": None, "verbose": False}
    assert opened and all(kwargs == want for kwargs in opened), opened
    assert len(opened) == (2 if command == "fidelity" else 1)


@pytest.mark.parametrize("command", ["main", "sweep", "heads", "sae", "cvector", "fidelity"])
@pytest.mark.parametrize("options, message", [
    (["-c", "16"], "context holds 16"),                      # -c reaches the context
    (["-ctv", "q8_0"], "quantized V cache (q8_0) needs flash attention"),  # -fa off is the default
    (["-fa", "on", "-ctk", "q9"], "type_k must be one of"),
    (["--rpc", "nohost"], "RPC"),  # "RPC endpoint must be host:port", or "built without RPC"
    (["-c", "0"], "0 is not in the range x>=8"),
    (["-t", "99999999999"], "more than ggml's 512 threads"),
    (["-ngl", "99999999999"], "not in the range"),
])
def test_every_command_checks_the_model_options(capsys, monkeypatch, files, command, options, message):
    (files / "long.txt").write_text(LONG + "\n" + LONG + "\n")
    code, out, err = run(capsys, monkeypatch, files, [*commands(files, LONG)[command], "-t", "1", *options])
    one_line_error(code, err)
    assert message in err and out == ""


@pytest.mark.parametrize("spec, want", [
    ("0", [0]), ("-1", [29]), ("last", [29]), ("-30", [0]), ("3, 3,-30", [0, 3]),
    ("0.5", [15]), ("1/2", [15]), ("1.0", [29]), ("1/1", [29]), ("0,1/6,1/3,1/2", [0, 5, 10, 15]),
    ("2-5", [2, 3, 4, 5]), ("5-5", [5]), ("27-last", [27, 28, 29]), ("-3--1", [27, 28, 29]),
    ("0.9-last", [27, 28, 29]), ("1/2-16", [15, 16]), ("0-1,28-29", [0, 1, 28, 29]),
])
def test_layer_syntax(spec, want):
    assert parse_layers(spec, 30) == want


@pytest.mark.parametrize("spec, message", [
    ("30", "layer 30 out of range (the model has 30 layers: 0..29, or -30..-1 from the end)"),
    ("-31", "layer -31 out of range"), ("0-30", "layer 30 out of range"),
    ("5-2", "range 5-2 is empty"), ("-1-0", "range -1-0 is empty"),
    ("3/2", "depth fraction 3/2 is not in 0..1"), ("1.5", "depth fraction 1.5 is not in 0..1"),
    ("x", "'x' is neither a layer, 'last' nor a depth fraction"), ("", "'' is neither"), ("2-", "'2-' is neither"),
    ("2:5", "'2:5' is neither"), ("1/0", "'1/0' is neither"), ("nan", "'nan' is neither"),
])
def test_layer_syntax_errors(spec, message):
    with pytest.raises(InputError, match="^--layers: ") as e:
        parse_layers(spec, 30)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_one_layer_syntax_on_every_option(capsys, monkeypatch, files, tmp_path):
    """--ll-layers, --draw-layers and sweep --layers read the same list the same way (the tiny model has 4)."""
    spec, want = "-1,0.5-2", [2, 3]
    code, out, err = run(capsys, monkeypatch, files, ["-p", PROMPT, "--ll", "l_out", "--ll-layers", spec, "--json",
                                                      "--draw", str(tmp_path / "a.png"), "--draw-layers", spec])
    assert code == 0, err
    data = json.loads(out)
    assert [layer["layer"] for layer in data["logit_lens"][0]["layers"]] == want
    assert sorted(Path(f).name for f in data["files"]) == [f"a-L{il}.png" for il in want]
    code, out, err = run(capsys, monkeypatch, files, [*commands(files, PROMPT)["sweep"][:-1], spec, "--json"])
    assert code == 0, err
    assert json.loads(out)["layers"] == want
    for option in (["--ll", "l_out", "--ll-layers"], ["--draw", "--draw-layers"]):
        code, out, err = run(capsys, monkeypatch, files, ["-p", PROMPT, *option, "4"])
        one_line_error(code, err)
        assert f"{option[-1]}: layer 4 out of range (the model has 4 layers" in err


def write_control_vector(path: Path, layer: int, n_embd: int) -> Path:
    import gguf

    writer = gguf.GGUFWriter(path, "controlvector")
    writer.add_tensor(f"direction.{layer}", np.ones(n_embd, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("args, message", [
    (["-p", PROMPT, "--temp", "nan", "-n", "2"], "Invalid value for '--temp': nan is not a finite number"),
    (["-p", PROMPT, "--temp", "inf", "-n", "2"], "inf is not a finite number"),
    (["-p", PROMPT, "--seed", "-2", "-n", "2"], "-2 is not -1 (random) nor in 0..4294967295"),
    (["-p", PROMPT, "--seed", str(2**32), "-n", "2"], "nor in 0..4294967295"),
    (["-p", PROMPT, "-t", "99999999999"], "99999999999 is more than ggml's 512 threads"),
    (["-p", "\udcff", "--no-escape"], "the prompt is not UTF-8 text (byte 0xff at character 0)"),
    (["-p", "\\xff"], "the prompt is not UTF-8 text once its escapes are expanded"),
    (["heads", "-p", "a\udcff"], "not UTF-8"),
    (["sae", "SAE", "-p", "\udcff"], "not UTF-8"),
    (["sweep", "--clean", "\udcff", "--heads", "--metric", "prob"], "not UTF-8"),
    (["-p", PROMPT, "--control-vector", "HUGE"], "control vector layer 99999999999 is beyond llama.cpp's 512 layers"),
    (["fidelity", "-p", PROMPT, "-c", "0"], "Invalid value for '-c' / '--ctx-size': 0 is not in the range x>=8"),
    (["-p", PROMPT, "-c", "7"], "7 is not in the range x>=8"),
    (["-p", PROMPT, "--ll", "l_out", "--ll-layers", "1-0"], "--ll-layers: range 1-0 is empty"),
    (["sweep", "--clean", PROMPT, "--heads", "--metric", "prob", "--layers", "a"], "--layers: 'a' is neither"),
])
def test_bad_inputs(capsys, monkeypatch, files, tmp_path, args, message):
    huge = write_control_vector(tmp_path / "huge.gguf", 99999999999, tiny_gguf.SPECS["llama"].n_embd)
    args = [str(huge) if a == "HUGE" else str(files / "sae") if a == "SAE" else a for a in args]
    code, out, err = run(capsys, monkeypatch, files, args)
    one_line_error(code, err)
    assert message in err and out == ""


def test_seed_and_temp_as_llama_cli(capsys, monkeypatch, files):
    """--seed -1 is a random seed (runs differ), a seed repeats its run, --temp below 0 is greedy."""
    def tokens(*args: str) -> list[int]:
        code, out, err = run(capsys, monkeypatch, files, ["-p", PROMPT, "-n", "8", "--ignore-eos", "--json", *args])
        assert code == 0, err
        return json.loads(out)["generated"]["tokens"]

    assert len({tuple(tokens("--temp", "50", "--seed", "-1")) for _ in range(4)}) > 1
    assert tokens("--temp", "50", "--seed", "7") == tokens("--temp", "50", "--seed", "7")
    assert tokens("--temp", "-1") == tokens("--temp", "0") == tokens()


def test_stream_generation_writes_each_token_as_it_comes(capsys, smollm2):
    """When token i is produced, the text of the tokens before it is already on stdout."""
    seen: list[str] = []
    ids = smollm2.prompt_ids("The capital of France is")
    gen = stream_generation(smollm2, ids, 12, temp=0.0, seed=None, stop_at_eog=False, echo=True,
                            on_token=lambda _: seen.append(capsys.readouterr().out))
    rest = capsys.readouterr().out
    want = smollm2.generate(ids, 12, stop_at_eog=False)
    assert gen.tokens == want.tokens and "".join(seen) + rest == want.text + "\n"
    for i in range(len(gen.tokens)):
        assert "".join(seen[:i + 1]) == smollm2.detokenize(gen.tokens[:i]).rstrip("\ufffd")
    assert sum(1 for chunk in seen if chunk) >= 8


def read_until(proc: subprocess.Popen, want: bytes, timeout: float) -> bytes:
    """Read stdout until ``want`` has come and some more bytes after it, or fail after ``timeout`` seconds."""
    got, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            got += chunk
            if got.startswith(want) and len(got) > len(want):
                return got
    pytest.fail(f"no generated text within {timeout}s: {got!r}")


def test_streaming_and_ctrl_c_in_a_process():
    """The generated text comes while the process still runs; SIGINT after it stops it with exit code 130,
    no traceback, and what was printed stays printed."""
    prompt = "The capital of France is"
    # 8000 tokens take minutes: text printed only at the end would not come within the minute waited
    cmd = [sys.executable, "-m", "pyinterp", "-p", prompt, "-n", "8000", "-c", "8192", "--ignore-eos", "-t", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        first = read_until(proc, prompt.encode(), 60)
        assert proc.poll() is None  # still generating: the text was streamed, not printed at the end
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert b"Traceback" not in err and err.decode().strip().splitlines() == ["pyinterp: interrupted"]
    out = (first + rest).decode()
    assert out.startswith(prompt) and len(out) > len(prompt) and out.count(prompt) == 1
