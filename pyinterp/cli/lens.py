"""The command line's target lens (``--target``) and direct logit attribution (``--attribute``): parsing
their arguments and writing their tables as text, JSON and CSV; and the next tokens a row of logits predicts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import click
import numpy as np

from pyinterp.analysis.lens import resolve_target, single_token_variants
from pyinterp.analysis.stats import markdown_table

if TYPE_CHECKING:
    from pyinterp.analysis.attribution import Attribution
    from pyinterp.analysis.lens import LogitLens
    from pyinterp.model import Model

_INT = re.compile(r"[+-]?\d+")


def next_tokens(model: Model, logits: np.ndarray, k: int) -> list[dict]:
    """The ``k`` most likely next tokens of one row of logits ``[n_vocab]``: id, text and probability."""
    x = logits.astype(np.float64)
    p = np.exp(x - x.max())
    p /= p.sum()
    return [{"id": int(i), "str": model.token_str(int(i)), "p": float(p[i])} for i in np.argsort(-x)[:k]]


def parse_positions(spec: str) -> list[int]:
    """``--ll-pos``: comma list of token positions, negative from the end (checked against the prompt later)."""
    try:
        return [int(item) for item in spec.split(",")]
    except ValueError:
        raise click.BadParameter(f"{spec!r} is not a comma list of positions", param_hint="--ll-pos") from None


def parse_target(model: Model, spec: str) -> tuple[int, str]:
    """A ``--target``/``--attribute`` TOKEN: an integer is a token id, anything else a text that must be one
    token. Returns the id and a line saying what it maps to (and the other single-token spelling)."""
    if _INT.fullmatch(spec.strip()):
        target = resolve_target(model, int(spec))
        pieces = model.tokenize(spec, add_bos=False)
        also = f" (the text {spec!r} is id {pieces[0]})" if len(pieces) == 1 and pieces[0] != target else ""
        return target, f"target id {target} = {model.token_str(target)!r}{also}"
    target = resolve_target(model, spec)
    other = [(v, i) for v, i in single_token_variants(model, spec) if v.strip() == spec.strip()]
    also = "".join(f" (also one token: {v!r} = id {i})" for v, i in other)
    return target, f"target {spec!r} = id {target}{also}"


def print_targets(lens: LogitLens, labels: list[int | str], decimals: int, as_md: bool = False) -> None:
    """One table per kept position: a row per layer, each target's probability and rank, then the top-1
    (``as_md``: as Markdown)."""
    names = [repr(s) for s in lens.target_strs]
    rank_w = len(str(int(lens.target_ranks.max(initial=1)))) + 1
    width = max(max(len(n) for n in names), decimals + 3 + rank_w)
    for pi, (position, token) in enumerate(zip(lens.positions, lens.position_strs, strict=True)):
        click.echo(f"P(target) by layer, {lens.title} at position {position} ({token!r}); rank 1 = top prediction")
        rows = [[str(label), *(f"{p:.{decimals}f} {'r' + str(r):>{rank_w}}"
                               for p, r in zip(lens.target_probs[li, pi], lens.target_ranks[li, pi], strict=True)),
                 f"{lens.strs[li][pi][0]!r} {lens.probs[li, pi, 0]:.{decimals}f}"] for li, label in enumerate(labels)]
        if as_md:
            click.echo("\n" + markdown_table(["layer", *names, "top-1"], rows) + "\n")
            continue
        click.echo("layer  " + "  ".join(n.ljust(width) for n in names) + "  top-1")
        for row in rows:
            click.echo(f"{row[0]:>5}  " + "  ".join(c.ljust(width) for c in row[1:-1]) + f"  {row[-1]}")
        click.echo("")


def targets_json(lens: LogitLens, labels: list[int | str]) -> dict:
    return {
        "tensor": lens.tensor, "norm": lens.norm,
        "targets": [{"id": t, "str": s} for t, s in zip(lens.targets, lens.target_strs, strict=True)],
        "positions": [{"position": position, "token": token, "layers": [
            {"layer": label,
             "top": {"id": int(lens.ids[li, pi, 0]), "str": lens.strs[li][pi][0], "p": float(lens.probs[li, pi, 0])},
             "targets": [{"id": t, "p": float(p), "logit": float(lg), "rank": int(r)}
                         for t, p, lg, r in zip(lens.targets, lens.target_probs[li, pi], lens.target_logits[li, pi],
                                                lens.target_ranks[li, pi], strict=True)]}
            for li, label in enumerate(labels)]}
            for pi, (position, token) in enumerate(zip(lens.positions, lens.position_strs, strict=True))],
    }


def targets_rows(lens: LogitLens, labels: list[int | str]) -> list[list]:
    """CSV rows, one per (layer, position, target), with :data:`TARGET_HEADER`'s columns."""
    return [[lens.tensor, "norm" if lens.norm else "raw", label, position, token, t, s, float(p), float(lg), int(r)]
            for li, label in enumerate(labels)
            for pi, (position, token) in enumerate(zip(lens.positions, lens.position_strs, strict=True))
            for t, s, p, lg, r in zip(lens.targets, lens.target_strs, lens.target_probs[li, pi],
                                      lens.target_logits[li, pi], lens.target_ranks[li, pi], strict=True)]


