"""Checks of the attribution-graph reference itself (tests/circuit_reference.py), on tiny F32 models with random
transcoders and on Gemma 3 270M: its edges add up, its frozen model is the real one at the prompt, its edges are the
frozen model's finite differences, and an unfrozen norm is caught."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from circuit_reference import reference_graph, reference_influence, replay_targets, salient_logits
from pyinterp.circuit.transcoder import TranscoderSet, random_transcoders
from reference import Reference

VARIANTS = {  # name: random_transcoders keywords
    "jumprelu": {"activation": "jumprelu"},
    "relu": {"activation": "relu"},
    "topk": {"activation": "topk", "k": 6},
    "skip": {"activation": "jumprelu", "skip": True},
    "clt": {"activation": "relu", "cross_layer": True},
}


@pytest.fixture(scope="module")
def tiny_ref(tiny_path):
    """arch -> the transformers reference of the tiny F32 model (llama; gemma2: post norms, (1 + w) norms,
    soft-capping, a sliding window shorter than the prompt)."""
    refs: dict[str, Reference] = {}
    return lambda arch: refs.setdefault(arch, Reference(tiny_path(arch, f32=True)))


@pytest.fixture(scope="module")
def tiny_graph(tiny_ref):
    """(arch, variant) -> (reference, transcoders, ids, graph), computed once."""
    made: dict[tuple[str, str], tuple] = {}

    def graph(arch: str, variant: str):
        if (arch, variant) not in made:
            ref = tiny_ref(arch)
            ids = [ref.n_vocab - 1, *np.random.default_rng(3).integers(0, ref.n_vocab - 1, 11).tolist()]
            tcs = random_transcoders(ref.n_layer, ref.n_embd, 128, seed=1, **VARIANTS[variant])
            made[arch, variant] = ref, tcs, ids, reference_graph(ref, tcs, ids)
        return made[arch, variant]

    return graph


def target_rows(g: dict) -> np.ndarray:
    n_node, n_feat, n_logit = len(g["adjacency"]), len(g["features"]), len(g["logit_tokens"])
    return np.r_[np.arange(n_feat), n_node - n_logit + np.arange(n_logit)]


def check_rows_add_up(g: dict, rtol: float = 1e-4) -> None:
    """Every target's edges sum to its input (relative to the sum of their magnitudes)."""
    a = g["adjacency"].astype(np.float64)
    err = np.abs(a.sum(1) - g["pre"]) / np.maximum(np.abs(a).sum(1), 1e-30)
    assert err.max() <= rtol, f"worst row {err.argmax()}: relative error {err.max():.2e}"


def check_columns(ref, tcs, ids, g, sources: list[int], rtol: float = 1e-4) -> None:
    """Removing a source's written value from a replay of the frozen model changes every target's input by that
    source's column of the adjacency (the model is linear, so the difference is exact up to rounding). Tolerance:
    ``rtol`` of the column's largest edge, plus the rounding of the targets' values."""
    n_feat, n_pos, rows = len(g["features"]), len(ids), target_rows(g)
    clean = replay_targets(ref, g, tcs, ids, g["embeddings"], g["mlp_out"])
    noise = 1e-6 * np.abs(clean).max()  # float32 rounding of the targets the differences cancel
    for s in sources:
        emb, mlp = g["embeddings"].copy(), g["mlp_out"].copy()
        if s < n_feat:
            l, p, f = g["features"][s]
            for m in range(l, ref.n_layer if tcs.cross_layer else l + 1):
                mlp[m, p] -= g["activations"][s] * tcs.layers[l].decoder(m)[f]
        elif s < n_feat + ref.n_layer * n_pos:
            l, p = divmod(s - n_feat, n_pos)
            mlp[l, p] -= g["errors"][l, p]
        else:
            emb[s - n_feat - ref.n_layer * n_pos] = 0.0
        delta = clean - replay_targets(ref, g, tcs, ids, emb, mlp)
        column = g["adjacency"][rows, s]
        assert np.abs(column).max() > 100 * noise, f"source {s} has no edges to check"
        np.testing.assert_allclose(delta, column, atol=rtol * np.abs(column).max() + noise, err_msg=f"source {s}")


