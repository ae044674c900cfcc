"""``pyinterp extract``: the activations of a corpus, to disk (see pyinterp.corpus.extract)."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from pyinterp.cli.corpus import Meter, corpus_options
from pyinterp.cli.options import model_options
from pyinterp.corpus.extract import Request, extract as run_extract
from pyinterp.corpus.store import DTYPES


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("corpus_path", metavar="CORPUS", type=click.Path(exists=True))
@click.option("-o", "--out", "out", required=True, type=click.Path(), metavar="DIR",
              help="Directory to write (new or empty; or the run to continue with --resume).")
@click.option("-t", "--tensor", "tensors", multiple=True, required=True, metavar="NAME",
              help="A tensor per token: a capturable name or TransformerLens name (l_out-5, attn_out-5, "
                   "blocks.5.hook_resid_post). Repeat for several.")
@corpus_options
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="f32", show_default=True, help="Stored precision.")
@click.option("--format", "fmt", type=click.Choice(["pyinterp", "saelens"]), default="pyinterp", show_default=True,
              help="pyinterp: shards and a manifest (pyinterp.corpus.open); saelens: the Hugging Face dataset SAELens "
                   "trains from (cached_activations_path; pip install \"pyinterp[saelens]\").")
@click.option("--resume", is_flag=True, help="Continue the interrupted run in DIR from its last complete shard.")
@click.option("--contexts-per-decode", "per_decode", default=None, type=click.IntRange(1, 64),
              help="Contexts decoded together (default: 512 tokens' worth, as many as -c holds; 1: each row bit for "
                   "bit a run of its context alone).")
@click.option("--shard-tokens", default=None, type=click.IntRange(min=1),
              help="Tokens per shard file (default: about 64 MiB of activations).")
@functools.partial(model_options, threads=("--threads",))
def extract(corpus_path, out, tensors, corpus_opts, dtype, fmt, resume, per_decode, shard_tokens, model_opts):
    """Extract the activations of every token of CORPUS to DIR.

    CORPUS is a text file (one document per line, or per paragraph with --split-on-blank-lines), a JSONL file
    (--field, default text) or a directory of .txt files (one document each). Documents are packed into contexts
    of --context-size tokens as SAELens packs them. DIR gets safetensors shards and a manifest; read it with
    pyinterp.corpus.open(DIR). Ctrl-C leaves a run that --resume continues.
    """
    source = corpus_opts.source(corpus_path)
    request = Request(source, tuple(tensors), corpus_opts.context_size, corpus_opts.pack, dtype, corpus_opts.max_tokens,
                      per_decode, shard_tokens, fmt)
    with model_opts.open() as model:
        meter = Meter("extract", corpus_opts.max_tokens)
        try:
            manifest = run_extract(model, Path(out), request, resume=resume, on_batch=meter.update)
        except KeyboardInterrupt:
            meter.close()
            click.echo(f"pyinterp: interrupted; {out} keeps the complete shards: continue with --resume", err=True)
            raise
        meter.close()
    files = f"{len(manifest['shards'])} shards" if fmt == "pyinterp" else "a SAELens dataset"
    click.echo(f"wrote {out}: {manifest['n_tokens']:,} tokens in {manifest['n_contexts']:,} contexts, {files}, "
               f"tensors {', '.join(manifest['tensors'])}")
