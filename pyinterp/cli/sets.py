"""What the commands that run a prompt set share: ``--prompts FILE``, ``--md`` and the per-example and aggregate
outputs (see pyinterp.analysis.prompts and pyinterp.analysis.stats)."""

from __future__ import annotations

import click

prompts_option = click.option(
    "--prompts", "prompts_path", default=None, type=click.Path(dir_okay=False), metavar="FILE",
    help="A prompt set (JSONL, or TSV with a header): run every row and report per-example values and their mean, "
         "standard deviation and bootstrap 95% interval.")
md_option = click.option("--md", "as_md", is_flag=True, help="Print tables as Markdown.")


def load_set(path: str, needs: tuple[str, ...]) -> list:
    """The examples of ``--prompts FILE`` that must have ``needs`` (see pyinterp.analysis.prompts)."""
    from pyinterp.analysis.prompts import load_prompts

    return load_prompts(path, needs)


def example_ids(model, path: str, examples: list, text_of=lambda e: e.text) -> list[list[int]]:
    """Each example's prompt as token ids; a prompt the model cannot run is an error naming ``FILE:LINE``."""
    from pyinterp.errors import InputError

    out = []
    for e in examples:
        try:
            out.append(model.prompt_ids(text_of(e)))
        except InputError as err:
            raise InputError(f"{path}:{e.line}: {err}") from None
    return out


def summary_cells(s, index: tuple, decimals: int) -> list[str]:
    """Mean, standard deviation and ``[low, high]`` of cell ``index`` of a :class:`~pyinterp.analysis.stats.Summary`."""
    return [f"{s.mean[index]:.{decimals}f}", f"{s.std[index]:.{decimals}f}",
            f"[{s.low[index]:.{decimals}f}, {s.high[index]:.{decimals}f}]"]


def print_table(title: str, header: list[str], rows: list[list], as_md: bool) -> None:
    """A titled table as aligned text, or as Markdown (``--md``)."""
    from pyinterp.analysis.stats import markdown_table

    if as_md:
        click.echo(f"**{title}**\n\n{markdown_table(header, rows)}\n")
        return
    cells = [[str(v) for v in row] for row in [header, *rows]]
    widths = [max(len(row[j]) for row in cells) for j in range(len(header))]
    click.echo(title)
    for row in cells:
        click.echo("  ".join(v.rjust(w) if j else v.ljust(w) for j, (v, w) in enumerate(zip(row, widths))).rstrip())
    click.echo("")
