"""``pyinterp sweep --prompts FILE``: a patching sweep or head scan over a prompt set (see
pyinterp.analysis.set_sweep): per-example values, the aggregate per cell, tables, JSON, CSV and a heatmap of the
mean beside the width of its interval."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from pyinterp.analysis.prompts import load_prompts
from pyinterp.analysis.set_sweep import SetAggregate, SetSweep, aggregate_rows, example_rows, set_sweep
from pyinterp.analysis.stats import markdown_table
from pyinterp.errors import InputError
from pyinterp.io.atomic import atomic_write
from pyinterp.io.csv_io import write_csv

ALIGN_NOTE = "positions aligned from the end: -1 is each example's last token"


def example_metrics(model, examples, path: str, kind: str, metric_kind: str, good: str | None, bad: str | None):
    """Each example's metric: its row's good/bad, else --good/--bad, else the defaults of a single sweep."""
    from pyinterp.cli.sweep import choose_metric

    metrics = []
    for ex in examples:
        row_bad = None if metric_kind == "prob" else (ex.bad if ex.bad is not None else bad)
        corrupt = None if kind == "heads" else ex.corrupt
        try:
            metric = choose_metric(model, metric_kind, ex.good if ex.good is not None else good, row_bad, ex.text,
                                   corrupt)
            metric.bind(model)
        except InputError as e:
            raise InputError(f"{path}:{ex.line}: {e}") from None
        metrics.append(metric)
    return metrics


def column_labels(result: SetSweep) -> list[str]:
    """Column labels: a head, or a position from the end with its token where every example has the same one."""
    if result.tokens is None:
        return list(result.columns)
    labels = []
    for k, column in enumerate(result.columns):
        texts = {tokens[k] for tokens in result.tokens}
        labels.append(f"{column} {next(iter(texts))!r}" if len(texts) == 1 else column)
    return labels


def to_json(result: SetSweep, agg: SetAggregate, model_name: str, seed: int) -> dict:
    """The aggregate, and each example's baselines and values, as JSON (NaN as null)."""
    def summary(s):
        return None if s is None else _finite(s.to_dict())

    examples = [{"line": ex.line, "clean": ex.text, "corrupt": ex.corrupt, "metric": result.metrics[i],
                 "clean_value": float(result.clean[i]),
                 "corrupt_value": None if result.corrupt is None else float(result.corrupt[i]),
                 "values": result.values[i].tolist(),
                 **({} if result.positions is None else {"positions": result.positions[i].tolist(),
                                                        "tokens": result.tokens[i]})}
                for i, ex in enumerate(result.examples)]
    return {"model": model_name, "kind": result.kind, "tensor": result.tensor, "layers": result.layers,
            "columns": result.columns, "alignment": ALIGN_NOTE if result.kind == "patch" else None, "seed": seed,
            "n": len(result.examples), "raw": summary(agg.raw), "p": np.round(agg.p, 6).tolist(),
            "normalized": summary(agg.normalized), "examples": examples}


