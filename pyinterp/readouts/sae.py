"""An SAE as a readout: its tensor encoded inside the graph (top-k features and per-token statistics), with
optional feature edits written back into the residual stream (native recipe: csrc/sae.c). The analysis is
:mod:`pyinterp.sae`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..backend import Backend, NativeSAE, attach_sae, sae_result

if TYPE_CHECKING:
    from ..engine import Engine
    from ..sae import SAE


def upload_sae(engine: Engine, sae: SAE, layer: int) -> NativeSAE:
    """The SAE's weights on the device of ``layer``, uploaded once per engine and freed with it. The upload keeps
    the SAE object alive, so its ``id`` (the key) cannot be another SAE's while the upload exists."""
    _, native = engine.upload((id(sae), layer), lambda backend: (sae, NativeSAE(
        backend, layer, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.threshold, sae.architecture, sae.k,
        sae.apply_b_dec_to_input)))
    return native


class SAEReadout:
    """``native`` (uploaded weights) encoding ``name-layer``; ``edits``: feature -> value (or factor, ``scale``)."""

    def __init__(self, native: NativeSAE, name: str, layer: int, top_k: int, edits: dict[int, float], scale: bool) -> None:
        self.native, self.name, self.layer = native, name, layer
        self.top_k, self.edits, self.scale = top_k, edits, scale

    def setup(self, backend: Backend) -> None:
        self.index = attach_sae(backend, self.native, self.name, self.layer, self.top_k, self.edits, self.scale)

    def read(self, backend: Backend, n_tokens: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return sae_result(backend, self.index, n_tokens, self.top_k)
