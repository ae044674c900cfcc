"""A GGUF model on the patched llama.cpp, as its user sees it: tokens, forward passes with captures and
interventions inside the ggml graph, generation, and interventions that stay on in a with-block. A façade: the
passes are :class:`pyinterp.engine.Engine`'s (``model.engine``), the interventions are
:mod:`pyinterp.interventions` objects, and the analyses (lens, attribution, patching, steering, heads, SAEs,
fidelity) are modules of their own over the engine."""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import numpy as np

from pyinterp import zoo
from pyinterp.checks import (C_INT_MAX, check_bool, check_callable, check_float, check_int, check_intervention,
                             check_prompt, check_str, show)
from pyinterp.engine.core import FLOAT_V_TYPES, KV_TYPES, Engine, default_threads, has_metal, set_verbose
from pyinterp.engine.names import Head, Patch, Planner, TensorInfo, as_list, as_tuple
from pyinterp.engine.trace import Trace
from pyinterp.errors import InputError
from pyinterp.interventions import AblateHeads, Intervention, IsolateHead, PatchRow, Target

if TYPE_CHECKING:
    from pyinterp.analysis.attribution import Attribution
    from pyinterp.analysis.lens import LogitLens

TOKEN_ATTR_NORMAL = 1 << 2  # enum llama_token_attr's flag of an ordinary token (control, byte, ... have others)


@dataclass
class Generation:
    """Tokens and text produced by :meth:`Model.generate` (the prompt not included)."""

    prompt_tokens: list[int]
    tokens: list[int]
    text: str


def default_gpu_layers() -> int:
    """``n_gpu_layers`` when none is given: ``$PYINTERP_N_GPU_LAYERS`` (``-1``: every layer); else -1 where Metal
    was loaded (Apple Silicon: every layer on the GPU, as llama.cpp's own tools do), 0 (the CPU) elsewhere."""
    value = os.environ.get("PYINTERP_N_GPU_LAYERS", "-1" if has_metal() else "0")
    try:
        return int(value)
    except ValueError:
        raise InputError(f"PYINTERP_N_GPU_LAYERS must be an integer, got {value!r}") from None


def interventions_from_args(ablate: Iterable[Head] = (), isolate: Head | None = None,
                         patch: Iterable[Patch] = ()) -> list[Intervention]:
    """The ``ablate``/``isolate``/``patch`` arguments of :meth:`Model.run` as intervention objects."""
    out: list[Intervention] = []
    heads = as_list(ablate, "ablate")
    if heads:
        out.append(AblateHeads(tuple(heads)))
    if isolate is not None:
        layer, head = Planner.pair(isolate, "isolate", "(layer, head) like (3, 4)")
        out.append(IsolateHead(layer, head))
    for item in as_list(patch, "patch"):
        name, layer, pos, vector = as_tuple(item, 4, "patch", "(name, layer, position, vector) tuples")
        out.append(PatchRow(name, layer, pos, vector))
    return out


