"""``pyinterp sae``: the features of a sparse autoencoder on a prompt, per token, and feature steering
(see pyinterp.analysis.sae)."""

from __future__ import annotations

import json
import math

import click
import numpy as np

from pyinterp.analysis.sae import SAE, SAEFeatures, sae_features, steer_features
from pyinterp.cli.lens import next_tokens
from pyinterp.cli.options import model_options
from pyinterp.errors import InputError

NEXT_TOKENS = 5  # next tokens listed before and after --steer
MAX_TITLE_PROMPT = 60  # characters of the prompt in the PNG's title


def parse_edits(specs: tuple[str, ...], d_sae: int) -> dict[int, float]:
    """``--steer FEATURE=VALUE`` options as ``{feature: value}``: features in 0..d_sae-1, each once, finite values."""
    edits: dict[int, float] = {}
    for spec in specs:
        feature, sep, value = spec.partition("=")
        try:
            j, v = int(feature), float(value)
        except ValueError:
            j, v = None, math.nan
        if not sep or j is None or not math.isfinite(v):
            raise click.BadParameter(f"expected FEATURE=VALUE (an integer and a finite number), got {spec!r}",
                                     param_hint="--steer")
        if not 0 <= j < d_sae:
            raise InputError(f"--steer: feature {j} out of range (the SAE has {d_sae} features: 0..{d_sae - 1})")
        if j in edits:
            raise InputError(f"--steer: feature {j} given twice")
        edits[j] = v
    return edits


def number(x: float) -> float | None:
    """A float for JSON: None for NaN (a zero activation has no cosine)."""
    return None if math.isnan(x) else float(x)


def features_json(feats: SAEFeatures) -> list[dict]:
    """One entry per token: position, id, text, L0, errors, and its active top features (id -1 left out)."""
    return [{"position": t, "id": int(tok), "str": s, "l0": int(feats.l0[t]), "rel_error": number(feats.rel_error[t]),
             "cosine": number(feats.cosine[t]),
             "features": [{"id": int(j), "value": float(v)}
                          for j, v in zip(feats.ids[t], feats.values[t], strict=True) if j >= 0]}
            for t, (tok, s) in enumerate(zip(feats.tokens, feats.token_strs, strict=True))]


def print_table(feats: SAEFeatures, header: str) -> None:
    """One row per token: position, token (repr), L0, relative error, cosine, then ``id:value`` per feature."""
    click.echo(header)
    tokens = [repr(s) for s in feats.token_strs]
    width = min(max(len("token"), *map(len, tokens)), 24)
    click.echo(f"{'pos':>4}  {'token'.ljust(width)}  {'L0':>5}  {'rel.err':>7}  {'cosine':>6}  features (id:value)")
    for t, token in enumerate(tokens):
        tops = "  ".join(f"{j}:{v:.3f}" for j, v in zip(feats.ids[t], feats.values[t], strict=True) if j >= 0)
        click.echo(f"{t:>4}  {token.ljust(width)}  {feats.l0[t]:>5}  {feats.rel_error[t]:>7.3f}  "
                   f"{feats.cosine[t]:>6.3f}  {tops or '-'}")


def print_steer(steer: dict) -> None:
    how = "times" if steer["scale"] else "clamped to"
    edits = ", ".join(f"{j} {how} {v:g}" for j, v in steer["edits"].items())
    click.echo(f"\nsteering features at every token: {edits}; next token after {steer['last_token']!r}:")
    for when in ("before", "after"):
        tops = ", ".join(f"{t['str']!r} {t['p']:.3f}" for t in steer[when])
        click.echo(f"  {when + ':':<8}{tops}")


