"""Many variants of one prompt in a few decodes.

Each variant is a list of interventions run on its own llama.cpp sequence; up to :data:`MAX_VARIANTS`
variants share one ``llama_decode`` (the weights are read once for all of them). A variant whose first
intervened position is p cannot change positions before p, so the prompt is decoded once, plainly, and
each variant copies that run's KV cells of positions ``0..p-1`` (``llama_memory_seq_cp``: the cells are
shared, not duplicated) and decodes only positions ``p..``. Likewise a variant whose first intervened layer
is L cannot change layers before L: the plain run keeps its residual stream after layer L-1, which is
injected there (``PI_OP_INJECT``), and layers 0..L-1 are not computed for the variant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from .arch import ARCHS
from .errors import PyinterpError
from .interventions import Intervention, Op

if TYPE_CHECKING:
    from .model import Model

MAX_VARIANTS = 32  # per decode: their ops must fit the graph llama.cpp allocates


def first_changed(ops: list[Op]) -> int:
    """The first prompt position ``ops`` can change: the least of their positions, 0 for an op on every token."""
    firsts = [0 if op.positions is None else min(op.positions) for op in ops if op.kind != "capture"]
    return min(firsts, default=0)


def first_layer(ops: list[Op]) -> int:
    """The first layer ``ops`` can change: the least of their layers, 0 for none or one outside the layers."""
    layers = [op.layer for op in ops if op.kind != "capture"]
    return 0 if not layers or min(layers) < 0 else min(layers)


def _pack(items: list[int], sizes: list[int], room: int, most: int) -> list[list[int]]:
    """``items`` in order, in chunks of at most ``most`` whose ``sizes`` (KV cells) add up to at most ``room``
    (a chunk holds at least one item)."""
    chunks: list[list[int]] = []
    used = room + 1
    for item, size in zip(items, sizes):
        if used + size > room or len(chunks[-1]) == most:
            chunks.append([])
            used = 0
        chunks[-1].append(item)
        used += size
    return chunks


def run_variants(model: Model, prompt: str | Sequence[int], variants: Sequence[Sequence[Intervention]],
                 on_variant: Callable[[], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The last token's logits of the plain prompt ``[n_vocab]`` and of each variant ``[n_variants, n_vocab]``.

    Every variant also has the interventions of the model's context managers, as the plain run does.
    Results equal one :meth:`Model.run` per variant up to float rounding. ``on_variant`` is called once per
    variant done (progress). Holds the model's lock throughout.
    """
    model._live()
    ids = model.prompt_ids(prompt)
    with model._lock:
        model._live()
        return _run_locked(model, ids, variants, on_variant)


def _run_locked(model: Model, ids: list[int], variants: Sequence[Sequence[Intervention]],
                on_variant: Callable[[], None] | None) -> tuple[np.ndarray, np.ndarray]:
    n = len(ids)
    b = model._backend
    base_ops, _, _ = model._compile(n, [], ())
    compiled = [model._compile(n, list(v), ())[0][len(base_ops):] for v in variants]
    arch = ARCHS.get(model.arch)
    starts = [first_changed(ops) for ops in compiled]
    # the first layer each variant computes: where the plain run's residual stream is injected
    layers = [first_layer(ops) if arch else 0 for ops in compiled]
    last_layer = any(model._needs_every_row(ops) for ops in compiled)
    out = np.empty((len(variants), model.n_vocab), dtype=np.float32)
    injected = sorted({layer for layer in layers if layer > 0})
    try:
        keep = [Op("capture", arch.residual, layer - 1) for layer in injected] if arch else []
        indices = model._set_plan(base_ops + keep, set())[len(base_ops):]
        b.clear_memory()
        b.decode([ids], [0], 0, False)
        plain = b.logits(1)[0]
        residual = {layer: b.op_result(i, 2) for layer, i in zip(injected, indices)}  # [n_tokens, n_embd]
        for layer in sorted(set(layers)):
            group = sorted((i for i, x in enumerate(layers) if x == layer), key=lambda i: starts[i])
            inject = [Op("inject", arch.residual, layer - 1, data=residual[layer], per_row=True)] if layer else []
            for chunk in _pack(group, [n - starts[i] for i in group], model.n_ctx - n,
                               min(MAX_VARIANTS, b.n_seq_max - 1)):
                _decode_chunk(model, ids, [starts[i] for i in chunk], chunk, variants, base_ops + inject, last_layer,
                              out)
                if on_variant is not None:
                    for _ in chunk:
                        on_variant()
    finally:
        b.clear_plan()
        b.clear_memory()
    return plain, out


def _decode_chunk(model: Model, ids: list[int], starts: list[int], chunk: list[int],
                  variants: Sequence[Sequence[Intervention]], base_ops: list[Op], last_layer: bool, out: np.ndarray) -> None:
    """Decode the variants in ``chunk`` (sequences 1..), variant ``chunk[j]`` from position ``starts[j]`` on, in one
    batch, their logits into ``out``; a chunk whose ops do not fit the graph is split in two."""
    b = model._backend
    n = len(ids)
    seqs = list(range(1, len(chunk) + 1))
    ops = list(base_ops)
    for seq, i in zip(seqs, chunk):
        target = model._target(n, set(), seq)
        ops += [op for iv in variants[i] for op in iv.ops(target)]
    model._set_plan(ops, set())
    for seq, start in zip(seqs, starts):
        b.copy_sequence(0, seq, start)
    try:
        b.decode([ids[start:] for start in starts], seqs, starts, last_layer)
    except PyinterpError as e:
        if "no room" not in str(e) or len(chunk) == 1:
            raise
        for seq in seqs:
            b.drop_sequence(seq)
        half = len(chunk) // 2
        _decode_chunk(model, ids, starts[:half], chunk[:half], variants, base_ops, last_layer, out)
        _decode_chunk(model, ids, starts[half:], chunk[half:], variants, base_ops, last_layer, out)
        return
    if last_layer:
        lengths = [n - start for start in starts]
        out[chunk] = b.logits(sum(lengths))[np.cumsum(lengths) - 1]  # each sequence's last row
    else:
        out[chunk] = b.logits(len(chunk))
    for seq in seqs:
        b.drop_sequence(seq)
