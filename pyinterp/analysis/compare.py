"""Models compared by relative depth: the norm (or raw) logit lens of each model over one prompt set, at the last
token of every prompt, as P(target), the target's rank and the entropy of the lensed distribution per layer,
placed on the relative depth ``layer / (n_layer - 1)`` (0: the first layer's output, 1: the last's, which is the
model's own prediction) and averaged over the set with bootstrap intervals.

Each model tokenizes every target itself: the answer as it follows the prompt (with a leading space when the
prompt does not end in whitespace), else the other spelling (without, or with, the space); an answer that is one
token in neither is a *multi-token target*, reported (model, line, pieces) and, as ``multi`` says, either scored
by its first token (``"first"``) or left out of that model's rows (``"skip"``). A row with several targets
scores the sum of their probabilities and the best of their ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from pyinterp.analysis.lens import check_temp
from pyinterp.analysis.prompts import Example
from pyinterp.analysis.stats import Summary, summarize
from pyinterp.engine.readouts import LensReadout
from pyinterp.errors import InputError

if TYPE_CHECKING:
    from pyinterp.model import Model

METRICS = ("p", "rank", "entropy")
DEPTHS = (Fraction(0), Fraction(1, 6), Fraction(1, 3), Fraction(1, 2), Fraction(2, 3), Fraction(5, 6), Fraction(1))
MULTI = ("first", "skip")
RANK_CELLS = 2**25  # [n_vocab, n_targets, n_rows] floats of the rank's temporary per layer, at most, per decode


@dataclass(frozen=True)
class Target:
    """One row's target tokens in one model."""

    line: int                 # the row's line in the prompt set
    ids: tuple[int, ...]      # one token per answer (distinct); empty: the row is skipped
    texts: tuple[str, ...]    # the spelling of each answer that was used
    note: str | None = None   # the multi-token report; None when every answer is one token


@dataclass
class ModelCurves:
    """One model's lens over the set: ``values[metric]`` is ``[n_rows, n_layer]`` for the rows kept (``lines``)."""

    name: str
    n_layer: int
    lines: list[int]
    targets: list[Target]
    values: dict[str, np.ndarray]
    notes: list[str]

    @property
    def depths(self) -> np.ndarray:
        """The relative depth of every layer, ``layer / (n_layer - 1)`` ``[n_layer]``."""
        return np.arange(self.n_layer) / max(self.n_layer - 1, 1)

    def summary(self, metric: str, seed: int = 0) -> Summary:
        """Mean, standard deviation and bootstrap interval of ``metric`` at every layer."""
        return summarize(self.values[metric], seed=seed)

    def layer_at(self, depth: Fraction) -> int:
        """The layer nearest relative depth ``depth`` (ties to the deeper layer)."""
        return int(np.floor(depth * (self.n_layer - 1) + Fraction(1, 2)))


def parse_depths(spec: str) -> list[Fraction]:
    """``--depths``: comma list of fractions in 0..1 (``0,1/6,0.5,1``)."""
    out = []
    for item in spec.split(","):
        try:
            depth = Fraction(item.strip())
        except (ValueError, ZeroDivisionError):
            raise InputError(f"--depths: {item.strip()!r} is not a fraction such as 1/3 or 0.5") from None
        if not 0 <= depth <= 1:
            raise InputError(f"--depths: {item.strip()} is not in 0..1")
        out.append(depth)
    return out


