"""``pyinterp compare``: several models' logit lens over one prompt set, by relative depth (see
pyinterp.analysis.compare): the table at chosen depths as text, Markdown, JSON or CSV, and the curves as a PNG."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import click
import numpy as np

from pyinterp.analysis.compare import DEPTHS, METRICS, MULTI, ModelCurves, compare_model, parse_depths
from pyinterp.analysis.prompts import load_prompts
from pyinterp.analysis.stats import Summary, markdown_table
from pyinterp.cli.options import INT32_MAX
from pyinterp.cli.sets import md_option, prompts_option
from pyinterp.errors import InputError
from pyinterp.io.csv_io import write_csv

TABLE_HEADER = ["depth", "model", "layer", "n"] + [f"{m}_{s}" for m in METRICS for s in ("mean", "low", "high")]
EXAMPLE_HEADER = ["model", "line", "targets", "layer", "depth", *METRICS]
NAMES = {"p": "P(target)", "rank": "rank", "entropy": "entropy (nats)"}


def depth_text(depth: Fraction) -> str:
    return str(depth) if depth.denominator <= 12 else f"{float(depth):.3f}"


def table_rows(curves: list[ModelCurves], summaries: list[dict[str, Summary]], depths: list[Fraction]) -> list[list]:
    """One row per depth and model (:data:`TABLE_HEADER`): the nearest layer's mean and interval of each metric."""
    rows = []
    for depth in depths:
        for c, s in zip(curves, summaries, strict=True):
            il = c.layer_at(depth)
            cells = [float(getattr(s[m], k)[il]) for m in METRICS for k in ("mean", "low", "high")]
            rows.append([depth_text(depth), c.name, il, s["p"].n, *cells])
    return rows


def text_rows(rows: list[list], decimals: int) -> list[list[str]]:
    """The table's rows with each metric as ``mean [low, high]``."""
    out = []
    for row in rows:
        cells = [f"{row[4 + 3 * i]:.{decimals}f} [{row[5 + 3 * i]:.{decimals}f}, {row[6 + 3 * i]:.{decimals}f}]"
                 for i in range(len(METRICS))]
        out.append([*[str(v) for v in row[:4]], *cells])
    return out


