"""pyinterp's corpus format: a directory of shards and a manifest, readable with numpy alone.

- ``manifest.json``: the run's settings (``format``, ``model``: path, file name and the sha256 of its GGUF header,
  ``tensors``: name -> key and width, ``dtype``, ``packing``, ``source``), ``shards`` (each: ``file``, ``rows``,
  ``contexts``, ``first_context``), ``n_tokens``, ``n_contexts`` and ``complete`` (false while a run is going or
  was interrupted; ``--resume`` continues it);
- ``shard-NNNNNN.safetensors``: one safetensors file per shard with ``token_ids`` I32, ``doc`` I64, ``pos`` I32,
  ``context`` I64 (``[rows]``) and each tensor ``[rows, width]`` in the run's dtype (F32, F16 or BF16), under the
  name it was asked for. A shard holds whole contexts.

Every shard is written under a temporary name and renamed, then the manifest (rewritten the same way) lists
it: the manifest never names a file that is not whole, and a file it does not name is not part of the corpus.
Shards are written by a background thread, so the forward pass does not wait for the disk.
"""

from __future__ import annotations

import hashlib
import json
import queue
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from pyinterp.corpus.stream import Batch
from pyinterp.errors import InputError, PyinterpError
from pyinterp.io.atomic import atomic_write
from pyinterp.io.safetensors_io import map_safetensors, widen, write_safetensors

FORMAT = "pyinterp.corpus/1"
MANIFEST = "manifest.json"
DTYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16"}
INDEX_DTYPES = {"token_ids": "I32", "doc": "I64", "pos": "I32", "context": "I64"}
ROW_INDEX_BYTES = 4 + 8 + 4 + 8  # token id, document, position, context of a row


# GGUF metadata value types (gguf.GGUFValueType) -> their size in bytes; 8: a string, 9: an array
GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_header_size(data: bytes | np.ndarray) -> int:
    """Bytes of a GGUF file's header: magic, version, counts, metadata and tensor table, up to the aligned start of
    the tensor data (``general.alignment``, default 32). Reads only what it skips over (a 49k-token vocabulary's
    strings are skipped by their lengths), so it is fast where ``gguf.GGUFReader`` parses every value."""
    buf = memoryview(data)
    n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
    at, alignment = 24, 32

    def skip_value(kind: int, at: int) -> int:
        if kind == 8:
            return at + 8 + struct.unpack_from("<Q", buf, at)[0]
        if kind == 9:
            item, n = struct.unpack_from("<IQ", buf, at)
            at += 12
            if item in GGUF_SIZES:
                return at + n * GGUF_SIZES[item]
            for _ in range(n):
                at = skip_value(item, at)
            return at
        return at + GGUF_SIZES[kind]

    for _ in range(n_kv):
        (n,) = struct.unpack_from("<Q", buf, at)
        key = bytes(buf[at + 8:at + 8 + n])
        (kind,) = struct.unpack_from("<I", buf, at + 8 + n)
        if key == b"general.alignment" and kind == 4:
            (alignment,) = struct.unpack_from("<I", buf, at + 12 + n)
        at = skip_value(kind, at + 12 + n)
    for _ in range(n_tensors):
        at += 8 + struct.unpack_from("<Q", buf, at)[0]         # the name
        at += 4 + 8 * struct.unpack_from("<I", buf, at)[0] + 12  # the dimensions, the type, the offset
    return at + -at % alignment


def header_sha256(path: Path) -> str:
    """The sha256 of a GGUF file's header (metadata and tensor table, up to the tensor data)."""
    data = np.memmap(path, dtype=np.uint8, mode="r")
    try:
        size = gguf_header_size(data)
    except (struct.error, KeyError, IndexError):
        raise InputError(f"{path}: its GGUF header is malformed") from None
    return hashlib.sha256(data[:size]).hexdigest()


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.safetensors"


def read_manifest(directory: Path) -> dict | None:
    """The manifest of the run in ``directory``, None when there is none."""
    path = directory / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path} is not a pyinterp corpus manifest: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError(f"{path} is not a pyinterp corpus manifest (format {FORMAT})")
    return manifest


def write_manifest(directory: Path, manifest: dict) -> None:
    with atomic_write(directory / MANIFEST, "w", wait=False) as f:  # at once: a run stays resumable
        json.dump(manifest, f, indent=1)


