"""``pyinterp sweep``: an activation-patching sweep (layers x positions) or a head ablation scan (layers x heads),
as a table, JSON, CSV and a heatmap (see pyinterp.analysis.patching)."""

from __future__ import annotations

import json

import click
import numpy as np

from pyinterp.analysis.patching import (Metric, bind_metric, head_ablation_scan, head_patch_scan, logit_diff,
                                        patch_sweep, prob, run_metric)
from pyinterp.analysis.stats import markdown_table
from pyinterp.cli.ablation import ablation_options
from pyinterp.cli.options import LAYERS_HELP, layer_list, model_options, progress
from pyinterp.cli.sets import md_option, prompts_option
from pyinterp.io.csv_io import write_csv


def top_token(model, text: str) -> int:
    """The model's top prediction after ``text``."""
    return int(np.argmax(model.run(text, logits="last").logits[-1]))


def choose_metric(model, kind: str, good: str | None, bad: str | None, clean: str, corrupt: str | None) -> Metric:
    """The metric the options name; ``--good`` defaults to the clean prompt's top prediction, ``--bad`` to the
    corrupted one's."""
    good_token = good if good is not None else top_token(model, clean)
    if kind == "prob":
        if bad is not None:
            raise click.UsageError("--bad goes with --metric logit-diff")
        return prob(good_token)
    if bad is None and corrupt is None:
        raise click.UsageError("--metric logit-diff needs --bad TOKEN (or --corrupt, whose top prediction it then is)")
    bad_token = bad if bad is not None else top_token(model, corrupt)
    return logit_diff(good_token, bad_token)


def print_table(values: np.ndarray, layers: list[int], columns: list[str], as_md: bool = False) -> None:
    """One row per layer, one column per token or head, values to two decimals (``as_md``: a Markdown table)."""
    if as_md:
        click.echo(markdown_table(["layer", *columns], [[il, *(f"{v:.2f}" for v in row)]
                                                        for il, row in zip(layers, values, strict=True)]))
        return
    width = max(7, *(len(c) + 1 for c in columns))
    click.echo(f"{'layer':>5} " + "".join(c.rjust(width) for c in columns))
    for label, row in zip(layers, values, strict=True):
        click.echo(f"{label:>5} " + "".join(f"{v:.2f}".rjust(width) for v in row))


def sweep_picture(result: dict, values: np.ndarray, by_head: bool, metric_kind: str) -> np.ndarray:
    """The heatmap of a sweep's ``values`` ``[n_layers, n_columns]``: a logit difference, and any change the head
    ablation scan records, on the diverging scale centred on 0; a probability on the sequential scale. The title
    says what was done, to which prompts, and the baselines."""
    from pyinterp.viz.grids import value_grid
    from pyinterp.viz.plot import sanitize_label

    ablation = "plain" in result["baselines"]
    pair = repr(result["clean"]) if ablation else f"{result['clean']!r} -> {result['corrupt']!r}"
    baselines = ", ".join(f"{k} {v:.3g}" for k, v in result["baselines"].items())
    title = f"{result['kind']}\nmetric {result['metric']} on {pair}\nbaselines: {baselines}"
    unit = {"logit-diff": "logit difference", "prob": "probability"}[metric_kind]
    unit = f"change in {unit}" if ablation else unit
    return value_grid(values, title=title, row_labels=[str(il) for il in result["layers"]],
                      col_labels=[sanitize_label(c) for c in result["columns"]],
                      signed=ablation or metric_kind == "logit-diff", unit=unit, row_name="layer",
                      col_name="head" if by_head else "position (token)")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@model_options
@click.option("--clean", default=None, help="The clean prompt (its activations are patched in).")
@click.option("--corrupt", default=None, help="The corrupted prompt (patched into); as many tokens as --clean.")
@click.option("--heads", "heads_scan", is_flag=True,
              help="Instead of patching: ablate each head alone on --clean and record the metric's change.")
@ablation_options
@click.option("--patch-heads", is_flag=True,
              help="With --corrupt: patch each head's output (kqv_heads) alone instead of a row of --tensor (layers x heads).")
@click.option("--tensor", default="l_out", show_default=True, help="The [n_tokens, width] tensor patched.")
@click.option("--metric", "metric_kind", type=click.Choice(["logit-diff", "prob"]), default="logit-diff",
              show_default=True, help="logit(--good) - logit(--bad), or the probability of --good, at the last token.")
@click.option("--good", default=None, metavar="TOKEN", help="Single-token text. Default: the clean prompt's top prediction.")
@click.option("--bad", default=None, metavar="TOKEN",
              help="Single-token text. Default: the corrupted prompt's top prediction.")
@click.option("--layers", "layer_spec", default=None, metavar="LIST", callback=layer_list,
              help=f"Layers (default all): {LAYERS_HELP}.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of the table.")
@click.option("--csv", "csv_path", default=None, type=click.Path(dir_okay=False), metavar="PATH",
              help="Write the table as CSV.")
