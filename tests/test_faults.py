"""Nothing lost, nothing silent: bad arguments are one-line InputErrors, non-finite inputs are refused and
non-finite results reported, a failed write leaves nothing (and no earlier file of the run) behind, and one
Model is safe to use from several threads.

A tiny random llama (scripts/tiny_gguf.py) keeps this fast; nothing here depends on trained weights.
"""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from pyinterp import InputError, Model, PyinterpError
from pyinterp.analysis import heads, patching, sae as sae_mod, steering
from pyinterp.cli import main
from pyinterp.io.csv_io import write_csv
from pyinterp.interventions import AblateHeads, AddVector, PatchHead, PatchRow
from pyinterp.viz.plot import save_png
from pyinterp.io.safetensors_io import write_safetensors
from pyinterp.io.tensor_io import load_tensor, save_tensor

N_CTX = 64
NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def llama_path(tiny_path) -> Path:
    return tiny_path("llama")


@pytest.fixture(scope="module")
def tiny(llama_path):
    with Model(llama_path, n_ctx=N_CTX, n_threads=1) as model:
        yield model


def _cv(m, value=1.0):
    return steering.ControlVector.from_layers({1: np.full(m.n_embd, value, np.float32)})


def _sae(m):
    return sae_mod.random_sae(m.n_embd, 16, hook_name="l_out-1")


def _enter(cm):
    """Enter a context manager (and leave it at once, should it not raise)."""
    with cm:
        pass


