"""The main command over a prompt set (``pyinterp --prompts FILE``): the target lens (``--ll``, ``--target``) and the
direct logit attribution (``--attribute``) of every example, their aggregate per cell (mean, standard deviation,
bootstrap 95 % interval), as tables (text or ``--md``), JSON, CSV and PNG. See docs/prompt-sets.md."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import click
import numpy as np

from pyinterp.analysis.lens import resolve_target
from pyinterp.analysis.set_lens import SetAttribution, SetLens, attribution_over_set, lens_over_set
from pyinterp.analysis.stats import Summary, summarize
from pyinterp.cli.lens import numbered, parse_positions, parse_target
from pyinterp.cli.options import progress
from pyinterp.cli.report import layer_labels, lens_layers, lens_targets
from pyinterp.cli.sets import example_ids, load_set, print_table, summary_cells
from pyinterp.errors import InputError
from pyinterp.io.csv_io import write_csv

# options of the main command that run one prompt, or change it, and have no meaning over a set
SINGLE_ONLY = (("-p/--prompt", "prompt"), ("-f/--file", "prompt_file"), ("-n", "n_predict"), ("--temp", "temp"),
               ("--ignore-eos", "ignore_eos"), ("--ll-topk", "ll_topk"), ("--ll-png", "ll_png"), ("--draw", "draw"),
               ("--draw-path", "draw_path"), ("--draw-layers", "draw_layers"), ("--save", "saves"),
               ("--load", "loads"), ("--patch", "patch_specs"), ("--patch-avg", "patch_avg"),
               ("--control-vector", "cvec_files"), ("--control-vector-scaled", "cvec_scaled"),
               ("--control-vector-layer-range", "cvec_range"), ("--print-cgraph", "print_cgraph"))
LENS_KEYS = ("p", "rank", "top1")  # the lens's per-example values: P(answer), its best rank, 1 if it is the top-1
LENS_HEADER = ["line", "tensor", "lens", "layer", "position", "token_position", "p", "rank", "top1", "top_id", "top"]
ATTRIBUTION_HEADER = ["line", "position", "token_position", "target_id", "target", "layer", "term", "head", "value"]


def given(ctx: click.Context) -> set[str]:
    return {n for n in ctx.params if ctx.get_parameter_source(n) == click.core.ParameterSource.COMMANDLINE}


def check_set_options(ctx: click.Context) -> tuple[bool, bool]:
    """The options that go with ``--prompts``; returns (lensing, attributing). The target lens runs with ``--ll``,
    ``--target`` or a lens option (``--ll-layers``, ``--norm-lens/--raw-lens``, ``--target-png``), or when
    ``--attribute`` is not given (then of l_out)."""
    p, on = ctx.params, given(ctx)
    for option, name in SINGLE_ONLY:
        if name in on:
            raise click.UsageError(f"{option} does not go with --prompts (it runs one prompt)")
    attributing = p["attribute"] is not None
    lens_options = {"norm_lens", "ll_layers", "target_png"} & on
    lensing = p["lens_name"] is not None or bool(p["target_specs"]) or bool(lens_options) or not attributing
    if "attr_png" in on and not attributing:
        raise click.UsageError("--attr-png needs --attribute")
    return lensing, attributing


def example_targets(model, path: str, examples: list, override: list[int]) -> list[list[int]]:
    """Each example's target ids: ``--target``'s (the same for every example) when given, else its own."""
    out = []
    for e in examples:
        try:
            out.append(override or [resolve_target(model, t) for t in e.targets])
        except InputError as err:
            raise InputError(f"{path}:{e.line}: {err}") from None
    return out


def run_set(ctx: click.Context, model_opts) -> None:
    """``pyinterp --prompts FILE ...``: everything the options ask for, over every example."""
    from pyinterp.cli.main import parse_heads

    p = ctx.params
    lensing, attributing = check_set_options(ctx)
    path = p["prompts_path"]
    examples = load_set(path, ("prompt", "target") if lensing and not p["target_specs"] else ("prompt",))
    seed = 0 if p["seed"] is None else p["seed"]
    positions = parse_positions(p["ll_pos"]) if p["ll_pos"] is not None else [-1]
    result: dict = {"prompts": path, "n_examples": len(examples), "seed": seed}
    with contextlib.ExitStack() as stack:
        model = stack.enter_context(model_opts.open())
        result["model"] = {"path": str(model.path), "arch": model.arch, "n_layer": model.n_layer, "n_head": model.n_head}
        if p["ablate_spec"]:
            stack.enter_context(model.ablated(parse_heads(p["ablate_spec"], model.n_layer, model.n_head)))
        if p["isolate"] is not None:
            stack.enter_context(model.isolated(*p["isolate"]))
        ids = example_ids(model, path, examples)
        names = [f"{path}:{e.line}" for e in examples]
        override = [parse_target(model, spec)[0] for spec in p["target_specs"]]
        targets = example_targets(model, path, examples, override)
        lenses: list[SetLens] = []
        if lensing:
            lensed = lens_targets(p["lens_name"] or "l_out", model.arch)
            if p["ll_layers"] is not None:
                lensed = [(name, lens_layers(model, name, only, p["ll_layers"])) for name, only in lensed]
            with progress(len(examples) * len(lensed), "lens") as bar:
                lenses = [lens_over_set(model, ids, targets, name, p["norm_lens"], only, positions, p["per_decode"],
                                        names, on_decode=bar and bar.update) for name, only in lensed]
        attribution = None
        if attributing:
            chosen = parse_target(model, p["attribute"])[0] if p["attribute"] else None
            first = [chosen if chosen is not None else (t[0] if t else None) for t in targets]
            with progress(len(examples), "attribution") as bar:
                attribution = attribution_over_set(model, ids, first, positions, names, on_example=bar and bar.update)
        token_str = model.token_str
        lens_sums = [{k: summarize(getattr(lens, k), seed) for k in LENS_KEYS} for lens in lenses]
        attr_sums = attribution_summaries(attribution, seed) if attribution is not None else {}
        arch = result["model"]["arch"]
        result["lens"] = [lens_json(lens, s, examples, positions, arch, token_str) for lens, s in zip(lenses, lens_sums)]
        if attribution is not None:
            result["attribution"] = attribution_json(attribution, attr_sums, examples, positions, token_str)
        files = write_files(p, lenses, lens_sums, attribution, attr_sums, examples, positions, arch, token_str)
        result["files"] = files
        if p["as_json"]:
            click.echo(json.dumps(result, ensure_ascii=False, indent=1))
            return
        for lens, s in zip(lenses, lens_sums):
            print_lens_tables(lens, s, positions, arch, len(examples), seed, p["decimals"], p["as_md"])
        if attribution is not None:
            print_attribution_tables(attribution, attr_sums, positions, len(examples), p["decimals"], p["as_md"])
        for f in files:
            click.echo(f"wrote {f}")


def attribution_summaries(a: SetAttribution, seed: int) -> dict[str, Summary]:
    return {k: summarize(getattr(a, k), seed) for k in ("logit", "embed", "attn", "ffn", "heads")}


def lens_json(lens: SetLens, sums: dict[str, Summary], examples: list, positions: list[int], arch: str,
              token_str) -> dict:
    """The lens of every example (its values ``[n_layers, n_positions]``) and the aggregate of each cell."""
    per = []
    for i, e in enumerate(examples):
        per.append({"line": e.line, "prompt": e.text, "positions": lens.positions[i],
                    "targets": [{"id": t, "str": token_str(t)} for t in lens.targets[i]],
                    "p": lens.p[i].tolist(), "rank": lens.rank[i].tolist(),
                    "target_probs": lens.target_probs[i].tolist(), "target_ranks": lens.target_ranks[i].tolist(),
                    "top": [[{"id": int(t), "str": token_str(int(t)), "p": float(q)} for t, q in zip(row_t, row_p)]
                            for row_t, row_p in zip(lens.top_ids[i], lens.top_probs[i])]})
    return {"tensor": lens.tensor, "norm": lens.norm, "layers": layer_labels(lens, arch), "positions": positions,
            "examples": per, "aggregate": {k: s.to_dict() for k, s in sums.items()}}


def attribution_json(a: SetAttribution, sums: dict[str, Summary], examples: list, positions: list[int],
                     token_str) -> dict:
    per = [{"line": e.line, "prompt": e.text, "positions": a.positions[i],
            "targets": [{"id": t, "str": token_str(t)} for t in a.targets[i]],
            **{k: getattr(a, k)[i].tolist() for k in ("logit", "embed", "attn", "ffn", "heads")}}
           for i, e in enumerate(examples)]
    return {"positions": positions, "examples": per, "aggregate": {k: s.to_dict() for k, s in sums.items()}}


def print_lens_tables(lens: SetLens, sums: dict[str, Summary], positions: list[int], arch: str, n: int, seed: int,
                      decimals: int, as_md: bool) -> None:
    """Per asked position: a row per layer, P(target)'s mean, std and interval, the rank's, the top-1 share."""
    header = ["layer", "P mean", "P std", "P 95% CI", "rank mean", "rank std", "rank 95% CI", "top-1"]
    for j, position in enumerate(positions):
        rows = [[label, *summary_cells(sums["p"], (li, j), decimals), *summary_cells(sums["rank"], (li, j), 1),
                 f"{sums['top1'].mean[li, j]:.2f}"] for li, label in enumerate(layer_labels(lens, arch))]
        title = (f"P(target) over {n} examples: {'norm' if lens.norm else 'raw'} logit lens of {lens.tensor} at "
                 f"position {position}; mean, std, bootstrap 95% interval (seed {seed}); top-1: share of examples")
        print_table(title, header, rows, as_md)


def print_attribution_tables(a: SetAttribution, sums: dict[str, Summary], positions: list[int], n: int,
                             decimals: int, as_md: bool, top: int = 10) -> None:
    """Per asked position: the embedding and each layer's attention and FFN terms, then the heads of largest mean."""
    for j, position in enumerate(positions):
        rows = [["embd", *summary_cells(sums["embed"], (j,), decimals), "", "", ""]]
        rows += [[il, *summary_cells(sums["attn"], (j, il), decimals), *summary_cells(sums["ffn"], (j, il), decimals)]
                 for il in range(a.attn.shape[2])]
        print_table(f"direct logit attribution over {n} examples at position {position} (logit mean "
                    f"{sums['logit'].mean[j]:.{decimals}f}); mean, std, bootstrap 95% interval",
                    ["layer", "attn mean", "attn std", "attn 95% CI", "ffn mean", "ffn std", "ffn 95% CI"], rows, as_md)
        mean = sums["heads"].mean[j]
        order = np.argsort(-np.abs(mean), axis=None, kind="stable")[:top]
        heads = [[f"{il}:{h}", *summary_cells(sums["heads"], (j, il, h), decimals)]
                 for il, h in zip(*np.unravel_index(order, mean.shape))]
        print_table(f"heads of largest mean |attribution| at position {position}", ["head", "mean", "std", "95% CI"],
                    heads, as_md)


