"""TransformerLens hook names, accepted where llama.cpp names are: in capture=[...] and as keys of the trace."""

from __future__ import annotations

import numpy as np
import pytest

from pyinterp import PyinterpError

PROMPT = "The capital of France is"


def test_tl_names_are_trace_keys(smollm2):
    tl = smollm2.run(PROMPT, capture=["blocks.5.hook_resid_post", "blocks.3.hook_resid_pre", "blocks.0.hook_resid_pre",
                                      "blocks.2.attn.hook_pattern", "hook_embed"])
    plain = smollm2.run(PROMPT, capture=["l_out", "embd", "attn_scores-2"])
    np.testing.assert_array_equal(tl["blocks.5.hook_resid_post"], plain["l_out-5"])
    # the residual stream entering block L is the one leaving block L-1; entering block 0, the embedding
    np.testing.assert_array_equal(tl["blocks.3.hook_resid_pre"], plain["l_out", 2])
    np.testing.assert_array_equal(tl["blocks.0.hook_resid_pre"], plain["embd"])
    np.testing.assert_array_equal(tl["hook_embed"], plain["embd"])
    np.testing.assert_array_equal(tl["blocks.2.attn.hook_pattern"], plain.attention(2))
    np.testing.assert_array_equal(tl["attn.hook_pattern", 2], plain.attention(2))
    assert tl["blocks.3.hook_resid_pre"].shape == (len(tl.tokens), smollm2.n_embd)


def test_a_name_not_captured_is_one_line(smollm2):
    tl = smollm2.run(PROMPT, capture=["blocks.5.hook_resid_post"])
    with pytest.raises(PyinterpError, match="l_out-4 was not captured"):
        tl["blocks.4.hook_resid_post"]


def test_a_metric_built_from_ids_is_callable(smollm2):
    """A metric is any callable on the logits: logit_diff(...) and prob(...) too, when they name token ids."""
    from pyinterp.analysis.patching import logit_diff, prob

    logits = smollm2.run(PROMPT).logits[-1]
    paris, rome = smollm2.tokenize(" Paris", add_bos=False)[0], smollm2.tokenize(" Rome", add_bos=False)[0]
    assert logit_diff(paris, rome)(logits) == float(logits[paris]) - float(logits[rome])
    p = np.exp(logits.astype(np.float64) - logits.max())
    assert prob(paris)(logits) == pytest.approx(p[paris] / p.sum(), rel=1e-9)
    with pytest.raises(PyinterpError, match="bind it to a model"):
        logit_diff(" Paris", " Rome")(logits)