# (description, call on the tiny model and its path, the InputError message it must give)
API_CASES = [
    ("model path not a path", lambda m, p: Model(123), r"GGUF path or a known name, got 123"),
    ("n_ctx a string", lambda m, p: Model(p, n_ctx="512"), r"n_ctx must be an integer, got '512'"),
    ("n_ctx a float", lambda m, p: Model(p, n_ctx=64.0), r"n_ctx must be an integer"),
    ("n_threads a float", lambda m, p: Model(p, n_ctx=N_CTX, n_threads=2.5), r"n_threads must be an integer, got 2.5"),
    ("n_threads beyond a C int", lambda m, p: Model(p, n_ctx=N_CTX, n_threads=2**70), r"n_threads must be at most 2147483647"),
    ("n_gpu_layers a string", lambda m, p: Model(p, n_ctx=N_CTX, n_gpu_layers="all"), r"n_gpu_layers must be an integer"),
    ("type_k a list", lambda m, p: Model(p, n_ctx=N_CTX, type_k=["f32"]), r"type_k must be one of f32"),
    ("flash_attn a string", lambda m, p: Model(p, n_ctx=N_CTX, flash_attn="yes"), r"flash_attn must be True or False"),
    ("rpc a number", lambda m, p: Model(p, n_ctx=N_CTX, rpc=5), r"rpc must be a string"),
    ("run None", lambda m, p: m.run(None), r"a prompt is a text or a list of token ids, got None"),
    ("run a list of prompts", lambda m, p: m.run(["a", "b"]), r"a pass takes one prompt \(a text or a list of token ids\), got a list of 2 texts"),
    ("run ids mixed with text", lambda m, p: m.run([1, "a"]), r"token ids must be integers, got 'a'"),
    ("run bytes", lambda m, p: m.run(b"abc"), r"a prompt is a text or a list of token ids, got b'abc'"),
    ("run float ids", lambda m, p: m.run([1.5, 2.0]), r"token ids must be integers, got 1\.5"),
    ("run bool ids", lambda m, p: m.run([True, 2]), r"token ids must be integers, got True"),
    ("run a 2-D id array", lambda m, p: m.run(np.array([[1, 2]])), r"must be 1-D"),
    ("run an int", lambda m, p: m.run(5), r"a prompt is a text or a list of token ids, got 5"),
    ("interventions of strings", lambda m, p: m.run("a b", interventions=["bogus"]), r"pyinterp\.interventions objects"),
    ("interventions None", lambda m, p: m.run("a b", interventions=None), r"interventions: expected a list like \[AddVector"),
    ("generate n a float", lambda m, p: m.generate("a b", 2.5), r"n must be an integer, got 2\.5"),
    ("generate n None", lambda m, p: m.generate("a b", None), r"n must be an integer, got None"),
    ("generate temp NaN", lambda m, p: m.generate("a b", 2, temp=NAN), r"temp must be a finite number, got nan"),
    ("generate temp inf", lambda m, p: m.generate("a b", 2, temp=INF), r"temp must be a finite number, got inf"),
    ("generate temp a string", lambda m, p: m.generate("a b", 2, temp="1"), r"temp must be a number"),
    ("generate seed a float", lambda m, p: m.generate("a b", 2, temp=1.0, seed=1.5), r"seed must be an integer"),
    ("generate on_token not callable", lambda m, p: m.generate("a b", 2, on_token=3), r"on_token must be a function"),
    ("lens top_k a float", lambda m, p: m.logit_lens("a b", top_k=2.5), r"top_k must be an integer, got 2\.5"),
    ("lens positions an int", lambda m, p: m.logit_lens("a b", positions=1), r"positions: expected a list"),
    ("lens targets an int", lambda m, p: m.logit_lens("a b", targets=5), r"targets: expected a list"),
    ("attribution position a string", lambda m, p: m.logit_attribution("a b", position="1"), r"position must be an integer"),
    ("layer_device a float", lambda m, p: m.layer_device(1.5), r"layer must be an integer"),
    ("tokenize bytes", lambda m, p: m.tokenize(b"ab"), r"text must be a string"),
    ("detokenize a string", lambda m, p: m.detokenize("ab"), r"token ids must be integers"),
    ("detokenize float ids", lambda m, p: m.detokenize([1.5]), r"token ids must be integers, got 1\.5"),
    ("intervened with a string", lambda m, p: _enter(m.intervened("x")), r"pyinterp\.interventions objects"),
    ("AddVector positions an int", lambda m, p: m.run("a b", interventions=[AddVector("l_out", 1, np.ones(m.n_embd), positions=1)]),
     r"positions: expected a list"),
    ("AddVector NaN vector", lambda m, p: m.run("a b", interventions=[AddVector("l_out", 1, np.full(m.n_embd, NAN))]),
     r"vector has NaN or infinite values"),
    ("AddVector inf scale", lambda m, p: m.run("a b", interventions=[AddVector("l_out", 1, np.ones(m.n_embd), scale=INF)]),
     r"scale must be a finite number"),
    ("AddVector scale overflowing float32", lambda m, p: m.run("a b", interventions=[
        AddVector("l_out", 1, np.full(m.n_embd, 1e30), scale=1e30)]), r"NaN or infinite"),
    ("PatchRow inf vector", lambda m, p: m.run("a b", interventions=[PatchRow("l_out", 1, 0, np.full(m.n_embd, INF))]),
     r"vector has NaN or infinite values"),
    ("PatchHead NaN values", lambda m, p: m.run("a b", interventions=[PatchHead(1, 0, np.full((4, 32), NAN))]),
     r"values has NaN or infinite values"),
    ("PatchHead values a string", lambda m, p: m.run("a b", interventions=[PatchHead(1, 0, "x")]), r"values must be numbers"),
    ("AblateHeads of an int", lambda m, p: m.run("a b", interventions=[AblateHeads(5)]), r"ablate: expected a list"),
    ("control vector NaN", lambda m, p: _enter(steering.steered(m, _cv(m, NAN))), r"direction 1 has NaN or infinite"),
    ("control vector scale NaN", lambda m, p: _enter(steering.steered(m, _cv(m), scale=NAN)), r"scale must be a finite number"),
    ("control vector scale inf", lambda m, p: _enter(steering.steered(m, _cv(m), scale=INF)), r"scale must be a finite number"),
    ("control vector scale a string", lambda m, p: _enter(steering.steered(m, _cv(m), scale="2")), r"scale must be a number"),
    ("control vector scale overflowing", lambda m, p: _cv(m, 1e30) * 1e30, r"directions has NaN or infinite values"),
    ("control vector layer a string", lambda m, p: steering.ControlVector.from_layers({"1": np.ones(4)}),
     r"control vector layer must be an integer"),
    ("control vector directions a list", lambda m, p: steering.ControlVector([[1.0]], (1,)), r"directions must be a \[n_layer"),
    ("contrastive layers of floats", lambda m, p: steering.contrastive(m, ["a"], ["b"], layers=[1.5]), r"layer must be an integer"),
    ("SAE NaN weights", lambda m, p: sae_mod.SAE(_sae(m).W_enc * NAN, _sae(m).b_enc, _sae(m).W_dec, _sae(m).b_dec, "l_out-1"),
     r"SAE W_enc has NaN or infinite values"),
    ("SAE inf threshold", lambda m, p: sae_mod.SAE(_sae(m).W_enc, _sae(m).b_enc, _sae(m).W_dec, _sae(m).b_dec, "l_out-1",
                                                    "jumprelu", threshold=np.full(16, INF, np.float32)), r"SAE threshold has NaN"),
    ("head_scores seq_len a float", lambda m, p: heads.head_scores(m, seq_len=2.5), r"seq_len must be an integer"),
    ("head_scores seed a string", lambda m, p: heads.head_scores(m, seed="x"), r"seed must be an integer"),
    ("head_ablation_scan prompt None", lambda m, p: patching.head_ablation_scan(m, None, patching.prob(5)),
     r"a prompt is a text or a list of token ids"),
]