def lens_rows(lens: SetLens, examples: list, positions: list[int], arch: str, token_str) -> list[list]:
    """CSV rows (:data:`LENS_HEADER`), one per example, layer and position."""
    p, rank = lens.p, lens.rank
    return [[e.line, lens.tensor, "norm" if lens.norm else "raw", label, position, lens.positions[i][j],
             float(p[i, li, j]), int(rank[i, li, j]), int(rank[i, li, j] == 1), int(lens.top_ids[i, li, j]),
             token_str(int(lens.top_ids[i, li, j]))]
            for i, e in enumerate(examples) for li, label in enumerate(layer_labels(lens, arch))
            for j, position in enumerate(positions)]


def attribution_rows(a: SetAttribution, examples: list, positions: list[int], token_str) -> list[list]:
    """CSV rows (:data:`ATTRIBUTION_HEADER`), one per example, position and term (embedding, attn, ffn, head)."""
    rows = []
    for i, e in enumerate(examples):
        for j, position in enumerate(positions):
            head = [e.line, position, a.positions[i][j], a.targets[i][j], token_str(a.targets[i][j])]
            rows.append([*head, "", "embd", "", float(a.embed[i, j])])
            for il in range(a.attn.shape[2]):
                rows += [[*head, il, "attn", "", float(a.attn[i, j, il])], [*head, il, "ffn", "", float(a.ffn[i, j, il])]]
                rows += [[*head, il, "head", h, float(v)] for h, v in enumerate(a.heads[i, j, il])]
    return rows


