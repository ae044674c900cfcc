"""Reading and writing safetensors files (the weights format of SAELens and Hugging Face) with numpy alone.

The format (https://github.com/huggingface/safetensors): an unsigned 64-bit little-endian header length N,
N bytes of JSON, then the tensors' bytes. The JSON maps each tensor name to ``{"dtype": "F32", "shape":
[...], "data_offsets": [begin, end]}``, offsets counted from the first byte after the header, data
little-endian and row-major; an optional ``"__metadata__"`` maps strings to strings. Writers pad the header
with spaces to a multiple of 8 bytes.

F32, F16 and BF16 tensors are read (as float32: F16 and BF16 widen exactly) and written; I32 and I64 tensors
(token ids, row indices) as they are.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from pyinterp.errors import InputError
from pyinterp.io.atomic import atomic_write

# safetensors dtype -> numpy storage type (little-endian)
DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "I32": np.dtype("<i4"),
          "I64": np.dtype("<i8")}
INTEGERS = ("I32", "I64")


def widen(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values as float32; BF16 is the top half of a float32's bits."""
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    if dtype in INTEGERS:
        return raw
    return raw.astype(np.float32)


def narrow(array: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values as ``dtype``'s storage type; BF16 rounds to nearest, ties to even (as torch does)."""
    if dtype == "BF16":
        bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32).astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return rounded.astype(DTYPES["BF16"])
    if dtype in INTEGERS:
        return np.asarray(array).astype(DTYPES[dtype])
    with np.errstate(over="ignore"):  # beyond F16's range: inf, as torch gives
        return np.asarray(array, dtype=np.float32).astype(DTYPES[dtype])


def rounded(array: np.ndarray, dtype: str) -> np.ndarray:
    """float32 ``array`` rounded to ``dtype`` and widened back: the values a file of that dtype would hold."""
    return widen(narrow(array, dtype), dtype)


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as an array of its shape (floats as float32, integers as stored); a
    one-line error for a file that is not one, or holds another dtype."""
    return {name: widen(raw, dtype) for name, (dtype, raw) in map_safetensors(path).items()}


def map_safetensors(path: str | os.PathLike) -> dict[str, tuple[str, np.ndarray]]:
    """Every tensor of a safetensors file as its dtype and its stored values, memory-mapped (not read), in its
    shape; checked as :func:`read_safetensors` checks."""
    path = Path(path)
    try:
        data = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None
    if data.size < 8:
        raise InputError(f"{path} is not a safetensors file: {data.size} bytes")
    (n,) = struct.unpack("<Q", bytes(data[:8]))
    try:
        header = json.loads(bytes(data[8:8 + n]).decode("utf-8")) if 8 + n <= data.size else None
    except (UnicodeDecodeError, ValueError):
        header = None
    if not isinstance(header, dict):
        raise InputError(f"{path} is not a safetensors file: no JSON header of {n} bytes")
    body = data[8 + n:]
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], [int(d) for d in entry["shape"]], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{path}: tensor {name!r} has a malformed header entry {entry!r}") from None
        if dtype not in DTYPES:
            raise InputError(f"{path}: tensor {name!r} is {dtype}; pyinterp reads {', '.join(DTYPES)}")
        size = int(np.prod(shape)) * DTYPES[dtype].itemsize
        if not 0 <= begin <= end <= body.size or end - begin != size:
            raise InputError(f"{path}: tensor {name!r} ({dtype} {shape}) has data offsets {[begin, end]} that do not "
                             f"fit its size or the file")
        out[name] = dtype, body[begin:end].view(DTYPES[dtype]).reshape(shape)
    return out


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray], dtype: str = "F32",
                      dtypes: dict[str, str] | None = None, wait: bool = True) -> Path:
    """Write ``tensors`` to ``path`` as ``dtype`` (F32, F16 or BF16; ``dtypes``: another, I32 or I64 too, for some
    names), in name order, with the ``{"format": "pt"}`` metadata torch's writer adds (``wait``: see
    :func:`pyinterp.io.atomic.atomic_write`)."""
    path = Path(path)
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    for name in sorted(tensors):
        kind = (dtypes or {}).get(name, dtype)
        blob = narrow(tensors[name], kind).tobytes()
        header[name] = {"dtype": kind, "shape": list(np.shape(tensors[name])), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    try:
        with atomic_write(path, wait=wait) as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for blob in blobs:
                f.write(blob)
    except OSError as e:
        raise InputError(f"cannot write {path}: {e.strerror or e}") from None
    return path