@pytest.mark.parametrize("description, call, message", API_CASES, ids=[c[0] for c in API_CASES])
def test_bad_argument_is_one_line_input_error(tiny, llama_path, description, call, message):
    with pytest.raises(InputError, match=message) as info:
        call(tiny, llama_path)
    assert "\n" not in str(info.value)


def test_numpy_scalars_are_numbers(tiny):
    v = np.ones(tiny.n_embd, np.float32)
    plain = tiny.run("a b", interventions=[AddVector("l_out", 1, v, scale=2.0)]).logits
    numpy = tiny.run("a b", interventions=[AddVector("l_out", np.int64(1), v, scale=np.float32(2))]).logits
    np.testing.assert_array_equal(numpy, plain)
    assert tiny.generate("a b", np.int64(2)).tokens == tiny.generate("a b", 2).tokens
    ids = tiny.tokenize("a b")
    np.testing.assert_array_equal(tiny.run(np.array(ids, dtype=np.int32)).logits, tiny.run(ids).logits)


def test_nan_weights_are_an_error_not_numbers(tiny_path):
    path = tiny_path("llama", nan=True)
    with Model(path, n_ctx=N_CTX, n_threads=1) as model:
        for call in (lambda: model.run("a b"), lambda: model.logit_lens("a b"), lambda: model.generate("a b", 2),
                     lambda: model.run("a b", logits=None)):
            with pytest.raises(PyinterpError, match="the model produced NaN/inf logits"):
                call()


def test_nan_model_on_the_command_line(capsys, tiny_path):
    path = tiny_path("llama", nan=True)
    code = main(["-m", str(path), "-c", str(N_CTX), "-p", "a b"])
    out, err = capsys.readouterr()
    assert code != 0 and "nan" not in out.lower()
    assert err.startswith("pyinterp: error: the model produced NaN/inf logits") and err.count("\n") == 1


# writes


def _writers(tiny, tmp_path):
    """(name, file name, write(path)) for every file pyinterp writes."""
    sae = _sae(tiny)
    image = np.zeros((4, 4, 3), np.uint8)
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    return [
        ("tensor .bin", "t.bin", lambda p: save_tensor(p, array)),
        ("tensor .npy", "t.npy", lambda p: save_tensor(p, array)),
        ("tensor .npz", "t.npz", lambda p: save_tensor(p, array)),
        ("safetensors", "w.safetensors", lambda p: write_safetensors(p, {"a": array})),
        ("SAE weights", "sae/sae_weights.safetensors", lambda p: sae.save(p.parent)),
        ("SAE cfg", "sae/cfg.json", lambda p: sae.save(p.parent)),
        ("control vector", "cv.gguf", lambda p: _cv(tiny).save(p)),
        ("PNG", "a.png", lambda p: save_png(image, p)),
        ("CSV", "a.csv", lambda p: write_csv(p, ["a"], [[1]])),
    ]


WRITERS = ["tensor .bin", "tensor .npy", "tensor .npz", "safetensors", "SAE weights", "SAE cfg", "control vector", "PNG",
           "CSV"]


def _writer(tiny, tmp_path, name):
    return next((file, write) for n, file, write in _writers(tiny, tmp_path) if n == name)


@pytest.mark.parametrize("name", WRITERS)
def test_a_write_that_fails_leaves_the_old_file(tiny, tmp_path, monkeypatch, name):
    file, write = _writer(tiny, tmp_path, name)
    path = tmp_path / file
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b"the previous file")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(PyinterpError, match="No space left on device"):
        write(path)
    monkeypatch.undo()
    assert path.read_bytes() == b"the previous file"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name], "a temporary file was left behind"
    write(path)  # and with room, it is written
    assert path.read_bytes() != b"the previous file"


