"""Transcoders in the graph (csrc/transcoder.c, pyinterp.circuit.replace), against numpy computations from the
tensors of plain runs: the in-graph features are the numpy encoding of the captured MLP input, the statistics
the numpy reconstruction error, the replaced MLP output (read as l_out - the residual before the MLP) the numpy
reconstruction, an edit moves the output by exactly delta * W_dec row, and with the error kept and no edits the
logits do not change by a bit. Tiny llama F32 and Gemma 3 270M (F32 twin where compared with numpy)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import pyinterp
from pyinterp.circuit.replace import reconstruction_report, run_replaced, transcoder_features
from pyinterp.circuit.transcoder import TranscoderSet, random_transcoders
from pyinterp.circuit.transcoder_io import load_transcoders, save_transcoders
from pyinterp.cli import main
from pyinterp.engine.arch import arch_of
from pyinterp.errors import InputError

PROMPT = "The capital of France is Paris, and the capital of Italy is"
RESID_MID = {"llama": "ffn_inp", "gemma3": "sa_out"}  # the residual the MLP output is added to
TIE = 1e-5  # pre-activations this close to a threshold (relative) may fall either side in float32


@pytest.fixture(scope="module")
def tiny(tiny_path):
    with pyinterp.Model(tiny_path("llama", f32=True), n_ctx=64, n_threads=1) as model:
        yield model


def make_set(model, kind: str = "jumprelu", d_tc: int = 64, seed: int = 0) -> TranscoderSet:
    """Random transcoders for the model, each layer's encoder scaled to its MLP input's rms so that about a tenth
    of the features fire, encoder biases random. kind: an activation, or "skip" / "clt" (JumpReLU)."""
    x = model.run(PROMPT, capture=["ffn_norm"])
    activation = kind if kind in ("relu", "jumprelu", "topk") else "jumprelu"
    tcs = random_transcoders(model.n_layer, model.n_embd, d_tc, activation=activation, seed=seed, density=0.1,
                             cross_layer=kind == "clt", skip=kind == "skip", k=6)
    rng = np.random.default_rng(seed)
    rms = [np.sqrt(np.mean(x["ffn_norm", l] ** 2)) for l in range(model.n_layer)]
    layers = [dataclasses.replace(tc, W_enc=tc.W_enc / rms[l], b_enc=tc.b_enc + rng.normal(0, 0.3, d_tc),
                                  W_skip=None if tc.W_skip is None else tc.W_skip / rms[l])
              for l, tc in enumerate(tcs.layers)]
    return TranscoderSet(tuple(layers))


def dense(run, d_tc: int) -> np.ndarray:
    """``[n_layer, n_tokens, d_tc]`` features from a run's top-k ids and values (top_k = d_tc: every feature)."""
    out = np.zeros((*run.ids.shape[:2], d_tc), np.float32)
    for l, t, i in zip(*np.nonzero(run.ids >= 0)):
        out[l, t, run.ids[l, t, i]] = run.values[l, t, i]
    return out


def ties(tc, x: np.ndarray) -> np.ndarray:
    """``[n_tokens]`` tokens with a pre-activation within TIE of where the activation switches."""
    pre = tc.pre(x)
    scale = np.abs(pre).max(axis=1, keepdims=True) + 1e-12
    if tc.activation == "topk":
        top = -np.sort(-pre, axis=1)
        edges = [top[:, :tc.k], top[:, tc.k - 1:tc.k] - top[:, tc.k:tc.k + 1]]
    else:
        edges = [pre - tc.threshold if tc.threshold is not None else pre]
    return np.any([np.any(np.abs(e) < TIE * scale, axis=1) for e in edges], axis=0)


@pytest.fixture(params=["tiny-relu", "tiny-jumprelu", "tiny-topk", "tiny-skip", "tiny-clt", "gemma3_f32-jumprelu"])
def case(request, tiny):
    name, kind = request.param.split("-")
    model = tiny if name == "tiny" else request.getfixturevalue(name)
    return model, make_set(model, kind, d_tc=64 if name == "tiny" else 256)