TARGET_HEADER = ["tensor", "lens", "layer", "position", "token", "target_id", "target", "p", "logit", "rank"]
ATTRIBUTION_HEADER = ["position", "target_id", "target", "layer", "term", "head", "value"]


def print_attribution(a: Attribution, token: str, decimals: int, as_md: bool = False) -> None:
    """The embedding's term, then a row per layer: attention, FFN and (when split) each head (``as_md``: as
    Markdown)."""
    click.echo(f"direct logit attribution of {a.target_str!r} (id {a.target}) at position {a.position} ({token!r}): "
               f"logit {a.logit:.{decimals}f}, terms sum to {float(a.values.sum()):.{decimals}f}")
    click.echo(f"embedding {a.embed:.{decimals}f}")
    n_head = 0 if a.heads is None else a.heads.shape[1]
    rows = [[str(il), f"{a.attn[il]:.{decimals}f}", f"{a.ffn[il]:.{decimals}f}",
             *(f"{v:.{decimals}f}" for v in (a.heads[il] if a.heads is not None else []))] for il in range(len(a.attn))]
    if as_md:
        click.echo("\n" + markdown_table(["layer", "attn", "ffn", *(f"h{h}" for h in range(n_head))], rows) + "\n")
        return
    width = decimals + 5
    heads = [f"h{h}".rjust(width) for h in range(n_head)]
    click.echo("layer " + "attn".rjust(width) + " " + "ffn".rjust(width) + (" | " + " ".join(heads) if heads else ""))
    for row in rows:
        line = f"{row[0]:>5} {row[1]:>{width}} {row[2]:>{width}}"
        click.echo(line + (" | " + " ".join(f"{v:>{width}}" for v in row[3:]) if heads else ""))
    click.echo("")


def attribution_json(a: Attribution, token: str) -> dict:
    return {"position": a.position, "token": token, "target": {"id": a.target, "str": a.target_str},
            "logit": a.logit, "sum": float(a.values.sum()), "embed": a.embed,
            "layers": [{"layer": il, "attn": float(a.attn[il]), "ffn": float(a.ffn[il]),
                        **({"heads": a.heads[il].tolist()} if a.heads is not None else {})} for il in range(len(a.attn))]}


def attribution_rows(a: Attribution) -> list[list]:
    """CSV rows with :data:`ATTRIBUTION_HEADER`'s columns: the embedding, each layer's attn and ffn, each head."""
    head = [a.position, a.target, a.target_str]
    rows = [[*head, "", "embd", "", a.embed]]
    for il in range(len(a.attn)):
        rows += [[*head, il, "attn", "", float(a.attn[il])], [*head, il, "ffn", "", float(a.ffn[il])]]
        if a.heads is not None:
            rows += [[*head, il, "head", h, float(v)] for h, v in enumerate(a.heads[il])]
    return rows


def numbered(base: Path, suffix: str, n: int, what: str) -> Path:
    """``base`` when one file is written, else ``base`` with ``-{what}`` before its extension (``suffix`` when
    it has none)."""
    return base if n == 1 else base.with_name(f"{base.stem}-{what}{base.suffix or suffix}")
