"""More architectures against the transformers reference, on tiny random-weight models.

``scripts/tiny_gguf.py`` writes a few-layer model of each architecture (fixed seed) once per session;
pyinterp (default settings) and the reference (transformers, eager fp32, the same GGUF dequantized)
run the same token ids. The thresholds are those of test_faithfulness.py and test_lens.py for the real
models; for interventions the *change* each one causes is compared too.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import pyinterp
from conftest import check_head_interventions, check_logits_attention_residual, check_patching, corr
from pyinterp.engine.arch import arch_of

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import tiny_gguf  # noqa: E402

ARCHS = sorted(tiny_gguf.SPECS)


@pytest.fixture(scope="session")
def one_thread():
    """Tiny graphs on one thread: on a busy 2-core machine, syncing two threads per op cost ~1 s a pass
    (measured), one thread ~1 ms. Threads split rows, not sums, so the numbers compared do not change."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _open(path: Path, **settings) -> pyinterp.Model:
    """A tiny model with the default settings but one thread."""
    return pyinterp.Model(path, n_ctx=64, n_threads=1, **settings)


@pytest.fixture(scope="session", params=ARCHS)
def tiny(request, tiny_path, one_thread):
    """(model, reference) of one tiny architecture."""
    from reference import Reference

    path = tiny_path(request.param)
    with _open(path) as model:
        assert model.arch == tiny_gguf.SPECS[request.param].arch
        yield model, Reference(path)


def _prompts(model) -> list[list[int]]:
    """BOS and random token ids (seeded), 6, 13 and 20 tokens: the longest is past gemma2's 8-key window."""
    rng = np.random.default_rng(1)
    bos = model.tokenize("", add_bos=True)
    return [bos + rng.integers(0, model.n_vocab - 1, size=length - 1).tolist() for length in (6, 13, 20)]


def test_residual_terms_are_in_the_graph(tiny):
    """The architecture table names tensors this graph has, on every layer (the embedding outside them)."""
    model, _ = tiny
    arch = arch_of(model.arch)
    layers = model.tensor_info().layers
    assert layers[arch.embedding] == {-1}
    for name in arch.residual_terms[1:]:
        assert layers[name] == set(range(model.n_layer)), name


@pytest.mark.parametrize("which", range(3))
def test_logits_attention_residual(tiny, which):
    model, ref = tiny
    trace, _ = check_logits_attention_residual(model, ref, _prompts(model)[which])
    for il in range(model.n_layer):  # far from uniform, or agreeing on it would prove little
        assert trace.attention(il).max(-1).mean() > 0.4


def test_sliding_window(tiny):
    """Layers with a sliding window see only the last ``window`` keys, in pyinterp and in the reference."""
    model, ref = tiny
    window = tiny_gguf.SPECS[model.arch].sliding_window
    ids = _prompts(model)[2]
    trace = model.run(ids, capture=["attn_scores"])
    want = ref.run(ids)
    q = len(ids) - 1
    if not window:
        assert np.all(trace.attention(0)[:, q, 0] > 0)
        return
    assert q >= window
    sliding, full = trace.attention(0), trace.attention(1)  # every other layer slides, from layer 0
    assert np.all(sliding[:, q, : q - window + 1] == 0) and np.all(want.attentions[0][:, q, : q - window + 1] == 0)
    assert np.all(full[:, q, 0] > 0)


@pytest.mark.parametrize("which", range(2))
def test_ablation(tiny, which):
    model, ref = tiny
    check_head_interventions(model, ref, _prompts(model)[which + 1], "ablate", 0.5)


@pytest.mark.parametrize("which", range(2))
def test_isolation(tiny, which):
    model, ref = tiny
    check_head_interventions(model, ref, _prompts(model)[which + 1], "isolate", 0.9)


