"""What the commands that run a prompt set share: ``--prompts FILE``, ``--md`` and the per-example and aggregate
outputs (see pyinterp.analysis.prompts and pyinterp.analysis.stats)."""

from __future__ import annotations

import click

prompts_option = click.option(
    "--prompts", "prompts_path", default=None, type=click.Path(dir_okay=False), metavar="FILE",
    help="A prompt set (JSONL, or TSV with a header): run every row and report per-example values and their mean, "
         "standard deviation and bootstrap 95% interval.")
md_option = click.option("--md", "as_md", is_flag=True, help="Print tables as Markdown.")
