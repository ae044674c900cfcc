"""Direct logit attribution: how much each term of the residual stream, and each attention head, adds to
one logit, computed inside the ggml graph."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from pyinterp.analysis.lens import resolve_target
from pyinterp.checks import check_bool, check_int
from pyinterp.engine.arch import arch_of
from pyinterp.engine.readouts import AttributionReadout
from pyinterp.errors import InputError, PyinterpError

if TYPE_CHECKING:
    import os
    from pathlib import Path

    from pyinterp.engine.core import ModelLike



@dataclass
class Attribution:
    """Direct logit attribution of one target token at one position (see :func:`logit_attribution`).

    ``values[i]`` is the contribution of the residual term ``labels[i]`` (the embedding, then each layer's
    attention and FFN outputs); ``attn``/``ffn`` are the same per layer (``[n_layer]``). They add up to
    ``logit``, the model's own logit for the target, up to rounding. ``heads`` (``[n_layer, n_head]``, or None
    when not asked for) splits each layer's attention term by head: a layer's heads add up to its ``attn``
    less the output projection's bias, where the model has one.
    """

    target: int
    target_str: str
    position: int
    logit: float
    labels: list[str]
    values: np.ndarray
    attn: np.ndarray
    ffn: np.ndarray
    embed: float
    heads: np.ndarray | None = None

    def to_png(self, path: str | os.PathLike) -> Path:
        """Write layers (0 at the bottom) x heads, and beside them each layer's attention and FFN terms, as two
        heatmaps on diverging scales centred on 0, each cell labelled with its value. The heads and the
        layer totals each have their own symmetric scale (``±max|v|`` over that block) and colour bar: a
        large FFN or attention total would otherwise leave every head white."""
        from pyinterp.viz.grids import signed_grid
        from pyinterp.viz.plot import save_png

        if self.heads is None:
            raise InputError("this attribution was not split by head (heads=False)")
        n_layer, n_head = self.heads.shape
        values = np.concatenate([self.heads, self.attn[:, None], self.ffn[:, None]], axis=1)
        image = signed_grid(values, title=f"direct logit attribution of {self.target_str!r} at position {self.position} "
                                          f"(logit {self.logit:.2f}); heads and layer totals on separate scales",
                            row_labels=[str(il) for il in range(n_layer)],
                            col_labels=[f"h{h}" for h in range(n_head)] + ["attn", "ffn"],
                            blocks=[(0, n_head, "heads", "head"), (n_head, n_head + 2, "layer totals", "term")],
                            unit="logit", row_name="layer")
        return save_png(image, path)


def logit_attribution(model: ModelLike, tokens_or_text: str | Sequence[int], target: int | str | None = None,
                      position: int = -1, heads: bool = True) -> Attribution:
    """Direct logit attribution: how much each term of the residual stream adds to one logit.

    The residual stream at the last layer is the embedding plus every layer's attention and FFN outputs
    (``attn_out``/``ffn_out``; Gemma's post-norms); each term goes through the final RMS norm with its
    scale frozen at the final residual's and through the target's unembedding row, inside the graph. The
    terms add up to the target's logit (before a final soft-capping, as Gemma 2's). ``heads``: also split
    each attention term by head, each head's output through its slice of the output projection (and
    Gemma's post-norm, its scale frozen too). ``target``: a token id or single-token text; default the
    model's top prediction at ``position``. Interventions of the context managers apply.
    """
    engine = model.engine
    engine.check_live()
    if engine.steering:
        raise InputError("logit attribution under a control vector: its directions are a residual term the attribution lacks")
    ids = model.prompt_ids(tokens_or_text)
    check_int(position, "position")
    check_bool(heads, "heads")
    if not -len(ids) <= position < len(ids):
        raise InputError(f"position {position} out of range (the prompt has {len(ids)} tokens)")
    position = int(position) % len(ids)
    arch = arch_of(model.arch)
    info = model.tensor_info()
    missing = [n for n in arch.residual_terms if n not in info.layers]
    if missing:
        raise PyinterpError(f"logit attribution: the graph of {model.arch} has no {', '.join(missing)}")
    terms = [(arch.embedding, -1)] + [(name, il) for il in range(model.n_layer) for name in (arch.attn_term, arch.ffn_term)]
    by_head = [heads and name == arch.attn_term and il >= 0 for name, il in terms]
    if target is None:
        target = int(np.argmax(engine.run(ids).logits[position]))
    target = resolve_target(model, target)
    done = engine.run(ids, readout=AttributionReadout(terms, by_head, target))
    values, split = done.readout
    values = np.array([term[position] for term in values], dtype=np.float32)
    return Attribution(
        target=target, target_str=model.token_str(target), position=position, logit=float(done.logits[position, target]),
        labels=[name if il < 0 else f"{name}-{il}" for name, il in terms], values=values,
        attn=values[1::2].copy(), ffn=values[2::2].copy(), embed=float(values[0]),
        heads=np.stack([split[i][position] for i in sorted(split)]) if heads else None,
    )
