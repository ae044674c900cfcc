"""The unembedding of a GGUF model, read from the file: the rows of chosen tokens and the mean row, for logit
nodes whose input is the logit less the mean logit (circuit-tracer's demeaned logits)."""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np

from pyinterp.errors import InputError
from pyinterp.io.dequant import TensorEntry, scan

ROWS_PER_CHUNK = 8192


def unembedding(path: str | os.PathLike, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """``(rows [len(tokens), n_embd], mean [n_embd])`` of the model's output matrix (``output.weight``, or the token
    embedding when the model ties them), dequantized to float32 by gguf; the mean is over the whole vocabulary."""
    tensors = {t.name: t for t in scan(Path(path))}
    matrix = tensors.get("output.weight") or tensors.get("token_embd.weight")
    if matrix is None or len(matrix.dims) != 2:
        raise InputError(f"{path}: no output.weight or token_embd.weight matrix to unembed with")
    n_embd, n_vocab = matrix.dims
    block, size = gguf.GGML_QUANT_SIZES[matrix.type]
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=matrix.offset, shape=(n_vocab, n_embd // block * size))
    total = np.zeros(n_embd, np.float64)
    for start in range(0, n_vocab, ROWS_PER_CHUNK):
        total += _rows(raw[start:start + ROWS_PER_CHUNK], matrix).sum(axis=0, dtype=np.float64)
    rows = _rows(raw[np.asarray(tokens, dtype=np.int64)], matrix) if tokens else np.zeros((0, n_embd), np.float32)
    return rows, (total / n_vocab).astype(np.float32)


def _rows(raw: np.ndarray, matrix: TensorEntry) -> np.ndarray:
    """Rows of a GGUF matrix (their bytes ``[n, row_bytes]``) as float32 ``[n, n_embd]``."""
    return gguf.quants.dequantize(np.ascontiguousarray(raw), matrix.type).astype(np.float32).reshape(len(raw), -1)
