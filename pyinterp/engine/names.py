"""A model's tensor table, and the checks every intervention makes against it (:class:`Planner`).

Tensor names are llama.cpp's (``"l_out"`` on every layer, ``"l_out-5"`` on one); TransformerLens hook
names (``"blocks.5.hook_resid_post"``) are accepted through the architecture's alias table.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from pyinterp.errors import InputError

# tensors the explicit attention path adds; they exist on every layer once asked for
ATTENTION_TENSORS = ("attn_scores", "attn_logits")

_NAME_LAYER = re.compile(r"^(?P<name>.+)-(?P<layer>\d+)$")
_TL_BLOCK = re.compile(r"^blocks\.(?P<layer>\d+)\.(?P<hook>.+)$")  # TransformerLens: blocks.5.hook_resid_post

Head = tuple[int, int]
Patch = tuple[str, int, int, "np.ndarray | Sequence[float]"]
# tensors whose last axis is not the tokens': ops on chosen rows do not apply to them
NOT_ROW_MAJOR = ATTENTION_TENSORS


@dataclass(frozen=True)
class TensorInfo:
    """What a model's graph names: for each base name, the layers it appears on and its ggml shape."""

    layers: dict[str, frozenset[int]]      # base name -> layers (-1: outside the layers)
    shapes: dict[str, tuple[int, ...]]     # base name -> ggml ne of a 2-token probe, trailing 1s dropped

    def rank(self, name: str) -> int:
        return len(self.shapes[name])


# what each list-valued argument looks like, for its error message
EXAMPLES = {"capture": "['l_out', 'attn_scores-3']", "ablate": "[(3, 4)]", "patch": "[('l_out', 12, 5, vector)]",
            "layers": "[5, 6]", "positions": "[0, -1]", "interventions": "[AddVector('l_out', 5, vector)]", "targets": "[' Paris', 1234]"}