def print_text(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    click.echo("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
    for row in rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def example_rows(curves: list[ModelCurves]) -> list[list]:
    """Per-example values (:data:`EXAMPLE_HEADER`): one row per model, prompt-set line and layer."""
    return [[c.name, line, "|".join(t.texts), il, float(c.depths[il]), *(float(c.values[m][r, il]) for m in METRICS)]
            for c in curves for r, (line, t) in enumerate(zip(c.lines, c.targets, strict=True))
            for il in range(c.n_layer)]


def write_png(path: str, curves: list[ModelCurves], summaries: list[dict[str, Summary]], title: str) -> Path:
    from pyinterp.viz.charts import band_charts
    from pyinterp.viz.plot import save_png

    panels = [(NAMES[m], {c.name: (c.depths, s[m].mean, s[m].low, s[m].high) for c, s in zip(curves, summaries, strict=True)},
               m == "rank") for m in METRICS]
    return save_png(band_charts(panels, title=title), path)


def to_json(curves: list[ModelCurves], summaries: list[dict[str, Summary]], rows: list[list], settings: dict,
            files: list[str]) -> dict:
    return {
        **settings,
        "models": [{"model": c.name, "n_layer": c.n_layer, "notes": c.notes,
                    "layers": {m: s[m].to_dict() for m in METRICS},
                    "examples": [{"line": line, "targets": list(t.texts), "ids": list(t.ids),
                                  **{m: np.round(c.values[m][r], 6).tolist() for m in METRICS}}
                                 for r, (line, t) in enumerate(zip(c.lines, c.targets, strict=True))]}
                   for c, s in zip(curves, summaries, strict=True)],
        "table": [dict(zip(TABLE_HEADER, row, strict=True)) for row in rows],
        "files": files,
    }


def check_models(paths: tuple[str, ...]) -> None:
    if len(paths) < 2:
        raise InputError("compare needs two models or more: -m A.gguf -m B.gguf")
    for path in paths:
        if not Path(path).expanduser().is_file():
            raise InputError(f"model file not found: {path}")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-m", "--model", "models", multiple=True, metavar="PATH", help="A GGUF model (twice or more).")
@prompts_option
@click.option("--raw-lens", is_flag=True, help="The raw lens (no final norm) instead of the norm lens.")
@click.option("--temp", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Lensed probabilities (and entropy) at this temperature: softmax(logit / T).")
@click.option("--depths", "depths_spec", default=",".join(str(d) for d in DEPTHS), show_default=True,
              help="Relative depths of the table (layer / (n_layer - 1)); each gets the nearest layer.")
@click.option("--multi-token", "multi", type=click.Choice(MULTI), default="first", show_default=True,
              help="A target that is several tokens in a model: score its first token, or skip that row for that "
                   "model (reported on stderr and in the JSON either way).")
@click.option("--decimals", default=6, show_default=True, type=click.IntRange(0, 12))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Seed of the bootstrap.")
@md_option
@click.option("--json", "as_json", is_flag=True, help="Print everything (per-layer summaries, per-example values, "
                                                      "the table) as JSON.")
@click.option("--csv", "csv_path", default=None, type=click.Path(dir_okay=False), metavar="PATH",
              help="Write the table as CSV.")
@click.option("--examples-csv", default=None, type=click.Path(dir_okay=False), metavar="PATH",
              help="Write the per-example values as CSV (one row per model, example and layer).")
@click.option("--png", default=None, type=click.Path(dir_okay=False), metavar="PATH",
              help="Draw P(target), rank and entropy against relative depth, a line and 95% band per model.")
@click.option("-c", "--ctx-size", "n_ctx", default=2048, show_default=True, type=click.IntRange(min=8))
@click.option("-t", "--threads", "n_threads", default=None, type=click.IntRange(min=1, max=512))
@click.option("-ngl", "--n-gpu-layers", default=None, type=click.IntRange(-1, INT32_MAX))
@click.option("--verbose", is_flag=True, help="Show llama.cpp's log.")
@click.option("--debug", is_flag=True, expose_value=False, help="Show tracebacks of errors.")
def compare(models, prompts_path, raw_lens, temp, depths_spec, multi, decimals, seed, as_md, as_json, csv_path,
            examples_csv, png, n_ctx, n_threads, n_gpu_layers, verbose):
    """Compare models by relative depth: the norm (or raw) logit lens of every model at the last token of every
    prompt of --prompts (rows with "prompt" and "target"), as P(target), the target's rank and the entropy of
    the lensed distribution per layer; the mean and bootstrap 95% interval at each --depths. Models are loaded
    one at a time. Each model tokenizes the targets itself (with a leading space after a word, else without)."""
    check_models(models)
    if prompts_path is None:
        raise InputError("compare needs --prompts FILE (rows with \"prompt\" and \"target\")")
    depths = parse_depths(depths_spec)
    examples = load_prompts(prompts_path, needs=["prompt", "target"])
    from pyinterp.model import Model

    curves = []
    for i, path in enumerate(models, 1):
        click.echo(f"model {i}/{len(models)}: {path}, {len(examples)} prompts", err=True)
        with Model(path, n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers, verbose=verbose) as model:
            curves.append(compare_model(model, examples, norm=not raw_lens, temp=temp, multi=multi))
        for note in curves[-1].notes:
            click.echo(f"note: {note}", err=True)
    summaries = [{m: c.summary(m, seed) for m in METRICS} for c in curves]
    rows = table_rows(curves, summaries, depths)
    lens = "raw" if raw_lens else "norm"
    title = f"{lens} logit lens at the last token, {len(examples)} prompts of {Path(prompts_path).name}" + (
        f", T = {temp:g}" if temp != 1 else "")
    files = []
    if png is not None:
        files.append(str(write_png(png, curves, summaries, title)))
    if csv_path is not None:
        files.append(str(write_csv(csv_path, TABLE_HEADER, rows)))
    if examples_csv is not None:
        files.append(str(write_csv(examples_csv, EXAMPLE_HEADER, example_rows(curves))))
    if as_json:
        settings = {"lens": lens, "temp": temp, "prompts": str(prompts_path), "multi_token": multi}
        click.echo(json.dumps(to_json(curves, summaries, rows, settings, files), ensure_ascii=False))
        return
    header = ["depth", "model", "layer", "n", *(f"{NAMES[m]} [95% CI]" for m in METRICS)]
    click.echo(f"{title}; mean [bootstrap 95% interval]")
    if as_md:
        click.echo(markdown_table(header, text_rows(rows, decimals)))
    else:
        print_text(header, text_rows(rows, decimals))
    for path in files:
        click.echo(f"wrote {path}")
