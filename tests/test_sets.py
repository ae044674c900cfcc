"""Prompt sets (pyinterp.analysis.prompts) and their statistics (pyinterp.analysis.stats)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pyinterp import InputError
from pyinterp.analysis.prompts import load_prompts, span_tokens
from pyinterp.analysis.stats import markdown_table, normalized_patching, permutation_p, summarize


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_jsonl_and_tsv_read_the_same_rows(tmp_path):
    rows = [{"prompt": "The capital of France is", "target": [" Paris", " London"], "spans": {"country": [15, 21]},
             "label": 1},
            {"prompt": "Tea is", "target": " hot", "label": "drink"}]
    jsonl = write(tmp_path, "s.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    tsv = write(tmp_path, "s.tsv", "prompt\ttarget\tspans\tlabel\n"
                "The capital of France is\t Paris| London\t{\"country\": [15, 21]}\t1\nTea is\t hot\t\tdrink\n")
    a, b = load_prompts(jsonl, needs=["prompt", "target"]), load_prompts(tsv, needs=["prompt", "target"])
    assert [e.targets for e in a] == [e.targets for e in b] == [(" Paris", " London"), (" hot",)]
    assert a[0].spans == b[0].spans == {"country": (15, 21)} and a[0].prompt[15:21] == "France"
    assert (a[0].label, a[1].label) == (1, "drink") and (b[0].label, b[1].label) == ("1", "drink")
    assert [e.line for e in a] == [1, 2] and [e.line for e in b] == [2, 3]


@pytest.mark.parametrize("text, needs, message", [
    ('{"prompt": "a"}\n{"prompt": "b", "target": " c"}\n', ["prompt", "target"], r"s.jsonl:1: no 'target' field"),
    ('{"prompt": "a"}\nnot json\n', ["prompt"], r"s.jsonl:2: not JSON"),
    ('["a"]\n', ["prompt"], r"s.jsonl:1: a row must be a JSON object"),
    ('{"prompt": 3}\n', ["prompt"], r"s.jsonl:1: prompt must be a string"),
    ('{"prompt": "abc", "spans": {"x": [2, 9]}}\n', ["prompt"], r"s.jsonl:1: span 'x' must be \[start, end\) within"),
    ('{"prompt": "abc", "target": [" a", 3]}\n', ["prompt"], r"target must be a string or a list of strings"),
    ('{"prompt": "abc", "label": [1]}\n', ["prompt"], r"label must be a string or an integer"),
    ("\n\n", ["prompt"], r"has no rows"),
])
def test_bad_rows_are_one_line_naming_the_line(tmp_path, text, needs, message):
    with pytest.raises(InputError, match=message):
        load_prompts(write(tmp_path, "s.jsonl", text), needs)
    with pytest.raises(InputError, match="does not exist"):
        load_prompts(tmp_path / "missing.jsonl")
    with pytest.raises(InputError, match=r"s.tsv:3: 1 columns, the header has 2"):
        load_prompts(write(tmp_path, "s.tsv", "prompt\ttarget\na\tb\nc\n"))


@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_spans_map_to_the_tokens_that_spell_them(request, model):
    m = request.getfixturevalue(model)
    text = "When Mary and John went to the store, John gave a drink to"
    ids = m.prompt_ids(text)
    for start, end in [(5, 9), (14, 18), (0, 4), (36, 37), (5, 18)]:
        positions = span_tokens(m, text, ids, (start, end))
        def spell(ps: list[int]) -> str:
            return "".join(m.token_str(ids[i]) for i in ps)

        assert text[start:end] in spell(positions) and positions == list(range(positions[0], positions[-1] + 1))
        if len(positions) > 1:  # the fewest tokens: without the first or the last, the span is not spelled
            assert text[start:end] not in spell(positions[1:]) and text[start:end] not in spell(positions[:-1])


def test_summary_against_the_definitions():
    rng = np.random.default_rng(0)
    values = rng.normal(2.0, 1.0, size=(40, 3, 2))
    s = summarize(values, seed=1)
    assert s.n == 40 and s.mean.shape == (3, 2)
    assert np.allclose(s.mean, [[np.mean(values[:, i, j]) for j in range(2)] for i in range(3)])
    assert np.allclose(s.std, [[np.std(values[:, i, j], ddof=1) for j in range(2)] for i in range(3)])
    assert np.all(s.low < s.mean) and np.all(s.mean < s.high)
    half = 1.96 * s.std / np.sqrt(40)  # the bootstrap interval of a mean is near the normal one
    assert np.allclose(s.high - s.low, 2 * half, rtol=0.25)
    again = summarize(values, seed=1)
    assert np.array_equal(again.low, s.low) and not np.array_equal(summarize(values, seed=2).low, s.low)
    one = summarize(values[:1])
    assert np.all(one.std == 0) and np.array_equal(one.low, one.mean) and np.array_equal(one.high, one.mean)
    with pytest.raises(InputError, match="at least one example"):
        summarize(np.zeros((0, 3)))


def test_permutation_p_and_normalized_patching():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(30, 4))
    shifted = base + np.array([0.0, 0.0, 1.0, 3.0]) + rng.normal(scale=0.3, size=(30, 4))
    p = permutation_p(shifted, base, seed=0)
    assert p[2] < 0.01 and p[3] < 0.01 and p[0] > 0.01 and p.min() >= 1 / 1001
    assert np.allclose(normalized_patching(np.array([1.0, 3.0, 2.0]), 3.0, 1.0), [0.0, 1.0, 0.5])
    assert np.isnan(normalized_patching(np.array([1.0]), 2.0, 2.0)).all()
    table = markdown_table(["layer", "a|b"], [[0, 1.5], [1, "x"]])
    assert table.splitlines() == ["| layer | a\\|b |", "| --- | --- |", "| 0 | 1.5 |", "| 1 | x |"]