def test_features_and_statistics_equal_numpy(case):
    model, tcs = case
    term = tcs.output_tensor(arch_of(model.arch).ffn_term)
    plain = model.run(PROMPT, capture=["ffn_norm", term])
    d_tc = tcs.layers[0].d_tc
    run = transcoder_features(model, PROMPT, tcs, top_k=d_tc)
    assert np.array_equal(run.logits, plain.logits)  # encoding only changes nothing
    xs = [plain["ffn_norm", l] for l in range(model.n_layer)]
    fs = [tc.encode(x) for tc, x in zip(tcs.layers, xs)]
    ys = tcs.reconstruct(fs, xs)
    got = dense(run, d_tc)
    for l, tc in enumerate(tcs.layers):
        keep = ~ties(tc, xs[l]) if not tcs.cross_layer else ~np.any([ties(t, xs[k]) for k, t in
                                                                       enumerate(tcs.layers[:l + 1])], axis=0)
        assert keep.sum() >= 0.8 * len(keep)
        scale = np.abs(fs[l]).max() + 1e-6
        np.testing.assert_allclose(got[l][keep], fs[l][keep], atol=2e-5 * scale, rtol=1e-4)
        assert 0 < (fs[l] > 0).sum() < fs[l].size  # some features fire, not all
        np.testing.assert_array_equal(run.l0[l][keep], (fs[l] > 0).sum(axis=1)[keep])
        out = plain[term, l]
        np.testing.assert_allclose(run.norm[l], (out.astype(np.float64) ** 2).sum(1), rtol=1e-4)
        np.testing.assert_allclose(run.err[l][keep], ((out - ys[l]).astype(np.float64) ** 2).sum(1)[keep],
                                   rtol=1e-3, atol=1e-6 * run.norm[l].max())


@pytest.mark.parametrize("kind", ["jumprelu", "skip", "clt"])
def test_error_kept_without_edits_is_bit_for_bit(tiny, kind):
    tcs = make_set(tiny, kind)
    plain = tiny.run(PROMPT).logits
    assert np.array_equal(run_replaced(tiny, PROMPT, tcs).logits, plain)
    assert not np.array_equal(run_replaced(tiny, PROMPT, tcs, keep_error=False).logits, plain)


def test_error_kept_without_edits_is_bit_for_bit_gemma3(gemma3):
    tcs = make_set(gemma3, "jumprelu", d_tc=256)
    plain = gemma3.run(PROMPT).logits
    assert np.array_equal(run_replaced(gemma3, PROMPT, tcs).logits, plain)
    assert not np.array_equal(run_replaced(gemma3, PROMPT, tcs, layers=[3], keep_error=False).logits, plain)


def test_error_dropped_output_is_the_reconstruction(case):
    """Every MLP replaced (error dropped): each layer's output in the graph is the numpy reconstruction from that
    run's own MLP inputs (the replaced model's)."""
    model, tcs = case
    mid = RESID_MID[model.arch]
    run = run_replaced(model, PROMPT, tcs, keep_error=False, capture=["ffn_norm", mid, "l_out"])
    xs = [run.captured["ffn_norm", l] for l in range(model.n_layer)]
    ys = tcs.reconstruct([tc.encode(x) for tc, x in zip(tcs.layers, xs)], xs)
    for l in range(model.n_layer):
        replaced = run.captured["l_out", l] - run.captured[mid, l]
        keep = ~np.any([ties(t, xs[k]) for k, t in enumerate(tcs.layers[:l + 1])], axis=0)
        assert keep.sum() >= 0.8 * len(keep)
        scale = np.abs(run.captured["l_out", l]).max()
        np.testing.assert_allclose(replaced[keep], ys[l][keep], atol=3e-6 * scale + 1e-5 * np.abs(ys[l]).max())


@pytest.mark.parametrize("scale", [False, True])
def test_edit_moves_the_output_by_delta_times_its_decoder_row(case, scale):
    """Error kept, feature j of layer 1 set (or scaled): at every layer m it writes to, the output in the graph is
    the real MLP output of that run plus (f'_j - f_j) * W_dec[m][j]."""
    model, tcs = case
    mid, term = RESID_MID[model.arch], tcs.output_tensor(arch_of(model.arch).ffn_term)
    d_tc, layer = tcs.layers[0].d_tc, 1
    before = dense(transcoder_features(model, PROMPT, tcs, top_k=d_tc), d_tc)[layer]
    j = int(np.argmax(before[-1]))
    value = 2.5 if scale else 3.0
    run = run_replaced(model, PROMPT, tcs, edits={(layer, j): value}, scale=scale, top_k=d_tc,
                       capture=[mid, "l_out", term])
    f = dense(run, d_tc)[layer][:, j]
    delta = f * np.float32(value - 1) if scale else np.float32(value) - f
    assert np.abs(delta).max() > 0.1
    for m in range(layer, layer + tcs.layers[layer].n_out):
        out = run.captured["l_out", m] - run.captured[mid, m]
        want = run.captured[term, m] + delta[:, None] * tcs.layers[layer].decoder(m)[j]
        np.testing.assert_allclose(out, want, atol=3e-6 * np.abs(run.captured["l_out", m]).max())
    if not tcs.cross_layer:
        plain = model.run(PROMPT, capture=["l_out"])
        assert np.array_equal(run.captured["l_out", layer - 1], plain["l_out", layer - 1])


def test_gemma_set_writing_the_mlp_module_output(gemma3_f32):
    """A set writing ffn_out (before Gemma's post-FFN norm), error dropped at one layer: the logits of a run whose
    ffn_out there is patched to the numpy reconstruction of the captured MLP input."""
    model, layer = gemma3_f32, 3
    tcs = dataclasses.replace(make_set(model, "jumprelu", d_tc=256), writes="ffn_out")
    x = model.run(PROMPT, capture=[f"ffn_norm-{layer}"])[f"ffn_norm-{layer}"]
    tc = tcs.layers[layer]
    y = tc.encode(x) @ tc.W_dec + tc.b_dec
    patched = model.run(PROMPT, patch=[("ffn_out", layer, p, y[p]) for p in range(len(y))]).logits
    replaced = run_replaced(model, PROMPT, tcs, layers=[layer], keep_error=False).logits
    assert not ties(tc, x).any()
    atol = 1e-3 * np.abs(patched).max()  # float32 rounding of y, grown through the later layers
    assert np.abs(replaced - model.run(PROMPT).logits).max() > 10 * atol
    np.testing.assert_allclose(replaced, patched, atol=atol)


