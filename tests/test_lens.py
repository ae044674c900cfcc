"""Logit lens (norm and raw), computed in the ggml graph, against the model's own output and the reference."""

from __future__ import annotations

import numpy as np
import pytest

from pyinterp import InputError

PROMPT = "The Eiffel Tower is located in the city of"


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_last_layer_norm_lens_is_the_output(request, name):
    model = request.getfixturevalue(name)
    lens = model.logit_lens(PROMPT, top_k=5)
    probs = softmax(model.run(PROMPT).logits.astype(np.float64))
    assert lens.ids.shape == lens.probs.shape == (model.n_layer, len(lens.tokens), 5)
    assert lens.layers == list(range(model.n_layer))
    want = np.argsort(-probs, axis=-1)[:, :5]
    np.testing.assert_array_equal(lens.ids[-1], want)
    np.testing.assert_allclose(lens.probs[-1], np.take_along_axis(probs, want, -1), atol=1e-5)
    assert np.all(np.diff(lens.probs, axis=-1) <= 0)  # most probable first
    assert lens.strs[-1][-1][0] == model.token_str(int(want[-1, 0]))


def test_lens_against_reference(pair):
    """Every layer's lens, norm and raw, against the reference's residual stream through its own norm and head."""
    model, ref = pair
    ids = model.tokenize(PROMPT)
    want = ref.run(ids)
    for norm in (True, False):
        lens = model.logit_lens(ids, top_k=1, norm=norm)
        agree, diffs = [], []
        for il in range(model.n_layer):
            p = softmax(ref.unembed(want.l_out[il], norm=norm).astype(np.float64))
            agree.append(np.mean(lens.ids[il, :, 0] == p.argmax(-1)))
            diffs.append(np.abs(lens.probs[il, :, 0] - np.take_along_axis(p, lens.ids[il, :, :1].astype(int), -1)[:, 0]).mean())
        assert np.mean(agree) >= 0.9, f"norm={norm} top-1 agreement per layer {np.round(agree, 2)}"
        # without the norm, deep residuals are large and the softmax saturates: small differences in
        # the residual move probabilities further, so the raw lens gets a looser bound on its worst layer
        assert np.mean(diffs) <= 0.05, f"norm={norm} top-1 probability |diff| per layer {np.round(diffs, 3)}"
        assert max(diffs) <= (0.05 if norm else 0.2), f"norm={norm} per layer {np.round(diffs, 3)}"


def test_raw_lens_differs_from_norm_lens(smollm2):
    norm = smollm2.logit_lens(PROMPT, top_k=3)
    raw = smollm2.logit_lens(PROMPT, top_k=3, norm=False)
    assert raw.title.startswith("raw") and norm.title.startswith("norm")
    assert not np.array_equal(norm.ids, raw.ids)


def test_lens_of_other_tensors(smollm2):
    for tensor in ["attn_out", "ffn_out", "kqv_out"]:
        lens = smollm2.logit_lens(PROMPT, tensor=tensor, top_k=2)
        assert lens.tensor == tensor and lens.ids.shape[0] == smollm2.n_layer


def test_lens_follows_interventions(smollm2):
    """Ablating every head of layers 10..19 leaves the lens of layers 0..9 as it was, bit for bit, and moves the
    lens from layer 10 on."""
    plain = smollm2.logit_lens(PROMPT, top_k=1)
    with smollm2.ablated([(il, h) for il in range(10, 20) for h in range(smollm2.n_head)]):
        ablated = smollm2.logit_lens(PROMPT, top_k=1)
    np.testing.assert_array_equal(plain.probs[:10], ablated.probs[:10])
    assert not np.allclose(plain.probs[10:], ablated.probs[10:])


def test_lens_errors(smollm2, gemma3):
    with pytest.raises(InputError, match="unknown tensor name"):
        smollm2.logit_lens(PROMPT, tensor="nope")
    with pytest.raises(InputError, match="not a residual-width tensor"):
        gemma3.logit_lens(PROMPT, tensor="kqv_out")  # 4 heads x 256 = 1024 wide, n_embd is 640
    with pytest.raises(InputError, match="top_k"):
        smollm2.logit_lens(PROMPT, top_k=0)
    with pytest.raises(InputError, match="tensor='l_out', layers=\\[5\\]"):
        smollm2.logit_lens(PROMPT, tensor="l_out-5")
    with pytest.raises(InputError, match="l_out is not computed on layer 30 \\(it is on layers 0..29\\)"):
        smollm2.logit_lens(PROMPT, layers=[3, 30])
    with pytest.raises(InputError, match="embd is not computed on layer 0 \\(it is outside the layers"):
        smollm2.logit_lens(PROMPT, tensor="embd", layers=[0])
    with pytest.raises(InputError, match="layers: expected a list"):
        smollm2.logit_lens(PROMPT, layers=5)
    with pytest.raises(InputError, match="layers is empty"):
        smollm2.logit_lens(PROMPT, layers=[])


