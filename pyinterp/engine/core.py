"""The engine: what one forward pass is, and the one place that runs it on the native library.

A **pass** decodes token ids from an empty KV cache under a plan, and returns what the plan asked for
(:class:`PassResult`):

- **interventions**: :mod:`pyinterp.interventions` objects, compiled against the model's tensor table to the
  native op table (the engine's own stack of interventions, pushed by :meth:`Engine.pushed`, comes first);
- **captures**: tensor names (``"l_out"``, ``"attn_scores-3"``, TransformerLens names), read back as numpy;
- **a readout**: an object computed inside the graph and read back after the decode (the logit lens, the logit
  attribution, an SAE: :mod:`pyinterp.engine.readouts`), following the :class:`Readout` protocol;
- **which logits**: every token's (``"all"``) or the last one's (``"last"``).

Several sequences in one decode (sweeps, head scans) are the engine's multi-sequence form,
:func:`pyinterp.engine.batch.run_variants`. Generation (:meth:`Engine.generate_tokens`) keeps one plan for the prompt
and every new token. Everything here holds :attr:`Engine.lock`: one pass at a time per model.

Only the engine layer (this module, :mod:`pyinterp.engine.backend`, :mod:`pyinterp.engine.batch` and
:mod:`pyinterp.engine.readouts`) touches the native library; :class:`pyinterp.Model` is the user's façade over it.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Protocol, Sequence

import numpy as np

from pyinterp.checks import check_intervention, check_prompt, show
from pyinterp.engine.arch import ARCHS
from pyinterp.engine.backend import KV_TYPES, Backend, default_threads, has_metal, set_verbose  # noqa: F401  (for the façade)
from pyinterp.engine.names import ATTENTION_TENSORS, Planner, TensorInfo, as_list, split_name
from pyinterp.errors import InputError, PyinterpError
from pyinterp.interventions.base import Intervention, Op, Target  # submodules: importing pyinterp.interventions first works
from pyinterp.interventions.capture import Capture

# V cache types the explicit attention path (attention weights captured) can multiply: over a quantized V cache it
# corrupted the heap (free(): invalid pointer at the context's end) and gave NaN rows
FLOAT_V_TYPES = ("f32", "f16", "bf16")


class Readout(Protocol):
    """Something a pass computes inside the graph: ``setup`` adds it to the native plan once the plan's ops are
    set, ``read`` takes its result after the decode (``n_tokens``: the tokens decoded). A readout whose
    ``every_row`` attribute is true reads every token of the last layer, so the pass keeps them all."""

    def setup(self, backend: Backend) -> None: ...

    def read(self, backend: Backend, n_tokens: int) -> object: ...


class ModelLike(Protocol):
    """What an analysis uses of a model: its engine, sizes and tokens. :class:`pyinterp.Model` is one; analyses
    annotate with this, so they depend on the engine layer and not on the façade above them."""

    engine: Engine
    path: Path
    arch: str
    n_layer: int
    n_head: int
    n_embd: int
    n_vocab: int
    n_ctx: int

    def prompt_ids(self, tokens_or_text: str | Sequence[int]) -> list[int]: ...

    def tokenize(self, text: str, add_bos: bool | None = None) -> list[int]: ...

    def token_str(self, token: int) -> str: ...

    def tensor_info(self) -> TensorInfo: ...


class PassResult(NamedTuple):
    """What one pass returns."""

    logits: np.ndarray                          # [n_rows, n_vocab]: every token's, or the last one's
    captured: dict[tuple[str, int], np.ndarray]  # (name, layer) -> the tensor (see pyinterp.engine.trace.Trace)
    graph: list[str]                            # one line per graph node, when asked for
    readout: object                             # what the readout read, or None


class Engine:
    """The forward-pass engine of one loaded model (``backend``: its context and native state)."""

    def __init__(self, backend: Backend, flash_attn: bool | None, type_v: str = "f32") -> None:
        self.backend = backend
        self.type_v = type_v
        self.n_head_kv, self.n_embd = backend.n_head_kv, backend.n_embd
        self.lock = threading.RLock()  # one pass, or one with-block of pushed interventions, at a time
        self.n_layer, self.n_head, self.n_vocab, self.n_ctx = backend.n_layer, backend.n_head, backend.n_vocab, backend.n_ctx
        self.arch = backend.arch
        self.n_seq_max = backend.n_seq_max  # contexts one decode may hold (run_contexts)
        self.flash_attn = flash_attn
        self.interventions: list[Intervention] = []  # pushed ones, applied to every pass
        self.steering = False                        # a control vector is set (control_vector)
        self.uploads: dict[object, object] = {}      # device-side data of readouts (SAE weights), freed with the engine
        self._info: TensorInfo | None = None

    @classmethod
    def load(cls, path: Path, *, n_ctx: int, n_threads: int, n_gpu_layers: int, flash_attn: bool | None, type_k: str,
             type_v: str, rpc: str | None) -> "Engine":
        """Load the GGUF at ``path`` and make its context (arguments checked by the caller, as Model does)."""
        flash = -1 if flash_attn is None else int(bool(flash_attn))
        backend = Backend(path, n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers, flash=flash,
                          type_k=type_k, type_v=type_v, rpc=rpc)
        return cls(backend, flash_attn, type_v)

    # lifetime

    def close(self) -> None:
        """Free the device-side uploads, the context and the model (idempotent)."""
        with self.lock:
            self.uploads.clear()  # each frees its device memory when dropped, before the context goes
            self.backend.close()

    def check_live(self) -> None:
        if self.backend.closed:
            raise PyinterpError("the model is closed")

    # tokens

    def check_ids(self, ids: Sequence[int]) -> list[int]:
        """Token ids checked against the vocabulary."""
        ids = check_prompt(ids)
        if isinstance(ids, str):
            raise InputError(f"token ids must be integers, got the text {show(ids)}")
        bad = [i for i in ids if not 0 <= i < self.n_vocab]
        if bad:
            raise InputError(f"token id {bad[0]} out of range (vocabulary has {self.n_vocab} tokens)")
        return ids

    def tokenize(self, text: str, add_bos: bool | None) -> list[int]:
        with self.lock:
            self.check_live()
            return self.backend.tokenize(text, self.backend.add_bos() if add_bos is None else add_bos)

    def special_tokens(self) -> tuple[int | None, int | None]:
        """BOS and EOS token ids (None where the vocabulary has none)."""
        with self.lock:
            self.check_live()
            return self.backend.special_tokens()

    def adds_bos(self) -> bool:
        """Whether the model's metadata asks for a BOS before a text."""
        with self.lock:
            self.check_live()
            return self.backend.add_bos()

    def detokenize(self, ids: list[int]) -> str:
        with self.lock:
            self.check_live()
            return self.backend.detokenize(ids)

    def token_bytes(self, token: int) -> bytes:
        with self.lock:
            self.check_live()
            return self.backend.token_bytes(token)

    def token_attrs(self) -> np.ndarray:
        """``[n_vocab]`` llama_token_attr flags."""
        self.check_live()
        return self.backend.token_attrs()

    def layer_device(self, layer: int) -> str:
        self.check_live()
        return self.backend.layer_device(layer)

    # the tensor table

    def tensor_info(self) -> TensorInfo:
        """Names (and ggml shapes) of the tensors this model's graph offers to captures and interventions."""
        with self.lock:
            if self._info is None:
                self._info = self._probe_tensors()
        return self._info

    def _probe_tensors(self) -> TensorInfo:
        """Decode a 2-token probe recording every tensor the graph offers: names, layers and ggml shapes."""
        self.check_live()
        b = self.backend
        b.clear_plan()
        # the explicit attention path names the attention weights; over a quantized V cache it is not run (see compile)
        b.set_explicit(set(range(self.n_layer)) if self.type_v in FLOAT_V_TYPES else set())
        b.set_record(True)
        try:
            ids = b.tokenize("a b", False)[:1] * 2
            b.clear_memory()
            b.decode([ids], [0], 0, True)
            layers: dict[str, set[int]] = {}
            shapes: dict[str, tuple[int, ...]] = {}
            for full, ne in b.seen():
                name, layer = split_name(full)
                layers.setdefault(name, set()).add(-1 if layer is None else layer)
                while len(ne) > 1 and ne[-1] == 1:
                    ne.pop()
                shapes.setdefault(name, tuple(ne))  # a name given twice in a layer: the first
        finally:
            b.set_record(False)
            b.set_explicit(set())
            b.clear_memory()
        return TensorInfo({k: frozenset(v) for k, v in layers.items()}, shapes)

    def planner(self) -> Planner:
        """The checks every intervention and capture makes against this model's tensor table."""
        aliases = ARCHS[self.arch].tl_aliases if self.arch in ARCHS else None
        return Planner(self.n_layer, self.n_head, self.tensor_info(), aliases)

    # compiling a plan

    def target(self, n_tokens: int, explicit: set[int] = frozenset(), seq: int = -1) -> Target:
        """What interventions compile against; ``explicit``: the layers a capture needs the attention weights of;
        ``seq``: the sequence of a multi-sequence decode the ops apply to (-1: every one)."""
        scores = set(range(self.n_layer)) if self.flash_attn is False else explicit
        return Target(self.planner(), n_tokens, seq, frozenset(scores))

    def compile(self, n_tokens: int, interventions: Iterable[Intervention],
                capture: Iterable[str]) -> tuple[list[Op], list[Op], set[int]]:
        """The pass's intervention ops (the pushed interventions' first) and capture ops, and the layers that run
        the explicit attention path."""
        interventions = [check_intervention(iv) for iv in as_list(interventions, "interventions")]
        planner = self.planner()
        capture = [capture] if isinstance(capture, str) else as_list(capture, "capture")
        if self.type_v not in FLOAT_V_TYPES and any(isinstance(spec, str) and planner.key(spec)[0] in ATTENTION_TENSORS
                                                    for spec in capture):
            raise InputError(f"capturing attention weights needs an f32, f16 or bf16 V cache, not {self.type_v} "
                             f"(type_v / -ctv)")
        captures = list(dict.fromkeys(op for spec in capture for op in Capture(spec).ops(Target(planner, n_tokens))))
        explicit = {op.layer for op in captures if op.name in ATTENTION_TENSORS}
        target = self.target(n_tokens, explicit)
        ops = [op for iv in [*self.interventions, *interventions] for op in iv.ops(target)]
        return ops, captures, explicit

    def needs_every_row(self, ops: Iterable[Op]) -> bool:
        """Whether ``ops`` capture on the last layer, whose tensors after attention keep only the rows of the tokens
        whose logits are wanted: such a decode must want every token's."""
        return any(op.kind == "capture" and op.layer == self.n_layer - 1 for op in ops)

    def set_plan(self, ops: list[Op], explicit: set[int]) -> list[int]:
        """The native plan: these ops (their indices returned) on a graph with ``explicit`` attention layers."""
        b = self.backend
        b.clear_plan()
        b.set_explicit(explicit)
        return [b.add_op(op) for op in ops]

    def read_captures(self, captures: list[Op], indices: list[int], n_tokens: int) -> dict[tuple[str, int], np.ndarray]:
        out = {}
        info = self.tensor_info()
        for op, i in zip(captures, indices):
            # the KV axis of the attention weights is padded; keep the cells of this prompt
            n0 = n_tokens if op.name in ATTENTION_TENSORS else None
            arr = self.backend.op_result(i, info.rank(op.name), n0)
            if arr is None:
                raise PyinterpError(f"{op.name}-{op.layer} was not in the graph of this run")
            out[op.name, op.layer] = arr
        return out

    # passes

    def run(self, ids: list[int], interventions: Iterable[Intervention] = (), capture: Iterable[str] = (), *,
            readout: Readout | None = None, graph: bool = False, logits: str = "all") -> PassResult:
        """One pass over ``ids`` (checked token ids) from an empty KV cache. ``logits``: "all" or "last" (every row
        anyway when a capture is on the last layer, or the readout reads every token of it: ``readout.every_row``)."""
        with self.lock:
            self.check_live()
            ops, captures, explicit = self.compile(len(ids), interventions, capture)
            every_row = logits == "all" or self.needs_every_row(captures) or getattr(readout, "every_row", False)
            b = self.backend
            indices = self.set_plan(ops + captures, explicit)
            try:
                if readout is not None:
                    readout.setup(b)
                if graph:
                    b.set_record(True)  # keeps the hook set, so the graph is seen
                b.clear_memory()
                b.decode([ids], [0], 0, every_row)
                out = b.logits(len(ids) if every_row else 1)
                captured = self.read_captures(captures, indices[len(ops):], len(ids))
                lines = b.graph_lines() if graph else []
                extra = readout.read(b, len(ids)) if readout is not None else None
            finally:
                b.clear_plan()
            return PassResult(out, captured, lines, extra)

    def run_contexts(self, contexts: Sequence[list[int]], capture: Iterable[str], *, readout: Readout | None = None,
                     truncate: bool = True) -> PassResult:
        """Several contexts (checked token ids) in one decode, context i in llama.cpp sequence i from position 0 over
        an empty KV cache; what each row computes is what a run of its context alone computes, up to the rounding of
        a longer KV cache. Returns the captures ``(name, layer) -> [n_rows, ...]`` (every context's rows one after the
        other: ``n_rows`` is the sum of their lengths) and the readout's result over those rows. ``truncate``: nothing
        after the latest tensor the captures and the readout read is computed (the later layers, the logits: then
        ``logits`` is ``[0, n_vocab]``). The pushed interventions apply to every context."""
        if not 1 <= len(contexts) <= self.n_seq_max:
            raise InputError(f"a decode holds 1 to {self.n_seq_max} contexts, got {len(contexts)}")
        n_rows = sum(len(ids) for ids in contexts)
        with self.lock:
            self.check_live()
            ops, captures, explicit = self.compile(n_rows, [], capture)
            if explicit:
                raise InputError("attention weights have no row per token: a pass over several contexts captures "
                                 "per-token tensors only")
            every_row = self.needs_every_row(captures) or getattr(readout, "every_row", False)
            b = self.backend
            indices = self.set_plan(ops + captures, explicit)
            b.set_truncate(truncate)
            try:
                if readout is not None:
                    readout.setup(b)
                b.clear_memory()
                b.decode(contexts, list(range(len(contexts))), 0, every_row)
                out = np.empty((0, self.n_vocab), np.float32) if truncate else b.logits(n_rows if every_row else len(contexts))
                captured = self.read_captures(captures, indices[len(ops):], n_rows)
                extra = readout.read(b, n_rows) if readout is not None else None
            finally:
                b.set_truncate(False)
                b.clear_plan()
            return PassResult(out, captured, [], extra)

    def generate_tokens(self, ids: list[int], n: int, temp: float, rng: np.random.Generator,
                        interventions: list[Intervention], stop_at_eog: bool,
                        on_token: Callable[[int], None] | None) -> list[int]:
        """Up to ``n`` tokens after ``ids`` under one plan (greedy when ``temp`` is 0); ``on_token`` sees each."""
        with self.lock:
            self.check_live()
            ops, _, explicit = self.compile(len(ids), interventions, ())
            b = self.backend
            self.set_plan(ops, explicit)
            out: list[int] = []
            try:
                b.clear_memory()
                b.decode([ids], [0], 0, False)
                for step in range(n):
                    logits = b.logits(1)[0].astype(np.float64)
                    if temp == 0:
                        token = int(np.argmax(logits))
                    else:
                        p = np.exp((logits - logits.max()) / temp)
                        token = int(rng.choice(self.n_vocab, p=p / p.sum()))
                    if stop_at_eog and b.is_eog(token):
                        break
                    out.append(token)
                    if on_token is not None:
                        on_token(token)
                    if step < n - 1:
                        b.decode([[token]], [0], len(ids) + step, False)
            finally:
                b.clear_plan()
            return out

    # state that stays on across passes

    @contextlib.contextmanager
    def pushed(self, *interventions: Intervention) -> Iterator[None]:
        """Within the block every pass has these interventions too. Holds the lock for the whole block: another
        thread's passes wait for its end."""
        with self.lock:
            self.interventions.extend(interventions)
            try:
                yield
            finally:
                del self.interventions[len(self.interventions) - len(interventions):]

    @contextlib.contextmanager
    def control_vector(self, directions: np.ndarray, start: int, end: int) -> Iterator[None]:
        """Within the block llama.cpp adds row L of ``directions`` (``[n_layer, n_embd]`` float32) to ``l_out-L`` for L
        in ``start..end`` (never 0) in every decode (``llama_set_adapter_cvec``; see ``pyinterp.analysis.steering.steered``)."""
        with self.lock:  # the whole block: another thread's passes must not see the vector
            self.check_live()
            if self.steering:
                raise InputError("a control vector is already applied: steered blocks do not nest (sum the vectors)")
            self.backend.set_control_vector(directions[1:], start, end)  # llama.cpp's buffer starts at layer 1
            self.steering = True
            try:
                yield
            finally:
                self.steering = False
                if not self.backend.closed:
                    self.backend.set_control_vector(None, -1, -1)

    def upload(self, key: object, make: Callable[[Backend], object]) -> object:
        """Device-side data a readout keeps for this engine's life (an SAE's weights): made once per ``key``."""
        with self.lock:
            self.check_live()
            if key not in self.uploads:
                self.uploads[key] = make(self.backend)
            return self.uploads[key]