@pytest.mark.parametrize("name", WRITERS)
def test_a_write_that_loses_bytes_is_an_error(tiny, tmp_path, monkeypatch, name):
    """C writers (ndarray.tofile under np.save and gguf) can lose a full disk's error when the C buffer is
    flushed on close: the file then holds fewer bytes than were written, which must be an error."""
    file, write = _writer(tiny, tmp_path, name)
    path = tmp_path / file
    path.parent.mkdir(exist_ok=True)
    real_fstat = os.fstat

    def short(fd):
        st = real_fstat(fd)
        return os.stat_result((*st[:6], max(st.st_size - 1, 0), *st[7:]))

    monkeypatch.setattr(os, "fstat", short)
    with pytest.raises(PyinterpError, match="bytes reached the file"):
        write(path)
    monkeypatch.undo()
    assert list(path.parent.iterdir()) == []


@pytest.mark.parametrize("suffix", [".bin", ".npy", ".npz"])
def test_full_disk(small_disk, suffix):
    (small_disk / "filler").write_bytes(b"x" * (60 * 1024))  # 4 KiB left
    path = small_disk / f"t{suffix}"
    with pytest.raises(PyinterpError, match="cannot write"):
        save_tensor(path, np.ones((8, 256), np.float32))  # 8 KiB
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


def test_full_disk_control_vector(tiny, small_disk):
    (small_disk / "filler").write_bytes(b"x" * (60 * 1024))
    big = steering.ControlVector(np.ones((40, tiny.n_embd), np.float32), tuple(range(1, 40)))  # 20 KiB
    with pytest.raises(PyinterpError, match="cannot write control vector"):
        big.save(small_disk / "cv.gguf")
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


# the command line: a run that fails writes nothing it would have reported


def test_a_failed_save_leaves_no_earlier_save(capsys, llama_path, tmp_path):
    first = tmp_path / "first.npy"
    code = main(["-m", str(llama_path), "-c", str(N_CTX), "-p", "a b", "--save", "l_out-1", str(first),
                 "--save", "l_out-2", str(tmp_path / "missing" / "second.npy")])
    err = capsys.readouterr().err
    assert code != 0 and err.startswith("pyinterp: error: cannot write") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_save_extension_in_capitals(capsys, tiny, llama_path, tmp_path):
    path = tmp_path / "X.NPY"
    code = main(["-m", str(llama_path), "-c", str(N_CTX), "-p", "a b", "--save", "l_out-1", str(path), "--json"])
    out = capsys.readouterr().out
    assert code == 0
    assert json.loads(out)["files"] == [str(path)]
    assert [p.name for p in tmp_path.iterdir()] == ["X.NPY"]
    np.testing.assert_array_equal(np.load(path), tiny.run("a b", capture=["l_out-1"])["l_out", 1])
    np.testing.assert_array_equal(load_tensor(path, tiny.n_embd), tiny.run("a b", capture=["l_out-1"])["l_out", 1])


# threads


PROMPTS = ["a b c", "b a", "c c a b", "a", "b b b", "a c"]


def test_one_model_from_two_threads(tiny):
    want = {p: tiny.run(p, capture=["l_out-1"]) for p in PROMPTS}
    want_gen = {p: tiny.generate(p, 3).tokens for p in PROMPTS}
    errors: list[BaseException] = []

    def work(offset: int) -> None:
        try:
            for i in range(20):
                p = PROMPTS[(i + offset) % len(PROMPTS)]
                got = tiny.run(p, capture=["l_out-1"])
                np.testing.assert_array_equal(got.logits, want[p].logits)
                np.testing.assert_array_equal(got["l_out", 1], want[p]["l_out", 1])
                if i % 5 == 0:
                    assert tiny.generate(p, 3).tokens == want_gen[p]
                    tiny.logit_lens(p, top_k=2)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_a_with_block_does_not_leak_into_another_thread(tiny):
    plain = tiny.run("a b c").logits
    ablated = tiny.run("a b c", ablate=[(1, 0), (2, 1)]).logits
    assert not np.array_equal(plain, ablated)
    started, results = threading.Event(), []

    def other() -> None:
        started.set()
        results.append(tiny.run("a b c").logits)  # waits for the block to end

    with tiny.ablated([(1, 0), (2, 1)]):
        t = threading.Thread(target=other)
        t.start()
        started.wait()
        t.join(0.5)
        assert t.is_alive() and not results, "another thread ran a pass inside the with-block"
        np.testing.assert_array_equal(tiny.run("a b c").logits, ablated)  # the same thread: its own block applies
    t.join()
    np.testing.assert_array_equal(results[0], plain)
