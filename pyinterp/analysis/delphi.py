"""The latent cache EleutherAI's delphi reads (``delphi.latents.LatentDataset``), written as the corpus streams.

Layout (delphi's ``LatentCache.save_splits`` and ``TensorBuffer.load``)::

    DIR/<module>/config.json                  {"model_name", "ctx_len", "n_tokens", "n_splits", "dataset_repo", ...}
    DIR/<module>/<start>_<end>.safetensors    one per split of the units, start..end inclusive:
        activations  [n]        F16   the activation of each entry (> 0 only)
        locations    [n, 3]     U32   (context, position in the context, unit - start), in corpus order
        tokens       [n_ctx, ctx_len]  I32   the token ids of every context, padded with ``pad_id``

``context`` counts the contexts in the order they were read (0-based: the row of ``tokens``), ``position`` is
the row's place in its context (the packing's BOS, if any, is position 0). Contexts shorter than the longest
are padded at the end with ``pad_id`` (delphi's per-token frequency then counts the padding as tokens: pack
the corpus to fixed-size contexts to avoid it). The splits are delphi's: boundaries ``linspace(0, n_units,
n_splits + 1)``. delphi's ``model_name`` is used to load a tokenizer when none is given: pass delphi the
model's Hugging Face tokenizer (the GGUF's name is written there).

Memory stays bounded: entries are appended to spool files in ``DIR`` as batches come, and each safetensors
file is written at the end by streaming its header and the spooled bytes (the ``safetensors`` package would
need every array in memory); files appear atomically (:mod:`pyinterp.io.atomic`).
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np

from pyinterp.errors import InputError
from pyinterp.io.atomic import atomic_path, atomic_write, check_complete

COPY_CONTEXTS = 4096  # contexts padded and written at a time


class DelphiCache:
    """Streaming writer of a delphi cache of ``n_units`` units under ``out_dir / module``; only ``units``
    (default all) are kept. :meth:`add` each batch's entries, then :meth:`close` once."""

    def __init__(self, out_dir: str | Path, module: str, n_units: int, *, n_splits: int = 1,
                 units: np.ndarray | None = None, pad_id: int = 0, config: dict | None = None) -> None:
        if not 1 <= n_splits <= n_units:
            raise InputError(f"delphi splits must be in 1..{n_units}, got {n_splits}")
        self.dir = Path(out_dir) / module
        self.dir.mkdir(parents=True, exist_ok=True)
        self.n_units, self.pad_id, self.config = n_units, pad_id, dict(config or {})
        bounds = np.linspace(0, n_units, n_splits + 1).astype(np.int64)
        self.splits = [(int(a), int(b) - 1) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        self.keep = np.ones(n_units, bool) if units is None else np.isin(np.arange(n_units), units)
        self.spool = Path(tempfile.mkdtemp(prefix=".spool-", dir=self.dir))
        self.files = [(open(self.spool / f"loc{i}", "wb"), open(self.spool / f"act{i}", "wb"))
                      for i in range(n_splits)]
        self.counts = [0] * n_splits
        self.tokens = open(self.spool / "tokens", "wb")
        self.lengths: list[int] = []  # tokens of each context (8 bytes a context)

    def add(self, token_ids: np.ndarray, context: np.ndarray, row: np.ndarray, unit: np.ndarray,
            value: np.ndarray) -> None:
        """One batch: its ``token_ids`` and ``context`` ``[n_rows]``, and its entries ``[n]`` (batch row, unit,
        activation); entries <= 0 and units not kept are dropped."""
        starts = np.flatnonzero(np.r_[True, context[1:] != context[:-1]])
        lengths = np.diff(np.r_[starts, len(context)])
        first = len(self.lengths)
        self.lengths.extend(int(n) for n in lengths)
        np.asarray(token_ids, np.int32).tofile(self.tokens)
        live = (value > 0) & self.keep[unit]
        row, unit, value = row[live], unit[live], value[live]
        group = np.searchsorted(starts, row, side="right") - 1  # the context of each entry within the batch
        order = np.lexsort((unit, row))
        row, unit, value, group = row[order], unit[order], value[order], group[order]
        for i, (a, b) in enumerate(self.splits):
            mine = (unit >= a) & (unit <= b)
            loc = np.stack([first + group[mine], row[mine] - starts[group[mine]], unit[mine] - a], 1)
            loc.astype(np.uint32).tofile(self.files[i][0])
            value[mine].astype(np.float16).tofile(self.files[i][1])
            self.counts[i] += int(mine.sum())

    def __enter__(self) -> "DelphiCache":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:  # an error before close(): nothing is written, the spool goes
            self.abort()

    def abort(self) -> None:
        """Drop everything spooled (nothing is written), and the module directory if that leaves it empty."""
        for f in [self.tokens, *(f for pair in self.files for f in pair)]:
            f.close()
        shutil.rmtree(self.spool, ignore_errors=True)
        for directory in (self.dir, self.dir.parent):
            if directory.is_dir() and not any(directory.iterdir()):
                directory.rmdir()

    def close(self) -> list[Path]:
        """Write every split and config.json; remove the spool. Returns the files written."""
        try:
            for f in [self.tokens, *(f for pair in self.files for f in pair)]:
                f.close()
            if not self.lengths:
                raise InputError("the corpus is empty: no token was read")
            ctx_len = max(self.lengths)
            written = []
            for i, (a, b) in enumerate(self.splits):
                written.append(self._write_split(self.dir / f"{a}_{b}.safetensors", i, ctx_len))
            config = {**self.config, "ctx_len": ctx_len, "cache_ctx_len": ctx_len, "n_splits": len(self.splits),
                      "n_tokens": int(sum(self.lengths))}
            with atomic_write(self.dir / "config.json", "w") as f:
                json.dump(config, f, indent=1)
            return [*written, self.dir / "config.json"]
        finally:
            shutil.rmtree(self.spool, ignore_errors=True)

    def _write_split(self, path: Path, i: int, ctx_len: int) -> Path:
        n, n_ctx = self.counts[i], len(self.lengths)
        sizes = {"activations": 2 * n, "locations": 12 * n, "tokens": 4 * n_ctx * ctx_len}
        shapes = {"activations": [n], "locations": [n, 3], "tokens": [n_ctx, ctx_len]}
        dtypes = {"activations": "F16", "locations": "U32", "tokens": "I32"}
        header, offset = {}, 0
        for name in ("activations", "locations", "tokens"):
            header[name] = {"dtype": dtypes[name], "shape": shapes[name], "data_offsets": [offset, offset + sizes[name]]}
            offset += sizes[name]
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with atomic_path(path) as tmp, open(tmp, "wb") as out:
            out.write(struct.pack("<Q", len(raw)) + raw)
            for name in ("act", "loc"):
                with open(self.spool / f"{name}{i}", "rb") as src:
                    shutil.copyfileobj(src, out)
            self._write_tokens(out, ctx_len)
            check_complete(out)
        return path

    def _write_tokens(self, out, ctx_len: int) -> None:
        """The spooled tokens as ``[n_ctx, ctx_len]`` int32, each context padded at the end."""
        lengths = np.array(self.lengths, np.int64)
        with open(self.spool / "tokens", "rb") as src:
            for a in range(0, len(lengths), COPY_CONTEXTS):
                part = lengths[a:a + COPY_CONTEXTS]
                flat = np.fromfile(src, np.int32, int(part.sum()))
                block = np.full((len(part), ctx_len), self.pad_id, np.int32)
                block[np.arange(ctx_len) < part[:, None]] = flat
                block.tofile(out)