def _finite(obj):
    """``obj`` (nested lists and dicts) with NaN and infinities as None (JSON has neither)."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return None if isinstance(obj, float) and not np.isfinite(obj) else obj


def _tables(result: SetSweep, agg: SetAggregate) -> list[tuple[str, list[list[str]]]]:
    """(title, rows) of each table printed: mean ± half-width, the normalised mean, the p-values."""
    half = (agg.raw.high - agg.raw.low) / 2
    tables = [("raw metric: mean ± half-width of the 95% bootstrap interval",
               [[f"{m:.3f}±{h:.3f}" for m, h in zip(mr, hr)] for mr, hr in zip(agg.raw.mean, half)])]
    if agg.normalized is not None:
        tables.append((f"normalised (patched - corrupt) / (clean - corrupt): mean over {agg.normalized.n} examples",
                       [[f"{v:.3f}" for v in row] for row in agg.normalized.mean]))
    tables.append(("permutation p-value (paired, against the " + ("unablated run" if result.kind == "heads"
                                                                    else "corrupt baseline") + ")",
                   [[f"{v:.3f}" for v in row] for row in agg.p]))
    return tables


def print_tables(result: SetSweep, agg: SetAggregate, as_md: bool) -> None:
    labels = column_labels(result)
    for title, rows in _tables(result, agg):
        body = [[str(il), *row] for il, row in zip(result.layers, rows, strict=True)]
        if as_md:
            click.echo(f"\n**{title}**\n\n" + markdown_table(["layer", *labels], body))
            continue
        width = max(7, *(len(c) + 1 for c in labels), *(len(v) + 1 for row in rows for v in row))
        click.echo(f"\n{title}\n{'layer':>5} " + "".join(c.rjust(width) for c in labels))
        for row in body:
            click.echo(f"{row[0]:>5} " + "".join(v.rjust(width) for v in row[1:]))


def draw(result: SetSweep, agg: SetAggregate, what: str, png: str) -> str:
    """The mean heatmap above the heatmap of the 95% interval's width (one picture): the mean on the diverging scale
    centred on 0 when it has both signs (or is a change), the width on the sequential scale."""
    from pyinterp.viz.grids import value_grid
    from pyinterp.viz.plot import canvas, paste, sanitize_label, save_png

    rows, cols = [str(il) for il in result.layers], [sanitize_label(c) for c in column_labels(result)]
    mean, width = agg.raw.mean, agg.raw.high - agg.raw.low
    col_name = "position from the end (token)" if result.positions is not None else "head"
    signed = result.kind == "heads" or bool(np.nanmin(mean) < 0 < np.nanmax(mean))
    panels = [value_grid(mean, title=f"{what}: mean over {agg.raw.n} examples", row_labels=rows, col_labels=cols,
                         signed=signed, unit="metric", row_name="layer", col_name=col_name),
              value_grid(width, title="width of the 95% bootstrap interval (high - low)", row_labels=rows,
                         col_labels=cols, unit="interval width", row_name="layer", col_name=col_name)]
    image = canvas(sum(p.shape[0] for p in panels), max(p.shape[1] for p in panels))
    top = 0
    for panel in panels:
        paste(image, panel, 0, top)
        top += panel.shape[0]
    return str(save_png(image, png))


def write_examples(path: str, result: SetSweep) -> str:
    """The per-example table as CSV, or (a .json path) as a JSON list of row objects."""
    header, rows = example_rows(result)
    if Path(path).suffix.lower() != ".json":
        return str(write_csv(path, header, rows))
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump([dict(zip(header, row)) for row in rows], f, ensure_ascii=False)
    return path


def run_set(model_opts, prompts_path: str, kind: str, tensor: str, metric_kind: str, good: str | None,
            bad: str | None, layer_spec, seed: int, as_json: bool, as_md: bool, csv_path: str | None,
            examples_path: str | None, png: str | None) -> None:
    """The whole ``--prompts`` sweep: load, run every example, aggregate, print and write."""
    from pyinterp.cli.options import progress

    examples = load_prompts(prompts_path, needs=["clean"] if kind == "heads" else ["clean", "corrupt"])
    with model_opts.open() as model:
        layers = layer_spec.resolve(model.n_layer) if layer_spec is not None else list(range(model.n_layer))
        metrics = example_metrics(model, examples, prompts_path, kind, metric_kind, good, bad)
        n_cols = model.n_head if kind != "patch" else min(len(model.prompt_ids(ex.text)) for ex in examples)
        with progress(len(examples) * len(layers) * n_cols, "cells") as bar:
            result = set_sweep(model, examples, metrics, kind, tensor=tensor, layers=layers, source=prompts_path,
                               on_cell=bar and (lambda: bar.update(1)))
        name = model.path.name
    agg = result.aggregate(seed)
    what = {"patch": f"patching {tensor} clean -> corrupt", "patch_heads": "patching each head clean -> corrupt",
            "heads": "head ablation: metric(ablated) - metric(plain)"}[kind]
    files = []
    if examples_path is not None:
        files.append(write_examples(examples_path, result))
    if csv_path is not None:
        files.append(str(write_csv(csv_path, *aggregate_rows(result, agg))))
    if png is not None:
        files.append(draw(result, agg, what, png))
    if as_json:
        click.echo(json.dumps({**to_json(result, agg, name, seed), "what": what, "files": files}, ensure_ascii=False))
        return
    metrics = sorted({m for m in result.metrics if m is not None})
    click.echo(f"{what} on {name}, {len(examples)} examples of {prompts_path}; metric "
               + (metrics[0] if len(metrics) == 1 else "per example (see --json)") + f"; seed {seed}")
    if kind == "patch":
        click.echo(ALIGN_NOTE)
    print_tables(result, agg, as_md)
    for path in files:
        click.echo(f"wrote {path}")
