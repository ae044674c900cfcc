"""Steering with llama.cpp's control vectors: the GGUF files ``llama-cvector-generator`` writes and
``llama-cli --control-vector`` reads, applied in the graph by llama.cpp itself, and built from prompt pairs.

The facts of the format and of its use (llama.cpp ``common_control_vector_load``, ``llama_adapter_cvec``,
``tools/cvector-generator``):

- a GGUF file with ``general.architecture`` ``"controlvector"``, ``controlvector.model_hint`` (the
  architecture it was made for, e.g. ``"llama"``) and ``controlvector.layer_count`` (how many directions it
  holds); tensors ``direction.L``, 1-D F32 ``[n_embd]``, L >= 1 (``direction.0`` is an error);
- ``direction.L`` is added to every token's row of the output of layer L, counting layers from 0 as the
  graph does: the tensor named ``l_out-L`` is the residual stream after layer L *plus* the direction, so
  captures and patches of ``l_out-L`` see the steered values. Layer 0 is never steered;
- several files (and several tensors of one layer) are summed, each file times its scale; the layer
  range ``START END`` (inclusive) keeps the directions of those layers only.

``llama-cvector-generator`` computes ``direction.L`` from the residual *entering* layer L (``l_out-(L-1)``);
:func:`contrastive` measures it where it is added, ``l_out-L``.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence, Union

import numpy as np

from pyinterp.checks import check_finite, check_float, check_int, is_int, show
from pyinterp.engine.names import as_list
from pyinterp.errors import InputError, PyinterpError
from pyinterp.io.atomic import atomic_path, check_complete

if TYPE_CHECKING:
    from pyinterp.model import Model

ARCH = "controlvector"
DIRECTION = re.compile(r"direction\.(\d+)")
METHODS = ("mean", "pca")
TOKENS = ("last", "mean")
LLAMA_MAX_LAYERS = 512  # llama.cpp's LLAMA_MAX_LAYERS: no model has a layer beyond


@dataclass(frozen=True, eq=False)
class ControlVector:
    """Directions to add to the residual stream: ``directions`` ``[n_layer, n_embd]`` float32, row L added to
    ``l_out-L``; ``layers`` the rows present (the others are zero and not written), each >= 1.

    ``cv * 2.0``, ``2.0 * cv`` scale it, ``cv + other`` sums two (rows present in either).
    """

    directions: np.ndarray
    layers: tuple[int, ...]
    model_hint: str = ""

    def __post_init__(self) -> None:
        d = self.directions
        if not isinstance(d, np.ndarray) or d.ndim != 2 or d.dtype != np.float32:
            got = f"{d.dtype} {d.shape}" if isinstance(d, np.ndarray) else show(d)
            raise InputError(f"directions must be a [n_layer, n_embd] float32 array, got {got}")
        check_finite(d, "control vector directions")
        if not all(is_int(il) for il in self.layers) or 0 in self.layers or any(not 0 < il < d.shape[0] for il in self.layers):
            raise InputError(f"control vector layers must be in 1..{d.shape[0] - 1} (llama.cpp never steers "
                             f"layer 0), got {list(self.layers)}")

    @classmethod
    def from_layers(cls, vectors: dict[int, np.ndarray], model_hint: str = "") -> "ControlVector":
        """A control vector from ``{layer: [n_embd] vector}``."""
        if not vectors:
            raise InputError("a control vector needs at least one layer")
        layers = [check_int(il, "control vector layer", 1, None) for il in vectors]
        if max(layers) >= LLAMA_MAX_LAYERS:
            raise InputError(f"control vector layer {max(layers)} is beyond llama.cpp's {LLAMA_MAX_LAYERS} layers")
        n_embd = {np.asarray(v).shape for v in vectors.values()}
        if len(n_embd) != 1 or len(next(iter(n_embd))) != 1:
            raise InputError(f"control vector directions must be 1-D of one width, got shapes {sorted(n_embd)}")
        directions = np.zeros((max(layers) + 1, next(iter(n_embd))[0]), dtype=np.float32)
        for il, v in zip(layers, vectors.values()):
            directions[il] = check_finite(v, f"control vector direction {il}")
        return cls(directions, tuple(sorted(layers)), model_hint)

    @property
    def n_embd(self) -> int:
        return self.directions.shape[1]

    def __mul__(self, scale: float) -> "ControlVector":
        scale = check_float(scale, "control vector scale")
        with np.errstate(over="ignore"):  # a product beyond float32: the directions' check says so
            directions = (self.directions * np.float32(scale)).astype(np.float32)
        return ControlVector(directions, self.layers, self.model_hint)

    __rmul__ = __mul__

    def __add__(self, other: "ControlVector") -> "ControlVector":
        if not isinstance(other, ControlVector):
            return NotImplemented
        if other.n_embd != self.n_embd:
            raise InputError(f"control vectors of different widths: n_embd {self.n_embd} and {other.n_embd}")
        if self.model_hint and other.model_hint and self.model_hint != other.model_hint:
            raise InputError(f"control vectors for different architectures: {self.model_hint} and {other.model_hint}")
        n = max(self.directions.shape[0], other.directions.shape[0])
        directions = np.zeros((n, self.n_embd), dtype=np.float32)
        directions[: self.directions.shape[0]] += self.directions
        directions[: other.directions.shape[0]] += other.directions
        return ControlVector(directions, tuple(sorted({*self.layers, *other.layers})), self.model_hint or other.model_hint)

    def save(self, path: str | os.PathLike) -> Path:
        """Write llama.cpp's control-vector GGUF: one ``direction.L`` F32 tensor per layer present, whole or not
        at all (see :mod:`pyinterp.io.atomic`)."""
        import gguf

        path = Path(path)
        try:
            with atomic_path(path) as tmp:
                writer = gguf.GGUFWriter(tmp, ARCH)
                writer.add_string(f"{ARCH}.model_hint", self.model_hint)
                writer.add_int32(f"{ARCH}.layer_count", len(self.layers))
                for il in self.layers:
                    writer.add_tensor(f"direction.{il}", np.ascontiguousarray(self.directions[il]))
                try:
                    writer.write_header_to_file()
                    writer.write_kv_data_to_file()
                    writer.write_tensors_to_file()
                    check_complete(writer.fout[0])
                finally:
                    writer.close()
        except OSError as e:
            raise PyinterpError(f"cannot write control vector {path}: {e.strerror or e}") from None
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, scale: float = 1.0) -> "ControlVector":
        """Read a control-vector GGUF as llama.cpp does (tensors of one layer summed), times ``scale``.
        Raises :class:`InputError` with one line for a missing file or one that is not a control vector."""
        import gguf

        path = Path(path)
        try:
            reader = gguf.GGUFReader(path)
        except OSError as e:
            raise InputError(f"cannot read control vector {path}: {e.strerror or e}") from None
        except (ValueError, IndexError, KeyError) as e:
            raise InputError(f"{path} is not a GGUF file ({e})") from None
        arch = reader.get_field("general.architecture")
        arch = arch.contents() if arch is not None else None
        if arch != ARCH:
            raise InputError(f"{path} is not a control vector (general.architecture is {arch!r}, not {ARCH!r})")
        hint = reader.get_field(f"{ARCH}.model_hint")
        vectors: dict[int, np.ndarray] = {}
        for t in reader.tensors:
            match = DIRECTION.fullmatch(t.name)
            if match is None or int(match.group(1)) == 0:
                raise InputError(f"{path}: tensor {t.name!r} is not a direction.L with L >= 1")
            if t.tensor_type != gguf.GGMLQuantizationType.F32 or len(t.shape) != 1:
                raise InputError(f"{path}: {t.name} must be a 1-D F32 tensor, got {t.tensor_type.name} of shape "
                                 f"{list(reversed(t.shape.tolist()))}")
            il = int(match.group(1))
            data = np.array(t.data, dtype=np.float32)
            vectors[il] = vectors[il] + data if il in vectors else data
        if not vectors:
            raise InputError(f"{path} holds no direction tensors")
        widths = {v.shape[0] for v in vectors.values()}
        if len(widths) != 1:
            raise InputError(f"{path}: direction tensors of different widths {sorted(widths)}")
        cv = cls.from_layers(vectors, hint.contents() if hint is not None else "")
        return cv if scale == 1.0 else cv * scale


VectorSpec = Union[ControlVector, str, os.PathLike, tuple[Union[str, os.PathLike], float]]


def _is_scaled_file(item: object) -> bool:
    return (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], (str, os.PathLike))
            and isinstance(item[1], (int, float, np.integer, np.floating)) and not isinstance(item[1], bool))


def combine(vectors: VectorSpec | Sequence[VectorSpec]) -> ControlVector:
    """The sum of control vectors, files or ``(file, scale)`` pairs, as llama-cli sums its ``--control-vector``
    and ``--control-vector-scaled`` files."""
    single = isinstance(vectors, (ControlVector, str, os.PathLike)) or _is_scaled_file(vectors)
    items = [vectors] if single else list(vectors)
    if not items:
        raise InputError("no control vector given")
    total = None
    for item in items:
        if _is_scaled_file(item):
            cv = ControlVector.load(*item)
        else:
            cv = item if isinstance(item, ControlVector) else ControlVector.load(item)
        total = cv if total is None else total + cv
    return total


def layer_range(model: Model, layers: tuple[int, int] | None) -> tuple[int, int]:
    """The inclusive range ``(start, end)`` of layers to steer, checked against ``model``; None: every layer."""
    if layers is None:
        return 1, model.n_layer - 1
    try:
        start, end = (int(x) for x in layers)
    except (TypeError, ValueError):
        raise InputError(f"layer range must be (start, end), got {layers!r}") from None
    if not 0 <= start <= end < model.n_layer:
        raise InputError(f"bad layer range {start}..{end}: need 0 <= start <= end <= {model.n_layer - 1} "
                         f"(the model has {model.n_layer} layers)")
    return start, end


def for_model(cv: ControlVector, model: Model) -> np.ndarray:
    """``cv``'s directions as ``[model.n_layer, n_embd]`` float32, checked against the model's width,
    architecture and layers."""
    if cv.n_embd != model.n_embd:
        raise InputError(f"control vector has n_embd {cv.n_embd}, the model {model.n_embd}")
    if cv.model_hint and cv.model_hint != model.arch:
        raise InputError(f"control vector was made for {cv.model_hint}, the model is {model.arch}")
    beyond = [il for il in cv.layers if il >= model.n_layer]
    if beyond:
        raise InputError(f"control vector has a direction for layer {beyond[0]}, the model has {model.n_layer} "
                         f"layers (0..{model.n_layer - 1})")
    out = np.zeros((model.n_layer, model.n_embd), dtype=np.float32)
    out[: cv.directions.shape[0]] = cv.directions[: model.n_layer]
    return out


@contextlib.contextmanager
def steered(model: Model, vectors: VectorSpec | Sequence[VectorSpec], scale: float = 1.0,
            layers: tuple[int, int] | None = None) -> Iterator[ControlVector]:
    """Within the block, llama.cpp adds ``scale`` times the sum of ``vectors`` (control vectors, GGUF files or
    ``(file, scale)`` pairs) to ``l_out`` of the layers in ``layers`` (inclusive; default all) in every
    run, lens and generation, alongside pyinterp's own interventions (logit attribution, whose terms
    would miss the directions, is an error). Yields the vector applied (the sum times ``scale``, every
    layer it holds)."""
    cv = combine(vectors) * scale
    start, end = layer_range(model, layers)
    with model.engine.control_vector(for_model(cv, model), start, end):
        yield cv


def _read(model: Model, prompt: str | Sequence[int], layers: list[int], tokens: str) -> np.ndarray:
    """``[len(layers), n_embd]``: each layer's ``l_out`` at the last token, or its mean over the tokens
    after the BOS the model adds."""
    ids = model.prompt_ids(prompt)
    n_bos = len(model.tokenize("")) if isinstance(prompt, str) else 0
    if tokens == "mean" and len(ids) <= n_bos:
        raise InputError(f"prompt {prompt!r} has no token besides BOS")
    trace = model.run(ids, capture=[f"l_out-{il}" for il in layers])
    rows = [trace.act("l_out", il) for il in layers]
    return np.stack([r[-1] if tokens == "last" else r[n_bos:].mean(0) for r in rows]).astype(np.float64)


def contrastive(model: Model, positives: Sequence[str | Sequence[int]], negatives: Sequence[str | Sequence[int]],
                layers: Iterable[int] | None = None, method: str = "mean", tokens: str = "last",
                on_pair: Callable[[int], None] | None = None) -> ControlVector:
    """A control vector by contrastive activation addition from prompt pairs (text or token ids).

    For each pair i and layer L, the difference ``d_i = l_out-L(positive_i) - l_out-L(negative_i)`` at the
    last token (``tokens="last"``) or of each prompt's mean over its tokens after BOS (``tokens="mean"``).
    ``method="mean"``: direction L is the mean of the ``d_i`` (CAA, not normalized: at scale 1 it moves a
    negative prompt's residual to the positive one's on average). ``method="pca"``: the first principal
    axis ``u`` of the ``d_i`` (uncentered, as llama-cvector-generator's PCA) scaled by the mean difference's
    projection on it, ``mean(d_i . u) u``, so its sign and size need no convention. ``layers``: default
    1..n_layer-1 (llama.cpp never steers layer 0). Interventions of the model's context managers apply;
    ``on_pair`` is called after each pair (progress).
    """
    if method not in METHODS:
        raise InputError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if tokens not in TOKENS:
        raise InputError(f"tokens must be one of {', '.join(TOKENS)}, got {tokens!r}")
    positives, negatives = list(positives), list(negatives)
    if len(positives) != len(negatives):
        raise InputError(f"{len(positives)} positive and {len(negatives)} negative prompts: they must pair up")
    if not positives:
        raise InputError("no prompt pairs")
    layers = list(range(1, model.n_layer)) if layers is None else \
        sorted({check_int(il, "layer") for il in as_list(layers, "layers")})
    if not layers or not all(0 < il < model.n_layer for il in layers):
        raise InputError(f"layers must be in 1..{model.n_layer - 1} (llama.cpp never steers layer 0), got {layers}")
    diffs = np.empty((len(layers), len(positives), model.n_embd))  # [layer, pair, n_embd]
    for i, (pos, neg) in enumerate(zip(positives, negatives)):
        diffs[:, i] = _read(model, pos, layers, tokens) - _read(model, neg, layers, tokens)
        if on_pair is not None:
            on_pair(i)
    if method == "mean":
        directions = diffs.mean(axis=1)
    else:
        axes = np.linalg.svd(diffs, full_matrices=False)[2][:, 0]  # [layer, n_embd], unit norm
        directions = np.einsum("lpe,le->l", diffs, axes)[:, None] / len(positives) * axes
    return ControlVector.from_layers(dict(zip(layers, directions.astype(np.float32))), model.arch)
