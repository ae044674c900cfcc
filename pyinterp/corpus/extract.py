"""Extraction: the activations of a corpus written to disk, at the speed of the forward pass.

The documents (:class:`~pyinterp.corpus.source.Source`) become contexts (:class:`~pyinterp.corpus.packing.Packing`),
the model runs over them several contexts per decode, truncated after the last tensor asked for
(:func:`~pyinterp.corpus.stream.batches`), and a background thread writes the rows in shards
(:class:`~pyinterp.corpus.store.ShardWriter`), or as SAELens's cached-activations dataset
(:mod:`pyinterp.corpus.saelens`).

A run is deterministic: the same corpus, model and settings give the same contexts in the same order. So an
interrupted run (Ctrl-C, a kill, a full disk) continues with ``resume=True`` from its last complete shard: the
contexts of the shards on disk are skipped (tokenized again, not run) and the next shard starts with the next
context; nothing is duplicated or lost.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from pyinterp.corpus.packing import Context, Packing
from pyinterp.corpus.source import Source
from pyinterp.corpus.store import (DTYPES, FORMAT, MANIFEST, ROW_INDEX_BYTES, ShardWriter, header_sha256, read_manifest,
                                   write_manifest)
from pyinterp.corpus.stream import batches, tensor_keys, widths
from pyinterp.errors import InputError

if TYPE_CHECKING:
    from pyinterp.engine.core import ModelLike

SHARD_BYTES = 64 * 2**20  # a shard's size by default: memory holds at most about three (pending, queued, written)
# tokens per decode by default: contexts share one KV cache, whose attention over every context's cells (masked)
# grows as the square of a decode's tokens, so a few contexts per decode beat many (benchmarks/bench_extract.py)
DECODE_TOKENS = 512
BYTES_PER_TOKEN = 3        # a low estimate of a text's bytes per token, for the disk space check


@dataclass(frozen=True)
class Request:
    """What to extract and how (everything the manifest records of a run but the model)."""

    source: Source
    names: tuple[str, ...]
    context_size: int
    pack: bool = True
    dtype: str = "f32"
    max_tokens: int | None = None
    per_decode: int | None = None    # contexts per decode; None: DECODE_TOKENS' worth (at least 1, at most 64)
    shard_tokens: int | None = None  # tokens per shard; None: about SHARD_BYTES
    format: str = "pyinterp"         # or "saelens": SAELens's cached-activations dataset (pyinterp.corpus.saelens)


def packing_for(model: ModelLike, context_size: int, pack: bool) -> Packing:
    """SAELens's packing for this model's tokenizer (see :mod:`pyinterp.corpus.packing`)."""
    if context_size > model.n_ctx:
        raise InputError(f"--context-size {context_size} is more than the model's context of {model.n_ctx} tokens (-c)")
    bos, eos = model.engine.special_tokens()
    adds_bos = model.engine.adds_bos() and bos is not None
    return Packing(context_size, pack, bos if adds_bos else None, bos if adds_bos else eos)


def contexts_per_decode(model: ModelLike, context_size: int, asked: int | None = None) -> int:
    """Contexts per decode: ``asked``, or :data:`DECODE_TOKENS`' worth; no more than the model's context holds."""
    most = max(1, min(model.engine.n_seq_max, model.n_ctx // context_size))
    return min(most, asked or max(1, DECODE_TOKENS // context_size))


def model_contexts(model: ModelLike, source: Source, packing: Packing, max_tokens: int | None,
                   read: list[int] | None = None) -> Iterator[Context]:
    """The contexts of ``source``'s documents in the model's tokens (each document without a BOS), up to
    ``max_tokens``; ``read[0]`` (when given) counts the documents' bytes as they are read (progress)."""
    def documents() -> Iterator[tuple[int, str]]:
        for number, text in source.documents():
            if read is not None:
                read[0] += len(text.encode()) + 1
            yield number, text

    return limited(packing.contexts(documents(), lambda text: model.engine.tokenize(text, False)), max_tokens)


def share_read(source: Source, read: list[int]) -> float:
    """The share (0..1) of ``source``'s part of the corpus whose bytes ``read[0]`` counts."""
    return min(1.0, read[0] * source.shard[1] / max(1, source.size()))


def limited(contexts: Iterator[Context], max_tokens: int | None) -> Iterator[Context]:
    """The contexts while their tokens add up to at most ``max_tokens`` (whole contexts)."""
    n = 0
    for context in contexts:
        n += len(context.ids)
        if max_tokens is not None and n > max_tokens:
            return
        yield context


def skip(contexts: Iterator[Context], n: int) -> Iterator[Context]:
    for i, context in enumerate(contexts):
        if i >= n:
            yield context


def manifest_for(model: ModelLike, request: Request, packing: Packing) -> dict:
    keys = tensor_keys(model, request.names)
    width = widths(model, keys)
    return {
        "format": FORMAT,
        "model": {"path": str(model.path), "name": model.path.name, "header_sha256": header_sha256(model.path)},
        "tensors": {spec: {"key": f"{name}-{layer}" if layer >= 0 else name, "width": width[spec]}
                    for spec, (name, layer) in keys.items()},
        "dtype": request.dtype,
        "packing": packing.describe(),
        "source": request.source.describe(),
        "max_tokens": request.max_tokens,
        "shards": [], "n_tokens": 0, "n_contexts": 0, "complete": False,
    }


SETTINGS = ("format", "model", "tensors", "dtype", "packing", "source", "max_tokens")


