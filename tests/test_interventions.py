"""In-graph captures and interventions: exactness properties and input checking."""

from __future__ import annotations

import numpy as np
import pytest

import pyinterp
import pyinterp.engine.arch
from pyinterp import InputError, PyinterpError

PROMPT = "When Mary and John went to the store, John gave a drink to"


def test_capture_does_not_change_logits(smollm2):
    """Stock behaviour with the hook unset, and exactly the same logits with a capture-only hook."""
    plain = smollm2.run(PROMPT).logits
    traced = smollm2.run(PROMPT, capture=["l_out", "attn_out", "ffn_out", "kqv_out"])
    np.testing.assert_array_equal(plain, traced.logits)
    again = smollm2.run(PROMPT).logits  # the hook is removed again after a run
    np.testing.assert_array_equal(plain, again)


def test_capture_shapes(smollm2):
    m = smollm2
    trace = m.run(PROMPT, capture=["l_out-3", "Qcur-3", "kqv_heads-3", "attn_scores-3", "result_norm"])
    n = len(trace.tokens)
    assert trace.keys() == [("l_out", 3), ("Qcur", 3), ("kqv_heads", 3), ("attn_scores", 3), ("result_norm", -1)]
    assert trace["l_out", 3].shape == (n, m.n_embd)
    assert trace["l_out-3"] is trace["l_out", 3]
    assert trace.act("Qcur", 3).shape == (n, m.n_embd)  # the first tensor named Qcur: the projection
    assert trace["kqv_heads", 3].shape == (n, m.n_head, m.n_embd // m.n_head)
    assert trace.attention(3).shape == (m.n_head, n, n)
    assert trace["result_norm"].shape == (n, m.n_embd)
    with pytest.raises(PyinterpError, match="was not captured"):
        trace.attention(4)


def test_residual_stack(smollm2):
    trace = smollm2.run(PROMPT, capture=["l_out"])
    stack = trace.stack("l_out")
    assert stack.shape == (smollm2.n_layer, len(trace.tokens), smollm2.n_embd)
    # l_out is the sum of the layer input and its two contributions
    t = smollm2.run(PROMPT, capture=["l_out-4", "l_out-5", "ffn_inp-5", "attn_out-5", "ffn_out-5"])
    np.testing.assert_allclose(t["l_out", 4] + t["attn_out", 5], t["ffn_inp", 5], atol=1e-4)
    np.testing.assert_allclose(t["ffn_inp", 5] + t["ffn_out", 5], t["l_out", 5], atol=1e-4)


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_ablation_same_on_flash_and_explicit_layers(request, name):
    """A head ablated on a flash-attention layer (output masked) and on an explicit layer (scores zeroed)."""
    model = request.getfixturevalue(name)
    layer, head = model.n_layer // 2, 1
    flash = model.run(PROMPT, ablate=[(layer, head)])
    explicit = model.run(PROMPT, ablate=[(layer, head)], capture=[f"attn_scores-{layer}"])
    assert np.all(explicit.attention(layer)[head] == 0)
    assert np.all(explicit.attention(layer)[head - 1].sum(-1) > 0.99)
    a, b = flash.logits[-1], explicit.logits[-1]
    assert np.corrcoef(a, b)[0, 1] >= 1 - 1e-3
    # the paths differ by rounding (F16 weights times V on the explicit path); the effect of a large
    # intervention must agree between them
    plain_flash = model.run(PROMPT).logits[-1]
    plain_explicit = model.run(PROMPT, capture=[f"attn_scores-{layer}"]).logits[-1]
    iso_flash = model.run(PROMPT, isolate=(layer, head)).logits[-1]
    iso_explicit = model.run(PROMPT, isolate=(layer, head), capture=[f"attn_scores-{layer}"]).logits[-1]
    assert np.corrcoef(iso_flash - plain_flash, iso_explicit - plain_explicit)[0, 1] >= 0.95


def test_ablation_acts_from_its_layer_on(smollm2):
    layer = 6
    base = smollm2.run(PROMPT, capture=["l_out"])
    abl = smollm2.run(PROMPT, capture=["l_out"], ablate=[(layer, 2)])
    for il in range(layer):
        np.testing.assert_array_equal(base["l_out", il], abl["l_out", il])
    assert np.abs(base["l_out", layer] - abl["l_out", layer]).max() > 1e-3


def test_ablated_head_output_is_zero(smollm2):
    m = smollm2
    d = m.n_embd // m.n_head
    t = m.run(PROMPT, ablate=[(3, 4)], capture=["kqv_out-3"])
    out = t["kqv_out", 3]
    assert np.all(out[:, 4 * d:5 * d] == 0)
    assert np.abs(out[:, 3 * d:4 * d]).max() > 0


def test_isolate_equals_ablating_the_others(smollm2):
    m = smollm2
    iso = m.run(PROMPT, isolate=(5, 2)).logits
    others = m.run(PROMPT, ablate=[(5, h) for h in range(m.n_head) if h != 2]).logits
    np.testing.assert_array_equal(iso, others)


def test_patch_with_own_row_changes_nothing(smollm2):
    t = smollm2.run(PROMPT, capture=["l_out-7"])
    patched = smollm2.run(PROMPT, patch=[("l_out", 7, 4, t["l_out", 7][4])])
    np.testing.assert_array_equal(t.logits, patched.logits)


def test_patch_changes_only_later_positions(smollm2):
    m = smollm2
    n = len(m.tokenize(PROMPT))
    rng = np.random.default_rng(0)
    row = rng.normal(size=m.n_embd).astype(np.float32) * 5
    base = m.run(PROMPT, capture=["l_out-7", "l_out-8"])
    t = m.run(PROMPT, patch=[("l_out", 7, 5, row)], capture=["l_out-7", "l_out-8"])
    np.testing.assert_array_equal(t["l_out", 7][5], row)
    np.testing.assert_array_equal(t["l_out", 7][:5], base["l_out", 7][:5])
    np.testing.assert_array_equal(t.logits[:5], base.logits[:5])
    assert np.abs(t.logits[5:] - base.logits[5:]).max(axis=1).min() > 1e-3
    assert t["l_out", 8].shape == (n, m.n_embd)


def test_patch_other_tensors(smollm2):
    m = smollm2
    zeros = np.zeros(m.n_embd, dtype=np.float32)
    t = m.run(PROMPT, patch=[("attn_out", 4, 2, zeros), ("ffn_out", 4, 2, zeros)], capture=["l_out-3", "l_out-4"])
    np.testing.assert_allclose(t["l_out", 4][2], t["l_out", 3][2], atol=1e-5)


def test_context_managers_and_generate(smollm2, fresh_logits):
    m = smollm2
    heads = [(il, h) for il in range(0, 12) for h in range(m.n_head)]
    ablated_run = m.run(PROMPT, ablate=heads)
    with m.ablated(heads):
        inside = m.run(PROMPT)
        gen = m.generate(PROMPT, 3)
    np.testing.assert_array_equal(inside.logits, ablated_run.logits)
    assert gen.tokens[0] == int(np.argmax(ablated_run.logits[-1]))
    # the whole generation is under ablation: it equals greedy decoding of ablated full passes
    ids = gen.prompt_tokens + gen.tokens
    full = m.run(ids, ablate=heads).logits
    n = len(gen.prompt_tokens)
    assert [int(t) for t in np.argmax(full[n - 1:-1], axis=-1)] == gen.tokens
    # and it is gone after the block: a fresh model's logits
    np.testing.assert_array_equal(m.run(PROMPT).logits, fresh_logits(PROMPT))
    assert not np.array_equal(m.run(PROMPT).logits, ablated_run.logits)


def test_isolated_and_patched_context_managers(smollm2, fresh_logits):
    m = smollm2
    want = m.run(PROMPT, isolate=(5, 2)).logits
    assert not np.array_equal(want, fresh_logits(PROMPT))
    with m.isolated(5, 2):
        np.testing.assert_array_equal(m.run(PROMPT).logits, want)
    np.testing.assert_array_equal(m.run(PROMPT).logits, fresh_logits(PROMPT))
    row = np.zeros(m.n_embd, dtype=np.float32)
    with m.patched([("l_out", 3, 1, row)]):
        p = m.run(PROMPT, capture=["l_out-3"])
    assert np.all(p["l_out", 3][1] == 0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(capture=["no_such_tensor"]), "unknown tensor name 'no_such_tensor'"),
    (dict(capture=["l_out-30"]), "layer 30 out of range"),
    (dict(capture=["result_norm-3"]), "not computed on layer 3"),
    (dict(ablate=[(30, 0)]), "layer 30 out of range"),
    (dict(ablate=[(0, 9)]), "head 9 out of range"),
    (dict(ablate=[(0,)]), "expected \\(layer, head\\) pairs"),
    (dict(isolate=(0, -1)), "head -1 out of range"),
    (dict(patch=[("l_out", 3, 99, np.zeros(576))]), "position 99 out of range"),
    (dict(patch=[("l_out", 3, 0, np.zeros(100))]), "vector has 100 values, the tensor's rows have 576"),
    (dict(patch=[("kqv_heads", 3, 0, np.zeros(576))]), "not a \\[n_tokens, width\\] tensor"),
    (dict(patch=[("l_out", 3, 0, np.full(576, np.nan))]), "NaN"),
    (dict(patch=[("bogus", 3, 0, np.zeros(576))]), "unknown tensor name"),
])
def test_bad_interventions(smollm2, fresh_logits, kwargs, message):
    with pytest.raises(PyinterpError, match=message):
        smollm2.run(PROMPT, **kwargs)
    # a failed call leaves no intervention behind: the shared model gives a fresh model's logits
    np.testing.assert_array_equal(smollm2.run("Hi").logits, fresh_logits("Hi"))