def target_of(model: Model, example: Example, multi: str) -> Target:
    """The target tokens of ``example`` in ``model`` (see the module's docstring)."""
    ids, texts, notes = [], [], []
    follows_space = example.prompt[-1:].isspace()
    for answer in example.targets:
        core = answer.lstrip()
        spellings = [core, " " + core] if follows_space else [" " + core, core]
        single = [(s, model.tokenize(s, add_bos=False)) for s in spellings]
        used = next(((s, p[0]) for s, p in single if len(p) == 1), None)
        if used is None:
            pieces = single[0][1]
            if not pieces:
                raise InputError(f"line {example.line}: the target {answer!r} has no tokens")
            shown = ", ".join(repr(model.token_str(t)) for t in pieces)
            what = f"its first token {model.token_str(pieces[0])!r} scored" if multi == "first" else "row skipped"
            notes.append(f"{model.path.name}: line {example.line}: target {spellings[0]!r} is {len(pieces)} tokens "
                         f"({shown}), with or without a leading space; {what}")
            if multi == "skip":
                return Target(example.line, (), (), notes[-1])
            used = (spellings[0], pieces[0])
        if used[1] not in ids:
            ids.append(used[1])
            texts.append(used[0])
    return Target(example.line, tuple(ids), tuple(texts), "; ".join(notes) or None)


def chunks(lengths: list[int], n_targets: list[int], n_ctx: int, n_seq: int, n_vocab: int) -> list[list[int]]:
    """Rows grouped into decodes: at most ``n_seq`` contexts of at most ``n_ctx`` tokens together, and a rank
    temporary of at most :data:`RANK_CELLS` floats."""
    out: list[list[int]] = [[]]
    tokens = targets = 0
    for i, (n, t) in enumerate(zip(lengths, n_targets, strict=True)):
        rows = len(out[-1]) + 1
        if out[-1] and (tokens + n > n_ctx or rows > n_seq or n_vocab * (targets + t) * rows > RANK_CELLS):
            out.append([])
            tokens = targets = 0
        out[-1].append(i)
        tokens, targets = tokens + n, targets + t
    return out


def lens_rows(model: Model, prompts: list[list[int]], targets: list[Target], norm: bool, temp: float) -> np.ndarray:
    """P(target), rank and entropy at every layer at the last token of each prompt: ``[n_rows, 3, n_layer]``,
    the prompts decoded together in sequences of the multi-sequence engine."""
    out = np.empty((len(prompts), len(METRICS), model.n_layer))
    groups = chunks([len(p) for p in prompts], [len(t.ids) for t in targets], model.n_ctx, model.engine.n_seq_max,
                    model.n_vocab)
    for group in groups:
        union = sorted({i for r in group for i in targets[r].ids})
        ends = np.cumsum([len(prompts[r]) for r in group]) - 1
        readout = LensReadout(model.n_layer, "l_out", norm, 1, union, [int(e) for e in ends], temp, entropy=True,
                              out_positions=list(range(len(group))))
        lens = model.engine.run_contexts([prompts[r] for r in group], [], readout=readout, truncate=False).readout
        for il in range(model.n_layer):
            stats, entropy = lens[il][2], lens[il][3]   # [n_group, n_union, 3], [n_group]
            for k, r in enumerate(group):
                cols = [union.index(i) for i in targets[r].ids]
                out[r, 0, il] = stats[k, cols, 1].astype(np.float64).sum()
                out[r, 1, il] = stats[k, cols, 2].min() + 1
                out[r, 2, il] = entropy[k]
    return out


def compare_model(model: Model, examples: Sequence[Example], norm: bool = True, temp: float = 1.0,
                  multi: str = "first") -> ModelCurves:
    """The lens of ``model`` at the last token of every example (rows needing ``prompt`` and ``target``)."""
    if multi not in MULTI:
        raise InputError(f"multi must be one of {', '.join(MULTI)}, got {multi!r}")
    temp = check_temp(temp)
    found = [(e, target_of(model, e, multi)) for e in examples]
    notes = [t.note for _, t in found if t.note]
    kept = [(e, t) for e, t in found if t.ids]
    if not kept:
        raise InputError(f"{model.path.name}: no row has a target of one token (see --multi-token)")
    prompts = [model.prompt_ids(e.prompt) for e, _ in kept]
    targets = [t for _, t in kept]
    values = lens_rows(model, prompts, targets, norm, temp)
    return ModelCurves(name=Path(model.path).name, n_layer=model.n_layer, lines=[e.line for e, _ in kept],
                       targets=targets, values={m: values[:, i] for i, m in enumerate(METRICS)}, notes=notes)
