"""The main command's report: the lenses and target lenses it computes, their tables on the terminal, their JSON,
and the pictures and CSV tables it writes."""

from __future__ import annotations

from pathlib import Path

import click

from pyinterp.analysis.stats import markdown_table
from pyinterp.cli.lens import (ATTRIBUTION_HEADER, TARGET_HEADER, attribution_rows, numbered, parse_target,
                               print_attribution, print_targets, targets_json, targets_rows)
from pyinterp.cli.options import LayerList
from pyinterp.engine.arch import ARCHS, arch_of
from pyinterp.engine.names import split_name
from pyinterp.io.csv_io import write_csv

def lens_targets(spec: str, arch: str) -> list[tuple[str, list[int] | None]]:
    """``--ll`` as (tensor, layers) pairs to lens (layers None: every layer the tensor is on).

    ``all``: the residual-stream terms of ``arch`` (embedding, attention and FFN terms, residual);
    ``embd``: its embedding term; ``NAME-L``: layer L of NAME; ``NAME``: every layer of NAME.
    """
    if spec == "all":
        return [(name, None) for name in arch_of(arch).residual_terms]
    if spec == "embd":
        return [(arch_of(arch).embedding, None)]
    name, layer = split_name(spec)
    return [(name, None if layer is None else [layer])]


def lens_layers(model, name: str, only: list[int] | None, spec: LayerList) -> list[int] | None:
    """The layers ``--ll-layers`` picks for tensor ``name``; a tensor outside the layers (the embedding) keeps
    its one row."""
    if only is not None:
        raise click.UsageError("--ll NAME-LAYER and --ll-layers both choose layers; give one")
    if model.tensor_info().layers.get(name) == {-1}:
        return None
    return spec.resolve(model.n_layer)


def layer_labels(lens, arch: str) -> list[int | str]:
    """The rows of a lens: their layers, ``embd`` for the embedding term of ``arch`` (layer -1)."""
    embedding = ARCHS[arch].embedding if arch in ARCHS else None
    return ["embd" if il < 0 and lens.tensor == embedding else il for il in lens.layers]


def print_lens(lens, top_k: int, arch: str, decimals: int, as_md: bool = False) -> None:
    """A block per layer: each position's top tokens (``as_md``: one Markdown table, a row per layer and position)."""
    click.echo(f"{lens.title}, top {top_k}")
    strs = lens.strs
    if as_md:
        rows = [[str(label), str(position), repr(token),
                 ", ".join(f"{s!r} {p:.{decimals}f}" for s, p in zip(strs[li][t], lens.probs[li, t], strict=True))]
                for li, label in enumerate(layer_labels(lens, arch))
                for t, (position, token) in enumerate(zip(lens.positions, lens.position_strs, strict=True))]
        click.echo("\n" + markdown_table(["layer", "position", "token", f"top {top_k}"], rows) + "\n")
        return
    for li, label in enumerate(layer_labels(lens, arch)):
        click.echo(f"\nlayer {label}:")
        for t, (position, token) in enumerate(zip(lens.positions, lens.position_strs, strict=True)):
            tops = ", ".join(f"{s!r} {p:.{decimals}f}" for s, p in zip(strs[li][t], lens.probs[li, t], strict=True))
            click.echo(f"  [{position}] {token!r}: {tops}")


def lens_json(lens, arch: str) -> dict:
    strs = lens.strs
    return {
        "tensor": lens.tensor, "norm": lens.norm,
        "layers": [
            {"layer": label, "tokens": [
                {"position": pos, "token": tok, "top": [{"id": int(i), "str": s, "p": float(p)}
                                       for i, s, p in zip(lens.ids[li, t], strs[li][t], lens.probs[li, t], strict=True)]}
                for t, (pos, tok) in enumerate(zip(lens.positions, lens.position_strs, strict=True))]}
            for li, label in enumerate(layer_labels(lens, arch))],
    }


