"""Head ablation of a kind: zero (the attention weights zeroed), mean (the heads' mean output over a reference
prompt set) or resample (their output in another prompt of the set), as intervention objects for a run, a
generation or a head scan (:func:`pyinterp.analysis.patching.head_ablation_scan`), and the reference set read
from a prompt-set file (``pyinterp.analysis.prompts``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

from pyinterp.analysis.prompts import load_prompts
from pyinterp.engine.names import Head, as_list
from pyinterp.errors import InputError
from pyinterp.interventions import AblateHeads, Intervention, MeanAblate, Reference, ResampleAblate, Target
from pyinterp.interventions.reference import heads_by_layer

if TYPE_CHECKING:
    from pyinterp.engine.core import ModelLike

MODES = ("zero", "mean", "resample")
RefLike = Reference | Iterable[str | Sequence[int]] | None


def reference_prompts(path: str | Path) -> list[str]:
    """The prompts of a prompt-set file (:func:`pyinterp.analysis.prompts.load_prompts`: JSONL or TSV, every row
    with a ``prompt``); an empty file or a bad row is an InputError naming it."""
    return [example.prompt for example in load_prompts(path, needs=["prompt"])]


def head_reference(model: ModelLike, reference: RefLike, layers: Iterable[int], mode: str) -> Reference:
    """``reference`` (a :class:`Reference`, or prompts captured here: every head output of ``layers``)."""
    if reference is None:
        raise InputError(f"{mode} ablation needs a reference prompt set")
    if isinstance(reference, Reference):
        return reference
    return Reference.capture(model, reference, [f"kqv_heads-{il}" for il in sorted(set(layers))])


def head_ablation(model: ModelLike, heads: Iterable[Head], mode: str = "zero", reference: RefLike = None,
                  ids: Sequence[int] | None = None, per_position: bool = True, seed: int = 0) -> Intervention:
    """One intervention ablating ``heads`` (``(layer, head)`` pairs) by ``mode`` (see the module); ``reference``
    for mean and resample: a :class:`Reference` or prompts. Resampling for the prompt ``ids`` leaves that
    prompt out of the set."""
    heads = tuple(tuple(h) if isinstance(h, list) else h for h in as_list(heads, "ablate"))
    if mode not in MODES:
        raise InputError(f"ablation mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "zero":
        if reference is not None:
            raise InputError("zero ablation takes no reference prompt set")
        return AblateHeads(heads)
    layers = heads_by_layer(Target(model.engine.planner(), 1), heads, (), f"{mode} ablation")
    ref = head_reference(model, reference, layers, mode)
    if mode == "mean":
        return MeanAblate(ref, heads=heads, per_position=per_position)
    if ids is not None and tuple(ids) in ref.ids:
        ref = ref.without(ids)
    return ResampleAblate(ref, heads=heads, seed=seed)
