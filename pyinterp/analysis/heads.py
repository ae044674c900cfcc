"""Head detector: previous-token, duplicate-token and induction scores of every attention head.

Each score is the attention mass a head puts on the keys a pattern names, averaged over the queries
that have such a key. For an attention stack ``attn`` ``[n_layer, n_head, n, n]`` (query x key,
post-softmax) over token ids ``ids`` (``n`` of them):

- **previous token**: the keys ``{i - 1}`` of every query ``i >= 1``: mean of ``attn[..., i, i - 1]``.
- **duplicate token**: the earlier positions holding the same token, ``{j < i : ids[j] == ids[i]}``,
  for every query whose token occurred before: mean of the summed attention to them.
- **induction**: the positions right after an earlier occurrence of the query's token,
  ``{j + 1 : j + 1 < i, ids[j] == ids[i]}`` (the token that followed it last time), for every query that
  has one: mean of the summed attention to them.

Scores are in 0..1 (1: all the head's attention follows the pattern). By default the run is ``seq_len``
random tokens repeated twice, BOS first where the model adds one: every token of the second copy
then has one earlier occurrence, and an induction head attends from it to the token after that
occurrence (``seq_len - 1`` positions back). The random tokens are ordinary vocabulary entries
(no control, byte, user-defined or unused tokens), distinct, drawn by a seeded numpy generator.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from pyinterp.checks import check_int
from pyinterp.errors import InputError

if TYPE_CHECKING:
    from pyinterp.model import Model

KINDS = ("previous_token", "duplicate_token", "induction")


def pattern_masks(ids: Sequence[int]) -> dict[str, np.ndarray]:
    """The key pattern of each score, a boolean ``[n, n]`` (query x key) mask per kind (see the module doc)."""
    ids = np.asarray(ids)
    n = len(ids)
    earlier = np.tril(np.ones((n, n), dtype=bool), -1)  # key j < query i
    previous = np.eye(n, k=-1, dtype=bool)
    duplicate = earlier & (ids[:, None] == ids[None, :])
    induction = np.zeros((n, n), dtype=bool)
    induction[:, 1:] = duplicate[:, :-1] & earlier[:, 1:]  # key j + 1 after an earlier occurrence j, before i
    return {"previous_token": previous, "duplicate_token": duplicate, "induction": induction}


def scores_from_attention(attn: np.ndarray, ids: Sequence[int], missing_nan: bool = False) -> dict[str, np.ndarray]:
    """Score every head of ``attn`` ``[n_layer, n_head, n, n]`` over ``ids`` (``n``): ``[n_layer, n_head]`` per
    kind, the attention each query puts on its pattern's keys summed, averaged over the queries with at
    least one such key. Raises :class:`InputError` when a kind has no such query (no repeated token), or gives
    that kind NaN scores with ``missing_nan``."""
    attn = np.asarray(attn, dtype=np.float64)
    n = len(ids)
    if attn.ndim != 4 or attn.shape[2:] != (n, n):
        raise InputError(f"attention must be [n_layer, n_head, {n}, {n}] for {n} tokens, got shape {attn.shape}")
    scores = {}
    for kind, mask in pattern_masks(ids).items():
        queries = mask.any(axis=1)
        if not queries.any() and missing_nan:
            scores[kind] = np.full(attn.shape[:2], np.nan)
            continue
        if not queries.any():
            raise InputError(f"no query has a {kind.replace('_', '-')} key: the tokens need a repeat "
                             f"(one at least two positions after the first occurrence for induction)")
        scores[kind] = np.einsum("lhqk,qk->lh", attn, mask) / queries.sum()
    return scores


def repeated_random_tokens(model: Model, seq_len: int, seed: int) -> list[int]:
    """BOS (where the model adds one), then ``seq_len`` distinct random ordinary tokens, then the same again."""
    ordinary = model.ordinary_tokens()
    if not 2 <= check_int(seq_len, "seq_len", None, None) <= len(ordinary):
        raise InputError(f"seq_len must be in 2..{len(ordinary)}, got {seq_len}")
    if check_int(seed, "seed", None, None) < 0:
        raise InputError(f"seed must be >= 0, got {seed}")
    tokens = np.random.default_rng(seed).choice(ordinary, size=seq_len, replace=False).tolist()
    return model.tokenize("") + tokens + tokens


@dataclass
class HeadScores:
    """Previous-token, duplicate-token and induction scores of every head (see :func:`head_scores`).

    ``previous_token``, ``duplicate_token`` and ``induction`` are ``[n_layer, n_head]`` in 0..1; ``tokens``
    are the ids that were run (``token_strs`` their text); ``seq_len``/``seed`` say how the random
    tokens were drawn (None for a prompt).
    """

    model: str
    tokens: list[int]
    token_strs: list[str]
    seq_len: int | None
    seed: int | None
    previous_token: np.ndarray
    duplicate_token: np.ndarray
    induction: np.ndarray

    @property
    def what(self) -> str:
        """What was run, in words."""
        if self.seq_len is None:
            return f"a prompt of {len(self.tokens)} tokens"
        return f"{self.seq_len} random tokens repeated twice, seed {self.seed}"

    def score(self, kind: str) -> np.ndarray:
        """The ``[n_layer, n_head]`` scores of one kind: ``previous_token``, ``duplicate_token`` or ``induction``."""
        if kind not in KINDS:
            raise InputError(f"unknown score {kind!r}; one of {', '.join(KINDS)}")
        return getattr(self, kind)

    def top(self, kind: str, k: int) -> list[tuple[int, int, float]]:
        """The ``k`` highest-scoring heads of one kind as ``(layer, head, score)``, highest first."""
        values = self.score(kind)
        order = np.argsort(-values, axis=None, kind="stable")[:k]
        return [(int(il), int(h), float(values[il, h])) for il, h in zip(*np.unravel_index(order, values.shape))]

    def to_dict(self) -> dict:
        return {"model": self.model, "run": self.what, "seq_len": self.seq_len, "seed": self.seed,
                "tokens": self.tokens, "token_strs": self.token_strs,
                **{kind: self.score(kind).round(6).tolist() for kind in KINDS}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    def to_png(self, path: str | os.PathLike) -> Path:
        """Write the three scores as layers (0 at the bottom) x heads heatmaps side by side, on a 0..1 scale."""
        from pyinterp.viz.plot import save_png, score_grids

        image = score_grids([self.score(kind) for kind in KINDS], [kind.replace("_", " ") for kind in KINDS],
                            title=f"head scores of {self.model}: {self.what} (rows: layers, columns: heads)")
        return save_png(image, path)


def head_scores(model: Model, seq_len: int = 50, seed: int = 0,
                prompt: str | Sequence[int] | None = None) -> HeadScores:
    """Previous-token, duplicate-token and induction scores of every head of ``model``.

    Runs ``seq_len`` random tokens repeated twice (see :func:`repeated_random_tokens`), or ``prompt``
    (text or ids) when given, capturing every layer's attention, and scores it with
    :func:`scores_from_attention`. Interventions of the model's context managers apply.
    """
    ids = repeated_random_tokens(model, seq_len, seed) if prompt is None else model.prompt_ids(prompt)
    trace = model.run(ids, capture=["attn_scores"])
    attn = np.stack([trace.attention(il) for il in range(model.n_layer)])
    scores = scores_from_attention(attn, ids)
    random = prompt is None
    return HeadScores(model=model.path.name, tokens=ids, token_strs=trace.token_strs,
                      seq_len=seq_len if random else None, seed=seed if random else None, **scores)