def some_sources(ref, ids, g) -> list[int]:
    """The sources with the largest edges among: features of layer 0, features of the second-to-last layer, error
    nodes of layer 0, token nodes."""
    f, n_feat, n_pos = g["features"], len(g["features"]), len(ids)
    biggest = np.abs(g["adjacency"]).max(0)
    groups = [np.nonzero(f[:, 0] == 0)[0], np.nonzero(f[:, 0] == ref.n_layer - 2)[0], n_feat + np.arange(n_pos),
              n_feat + ref.n_layer * n_pos + np.arange(n_pos)]
    return [int(group[np.argmax(biggest[group])]) for group in groups]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_edges_add_up_to_each_input(tiny_graph, arch, variant):
    ref, tcs, ids, g = tiny_graph(arch, variant)
    f, n_feat, n_pos = g["features"], len(g["features"]), len(ids)
    assert n_feat > 20 and set(f[:, 0]) == set(range(ref.n_layer)) and 0 in f[:, 1]
    assert np.all(np.diff(f[:, 0] * 10**6 + f[:, 1] * 10**3 + f[:, 2]) > 0) and np.all(g["activations"] > 0)
    check_rows_add_up(g)
    a = g["adjacency"]
    assert not a[n_feat:-len(g["logit_tokens"])].any()  # errors and tokens have no inputs
    for i, (l, p, _) in enumerate(f):  # no edges from the same or later layers, nor from later positions
        assert not a[i, :n_feat][f[:, 0] >= l].any() and not a[i, :n_feat][f[:, 1] > p].any()
        errors = a[i, n_feat:n_feat + ref.n_layer * n_pos].reshape(ref.n_layer, n_pos)
        assert not errors[l:].any() and not errors[:, p + 1:].any()


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_frozen_model_is_the_model_at_the_prompt(tiny_graph, arch):
    ref, tcs, ids, g = tiny_graph(arch, "jumprelu")
    want = ref.run(ids)
    np.testing.assert_allclose(g["logits"], want.logits[-1], atol=1e-5 * np.abs(want.logits).max())
    np.testing.assert_allclose(g["mlp_out"], np.array(want.ffn_out), atol=1e-6 * np.abs(want.ffn_out).max())
    np.testing.assert_allclose(g["embeddings"], ref.embedding(ids), rtol=1e-6)
    replayed = replay_targets(ref, g, tcs, ids, g["embeddings"], g["mlp_out"])
    np.testing.assert_allclose(replayed, g["pre"][target_rows(g)], atol=1e-5 * np.abs(g["pre"]).max())
    tokens, probs = salient_logits(want.logits[-1])
    assert g["logit_tokens"].tolist() == tokens.tolist() and np.allclose(g["logit_probabilities"], probs)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_features_are_the_transcoders_encoding(tiny_graph, variant):
    """The reference's torch encoding agrees with the numpy Transcoder.encode on the model's MLP inputs."""
    ref, tcs, ids, g = tiny_graph("gemma2", variant)
    inputs = []
    hooks = [b.mlp.register_forward_pre_hook(lambda m, args: inputs.append(args[0][0].numpy())) for b in ref.layers]
    try:
        ref.run(ids)
    finally:
        for h in hooks:
            h.remove()
    acts = [tc.encode(x) for tc, x in zip(tcs.layers, inputs)]
    want = np.array([(l, p, f) for l, a in enumerate(acts) for p, f in zip(*np.nonzero(a))])
    np.testing.assert_array_equal(g["features"], want)
    np.testing.assert_allclose(g["activations"], [acts[l][p, f] for l, p, f in want], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["jumprelu", "topk", "clt"])
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_edges_are_the_frozen_models_differences(tiny_graph, arch, variant):
    ref, tcs, ids, g = tiny_graph(arch, variant)
    check_columns(ref, tcs, ids, g, some_sources(ref, ids, g))


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_an_unfrozen_norm_is_caught(tiny_graph, arch):
    """With 1/rms on the gradient path the gradients are not the frozen model's: both checks fail."""
    ref, tcs, ids, _ = tiny_graph(arch, "jumprelu")
    g = reference_graph(ref, tcs, ids, freeze_norms=False)
    with pytest.raises(AssertionError):
        check_rows_add_up(g)
    with pytest.raises(AssertionError):
        check_columns(ref, tcs, ids, g, some_sources(ref, ids, g))