def test_gemma_names(gemma3):
    names = gemma3.tensor_names()
    for name in ["l_out", "attn_scores", "kqv_out", "ffn_out", "attn_post_norm", "result_norm"]:
        assert name in names
    assert "attn_out" not in names  # gemma3 names its attention output after the post-norm


def test_flash_off_context_matches_reference_layout():
    with pyinterp.Model("smollm2", n_ctx=128, flash_attn=False) as m:
        t = m.run(PROMPT, capture=["attn_scores-2"], ablate=[(2, 0)])
        assert np.all(t.attention(2)[0] == 0)


def test_transformerlens_aliases(pair):
    """TransformerLens hook names capture the same tensors as the llama.cpp names the architecture table maps
    them to (Gemma's hook_attn_out is its attention post-norm)."""
    model, _ = pair
    prompt = "The capital of France is"
    by_alias = model.run(prompt, capture=["blocks.3.hook_resid_post", "blocks.3.hook_attn_out", "attn.hook_pattern",
                                          "hook_embed"])
    arch = pyinterp.engine.arch.arch_of(model.arch)
    by_name = model.run(prompt, capture=["l_out-3", f"{arch.attn_term}-3", "attn_scores", arch.embedding])
    assert by_alias.keys() == by_name.keys()
    for key in by_name.keys():
        np.testing.assert_array_equal(by_alias[key], by_name[key])
    with pytest.raises(InputError, match="unknown tensor name 'blocks.3.hook_nothing'"):
        model.run(prompt, capture=["blocks.3.hook_nothing"])