def as_list(value: object, what: str) -> list:
    """A list-valued argument (``what``: a key of EXAMPLES) as a list; a string, a number or None
    is an InputError showing the expected form."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise InputError(f"{what}: expected a list like {EXAMPLES[what]}, got {value!r}")
    return list(value)


def as_tuple(item: object, n: int, what: str, form: str) -> tuple:
    """``item`` (a tuple, list or 1-D array of ``n`` values) as a tuple; anything else is an InputError."""
    if isinstance(item, (str, bytes)) or not isinstance(item, (Sequence, np.ndarray)) or len(item) != n:
        raise InputError(f"{what}: expected {form}, got {item!r}")
    return tuple(item)


def split_name(spec: str) -> tuple[str, int | None]:
    """``"l_out-5"`` -> ``("l_out", 5)``; ``"l_out"`` -> ``("l_out", None)``."""
    m = _NAME_LAYER.match(spec)
    if m:
        return m.group("name"), int(m.group("layer"))
    return spec, None


class Planner:
    """Checks specs against one model and builds plans."""

    def __init__(self, n_layer: int, n_head: int, info: TensorInfo, aliases: dict[str, str] | None = None) -> None:
        self.n_layer = n_layer
        self.n_head = n_head
        self.info = info
        self.aliases = aliases or {}  # TransformerLens hook name -> llama.cpp tensor name (pyinterp.engine.arch)

    def _known(self, name: str) -> frozenset[int]:
        layers = self.info.layers.get(name)
        if layers is None:
            names = ", ".join(sorted(self.info.layers))
            raise InputError(f"unknown tensor name {name!r}; this model's graph has: {names}")
        return layers

    @staticmethod
    def _index(value: int, count: int, what: str, kind: str, owner: str) -> int:
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise InputError(f"{what}: {kind} must be an integer, got {value!r}")
        if not 0 <= value < count:
            raise InputError(f"{what}: {kind} {value} out of range ({owner} {count} {kind}s: 0..{count - 1})")
        return int(value)

    def layer(self, layer: int, what: str) -> int:
        return self._index(layer, self.n_layer, what, "layer", "the model has")

    def head(self, head: int, what: str) -> int:
        return self._index(head, self.n_head, what, "head", "layers have")

    def _alias(self, spec: str) -> str:
        """A TransformerLens hook name as the llama.cpp name it stands for: ``"blocks.5.hook_resid_post"`` ->
        ``"l_out-5"``, ``"attn.hook_pattern"`` -> ``"attn_scores"``, ``"blocks.5.hook_resid_pre"`` -> ``"l_out-4"``
        (block 0's: the embedding); any other spec as it is."""
        m = _TL_BLOCK.match(spec)
        if m and m.group("hook") == "hook_resid_pre" and "hook_embed" in self.aliases:
            layer = int(m.group("layer"))
            return self.aliases["hook_embed"] if layer == 0 else f"{self.aliases['hook_resid_post']}-{layer - 1}"
        if m and m.group("hook") in self.aliases:
            return f"{self.aliases[m.group('hook')]}-{m.group('layer')}"
        return self.aliases.get(spec, spec)

    def key(self, spec: str) -> tuple[str, int]:
        """The ``(name, layer)`` key a capture spec stands for, aliases resolved: ``"blocks.5.hook_resid_post"``
        and ``"l_out-5"`` -> ``("l_out", 5)``; a name outside the layers (``"embd"``) -> ``(name, -1)``."""
        name, layer = split_name(self._alias(spec))
        return name, -1 if layer is None else layer

    def attention_layer(self, layer: int, what: str) -> int:
        """A layer that has attention heads: the graph names their output ``kqv_heads`` on that layer (hybrid
        models have layers without attention, where a head mask would silently do nothing)."""
        layer = self.layer(layer, what)
        if layer not in self.info.layers.get("kqv_heads", frozenset()):
            raise InputError(f"{what}: layer {layer} has no attention heads in this model's graph")
        return layer

    def captures(self, specs: Iterable[str]) -> list[tuple[str, int]]:
        """``["attn_scores", "l_out-5"]`` -> ``[("attn_scores", 0), ..., ("l_out", 5)]``."""
        specs = [specs] if isinstance(specs, str) else as_list(specs, "capture")
        out: list[tuple[str, int]] = []
        for spec in specs:
            if not isinstance(spec, str):
                raise InputError(f"capture: expected tensor names like 'l_out' or 'l_out-5', got {spec!r}")
            name, layer = split_name(self._alias(spec))
            layers = self._known(name)
            if layer is None:
                out.extend((name, il) for il in sorted(layers))
                continue
            self.layer(layer, f"capture {spec!r}")
            if layer not in layers:
                raise InputError(f"capture {spec!r}: tensor {name!r} is not computed on layer {layer}")
            out.append((name, layer))
        return list(dict.fromkeys(out))

    @staticmethod
    def pair(item: object, what: str, form: str) -> tuple:
        """``item`` as a ``(layer, head)`` pair; anything else is an InputError showing ``form``."""
        return as_tuple(item, 2, what, form)

    def row_tensor(self, name: object, layer: int, what: str) -> tuple[str, int, int]:
        """``(name, layer, width)`` of a tensor whose last axis is the tokens', checked against the graph."""
        if not isinstance(name, str):
            raise InputError(f"{what}: the tensor name must be a string like 'l_out', got {name!r}")
        name = self._alias(name)
        layers = self._known(name)
        layer = self.layer(layer, f"{what} {name!r}")
        if layer not in layers:
            raise InputError(f"{what}: tensor {name!r} is not computed on layer {layer}")
        if name in NOT_ROW_MAJOR:
            raise InputError(f"{what}: {name!r} is not a [.., n_tokens] tensor; its rows cannot be chosen")
        return name, layer, int(np.prod(self.info.shapes[name][:-1]))

    @staticmethod
    def position(pos: object, n_tokens: int, what: str) -> int:
        """A position of the prompt (negative counts from the end)."""
        if not isinstance(pos, (int, np.integer)) or isinstance(pos, bool) or not -n_tokens <= pos < n_tokens:
            raise InputError(f"{what}: position {pos!r} out of range (the prompt has {n_tokens} tokens)")
        return int(pos) % n_tokens

    @staticmethod
    def vector(vector: object, width: int, what: str) -> np.ndarray:
        """``vector`` as ``[width]`` finite float32 values."""
        try:
            row = np.ascontiguousarray(np.asarray(vector, dtype=np.float32).reshape(-1))
        except (TypeError, ValueError):
            raise InputError(f"{what}: the vector must be {width} numbers, got {type(vector).__name__}") from None
        if row.shape[0] != width:
            raise InputError(f"{what}: vector has {row.shape[0]} values, the tensor's rows have {width}")
        if not np.all(np.isfinite(row)):
            raise InputError(f"{what}: vector has NaN or infinite values")
        return row

    def patch(self, name: object, layer: int, pos: object, vector: object, n_tokens: int) -> tuple[str, int, int, np.ndarray]:
        """A checked ``(name, layer, position, row)`` patch of a ``[n_tokens, width]`` tensor."""
        name, layer, width = self.row_tensor(name, layer, "patch")
        if self.info.rank(name) != 2:
            raise InputError(f"patch: {name!r} is not a [n_tokens, width] tensor (ggml shape {self.info.shapes[name]})")
        pos = self.position(pos, n_tokens, f"patch {name}-{layer}")
        return name, layer, pos, self.vector(vector, width, f"patch {name}-{layer}")
