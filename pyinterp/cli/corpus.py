"""What the corpus commands share (the corpus options, a progress line with rate and ETA) and ``pyinterp corpus``:
``info`` and ``merge``."""

from __future__ import annotations

import functools
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import click

from pyinterp.corpus.merge import merge_corpora
from pyinterp.corpus.source import Source
from pyinterp.corpus.store import open_corpus
from pyinterp.errors import InputError


def parse_shard(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, int]:
    """``--shard I/N`` as (I, N)."""
    if value is None:
        return 1, 1
    i, _, n = value.partition("/")
    if not (i.isdigit() and n.isdigit()) or not 1 <= int(i) <= int(n):
        raise click.BadParameter(f"{value!r} is not I/N with 1 <= I <= N (like 2/8)", ctx, param)
    return int(i), int(n)


@dataclass(frozen=True)
class CorpusOptions:
    """The corpus options of a command line."""

    field: str | None
    blank_lines: bool
    context_size: int
    pack: bool
    max_tokens: int | None
    shard: tuple[int, int]

    def source(self, path: str) -> Source:
        return Source(Path(path), self.field, self.blank_lines, self.shard)


_OPTIONS = [
    click.option("--context-size", default=128, show_default=True, type=click.IntRange(min=2),
                 help="Tokens per context (SAELens's context_size)."),
    click.option("--no-pack", is_flag=True,
                 help="One context per document (cut at --context-size) instead of packing documents together."),
    click.option("--field", default=None, metavar="NAME", help="JSONL: the field holding the text (default: text)."),
    click.option("--split-on-blank-lines", is_flag=True,
                 help="Text file: documents are paragraphs separated by blank lines, not lines."),
    click.option("--max-tokens", default=None, type=click.IntRange(min=1), help="Stop after this many tokens (whole contexts)."),
    click.option("--shard", "corpus_shard", default=None, callback=parse_shard, metavar="I/N",
                 help="Only the I-th of N round-robin parts of the documents (one machine of N; join with pyinterp corpus merge)."),
]
_NAMES = ("field", "split_on_blank_lines", "context_size", "no_pack", "max_tokens", "corpus_shard")


def corpus_options(command: Callable) -> Callable:
    """Add the corpus options to a click command, which gets them as one ``corpus_opts:`` :class:`CorpusOptions`."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        field, blank, size, no_pack, max_tokens, shard = (kwargs.pop(name) for name in _NAMES)
        return command(*args, corpus_opts=CorpusOptions(field, blank, size, not no_pack, max_tokens, shard), **kwargs)

    for option in reversed(_OPTIONS):
        wrapper = option(wrapper)
    return wrapper


class Meter:
    """A progress line on stderr (a terminal only): tokens (or another ``unit``) done, their rate and the time
    left. ``total``: the tokens expected, else each update tells the share of the corpus read; ``first``: tokens
    done before this run (a resumed one)."""

    def __init__(self, label: str, total: int | None, first: int = 0, unit: str = "tokens",
                 rate_unit: str = "tok/s") -> None:
        self.label, self.total, self.first, self.unit, self.rate_unit = label, total, first, unit, rate_unit
        self.start = time.monotonic()
        self.shown = sys.stderr.isatty()
        self.last = 0.0

    def update(self, done: int, read: float = 0.0) -> None:
        """``done`` tokens so far; ``read``: the share of the corpus read (0..1), for the ETA without a total."""
        now = time.monotonic()
        if not self.shown or now - self.last < 0.2:
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        rate = (done - self.first) / elapsed
        if self.total:
            left, of = (self.total - done) / max(rate, 1e-9), f" / {self.total:,}"
        else:
            left, of = (elapsed * (1 - read) / read if read > 0 else None), f" ({100 * read:.0f}% of the corpus)"
        eta = "?" if left is None else time.strftime("%H:%M:%S", time.gmtime(max(left, 0)))
        click.echo(f"\r{self.label}: {done:,}{of} {self.unit}  {rate:,.0f} {self.rate_unit}  ETA {eta}   ", err=True,
                   nl=False)

    def close(self) -> None:
        if self.shown:
            click.echo(err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def corpus():
    """Extracted corpora (pyinterp extract): show one, merge the parts of a sharded extraction."""


@corpus.command()
@click.argument("directory", type=click.Path(file_okay=False))
def info(directory):
    """What an extracted corpus holds."""
    c = open_corpus(directory)
    m = c.manifest
    click.echo(f"{directory}: {c.n_tokens:,} tokens in {c.n_contexts:,} contexts of {c.context_size} "
               f"({'packed' if m['packing']['packed'] else 'one per document'}), {len(c.shards)} shards, {m['dtype']}")
    click.echo(f"model {m['model']['name']} (header sha256 {m['model']['header_sha256'][:12]}...)")
    for name, t in m["tensors"].items():
        click.echo(f"  {name}  ({t['key']}, width {t['width']})")


@corpus.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.argument("parts", nargs=-1, required=True, type=click.Path(file_okay=False))
def merge(out, parts):
    """Join the extractions of the parts of a corpus (pyinterp extract --shard I/N) into OUT.

    OUT gets a manifest naming the parts' shards where they are (paths relative to OUT); no activation is copied.
    """
    if not parts:
        raise InputError("name the parts to merge")
    manifest = merge_corpora(Path(out), [Path(p) for p in parts])
    click.echo(f"merged {len(parts)} parts into {out}: {manifest['n_tokens']:,} tokens, {manifest['n_contexts']:,} contexts")
