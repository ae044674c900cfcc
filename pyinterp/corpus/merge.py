"""Joining the parts of a sharded extraction (``pyinterp extract --shard I/N`` on N machines) into one corpus.

The parts must be of the same run (same model header, tensors, dtype, packing, source and N) and different I.
The merged manifest names the parts' shard files where they are, by paths relative to the merged directory
(nothing is copied), and numbers each part's contexts after the previous parts' (``context_offset``). Documents
keep their global numbers (the parts are round-robin parts of one numbering).
"""

from __future__ import annotations

import os
from pathlib import Path

from pyinterp.corpus.store import open_corpus, read_manifest, write_manifest
from pyinterp.errors import InputError

SAME = ("format", "model", "tensors", "dtype", "packing", "max_tokens")


def merge_corpora(out: Path, parts: list[Path]) -> dict:
    """Write ``out/manifest.json`` joining the complete corpora ``parts``; returns it."""
    corpora = [open_corpus(p) for p in parts]
    first = corpora[0].manifest
    for part, c in zip(parts, corpora):
        changed = [key for key in SAME if c.manifest.get(key) != first.get(key)]
        source = {k: v for k, v in c.manifest["source"].items() if k != "shard"}
        if source != {k: v for k, v in first["source"].items() if k != "shard"}:
            changed.append("source")
        if changed:
            raise InputError(f"{part} is not a part of the same extraction as {parts[0]} ({', '.join(changed)} differ)")
    shards = [tuple(c.manifest["source"]["shard"]) for c in corpora]
    if len(set(shards)) != len(shards) or len({n for _, n in shards}) != 1:
        raise InputError(f"the parts must be different parts I/N of one N, got {', '.join(f'{i}/{n}' for i, n in shards)}")
    if read_manifest(out) is not None or (out.exists() and any(out.iterdir())):
        raise InputError(f"{out} is not empty")
    out.mkdir(parents=True, exist_ok=True)
    merged = {key: first[key] for key in SAME} | {"source": dict(first["source"], shard=None, parts=[list(s) for s in shards])}
    merged["shards"], offset = [], 0
    for part, c in zip(parts, corpora):
        for shard in c.manifest["shards"]:
            path = os.path.relpath((part / shard["file"]).resolve(), out.resolve())
            merged["shards"].append(dict(shard, file=path, context_offset=offset + shard.get("context_offset", 0)))
        offset += c.n_contexts
    merged |= {"n_tokens": sum(c.n_tokens for c in corpora), "n_contexts": offset, "complete": True}
    write_manifest(out, merged)
    return merged