@click.option("--png", default=None, type=click.Path(dir_okay=False), metavar="PATH", help="Write the heatmap.")
@prompts_option
@md_option
@click.option("--per-example", "examples_path", default=None, type=click.Path(dir_okay=False), metavar="PATH",
              help="With --prompts: write every example's value of every cell, with its baselines (.csv or .json).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="With --prompts: the seed of the bootstrap intervals and permutation p-values.")
def sweep(model_opts, clean, corrupt, heads_scan, ablation, patch_heads, tensor, metric_kind, good, bad, layer_spec, as_json,
          csv_path, png, prompts_path, as_md, examples_path, seed):
    """Activation patching: for each layer and token, run --corrupt with that token's row of --tensor taken
    from the --clean run, and record the metric of the last token's logits (layers x tokens).

    With --patch-heads: patch each head's output alone instead (layers x heads). With --heads: ablate each head
    of --clean alone (--ablate-mode: zero, or mean or resample over --ablate-ref) and record
    metric(ablated) - metric(plain) (layers x heads). Each cell reuses the plain
    run's unchanged positions and layers and equals a run of its own bit for bit.

    With --prompts FILE (rows with clean and corrupt, or clean alone for --heads, and optionally good/bad): the
    sweep of every row, positions aligned from the end (-1: each row's last token), and per cell the mean,
    standard deviation, bootstrap 95% interval, permutation p-value and normalised metric.
    """
    from pyinterp.viz.plot import sanitize_label, save_png

    if prompts_path is not None:
        from pyinterp.cli.sweep_set import run_set

        if ablation.mode != "zero":
            raise click.UsageError("--ablate-mode mean or resample does not go with --prompts yet")

        if clean is not None or corrupt is not None:
            raise click.UsageError("--prompts takes the clean and corrupted prompts from the file: "
                                   "no --clean/--corrupt")
        if heads_scan and patch_heads:
            raise click.UsageError("--patch-heads patches from --corrupt; --heads ablates: choose one")
        if (heads_scan or patch_heads) and tensor != "l_out":
            raise click.UsageError("--tensor goes with a patching sweep of rows, not --heads or --patch-heads")
        kind = "heads" if heads_scan else "patch_heads" if patch_heads else "patch"
        run_set(model_opts, prompts_path, kind, tensor, metric_kind, good, bad, layer_spec, seed, as_json, as_md,
                csv_path, examples_path, png)
        return
    if clean is None:
        raise click.UsageError("give --clean (and --corrupt, or --heads), or --prompts FILE")
    if examples_path is not None:
        raise click.UsageError("--per-example goes with --prompts")
    if heads_scan == (corrupt is not None):
        raise click.UsageError("give --corrupt for a patching sweep, or --heads for a head ablation scan (not both)")
    if (heads_scan or patch_heads) and tensor != "l_out":
        raise click.UsageError("--tensor goes with a patching sweep of rows, not --heads or --patch-heads")
    if heads_scan and patch_heads:
        raise click.UsageError("--patch-heads patches from --corrupt; --heads ablates: choose one")
    ablation.check(heads_scan, "--heads")
    reference = ablation.prompts()
    with model_opts.open() as model:
        layers = layer_spec.resolve(model.n_layer) if layer_spec is not None else list(range(model.n_layer))
        metric = choose_metric(model, metric_kind, good, bad, clean, corrupt)
        fn = bind_metric(model, metric)
        clean_ids = model.prompt_ids(clean)
        result = {"model": model.path.name, "clean": clean, "metric": metric.describe(model), "layers": layers,
                  "clean_value": run_metric(model, clean_ids, fn)}
        if heads_scan:
            n_cells, columns = len(layers) * model.n_head, [str(h) for h in range(model.n_head)]
            mode = "" if ablation.mode == "zero" else f" ({ablation.mode})"
            kind = f"head ablation{mode}: metric(ablated) - metric(plain)"
            result["ablation"] = ablation.describe()
            with progress(n_cells, "heads") as bar:
                values = head_ablation_scan(model, clean_ids, metric, layers, on_cell=bar and (lambda: bar.update(1)),
                                            mode=ablation.mode, reference=reference,
                                            per_position=ablation.per_position, seed=ablation.seed or 0)
        else:
            corrupt_ids = model.prompt_ids(corrupt)
            result |= {"corrupt": corrupt, "tensor": "kqv_heads" if patch_heads else tensor,
                       "corrupt_value": run_metric(model, corrupt_ids, fn)}
            if patch_heads:
                columns, kind = [str(h) for h in range(model.n_head)], "patching each head clean -> corrupt"
                with progress(len(layers) * model.n_head, "heads") as bar:
                    values = head_patch_scan(model, clean_ids, corrupt_ids, metric, layers,
                                             on_cell=bar and (lambda: bar.update(1)))
            else:
                columns = [model.token_str(t) for t in clean_ids]
                kind = f"patching {tensor} clean -> corrupt"
                with progress(len(layers) * len(clean_ids), "cells") as bar:
                    values = patch_sweep(model, clean_ids, corrupt_ids, metric=metric, tensor=tensor, layers=layers,
                                         on_cell=bar and (lambda: bar.update(1)))
    baselines = {"plain": result["clean_value"]} if heads_scan else {"clean": result["clean_value"],
                                                                       "corrupt": result["corrupt_value"]}
    result |= {"kind": kind, "columns": columns, "baselines": baselines, "values": values.round(6).tolist()}
    files = []
    if csv_path is not None:
        names = [f"baseline_{k}" for k in baselines]
        write_csv(csv_path, ["layer", *columns, *names],
                  [[label, *(f"{v:.6g}" for v in row), *(f"{b:.6g}" for b in baselines.values())]
                   for label, row in zip(layers, values, strict=True)])
        files.append(csv_path)
    if png is not None:
        files.append(str(save_png(sweep_picture(result, values, heads_scan or patch_heads, metric_kind), png)))
    if as_json:
        click.echo(json.dumps({**result, "files": files}, ensure_ascii=False))
        return
    click.echo(f"{kind} on {result['model']}; metric {result['metric']}")
    click.echo(f"clean: {result['clean_value']:.3f}" + ("" if heads_scan else f"  corrupt: {result['corrupt_value']:.3f}"))
    print_table(values, layers, [sanitize_label(c) for c in columns], as_md)
    for path in files:
        click.echo(f"wrote {path}")

