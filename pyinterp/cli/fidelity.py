"""``pyinterp fidelity``: how far a quantized model is from its weights in fp32, per layer (see pyinterp.analysis.fidelity)."""

from __future__ import annotations

import contextlib
import json
import sys

import click

from pyinterp.analysis.fidelity import fidelity as measure
from pyinterp.cli.options import model_options
from pyinterp.cli.prompt import prompt_options, prompt_text


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@model_options
@prompt_options
@click.option("--png", default=None, type=click.Path(dir_okay=False), metavar="PATH",
              help="Write per-layer curves of the errors.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of the table.")
def fidelity(model_opts, prompt, prompt_file, escape, png, as_json):
    """Compare a quantized model (-m) with the same weights dequantized to F32, layer by layer.

    The F32 copy is written once into the cache ($PYINTERP_CACHE, default ~/.cache/pyinterp). Both models run
    the prompt with the same model options; per layer: l_out cosine (mean and min over positions) and relative L2
    error, attention mean and max |diff|; then the logits' correlation, KL(fp32 || quant) and top-1 agreement.
    """
    prompt = prompt_text(prompt, prompt_file, escape)
    with contextlib.ExitStack() as stack:
        bar = None

        def on_write(n: int, total: int) -> None:  # a progress bar, opened once the size is known
            nonlocal bar
            if bar is None:
                bar = stack.enter_context(click.progressbar(length=total, label="writing the F32 copy", file=sys.stderr))
            bar.update(n)

        report = measure(model_opts.path, prompt, **model_opts.kwargs(),
                         on_write=on_write if sys.stderr.isatty() else None)
    files = [str(report.to_png(png))] if png is not None else []
    if as_json:
        click.echo(json.dumps({**report.to_dict(), "files": files}, ensure_ascii=False))
        return
    click.echo(report.table())
    for path in files:
        click.echo(f"wrote {path}")
