"""What the main command reports besides its analyses: the interventions it applied, in words and as JSON, and the
attention weights as numbers (``--attn-out FILE.npz|csv``)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING

import click
import numpy as np

from pyinterp.errors import PyinterpError
from pyinterp.io.atomic import atomic_write
from pyinterp.io.csv_io import write_csv

if TYPE_CHECKING:
    from pyinterp.engine.trace import Trace

ATTN_FORMATS = (".npz", ".csv")
ATTN_HEADER = ["layer", "head", "query", "key", "query_token", "key_token", "weight"]


def ablation_records(spec: str, heads: list[tuple[int, int]]) -> list[dict]:
    """``-a`` as one record per head: the item as given and the layer and head it names (``211`` with 9 heads:
    layer 23, head 4)."""
    items = [item.strip() for item in spec.split(",")]
    return [{"kind": "ablate", "option": f"-a {item}", "layer": layer, "head": head,
             "text": f"ablate head {head} of layer {layer} (-a {item})"}
            for item, (layer, head) in zip(items, heads, strict=True)]


def isolation_record(layer: int, head: int, n_head: int) -> dict:
    """``-s LAYER INDEX``: the head kept and the heads of that layer ablated."""
    others = [h for h in range(n_head) if h != head]
    return {"kind": "isolate", "option": f"-s {layer} {head}", "layer": layer, "head": head, "ablated_heads": others,
            "text": f"isolate head {head} of layer {layer}: its other {len(others)} heads ablated (-s {layer} {head})"}


def patch_record(name: str, layer: int, file: str, rows: list[tuple[int, int]] | None, avg: str | None) -> dict:
    """``--patch NAME-LAYER FILE FROM TO`` (rows given) or ``--load NAME-LAYER FILE`` (rows None: every row)."""
    if rows is None:
        return {"kind": "load", "option": f"--load {name}-{layer} {file}", "tensor": name, "layer": layer,
                "file": file, "text": f"replace every row of {name}-{layer} with the rows of {file} (--load)"}
    moves = ", ".join(f"row {src} -> position {dst}" for src, dst in rows)
    averaged = f", averaged with {avg}" if avg is not None else ""
    return {"kind": "patch", "option": f"--patch {name}-{layer} {file}", "tensor": name, "layer": layer, "file": file,
            "rows": [{"from": src, "to": dst} for src, dst in rows], "average_with": avg,
            "text": f"patch {name}-{layer} from {file}{averaged}: {moves} (--patch)"}


def steering_record(files: list[tuple[str, float]], layers: tuple[int, int]) -> dict:
    """The control vectors (``--control-vector``, ``--control-vector-scaled``) and the layers they apply to."""
    vectors = ", ".join(f"{file} x {scale:g}" for file, scale in files)
    return {"kind": "control_vector", "files": [{"file": f, "scale": k} for f, k in files], "layer_range": list(layers),
            "text": f"add control vectors {vectors} at layers {layers[0]}..{layers[1]}"}


def intervention_records(ablate_spec: str | None, ablate: list[tuple[int, int]], actions: list,
                         isolate: tuple[int, int] | None, n_head: int, cvec_files: list[tuple[str, float]],
                         steering_layers: tuple[int, int] | None) -> list[dict]:
    """Every intervention of the main command, in the order -a, --load/--patch (``actions``: the command's
    ``PatchAction`` objects), -s, control vectors (``steering_layers`` None: none)."""
    records = ablation_records(ablate_spec, ablate) if ablate else []
    records += [patch_record(a.name, a.layer, a.file, a.rows, a.avg) for a in actions]
    if isolate is not None:
        records.append(isolation_record(*isolate, n_head))
    if steering_layers is not None:
        records.append(steering_record(cvec_files, steering_layers))
    return records


def print_interventions(records: list[dict]) -> None:
    """One line per intervention, before the analyses."""
    for record in records:
        click.echo(f"intervention: {record['text']}")


def check_attn_out(path: str | None) -> None:
    """``--attn-out``'s extension, checked before the model loads."""
    if path is not None and Path(path).suffix.lower() not in ATTN_FORMATS:
        raise click.BadParameter(f"{path!r}: the file name must end in .npz or .csv", param_hint="--attn-out")


def write_attention(trace: Trace, path: str | os.PathLike, layers: list[int]) -> Path:
    """Write the attention weights of ``layers`` (captured ``attn_scores``) as numbers, whole or not at all.

    ``.npz``: ``layer_<L>`` ``[n_head, n_query, n_key]`` float32 per layer, ``layers`` ``[n]``, ``tokens`` (the
    token strings) and ``token_ids``. ``.csv``: one row per layer, head, query and key (every pair, the masked
    ones 0) with :data:`ATTN_HEADER`'s columns.
    """
    path = Path(path)
    tokens = trace.token_strs
    if path.suffix.lower() == ".npz":
        arrays = {f"layer_{il}": np.asarray(trace.attention(il), dtype=np.float32) for il in layers}
        buffer = io.BytesIO()
        np.savez(buffer, layers=np.array(layers, dtype=np.int64), tokens=np.array(tokens, dtype=str),
                 token_ids=np.array(trace.tokens, dtype=np.int64), **arrays)
        try:
            with atomic_write(path) as f:
                f.write(buffer.getvalue())
        except OSError as e:
            raise PyinterpError(f"cannot write --attn-out {path}: {e.strerror or e}") from None
        return path
    rows = []
    for il in layers:
        attn = trace.attention(il)
        for h, q, k in np.ndindex(attn.shape):
            rows.append([il, h, q, k, tokens[q], tokens[k], f"{float(attn[h, q, k]):.9g}"])
    return write_csv(path, ATTN_HEADER, rows)
