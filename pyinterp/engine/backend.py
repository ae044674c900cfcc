"""The llama.cpp backend: the one module that calls the native library (``pyinterp.engine._ffi``).

It owns a model, a context and pyinterp's native state, and offers what the rest of pyinterp needs in
numpy terms: tokens, the op table (:class:`pyinterp.interventions.Op` records), decoding several
sequences at once, the KV cache's sequences, captures, the lens and attribution readouts and llama.cpp's
control vectors. Nothing here knows about analyses.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Sequence

import numpy as np

from pyinterp.engine import _ffi
from pyinterp.engine._ffi import ffi, lib, set_verbose  # noqa: F401  (set_verbose: for the façade, which does not import _ffi)
from pyinterp.errors import InputError, PyinterpError
from pyinterp.interventions.base import OP_KINDS, Op

# KV cache types llama.cpp accepts (-ctk/-ctv), as enum ggml_type values
KV_TYPES = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7}

N_SEQ_MAX = 64  # sequences one decode may hold (llama.cpp allows 256), fewer when n_ctx is smaller


def _with_buffer(ctype: str, cap: int, call) -> tuple[object, int]:
    """``call(buf, cap)`` for llama.cpp functions that return minus the size they need when ``buf`` is too
    small: retried once with that size. Returns the buffer and the call's result."""
    buf = ffi.new(f"{ctype}[]", cap)
    n = call(buf, cap)
    if n < 0:
        buf = ffi.new(f"{ctype}[]", -n)
        n = call(buf, -n)
    return buf, n


def _llama_error(what: str) -> PyinterpError:
    detail = _ffi.first_error()
    return PyinterpError(f"{what}: {detail}" if detail else what)


def has_metal() -> bool:
    """Whether ggml's Metal backend was loaded (an Apple build on a Mac with a GPU)."""
    return "MTL" in _ffi.LOADED.backends  # the registry name of ggml-metal


def has_rpc() -> bool:
    """Whether this build has ggml's RPC backend (``CMAKE_ARGS=-DGGML_RPC=ON``)."""
    return bool(lib.pi_has_rpc())


def rpc_serve(endpoint: str, n_threads: int) -> None:
    """Serve this process's CPU to ggml RPC clients at ``endpoint``; returns only when the server stops."""
    lib.pi_rpc_serve(endpoint.encode(), n_threads)


def check_rpc(endpoint: str) -> None:
    """ggml aborts the process when an RPC server cannot be reached: look first."""
    if not has_rpc():
        raise InputError("this pyinterp was built without RPC; reinstall with CMAKE_ARGS=-DGGML_RPC=ON pip install .")
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"RPC endpoint must be host:port, got {endpoint!r}")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise PyinterpError(f"cannot reach the RPC server at {endpoint}: {e.strerror or e}") from None