def test_head_masks_need_an_attention_layer():
    """A layer without attention (hybrid models): ablating or isolating a head there is an error, not a no-op."""
    from pyinterp.engine.names import Planner, TensorInfo
    from pyinterp.interventions import AblateHeads, IsolateHead, Target

    info = TensorInfo({"kqv_heads": frozenset({0, 2}), "l_out": frozenset({0, 1, 2})},
                      {"kqv_heads": (4, 2, 2), "l_out": (8, 2)})
    target = Target(Planner(3, 2, info), 2)
    assert {op.layer for op in AblateHeads(((0, 1), (2, 0))).ops(target)} == {0, 2}
    with pytest.raises(InputError, match="ablate: layer 1 has no attention heads"):
        AblateHeads(((1, 0),)).ops(target)
    with pytest.raises(InputError, match="isolate: layer 1 has no attention heads"):
        IsolateHead(1, 0).ops(target)


def test_attention_capture_needs_a_float_v_cache(tiny_path):
    """With flash attention and a quantized V cache, the explicit attention path (which capturing attention weights
    needs, and which the tensor probe ran on every layer) corrupted the heap: the process aborted when the model was
    freed, after every run. Now the model runs, ablates and generates, and a capture of the weights is one line."""
    import subprocess
    import sys

    code = (f"import pyinterp\n"
            f"m = pyinterp.Model({str(tiny_path('llama'))!r}, n_ctx=64, n_threads=1, flash_attn=True, type_k='f16', "
            f"type_v='q8_0')\n"
            "import numpy as np\n"
            "assert np.isfinite(m.run('a b c', ablate=[(1, 0)]).logits).all() and len(m.generate('a b', 2).tokens) <= 2\n"
            "for spec in ('attn_scores', 'blocks.1.attn.hook_pattern'):\n"
            "    try:\n"
            "        m.run('a b c', capture=[spec])\n"
            "    except pyinterp.InputError as e:\n"
            "        assert 'needs an f32, f16 or bf16 V cache, not q8_0' in str(e), e\n"
            "    else:\n"
            "        raise AssertionError('no error')\n"
            "m.close()\n"
            "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
