"""The ablation-kind options shared by ``pyinterp -a`` and ``pyinterp sweep --heads``: ``--ablate-mode
zero|mean|resample``, ``--ablate-ref FILE`` (the reference prompt set), ``--ablate-over position|all`` (mean) and
``--ablate-seed N`` (resample)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import click

from pyinterp.analysis.ablation import MODES, reference_prompts


@dataclass(frozen=True)
class AblationOptions:
    """The options as given; :meth:`check` says which combinations mean nothing."""

    mode: str
    ref: str | None
    over: str | None
    seed: int | None

    @property
    def per_position(self) -> bool:
        return self.over != "all"

    def check(self, heads_given: bool, heads_option: str) -> None:
        """A one-line usage error for an option without what it goes with."""
        if self.mode != "zero" and not heads_given:
            raise click.UsageError(f"--ablate-mode goes with {heads_option}")
        if self.mode == "zero" and self.ref is not None:
            raise click.UsageError("--ablate-ref goes with --ablate-mode mean or resample")
        if self.mode != "zero" and self.ref is None:
            raise click.UsageError(f"--ablate-mode {self.mode} needs --ablate-ref FILE (the reference prompt set)")
        if self.over is not None and self.mode != "mean":
            raise click.UsageError("--ablate-over goes with --ablate-mode mean")
        if self.seed is not None and self.mode != "resample":
            raise click.UsageError("--ablate-seed goes with --ablate-mode resample")

    def prompts(self) -> list[str] | None:
        """The reference prompts (None for zero ablation)."""
        return None if self.ref is None else reference_prompts(self.ref)

    def describe(self) -> dict:
        """The ablation as the JSON output echoes it."""
        out: dict = {"mode": self.mode}
        if self.mode != "zero":
            out["reference"] = self.ref
        if self.mode == "mean":
            out["over"] = "all positions" if self.over == "all" else "each position"
        if self.mode == "resample":
            out["seed"] = self.seed or 0
        return out


def ablation_options(command: Callable) -> Callable:
    """Add the options to a click command function, which gets them as one ``ablation:`` :class:`AblationOptions`."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        opts = AblationOptions(*(kwargs.pop(k) for k in ("ablate_mode", "ablate_ref", "ablate_over", "ablate_seed")))
        return command(*args, ablation=opts, **kwargs)

    options = [
        click.option("--ablate-mode", type=click.Choice(MODES), default="zero", show_default=True,
                     help="How ablated heads are silenced: zero output, their mean output over --ablate-ref, or their "
                          "output in a prompt of --ablate-ref drawn at random."),
        click.option("--ablate-ref", type=click.Path(dir_okay=False), default=None, metavar="FILE",
                     help="Reference prompt set of mean and resample ablation: JSONL or TSV rows with a prompt."),
        click.option("--ablate-over", type=click.Choice(["position", "all"]), default=None,
                     help="Mean ablation: the mean at each position (default; the prompt's tokens), or over every "
                          "token of the set (every token, generated ones too)."),
        click.option("--ablate-seed", type=click.IntRange(0), default=None, metavar="N",
                     help="Resample ablation: the seed of the draw (default 0)."),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper
