"""The head detector: its definitions by hand on synthetic attention, its scores against the same
definitions applied to the transformers reference's attention, and ``pyinterp heads``."""

from __future__ import annotations

import json

import cv2
import gguf
import numpy as np
import pytest

from pyinterp import InputError
from pyinterp.cli import main
from pyinterp.analysis.heads import head_scores, repeated_random_tokens, scores_from_attention


def causal_attention(shape: tuple[int, ...], n: int, seed: int) -> np.ndarray:
    """Random row-normalised lower-triangular [..., n, n] attention probabilities."""
    rng = np.random.default_rng(seed)
    attn = (rng.random((*shape, n, n)) + 0.05) * np.tril(np.ones((n, n)))
    return attn / attn.sum(-1, keepdims=True)


def test_definitions_by_hand():
    # positions 0..4: token 7 at 0, 1 and 3; 4 and 9 once each
    ids = [7, 7, 4, 7, 9]
    attn = causal_attention((2, 3), 5, seed=0)
    got = scores_from_attention(attn, ids)
    for il in range(2):
        for h in range(3):
            a = attn[il, h]
            # previous token: queries 1..4, each to the key before it
            assert got["previous_token"][il, h] == pytest.approx((a[1, 0] + a[2, 1] + a[3, 2] + a[4, 3]) / 4)
            # duplicate token: query 1 (7, seen at 0) and query 3 (7, seen at 0 and 1)
            assert got["duplicate_token"][il, h] == pytest.approx((a[1, 0] + (a[3, 0] + a[3, 1])) / 2)
            # induction: query 3 only, to the tokens after its earlier 7s (positions 1 and 2); query 1's
            # "next after the earlier 7" is itself, which does not count
            assert got["induction"][il, h] == pytest.approx(a[3, 1] + a[3, 2])


def test_definitions_need_repeats():
    attn = causal_attention((1, 1), 3, seed=1)
    with pytest.raises(InputError, match="duplicate-token") as info:
        scores_from_attention(attn, [1, 2, 3])
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="induction"):
        scores_from_attention(attn, [1, 1, 2])  # a repeat, but right after the first occurrence
    with pytest.raises(InputError, match="attention must be"):
        scores_from_attention(attn, [1, 1, 2, 1])


def test_ordinary_tokens_match_gguf_token_types(gemma3):
    """The random tokens come from NORMAL tokens only, as the GGUF's own token-type table says. Gemma 3's
    vocabulary has control, user-defined and byte tokens (SmolLM2's only control ones besides normal)."""
    field = gguf.GGUFReader(gemma3.path).fields["tokenizer.ggml.token_type"]
    types = np.array([field.parts[i][0] for i in field.data])
    assert {gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED, gguf.TokenType.BYTE} <= set(types.tolist())
    np.testing.assert_array_equal(gemma3.ordinary_tokens(), np.flatnonzero(types == gguf.TokenType.NORMAL))


def test_scores_match_reference(pair):
    model, ref = pair
    n = 24
    scores = head_scores(model, seq_len=n, seed=3)
    ids = scores.tokens
    bos = model.tokenize("")
    first = ids[len(bos) : len(bos) + n]
    assert ids == bos + first + first and len(set(first)) == n
    assert scores.what == f"{n} random tokens repeated twice, seed 3"
    assert repeated_random_tokens(model, n, 3) == ids and repeated_random_tokens(model, n, 4) != ids

    attn = np.stack(ref.run(ids).attentions)  # [n_layer, n_head, n_tokens, n_tokens]
    want = scores_from_attention(attn, ids)
    for kind in ("previous_token", "duplicate_token", "induction"):
        got = getattr(scores, kind)
        assert got.shape == (model.n_layer, model.n_head)
        assert np.abs(got - want[kind]).max() <= 0.02, kind
    # the textbook forms on the reference's attention: the diagonal below the main one, and in the
    # second copy the key n - 1 positions back (the token after the query's first occurrence)
    b = len(bos)
    second = np.arange(b + n, b + 2 * n)
    np.testing.assert_allclose(want["previous_token"], np.diagonal(attn, -1, 2, 3).mean(-1), atol=1e-6)
    np.testing.assert_allclose(want["induction"], attn[:, :, second, second - n + 1].mean(-1), atol=1e-6)
    np.testing.assert_allclose(want["duplicate_token"], attn[:, :, second, second - n].mean(-1), atol=1e-6)

    # the detector finds induction heads, the same three as the reference (the 4th scores 0.08 lower)
    top = scores.top("induction", 3)
    ref_top = np.unravel_index(np.argsort(-want["induction"], axis=None)[:3], want["induction"].shape)
    assert top[-1][2] > 0.3 and [s for _, _, s in top] == sorted((s for _, _, s in top), reverse=True)
    assert {(il, h) for il, h, _ in top} == set(zip(*ref_top))


