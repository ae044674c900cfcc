"""An SAE as a readout: its tensor encoded inside the graph (top-k features and per-token statistics), with
optional feature edits written back into the residual stream (native recipe: csrc/sae.c). The analysis is
:mod:`pyinterp.analysis.sae`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np

from pyinterp.engine.backend import Backend, NativeSAE, attach_sae, sae_result

if TYPE_CHECKING:
    from pyinterp.engine.core import Engine


class SAEWeights(Protocol):
    """What the upload reads of an SAE (:class:`pyinterp.analysis.sae.SAE` is one): ``W_enc`` ``[d_in, d_sae]``, ``b_enc``
    ``[d_sae]``, ``W_dec`` ``[d_sae, d_in]``, ``b_dec`` ``[d_in]``, ``threshold`` ``[d_sae]`` or None, its activation
    (``architecture``: standard, jumprelu, topk; ``k``) and whether ``b_dec`` is subtracted from the input."""

    W_enc: np.ndarray
    b_enc: np.ndarray
    W_dec: np.ndarray
    b_dec: np.ndarray
    threshold: np.ndarray | None
    architecture: str
    k: int | None
    apply_b_dec_to_input: bool


def upload_sae(engine: Engine, sae: SAEWeights, layer: int) -> NativeSAE:
    """The SAE's weights on the device of ``layer``, uploaded once per engine and freed with it. The upload keeps
    the SAE object alive, so its ``id`` (the key) cannot be another SAE's while the upload exists."""
    _, native = engine.upload((id(sae), layer), lambda backend: (sae, NativeSAE(
        backend, layer, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.threshold, sae.architecture, sae.k,
        sae.apply_b_dec_to_input)))
    return native


class SAEReadout:
    """``native`` (uploaded weights) encoding ``name-layer``; ``edits``: feature -> value (or factor, ``scale``).
    ``every_row``: the tensor is on the last layer, whose rows the pass keeps only where logits are wanted."""

    def __init__(self, native: NativeSAE, name: str, layer: int, top_k: int, edits: dict[int, float], scale: bool,
                 every_row: bool) -> None:
        self.native, self.name, self.layer = native, name, layer
        self.top_k, self.edits, self.scale, self.every_row = top_k, edits, scale, every_row

    def setup(self, backend: Backend) -> None:
        self.index = attach_sae(backend, self.native, self.name, self.layer, self.top_k, self.edits, self.scale)

    def read(self, backend: Backend, n_tokens: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return sae_result(backend, self.index, n_tokens, self.top_k)
