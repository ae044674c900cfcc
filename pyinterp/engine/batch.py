"""Many variants of one prompt, each computing only what its interventions can change, each bit for bit a run
of its own.

Each variant is a list of interventions. A variant whose first intervened position is p cannot change
positions before p, so the prompt is decoded once, plainly, and a variant decodes only positions ``p..``
over the plain run's KV cells of positions ``0..p-1``. Likewise a variant whose first intervened layer is
L cannot change layers before L: the plain run keeps its residual stream after layer L-1, which is
injected there (``PI_OP_INJECT``), and layers 0..L-1 are not computed for the variant.

Batch invariance: a variant decodes alone, in the cells a run of its own would use. Variants go latest
start first; before one, the cache drops every cell of positions ``p..`` (the plain run's, which no later
variant needs, and the previous variant's), so the variant's tokens land in cells ``p..n-1``: the
attention of every layer sees the same cells, the same mask and the same KV length as :meth:`Model.run`,
and every sum over the cache adds the same terms in the same order. The other operations (matrix
products, norms, the activations' 8-bit quantization) work row by row or on blocks of :data:`ROW_BLOCK`
rows, so a variant starts at the block holding p (recomputing at most 3 unchanged rows) and its rows get
their values of the full run. The result is :meth:`Model.run`'s logits exactly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from pyinterp.engine.arch import ARCHS
from pyinterp.interventions import Intervention, Op

if TYPE_CHECKING:
    from pyinterp.model import Model

# llama.cpp's CPU kernels for repacked weights (Q4_0, Q4_K, IQ4_NL, ...) quantize and multiply the activations
# four rows at a time and the rows left over one by one, which rounds differently: a variant starts on a
# multiple of 4, so each of its rows is in the block it has in a full run
ROW_BLOCK = 4


def first_changed(ops: list[Op]) -> int:
    """The first prompt position ``ops`` can change: the least of their positions, 0 for an op on every token."""
    firsts = [0 if op.positions is None else min(op.positions) for op in ops if op.kind != "capture"]
    return min(firsts, default=0)


def first_layer(ops: list[Op]) -> int:
    """The first layer ``ops`` can change: the least of their layers, 0 for none or one outside the layers."""
    layers = [op.layer for op in ops if op.kind != "capture"]
    return 0 if not layers or min(layers) < 0 else min(layers)


def run_variants(model: Model, prompt: str | Sequence[int], variants: Sequence[Sequence[Intervention]],
                 on_variant: Callable[[], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The last token's logits of the plain prompt ``[n_vocab]`` and of each variant ``[n_variants, n_vocab]``.

    Every variant also has the interventions of the model's context managers, as the plain run does.
    Each row equals the last row of ``Model.run(prompt, interventions=variant).logits`` bit for bit.
    ``on_variant`` is called once per variant done (progress). Holds the model's lock throughout.
    """
    engine = model.engine
    engine.check_live()
    ids = model.prompt_ids(prompt)
    with engine.lock:
        engine.check_live()
        return _run_locked(model, ids, variants, on_variant)


def _run_locked(model: Model, ids: list[int], variants: Sequence[Sequence[Intervention]],
                on_variant: Callable[[], None] | None) -> tuple[np.ndarray, np.ndarray]:
    n = len(ids)
    b = model.engine.backend
    base_ops, _, _ = model.engine.compile(n, [], ())
    # each variant's ops as Model.run compiles them (the context managers' first)
    compiled = [model.engine.compile(n, list(v), ())[0] for v in variants]
    arch = ARCHS.get(model.arch)
    starts = [first_changed(ops[len(base_ops):]) // ROW_BLOCK * ROW_BLOCK for ops in compiled]
    # the first layer each variant computes: where the plain run's residual stream is injected
    layers = [first_layer(ops[len(base_ops):]) if arch else 0 for ops in compiled]
    last_layer = any(model.engine.needs_every_row(ops) for ops in compiled)
    out = np.empty((len(variants), model.n_vocab), dtype=np.float32)
    injected = sorted({layer for layer in layers if layer > 0})
    try:
        keep = [Op("capture", arch.residual, layer - 1) for layer in injected] if arch else []
        indices = model.engine.set_plan(base_ops + keep, set())[len(base_ops):]
        b.clear_memory()
        b.decode([ids], [0], 0, False)
        plain = b.logits(1)[0]
        residual = {layer: b.op_result(i, 2) for layer, i in zip(injected, indices)}  # [n_tokens, n_embd]
        # latest start first: the plain run's cells a variant drops are never needed again
        for i in sorted(range(len(variants)), key=lambda i: (-starts[i], layers[i])):
            inject = [Op("inject", arch.residual, layers[i] - 1, data=residual[layers[i]], per_row=True)] if layers[i] else []
            ops = compiled[i][:len(base_ops)] + inject + compiled[i][len(base_ops):]
            out[i] = _decode_variant(model, ids, starts[i], ops, last_layer)
            if on_variant is not None:
                on_variant()
    finally:
        b.clear_plan()
        b.clear_memory()
    return plain, out


def _decode_variant(model: Model, ids: list[int], start: int, ops: list[Op], last_layer: bool) -> np.ndarray:
    """The last token's logits ``[n_vocab]`` of ``ids`` decoded from position ``start`` on under ``ops``, over the
    cache's cells of positions ``0..start-1`` (cells of later positions are dropped first, so the new tokens
    take cells ``start..``, where a run of its own puts them)."""
    b = model.engine.backend
    b.drop_positions(0, start)
    model.engine.set_plan(ops, set())
    b.decode([ids[start:]], [0], start, last_layer)
    return b.logits(len(ids) - start if last_layer else 1)[-1]