class Backend:
    """One GGUF model in a llama.cpp context of ``n_ctx`` cells shared by up to ``n_seq_max`` sequences."""

    def __init__(self, path: Path, *, n_ctx: int, n_threads: int, n_gpu_layers: int, flash: int, type_k: str,
                 type_v: str, rpc: str | None) -> None:
        self._model = self._ctx = self._state = ffi.NULL
        self._path = path
        if rpc is not None:
            check_rpc(rpc)
        _ffi.clear_errors()
        self._model = lib.pi_model_load(str(path).encode(), n_gpu_layers, rpc.encode() if rpc else ffi.NULL)
        if self._model == ffi.NULL:
            raise _llama_error(f"cannot load model {path}")
        n_ctx_train = lib.llama_model_n_ctx_train(self._model)
        if n_ctx > n_ctx_train:
            self.close()
            raise InputError(f"n_ctx {n_ctx} exceeds the {n_ctx_train} tokens {path.name} was trained on")
        # llama.cpp keeps at most n_ctx outputs, and holds one per sequence
        self.n_seq_max: int = min(N_SEQ_MAX, n_ctx)
        self._ctx = lib.pi_context_new(self._model, n_ctx, n_threads, flash, KV_TYPES[type_k], KV_TYPES[type_v],
                                       self.n_seq_max)
        if self._ctx == ffi.NULL:
            self.close()
            raise _llama_error(f"cannot create a context of {n_ctx} tokens for {path}")
        self._state = lib.pi_state_new(self._ctx)
        if self._state == ffi.NULL:
            self.close()
            raise PyinterpError("cannot allocate pyinterp's intervention buffers")
        self._vocab = lib.llama_model_get_vocab(self._model)
        self._memory = lib.llama_get_memory(self._ctx)
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

    def close(self) -> None:
        """Free the state, the context and the model (idempotent)."""
        if getattr(self, "_state", ffi.NULL) != ffi.NULL:
            lib.pi_state_free(self._state)
            self._state = ffi.NULL
        if getattr(self, "_ctx", ffi.NULL) != ffi.NULL:
            lib.llama_free(self._ctx)
            self._ctx = ffi.NULL
        if getattr(self, "_model", ffi.NULL) != ffi.NULL:
            lib.llama_model_free(self._model)
            self._model = ffi.NULL

    @property
    def closed(self) -> bool:
        return self._ctx == ffi.NULL

    def error(self, what: str) -> PyinterpError:
        """The native layer's last error, as ``what: reason``."""
        return PyinterpError(f"{what}: {ffi.string(lib.pi_last_error(self._state)).decode()}")

    def layer_device(self, layer: int) -> str:
        return ffi.string(lib.ggml_backend_dev_name(lib.llama_model_layer_dev(self._model, layer))).decode()

    # tokens

    def add_bos(self) -> bool:
        return bool(lib.llama_vocab_get_add_bos(self._vocab))

    def special_tokens(self) -> tuple[int | None, int | None]:
        """The vocabulary's BOS and EOS tokens (None: it has none)."""
        bos, eos = lib.llama_vocab_bos(self._vocab), lib.llama_vocab_eos(self._vocab)
        return (bos if bos >= 0 else None), (eos if eos >= 0 else None)

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as e:  # undecodable bytes of a command line or file name, as surrogates
            raise InputError(f"the text to tokenize is not UTF-8 (character {e.start} is {e.object[e.start]!r})") from None
        out, n = _with_buffer("llama_token", len(data) + 8,
                              lambda buf, cap: lib.llama_tokenize(self._vocab, data, len(data), buf, cap, add_bos, True))
        if n < 0:
            raise PyinterpError("tokenization failed")
        return list(out[0:n])

    def detokenize(self, ids: Sequence[int]) -> str:
        arr = ffi.new("llama_token[]", list(ids))
        buf, n = _with_buffer("char", 8 * len(ids) + 16,
                              lambda buf, cap: lib.llama_detokenize(self._vocab, arr, len(ids), buf, cap, False, True))
        return ffi.unpack(buf, n).decode("utf-8", "replace")

    def token_bytes(self, token: int) -> bytes:
        buf, n = _with_buffer("char", 64, lambda buf, cap: lib.llama_token_to_piece(self._vocab, token, buf, cap, 0, True))
        return ffi.unpack(buf, n)

    def token_attrs(self) -> np.ndarray:
        """``enum llama_token_attr`` of every token, ``[n_vocab]``."""
        return np.array([lib.llama_vocab_get_attr(self._vocab, t) for t in range(self.n_vocab)])

    def is_eog(self, token: int) -> bool:
        return bool(lib.llama_vocab_is_eog(self._vocab, token))

    # the plan

    def set_explicit(self, layers: set[int]) -> None:
        """Run the explicit attention path (which names ``attn_scores``) on exactly these layers."""
        for il in layers ^ self._explicit:
            lib.llama_set_attn_explicit(self._ctx, il, il in layers)
        self._explicit = set(layers)

    def clear_plan(self) -> None:
        lib.pi_plan_clear(self._state)

    def add_op(self, op: Op) -> int:
        """Add one record to the native op table; returns its index (what :meth:`op_result` reads)."""
        positions = ffi.NULL if op.positions is None else ffi.new("int32_t[]", list(op.positions))
        n_positions = 0 if op.positions is None else len(op.positions)
        if op.data is None:
            data, ne = ffi.NULL, ffi.new("int64_t[4]", [0, 0, 0, 0])
        else:
            array = np.ascontiguousarray(op.data, dtype=np.float32)
            dims = list(reversed(array.shape)) + [1] * (4 - array.ndim)
            data, ne = ffi.from_buffer("float[]", array), ffi.new("int64_t[4]", dims)
        i = lib.pi_op_add(self._state, OP_KINDS[op.kind], op.name.encode(), op.layer, op.seq, positions, n_positions,
                          data, ne, op.per_row)
        if i < 0:
            raise self.error(f"{op.kind} {op.name}-{op.layer}")
        return i

    def set_record(self, record: bool) -> None:
        """Record every tensor offered to the hook (and keep the hook set, so the graph is seen)."""
        lib.pi_set_record(self._state, record)

    def seen(self) -> list[tuple[str, list[int]]]:
        """Every ``name-layer`` offered to the hook during the last build, with its ggml ``ne``."""
        ne = ffi.new("int64_t[4]")
        return [(ffi.string(lib.pi_seen_name(self._state, i, ne)).decode(), list(ne))
                for i in range(lib.pi_n_seen(self._state))]

    def graph_lines(self) -> list[str]:
        return [ffi.string(lib.pi_graph_node_line(self._state, i)).decode() for i in range(lib.pi_graph_n_nodes(self._state))]

    def n_builds(self) -> int:
        """Graphs built while the hook was set, so far (a reused graph is not built again)."""
        return lib.pi_n_builds(self._state)

    def set_truncate(self, truncate: bool) -> None:
        """Compute only what the captures and SAEs need, nothing after the latest tensor they read (no logits)."""
        lib.pi_set_truncate(self._state, truncate)

    def n_skipped(self) -> int:
        """Graph nodes the last build left out of the computation (an inject op's unneeded layers)."""
        return lib.pi_n_skipped(self._state)

    # decoding

    def decode(self, sequences: Sequence[Sequence[int]], seq_ids: Sequence[int], pos0: int | Sequence[int],
               all_logits: bool) -> None:
        """Decode several sequences in one batch: ``sequences[i]`` (token ids) in llama.cpp sequence ``seq_ids[i]`` at
        positions ``pos0[i]..`` (one ``pos0`` for all). Logits are kept for every token, or for the last of each
        sequence."""
        lengths = [len(s) for s in sequences]
        starts = [pos0] * len(lengths) if isinstance(pos0, int) else list(pos0)
        tokens = np.ascontiguousarray(np.concatenate([np.asarray(s) for s in sequences]), dtype=np.int32)
        _ffi.clear_errors()
        ret = lib.pi_decode(self._state, ffi.from_buffer("llama_token[]", tokens), len(lengths),
                            ffi.new("int32_t[]", lengths), ffi.new("int32_t[]", starts), ffi.new("int32_t[]", list(seq_ids)),
                            all_logits)
        if ret == -100:
            raise self.error(f"{len(tokens)} tokens at position {min(starts)}")
        if ret == -101:
            raise self.error(f"{len(lengths)} sequences of {len(tokens)} tokens")
        if ret != 0:
            raise _llama_error(f"llama_decode failed with code {ret}")

    def logits(self, n_rows: int) -> np.ndarray:
        """The logits of the last decode's output rows, ``[n_rows, n_vocab]``; a PyinterpError when any is NaN or
        infinite (every pass reads its logits here, so no such number reaches a result)."""
        ptr = lib.llama_get_logits(self._ctx)
        out = np.frombuffer(ffi.buffer(ptr, n_rows * self.n_vocab * 4), dtype=np.float32).reshape(n_rows, self.n_vocab).copy()
        if not np.all(np.isfinite(out)):
            raise PyinterpError("the model produced NaN/inf logits: its weights (or the values an intervention or "
                                "control vector put in) are not finite or overflow float32")
        return out

    def op_result(self, i: int, rank: int, n0: int | None = None) -> np.ndarray | None:
        """What capture op ``i`` kept in the last graph in numpy order (ggml's ``ne`` reversed, ``rank`` axes),
        each row cut to its first ``n0`` values; None when the tensor was not in the graph."""
        ne = ffi.new("int64_t[4]")
        if not lib.pi_op_shape(self._state, i, ne):
            return None
        dims = list(ne)
        n0 = dims[0] if n0 is None else n0
        out = np.empty([*reversed(dims[1:rank]), n0], dtype=np.float32)
        if lib.pi_op_read(self._state, i, ffi.from_buffer("float[]", out), out.size, n0) != 0:
            raise self.error(f"capture {i}")
        return out

    # the KV cache

    def clear_memory(self) -> None:
        lib.llama_memory_clear(self._memory, True)

    def drop_positions(self, seq: int, start: int) -> None:
        """Free sequence ``seq``'s cells of positions ``start..``; the next decode refills them in order."""
        lib.llama_memory_seq_rm(self._memory, seq, start, -1)

    # analyses at the unembedding

    def set_lens(self, tensor: str, norm: bool, top_k: int, targets: list[int], positions: list[int],
                 out_positions: list[int] | None = None, temp: float = 1.0, entropy: bool = False) -> None:
        """The lens of ``tensor`` at the rows ``positions`` only (they alone are unembedded; ``out_positions``: the
        same tokens as indices among the decode's outputs, for a pass that keeps only those on its last layer), its
        probabilities at temperature ``temp``; ``entropy``: their entropy too."""
        out = ffi.NULL if out_positions is None else ffi.new("int32_t[]", out_positions)
        if lib.pi_set_lens(self._state, tensor.encode(), norm, top_k, temp, entropy, ffi.new("int32_t[]", positions),
                           out, len(positions)) != 0:
            raise self.error("logit lens")
        if targets and lib.pi_set_lens_targets(self._state, ffi.new("int32_t[]", targets), len(targets)) != 0:
            raise self.error("logit lens")

    def lens_result(self, il: int, top_k: int, n_targets: int, n_positions: int,
                    entropy: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None] | None:
        """Layer ``il``'s lens: top-k ids and probabilities ``[n_positions, k]`` (unordered), the targets'
        statistics ``[n_positions, n_targets, 3]`` and the entropy ``[n_positions]`` (None unless ``entropy``);
        None when the layer had no such tensor."""
        ids = np.empty((n_positions, top_k), dtype=np.int32)
        probs = np.empty((n_positions, top_k), dtype=np.float32)
        ret = lib.pi_lens_read(self._state, il, ffi.from_buffer("int32_t[]", ids), ffi.from_buffer("float[]", probs), ids.size)
        if ret < 0:
            raise self.error("logit lens")
        if ret == 1:
            return None
        stats = np.empty((n_positions, n_targets, 3), dtype=np.float32)
        if n_targets and lib.pi_lens_targets_read(self._state, il, ffi.from_buffer("float[]", stats), stats.size) != 0:
            raise self.error("logit lens")
        if not entropy:
            return ids, probs, stats, None
        h = np.empty(n_positions, dtype=np.float32)
        if lib.pi_lens_entropy_read(self._state, il, ffi.from_buffer("float[]", h), h.size) != 0:
            raise self.error("logit lens")
        return ids, probs, stats, h

    def set_attribution(self, terms: list[tuple[str, int]], by_head: list[bool], target: int) -> None:
        keep = [ffi.new("char[]", name.encode()) for name, _ in terms]
        if lib.pi_set_attribution(self._state, str(self._path).encode(), ffi.new("const char *[]", keep), ffi.new("int32_t[]", [il for _, il in terms]),
                                  ffi.new("bool[]", by_head), len(terms), ffi.new("int32_t[]", [target]), 1) != 0:
            raise self.error("logit attribution")

    def attribution_result(self, i: int, n_tokens: int) -> np.ndarray | None:
        """Term ``i``'s contribution ``[n_tokens]``; None when the term was not in the graph."""
        out = np.empty(n_tokens, dtype=np.float32)
        ret = lib.pi_attribution_read(self._state, i, ffi.from_buffer("float[]", out), out.size)
        if ret < 0:
            raise self.error("logit attribution")
        return None if ret == 1 else out

    def attribution_heads(self, i: int, n_tokens: int) -> np.ndarray:
        """Each head's share of term ``i``, ``[n_tokens, n_head]``."""
        out = np.empty((n_tokens, self.n_head), dtype=np.float32)
        if lib.pi_attribution_heads_read(self._state, i, ffi.from_buffer("float[]", out), out.size) != 0:
            raise self.error("per-head logit attribution")
        return out

    # llama.cpp's control vectors

    def set_control_vector(self, rows: np.ndarray | None, start: int, end: int) -> None:
        """llama.cpp adds row L-1 of ``rows`` ``[n_layer-1, n_embd]`` to ``l_out-L`` for L in ``start..end``; None
        removes it (``llama_set_adapter_cvec``)."""
        _ffi.clear_errors()
        if rows is None:
            lib.llama_set_adapter_cvec(self._ctx, ffi.NULL, 0, self.n_embd, -1, -1)
            return
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if lib.llama_set_adapter_cvec(self._ctx, ffi.from_buffer("float[]", rows), rows.size, self.n_embd, start, end):
            raise _llama_error("cannot apply the control vector")