def test_lens_of_the_embedding_against_reference(pair):
    """The embedding term (Gemma: scaled) through the norm lens: one row, layer -1, as the reference has it."""
    model, ref = pair
    ids = model.tokenize(PROMPT)
    name = {"llama": "embd", "gemma3": "inp_scaled"}[model.arch]
    lens = model.logit_lens(ids, tensor=name, top_k=1)
    assert lens.layers == [-1] and lens.ids.shape == (1, len(ids), 1)
    p = softmax(ref.unembed(ref.embedding(ids)).astype(np.float64))
    assert np.mean(lens.ids[0, :, 0] == p.argmax(-1)) >= 0.9
    np.testing.assert_allclose(lens.probs[0, :, 0], np.take_along_axis(p, lens.ids[0].astype(int), -1)[:, 0], atol=0.05)


def test_lens_of_some_layers(smollm2):
    full = smollm2.logit_lens(PROMPT, top_k=3)
    some = smollm2.logit_lens(PROMPT, top_k=3, layers=[12, 5])
    assert some.layers == [5, 12]
    np.testing.assert_array_equal(some.ids, full.ids[[5, 12]])
    np.testing.assert_array_equal(some.probs, full.probs[[5, 12]])
    assert some.strs == [full.strs[5], full.strs[12]]


def test_the_lens_readout_on_the_engine(smollm2):
    """The engine's public pass with the lens readout (what logit_lens runs), asked for the last logits only: the
    lens still reads the last layer at every token, and equals logit_lens's."""
    from pyinterp.engine.readouts import LensReadout

    ids = smollm2.prompt_ids(PROMPT)
    done = smollm2.engine.run(ids, readout=LensReadout(smollm2.n_layer, "l_out", True, 3, [], list(range(len(ids)))),
                              logits="last")
    lens = smollm2.logit_lens(PROMPT, top_k=3)
    for i, il in enumerate(lens.layers):
        np.testing.assert_array_equal(done.readout[il][0], lens.ids[i])


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_chosen_positions_only(request, name):
    """The lens at chosen positions equals the all-positions lens at those positions, bit for bit (top-k and the
    targets' statistics, norm and raw), and only those rows go through the unembedding: every lens matrix product
    of the graph has one column per chosen position, where the model's own output has one per token it keeps."""
    from pyinterp.engine.readouts import LensReadout

    model = request.getfixturevalue(name)
    prompt = "The capital of France is Paris, and the capital of Italy is"
    ids = model.prompt_ids(prompt)
    targets = [model.tokenize(" Rome", add_bos=False)[0], 5]
    for norm in (True, False):
        full = model.logit_lens(ids, top_k=5, targets=targets, norm=norm)
        for positions in ([-1], [0, 3, -1]):
            some = model.logit_lens(ids, top_k=5, targets=targets, norm=norm, positions=positions)
            kept = [p % len(ids) for p in positions]
            for got, want in ((some.ids, full.ids), (some.probs, full.probs), (some.target_logits, full.target_logits),
                              (some.target_probs, full.target_probs), (some.target_ranks, full.target_ranks)):
                np.testing.assert_array_equal(got, want[:, kept])
    # a pass keeping every token's row on the last layer, and one keeping the last token's only (what logit_lens
    # runs for positions=[-1]: the last layer's tensor then has one row, the output's)
    for out_positions, logits, n_out in ((None, "all", len(ids)), ([0], "last", 1)):
        readout = LensReadout(model.n_layer, "l_out", True, 5, targets, [len(ids) - 1], out_positions=out_positions)
        lines = model.engine.run(ids, readout=readout, graph=True, logits=logits).graph
        output = next(line for line in lines if line.startswith("result_output"))
        weight = output.split("<- ")[1].split(",")[0]  # the unembedding matrix
        lens_mm = [line for line in lines if " MUL_MAT " in line and f"<- {weight}," in line and line != output]
        assert len(lens_mm) == model.n_layer, lens_mm
        assert all(line.split("[")[1].split(",")[1].strip() == "1" for line in lens_mm), lens_mm
        assert output.split("[")[1].split(",")[1].strip() == str(n_out)


def test_temperature_and_entropy(smollm2):
    """``temp`` and ``entropy``: the last layer's top-k probabilities and entropy are numpy's on the softmax of a plain
    run's logits / temp at every token; no entropy unless asked for; a bad temperature is an InputError."""
    logits = smollm2.run(PROMPT).logits.astype(np.float64)
    for temp in (1.0, 0.5, 3.0):
        lens = smollm2.logit_lens(PROMPT, top_k=3, temp=temp, entropy=True)
        p = softmax(logits / temp)
        np.testing.assert_allclose(lens.probs[-1], np.take_along_axis(p, lens.ids[-1].astype(int), -1), atol=1e-5)
        h = -(p * np.log(np.maximum(p, 1e-300))).sum(-1)
        np.testing.assert_allclose(lens.entropy[-1], h, atol=2e-3)
        assert lens.entropy.shape == (smollm2.n_layer, len(lens.tokens))
    assert smollm2.logit_lens(PROMPT, top_k=1).entropy is None
    for bad in (0, -1.0, float("inf"), "1"):
        with pytest.raises(InputError, match="temp must be a number > 0"):
            smollm2.logit_lens(PROMPT, temp=bad)