def test_activation_patching(tiny):
    """Patch rows of a 'clean' run's residual stream into a 'corrupt' run that differs in a few tokens."""
    model, ref = tiny
    clean = _prompts(model)[1]
    corrupt = list(clean)
    corrupt[2:5] = [(t + 7) % (model.n_vocab - 1) for t in clean[2:5]]
    check_patching(model, ref, clean, corrupt, [(1, 3), (model.n_layer // 2, len(clean) - 1)], 0.75)


@pytest.mark.parametrize("arch", ARCHS)
def test_f32_weights_agree_to_rounding(tiny_path, one_thread, arch):
    """With F32 weights and an F32 KV cache nothing is quantized or rounded to F16 on either side: the graphs
    must agree to float rounding (gemma2 to ~1e-4: ggml's CPU GELU reads an F16 table), interventions
    included. This separates a graph discrepancy from the Q8_0 noise the tests above allow for."""
    from reference import Reference

    path = tiny_path(arch, f32=True)
    ref = Reference(path)
    with _open(path, type_k="f32", type_v="f32") as model:
        ids = _prompts(model)[2]
        trace = model.run(ids, capture=["attn_scores", "l_out"])
        want = ref.run(ids)
        scale = np.abs(want.logits).max()
        np.testing.assert_allclose(trace.logits, want.logits, atol=1e-3 * scale)
        for il in range(model.n_layer):
            np.testing.assert_allclose(trace.attention(il), want.attentions[il], atol=1e-3)
            np.testing.assert_allclose(trace.act("l_out", il), want.l_out[il], atol=1e-3 * np.abs(want.l_out[il]).max())
        layer, head = model.n_layer // 2, 1
        for kw in ({"ablate": [(layer, head)]}, {"isolate": (layer, head)}):
            np.testing.assert_allclose(model.run(ids, **kw).logits, ref.run(ids, **kw).logits, atol=1e-3 * scale)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_lens(tiny):
    """Every layer's lens, norm and raw, against the reference's residual stream through its own norm and head."""
    model, ref = tiny
    ids = _prompts(model)[2]
    want = ref.run(ids)
    for norm in (True, False):
        lens = model.logit_lens(ids, top_k=1, norm=norm)
        agree, diffs = [], []
        for il in range(model.n_layer):
            p = _softmax(ref.unembed(want.l_out[il], norm=norm).astype(np.float64))
            agree.append(np.mean(lens.ids[il, :, 0] == p.argmax(-1)))
            diffs.append(np.abs(lens.probs[il, :, 0] - np.take_along_axis(p, lens.ids[il, :, :1].astype(int), -1)[:, 0]).mean())
        assert np.mean(agree) >= 0.9, f"norm={norm} top-1 agreement per layer {np.round(agree, 2)}"
        assert np.mean(diffs) <= 0.05, f"norm={norm} top-1 probability |diff| per layer {np.round(diffs, 3)}"
        assert max(diffs) <= (0.05 if norm else 0.2), f"norm={norm} per layer {np.round(diffs, 3)}"


def test_attribution(tiny):
    """Direct logit attribution against the reference, on every family (patch 0005 names the terms
    llama.cpp's qwen2, qwen3, phi3 and gemma2 graphs left unnamed)."""
    model, ref = tiny
    ids = _prompts(model)[1]
    a = model.logit_attribution(ids)
    logit = a.logit
    cap = getattr(ref.model.config, "final_logit_softcapping", None)
    if cap:  # the terms add up to the logit before the final soft-capping (gemma2)
        logit = cap * np.arctanh(logit / cap)
    assert abs(a.values.sum() - logit) <= 0.05 * abs(logit) + 0.1
    want = ref.attribution(ids, a.target, a.position)
    assert corr(a.values, want) >= 0.99
    np.testing.assert_allclose(a.values, want, atol=0.05 * np.abs(want).max())


def test_unknown_architecture_is_one_line():
    with pytest.raises(pyinterp.InputError, match=r"architecture 'mamba' is not in pyinterp's architecture table") as e:
        arch_of("mamba")
    assert "\n" not in str(e.value) and "qwen3" in str(e.value)


def _ranks(others: np.ndarray, targets: list[int], logits: np.ndarray | None = None) -> np.ndarray:
    """1 + how many of ``others`` [n, n_vocab] are greater than each target's logit (of ``logits``, default
    ``others``): [n, n_targets] (numpy)."""
    logits = others if logits is None else logits
    return 1 + (others[:, None, :] > logits[:, targets][:, :, None]).sum(-1)


def test_target_lens(tiny):
    """P(target) and rank per layer against the reference's residual through its own norm and head."""
    model, ref = tiny
    ids = _prompts(model)[1]
    targets = ids[1:4]
    want = ref.run(ids)
    lens = model.logit_lens(ids, targets=targets, top_k=1)
    for il in range(model.n_layer):
        logits = ref.unembed(want.l_out[il]).astype(np.float64)
        p = _softmax(logits)[:, targets]
        # Q8_0 weights against their dequantization (tests/test_target_lens.py checks F32 weights to rounding)
        np.testing.assert_allclose(lens.target_probs[il], p, atol=0.05, err_msg=f"layer {il}")
        # the rank may differ from the reference's only by logits within the weights' rounding of the target's:
        # between the reference's counts of logits above target + tol and above target - tol, with tol three
        # times the largest target-logit difference (random tiny models have many near-equal logits)
        err = np.abs(lens.target_logits[il] - logits[:, targets]).max()
        assert err <= 0.1 * logits.std(), f"layer {il}: target logits differ by {err}"
        tol = 3 * err + 1e-5
        lo, hi = _ranks(logits - tol, targets, logits), _ranks(logits + tol, targets, logits)
        assert np.all(lo <= lens.target_ranks[il]) and np.all(lens.target_ranks[il] <= hi), f"layer {il}"


def test_attribution_by_head(tiny):
    """Each head's share of the attention term against the reference (o_proj's input split by head, times the
    head's columns of o_proj, frozen norms, lm_head row); a layer's heads add up to its attention term."""
    model, ref = tiny
    ids = _prompts(model)[1]
    a = model.logit_attribution(ids)
    assert a.heads.shape == (model.n_layer, model.n_head)
    np.testing.assert_allclose(a.heads.sum(1), a.attn, atol=1e-3 * np.abs(a.attn).max() + 1e-5)
    want = ref.head_attribution(ids, a.target, a.position)
    assert corr(a.heads, want) >= 0.99
    np.testing.assert_allclose(a.heads, want, atol=0.05 * np.abs(want).max())
