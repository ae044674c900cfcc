"""Direct logit attribution, computed in the graph, against the model's logit and the reference."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import corr
from pyinterp import InputError

PROMPT = "The Eiffel Tower is located in the city of"


def test_terms_add_up_to_the_logit(pair):
    """On the quantized file: activations are quantized term by term on their way into the unembedding, and the
    kernels of the CPU variant round them, so the terms are near the reference's, not equal (the last FFN term moves
    by up to 0.5 between CPUs); the F32 twin below checks the values themselves."""
    model, ref = pair
    a = model.logit_attribution(PROMPT)
    assert a.target_str == " Paris" and a.position == len(model.tokenize(PROMPT)) - 1
    assert a.values.shape == (1 + 2 * model.n_layer,) and a.attn.shape == a.ffn.shape == (model.n_layer,)
    assert a.labels[0] in ("embd", "inp_scaled") and a.labels[1].endswith("-0")
    assert abs(a.values.sum() - a.logit) <= 0.05 * abs(a.logit) + 0.1
    want = ref.attribution(model.tokenize(PROMPT), a.target, a.position)
    assert corr(a.values, want) >= 0.99
    top = set(np.argsort(-np.abs(want))[:5])
    assert len(top & set(np.argsort(-np.abs(a.values))[:5])) >= 4


def test_terms_equal_the_reference_on_f32_weights(f32_pair):
    model, ref = f32_pair
    a = model.logit_attribution(PROMPT)
    want = ref.attribution(model.tokenize(PROMPT), a.target, a.position)
    np.testing.assert_allclose(a.values, want, atol=1e-3 * np.abs(want).max())
    assert abs(a.values.sum() - a.logit) <= 1e-3 * abs(a.logit) + 1e-3


def test_target_and_position(smollm2):
    a = smollm2.logit_attribution(PROMPT, target=" London", position=-1)
    assert a.target_str == " London"
    b = smollm2.logit_attribution(PROMPT, target=a.target, position=3)
    assert b.position == 3 and not np.allclose(a.values, b.values)
    with pytest.raises(InputError, match="not one"):
        smollm2.logit_attribution(PROMPT, target=" Parisian tower")
    with pytest.raises(InputError, match="position 99 out of range"):
        smollm2.logit_attribution(PROMPT, position=99)


def test_attribution_sees_ablation(smollm2):
    a = smollm2.logit_attribution(PROMPT, target=" Paris")
    with smollm2.ablated([(20, h) for h in range(smollm2.n_head)]):
        b = smollm2.logit_attribution(PROMPT, target=" Paris")
    assert abs(b.attn[20]) < 1e-6 < abs(a.attn[20])
    # earlier terms are unchanged; only the frozen final-norm scale moves, by one factor for all of them
    before_a, before_b = a.values[:1 + 2 * 20], b.values[:1 + 2 * 20]
    factor = float(before_b @ before_a / (before_a @ before_a))
    assert factor != 1.0
    np.testing.assert_allclose(before_b, factor * before_a, rtol=1e-3, atol=1e-6)