def write_files(p: dict, lenses: list[SetLens], lens_sums: list, attribution: SetAttribution | None, attr_sums: dict,
                examples: list, positions: list[int], arch: str, token_str) -> list[str]:
    """The PNGs (P(target) against layer with its interval; the mean attribution per head) and the CSV tables."""
    from pyinterp.viz.charts import line_charts
    from pyinterp.viz.grids import signed_grid
    from pyinterp.viz.plot import save_png

    files = []
    if p["target_png"] is not None and lenses:
        panels, bands = [], []
        for j, position in enumerate(positions):
            panels.append((f"position {position}", {lens.tensor: s["p"].mean[:, j] for lens, s in zip(lenses, lens_sums)}))
            bands.append({lens.tensor: (s["p"].low[:, j], s["p"].high[:, j]) for lens, s in zip(lenses, lens_sums)})
        title = (f"P(target) over {len(examples)} examples, {'norm' if lenses[0].norm else 'raw'} lens: "
                 f"mean and bootstrap 95% interval")
        labels = [str(label) for label in layer_labels(lenses[0], arch)]
        files.append(str(save_png(line_charts(panels, labels, title=title, bands=bands), p["target_png"])))
    if p["attr_png"] is not None and attribution is not None:
        s = attr_sums
        for j, position in enumerate(positions):
            cells = [np.concatenate([getattr(s["heads"], k)[j], getattr(s["attn"], k)[j][:, None],
                                     getattr(s["ffn"], k)[j][:, None]], axis=1) for k in ("mean", "low", "high")]
            texts = [[f"{m:.2f}±{(hi - lo) / 2:.2f}" for m, lo, hi in zip(*row)] for row in zip(*cells)]
            n_layer, n_head = s["heads"].mean.shape[1:]
            image = signed_grid(cells[0], title=f"mean direct logit attribution over {len(examples)} examples at "
                                f"position {position} (± half the bootstrap 95% interval); heads and layer totals on "
                                f"separate scales", row_labels=[str(il) for il in range(n_layer)],
                                col_labels=[f"h{h}" for h in range(n_head)] + ["attn", "ffn"],
                                blocks=[(0, n_head, "heads", "head"), (n_head, n_head + 2, "layer totals", "term")],
                                unit="logit", row_name="layer", texts=texts)
            files.append(str(save_png(image, numbered(Path(p["attr_png"]), ".png", len(positions), f"p{position}"))))
    if p["csv_path"] is not None:
        tables = [("lens", LENS_HEADER, [r for lens in lenses for r in lens_rows(lens, examples, positions, arch, token_str)])]
        tables = tables if lenses else []
        if attribution is not None:
            tables.append(("attribution", ATTRIBUTION_HEADER, attribution_rows(attribution, examples, positions, token_str)))
        for what, header, rows in tables:
            files.append(str(write_csv(numbered(Path(p["csv_path"]), ".csv", len(tables), what), header, rows)))
    return files
