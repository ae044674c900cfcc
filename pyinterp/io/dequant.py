"""The fp32 twin of a quantized GGUF: the same file with every quantized (and F16/BF16) tensor dequantized to F32.

The `gguf` package reads the source (:class:`gguf.GGUFReader`), dequantizes each tensor with
:func:`gguf.quants.dequantize` and writes a new GGUF (:class:`gguf.GGUFWriter`) with the same metadata, tokenizer
and tensor order; only ``general.file_type`` says ALL_F32. The copy lives in ``$PYINTERP_CACHE/models/f32``
(default ``~/.cache/pyinterp/models/f32``), named after the source and keyed by its absolute path, size and
modification time, so it is written once and rewritten when the source changes. llama.cpp then runs both
files on the same graph: whatever differs is the quantization.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
from collections import Counter
from pathlib import Path
from typing import Callable, NamedTuple

import gguf
import numpy as np

from pyinterp import zoo
from pyinterp.errors import InputError, PyinterpError
from pyinterp.io.atomic import atomic_path, check_complete

F32 = gguf.GGMLQuantizationType.F32
# types that stay as they are: F32 already, and the non-float ones (token ids, masks) that are not weights
KEPT = {F32, gguf.GGMLQuantizationType.F64, gguf.GGMLQuantizationType.I8, gguf.GGMLQuantizationType.I16,
        gguf.GGMLQuantizationType.I32, gguf.GGMLQuantizationType.I64}
CHUNK_ELEMENTS = 1 << 22  # dequantize this many values at a time (16 MB of F32), so memory stays small


# bytes of each fixed-size metadata value type (the others are strings and arrays)
_VALUE_SIZES = {gguf.GGUFValueType.UINT8: 1, gguf.GGUFValueType.INT8: 1, gguf.GGUFValueType.BOOL: 1,
                gguf.GGUFValueType.UINT16: 2, gguf.GGUFValueType.INT16: 2, gguf.GGUFValueType.UINT32: 4,
                gguf.GGUFValueType.INT32: 4, gguf.GGUFValueType.FLOAT32: 4, gguf.GGUFValueType.UINT64: 8,
                gguf.GGUFValueType.INT64: 8, gguf.GGUFValueType.FLOAT64: 8}


class TensorEntry(NamedTuple):
    """One tensor of a GGUF file as its header describes it."""

    name: str
    type: gguf.GGMLQuantizationType
    n_elements: int
    dims: tuple[int, ...] = ()    # ggml order: dims[0] the row length
    offset: int = 0               # of its data in the file

    @property
    def f32_nbytes(self) -> int:
        """Its bytes in the F32 copy: as they are for a kept type, 4 per value for the others."""
        if self.type in KEPT:
            block, size = gguf.GGML_QUANT_SIZES[self.type]
            return self.n_elements // block * size
        return 4 * self.n_elements


def scan(path: Path) -> list[TensorEntry]:
    """The tensors of a (little-endian) GGUF file from its header, skipping the metadata values: fast where
    :class:`gguf.GGUFReader`, which parses every value (every token of the vocabulary), takes seconds."""

    zoo.check_gguf(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        pos = 0

        def take(fmt: str) -> tuple:
            nonlocal pos
            values = struct.unpack_from("<" + fmt, data, pos)
            pos += struct.calcsize("<" + fmt)
            return values

        def skip_string() -> None:
            nonlocal pos
            (length,) = take("Q")
            pos += length

        try:
            _, _, n_tensors, n_kv = take("4sIQQ")
            alignment = gguf.GGUF_DEFAULT_ALIGNMENT
            for _ in range(n_kv):
                (length,) = take("Q")
                key = bytes(data[pos:pos + length])
                pos += length
                (kind,) = take("I")
                if key == b"general.alignment" and kind == gguf.GGUFValueType.UINT32:
                    (alignment,) = struct.unpack_from("<I", data, pos)
                count = 1
                if kind == gguf.GGUFValueType.ARRAY:
                    kind, count = take("IQ")
                if kind == gguf.GGUFValueType.STRING:
                    for _ in range(count):
                        skip_string()
                else:
                    pos += _VALUE_SIZES[gguf.GGUFValueType(kind)] * count
            tensors = []
            for _ in range(n_tensors):
                (length,) = take("Q")
                name = bytes(data[pos:pos + length]).decode("utf-8", "replace")
                pos += length
                (n_dims,) = take("I")
                dims = take(f"{n_dims}Q")
                kind, offset = take("IQ")
                tensors.append(TensorEntry(name, gguf.GGMLQuantizationType(kind), int(np.prod(dims, dtype=np.int64)),
                                           tuple(dims), offset))
            start = -(-pos // alignment) * alignment  # the tensor data, after the header padded to the alignment
            tensors = [TensorEntry(t.name, t.type, t.n_elements, t.dims, start + t.offset) for t in tensors]
        except (struct.error, ValueError, KeyError) as e:
            raise PyinterpError(f"cannot read {path} as GGUF: {e}") from None
    return tensors


def type_counts(tensors: list[TensorEntry]) -> dict[str, int]:
    """How many tensors of each ggml type there are, most frequent first: ``{"Q4_1": 210, "F32": 61, ...}``."""
    return dict(Counter(t.type.name for t in tensors).most_common())


class F32Copy:
    """The cached F32 copy of the GGUF at ``source``: :attr:`path` is where it is, :meth:`write` makes it."""

    def __init__(self, source: str | os.PathLike) -> None:
        self.source = Path(source).resolve()
        self.tensors = scan(self.source)
        if all(t.type in KEPT for t in self.tensors):
            raise InputError(f"{self.source.name} has no quantized, F16 or BF16 tensor (every weight is already "
                             f"{', '.join(type_counts(self.tensors))}): there is nothing to compare with fp32")
        stat = self.source.stat()
        key = hashlib.sha256(f"{self.source}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        self.path = zoo.cache_dir() / "f32" / f"{self.source.stem}.{key}.f32.gguf"

    @property
    def exists(self) -> bool:
        return self.path.is_file()

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data the copy holds."""
        return sum(t.f32_nbytes for t in self.tensors)

    def write(self, on_bytes: Callable[[int], None] | None = None) -> Path:
        """Write the copy (if it is not there yet) and return its path. ``on_bytes(n)`` is called after each
        tensor with the bytes of tensor data just written (a progress bar of length :attr:`nbytes`)."""
        if self.exists:
            return self.path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_path(self.path, wait=False) as partial:  # a cache the comparison reads next
                self._write(partial, on_bytes)
        except (ValueError, NotImplementedError, OSError) as e:
            raise PyinterpError(f"cannot write the F32 copy of {self.source.name} to {self.path}: {e}") from None
        return self.path

    def _write(self, out: Path, on_bytes: Callable[[int], None] | None) -> None:
        try:
            reader = gguf.GGUFReader(self.source)
        except (KeyError, IndexError) as e:
            raise ValueError(f"cannot read {self.source.name}: {e}") from None
        arch = bytes(reader.fields[gguf.Keys.General.ARCHITECTURE].parts[-1]).decode()
        writer = gguf.GGUFWriter(out, arch)  # writes general.architecture first, as the source has it
        alignment = reader.fields.get(gguf.Keys.General.ALIGNMENT)
        if alignment is not None:
            writer.data_alignment = int(alignment.parts[-1][0])
        for field in reader.fields.values():
            if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE:
                continue  # the header, written by the writer itself
            if field.name == gguf.Keys.General.FILE_TYPE:
                writer.add_key_value(field.name, int(gguf.LlamaFileType.ALL_F32), field.types[0])
                continue
            writer.add_key_value(field.name, _raw_value(field), field.types[0],
                                 sub_type=field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
        for t, entry in zip(reader.tensors, self.tensors, strict=True):
            kept = t.tensor_type in KEPT
            writer.add_tensor_info(t.name, tuple(int(n) for n in reversed(t.shape)), t.data.dtype if kept else np.float32,
                                   entry.f32_nbytes, raw_dtype=t.tensor_type if kept else F32)
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            fout = writer.fout[0]
            writer.write_padding(fout, fout.tell())
            for t, entry in zip(reader.tensors, self.tensors, strict=True):
                if t.tensor_type in KEPT:
                    t.data.tofile(fout)
                else:
                    rows = t.data.reshape(-1, t.data.shape[-1])  # blocks never straddle rows
                    step = max(CHUNK_ELEMENTS // int(t.shape[0]), 1)
                    for i in range(0, len(rows), step):
                        gguf.quants.dequantize(rows[i:i + step], t.tensor_type).astype(np.float32, copy=False).tofile(fout)
                writer.write_padding(fout, entry.f32_nbytes)
                if on_bytes is not None:
                    on_bytes(entry.f32_nbytes)
            check_complete(fout)
        finally:
            writer.close()


def _raw_value(field: gguf.ReaderField):
    """A metadata value as the writer takes it back: numbers as numbers, strings as their raw bytes (so a
    string that is not valid UTF-8, as some token pieces are, is copied as it is)."""
    main = field.types[0]
    if main == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]])
    if main == gguf.GGUFValueType.ARRAY:
        if field.types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]) for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    return field.parts[field.data[0]].tolist()[0]
