"""``pyinterp heads --prompts FILE``: each head's previous-token, duplicate-token and induction scores on every prompt
of a set, and their aggregate per head (mean, standard deviation, bootstrap 95 % interval). See docs/prompt-sets.md."""

from __future__ import annotations

import json

import click
import numpy as np

from pyinterp.analysis.heads import KINDS
from pyinterp.analysis.set_lens import heads_over_set
from pyinterp.analysis.stats import Summary, summarize
from pyinterp.cli.options import progress
from pyinterp.cli.sets import example_ids, load_set, print_table, summary_cells


def summarize_kinds(scores: dict[str, np.ndarray], seed: int) -> dict[str, Summary | None]:
    """Each kind's aggregate over the examples that have a query of that kind (none: None)."""
    out: dict[str, Summary | None] = {}
    for kind, values in scores.items():
        has = ~np.isnan(values).any(axis=(1, 2))
        out[kind] = summarize(values[has], seed) if has.any() else None
    return out


def run_heads_set(ctx: click.Context, model_opts) -> None:
    """Score every head on each example of ``--prompts`` (one prompt per pass) and aggregate per head."""
    p = ctx.params
    on = {n for n in p if ctx.get_parameter_source(n) == click.core.ParameterSource.COMMANDLINE}
    for option, name in (("-p/--prompt", "prompt"), ("--seq-len", "seq_len")):
        if name in on:
            raise click.UsageError(f"{option} does not go with --prompts")
    path, seed = p["prompts_path"], p["seed"]
    examples = load_set(path, ("prompt",))
    with model_opts.open() as model:
        ids = example_ids(model, path, examples)
        with progress(len(examples), "head scores") as bar:
            scores = heads_over_set(model, ids, on_example=bar and bar.update)
        name = model.path.name
    sums = summarize_kinds(scores, seed)
    files = [write_png(p["png"], name, sums, len(examples))] if p["png"] is not None else []
    if p["as_json"]:
        click.echo(json.dumps({
            "model": name, "prompts": path, "n_examples": len(examples), "seed": seed, "files": files,
            "examples": [{"line": e.line, "prompt": e.text, "n_tokens": len(ids[i]),
                          **{kind: None if np.isnan(scores[kind][i]).any() else scores[kind][i].tolist()
                             for kind in KINDS}} for i, e in enumerate(examples)],
            "aggregate": {kind: None if s is None else s.to_dict() for kind, s in sums.items()}}, ensure_ascii=False))
        return
    for kind, s in sums.items():
        words = kind.replace("_", " ")
        if s is None:
            click.echo(f"{words}: no prompt of the set has such a query (a repeated token)\n")
            continue
        order = np.argsort(-s.mean, axis=None, kind="stable")[:p["top_k"]]
        rows = [[f"{il}:{h}", *summary_cells(s, (il, h), 3)] for il, h in zip(*np.unravel_index(order, s.mean.shape))]
        print_table(f"{words} heads over {s.n} of {len(examples)} prompts of {name}: mean, std, bootstrap 95% "
                    f"interval (seed {seed})", ["head", "mean", "std", "95% CI"], rows, p["as_md"])
    for f in files:
        click.echo(f"wrote {f}")


def write_png(path: str, model: str, sums: dict[str, Summary | None], n: int) -> str:
    """The mean scores of each kind as layers x heads heatmaps, each cell ``mean±half the interval``."""
    from pyinterp.viz.plot import save_png, score_grids

    kinds = [(kind, s) for kind, s in sums.items() if s is not None]
    texts = [[[f"{m:.2f}±{(hi - lo) / 2:.2f}" for m, lo, hi in zip(*row)] for row in zip(s.mean, s.low, s.high)]
             for _, s in kinds]
    image = score_grids([s.mean for _, s in kinds], [f"{k.replace('_', ' ')} (n={s.n})" for k, s in kinds],
                        title=f"head scores of {model} over {n} prompts: mean ± half the bootstrap 95% interval",
                        texts=texts)
    return str(save_png(image, path))