def heatmap(full: SAEFeatures, top: SAEFeatures, d_sae: int, prompt: str) -> np.ndarray:
    """Features x tokens: the union of every token's top features (rows, by id), coloured by activation."""
    from pyinterp.viz.grids import value_grid
    from pyinterp.viz.plot import sanitize_label

    dense = np.zeros((len(full.tokens), d_sae), dtype=np.float32)
    for t in range(len(full.tokens)):
        live = full.ids[t] >= 0
        dense[t, full.ids[t][live]] = full.values[t][live]
    union = sorted({int(j) for j in top.ids.ravel() if j >= 0})
    if not union:
        raise InputError("--png: no feature is active at any token; nothing to draw")
    shown = prompt if len(prompt) <= MAX_TITLE_PROMPT else prompt[:MAX_TITLE_PROMPT - 3] + "..."
    title = (f"SAE {full.hook_name} -> {full.tensor}: activation of each token's top {top.ids.shape[1]} "
             f"features on {shown!r}")
    return value_grid(dense[:, union].T, title=title, row_labels=[str(j) for j in union],
                      col_labels=[sanitize_label(s) for s in full.token_strs], unit="activation",
                      row_name="feature", col_name="token")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("sae_dir", metavar="SAE_DIR")
@model_options
@click.option("-p", "--prompt", required=True, help="Prompt text.")
@click.option("--top", "top_k", default=5, show_default=True, type=click.IntRange(min=1),
              help="Features listed per token (at most the SAE's d_sae).")
@click.option("--steer", "steer_specs", multiple=True, metavar="FEATURE=VALUE",
              help="Clamp FEATURE to VALUE at every token (repeatable) and show the next token before and after.")
@click.option("--scale", is_flag=True, help="With --steer: multiply the features by VALUE instead of clamping.")
@click.option("--png", default=None, type=click.Path(dir_okay=False), metavar="PATH",
              help="Write a features x tokens heatmap of the activations (every token's top features).")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON instead of the table.")
def sae(sae_dir, model_opts, prompt, top_k, steer_specs, scale, png, as_json):
    """The features of the SAE in SAE_DIR (SAELens's format: cfg.json and sae_weights.safetensors) on a prompt.

    Per token: the --top most active features (id:value), L0 (active features), the relative error
    |x - x_hat| / |x| and the cosine of x and x_hat, x being the row of the model tensor the SAE's hook
    names. With --steer: the last token's next-token probabilities of the plain run and of the run with
    the features edited (the SAE's error term kept, so only the edited features change).
    """
    from pyinterp.viz.plot import save_png

    if scale and not steer_specs:
        raise click.UsageError("--scale goes with --steer")
    sae_ = SAE.load(sae_dir)
    if top_k > sae_.d_sae:
        raise click.BadParameter(f"{top_k} is more than the SAE's {sae_.d_sae} features", param_hint="--top")
    edits = parse_edits(steer_specs, sae_.d_sae)
    with model_opts.open() as model:
        ids = model.prompt_ids(prompt)
        # the heatmap needs every feature's value at every token, not only each token's top ones
        full = sae_features(model, sae_, ids, top_k=sae_.d_sae if png is not None else top_k)
        feats = SAEFeatures(**{**vars(full), "ids": full.ids[:, :top_k], "values": full.values[:, :top_k]})
        steer = None
        if edits:
            before = model.run(ids, logits="last").logits[-1]
            after = steer_features(model, sae_, ids, edits, scale=scale)[-1]
            steer = {"edits": edits, "scale": scale, "last_token": feats.token_strs[-1],
                     "before": next_tokens(model, before, NEXT_TOKENS), "after": next_tokens(model, after, NEXT_TOKENS)}
        name = model.path.name
    files = [str(save_png(heatmap(full, feats, sae_.d_sae, prompt), png))] if png is not None else []
    described = {"path": str(sae_dir), "hook_name": sae_.hook_name, "tensor": feats.tensor,
                 "architecture": sae_.architecture, "d_in": sae_.d_in, "d_sae": sae_.d_sae}
    if as_json:
        result = {"model": name, "sae": described, "prompt": prompt, "top": top_k, "tokens": features_json(feats)}
        if steer is not None:
            result["steer"] = {**steer, "edits": {str(j): v for j, v in edits.items()}}
        click.echo(json.dumps({**result, "files": files}, ensure_ascii=False))
        return
    print_table(feats, f"SAE {sae_.hook_name} -> {feats.tensor} ({sae_.architecture}, d_in {sae_.d_in}, "
                       f"d_sae {sae_.d_sae}) on {name}; top {top_k} features per token")
    if steer is not None:
        print_steer(steer)
    for path in files:
        click.echo(f"wrote {path}")
