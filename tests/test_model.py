"""Loading, tokenization, logits shape, errors from bad files, lifetime."""

from __future__ import annotations

import numpy as np
import pytest

import pyinterp
from pyinterp import PyinterpError, zoo


def test_properties(smollm2):
    m = smollm2
    assert (m.arch, m.n_layer, m.n_head, m.n_head_kv, m.n_embd) == ("llama", 30, 9, 3, 576)
    assert m.n_vocab == 49152
    assert m.n_ctx == 512


def test_gemma3_properties(gemma3):
    assert gemma3.arch == "gemma3"
    assert gemma3.n_layer == 18 and gemma3.n_head == 4 and gemma3.n_head_kv == 1
    assert gemma3.n_embd == 640


@pytest.mark.parametrize("text", ["The capital of France is", "naïve café — 東京 🙂", "  spaces\tand\nnewlines"])
def test_tokenize_round_trip(smollm2, text):
    ids = smollm2.tokenize(text)
    assert ids and all(isinstance(i, int) for i in ids)
    assert smollm2.detokenize(ids) == text
    assert b"".join(smollm2.token_bytes(i) for i in ids).decode() == text


def test_gemma_adds_bos(gemma3):
    ids = gemma3.tokenize("Hello")
    assert ids[0] == 2 and gemma3.token_str(ids[0]) == "<bos>"
    assert gemma3.tokenize("Hello", add_bos=False) == ids[1:]


def test_special_tokens_are_parsed(smollm2):
    ids = smollm2.tokenize("<|im_start|>user")
    assert smollm2.token_str(ids[0]) == "<|im_start|>"


def test_run_logits(smollm2):
    trace = smollm2.run("The capital of France is")
    assert trace.logits.shape == (len(trace.tokens), smollm2.n_vocab)
    assert trace.logits.dtype == np.float32
    assert np.all(np.isfinite(trace.logits))
    assert smollm2.token_str(int(np.argmax(trace.logits[-1]))) == " Paris"


def test_run_accepts_ids_and_is_deterministic(smollm2):
    ids = smollm2.tokenize("The capital of France is")
    a = smollm2.run(ids)
    b = smollm2.run("The capital of France is")
    assert a.tokens == b.tokens == ids
    np.testing.assert_array_equal(a.logits, b.logits)


def test_missing_file():
    with pytest.raises(PyinterpError, match="model file not found"):
        pyinterp.Model("/nonexistent/model.gguf")


def test_not_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not a model" * 10)
    with pytest.raises(PyinterpError, match="not a GGUF file"):
        pyinterp.Model(bad)


@pytest.mark.parametrize("keep", [4, 1000, 5_000_000])
def test_truncated_gguf(tmp_path, keep):
    data = zoo.smollm2_path().read_bytes()[:keep]
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(data)
    with pytest.raises(PyinterpError, match="cannot load model") as e:
        pyinterp.Model(bad)
    assert "\n" not in str(e.value)


def test_prompt_longer_than_context():
    with pyinterp.Model("smollm2", n_ctx=16) as m:
        with pytest.raises(PyinterpError, match="context holds 16"):
            m.run("word " * 40)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_ctx=3_000_000_000), "exceeds the 8192 tokens"),
    (dict(n_ctx=4), "n_ctx must be at least 8"),
    (dict(n_threads=0), "n_threads must be at least 1"),
])
def test_bad_model_arguments(kwargs, message):
    with pytest.raises(PyinterpError, match=message):
        pyinterp.Model("smollm2", **kwargs)


def test_bad_token_ids(smollm2):
    with pytest.raises(PyinterpError, match="out of range"):
        smollm2.run([1, 2, 10**9])
    with pytest.raises(PyinterpError, match="empty"):
        smollm2.run([])


def test_load_twice_and_close():
    a = pyinterp.Model("smollm2", n_ctx=64)
    b = pyinterp.Model("smollm2", n_ctx=64)
    la = a.run("Hello world").logits
    lb = b.run("Hello world").logits
    np.testing.assert_array_equal(la, lb)
    a.close()
    a.close()  # idempotent
    with pytest.raises(PyinterpError, match="closed"):
        a.run("Hello")
    assert b.run("Hello world").logits.shape == la.shape
    b.close()


def test_generate_greedy_matches_run(smollm2):
    gen = smollm2.generate("The capital of France is", 5)
    assert len(gen.tokens) == 5
    # each greedy token is the argmax of a full forward pass over the text so far
    ids = gen.prompt_tokens + gen.tokens
    logits = smollm2.run(ids).logits
    n = len(gen.prompt_tokens)
    assert [int(t) for t in np.argmax(logits[n - 1:-1], axis=-1)] == gen.tokens
    assert gen.text == smollm2.detokenize(gen.tokens)


