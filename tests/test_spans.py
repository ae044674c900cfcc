"""Attention to spans and token classes over a prompt set (pyinterp.analysis.spans, ``pyinterp spans``): the masses
against sums over the captured attention written here, against the transformers reference, the aggregate against the
per-example values in the output, depth percentages, and errors."""

from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pytest

from conftest import corr
from pyinterp import InputError
from pyinterp.analysis.prompts import load_prompts
from pyinterp.analysis.spans import span_masses
from pyinterp.analysis.stats import summarize
from pyinterp.cli import main
from pyinterp.cli.options import parse_layers

ROWS = [
    {"prompt": "The Eiffel Tower is located in the city of", "spans": {"subject": [4, 16], "relation": [17, 27]}},
    {"prompt": "The Louvre, a museum, is located in the city of", "spans": {"subject": [4, 10], "relation": [25, 35]}},
    {"prompt": "In Paris, Big Ben is a clock tower. It is in the city of", "spans": {"subject": [10, 17]}},
]
LAYERS = [3, 17, 29]


@pytest.fixture(scope="module")
def set_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("spans") / "set.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def own_keys(model, text: str, ids: list[int], span: tuple[int, int]) -> list[int]:
    """The tokens overlapping ``span``, from the running length of the token texts (SmolLM2 adds no BOS and its token
    texts spell the prompt)."""
    ends = np.cumsum([len(model.token_str(t)) for t in ids])
    starts = ends - [len(model.token_str(t)) for t in ids]
    assert "".join(model.token_str(t) for t in ids) == text
    return [i for i, (a, b) in enumerate(zip(starts, ends)) if a < span[1] and b > span[0]]


def expected(model, attention, query: int | str = "last") -> dict[str, np.ndarray]:
    """Every example's masses ``[n_examples, n_layers, n_head]`` per set, summed here over ``attention(ids, layer)``
    (``[n_head, n, n]``); NaN where an example lacks the span."""
    names = ["subject", "relation", "punctuation", "first", "previous"]
    out = {name: np.full((len(ROWS), len(LAYERS), model.n_head), np.nan) for name in names}
    for i, row in enumerate(ROWS):
        text = row["prompt"]
        ids = model.tokenize(text)
        q = len(ids) - 1 if query == "last" else query % len(ids)
        keys = {name: own_keys(model, text, ids, span) for name, span in row["spans"].items()}
        keys["punctuation"] = [k for k, t in enumerate(ids) if model.token_str(t).strip() in {",", "."}]
        keys["first"], keys["previous"] = [0], [q - 1]
        for j, il in enumerate(LAYERS):
            attn = attention(ids, il)
            for name, ks in keys.items():
                out[name][i, j] = sum(attn[:, q, k].astype(np.float64) for k in ks if k <= q)
    return out


@pytest.mark.parametrize("query", ["last", -4])
def test_masses_are_sums_over_the_captured_attention(smollm2, set_path, query):
    result = span_masses(smollm2, load_prompts(set_path, ["prompt"]), LAYERS, query)
    assert result.names == ["subject", "relation", "punctuation", "first", "previous"]
    want = expected(smollm2, lambda ids, il: smollm2.run(ids, capture=[f"attn_scores-{il}"]).attention(il), query)
    for name in result.names:
        np.testing.assert_allclose(result.values[name], want[name], rtol=0, atol=1e-12, err_msg=name)
    assert np.isnan(result.values["relation"][2]).all() and result.summary("relation").n == 2
    assert result.tokens["punctuation"][1] == [3, 6] and result.tokens["first"][0] == [0]
    # the sets before the query split the query's attention: what they do not cover is the rest of the prompt
    assert np.all(result.values["first"] + result.values["previous"] <= 1 + 1e-6)


