"""Resample ablation: attention heads' outputs, or a tensor's rows, become those of another prompt drawn from a
reference prompt set."""

from __future__ import annotations

from dataclasses import dataclass, field

from pyinterp.checks import check_int
from pyinterp.engine.names import Head, as_list
from pyinterp.interventions.base import Op, Target
from pyinterp.interventions.reference import (Reference, check_reference, head_width, heads_by_layer, replace_heads,
                                              replace_rows, tensor_key)


@dataclass(frozen=True)
class ResampleAblate:
    """``heads`` (``(layer, head)`` pairs) output, and the rows of ``tensors`` (``"l_out-5"`` or ``("l_out", 5)``)
    become, their values in one prompt of ``reference`` drawn with ``seed`` among the prompts at least as long as
    the run (position p takes the drawn prompt's position p; its later positions are not used; no prompt that long
    is an InputError). Every head and tensor of one object takes the same drawn prompt. The prompt's positions
    only, not generated tokens. A set that holds the run's own prompt: ``reference.without(ids)`` first."""

    reference: Reference = field(compare=False)
    heads: tuple[Head, ...] = ()
    tensors: tuple[str | tuple[str, int], ...] = ()
    seed: int = 0

    def drawn(self, n_tokens: int) -> int:
        """The index in ``reference.ids`` of the prompt a run of ``n_tokens`` tokens takes its values from."""
        return check_reference(self.reference, "resample ablation").draw(n_tokens, check_int(self.seed, "seed", 0, None),
                                                                          "resample ablation")

    def ops(self, target: Target) -> list[Op]:
        what = "resample ablation"
        reference = check_reference(self.reference, what)
        n = target.n_tokens
        heads = [(layer, hs, reference.rows(("kqv_heads", layer), head_width(target), f"{what} of {layer}:{hs[0]}"))
                 for layer, hs in heads_by_layer(target, self.heads, self.tensors, what).items()]
        rows = []
        for spec in as_list(self.tensors, "capture"):
            name, layer, width = tensor_key(target, spec, what)
            rows.append((name, layer, reference.rows((name, layer), width, f"{what} of {name}-{layer}")))
        i = self.drawn(n)  # once every tensor is known to be in the reference at the model's width
        return [*(op for layer, hs, arrays in heads for op in replace_heads(target, layer, hs, arrays[i][:n])),
                *(op for name, layer, arrays in rows for op in replace_rows(target, name, layer, arrays[i][:n]))]
