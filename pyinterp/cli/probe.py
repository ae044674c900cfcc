"""``pyinterp probe``: linear probes of a labelled prompt set across layers (see pyinterp.analysis.probe)."""

from __future__ import annotations

import functools
import json

import click

from pyinterp.analysis.probe import POSITIONS, encode_labels, probe as run_probe, sklearn_parts
from pyinterp.analysis.prompts import load_prompts
from pyinterp.cli.options import LAYERS_HELP, layer_list, model_options, progress
from pyinterp.cli.sets import md_option


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--prompts", "prompt_set", required=True, type=click.Path(dir_okay=False), metavar="FILE",
              help="The labelled prompt set (JSONL, or TSV with a header): every row's 'prompt' and 'label' "
                   "(a string or an integer).")
@click.option("-t", "--tensor", default="l_out", show_default=True, metavar="NAME",
              help="The tensor probed at each layer (l_out, attn_out, ffn_out, ...; the layers: --layers).")
@click.option("--position", type=click.Choice(POSITIONS), default="last", show_default=True,
              help="Probe the last token's row, or the mean over the tokens after BOS.")
@click.option("--folds", default=5, show_default=True, type=click.IntRange(min=2),
              help="Folds of the stratified cross-validation.")
@click.option("--layers", default=None, metavar="LIST", callback=layer_list, help=f"Layers to probe: {LAYERS_HELP}.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed of the folds, the probes and the shuffled labels of the control task.")
@click.option("--save", "save_dir", default=None, type=click.Path(file_okay=False), metavar="DIR",
              help="Write the probe directions to DIR: probe.gguf (a control vector for --control-vector; "
                   "probe-K.gguf per class K for more than two), probe.npz and probe.json.")
@click.option("--png", default=None, type=click.Path(dir_okay=False), metavar="FILE",
              help="Write accuracy against layer, with the control task and the majority baseline.")
@md_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of the table.")
@functools.partial(model_options, threads=("--threads",))
def probe(prompt_set, tensor, position, folds, layers, seed, save_dir, png, as_md, as_json, model_opts):
    """Fit a logistic-regression probe of the prompts' labels at every layer and report its held-out accuracy.

    Each layer's TENSOR row at --position is standardized and fed to a logistic regression (scikit-learn:
    pip install "pyinterp[probe]"), scored by stratified --folds cross-validation, against the majority
    baseline and a control task (the same probe on the labels shuffled). The probe fitted on every example
    gives each layer's direction (coefficients / scale, in activation space), which --save writes.
    """
    if as_md and as_json:
        raise click.UsageError("--md and --json are two formats: choose one")
    examples = load_prompts(prompt_set, needs=["prompt", "label"])
    prompts, labels = [e.prompt for e in examples], [e.label for e in examples]
    encode_labels(labels, folds)  # bad labels and a missing scikit-learn: before the model loads
    sklearn_parts()
    with model_opts.open() as model:
        chosen = layers.resolve(model.n_layer) if layers is not None else None
        n_layers = len(chosen) if chosen is not None else len(model.engine.planner().captures([tensor]))
        with progress(len(prompts) + n_layers, "prompts, then probes") as bar:
            result = run_probe(model, prompts, labels, tensor=tensor, layers=chosen, position=position, folds=folds,
                               seed=seed, on_decode=bar and (lambda n: bar.update(n)),
                               on_layer=bar and (lambda _: bar.update(1)))
        n_embd = model.n_embd
    files = [str(p) for p in result.save(save_dir, n_embd)] if save_dir is not None else []
    if png is not None:
        files.append(str(result.to_png(png)))
    result.files = files
    if as_json:
        click.echo(json.dumps(result.to_dict(), ensure_ascii=False))
        return
    click.echo(result.markdown() if as_md else result.table())
    for path in files:
        click.echo(f"wrote {path}")
