"""Transcoders as a readout: each layer's MLP input encoded inside the graph (top-k features and per-token
reconstruction statistics), and the MLP output replaced by the transcoders' output (error dropped) or edited by
feature changes (error kept) (native recipe: csrc/transcoder.c). The analysis is :mod:`pyinterp.circuit.replace`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np

from pyinterp.engine.backend import Backend, NativeTranscoder, attach_transcoder, transcoder_result

if TYPE_CHECKING:
    from pyinterp.engine.core import Engine


class TranscoderWeights(Protocol):
    """What the upload reads of one layer's transcoder (:class:`pyinterp.circuit.transcoder.Transcoder` is one):
    ``W_enc`` ``[d_model, d_tc]``, ``b_enc`` ``[d_tc]``, ``W_dec`` ``[d_tc, d_model]`` (a cross-layer one's
    ``[n_out, d_tc, d_model]``), ``b_dec`` ``[d_model]``, ``threshold`` and ``W_skip`` or None."""

    layer: int
    W_enc: np.ndarray
    b_enc: np.ndarray
    W_dec: np.ndarray
    b_dec: np.ndarray
    activation: str
    threshold: np.ndarray | None
    k: int | None
    W_skip: np.ndarray | None


def upload_transcoder(engine: Engine, tc: TranscoderWeights) -> NativeTranscoder:
    """The transcoder's weights on the device of its layer, uploaded once per engine and freed with it (the
    upload keeps the object alive, so its ``id``, the key, stays its own)."""
    _, native = engine.upload(("transcoder", id(tc)), lambda backend: (tc, NativeTranscoder(
        backend, tc.layer, tc.W_enc, tc.b_enc, tc.W_dec, tc.b_dec, tc.threshold, tc.W_skip, tc.activation, tc.k)))
    return native


class TranscoderReadout:
    """``natives[l]`` (uploaded weights of layer l, every layer from 0) reading ``in_name-l`` and writing
    ``out_name-l``; ``modes[l]``: encode, keep_error or drop_error; ``edits[l]``: feature -> value (or factor,
    ``scale``). Reads every row (``every_row``): a cross-layer transcoder's features meet the last layer's rows.
    ``read`` returns one ``(ids, values, stats)`` per layer (see :func:`transcoder_result`)."""

    every_row = True

    def __init__(self, natives: list[NativeTranscoder], in_name: str, out_name: str, top_k: int, modes: list[str],
                 edits: list[dict[int, float]], scale: bool) -> None:
        self.natives, self.in_name, self.out_name = natives, in_name, out_name
        self.top_k, self.modes, self.edits, self.scale = top_k, modes, edits, scale

    def setup(self, backend: Backend) -> None:
        self.indices = [attach_transcoder(backend, native, self.in_name, self.out_name, self.top_k, mode, edits,
                                          self.scale)
                        for native, mode, edits in zip(self.natives, self.modes, self.edits)]

    def read(self, backend: Backend, n_tokens: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        return [transcoder_result(backend, i, n_tokens, self.top_k) for i in self.indices]