class Model:
    """A GGUF model loaded by the patched llama.cpp.

    ``path`` is a GGUF file or a known name (``"smollm2"``, the default, or ``"gemma3"``).

    Defaults favour faithfulness over speed: every layer runs the explicit attention path
    (``flash_attn=False``) over an F32 KV cache (``type_k``/``type_v`` ``"f32"``), so K·Q, the softmax and
    the weighted sum of V are computed and summed in F32 on every backend, and a run computes the same
    numbers whether or not it captures attention. ``flash_attn=None`` lets llama.cpp decide and ``True``
    forces flash attention (faster; K and V go in as F16 and, on the CPU, V is summed in F16; layers whose
    attention weights are captured still run the explicit path). ``"f16"`` is llama.cpp's KV cache type:
    half the memory, and the explicit path then rounds the attention weights to F16 before multiplying V.
    ``rpc`` ("host:port" of a ggml RPC server, see ``pyinterp.engine.rpc``) offloads ``n_gpu_layers`` layers to that
    server (builds with ``-DGGML_RPC=ON``). C memory is freed by :meth:`close` (or ``with Model() as m:``).
    ``model.engine`` is the :class:`pyinterp.engine.Engine` that runs its passes.
    """

    def __init__(self, path: str | os.PathLike | None = None, *, n_ctx: int = 2048, n_threads: int | None = None,
                 n_gpu_layers: int | None = None, flash_attn: bool | None = False, type_k: str = "f32", type_v: str = "f32",
                 rpc: str | None = None, verbose: bool = False) -> None:
        set_verbose(check_bool(verbose, "verbose"))
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise InputError(f"a model is a GGUF path or a known name, got {show(path)}")
        n_gpu_layers = default_gpu_layers() if n_gpu_layers is None else check_int(n_gpu_layers, "n_gpu_layers", -C_INT_MAX)
        n_ctx = check_int(n_ctx, "n_ctx", 8, None)  # the model's training context bounds it
        n_threads = default_threads() if n_threads is None else check_int(n_threads, "n_threads", 1)
        if flash_attn is not None:
            check_bool(flash_attn, "flash_attn")
        type_k, type_v = check_str(type_k, "type_k", list(KV_TYPES)), check_str(type_v, "type_v", list(KV_TYPES))
        if rpc is not None:
            check_str(rpc, "rpc")
        self.path = zoo.resolve(path)
        zoo.check_gguf(self.path)
        if type_v not in FLOAT_V_TYPES and flash_attn is False:
            raise InputError(f"a quantized V cache ({type_v}) needs flash attention (flash_attn=None or True)")
        self.engine = Engine.load(self.path, n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers,
                                  flash_attn=flash_attn, type_k=type_k, type_v=type_v, rpc=rpc)
        e = self.engine
        self.arch: str = e.arch
        self.n_layer, self.n_head, self.n_head_kv, self.n_embd = e.n_layer, e.n_head, e.n_head_kv, e.n_embd
        self.n_vocab: int = e.n_vocab
        self.n_ctx: int = e.n_ctx

    # lifetime

    def close(self) -> None:
        """Free the context and the model (idempotent); waits for a pass running in another thread."""
        if getattr(self, "engine", None) is not None:
            self.engine.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if not sys.is_finalizing():  # at exit the process frees it all, and cffi's types may be gone already
            self.close()

    def __repr__(self) -> str:
        return (f"Model({self.path.name!r}, arch={self.arch}, n_layer={self.n_layer}, n_head={self.n_head}, "
                f"n_head_kv={self.n_head_kv}, n_embd={self.n_embd}, n_vocab={self.n_vocab}, n_ctx={self.n_ctx})")

    def layer_device(self, layer: int) -> str:
        """The ggml device that computes ``layer`` (-1: the output layer), e.g. ``CPU``, ``CUDA0``, ``RPC0[host:port]``."""
        if not -1 <= check_int(layer, "layer") < self.n_layer:
            raise InputError(f"layer {layer} out of range (the model has {self.n_layer} layers: 0..{self.n_layer - 1}, or -1)")
        return self.engine.layer_device(layer)

    # tokens

    def tokenize(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; ``add_bos`` None follows the model's metadata. Special tokens are parsed."""
        check_str(text, "text")
        if add_bos is not None:
            check_bool(add_bos, "add_bos")
        return self.engine.tokenize(text, add_bos)

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of token ids (special tokens rendered)."""
        return self.engine.detokenize(self.engine.check_ids(ids))

    def token_bytes(self, token: int) -> bytes:
        """The bytes of one token's piece (special tokens rendered); may be part of a UTF-8 character."""
        (token,) = self.engine.check_ids([token])
        return self.engine.token_bytes(token)

    def token_str(self, token: int) -> str:
        """The text piece of one token (special tokens rendered, partial UTF-8 characters replaced)."""
        return self.token_bytes(token).decode("utf-8", "replace")

    def ordinary_tokens(self) -> np.ndarray:
        """Ids of the ordinary text tokens, ``[n]`` int32: attribute NORMAL, so no control, byte, user-defined,
        unused or unknown tokens."""
        return np.flatnonzero(self.engine.token_attrs() & TOKEN_ATTR_NORMAL).astype(np.int32)

    def prompt_ids(self, tokens_or_text: str | Sequence[int]) -> list[int]:
        """The token ids a run would use: text tokenized (BOS as the model wants), or ids checked against
        the vocabulary; either way non-empty and no longer than the context."""
        prompt = check_prompt(tokens_or_text)
        ids = self.tokenize(prompt) if isinstance(prompt, str) else self.engine.check_ids(prompt)
        if not ids:
            raise InputError("the prompt is empty")
        if len(ids) > self.n_ctx:
            raise InputError(f"the prompt has {len(ids)} tokens but the context holds {self.n_ctx}; "
                                f"load the model with a larger n_ctx")
        return ids

    # the graph

    def tensor_info(self) -> TensorInfo:
        """Names (and ggml shapes) of the tensors this model's graph offers to captures and interventions."""
        self.engine.check_live()
        return self.engine.tensor_info()

    def tensor_names(self) -> list[str]:
        """Base names of the tensors in this model's graph (``l_out``, ``attn_scores``, ...)."""
        return sorted(self.tensor_info().layers)

    # forward passes

    def logit_lens(self, tokens_or_text: str | Sequence[int], tensor: str = "l_out", top_k: int = 10, norm: bool = True,
                   layers: Iterable[int] | None = None, targets: Iterable[int | str] = (),
                   positions: Iterable[int] | None = None, temp: float = 1.0, entropy: bool = False) -> LogitLens:
        """The logit lens of ``tensor``: top-k tokens and the targets' probabilities and ranks per layer and
        position, computed in the graph; see :func:`pyinterp.analysis.lens.logit_lens`."""
        from pyinterp.analysis.lens import logit_lens

        return logit_lens(self, tokens_or_text, tensor, top_k, norm, layers, targets, positions, temp, entropy)

    def logit_attribution(self, tokens_or_text: str | Sequence[int], target: int | str | None = None,
                          position: int = -1, heads: bool = True) -> Attribution:
        """Direct logit attribution of ``target`` (default the top prediction) at ``position`` to the residual
        stream's terms and each attention head; see :func:`pyinterp.analysis.attribution.logit_attribution`."""
        from pyinterp.analysis.attribution import logit_attribution

        return logit_attribution(self, tokens_or_text, target, position, heads)

    def graph(self, tokens_or_text: str | Sequence[int], *, capture: Iterable[str] = (), ablate: Iterable[Head] = (),
              isolate: Head | None = None, patch: Iterable[Patch] = (),
              interventions: Iterable[Intervention] = ()) -> list[str]:
        """One line per node of the graph llama.cpp builds for this prompt (with these interventions):
        name, op, type, ggml shape and the sources it reads."""
        self.engine.check_live()
        ids = self.prompt_ids(tokens_or_text)
        every = [*interventions_from_args(ablate, isolate, patch), *as_list(interventions, "interventions")]
        return self.engine.run(ids, every, capture, graph=True).graph

    def run(self, tokens_or_text: str | Sequence[int], *, capture: Iterable[str] = (), ablate: Iterable[Head] = (),
            isolate: Head | None = None, patch: Iterable[Patch] = (), interventions: Iterable[Intervention] = (),
            logits: str | None = "all") -> Trace:
        """One forward pass over a prompt (text or token ids) from an empty KV cache.

        capture: tensor names (``"l_out"``, ``"attn_scores"``, ...) for every layer, or ``"name-layer"``, or
        TransformerLens names (``"blocks.5.hook_resid_post"``); the trace takes the same names as keys.
        ablate: ``(layer, head)`` pairs whose attention weights are zeroed (so their output is zero).
        isolate: ``(layer, head)``: ablate every other head of that layer.
        patch: ``(name, layer, position, vector)``: replace that row of ``name-layer`` with ``vector``.
        interventions: :mod:`pyinterp.interventions` objects (``AddVector`` at chosen positions, ``PatchHead``, ...).
        logits: ``"all"`` (``trace.logits`` ``[n_tokens, n_vocab]``), ``"last"`` (``[1, n_vocab]``: llama.cpp then
        unembeds and copies only the last row, much less work on long prompts and large vocabularies) or
        None (``trace.logits`` is None).
        Interventions of the ``ablated``/``isolated``/``patched``/``intervened`` context managers apply too.
        """
        self.engine.check_live()
        if logits not in ("all", "last", None):
            raise InputError(f"logits must be 'all', 'last' or None, got {logits!r}")
        ids = self.prompt_ids(tokens_or_text)
        every = [*interventions_from_args(ablate, isolate, patch), *as_list(interventions, "interventions")]
        done = self.engine.run(ids, every, capture, logits="all" if logits == "all" else "last")
        out = None if logits is None else done.logits[-1:] if logits == "last" else done.logits
        return Trace(ids, out, done.captured, [self.token_str(t) for t in ids], resolve=self.engine.planner().key)

    def generate(self, prompt: str | Sequence[int], n: int, *, temp: float = 0.0, seed: int | None = None,
                 ablate: Iterable[Head] = (), isolate: Head | None = None, patch: Iterable[Patch] = (),
                 interventions: Iterable[Intervention] = (), stop_at_eog: bool = True,
                 on_token: Callable[[int], None] | None = None) -> Generation:
        """Generate up to ``n`` tokens after ``prompt``; greedy when ``temp`` is 0.

        Interventions (arguments and context managers) stay on for every generated token; those at chosen
        positions apply to the prompt positions they name. The graph is built once for the prompt and once
        for the first generated token, then reused. ``on_token`` is called with each new token (progress).
        """
        self.engine.check_live()
        n = check_int(n, "n", 0)
        temp = check_float(temp, "temp", 0)
        if seed is not None:
            check_int(seed, "seed", 0, None)
        check_bool(stop_at_eog, "stop_at_eog")
        check_callable(on_token, "on_token")
        ids = self.prompt_ids(prompt)
        if len(ids) + n > self.n_ctx:
            raise InputError(f"prompt ({len(ids)} tokens) plus {n} new tokens exceed the context of {self.n_ctx}")
        every = [*interventions_from_args(ablate, isolate, patch), *as_list(interventions, "interventions")]
        out = self.engine.generate_tokens(ids, n, temp, np.random.default_rng(seed), every, stop_at_eog, on_token)
        return Generation(ids, out, self.detokenize(out))

    # interventions that stay on

    @contextlib.contextmanager
    def intervened(self, *interventions: Intervention) -> Iterator["Model"]:
        """Within the block, every run and generation has these interventions (checked at each run). The block
        holds the model's lock: another thread's passes wait for its end."""
        for iv in interventions:
            check_intervention(iv)
        with self.engine.pushed(*interventions):
            yield self

    @contextlib.contextmanager
    def ablated(self, heads: Iterable[Head]) -> Iterator["Model"]:
        """Within the block, every run and generation has these ``(layer, head)`` pairs ablated."""
        every = interventions_from_args(ablate=heads)
        for iv in every:
            iv.ops(Target(self.engine.planner(), 1))
        with self.intervened(*every):
            yield self

    @contextlib.contextmanager
    def isolated(self, layer: int, head: int) -> Iterator["Model"]:
        """Within the block, only ``head`` of ``layer`` contributes to that layer's attention output."""
        with self.engine.lock:
            if any(isinstance(iv, IsolateHead) for iv in self.engine.interventions):
                raise InputError("a head is already isolated")
            iv = IsolateHead(layer, head)
            iv.ops(Target(self.engine.planner(), 1))
            with self.intervened(iv):
                yield self

    @contextlib.contextmanager
    def patched(self, patches: Iterable[Patch]) -> Iterator["Model"]:
        """Within the block, every run and generation has these rows replaced (checked at each run)."""
        with self.intervened(*interventions_from_args(patch=patches)):
            yield self
