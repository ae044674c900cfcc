"""A GGUF model on the patched llama.cpp: tokenization, forward passes with captures and
interventions inside the ggml graph, and generation."""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from . import _ffi, zoo
from ._ffi import ffi, lib
from .errors import InputError, PyinterpError
from .arch import ARCHS
from .attribution import Attribution, logit_attribution
from .hooks import ATTENTION_TENSORS, Head, Patch, Plan, Planner, TensorInfo, as_list, split_name
from .lens import LogitLens, logit_lens
from .trace import Trace

GGUF_MAGIC = b"GGUF"

# KV cache types llama.cpp accepts (-ctk/-ctv), as enum ggml_type values
KV_TYPES = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7}

TOKEN_ATTR_NORMAL = 1 << 2  # enum llama_token_attr's flag of an ordinary token (control, byte, ... have others)


class _Pass(NamedTuple):
    """What one decode under a plan returns (see Model._forward)."""

    logits: np.ndarray
    captured: dict[tuple[str, int], np.ndarray]
    graph: list[str]
    extra: object  # what the analysis read, or None


@dataclass
class Generation:
    """Tokens and text produced by :meth:`Model.generate` (the prompt not included)."""

    prompt_tokens: list[int]
    tokens: list[int]
    text: str


def _check_gguf(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise PyinterpError(f"{path} is not a GGUF file (it starts with {head!r}, not {GGUF_MAGIC!r})")


def _with_buffer(ctype: str, cap: int, call) -> tuple[object, int]:
    """``call(buf, cap)`` for llama.cpp functions that return minus the size they need when ``buf`` is too
    small: retried once with that size. Returns the buffer and the call's result."""
    buf = ffi.new(f"{ctype}[]", cap)
    n = call(buf, cap)
    if n < 0:
        buf = ffi.new(f"{ctype}[]", -n)
        n = call(buf, -n)
    return buf, n


def default_gpu_layers() -> int:
    """``n_gpu_layers`` when none is given: ``$PYINTERP_N_GPU_LAYERS`` (``-1``: every layer), else 0 (CPU)."""
    value = os.environ.get("PYINTERP_N_GPU_LAYERS", "0")
    try:
        return int(value)
    except ValueError:
        raise InputError(f"PYINTERP_N_GPU_LAYERS must be an integer, got {value!r}") from None


def _check_rpc(endpoint: str) -> None:
    """ggml aborts the process when an RPC server cannot be reached: look first."""
    if not lib.pi_has_rpc():
        raise InputError("this pyinterp was built without RPC; reinstall with CMAKE_ARGS=-DGGML_RPC=ON pip install .")
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"RPC endpoint must be host:port, got {endpoint!r}")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise PyinterpError(f"cannot reach the RPC server at {endpoint}: {e.strerror or e}") from None


def _llama_error(what: str) -> PyinterpError:
    detail = _ffi.first_error()
    return PyinterpError(f"{what}: {detail}" if detail else what)


