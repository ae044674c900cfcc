"""Attention to what: how much attention each head sends from one query position to the named spans of a prompt
(its ``spans``: character ranges, e.g. the subject) and to classes of tokens, over a prompt set.

For an example of ``n`` tokens, the attention of layer ``l`` (``attn_scores``, post-softmax, ``[n_head, n, n]``,
query x key) and the query position ``q``, the **mass** of a head on a set of key positions ``K`` is
``sum(attn[h, q, k] for k in K)``: the share of that head's attention at ``q`` that lands on ``K`` (0..1; the masses of
disjoint sets add up to at most 1). The sets:

- each named span: the tokens whose characters overlap it (:func:`pyinterp.analysis.prompts.span_tokens`);
- ``punctuation``: the tokens whose text is only punctuation (Unicode category P*) and whitespace, BOS/EOS excluded;
- ``first``: position 0 (the BOS where the model adds one): the usual attention sink;
- ``previous``: position ``q - 1``.

Keys after ``q`` get no attention (causal), so a span after the query has mass 0. Each example is one run capturing
the attention of the layers asked for (attention weights have no row per token, so examples cannot share a decode).
Over the set, each cell ``[layer, head]`` of each set is summarised (:func:`pyinterp.analysis.stats.summarize`: mean,
standard deviation, bootstrap 95 % interval) over the examples that have that span.
"""

from __future__ import annotations

import json
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from pyinterp.analysis.patching import checked_layers
from pyinterp.analysis.prompts import Example, span_tokens
from pyinterp.analysis.stats import Summary, summarize
from pyinterp.errors import InputError

if TYPE_CHECKING:
    from pyinterp.model import Model

CLASSES = ("punctuation", "first", "previous")


def is_punctuation(text: str) -> bool:
    """Whether ``text`` is non-empty and only punctuation (Unicode P*) and whitespace, with some punctuation."""
    return (any(unicodedata.category(c).startswith("P") for c in text)
            and all(c.isspace() or unicodedata.category(c).startswith("P") for c in text))


def query_position(query: str | int, n: int, where: str) -> int:
    """``"last"`` or a position (negative from the end) as a position of ``n`` tokens."""
    if query == "last":
        return n - 1
    if not isinstance(query, int) or isinstance(query, bool) or not -n <= query < n:
        raise InputError(f"{where}: query position {query!r} is outside the prompt's {n} tokens "
                         f"(0..{n - 1}, or -{n}..-1 from the end)")
    return query % n


def key_sets(model: Model, ex: Example, ids: list[int], query: int) -> dict[str, np.ndarray]:
    """The key positions of every named span of ``ex`` and every class, as boolean masks ``[n]`` limited to keys
    ``<= query``."""
    n = len(ids)
    special = {t for t in model.engine.special_tokens() if t is not None}
    masks = {}
    for name, span in ex.spans.items():
        mask = np.zeros(n, dtype=bool)
        mask[span_tokens(model, ex.text, ids, span)] = True
        masks[name] = mask
    masks["punctuation"] = np.array([t not in special and is_punctuation(model.token_str(t)) for t in ids])
    masks["first"] = np.arange(n) == 0
    masks["previous"] = np.arange(n) == query - 1
    causal = np.arange(n) <= query
    return {name: mask & causal for name, mask in masks.items()}


def masses(attn: np.ndarray, query: int, mask: np.ndarray) -> np.ndarray:
    """The mass of every head of ``attn`` ``[n_layers, n_head, n, n]`` from ``query`` on the keys of ``mask`` ``[n]``:
    ``[n_layers, n_head]`` float64."""
    return np.asarray(attn, dtype=np.float64)[:, :, query, :] @ mask.astype(np.float64)