def lens_and_targets(model, ids: list[int], result: dict, lens_name: str | None, top_k: int, norm: bool,
                     ll_layers: LayerList | None, target_specs: tuple[str, ...],
                     positions: list[int] | None) -> tuple[list, list[tuple[int, str]], list]:
    """``--ll`` and ``--target``: the lenses (none without --ll), the targets ``(id, text)`` and their lenses (none
    without --target); their JSON goes into ``result``."""
    lensed = lens_targets(lens_name or "l_out", model.arch)
    if ll_layers is not None:
        lensed = [(name, lens_layers(model, name, only, ll_layers)) for name, only in lensed]
    lenses = []
    if lens_name is not None:
        lenses = [model.logit_lens(ids, tensor=name, layers=only, top_k=top_k, norm=norm, positions=positions)
                  for name, only in lensed]
        result["lensed"] = [lens.tensor for lens in lenses]
        result["logit_lens"] = [lens_json(lens, model.arch) for lens in lenses]
    targets = [parse_target(model, spec) for spec in target_specs]
    target_lenses = []
    if targets:
        target_lenses = [model.logit_lens(ids, tensor=name, layers=only, top_k=1, norm=norm,
                                          targets=[t for t, _ in targets], positions=positions or [-1])
                         for name, only in lensed]
        result["target_lens"] = [targets_json(lens, layer_labels(lens, model.arch)) for lens in target_lenses]
    return lenses, targets, target_lenses


def write_pictures_and_tables(arch: str, lenses: list, ll_png: str | None, target_lenses: list, target_png: str | None,
                              attributed: list, attr_png: str | None, csv_path: str | None) -> list[str]:
    """The lens, target and attribution PNGs and the CSV tables asked for; returns the paths written."""
    files = []
    if ll_png is not None:
        base = Path(ll_png)
        for lens in lenses:
            path = base if len(lenses) == 1 else base.with_name(f"{base.stem}-{lens.tensor}{base.suffix or '.png'}")
            files.append(str(lens.to_png(path, [str(label) for label in layer_labels(lens, arch)])))
    if target_png is not None:
        for lens in target_lenses:
            path = numbered(Path(target_png), ".png", len(target_lenses), lens.tensor)
            files.append(str(lens.targets_to_png(path, [str(label) for label in layer_labels(lens, arch)])))
    for a in attributed if attr_png is not None else []:
        files.append(str(a.to_png(numbered(Path(attr_png), ".png", len(attributed), f"p{a.position}"))))
    if csv_path is not None:
        tables = [("lens", TARGET_HEADER, [row for lens in target_lenses
                                           for row in targets_rows(lens, layer_labels(lens, arch))])] if target_lenses else []
        if attributed:
            tables.append(("attribution", ATTRIBUTION_HEADER, [row for a in attributed for row in attribution_rows(a)]))
        for what, header, rows in tables:
            files.append(str(write_csv(numbered(Path(csv_path), ".csv", len(tables), what), header, rows)))
    return files


def print_report(result: dict, lenses: list, targets: list[tuple[int, str]], target_lenses: list, attributed: list,
                 top_k: int, decimals: int, as_md: bool = False) -> None:
    """The analyses as text (``as_md``: their tables as Markdown), in the order the options list them (the generated
    text and files come after)."""
    arch = result["model"]["arch"]
    if "cgraph" in result:
        click.echo("\n".join(result["cgraph"]))
    for _, line in targets:
        click.echo(line)
    if len(lenses) > 1:
        click.echo(f"lensed: {', '.join(result['lensed'])}\n")
    for lens in lenses:
        print_lens(lens, top_k, arch, decimals, as_md)
    if targets:
        click.echo("")
        for lens in target_lenses:
            print_targets(lens, layer_labels(lens, arch), decimals, as_md)
    for a in attributed:
        print_attribution(a, result["prompt_tokens"][a.position]["str"], decimals, as_md)
