"""``pyinterp spans``: attention mass from a query token to the named spans and token classes of a prompt set, per
layer and head (see pyinterp.analysis.spans), as tables, Markdown, JSON, CSV and a layers x heads picture per span."""

from __future__ import annotations

import json

import click

from pyinterp.analysis.prompts import load_prompts
from pyinterp.analysis.spans import CLASSES, SpanMasses, span_masses
from pyinterp.analysis.stats import markdown_table
from pyinterp.cli.options import LAYERS_HELP, layer_list, model_options
from pyinterp.cli.sets import md_option
from pyinterp.errors import InputError
from pyinterp.io.csv_io import write_csv


def parse_query(ctx: click.Context, param: click.Parameter, value: str) -> str | int:
    """``--from``: ``last`` or a token position (negative from the end)."""
    if value == "last":
        return value
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither 'last' nor a token position like 5 or -2", ctx, param) from None


def emit(title: str, header: list[str], rows: list[list[str]], as_md: bool) -> None:
    """A titled table, plain or Markdown."""
    if as_md:
        click.echo(f"\n**{title}**\n\n" + markdown_table(header, rows))
        return
    widths = [max(len(str(v)) for v in column) for column in zip(header, *rows)]
    click.echo(f"\n{title}")
    for row in [header, *rows]:
        click.echo("  ".join(str(v).rjust(w) if j else str(v).ljust(w) for j, (v, w) in enumerate(zip(row, widths))))


def overview(result: SpanMasses, seed: int) -> list[list[str]]:
    """One row per set: examples, mean mass over every head of the layers, the head with the most."""
    rows = []
    for name in result.names:
        s = result.summary(name, seed)
        best = result.top(name, 1, seed)[0]
        rows.append([name, str(s.n), f"{s.mean.mean():.4f}", f"L{best['layer']}H{best['head']}",
                     f"{best['mean']:.4f} [{best['low']:.4f}, {best['high']:.4f}]"])
    return rows


def csv_rows(result: SpanMasses, seed: int) -> list[list]:
    rows = []
    for name in result.names:
        s = result.summary(name, seed)
        for j, il in enumerate(result.layers):
            rows += [[name, il, h, s.n, *(float(getattr(s, k)[j, h]) for k in ("mean", "std", "low", "high"))]
                     for h in range(result.n_head)]
    return rows


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@model_options
@click.option("--prompts", "prompts_path", required=True, type=click.Path(dir_okay=False), metavar="FILE",
              help="A prompt set (JSONL, or TSV with a header) whose rows have 'prompt' and named character 'spans'.")
@click.option("--layers", "layer_spec", default=None, metavar="LIST", callback=layer_list,
              help=f"Layers (default all): {LAYERS_HELP}; percentages of depth too (40%-85%).")
@click.option("--from", "query", default="last", show_default=True, callback=parse_query, metavar="last|N",
              help="The query token whose attention is read: the last, or a position (negative from the end).")
@click.option("--span", "spans", multiple=True, metavar="NAME",
              help=f"Rank and draw this span or class ({', '.join(CLASSES)}); repeatable. Default: every named span.")
@click.option("--top", default=10, show_default=True, type=click.IntRange(min=1), help="Heads ranked per span.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="The bootstrap's seed.")
@md_option
@click.option("--json", "as_json", is_flag=True, help="Print everything (per example and aggregate) as JSON.")
@click.option("--csv", "csv_path", default=None, type=click.Path(dir_okay=False), metavar="PATH",
              help="Write the aggregate: one row per span, layer and head.")
@click.option("--png", default=None, type=click.Path(dir_okay=False), metavar="PATH",
              help="Write a layers x heads heatmap of the mean mass per span.")
def spans(model_opts, prompts_path, layer_spec, query, spans, top, seed, as_md, as_json, csv_path, png):
    """Attention to what: for every layer and head, the attention mass from the query token (--from, default the
    last) to each named span of the prompt (the rows' 'spans', character ranges mapped to the tokens that overlap
    them) and to token classes: punctuation, the first token (BOS where the model adds one) and the previous token.
    Averaged over the set with bootstrap 95% intervals; the heads ranked by mass on each span."""
    examples = load_prompts(prompts_path, needs=["prompt"])
    with model_opts.open() as model:
        layers = layer_spec.resolve(model.n_layer) if layer_spec is not None else None
        result = span_masses(model, examples, layers, query, source=prompts_path)
    unknown = [name for name in spans if name not in result.names]
    if unknown:
        raise InputError(f"--span {unknown[0]!r}: the set has {', '.join(result.names)}")
    ranked = list(spans) or [name for name in result.names if name not in CLASSES] or list(CLASSES)
    files = []
    if csv_path is not None:
        header = ["span", "layer", "head", "n", "mean", "std", "low", "high"]
        files.append(str(write_csv(csv_path, header, csv_rows(result, seed))))
    if png is not None:
        files.append(str(result.to_png(png, list(spans) or None, seed)))
    if as_json:
        click.echo(json.dumps({**result.to_dict(seed, top), "ranked": ranked, "files": files}, ensure_ascii=False))
        return
    where = "the last token" if query == "last" else f"token {query}"
    band = f"layers {result.layers[0]}-{result.layers[-1]}" if result.layers == list(
        range(result.layers[0], result.layers[-1] + 1)) else f"layers {','.join(map(str, result.layers))}"
    click.echo(f"attention mass from {where}, {band} of {result.model}, {len(examples)} examples of {prompts_path}")
    emit("mass per span (mean over the examples; bootstrap 95% interval)",
         ["span", "n", "mean over heads", "top head", "its mean [95% CI]"], overview(result, seed), as_md)
    for name in ranked:
        rows = [[str(r + 1), str(h["layer"]), str(h["head"]), f"{h['mean']:.4f}", f"[{h['low']:.4f}, {h['high']:.4f}]"]
                for r, h in enumerate(result.top(name, top, seed))]
        emit(f"heads ranked by mass on {name}", ["rank", "layer", "head", "mean", "95% CI"], rows, as_md)
    for path in files:
        click.echo(f"wrote {path}")