@dataclass
class SpanMasses:
    """The masses of a prompt set (see the module doc).

    ``values[name]`` is ``[n_examples, n_layers, n_head]``, NaN for an example without that span; ``queries`` each
    example's query position; ``tokens[name]`` each example's key positions of that set."""

    model: str
    layers: list[int]
    n_head: int
    examples: list[Example]
    queries: list[int]
    names: list[str]
    values: dict[str, np.ndarray]
    tokens: dict[str, list[list[int] | None]]

    def summary(self, name: str, seed: int = 0) -> Summary:
        """Mean, std and bootstrap interval of ``name``'s masses over the examples that have it ``[n_layers, n_head]``
        each."""
        values = self._values(name)
        return summarize(values[~np.isnan(values[:, 0, 0])], seed)

    def _values(self, name: str) -> np.ndarray:
        if name not in self.values:
            raise InputError(f"no span {name!r}; the set has {', '.join(self.names)}")
        return self.values[name]

    def top(self, name: str, k: int, seed: int = 0) -> list[dict]:
        """The ``k`` heads with the highest mean mass on ``name``, highest first: layer, head, mean, low, high."""
        s = self.summary(name, seed)
        order = np.argsort(-s.mean, axis=None, kind="stable")[:k]
        return [{"layer": self.layers[j], "head": int(h), "mean": float(s.mean[j, h]), "low": float(s.low[j, h]),
                 "high": float(s.high[j, h])} for j, h in zip(*np.unravel_index(order, s.mean.shape))]

    def to_dict(self, seed: int = 0, k: int = 10) -> dict:
        return {"model": self.model, "layers": self.layers, "n_head": self.n_head, "seed": seed,
                "examples": [{"line": ex.line, "query": q, "keys": {name: self.tokens[name][i] for name in self.names},
                              "masses": {name: (None if np.isnan(self.values[name][i, 0, 0])
                                                else np.round(self.values[name][i], 6).tolist())
                                         for name in self.names}}
                             for i, (ex, q) in enumerate(zip(self.examples, self.queries, strict=True))],
                "spans": {name: {**self.summary(name, seed).to_dict(), "top": self.top(name, k, seed)}
                          for name in self.names}}

    def to_json(self, seed: int = 0, k: int = 10) -> str:
        return json.dumps(self.to_dict(seed, k), ensure_ascii=False)

    def to_png(self, path: str | os.PathLike, names: Sequence[str] | None = None, seed: int = 0) -> Path:
        """Write the mean mass of each set in ``names`` (default all) as layers (bottom up) x heads heatmaps side by
        side on one 0..1 scale, each titled with its name and the widest interval."""
        from pyinterp.viz.plot import save_png, score_grids

        names = list(self.names if names is None else names)
        sums = [self.summary(name, seed) for name in names]
        titles = [f"{name} (n={s.n}, 95% CI width <= {np.max(s.high - s.low):.2f})" for name, s in zip(names, sums)]
        image = score_grids([s.mean for s in sums], titles, row_labels=[str(il) for il in self.layers],
                            title=f"attention mass from the query token of {self.model}, mean over the set "
                                  f"(rows: layers, columns: heads)")
        return save_png(image, path)


def span_masses(model: Model, examples: Sequence[Example], layers: Iterable[int] | None = None,
                query: str | int = "last", source: str = "prompt set") -> SpanMasses:
    """The masses of every head of ``layers`` (default all) from ``query`` (``"last"`` or a position, negative from the
    end) on every named span and class of every example (its ``prompt``, or ``clean``). ``source`` names the file
    in errors (``FILE:LINE: ...``)."""
    layers = checked_layers(model, layers)
    names = list(dict.fromkeys(name for ex in examples for name in ex.spans))
    clash = [name for name in names if name in CLASSES]
    if clash:
        raise InputError(f"{source}: span name {clash[0]!r} is a token class; call the span something else")
    names += list(CLASSES)
    values = {name: np.full((len(examples), len(layers), model.n_head), np.nan) for name in names}
    tokens: dict[str, list] = {name: [] for name in names}
    queries = []
    for i, ex in enumerate(examples):
        if ex.text is None:
            raise InputError(f"{source}:{ex.line}: no 'prompt' (or 'clean') field")
        ids = model.prompt_ids(ex.text)
        where = f"{source}:{ex.line}"
        q = query_position(query, len(ids), where)
        try:
            keys = key_sets(model, ex, ids, q)
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
        trace = model.run(ids, capture=[f"attn_scores-{il}" for il in layers], logits=None)
        attn = np.stack([trace.attention(il) for il in layers])
        for name in names:
            tokens[name].append(np.flatnonzero(keys[name]).tolist() if name in keys else None)
            if name in keys:
                values[name][i] = masses(attn, q, keys[name])
        queries.append(q)
    return SpanMasses(model.path.name, layers, model.n_head, list(examples), queries, names, values, tokens)