class Model:
    """A GGUF model loaded by the patched llama.cpp.

    ``path`` is a GGUF file or a known name (``"smollm2"``, the default, or ``"gemma3"``).

    Defaults favour faithfulness over speed: every layer runs the explicit attention path
    (``flash_attn=False``) over an F32 KV cache (``type_k``/``type_v`` ``"f32"``), so K·Q, the softmax and
    the weighted sum of V are computed and summed in F32 on every backend, and a run computes the same
    numbers whether or not it captures attention. ``flash_attn=None`` lets llama.cpp decide and ``True``
    forces flash attention (faster; K and V go in as F16 and, on the CPU, V is summed in F16; layers whose
    attention weights are captured still run the explicit path). ``"f16"`` is llama.cpp's KV cache type:
    half the memory, and the explicit path then rounds the attention weights to F16 before multiplying V. ``rpc`` ("host:port" of a ggml RPC server, see ``pyinterp.rpc``)
    offloads ``n_gpu_layers`` layers to that server (builds with ``-DGGML_RPC=ON``). C memory is freed by
    :meth:`close` (or ``with Model() as m:``).
    """

    def __init__(self, path: str | os.PathLike | None = None, *, n_ctx: int = 2048, n_threads: int | None = None,
                 n_gpu_layers: int | None = None, flash_attn: bool | None = False, type_k: str = "f32", type_v: str = "f32",
                 rpc: str | None = None, verbose: bool = False) -> None:
        _ffi.set_verbose(verbose)
        if n_gpu_layers is None:
            n_gpu_layers = default_gpu_layers()
        self.path = zoo.resolve(path)
        _check_gguf(self.path)
        if n_ctx < 8:
            raise InputError(f"n_ctx must be at least 8, got {n_ctx}")
        if n_threads is None:
            n_threads = len(os.sched_getaffinity(0))
        if n_threads < 1:
            raise InputError(f"n_threads must be at least 1, got {n_threads}")
        for what, kv_type in (("type_k", type_k), ("type_v", type_v)):
            if kv_type not in KV_TYPES:
                raise InputError(f"{what} must be one of {', '.join(KV_TYPES)}, got {kv_type!r}")
        if type_v not in ("f32", "f16", "bf16") and flash_attn is False:
            raise InputError(f"a quantized V cache ({type_v}) needs flash attention (flash_attn=None or True)")
        self._model = self._ctx = self._state = ffi.NULL

        if rpc is not None:
            _check_rpc(rpc)
        _ffi.clear_errors()
        self._model = lib.pi_model_load(str(self.path).encode(), n_gpu_layers, rpc.encode() if rpc else ffi.NULL)
        if self._model == ffi.NULL:
            raise _llama_error(f"cannot load model {self.path}")
        n_ctx_train = lib.llama_model_n_ctx_train(self._model)
        if n_ctx > n_ctx_train:
            self.close()
            raise InputError(f"n_ctx {n_ctx} exceeds the {n_ctx_train} tokens {self.path.name} was trained on")
        flash = -1 if flash_attn is None else int(bool(flash_attn))
        self._ctx = lib.pi_context_new(self._model, n_ctx, n_threads, flash, KV_TYPES[type_k], KV_TYPES[type_v])
        if self._ctx == ffi.NULL:
            self.close()
            raise _llama_error(f"cannot create a context of {n_ctx} tokens for {self.path}")
        self._state = lib.pi_state_new(self._ctx)
        if self._state == ffi.NULL:
            self.close()
            raise PyinterpError("cannot allocate pyinterp's intervention buffers")

        self._vocab = lib.llama_model_get_vocab(self._model)
        buf = ffi.new("char[128]")
        lib.llama_model_meta_val_str(self._model, b"general.architecture", buf, 128)
        self.arch: str = ffi.string(buf).decode()
        self.n_layer: int = lib.llama_model_n_layer(self._model)
        self.n_head: int = lib.llama_model_n_head(self._model)
        self.n_head_kv: int = lib.llama_model_n_head_kv(self._model)
        self.n_embd: int = lib.llama_model_n_embd(self._model)
        self.n_vocab: int = lib.llama_vocab_n_tokens(self._vocab)
        # llama.cpp may round the context up; one ubatch holds exactly what was asked for
        self.n_ctx: int = min(n_ctx, lib.llama_n_ctx(self._ctx))

        self._explicit: set[int] = set()
        self._info: TensorInfo | None = None
        self._ablated: list[Head] = []
        self._isolated: list[Head] = []
        self._patched: list[Patch] = []
        self._steering = False

    # lifetime

    def close(self) -> None:
        """Free the context and the model (idempotent)."""
        if getattr(self, "_state", ffi.NULL) != ffi.NULL:
            lib.pi_state_free(self._state)
            self._state = ffi.NULL
        if getattr(self, "_ctx", ffi.NULL) != ffi.NULL:
            lib.llama_free(self._ctx)
            self._ctx = ffi.NULL
        if getattr(self, "_model", ffi.NULL) != ffi.NULL:
            lib.llama_model_free(self._model)
            self._model = ffi.NULL

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def _live(self) -> None:
        if self._ctx == ffi.NULL:
            raise PyinterpError("the model is closed")

    def __repr__(self) -> str:
        return (f"Model({self.path.name!r}, arch={self.arch}, n_layer={self.n_layer}, n_head={self.n_head}, "
                f"n_head_kv={self.n_head_kv}, n_embd={self.n_embd}, n_vocab={self.n_vocab}, n_ctx={self.n_ctx})")

    def layer_device(self, layer: int) -> str:
        """The ggml device that computes ``layer`` (-1: the output layer), e.g. ``CPU``, ``CUDA0``, ``RPC0[host:port]``."""
        self._live()
        if not -1 <= layer < self.n_layer:
            raise InputError(f"layer {layer} out of range (the model has {self.n_layer} layers: 0..{self.n_layer - 1}, or -1)")
        return ffi.string(lib.ggml_backend_dev_name(lib.llama_model_layer_dev(self._model, layer))).decode()

    # tokens

    def tokenize(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; ``add_bos`` None follows the model's metadata. Special tokens are parsed."""
        self._live()
        if add_bos is None:
            add_bos = bool(lib.llama_vocab_get_add_bos(self._vocab))
        data = text.encode("utf-8")
        out, n = _with_buffer("llama_token", len(data) + 8,
                              lambda buf, cap: lib.llama_tokenize(self._vocab, data, len(data), buf, cap, add_bos, True))
        if n < 0:
            raise PyinterpError("tokenization failed")
        return list(out[0:n])

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.n_vocab]
        if bad:
            raise InputError(f"token id {bad[0]} out of range (vocabulary has {self.n_vocab} tokens)")
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of token ids (special tokens rendered)."""
        self._live()
        ids = self._check_ids(ids)
        arr = ffi.new("llama_token[]", ids)
        buf, n = _with_buffer("char", 8 * len(ids) + 16,
                              lambda buf, cap: lib.llama_detokenize(self._vocab, arr, len(ids), buf, cap, False, True))
        return ffi.unpack(buf, n).decode("utf-8", "replace")

    def token_bytes(self, token: int) -> bytes:
        """The bytes of one token's piece (special tokens rendered); may be part of a UTF-8 character."""
        self._live()
        (token,) = self._check_ids([token])
        buf, n = _with_buffer("char", 64, lambda buf, cap: lib.llama_token_to_piece(self._vocab, token, buf, cap, 0, True))
        return ffi.unpack(buf, n)

    def token_str(self, token: int) -> str:
        """The text piece of one token (special tokens rendered, partial UTF-8 characters replaced)."""
        return self.token_bytes(token).decode("utf-8", "replace")

    def ordinary_tokens(self) -> np.ndarray:
        """Ids of the ordinary text tokens, ``[n]`` int32: attribute NORMAL, so no control, byte, user-defined,
        unused or unknown tokens."""
        self._live()
        attrs = np.array([lib.llama_vocab_get_attr(self._vocab, t) for t in range(self.n_vocab)])
        return np.flatnonzero(attrs & TOKEN_ATTR_NORMAL).astype(np.int32)

    def prompt_ids(self, tokens_or_text: str | Sequence[int]) -> list[int]:
        """The token ids a run would use: text tokenized (BOS as the model wants), or ids checked against
        the vocabulary; either way non-empty and no longer than the context."""
        ids = self.tokenize(tokens_or_text) if isinstance(tokens_or_text, str) else self._check_ids(tokens_or_text)
        if not ids:
            raise InputError("the prompt is empty")
        if len(ids) > self.n_ctx:
            raise InputError(f"the prompt has {len(ids)} tokens but the context holds {self.n_ctx}; "
                                f"load the model with a larger n_ctx")
        return ids

    # the graph

    def tensor_info(self) -> TensorInfo:
        """Names (and ggml shapes) of the tensors this model's graph offers to captures and patches."""
        if self._info is None:
            self._live()
            all_layers = set(range(self.n_layer))
            self._set_explicit(all_layers)
            lib.pi_set_record(self._state, True)
            try:
                ids = self.tokenize("a b", add_bos=False)[:1] * 2
                self._decode(ids, 0, True)
                ne = ffi.new("int64_t[4]")
                layers: dict[str, set[int]] = {}
                shapes: dict[str, tuple[int, ...]] = {}
                for i in range(lib.pi_n_seen(self._state)):
                    full = ffi.string(lib.pi_seen_name(self._state, i, ne)).decode()
                    name, layer = split_name(full)
                    layers.setdefault(name, set()).add(-1 if layer is None else layer)
                    dims = list(ne)
                    while len(dims) > 1 and dims[-1] == 1:
                        dims.pop()
                    shapes.setdefault(name, tuple(dims))  # a name given twice in a layer: the first
            finally:
                lib.pi_set_record(self._state, False)
                self._set_explicit(set())
                lib.llama_memory_clear(lib.llama_get_memory(self._ctx), True)
            self._info = TensorInfo({k: frozenset(v) for k, v in layers.items()}, shapes)
        return self._info

    def tensor_names(self) -> list[str]:
        """Base names of the tensors in this model's graph (``l_out``, ``attn_scores``, ...)."""
        return sorted(self.tensor_info().layers)

    def _planner(self) -> Planner:
        aliases = ARCHS[self.arch].tl_aliases if self.arch in ARCHS else None
        return Planner(self.n_layer, self.n_head, self.tensor_info(), aliases)

    def _set_explicit(self, layers: set[int]) -> None:
        for il in layers ^ self._explicit:
            lib.llama_set_attn_explicit(self._ctx, il, il in layers)
        self._explicit = set(layers)

    def _plan(self, n_tokens: int, capture: Iterable[str], ablate: Iterable[Head], isolate: Head | None,
              patch: Iterable[Patch]) -> Plan:
        planner = self._planner()
        if isolate is not None and self._isolated:
            raise InputError("isolate: a head is already isolated by model.isolated()")
        isolate = isolate if isolate is not None else (self._isolated[0] if self._isolated else None)
        return Plan(
            captures=planner.captures(capture),
            head_masks=planner.head_masks([*self._ablated, *as_list(ablate, "ablate")], isolate),
            patches=planner.patches([*self._patched, *as_list(patch, "patch")], n_tokens),
        )

    def _apply(self, plan: Plan) -> None:
        st = self._state
        lib.pi_plan_clear(st)
        self._set_explicit(plan.explicit_layers)
        for il, mask in plan.head_masks.items():
            lib.pi_set_head_mask(st, il, ffi.from_buffer("float[]", mask))
        for name, il in plan.captures:
            lib.pi_add_capture(st, name.encode(), il)
        for name, il, pos, row in plan.patches:
            if lib.pi_add_patch(st, name.encode(), il, pos, ffi.from_buffer("float[]", row), row.shape[0]) != 0:
                raise self._native_error(f"patch {name}-{il}")

    def _native_error(self, what: str) -> PyinterpError:
        return PyinterpError(f"{what}: {ffi.string(lib.pi_last_error(self._state)).decode()}")

    def _clear(self) -> None:
        lib.pi_plan_clear(self._state)

    def _decode(self, ids: list[int], pos0: int, all_logits: bool) -> None:
        arr = ffi.new("llama_token[]", ids)
        _ffi.clear_errors()
        ret = lib.pi_decode(self._state, arr, len(ids), pos0, all_logits)
        if ret == -100:
            raise PyinterpError(f"{len(ids)} tokens at position {pos0} do not fit the context of {self.n_ctx}")
        if ret != 0:
            raise _llama_error(f"llama_decode failed with code {ret}")

    def _logits(self, n: int) -> np.ndarray:
        ptr = lib.llama_get_logits(self._ctx)
        return np.frombuffer(ffi.buffer(ptr, n * self.n_vocab * 4), dtype=np.float32).reshape(n, self.n_vocab).copy()

    def _read_captures(self, plan: Plan, n_tokens: int) -> dict[tuple[str, int], np.ndarray]:
        out = {}
        ne = ffi.new("int64_t[4]")
        for i, (name, il) in enumerate(plan.captures):
            if not lib.pi_capture_shape(self._state, i, ne):
                raise PyinterpError(f"{name}-{il} was not in the graph of this run")
            dims = list(ne)
            rank = self.tensor_info().rank(name)
            # the KV axis of the attention weights is padded; keep the cells of this prompt
            n0 = n_tokens if name in ATTENTION_TENSORS else dims[0]
            arr = np.empty([*reversed(dims[1:rank]), n0], dtype=np.float32)
            if lib.pi_capture_read(self._state, i, ffi.from_buffer("float[]", arr), arr.size, n0) != 0:
                raise self._native_error(f"{name}-{il}")
            out[name, il] = arr
        return out

    # forward passes

    def logit_lens(self, tokens_or_text: str | Sequence[int], tensor: str = "l_out", top_k: int = 10, norm: bool = True,
                   layers: Iterable[int] | None = None, targets: Iterable[int | str] = (),
                   positions: Iterable[int] | None = None) -> LogitLens:
        """The logit lens of ``tensor``: top-k tokens and the targets' probabilities and ranks per layer and
        position, computed in the graph; see :func:`pyinterp.lens.logit_lens`."""
        return logit_lens(self, tokens_or_text, tensor, top_k, norm, layers, targets, positions)

    def logit_attribution(self, tokens_or_text: str | Sequence[int], target: int | str | None = None,
                          position: int = -1, heads: bool = True) -> Attribution:
        """Direct logit attribution of ``target`` (default the top prediction) at ``position`` to the residual
        stream's terms and each attention head; see :func:`pyinterp.attribution.logit_attribution`."""
        if self._steering:
            raise InputError("logit attribution under a control vector: its directions are a residual term the attribution lacks")
        return logit_attribution(self, tokens_or_text, target, position, heads)

    def _forward(self, ids: list[int], plan: Plan, graph: bool = False, analysis=None, rows: str = "all") -> _Pass:
        """Decode ``ids`` from an empty cache under ``plan``; returns logits (of every token, or with ``rows``
        "last" of the last), captures, the lines describing every node of the graph (when ``graph``) and what
        ``analysis`` read. ``analysis`` (the lens, the attribution) has ``setup()``, called once the plan is
        set, and ``read(n_tokens)``, after the decode."""
        self._apply(plan)
        try:
            if analysis is not None:
                analysis.setup()
            if graph:
                lib.pi_set_record(self._state, True)  # keeps the hook set, so the graph is seen
            lib.llama_memory_clear(lib.llama_get_memory(self._ctx), True)
            self._decode(ids, 0, rows == "all")
            logits = self._logits(len(ids) if rows == "all" else 1)
            captured = self._read_captures(plan, len(ids))
            lines = [ffi.string(lib.pi_graph_node_line(self._state, i)).decode()
                     for i in range(lib.pi_graph_n_nodes(self._state))] if graph else []
            extra = analysis.read(len(ids)) if analysis is not None else None
        finally:
            self._clear()
        return _Pass(logits, captured, lines, extra)

    def graph(self, tokens_or_text: str | Sequence[int], *, capture: Iterable[str] = (), ablate: Iterable[Head] = (),
              isolate: Head | None = None, patch: Iterable[Patch] = ()) -> list[str]:
        """One line per node of the graph llama.cpp builds for this prompt (with these interventions):
        name, op, type, ggml shape and the sources it reads."""
        self._live()
        ids = self.prompt_ids(tokens_or_text)
        plan = self._plan(len(ids), capture, ablate, isolate, patch)
        return self._forward(ids, plan, graph=True).graph

    def run(self, tokens_or_text: str | Sequence[int], *, capture: Iterable[str] = (), ablate: Iterable[Head] = (),
            isolate: Head | None = None, patch: Iterable[Patch] = (), logits: str | None = "all") -> Trace:
        """One forward pass over a prompt (text or token ids) from an empty KV cache.

        capture: tensor names (``"l_out"``, ``"attn_scores"``, ...) for every layer, or ``"name-layer"``.
        ablate: ``(layer, head)`` pairs whose attention weights are zeroed (so their output is zero).
        isolate: ``(layer, head)``: ablate every other head of that layer.
        patch: ``(name, layer, position, vector)``: replace that row of ``name-layer`` with ``vector``.
        logits: ``"all"`` (``trace.logits`` ``[n_tokens, n_vocab]``), ``"last"`` (``[1, n_vocab]``: llama.cpp then
        unembeds and copies only the last row, much less work on long prompts and large vocabularies) or
        None (``trace.logits`` is None).
        Interventions of the ``ablated``/``isolated``/``patched`` context managers apply too.
        """
        self._live()
        if logits not in ("all", "last", None):
            raise InputError(f"logits must be 'all', 'last' or None, got {logits!r}")
        ids = self.prompt_ids(tokens_or_text)
        plan = self._plan(len(ids), capture, ablate, isolate, patch)
        # llama.cpp keeps only the output rows of the last layer's tensors: keep them all when the plan reads
        # or writes that layer
        last = self.n_layer - 1
        rows = "all" if logits == "all" or plan.touches_layer(last) else "last"
        done = self._forward(ids, plan, rows=rows)
        out = None if logits is None else done.logits[-1:] if logits == "last" else done.logits
        return Trace(ids, out, done.captured, [self.token_str(t) for t in ids])

    def generate(self, prompt: str | Sequence[int], n: int, *, temp: float = 0.0, seed: int | None = None,
                 ablate: Iterable[Head] = (), isolate: Head | None = None, patch: Iterable[Patch] = (),
                 stop_at_eog: bool = True, on_token: Callable[[int], None] | None = None) -> Generation:
        """Generate up to ``n`` tokens after ``prompt``; greedy when ``temp`` is 0.

        Interventions (arguments and context managers) stay on for every generated token; patches
        apply to the prompt positions they name. ``on_token`` is called with each new token (progress).
        """
        self._live()
        if n < 0:
            raise InputError(f"n must be >= 0, got {n}")
        if temp < 0:
            raise InputError(f"temp must be >= 0, got {temp}")
        ids = self.prompt_ids(prompt)
        if len(ids) + n > self.n_ctx:
            raise InputError(f"prompt ({len(ids)} tokens) plus {n} new tokens exceed the context of {self.n_ctx}")
        rng = np.random.default_rng(seed)
        plan = self._plan(len(ids), (), ablate, isolate, patch)
        self._apply(plan)
        out: list[int] = []
        try:
            lib.llama_memory_clear(lib.llama_get_memory(self._ctx), True)
            self._decode(ids, 0, False)
            for step in range(n):
                logits = self._logits(1)[0].astype(np.float64)
                if temp == 0:
                    token = int(np.argmax(logits))
                else:
                    p = np.exp((logits - logits.max()) / temp)
                    token = int(rng.choice(self.n_vocab, p=p / p.sum()))
                if stop_at_eog and lib.llama_vocab_is_eog(self._vocab, token):
                    break
                out.append(token)
                if on_token is not None:
                    on_token(token)
                if step < n - 1:
                    self._decode([token], len(ids) + step, False)
        finally:
            self._clear()
        return Generation(ids, out, self.detokenize(out))

    # interventions that stay on

    @contextlib.contextmanager
    def ablated(self, heads: Iterable[Head]) -> Iterator["Model"]:
        """Within the block, every run and generation has these ``(layer, head)`` pairs ablated."""
        heads = as_list(heads, "ablate")
        self._planner().head_masks(heads, None)
        self._ablated.extend(heads)
        try:
            yield self
        finally:
            del self._ablated[len(self._ablated) - len(heads):]

    @contextlib.contextmanager
    def isolated(self, layer: int, head: int) -> Iterator["Model"]:
        """Within the block, only ``head`` of ``layer`` contributes to that layer's attention output."""
        if self._isolated:
            raise InputError("a head is already isolated")
        self._planner().head_masks([], (layer, head))
        self._isolated.append((layer, head))
        try:
            yield self
        finally:
            self._isolated.clear()

    @contextlib.contextmanager
    def patched(self, patches: Iterable[Patch]) -> Iterator["Model"]:
        """Within the block, every run and generation has these rows replaced (checked at each run)."""
        patches = as_list(patches, "patch")
        self._patched.extend(patches)
        try:
            yield self
        finally:
            del self._patched[len(self._patched) - len(patches):]

    @contextlib.contextmanager
    def _control_vector(self, directions: np.ndarray, start: int, end: int) -> Iterator[None]:
        """Within the block llama.cpp adds row L of ``directions`` (``[n_layer, n_embd]`` float32) to ``l_out-L`` for L in
        ``start..end`` (never 0) in every decode (``llama_set_adapter_cvec``; see ``pyinterp.steering.steered``)."""
        self._live()
        if self._steering:
            raise InputError("a control vector is already applied: steered blocks do not nest (sum the vectors)")
        rows = np.ascontiguousarray(directions[1:], dtype=np.float32)  # llama.cpp's buffer starts at layer 1
        _ffi.clear_errors()
        if lib.llama_set_adapter_cvec(self._ctx, ffi.from_buffer("float[]", rows), rows.size, self.n_embd, start, end):
            raise _llama_error("cannot apply the control vector")
        self._steering = True
        try:
            yield
        finally:
            self._steering = False
            if self._ctx != ffi.NULL:
                lib.llama_set_adapter_cvec(self._ctx, ffi.NULL, 0, self.n_embd, -1, -1)