class ShardWriter:
    """Collects batches into shards of about ``shard_tokens`` tokens (whole decodes) and writes each, then the
    manifest naming it, on a background thread. ``manifest``: the run's manifest so far (its shards are kept)."""

    def __init__(self, directory: Path, manifest: dict, shard_tokens: int) -> None:
        self.directory, self.manifest, self.shard_tokens = directory, manifest, shard_tokens
        self.dtype = DTYPES[manifest["dtype"]]
        self.pending: list[Batch] = []
        self.queued = 0  # rows handed to the writer thread and not yet in the manifest
        self.queue: queue.Queue = queue.Queue(maxsize=1)  # a shard waiting for the disk: memory bounded
        self.failed: BaseException | None = None
        self.thread = threading.Thread(target=self._drain, name="pyinterp-shard-writer", daemon=True)
        self.thread.start()

    @property
    def n_tokens(self) -> int:
        """Rows in the written shards and those queued or pending."""
        return self.manifest["n_tokens"] + sum(b.n_rows for b in self.pending) + self.queued

    def add(self, batch: Batch) -> None:
        self._check()
        self.pending.append(batch)
        if sum(b.n_rows for b in self.pending) >= self.shard_tokens:
            self._flush()

    def finish(self) -> dict:
        """Write what is pending, wait for the disk, mark the run complete; returns the manifest."""
        if self.pending:
            self._flush()
        self._stop()
        self.manifest["complete"] = True
        write_manifest(self.directory, self.manifest)
        return self.manifest

    def abort(self) -> None:
        """Drop what is pending (no partial shard) and wait for the queued shards: the run stays resumable."""
        self.pending = []
        self._stop()

    def _flush(self) -> None:
        arrays = {name: np.concatenate([getattr(b, name) for b in self.pending]) for name in INDEX_DTYPES}
        for spec in self.pending[0].tensors:
            arrays[spec] = np.concatenate([b.tensors[spec] for b in self.pending])
        self.pending = []
        self.queued += len(arrays["token_ids"])
        self._put(arrays)

    def _put(self, item: dict | None) -> None:
        while True:
            self._check()
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _stop(self) -> None:
        if self.thread.is_alive():
            self._put(None)
            self.thread.join()
        self._check()

    def _check(self) -> None:
        if self.failed is not None:
            failed, self.failed = self.failed, None
            self.thread.join()
            raise failed

    def _drain(self) -> None:
        while True:
            arrays = self.queue.get()
            if arrays is None:
                return
            try:
                self._write(arrays)
            except BaseException as e:  # raised in the main thread at its next add or at finish
                self.failed = e if isinstance(e, PyinterpError) else PyinterpError(f"cannot write a shard: {e}")
                return

    def _write(self, arrays: dict[str, np.ndarray]) -> None:
        shards = self.manifest["shards"]
        name = shard_name(len(shards))
        rows = len(arrays["token_ids"])
        contexts = int(arrays["context"][-1] - arrays["context"][0] + 1)
        write_safetensors(self.directory / name, arrays, self.dtype, INDEX_DTYPES, wait=False)
        shards.append({"file": name, "rows": rows, "contexts": contexts, "first_context": int(arrays["context"][0])})
        self.manifest["n_tokens"] += rows
        self.manifest["n_contexts"] += contexts
        self.queued -= rows
        write_manifest(self.directory, self.manifest)


@dataclass(frozen=True)
class Shard:
    """One shard of a corpus, memory-mapped."""

    path: Path
    context_offset: int  # added to its context numbers (a merged corpus numbers its parts' contexts apart)

    def arrays(self) -> dict[str, tuple[str, np.ndarray]]:
        return map_safetensors(self.path)

    def batch(self, names: list[str]) -> Batch:
        """The shard's rows as a :class:`Batch` (tensors as float32: F16 and BF16 widened)."""
        raw = self.arrays()
        missing = [n for n in [*INDEX_DTYPES, *names] if n not in raw]
        if missing:
            raise InputError(f"{self.path} has no tensor {missing[0]!r}")
        return Batch(np.asarray(raw["token_ids"][1]), np.asarray(raw["doc"][1]), np.asarray(raw["pos"][1]),
                     np.asarray(raw["context"][1]) + self.context_offset, {n: widen(raw[n][1], raw[n][0]) for n in names})


class Corpus:
    """An extracted corpus (``pyinterp.corpus.open(DIR)``): its manifest, and its rows as numpy arrays."""

    def __init__(self, directory: Path, manifest: dict) -> None:
        self.directory, self.manifest = directory, manifest
        self.names: list[str] = list(manifest["tensors"])
        self.shards = [Shard((directory / s["file"]).resolve(), s.get("context_offset", 0)) for s in manifest["shards"]]

    def __repr__(self) -> str:
        return (f"Corpus({str(self.directory)!r}, tensors={self.names}, n_tokens={self.n_tokens}, "
                f"n_contexts={self.n_contexts}, shards={len(self.shards)})")

    @property
    def n_tokens(self) -> int:
        return self.manifest["n_tokens"]

    @property
    def n_contexts(self) -> int:
        return self.manifest["n_contexts"]

    @property
    def context_size(self) -> int:
        return self.manifest["packing"]["context_size"]

    def tensor(self, name: str) -> np.ndarray:
        """``[n_tokens, width]``: memory-mapped when the corpus is one shard of F32, else read into memory (float32)."""
        if name not in self.names:
            raise InputError(f"the corpus has no tensor {name!r} (it has {', '.join(self.names)})")
        return self._column(name)

    def token_ids(self) -> np.ndarray:
        """``[n_tokens]`` int32."""
        return self._column("token_ids")

    def doc(self) -> np.ndarray:
        """``[n_tokens]`` int64: each row's document."""
        return self._column("doc")

    def pos(self) -> np.ndarray:
        """``[n_tokens]`` int32: each row's position in its document (-1: an added BOS or separator)."""
        return self._column("pos")

    def context(self) -> np.ndarray:
        """``[n_tokens]`` int64: each row's context."""
        parts = [np.asarray(s.arrays()["context"][1]) + s.context_offset for s in self.shards]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def batches(self, names: list[str] | None = None) -> Iterator[Batch]:
        """The rows shard by shard (memory bounded by one shard), as :class:`Batch` objects."""
        for shard in self.shards:
            yield shard.batch(self.names if names is None else names)

    def _column(self, name: str) -> np.ndarray:
        parts = [shard.arrays()[name] for shard in self.shards]
        if len(parts) == 1 and parts[0][0] in ("F32", "I32", "I64"):  # as stored: memory-mapped
            return parts[0][1]
        return np.concatenate([widen(raw, dtype) for dtype, raw in parts])


def open_corpus(directory: str | Path) -> Corpus:
    """The complete corpus extracted to ``directory``; a one-line error for anything else."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        raise InputError(f"{directory} holds no pyinterp corpus (no {MANIFEST})")
    if not manifest.get("complete"):
        raise InputError(f"the extraction in {directory} is incomplete: continue it with pyinterp extract --resume")
    return Corpus(directory, manifest)