def test_given_logit_tokens(tiny_graph):
    ref, tcs, ids, g = tiny_graph("llama", "relu")
    tokens = [7, int(g["logit_tokens"][0])]
    h = reference_graph(ref, tcs, ids, tokens)
    assert h["logit_tokens"].tolist() == tokens
    assert np.isclose(h["logit_probabilities"][1], g["logit_probabilities"][0])
    n = len(h["features"]) + (ref.n_layer + 1) * len(ids)
    np.testing.assert_allclose(h["adjacency"][n + 1, :n], g["adjacency"][n, :n], atol=1e-6)
    np.testing.assert_allclose(h["adjacency"][:n, :n], g["adjacency"][:n, :n], atol=1e-6)
    check_rows_add_up(h)


def test_salient_logits():
    logits = np.log(np.array([0.6, 0.02, 0.3, 0.07, 0.01]))  # 0.6 + 0.3 < 0.95 <= 0.6 + 0.3 + 0.07
    tokens, probs = salient_logits(logits)
    assert tokens.tolist() == [0, 2, 3] and np.allclose(probs, [0.6, 0.3, 0.07])
    tokens, _ = salient_logits(np.zeros(100))  # flat: the cap of 10
    assert len(tokens) == 10


def test_influence_by_hand():
    """Nodes: feature a, token t, logit L (probability 1). Edges L <- a 2, L <- t -2, a <- t 1: normalized, L draws
    half from a and half from t directly, and a all from t: influence a 0.5, t 0.5 + 0.5 * 1."""
    adjacency = np.array([[0, 1.0, 0], [0, 0, 0], [2.0, -2.0, 0]])
    np.testing.assert_allclose(reference_influence(adjacency, np.array([1.0]), 1), [0.5, 1.0, 0.0])


def test_influence_is_the_power_series(tiny_graph):
    _, _, _, g = tiny_graph("llama", "clt")
    a = np.abs(g["adjacency"].astype(np.float64))
    a /= np.maximum(a.sum(1, keepdims=True), 1e-10)
    w = np.zeros(len(a))
    w[-len(g["logit_tokens"]):] = g["logit_probabilities"]
    total, term = np.zeros(len(a)), w
    for _ in range(50):
        term = term @ a
        total += term
    assert not term.any()
    np.testing.assert_allclose(reference_influence(g["adjacency"], g["logit_probabilities"],
                                                   len(g["logit_tokens"])), total, rtol=1e-9, atol=1e-12)


def test_gemma3_270m(ref_gemma3):
    """Gemma 3 270M (the reference dequantizes its GGUF to F32) with a random 2048-wide JumpReLU transcoder whose
    encoder is scaled per layer to the MLP inputs' rms (Gemma's grow and shrink over the layers)."""
    ref = ref_gemma3
    # "The Eiffel Tower is in the city of Paris, and the Colosseum is in the city of" in the GGUF's vocabulary
    ids = [2, 818, 94648, 25822, 563, 528, 506, 3207, 529, 9079, 236764, 532, 506, 2111, 198592, 563, 528, 506, 3207,
           529]
    rms = []
    hooks = [b.mlp.register_forward_pre_hook(lambda m, args: rms.append(float(args[0].pow(2).mean().sqrt())))
             for b in ref.layers]
    try:
        want = ref.run(ids)
    finally:
        for h in hooks:
            h.remove()
    tcs = random_transcoders(ref.n_layer, ref.n_embd, 2048, density=0.0007, seed=5)
    tcs = TranscoderSet(tuple(replace(tc, W_enc=tc.W_enc / r) for tc, r in zip(tcs.layers, rms)))
    g = reference_graph(ref, tcs, ids)
    assert 300 < len(g["features"]) < 3000 and set(g["features"][:, 0]) == set(range(ref.n_layer))
    np.testing.assert_allclose(g["logits"], want.logits[-1], atol=1e-5 * np.abs(want.logits).max())
    check_rows_add_up(g)
    check_columns(ref, tcs, ids, g, some_sources(ref, ids, g))
