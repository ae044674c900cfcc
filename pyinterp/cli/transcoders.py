"""``pyinterp transcoders``: how well a set of transcoders replaces a model's MLPs on prompts (see
pyinterp.circuit.replace.reconstruction_report)."""

from __future__ import annotations

import json

import click

from pyinterp.analysis.stats import markdown_table
from pyinterp.cli.options import model_options
from pyinterp.cli.sets import md_option


def report_rows(report) -> list[list]:
    """One row per layer: layer, relative error, mean L0, KL with that layer's MLP replaced."""
    return [[layer["layer"], f"{layer['rel_error']:.4f}", f"{layer['l0']:.1f}", f"{layer['kl']:.4g}"]
            for layer in report.to_dict()["layers"]]


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@model_options
@click.option("--transcoders", "tc_dir", required=True, type=click.Path(exists=True), metavar="DIR",
              help="The transcoders of every layer (see pyinterp.circuit.transcoder_io.load_transcoders).")
@click.option("-p", "--prompt", "prompts", required=True, multiple=True, help="Prompt text (repeatable).")
@md_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of the table.")
def transcoders(model_opts, tc_dir, prompts, as_md, as_json):
    """Per layer: the transcoder's relative error sqrt(sum |out - y|^2 / sum |out|^2) over every token of the
    prompts (out: the MLP's output, y: the transcoder's), its mean number of active features (L0), and the
    mean next-token KL(real || that layer's MLP replaced by its transcoder, error term dropped); then the KL
    with every MLP replaced."""
    from pyinterp.circuit.replace import reconstruction_report
    from pyinterp.circuit.transcoder_io import load_transcoders

    if as_md and as_json:
        raise click.UsageError("--md and --json: choose one")
    tcs = load_transcoders(tc_dir)
    with model_opts.open() as model:
        report = reconstruction_report(model, list(prompts), tcs)
        name = model.path.name
    if as_json:
        click.echo(json.dumps({"model": name, "transcoders": str(tc_dir), "prompts": list(prompts),
                               "cross_layer": tcs.cross_layer, **report.to_dict()}))
        return
    header = ["layer", "rel. error", "L0", "KL (this MLP replaced)"]
    title = (f"transcoders {tc_dir} on {name}: {report.n_tokens} tokens of {len(prompts)} prompt(s); "
             f"KL with every MLP replaced: {report.kl_all:.4g}")
    if as_md:
        click.echo(f"{title}\n\n{markdown_table(header, report_rows(report))}")
        return
    click.echo(title)
    click.echo(f"{'layer':>5}  {'rel.err':>8}  {'L0':>7}  {'KL':>10}")
    for layer, rel, l0, kl in report_rows(report):
        click.echo(f"{layer:>5}  {rel:>8}  {l0:>7}  {kl:>10}")
