"""``pyinterp cvector``: a control vector from positive and negative prompts (see pyinterp.analysis.steering.contrastive),
written in llama.cpp's format, as ``llama-cvector-generator`` does."""

from __future__ import annotations

import json
from pathlib import Path

import click

from pyinterp.analysis.steering import METHODS, TOKENS, contrastive
from pyinterp.cli.options import model_options, progress
from pyinterp.cli.prompt import process_escapes
from pyinterp.errors import InputError


def read_prompts(path: str) -> list[str]:
    """One prompt per line, empty lines skipped, escapes (``\\n`` ...) expanded: llama-cvector-generator's files."""

    try:
        lines = Path(path).read_bytes().decode("utf-8").split("\n")
    except OSError as e:
        raise InputError(f"cannot read prompt file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise InputError(f"prompt file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    return [process_escapes(line) for line in lines if line]


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@model_options
@click.option("--positive-file", required=True, metavar="FILE", help="Positive prompts, one per line.")
@click.option("--negative-file", required=True, metavar="FILE", help="Negative prompts, one per line (as many).")
@click.option("-o", "--output", default="control_vector.gguf", show_default=True, metavar="FILE",
              help="The control vector to write (llama.cpp's GGUF, for --control-vector).")
@click.option("--method", type=click.Choice(METHODS), default="mean", show_default=True,
              help="mean: mean difference (CAA); pca: its first principal axis.")
@click.option("--tokens", type=click.Choice(TOKENS), default="last", show_default=True,
              help="Compare the residual at the last token, or its mean over the tokens after BOS.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def cvector(model_opts, positive_file, negative_file, output, method, tokens, as_json):
    """Build a control vector from prompt pairs by contrastive activation addition.

    Line i of the positive file pairs with line i of the negative file. Direction L is the mean over
    pairs of the difference of their residual streams (l_out) after layer L, for every layer but 0;
    llama-cli --control-vector (or pyinterp --control-vector) adds it back there.
    """

    positives, negatives = read_prompts(positive_file), read_prompts(negative_file)
    if len(positives) != len(negatives):
        raise InputError(f"{positive_file} has {len(positives)} prompts, {negative_file} {len(negatives)}: they must pair up")
    with model_opts.open() as model:
        with progress(len(positives), "prompt pairs") as bar:
            cv = contrastive(model, positives, negatives, method=method, tokens=tokens,
                             on_pair=bar and (lambda _: bar.update(1)))
        name = model.path.name
    path = str(cv.save(output))
    norms = [round(float(x), 4) for x in (cv.directions[list(cv.layers)] ** 2).sum(1) ** 0.5]
    if as_json:
        click.echo(json.dumps({"model": name, "file": path, "pairs": len(positives), "method": method,
                               "tokens": tokens, "layers": list(cv.layers), "norms": norms}))
        return
    click.echo(f"{len(positives)} prompt pairs on {name}, method {method}, tokens {tokens}: "
               f"directions for layers {cv.layers[0]}..{cv.layers[-1]}, norms {min(norms):.3g}..{max(norms):.3g}")
    click.echo(f"wrote {path}")
