"""``pyinterp circuit``: the attribution graph of a prompt with transcoders for the MLPs, pruned as circuit-tracer
prunes it, written as circuit-tracer's graph JSON and a self-contained HTML view, and checked by perturbing its top
features in the real model (see pyinterp.circuit)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
import numpy as np

from pyinterp.analysis.stats import markdown_table
from pyinterp.circuit import (AttributionGraph, attribution_graph, check_features, graph_scores, load_transcoders,
                              prune_graph, write_graph_files, write_view)
from pyinterp.circuit.build import for_model
from pyinterp.circuit.check import FeatureCheck
from pyinterp.circuit.gguf_weights import top_tokens, vectors
from pyinterp.circuit.prune import logit_weights, node_influence
from pyinterp.cli.corpus import Meter
from pyinterp.cli.lens import parse_target
from pyinterp.cli.options import model_options
from pyinterp.cli.sets import md_option

TOP_LOGITS = 5        # tokens shown per feature in the view
LISTED = 15           # features listed in the table
SLUG = re.compile(r"[A-Za-z0-9_.-]+")


def feature_top_logits(model, graph: AttributionGraph, transcoders, nodes: list[int]) -> dict[int, list]:
    """For each feature node: the tokens its decoder promotes most (its write into the last layer it writes, times
    the final norm's weight, through the unembedding): node -> [(token, logit), ...]."""
    if not nodes:
        return {}
    (g,) = vectors(model.path, ["output_norm.weight"])
    rows = []
    for i in nodes:
        layer, _, feat = (int(v) for v in graph.features[i])
        tc = transcoders.layers[layer]
        rows.append(tc.decoder(layer + tc.n_out - 1)[feat] * g)
    ids, values = top_tokens(model.path, np.stack(rows), TOP_LOGITS)
    return {i: [(model.token_str(int(t)), float(v)) for t, v in zip(ids[k], values[k])] for k, i in enumerate(nodes)}


def node_label(graph: AttributionGraph, i: int) -> str:
    layer, pos, feat = (int(v) for v in graph.features[i])
    return f"L{layer} f{feat} @{pos} {graph.input_strings[pos]!r}"


def summary(graph: AttributionGraph, node_mask: np.ndarray, influence: np.ndarray, scores: tuple[float, float],
            checks: list[FeatureCheck]) -> dict:
    """Everything the command reports, JSON-ready."""
    kept = np.nonzero(node_mask[:graph.n_feat])[0]
    listed = kept[np.argsort(-influence[kept], kind="stable")][:LISTED]
    return {
        "model": graph.model, "transcoders": graph.transcoders, "prompt": graph.prompt,
        "tokens": graph.input_strings,
        "targets": [{"id": int(t), "str": s, "p": float(p)} for t, s, p in
                    zip(graph.logit_tokens, graph.logit_strings, graph.logit_probabilities)],
        "nodes": {"features": graph.n_feat, "errors": graph.n_layer * graph.n_pos, "tokens": graph.n_pos,
                  "logits": graph.n_logit, "kept_features": int(len(kept)), "kept": int(node_mask.sum())},
        "replacement_score": scores[0], "completeness_score": scores[1],
        "top_features": [{"node": int(i), "layer": int(graph.features[i, 0]), "position": int(graph.features[i, 1]),
                          "token": graph.input_strings[int(graph.features[i, 1])], "feature": int(graph.features[i, 2]),
                          "activation": float(graph.activations[i]), "influence": float(influence[i])} for i in listed],
        "check": [{"node": c.node, "layer": c.feature[0], "position": c.feature[1], "feature": c.feature[2],
                   "activation": c.activation, "graph_direct": c.direct, "graph": c.predicted, "real": c.real,
                   "replacement": c.replaced}
                  for c in checks],
        "info": graph.info,
    }


def print_summary(s: dict, as_md: bool, factor: float) -> None:
    targets = ", ".join(f"{t['str']!r} {t['p']:.3f}" for t in s["targets"])
    n = s["nodes"]
    click.echo(f"attribution graph of {s['model']} with {s['transcoders']} on {len(s['tokens'])} tokens; "
               f"targets: {targets}")
    click.echo(f"nodes: {n['features']} features, {n['errors']} errors, {n['tokens']} tokens, {n['logits']} logits; "
               f"pruned: {n['kept']} kept ({n['kept_features']} features)")
    click.echo(f"replacement score {s['replacement_score']:.3f}, completeness score {s['completeness_score']:.3f}; "
               f"edge sums off their inputs by {s['info']['sum_error']:.1e} (relative)")
    click.echo(f"{s['info']['frozen_decodes']} frozen decodes for {s['info']['sources']} sources in "
               f"{s['info']['frozen_s']:.1f} s (normal pass {s['info']['measure_s']:.1f} s)")
    header = ["layer", "pos", "token", "feature", "activation", "influence"]
    rows = [[str(f["layer"]), str(f["position"]), repr(f["token"]), str(f["feature"]), f"{f['activation']:.3f}",
             f"{f['influence']:.4f}"] for f in s["top_features"]]
    click.echo(f"\nkept features by influence on the targets (top {len(rows)}):")
    click.echo(markdown_table(header, rows) if as_md else _plain(header, rows))
    if s["check"]:
        what = "ablated" if factor == 0 else f"times {factor:g}"
        click.echo(f"\n--check: each feature {what}; change of the target logit ({s['targets'][0]['str']!r}, less "
                   f"the mean logit) predicted by the graph (its direct edge; through the graph's features) and "
                   f"measured in the real model and in the replacement model (MLPs replaced by the transcoders, "
                   f"error terms frozen):")
        header = ["layer", "pos", "feature", "graph (direct)", "graph", "real", "replacement"]
        rows = [[str(c["layer"]), str(c["position"]), str(c["feature"]), f"{c['graph_direct']:+.4f}",
                 f"{c['graph']:+.4f}", f"{c['real']:+.4f}",
                 "-" if c["replacement"] is None else f"{c['replacement']:+.4f}"] for c in s["check"]]
        click.echo(markdown_table(header, rows) if as_md else _plain(header, rows))
        pred = np.array([c["graph"] for c in s["check"]])
        for key in ("real", "replacement"):
            got = np.array([np.nan if c[key] is None else c[key] for c in s["check"]])
            if len(pred) > 1 and pred.std() > 0 and np.all(np.isfinite(got)) and got.std() > 0:
                click.echo(f"correlation of the graph's and the {key} model's changes: "
                           f"{np.corrcoef(pred, got)[0, 1]:.3f}")


def _plain(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in [header, *rows])


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@model_options
@click.option("--transcoders", "tc_path", required=True, type=click.Path(exists=True), metavar="PATH",
              help="Transcoders for every MLP: SAELens directories, circuit-tracer files (config.yaml), Gemma Scope, "
                   "or a CLT.")
@click.option("-p", "--prompt", required=True, help="Prompt text.")
@click.option("--target", "targets", multiple=True, metavar="TOKEN",
              help="A logit to explain (token text or id; repeatable). Default: the top logits of the last position "
                   "holding 95%% of the probability, at most 10.")
@click.option("--max-features", default=8192, show_default=True, type=click.IntRange(min=1),
              help="Feature nodes kept (the largest writes); the others' writes go to the error nodes.")
@click.option("--drop-first", is_flag=True,
              help="No feature nodes at position 0 (circuit-tracer leaves out the first token, usually BOS); their "
                   "writes go to the error nodes.")
@click.option("--node-threshold", default=0.8, show_default=True, type=click.FloatRange(0, 1),
              help="Pruning: keep the nodes holding this share of the influence on the targets.")
@click.option("--edge-threshold", default=0.98, show_default=True, type=click.FloatRange(0, 1),
              help="Pruning: keep the edges holding this share of the edge influence.")
@click.option("-o", "--out", "out_dir", default=None, type=click.Path(file_okay=False), metavar="DIR",
              help="Write circuit-tracer's graph JSON (SLUG.json and graph-metadata.json) into DIR.")
@click.option("--slug", default="pyinterp-graph", show_default=True, help="The graph's name in the JSON.")
@click.option("--html", default=None, type=click.Path(dir_okay=False), metavar="PATH",
              help="Write a self-contained HTML view of the pruned graph.")
@click.option("--check", "n_check", default=0, type=click.IntRange(min=0), metavar="N",
              help="Perturb the N most influential kept features in the real model and compare the target logit's "
                   "change with the graph's prediction.")
@click.option("--check-factor", default=0.0, show_default=True, type=float,
              help="With --check: multiply each feature's activation by this (0 ablates it, 2 doubles it).")
@md_option
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
def circuit(model_opts, tc_path, prompt, targets, max_features, drop_first, node_threshold, edge_threshold, out_dir,
            slug, html, n_check, check_factor, as_md, as_json):
    """The attribution graph of a prompt's last position in the local replacement model: the MLPs replaced by
    the transcoders at --transcoders, attention patterns and norm scales frozen at their values on this prompt.
    Nodes are the active features, the error terms, the tokens and the target logits; each edge is a source's
    direct linear effect on a target. Pruned as circuit-tracer prunes, with its replacement and completeness scores.
    """
    if not SLUG.fullmatch(slug):
        raise click.BadParameter(f"letters, digits, '_', '.' and '-' only, got {slug!r}", param_hint="--slug")
    with model_opts.open() as model:
        transcoders = for_model(model, load_transcoders(tc_path, n_layer=model.n_layer, d_model=model.n_embd))
        target_ids = [parse_target(model, t)[0] for t in targets] or None
        meter = Meter("frozen passes", None, unit="sources", rate_unit="sources/s")
        graph = attribution_graph(model, prompt, transcoders, targets=target_ids, max_features=max_features,
                                  drop_first=drop_first,
                                  progress=lambda done, total: (setattr(meter, "total", total), meter.update(done)))
        meter.close()
        graph.transcoders = str(tc_path)
        pruned = prune_graph(graph, node_threshold, edge_threshold)  # once: the JSON and the view take it too
        node_mask = pruned[0]
        influence = node_influence(graph.adjacency.astype(np.float64), logit_weights(graph))
        kept = [int(i) for i in np.nonzero(node_mask[:graph.n_feat])[0]]
        if html is not None:
            graph.info["feature_top_logits"] = [[] for _ in range(graph.n_feat)]
            for i, top in feature_top_logits(model, graph, transcoders, kept).items():
                graph.info["feature_top_logits"][i] = top
        ranked = sorted(kept, key=lambda i: -influence[i])[:n_check]
        checks = check_features(model, graph, transcoders, ranked, check_factor) if n_check else []
    scores = graph_scores(graph)
    files = []
    if out_dir is not None:
        files.append(str(write_graph_files(graph, slug, out_dir, node_threshold=node_threshold,
                                           edge_threshold=edge_threshold, pruned=pruned)))
    if html is not None:
        write_view(graph, html, node_threshold, edge_threshold, pruned)
        files.append(str(Path(html)))
    graph.info.pop("feature_top_logits", None)
    result = summary(graph, node_mask, influence, scores, checks)
    if as_json:
        click.echo(json.dumps({**result, "files": files}, ensure_ascii=False))
        return
    print_summary(result, as_md, check_factor)
    for path in files:
        click.echo(f"wrote {path}")