def scores_by_loops(attn: np.ndarray, ids: list[int]) -> dict[str, np.ndarray]:
    """The three scores written out query by query, independently of pyinterp.analysis.heads' masks: for each query, the
    attention summed over its keys of each kind (previous: k = q - 1; duplicate: k < q with the same token;
    induction: k < q right after an earlier occurrence of the query's token), averaged over the queries that
    have such a key. attn: [n_layer, n_head, n, n]."""
    keys = {"previous_token": lambda q: [q - 1] if q > 0 else [],
            "duplicate_token": lambda q: [k for k in range(q) if ids[k] == ids[q]],
            "induction": lambda q: [k for k in range(1, q) if ids[k - 1] == ids[q]]}
    out = {}
    for kind, of in keys.items():
        sums = [attn[:, :, q, of(q)].sum(-1) for q in range(len(ids)) if of(q)]
        out[kind] = np.mean(sums, axis=0)
    return out


def test_prompt_scores(smollm2):
    prompt = "1 2 3 4 5 6 7 8 1 2 3 4 5 6 7 8"
    scores = head_scores(smollm2, prompt=prompt)
    assert scores.tokens == smollm2.tokenize(prompt) and scores.seq_len is None and scores.seed is None
    trace = smollm2.run(prompt, capture=["attn_scores"])
    attn = np.stack([trace.attention(il) for il in range(smollm2.n_layer)])
    want = scores_by_loops(attn, scores.tokens)
    for kind in ("previous_token", "duplicate_token", "induction"):
        np.testing.assert_allclose(getattr(scores, kind), want[kind], rtol=0, atol=1e-6, err_msg=kind)
    with pytest.raises(InputError, match="unknown score 'copying'"):
        scores.top("copying", 3)
    with pytest.raises(InputError, match="need a repeat"):
        head_scores(smollm2, prompt="The capital of France is")
    with pytest.raises(InputError, match="seq_len must be in 2.."):
        head_scores(smollm2, seq_len=1)
    with pytest.raises(InputError, match="seed must be >= 0"):
        head_scores(smollm2, seed=-1)


def test_cli_table_png_json(capsys, tmp_path, smollm2):
    png = tmp_path / "heads.png"
    assert main(["heads", "--seq-len", "16", "--seed", "2", "--top", "4", "--png", str(png)]) == 0
    out = capsys.readouterr().out.splitlines()
    api = head_scores(smollm2, seq_len=16, seed=2)
    assert out[0] == f"head scores of {smollm2.path.name}: 16 random tokens repeated twice, seed 2 (heads as layer:head)"
    assert out[1].split() == ["rank", "previous", "token", "duplicate", "token", "induction"]
    rows = [line.split() for line in out[2:6]]
    assert [r[0] for r in rows] == ["1", "2", "3", "4"] and out[6] == f"wrote {png}"
    for rank, row in enumerate(rows):
        for col, kind in enumerate(("previous_token", "duplicate_token", "induction")):
            il, h, s = api.top(kind, 4)[rank]
            assert row[1 + 2 * col] == f"{il}:{h}" and float(row[2 + 2 * col]) == pytest.approx(s, abs=2e-3)
    image = cv2.imread(str(png))
    assert image is not None and image.shape[1] > image.shape[0] and image.std() > 20

    assert main(["heads", "--seq-len", "16", "--seed", "2", "--json", "--png", str(tmp_path / "b.png")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tokens"] == api.tokens and data["files"] == [str(tmp_path / "b.png")]
    np.testing.assert_allclose(data["induction"], api.induction, atol=1e-5)
    assert np.array(data["previous_token"]).shape == (smollm2.n_layer, smollm2.n_head)


@pytest.mark.parametrize("args, code, message", [
    (["--seq-len", "1"], 2, "'--seq-len': 1 is not in the range x>=2"),
    (["--seq-len", "100000"], 2, "seq_len must be in 2..49135"),
    (["--seed", "-1"], 2, "'--seed': -1 is not in the range x>=0"),
    (["--top", "0"], 2, "'--top': 0 is not in the range x>=1"),
    (["--seq-len", "x"], 2, "'x' is not a valid integer"),
    (["-p", "The capital of France is"], 2, "need a repeat"),
    (["--seq-len", "4", "--png", "/nonexistent-dir/h.png"], 1, "directory /nonexistent-dir does not exist"),
    (["-m", "/nonexistent.gguf"], 1, "nonexistent.gguf"),
])
def test_cli_errors(capsys, args, code, message):
    assert main(["heads", *args]) == code
    err = capsys.readouterr().err
    assert err.startswith("pyinterp: error: ") and err.count("\n") == 1 and message in err, err
