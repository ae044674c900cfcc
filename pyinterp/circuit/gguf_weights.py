"""Weights of a GGUF model read from its file, dequantized by gguf: the unembedding rows of chosen tokens and the
mean row (logit nodes take the logit less the mean logit, circuit-tracer's demeaned logits), the tokens a
direction of the residual stream promotes most, and norm weights."""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np

from pyinterp.errors import InputError
from pyinterp.io.dequant import TensorEntry, scan

ROWS_PER_CHUNK = 8192


def _raw(path: str | os.PathLike, tensors: dict[str, TensorEntry], names: tuple[str, ...],
         n_dims: int) -> tuple[np.ndarray, TensorEntry]:
    """The raw rows ``[n_rows, row_bytes]`` (memory-mapped; a vector is one row) of the first tensor of ``names``
    the file has (``tensors``: its header, :func:`_header`), which must have ``n_dims`` dimensions."""
    tensor = next((tensors[n] for n in names if n in tensors), None)
    if tensor is None or len(tensor.dims) != n_dims:
        raise InputError(f"{path}: no {' or '.join(names)} {'matrix' if n_dims == 2 else 'vector'}")
    n_cols, n_rows = tensor.dims[0], (tensor.dims[1] if n_dims == 2 else 1)
    block, size = gguf.GGML_QUANT_SIZES[tensor.type]
    return np.memmap(path, dtype=np.uint8, mode="r", offset=tensor.offset, shape=(n_rows, n_cols // block * size)), tensor


UNEMBEDDING = ("output.weight", "token_embd.weight")  # llama.cpp's: the token embedding when the model ties them


def unembedding(path: str | os.PathLike, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """``(rows [len(tokens), n_embd], mean [n_embd])`` of the model's output matrix, float32; the mean is over the
    whole vocabulary."""
    raw, matrix = _raw(path, _header(path), UNEMBEDDING, 2)
    total = np.zeros(matrix.dims[0], np.float64)
    for start in range(0, len(raw), ROWS_PER_CHUNK):
        total += _rows(raw[start:start + ROWS_PER_CHUNK], matrix).sum(axis=0, dtype=np.float64)
    rows = _rows(raw[np.asarray(tokens, dtype=np.int64)], matrix) if tokens else np.zeros((0, len(total)), np.float32)
    return rows, (total / len(raw)).astype(np.float32)


def top_tokens(path: str | os.PathLike, directions: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` tokens each direction ``[n, n_embd]`` (already times the final norm's weight) promotes most through
    the unembedding, and its logits for them: ``(ids [n, k], values [n, k])``, best first."""
    raw, matrix = _raw(path, _header(path), UNEMBEDDING, 2)
    directions = np.asarray(directions, dtype=np.float32)
    best_ids = np.zeros((len(directions), 0), np.int64)
    best = np.zeros((len(directions), 0), np.float32)
    for start in range(0, len(raw), ROWS_PER_CHUNK):
        logits = directions @ _rows(raw[start:start + ROWS_PER_CHUNK], matrix).T
        ids = np.concatenate([best_ids, np.broadcast_to(np.arange(start, start + logits.shape[1]), logits.shape)], 1)
        values = np.concatenate([best, logits], 1)
        keep = np.argsort(-values, axis=1, kind="stable")[:, :k]
        best_ids, best = np.take_along_axis(ids, keep, 1), np.take_along_axis(values, keep, 1)
    return best_ids, best


def vectors(path: str | os.PathLike, names: list[str]) -> list[np.ndarray]:
    """1-D weights (norm weights) ``[n]`` float32 by name."""
    tensors = _header(path)
    return [_rows(*_raw(path, tensors, (name,), 1))[0] for name in names]


def _header(path: str | os.PathLike) -> dict[str, TensorEntry]:
    """The file's tensors by name."""
    return {t.name: t for t in scan(Path(path))}


def _rows(raw: np.ndarray, matrix: TensorEntry) -> np.ndarray:
    """Rows of a GGUF matrix (their bytes ``[n, row_bytes]``) as float32 ``[n, n_embd]``."""
    return gguf.quants.dequantize(np.ascontiguousarray(raw), matrix.type).astype(np.float32).reshape(len(raw), -1)