def next_token_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(p || q) per row, written out here in float64."""
    p, q = (np.exp(a - a.max(1, keepdims=True)) for a in (p_logits.astype(np.float64), q_logits.astype(np.float64)))
    p, q = p / p.sum(1, keepdims=True), q / q.sum(1, keepdims=True)
    return (p * np.log(p / q)).sum(1)


def test_reconstruction_report(tiny):
    tcs = make_set(tiny, "jumprelu")
    prompts = [PROMPT, "one two three"]
    report = reconstruction_report(tiny, prompts, tcs)
    runs = [transcoder_features(tiny, p, tcs, top_k=1) for p in prompts]
    err, norm = sum(r.err.sum(1) for r in runs), sum(r.norm.sum(1) for r in runs)
    np.testing.assert_allclose(report.rel_error, np.sqrt(err / norm), rtol=1e-6)
    n_tokens = sum(len(tiny.prompt_ids(p)) for p in prompts)
    assert report.n_tokens == n_tokens
    for layers, want in (([2], report.kl[2]), (None, report.kl_all)):
        kl = sum(next_token_kl(tiny.run(p).logits, run_replaced(tiny, p, tcs, layers=layers, keep_error=False).logits).sum()
                 for p in prompts)
        np.testing.assert_allclose(want, kl / n_tokens, rtol=1e-6)
    assert report.kl_all > 0 and np.all(report.kl > 0)


def test_bad_input_one_line_errors(request, tiny):
    tcs = make_set(tiny, "jumprelu")
    wrong_width = random_transcoders(tiny.n_layer, tiny.n_embd + 1, 16)
    wrong_layers = random_transcoders(tiny.n_layer - 1, tiny.n_embd, 16)
    cases = [(lambda: transcoder_features(tiny, PROMPT, wrong_width), "values per token"),
             (lambda: run_replaced(tiny, PROMPT, wrong_layers), "layers"),
             (lambda: run_replaced(tiny, PROMPT, tcs, edits={(1, 64): 1.0}), "feature 64 out of range"),
             (lambda: run_replaced(tiny, PROMPT, tcs, edits={(9, 0): 1.0}), "layer 9 out of range"),
             (lambda: run_replaced(tiny, PROMPT, tcs, layers=[0], edits={(1, 0): 1.0}), "not replaced"),
             (lambda: run_replaced(tiny, PROMPT, tcs, edits={(1, 0): float("nan")}), "finite"),
             (lambda: run_replaced(tiny, PROMPT, tcs, edits={1: 1.0}), "(layer, feature)"),
             (lambda: run_replaced(tiny, PROMPT, tcs, layers=[4]), "layer 4 out of range"),
             (lambda: transcoder_features(tiny, PROMPT, tcs, top_k=65), "top_k"),
             (lambda: transcoder_features(tiny, PROMPT, "tcs"), "TranscoderSet")]
    # a cross-layer set too large for the graph (Gemma 3's 18 layers): refused, not aborted
    gemma = request.getfixturevalue("gemma3")
    clt = random_transcoders(gemma.n_layer, gemma.n_embd, 16, cross_layer=True)
    cases.append((lambda: run_replaced(gemma, PROMPT, clt), "do not fit"))
    for call, words in cases:
        with pytest.raises(InputError) as e:
            call()
        assert words in str(e.value) and "\n" not in str(e.value)
    assert np.array_equal(run_replaced(tiny, PROMPT, tcs).logits, tiny.run(PROMPT).logits)  # nothing left behind


# the command


def run_cli(capsys, path, *args: str) -> tuple[int, str, str]:
    code = main(["transcoders", "-m", str(path), "-c", "64", "-t", "1", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_report_json_and_markdown(capsys, tmp_path, tiny, tiny_path):
    tcs = make_set(tiny, "jumprelu")
    save_transcoders(tcs, tmp_path / "tc")
    prompts = [PROMPT, "one two three"]
    args = ["--transcoders", str(tmp_path / "tc"), "-p", prompts[0], "-p", prompts[1]]
    code, out, err = run_cli(capsys, tiny_path("llama", f32=True), *args, "--json")
    assert code == 0, err
    data = json.loads(out)
    want = reconstruction_report(tiny, prompts, load_transcoders(tmp_path / "tc")).to_dict()
    assert data["n_tokens"] == want["n_tokens"] and data["layers"] == want["layers"]
    assert data["kl_all"] == want["kl_all"]
    code, out, err = run_cli(capsys, tiny_path("llama", f32=True), *args, "--md")
    assert code == 0, err
    rows = [line for line in out.splitlines() if line.startswith("| ")][2:]  # after the header and the rule
    assert [row.split(" | ")[1] for row in rows] == [f"{l['rel_error']:.4f}" for l in want["layers"]]


def test_cli_bad_input(capsys, tmp_path, tiny, tiny_path):
    save_transcoders(random_transcoders(tiny.n_layer, tiny.n_embd + 1, 8), tmp_path / "wide")
    for args, words in ((["--transcoders", str(tmp_path / "wide"), "-p", PROMPT], "values per token"),
                        (["--transcoders", str(tmp_path), "-p", PROMPT], "transcoder"),
                        (["--transcoders", str(tmp_path / "wide"), "-p", PROMPT, "--md", "--json"], "choose one")):
        code, out, err = run_cli(capsys, tiny_path("llama", f32=True), *args)
        assert code == 2 and words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
