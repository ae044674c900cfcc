"""Mean ablation: attention heads' outputs, or a tensor's rows, become their mean over a reference prompt set."""

from __future__ import annotations

from dataclasses import dataclass, field

from pyinterp.checks import check_bool
from pyinterp.engine.names import Head, as_list
from pyinterp.interventions.base import Op, Target
from pyinterp.interventions.reference import (Reference, check_reference, head_width, heads_by_layer, replace_heads,
                                              replace_rows, tensor_key)


@dataclass(frozen=True)
class MeanAblate:
    """``heads`` (``(layer, head)`` pairs) output, and the rows of ``tensors`` (``"l_out-5"`` or ``("l_out", 5)``)
    become, the mean of the same values over ``reference`` (a :class:`Reference` that captured ``kqv_heads-L``
    for the heads' layers and the tensors).

    ``per_position`` (default): position p takes the mean of position p over the reference prompts long enough
    to have one (a run longer than the longest reference prompt is an InputError); the prompt's positions only,
    not generated tokens. Else one mean over every token of every reference prompt (the BOS too), at every
    token, generated ones included."""

    reference: Reference = field(compare=False)
    heads: tuple[Head, ...] = ()
    tensors: tuple[str | tuple[str, int], ...] = ()
    per_position: bool = True

    def ops(self, target: Target) -> list[Op]:
        what = "mean ablation"
        reference = check_reference(self.reference, what)
        per_position = check_bool(self.per_position, "per_position")
        n = target.n_tokens
        out: list[Op] = []
        for layer, heads in heads_by_layer(target, self.heads, self.tensors, what).items():
            label = f"{what} of {layer}:{heads[0]}"
            mean = reference.mean(("kqv_heads", layer), head_width(target), n, per_position, label)
            out += replace_heads(target, layer, heads, mean)
        for spec in as_list(self.tensors, "capture"):
            name, layer, width = tensor_key(target, spec, what)
            mean = reference.mean((name, layer), width, n, per_position, f"{what} of {name}-{layer}")
            out += replace_rows(target, name, layer, mean)
        return out