def default_threads() -> int:
    """The cores this process may run on (the affinity mask where the OS has one, as on Linux), else all."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class NativeSAE:
    """An SAE's weights on the device of one layer (``pi_sae_load``), freed with this object."""

    ACTIVATIONS = {"standard": lib.PI_SAE_RELU, "jumprelu": lib.PI_SAE_JUMPRELU, "topk": lib.PI_SAE_TOPK}

    def __init__(self, backend: Backend, layer: int, w_enc: np.ndarray, b_enc: np.ndarray, w_dec: np.ndarray,
                 b_dec: np.ndarray, threshold: np.ndarray | None, architecture: str, k: int | None, apply_b_dec: bool) -> None:
        d_in, d_sae = w_enc.shape
        keep = [np.ascontiguousarray(a, dtype=np.float32) for a in (w_enc.T, b_enc, w_dec, w_dec.T, b_dec)]
        threshold = ffi.NULL if threshold is None else ffi.from_buffer("float[]", np.ascontiguousarray(threshold, dtype=np.float32))
        handle = lib.pi_sae_load(backend._state, layer, d_in, d_sae, *(ffi.from_buffer("float[]", a) for a in keep),
                                 threshold, self.ACTIVATIONS[architecture], k or 0, apply_b_dec)
        if handle == ffi.NULL:
            raise backend.error("SAE")
        self.handle = ffi.gc(handle, lib.pi_sae_free)