def test_generate_sampling_seeded(smollm2):
    a = smollm2.generate("Once upon a time", 8, temp=1.0, seed=7, stop_at_eog=False)
    b = smollm2.generate("Once upon a time", 8, temp=1.0, seed=7, stop_at_eog=False)
    assert a.tokens == b.tokens


def test_llama_log_is_silent_unless_verbose(capfd):
    with pyinterp.Model("smollm2", n_ctx=64) as m:
        m.run("Hi")
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    with pyinterp.Model("smollm2", n_ctx=64, verbose=True):
        pass
    _, err = capfd.readouterr()
    assert "llama_model_loader" in err
    pyinterp.Model("smollm2", n_ctx=64).close()  # verbose is per load: quiet again
    assert capfd.readouterr() == ("", "")


@pytest.mark.parametrize("kwargs, message", [
    (dict(ablate=[3]), r"ablate: expected \(layer, head\) pairs like \[\(3, 4\)\], got 3"),
    (dict(ablate=3), r"ablate: expected a list like \[\(3, 4\)\], got 3"),
    (dict(ablate=(3, 4)), r"expected \(layer, head\) pairs like \[\(3, 4\)\], got 3"),  # one pair, not a list of pairs
    (dict(ablate=["3:4"]), r"expected \(layer, head\) pairs"),
    (dict(ablate=[(3.0, 4)]), "layer must be an integer"),
    (dict(ablate=None), "ablate: expected a list"),
    (dict(isolate=3), r"isolate: expected \(layer, head\) like \(3, 4\), got 3"),
    (dict(isolate="34"), r"isolate: expected \(layer, head\)"),
    (dict(patch=("l_out", 3, 0, np.zeros(576))), r"patch: expected \(name, layer, position, vector\) tuples, got 'l_out'"),
    (dict(patch=[("l_out", 3, 0)]), r"patch: expected \(name, layer, position, vector\) tuples"),
    (dict(patch=[(3, "l_out", 0, np.zeros(576))]), "tensor name must be a string"),
    (dict(patch=[("l_out", 3, True, np.zeros(576))]), "position True out of range"),
    (dict(patch=[("l_out", 3, 0, "zeros")]), "the vector must be 576 numbers, got str"),
    (dict(patch=[("l_out", 3, 0, [[1.0], [1.0, 2.0]])]), "the vector must be 576 numbers"),
    (dict(patch=5), "patch: expected a list"),
    (dict(capture=[5]), "capture: expected tensor names like 'l_out' or 'l_out-5', got 5"),
    (dict(capture=[("l_out", 5)]), "capture: expected tensor names"),
    (dict(capture=5), "capture: expected a list"),
])
def test_bad_intervention_arguments(smollm2, kwargs, message):
    """Wrongly shaped or typed intervention arguments: a one-line InputError, never a raw TypeError."""
    with pytest.raises(pyinterp.InputError, match=message) as e:
        smollm2.run("The capital of France is", **kwargs)
    assert "\n" not in str(e.value)


def test_bad_context_manager_arguments(smollm2, fresh_logits):
    with pytest.raises(pyinterp.InputError, match="ablate: expected a list"):
        with smollm2.ablated(3):
            pass
    with pytest.raises(pyinterp.InputError, match=r"expected \(layer, head\) pairs"):
        with smollm2.ablated([3]):
            pass
    with pytest.raises(pyinterp.InputError, match="patch: expected a list"):
        with smollm2.patched(5):
            pass
    with pytest.raises(pyinterp.InputError, match=r"isolate: expected \(layer, head\)"):
        smollm2.generate("Hi", 2, isolate=[1, 2, 3])
    # nothing was left on: the shared model gives a fresh model's logits
    np.testing.assert_array_equal(smollm2.run("Hi").logits, fresh_logits("Hi"))


def test_logits_last_and_none(smollm2):
    """logits="last" unembeds only the last row: the same numbers as that row of a full run; captures before the
    last layer are untouched, and a capture of the last layer still has every row."""
    prompt = "The Eiffel Tower is located in the city of"
    full = smollm2.run(prompt, capture=["l_out-10", "l_out-29"])
    last = smollm2.run(prompt, capture=["l_out-10"], logits="last")
    assert last.logits.shape == (1, smollm2.n_vocab)
    np.testing.assert_allclose(last.logits[0], full.logits[-1], rtol=0, atol=1e-3 * np.abs(full.logits[-1]).max())
    np.testing.assert_array_equal(last["l_out", 10], full["l_out", 10])
    at_last_layer = smollm2.run(prompt, capture=["l_out-29"], logits="last")
    np.testing.assert_array_equal(at_last_layer["l_out", 29], full["l_out", 29])
    np.testing.assert_array_equal(at_last_layer.logits[0], full.logits[-1])
    assert smollm2.run(prompt, logits=None).logits is None
    with pytest.raises(pyinterp.InputError, match="logits must be 'all', 'last' or None"):
        smollm2.run(prompt, logits="first")
