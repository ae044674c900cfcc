"""The direct logit effect of a direction in the residual stream: the tokens it promotes and suppresses.

A direction ``d`` ``[n_embd]`` (an SAE feature's decoder row ``W_dec[j]``, or a neuron's unit vector ``e_j``)
is scaled by the final norm's elementwise weight ``g`` and unembedded: ``effect = (d * g) @ W_U.T`` ``[n_vocab]``.
The norm is treated as its weight alone: its division by the row's RMS (or, for LayerNorm, the centring)
depends on the whole residual row, not on ``d``, so it scales every token's effect alike and leaves their
order unchanged. Gemma's ``1 + w`` is already folded into the GGUF's ``output_norm.weight`` by llama.cpp's
converter; final-logit soft-capping is left out (it is monotonic). ``W_U`` is ``output.weight``
``[n_vocab, n_embd]``, or ``token_embd.weight`` for models that tie it to the embedding; quantized weights are
dequantized with the ``gguf`` package.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import gguf
import numpy as np

from pyinterp.errors import InputError, PyinterpError

CHUNK = 256  # directions unembedded at a time ([CHUNK, n_vocab] float32 temporaries)


@dataclass
class Unembedding:
    """The final norm's weight ``[n_embd]`` and the unembedding ``W_U`` ``[n_vocab, n_embd]``, float32."""

    norm: np.ndarray
    W_U: np.ndarray

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> "Unembedding":
        """Read both from a GGUF model file; a one-line error when it has no final norm or unembedding."""
        try:
            reader = gguf.GGUFReader(path)
        except (OSError, ValueError, KeyError, IndexError) as e:
            raise InputError(f"cannot read {path} as GGUF: {e}") from None
        tensors = {t.name: t for t in reader.tensors}
        if "output_norm.weight" not in tensors:
            raise InputError(f"{path} has no output_norm.weight: cannot compute logit effects")
        unembed = tensors.get("output.weight", tensors.get("token_embd.weight"))
        if unembed is None:
            raise InputError(f"{path} has neither output.weight nor token_embd.weight")
        try:
            norm = _dequantized(tensors["output_norm.weight"]).reshape(-1)
            W_U = _dequantized(unembed)
        except (NotImplementedError, ValueError) as e:
            raise PyinterpError(f"cannot dequantize the unembedding of {path}: {e}") from None
        if W_U.ndim != 2 or W_U.shape[1] != norm.shape[0]:
            raise InputError(f"{path}: unembedding {list(W_U.shape)} does not match the norm {list(norm.shape)}")
        return cls(norm, W_U)

    @property
    def n_embd(self) -> int:
        return self.norm.shape[0]

    def effects(self, directions: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """For ``directions`` ``[m, n_embd]``: the ``n`` most promoted token ids and their effects ``[m, n]``
        (largest first), and the ``n`` most suppressed ones (most negative first)."""
        if directions.ndim != 2 or directions.shape[1] != self.n_embd:
            raise InputError(f"directions must be [m, {self.n_embd}] (the model's n_embd), got {list(directions.shape)}")
        n = min(n, self.W_U.shape[0])
        m = directions.shape[0]
        up_ids, down_ids = np.zeros((m, n), np.int64), np.zeros((m, n), np.int64)
        up, down = np.zeros((m, n), np.float32), np.zeros((m, n), np.float32)
        for a in range(0, m, CHUNK):
            logits = (directions[a:a + CHUNK] * self.norm) @ self.W_U.T  # [chunk, n_vocab]
            for ids, vals, sign in ((up_ids, up, -1.0), (down_ids, down, 1.0)):
                part = np.argpartition(sign * logits, n - 1, axis=1)[:, :n]
                order = np.argsort(sign * np.take_along_axis(logits, part, 1), axis=1, kind="stable")
                ids[a:a + CHUNK] = np.take_along_axis(part, order, 1)
                vals[a:a + CHUNK] = np.take_along_axis(logits, ids[a:a + CHUNK], 1)
        return up_ids, up, down_ids, down


def _dequantized(tensor) -> np.ndarray:
    """A GGUF tensor as float32 in numpy order (``[n_vocab, n_embd]`` for a matrix)."""
    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.ascontiguousarray(data, dtype=np.float32)


def logits_json(token_str, up_ids: np.ndarray, up: np.ndarray, down_ids: np.ndarray, down: np.ndarray) -> dict:
    """One unit's ``logits`` entry of features.json from one row of :meth:`Unembedding.effects`."""
    return {"promoted": [{"token": token_str(int(t)), "id": int(t), "value": float(v)} for t, v in zip(up_ids, up)],
            "suppressed": [{"token": token_str(int(t)), "id": int(t), "value": float(v)}
                           for t, v in zip(down_ids, down)]}