def attach_sae(backend: Backend, sae: NativeSAE, name: str, layer: int, top_k: int, edits: dict[int, float],
               scale: bool) -> int:
    """Encode ``name-layer`` with ``sae`` in the next decodes (until the plan is cleared); ``edits``: feature ->
    value (or factor, ``scale``). Returns the index :func:`sae_result` reads."""
    ids, values = list(edits), [float(v) for v in edits.values()]
    i = lib.pi_sae_attach(backend._state, sae.handle, name.encode(), layer, top_k, ffi.new("int32_t[]", ids),
                          ffi.new("float[]", values), len(ids), scale)
    if i < 0:
        raise backend.error("SAE")
    return i


def _sparse_result(backend: Backend, read, what: str, i: int, n_rows: int, top_k: int,
                   n_stats: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What ``read`` (``pi_sae_read``, ``pi_tc_read``) gives of readout ``i``'s last decode: ids and values
    ``[n_rows, top_k]`` and statistics ``[n_rows, n_stats]``."""
    ids = np.empty((n_rows, top_k), dtype=np.int32)
    values = np.empty((n_rows, top_k), dtype=np.float32)
    stats = np.empty((n_rows, n_stats), dtype=np.float32)
    if read(backend._state, i, ffi.from_buffer("int32_t[]", ids), ffi.from_buffer("float[]", values),
            ffi.from_buffer("float[]", stats), n_rows) != 0:
        raise backend.error(what)
    return ids, values, stats


def sae_result(backend: Backend, i: int, n_rows: int, top_k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SAE ``i``'s last decode: feature ids and values ``[n_rows, top_k]`` (unordered) and per row
    ``[n_rows, 5]``: |x - x_hat|^2, |x|^2, x.x_hat, |x_hat|^2, active features."""
    return _sparse_result(backend, lib.pi_sae_read, "SAE", i, n_rows, top_k, 5)


class NativeTranscoder:
    """A transcoder's weights on the device of its layer (``pi_tc_load``), freed with this object. ``w_dec``:
    ``[d_tc, d_model]``, or ``[n_out, d_tc, d_model]`` for one writing to layers ``layer..layer + n_out - 1``."""

    ACTIVATIONS = {"relu": lib.PI_SAE_RELU, "jumprelu": lib.PI_SAE_JUMPRELU, "topk": lib.PI_SAE_TOPK}

    def __init__(self, backend: Backend, layer: int, w_enc: np.ndarray, b_enc: np.ndarray, w_dec: np.ndarray,
                 b_dec: np.ndarray, threshold: np.ndarray | None, w_skip: np.ndarray | None, activation: str,
                 k: int | None) -> None:
        d_model, d_tc = w_enc.shape
        decoders = w_dec if w_dec.ndim == 3 else w_dec[None]
        keep = [np.ascontiguousarray(a, dtype=np.float32) for a in (w_enc.T, b_enc, decoders.transpose(0, 2, 1), b_dec)]
        optional = [ffi.NULL if a is None else ffi.from_buffer("float[]", np.ascontiguousarray(a, dtype=np.float32))
                    for a in (threshold, None if w_skip is None else w_skip.T)]
        handle = lib.pi_tc_load(backend._state, layer, d_model, d_tc, len(decoders),
                                *(ffi.from_buffer("float[]", a) for a in keep), *optional,
                                self.ACTIVATIONS[activation], k or 0)
        if handle == ffi.NULL:
            raise backend.error(f"transcoder of layer {layer}")
        self.handle = ffi.gc(handle, lib.pi_tc_free)


TC_MODES = {"encode": lib.PI_TC_ENCODE, "keep_error": lib.PI_TC_KEEP_ERROR, "drop_error": lib.PI_TC_DROP_ERROR}


def attach_transcoder(backend: Backend, tc: NativeTranscoder, in_name: str, out_name: str, top_k: int, mode: str,
                      edits: dict[int, float], scale: bool) -> int:
    """Encode ``in_name`` of the transcoder's layer in the next decodes and, at ``out_name``, keep its statistics
    and make the output as ``mode`` says (a key of :data:`TC_MODES`); ``edits``: feature -> value (or factor,
    ``scale``). Returns the index :func:`transcoder_result` reads."""
    ids, values = list(edits), [float(v) for v in edits.values()]
    i = lib.pi_tc_attach(backend._state, tc.handle, in_name.encode(), out_name.encode(), top_k, TC_MODES[mode],
                         ffi.new("int32_t[]", ids), ffi.new("float[]", values), len(ids), scale)
    if i < 0:
        raise backend.error("transcoder")
    return i


def transcoder_result(backend: Backend, i: int, n_rows: int, top_k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Transcoder ``i``'s last decode: feature ids and values ``[n_rows, top_k]`` (unordered) and per row
    ``[n_rows, 3]``: |out - y|^2, |out|^2, active features."""
    return _sparse_result(backend, lib.pi_tc_read, "transcoder", i, n_rows, top_k, 3)