def prepare(directory: Path, manifest: dict, resume: bool) -> dict:
    """The manifest to continue from: a new run's in an empty (or new) directory, or with ``resume`` the one on disk
    when its settings are this run's. One-line errors for a directory holding something else."""
    old = read_manifest(directory) if directory.is_dir() else None
    if old is None:
        if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
            raise InputError(f"{directory} exists and is not an empty directory")
        directory.mkdir(parents=True, exist_ok=True)
        write_manifest(directory, manifest)
        return manifest
    if not resume:
        raise InputError(f"{directory} holds another extraction; continue it with --resume or choose another directory")
    changed = [key for key in SETTINGS if old.get(key) != manifest[key]]
    if changed:
        raise InputError(f"--resume: the run in {directory} has other settings ({', '.join(changed)})")
    if old.get("complete"):
        raise InputError(f"the extraction in {directory} is complete")
    for stale in directory.glob(".*.part"):  # a shard a kill interrupted while it was written
        stale.unlink()
    return old


def check_space(directory: Path, request: Request, manifest: dict) -> None:
    """A one-line error up front when the disk cannot hold the estimated output (from --max-tokens, or the
    corpus's size in bytes)."""
    row = sum(t["width"] for t in manifest["tensors"].values()) * (4 if request.dtype == "f32" else 2) + ROW_INDEX_BYTES
    if request.max_tokens is not None:
        tokens = request.max_tokens
    else:
        tokens = request.source.size() // BYTES_PER_TOKEN // request.source.shard[1]
    need = max(0, tokens - manifest["n_tokens"]) * row
    free = shutil.disk_usage(directory).free
    if need > free:
        raise InputError(f"{directory}: the extraction needs about {need / 2**30:.1f} GiB, the disk has "
                         f"{free / 2**30:.1f} GiB free (limit it with --max-tokens)")


def extract(model: ModelLike, directory: Path, request: Request, *, resume: bool = False,
            on_batch: Callable[[int, float], None] | None = None) -> dict:
    """Extract ``request`` with ``model`` to ``directory`` (see the module); returns the final manifest.
    ``on_batch(n_tokens, read)``: after each decode, with the tokens extracted so far and the share of the corpus's
    bytes read (progress)."""
    if request.dtype not in DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(DTYPES)}, got {request.dtype!r}")
    packing = packing_for(model, request.context_size, request.pack)
    if request.format == "saelens":
        return _run_saelens(model, directory, request, packing, resume, on_batch)
    if request.format != "pyinterp":
        raise InputError(f"--format must be pyinterp or saelens, got {request.format!r}")
    new_directory = not directory.exists()
    manifest = prepare(directory, manifest_for(model, request, packing), resume)
    try:
        check_space(directory, request, manifest)
        return _run(model, directory, request, packing, manifest, on_batch)
    except BaseException:
        if manifest["n_tokens"] == 0 and not manifest["shards"] and not resume:  # nothing written: leave nothing
            (directory / MANIFEST).unlink(missing_ok=True)
            if new_directory:
                shutil.rmtree(directory, ignore_errors=True)
        raise


def _run(model: ModelLike, directory: Path, request: Request, packing: Packing, manifest: dict,
         on_batch: Callable[[int, float], None] | None) -> dict:
    per_decode = contexts_per_decode(model, request.context_size, request.per_decode)
    row_bytes = sum(t["width"] for t in manifest["tensors"].values()) * (4 if request.dtype == "f32" else 2)
    shard_tokens = request.shard_tokens or max(request.context_size, SHARD_BYTES // max(1, row_bytes))
    done, read = manifest["n_contexts"], [0]
    contexts = model_contexts(model, request.source, packing, request.max_tokens, read)
    writer = ShardWriter(directory, manifest, shard_tokens)
    try:
        for batch in batches(model, skip(contexts, done), list(request.names), per_decode=per_decode, first_context=done):
            writer.add(batch)
            if on_batch is not None:
                on_batch(writer.n_tokens, share_read(request.source, read))
    except BaseException:
        writer.abort()  # the shards written stay listed: the run continues with --resume
        raise
    if writer.n_tokens == 0:
        writer.abort()
        raise InputError(f"the corpus {request.source.path} gave no context of {request.context_size} tokens "
                         f"(empty, or shorter than one context: try a smaller --context-size or --no-pack)")
    return writer.finish()


def _run_saelens(model: ModelLike, directory: Path, request: Request, packing: Packing, resume: bool,
                 on_batch: Callable[[int, float], None] | None) -> dict:
    """The contexts as SAELens's cached-activations dataset, written whole at the end or not at all (no resume)."""
    from pyinterp.corpus.saelens import SaeLensWriter

    if resume:
        raise InputError("--format saelens writes the dataset whole or not at all: there is nothing to --resume")
    if not request.pack:
        raise InputError("--format saelens needs contexts of one size: drop --no-pack")
    if request.dtype == "bf16":
        raise InputError("--format saelens stores f32 or f16 (Arrow has no bfloat16)")
    keys = tensor_keys(model, request.names)
    width = widths(model, keys)
    size, n, read = request.context_size, 0, [0]
    per_decode = contexts_per_decode(model, request.context_size, request.per_decode)
    contexts = model_contexts(model, request.source, packing, request.max_tokens, read)
    with SaeLensWriter(directory, width, size, {"f32": "float32", "f16": "float16"}[request.dtype]) as writer:
        for batch in batches(model, contexts, list(request.names), per_decode=per_decode):
            k = batch.n_rows // size
            writer.add({name: rows.reshape(k, size, -1) for name, rows in batch.tensors.items()},
                       batch.token_ids.reshape(k, size))
            n += batch.n_rows
            if on_batch is not None:
                on_batch(n, share_read(request.source, read))
        if n == 0:
            raise InputError(f"the corpus {request.source.path} gave no context of {size} tokens")
    return {"n_tokens": n, "n_contexts": n // size, "tensors": width, "shards": [], "format": "saelens"}