def test_masses_agree_with_the_reference(smollm2_f32, smollm2, ref_smollm2, set_path):
    examples = load_prompts(set_path, ["prompt"])
    cache: dict = {}

    def attention(ids, il):
        key = tuple(ids)
        if key not in cache:
            cache[key] = ref_smollm2.run(ids).attentions
        return cache[key][il]

    want = expected(smollm2, attention)
    f32 = span_masses(smollm2_f32, examples, LAYERS)
    quant = span_masses(smollm2, examples, LAYERS)
    for name in f32.names:
        ok = ~np.isnan(want[name])
        # F32 twin: the reference's own weights, so each attention weight agrees to float rounding (max |diff| 1e-4,
        # as in test_fidelity), and a mass, a sum of weights, to that times its keys
        n_keys = max(len(k) for k in f32.tokens[name] if k is not None)
        assert np.abs(f32.values[name][ok] - want[name][ok]).max() <= 1e-4 * n_keys, name
        # quantized (Q4_1) weights: test_faithfulness allows a mean |diff| of 0.004 per weight over whole attention
        # matrices, mostly near-zero weights; one query row's large masses (the first token's ~0.5) move more: mean
        # |diff| 0.0057 measured on "first", so 0.01 here, and the ranking of heads the same (correlation)
        assert np.abs(quant.values[name][ok] - want[name][ok]).mean() <= 0.01, name
        assert corr(quant.values[name][ok], want[name][ok]) >= 0.99, name


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_aggregate_equals_the_per_example_values(capsys, tmp_path, set_path):
    png, table = tmp_path / "spans.png", tmp_path / "spans.csv"
    code, out, err = run_cli(capsys, "spans", "-c", "256", "--prompts", str(set_path), "--layers", "40%-85%",
                             "--top", "4", "--seed", "3", "--json", "--png", str(png), "--csv", str(table))
    assert code == 0, err
    data = json.loads(out)
    assert data["layers"] == list(range(12, 26)) == parse_layers("40%-85%", 30)
    assert data["ranked"] == ["subject", "relation"] and data["files"] == [str(table), str(png)]
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    for name, agg in data["spans"].items():
        per = np.array([e["masses"][name] for e in data["examples"] if e["masses"][name] is not None])
        assert agg["n"] == len(per) == (2 if name == "relation" else 3)
        s = summarize(per, seed=3)
        for stat in ("mean", "std", "low", "high"):
            np.testing.assert_allclose(agg[stat], getattr(s, stat), atol=2e-6, err_msg=f"{name} {stat}")
        np.testing.assert_allclose(agg["mean"], per.mean(0), atol=2e-6)
        np.testing.assert_allclose(agg["std"], per.std(0, ddof=1), atol=2e-6)
        mine = [r for r in rows if r["span"] == name]
        np.testing.assert_allclose([float(r["mean"]) for r in mine], np.ravel(s.mean), atol=2e-6)
        order = np.argsort(-np.asarray(agg["mean"]), axis=None, kind="stable")[:4]
        assert [(t["layer"], t["head"]) for t in agg["top"]] == [(12 + j, h) for j, h in
                                                                  zip(*np.unravel_index(order, s.mean.shape))]
    image = cv2.imread(str(png))
    assert image is not None and image.shape[1] > 5 * 9 * 30  # five sets of nine heads side by side

    code, out, err = run_cli(capsys, "spans", "-c", "256", "--prompts", str(set_path), "--layers", "29",
                             "--span", "punctuation", "--top", "2", "--md")
    assert code == 0, err
    assert "**heads ranked by mass on punctuation**" in out and "| rank | layer | head | mean | 95% CI |" in out
    assert "subject" in out and "heads ranked by mass on subject" not in out


@pytest.mark.parametrize("rows, args, message", [
    ([{"prompt": "a b", "spans": {"first": [0, 1]}}], [], "set.jsonl: span name 'first' is a token class"),
    ([{"prompt": "a b"}, {"text": "c"}], [], "set.jsonl:2: no 'prompt' field"),
    ([{"prompt": "a b"}, {"prompt": "a"}], ["--from", "5"], "set.jsonl:1: query position 5 is outside"),
    ([{"prompt": "a b"}], ["--span", "object"], "--span 'object': the set has punctuation, first, previous"),
    ([{"prompt": "a b"}], ["--from", "x"], "'x' is neither 'last' nor a token position"),
    ([{"prompt": "a b"}], ["--layers", "40%-150%"], "depth fraction 150% is not in 0..1"),
])
def test_cli_errors(capsys, tmp_path, rows, args, message):
    path = tmp_path / "set.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = run_cli(capsys, "spans", "-c", "64", "--prompts", str(path), *args)
    assert code == 2 and out == ""
    assert err.startswith("pyinterp: error:") and message in err and err.count("\n") == 1


def test_depth_percentages():
    assert parse_layers("40%-85%", 30) == list(range(12, 26))
    assert parse_layers("50%", 30) == parse_layers("0.5", 30) == [15] and parse_layers("0%-100%", 4) == [0, 1, 2, 3]
    with pytest.raises(InputError, match="neither a layer"):
        parse_layers("%", 30)
