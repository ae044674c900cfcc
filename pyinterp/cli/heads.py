"""``pyinterp heads``: previous-token, duplicate-token and induction scores of every head (see pyinterp.analysis.heads)."""

from __future__ import annotations

import json

import click

from pyinterp.analysis.heads import KINDS, HeadScores, head_scores
from pyinterp.cli.options import model_options
from pyinterp.cli.sets import md_option, prompts_option

COLUMN = 20  # characters per kind in the table


def print_top(scores: HeadScores, k: int) -> None:
    """The ``k`` best heads of each kind, side by side: one row per rank, ``layer:head score`` per kind."""
    click.echo(f"head scores of {scores.model}: {scores.what} (heads as layer:head)")
    tops = [scores.top(kind, k) for kind in KINDS]
    click.echo("rank  " + "".join(kind.replace("_", " ").ljust(COLUMN) for kind in KINDS).rstrip())
    for rank, row in enumerate(zip(*tops, strict=True), 1):
        click.echo(f"{rank:>4}  " + "".join(f"{f'{il}:{h}':>6} {s:.3f}".ljust(COLUMN) for il, h, s in row).rstrip())


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@model_options
@click.option("--seq-len", default=50, show_default=True, type=click.IntRange(min=2),
              help="Random tokens per copy (the run is BOS, where the model adds one, and two copies).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Seed of the random tokens.")
@click.option("-p", "--prompt", default=None, help="Score the heads on this text instead of random tokens.")
@click.option("--top", "top_k", default=5, show_default=True, type=click.IntRange(min=1),
              help="Heads listed per kind.")
@click.option("--png", default=None, type=click.Path(dir_okay=False), metavar="PATH",
              help="Write the three scores as layers x heads heatmaps.")
@click.option("--json", "as_json", is_flag=True, help="Print every score as JSON instead of the table.")
@prompts_option
@md_option
@click.pass_context
def heads(ctx, model_opts, seq_len, seed, prompt, top_k, png, as_json, prompts_path, as_md):
    """Score every attention head as a previous-token, duplicate-token and induction head.

    Scores are in 0..1: the mean attention a head puts, from each query, on the previous token, on
    earlier copies of the query's token, and on the token after an earlier copy (induction). The run
    is SEQ_LEN random tokens repeated twice, or --prompt, or each prompt of --prompts FILE (then every head's
    scores are averaged over the prompts, with a bootstrap 95% interval seeded with --seed).
    """
    if prompts_path is not None:
        from pyinterp.cli.heads_sets import run_heads_set

        return run_heads_set(ctx, model_opts)
    if as_md:
        raise click.UsageError("--md goes with --prompts")
    with model_opts.open() as model:
        scores = head_scores(model, seq_len=seq_len, seed=seed, prompt=prompt)
    files = [str(scores.to_png(png))] if png is not None else []
    if as_json:
        click.echo(json.dumps({**scores.to_dict(), "files": files}, ensure_ascii=False))
        return
    print_top(scores, top_k)
    for path in files:
        click.echo(f"wrote {path}")
