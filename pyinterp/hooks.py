"""Interventions and captures: user specs checked against a model's graph, turned into a plan.

A plan is what the native graph-build hook does during one decode:
- capture: keep named tensors (``"l_out"`` on every layer, ``"l_out-5"`` on one) as graph outputs;
- head masks: per layer, multiply the attention weights of silenced heads by 0 (MIA's ablation);
- patches: replace one token's row of a named tensor with a given vector.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from collections.abc import Iterable, Sequence

import numpy as np

from .errors import InputError

# tensors the explicit attention path adds; they exist on every layer once asked for
ATTENTION_TENSORS = ("attn_scores", "attn_logits")

_NAME_LAYER = re.compile(r"^(?P<name>.+)-(?P<layer>\d+)$")
_TL_BLOCK = re.compile(r"^blocks\.(?P<layer>\d+)\.(?P<hook>.+)$")  # TransformerLens: blocks.5.hook_resid_post

Head = tuple[int, int]
Patch = tuple[str, int, int, "np.ndarray | Sequence[float]"]


@dataclass(frozen=True)
class TensorInfo:
    """What a model's graph names: for each base name, the layers it appears on and its ggml shape."""

    layers: dict[str, frozenset[int]]      # base name -> layers (-1: outside the layers)
    shapes: dict[str, tuple[int, ...]]     # base name -> ggml ne of a 2-token probe, trailing 1s dropped

    def rank(self, name: str) -> int:
        return len(self.shapes[name])


# what each list-valued argument looks like, for its error message
EXAMPLES = {"capture": "['l_out', 'attn_scores-3']", "ablate": "[(3, 4)]", "patch": "[('l_out', 12, 5, vector)]",
            "layers": "[5, 6]"}


def as_list(value: object, what: str) -> list:
    """A list-valued argument (``what``: a key of EXAMPLES) as a list; a string, a number or None
    is an InputError showing the expected form."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise InputError(f"{what}: expected a list like {EXAMPLES[what]}, got {value!r}")
    return list(value)


def _tuple(item: object, n: int, what: str, form: str) -> tuple:
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


@dataclass
class Plan:
    captures: list[tuple[str, int]] = field(default_factory=list)
    head_masks: dict[int, np.ndarray] = field(default_factory=dict)
    patches: list[tuple[str, int, int, np.ndarray]] = field(default_factory=list)

    def touches_layer(self, layer: int) -> bool:
        """Whether the plan captures or patches a tensor of ``layer``."""
        return any(il == layer for _, il in self.captures) or any(il == layer for _, il, _, _ in self.patches)

    @property
    def explicit_layers(self) -> set[int]:
        """Layers that must run the explicit attention path to expose their weights."""
        return {il for name, il in self.captures if name in ATTENTION_TENSORS}


class Planner:
    """Checks specs against one model and builds plans."""

    def __init__(self, n_layer: int, n_head: int, info: TensorInfo, aliases: dict[str, str] | None = None) -> None:
        self.n_layer = n_layer
        self.n_head = n_head
        self.info = info
        self.aliases = aliases or {}  # TransformerLens hook name -> llama.cpp tensor name (pyinterp.arch)

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

    def _layer(self, layer: int, what: str) -> int:
        return self._index(layer, self.n_layer, what, "layer", "the model has")

    def _head(self, head: int, what: str) -> int:
        return self._index(head, self.n_head, what, "head", "layers have")

    def _alias(self, spec: str) -> str:
        """A TransformerLens hook name as the llama.cpp name it stands for: ``"blocks.5.hook_resid_post"`` ->
        ``"l_out-5"``, ``"attn.hook_pattern"`` -> ``"attn_scores"``; any other spec as it is."""
        m = _TL_BLOCK.match(spec)
        if m and m.group("hook") in self.aliases:
            return f"{self.aliases[m.group('hook')]}-{m.group('layer')}"
        return self.aliases.get(spec, spec)

    def _attention_layer(self, layer: int, what: str) -> int:
        """A layer that has attention heads: the graph names their output ``kqv_heads`` on that layer (hybrid
        models have layers without attention, where a head mask would silently do nothing)."""
        layer = self._layer(layer, what)
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
            self._layer(layer, f"capture {spec!r}")
            if layer not in layers:
                raise InputError(f"capture {spec!r}: tensor {name!r} is not computed on layer {layer}")
            out.append((name, layer))
        return list(dict.fromkeys(out))

    def head_masks(self, ablate: Iterable[Head], isolate: Head | None) -> dict[int, np.ndarray]:
        """Per-layer multipliers: 0 for ablated heads, and for every head but the isolated one."""
        masks: dict[int, np.ndarray] = {}

        def mask(layer: int) -> np.ndarray:
            return masks.setdefault(layer, np.ones(self.n_head, dtype=np.float32))

        for item in ablate:
            layer, head = _tuple(item, 2, "ablate", "(layer, head) pairs like [(3, 4)]")
            mask(self._attention_layer(layer, "ablate"))[self._head(head, "ablate")] = 0.0
        if isolate is not None:
            layer, head = _tuple(isolate, 2, "isolate", "(layer, head) like (3, 4)")
            layer = self._attention_layer(layer, "isolate")
            head = self._head(head, "isolate")
            m = mask(layer)
            keep = m[head]
            m[:] = 0.0
            m[head] = keep
        return masks

    def patches(self, patch: Iterable[Patch], n_tokens: int) -> list[tuple[str, int, int, np.ndarray]]:
        """Check (name, layer, position, vector) items against the graph and the prompt length."""
        out = []
        for item in patch:
            name, layer, pos, vector = _tuple(item, 4, "patch", "(name, layer, position, vector) tuples")
            if not isinstance(name, str):
                raise InputError(f"patch: the tensor name must be a string like 'l_out', got {name!r}")
            layers = self._known(name)
            layer = self._layer(layer, f"patch {name!r}")
            if layer not in layers:
                raise InputError(f"patch: tensor {name!r} is not computed on layer {layer}")
            if self.info.rank(name) != 2:
                raise InputError(f"patch: {name!r} is not a [n_tokens, width] tensor (ggml shape {self.info.shapes[name]})")
            if not isinstance(pos, (int, np.integer)) or isinstance(pos, bool) or not -n_tokens <= pos < n_tokens:
                raise InputError(f"patch {name}-{layer}: position {pos!r} out of range (the prompt has {n_tokens} tokens)")
            width = self.info.shapes[name][0]
            try:
                row = np.ascontiguousarray(np.asarray(vector, dtype=np.float32).reshape(-1))
            except (TypeError, ValueError):
                raise InputError(f"patch {name}-{layer}: the vector must be {width} numbers, got {type(vector).__name__}") from None
            if row.shape[0] != width:
                raise InputError(f"patch {name}-{layer}: vector has {row.shape[0]} values, the tensor's rows have {width}")
            if not np.all(np.isfinite(row)):
                raise InputError(f"patch {name}-{layer}: vector has NaN or infinite values")
            out.append((name, layer, int(pos) % n_tokens, row))
        return out
