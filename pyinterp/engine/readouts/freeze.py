"""The local replacement model of one prompt (native recipe: csrc/freeze.c): a readout that measures the scale
``1/rms(x)`` each RMS norm applies to each token in a normal pass, and one that freezes the norms at such scales
and the attention at given weights, so that the graph is linear in the residual stream. The analysis is
:mod:`pyinterp.circuit.build`."""

from __future__ import annotations

import numpy as np

from pyinterp.engine.backend import Backend
from pyinterp.engine._ffi import ffi, lib


class NormScales:
    """Measures the per-token scale of each norm ``(name, layer)`` (a tensor llama.cpp builds as
    ``rms_norm(x) * weight``; layer -1: outside the layers, e.g. ``result_norm``)."""

    def __init__(self, norms: list[tuple[str, int]]) -> None:
        self.norms = norms
        self.every_row = True  # the last layer's norms are read at every token

    def setup(self, backend: Backend) -> None:
        self.indices = []
        for name, il in self.norms:
            i = lib.pi_norm_measure(backend._state, name.encode(), il)
            if i < 0:
                raise backend.error(f"norm {name}-{il}")
            self.indices.append(i)

    def read(self, backend: Backend, n_tokens: int) -> dict[tuple[str, int], np.ndarray]:
        """``(name, layer)`` -> ``[n_tokens]`` the scale of each token."""
        out = {}
        for key, i in zip(self.norms, self.indices):
            scale = np.empty(n_tokens, dtype=np.float32)
            if lib.pi_norm_scale_read(backend._state, i, ffi.from_buffer("float[]", scale), n_tokens) != 0:
                raise backend.error(f"norm {key[0]}-{key[1]}")
            out[key] = scale
        return out


class Frozen:
    """Freezes the norms at ``scales`` (``(name, layer)`` -> ``[n_pos]``) and each layer's attention at ``weights``
    (layer -> ``[n_head, n_pos query, n_pos key]``) in a decode of sequences that each hold the prompt's ``n_pos``
    tokens, and replaces the tensors ``rows`` names (``(name, layer)`` -> ``[n_rows, width]``, row i for token i of
    the decode: each sequence its own) without computing what only led to them. Reads nothing itself (the pass's
    captures read the frozen graph)."""

    def __init__(self, scales: dict[tuple[str, int], np.ndarray], weights: dict[int, np.ndarray],
                 rows: dict[tuple[str, int], np.ndarray]) -> None:
        self.scales = {key: np.ascontiguousarray(v, dtype=np.float32) for key, v in scales.items()}
        self.weights = {il: np.ascontiguousarray(w, dtype=np.float32) for il, w in weights.items()}
        self.rows = {key: np.ascontiguousarray(v, dtype=np.float32) for key, v in rows.items()}
        self.every_row = True

    def setup(self, backend: Backend) -> None:
        n_pos = len(next(iter(self.scales.values())))
        for (name, il), rows in self.rows.items():
            if lib.pi_freeze_rows(backend._state, name.encode(), il, ffi.from_buffer("float[]", rows), rows.shape[1],
                                  rows.shape[0], n_pos) != 0:
                raise backend.error(f"replaced {name}-{il}")
        for (name, il), scale in self.scales.items():
            if lib.pi_freeze_norm(backend._state, name.encode(), il, ffi.from_buffer("float[]", scale), len(scale)) != 0:
                raise backend.error(f"frozen norm {name}-{il}")
        for il, w in self.weights.items():
            n_head, n_pos, _ = w.shape
            if lib.pi_freeze_attention(backend._state, il, ffi.from_buffer("float[]", w), n_head, n_pos) != 0:
                raise backend.error(f"frozen attention of layer {il}")

    def read(self, backend: Backend, n_tokens: int) -> None:
        return None
