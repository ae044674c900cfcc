"""``pyinterp features``: statistics of a tensor's neurons or an SAE's features over a corpus, a delphi cache,
and the drift from a baseline run."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Iterable, Iterator

import click
import numpy as np

from pyinterp.analysis.delphi import DelphiCache
from pyinterp.analysis.drift import compare, load_features, plot, table
from pyinterp.analysis.features import FeatureAccumulator, features_json, select_units
from pyinterp.analysis.logit_effects import Unembedding, logits_json
from pyinterp.cli.corpus import CorpusOptions, Meter, corpus_options
from pyinterp.cli.options import ModelOptions, model_options
from pyinterp.errors import InputError
from pyinterp.io.atomic import atomic_write
from pyinterp.viz.dashboard import write_dashboard

N_LOGIT_TOKENS = 10  # promoted and suppressed tokens listed per feature
SAE_SLOTS = 512      # features read out per token for a non-TopK SAE (more than any row may have: checked)


def parse_ids(spec: str | None) -> list[int] | None:
    """``--features 12,77`` as a list of ints."""
    if spec is None:
        return None
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected feature ids like 12,77, got {spec!r}", param_hint="--features") from None


def parse_window(spec: str) -> tuple[int, int]:
    """``--window B,A``: tokens before and after the example."""
    try:
        before, after = (int(x) for x in spec.split(","))
    except ValueError:
        raise click.BadParameter(f"expected BEFORE,AFTER like 10,5, got {spec!r}", param_hint="--window") from None
    if before < 0 or after < 0:
        raise click.BadParameter("must be >= 0", param_hint="--window")
    return before, after


def metered(batches: Iterable, meter: Meter) -> Iterator:
    """The batches, each counted on the progress line."""
    done = 0
    for batch in batches:
        yield batch
        done += len(batch.token_ids)
        meter.update(done)
    meter.close()


def check_sae_rows(batches: Iterable, slots: int, d_sae: int) -> Iterator:
    """The batches, checking that no row filled every readout slot (it might have more active features)."""
    for batch in batches:
        if slots < d_sae and np.any(np.all(batch.sae[1] > 0, axis=1)):
            raise InputError(f"a token has {slots} or more active SAE features, more than pyinterp reads out per "
                             f"token ({slots}): this SAE is not sparse enough for feature statistics")
        yield batch


def corpus_batches(model, corpus: Path, tensor: str | None, sae, corpus_opts: CorpusOptions) -> tuple[Iterator, dict]:
    """The batches of a model run over a text corpus (the SAE encoded in the graph), and the corpus's
    description for features.json."""
    from pyinterp.analysis.sae import sae_readout
    from pyinterp.corpus.extract import contexts_per_decode, model_contexts, packing_for
    from pyinterp.corpus.stream import batches

    size = corpus_opts.context_size
    packing = packing_for(model, size, corpus_opts.pack)
    contexts = model_contexts(model, corpus_opts.source(str(corpus)), packing, corpus_opts.max_tokens)
    readout, names = None, [tensor]
    if sae is not None:
        slots = sae.k if sae.architecture == "topk" else min(SAE_SLOTS, sae.d_sae)
        readout, names = sae_readout(model, sae, slots, {}, False), []
    stream = batches(model, contexts, names, per_decode=contexts_per_decode(model, size), readout=readout)
    if sae is not None and sae.architecture != "topk":  # a TopK SAE has at most k active features per token
        stream = check_sae_rows(stream, slots, sae.d_sae)
    return stream, {"path": str(corpus), "context_size": size, "packing": packing.describe()}


def stats_of(batches: Iterable, n_units: int, tensor: str | None, *, track: np.ndarray | None, examples: int,
             window: tuple[int, int], delphi: DelphiCache | None):
    """Run the accumulator (and the delphi writer) over ``batches``; the finished statistics."""
    acc = FeatureAccumulator(n_units, tensor=tensor, track=track, top_k=examples, window=window)
    for batch in batches:
        rows = acc.add(batch)
        if delphi is not None and rows.n_rows:
            delphi.add(np.asarray(batch.token_ids), np.asarray(batch.context), *rows.entries())
    return acc.result()


def unit_logits(model_path: Path, sae, units: np.ndarray, width: int, token_str) -> list[dict] | None:
    """The logit effects of ``units``: SAE decoder rows, or unit vectors of a tensor as wide as the residual
    stream; None for a tensor of another width (no direction in the residual stream)."""
    unembed = Unembedding.from_gguf(model_path)
    if sae is not None:
        directions = sae.W_dec[units]
    elif width == unembed.n_embd:
        directions = np.eye(width, dtype=np.float32)[units]
    else:
        return None
    effects = unembed.effects(directions, N_LOGIT_TOKENS)
    return [logits_json(token_str, *(a[i] for a in effects)) for i in range(len(units))]


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("corpus", type=click.Path(exists=True, path_type=Path))
@click.option("-t", "--tensor", default=None, metavar="NAME", help="Tensor whose neurons to study (l_out-5, "
              "blocks.5.hook_resid_post); with --sae, the SAE's hook tensor is used.")
@click.option("--sae", "sae_dir", default=None, type=click.Path(exists=True, file_okay=False), metavar="SAE_DIR",
              help="Study this SAE's features (SAELens format), encoded inside the graph.")
@click.option("--features", "feature_spec", default=None, metavar="IDS", help="Only these units, e.g. 12,77.")
@click.option("--top-features", default=None, type=click.IntRange(min=1), metavar="N",
              help="Only the N units of highest density.")
@click.option("--examples", default=10, show_default=True, type=click.IntRange(1, 1000), help="Top examples per unit.")
@click.option("--window", default="10,5", show_default=True, metavar="B,A", help="Tokens before and after an example.")
@click.option("--dense-threshold", default=0.1, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="A unit active on more than this share of tokens is reported dense.")
@click.option("--delphi-splits", default=1, show_default=True, type=click.IntRange(min=1),
              help="Files the delphi cache splits the units into.")
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False, path_type=Path), metavar="OUT")
@click.option("--baseline", default=None, type=click.Path(exists=True, dir_okay=False), metavar="FEATURES_JSON",
              help="Compare with a saved run: OUT/drift.json, OUT/drift.png and a table on stdout.")
@click.option("--alpha", default=0.01, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Drift: family-wise significance level (Bonferroni over the features compared).")
@click.option("--md", is_flag=True, help="Print the drift table as Markdown.")
@corpus_options
@functools.partial(model_options, threads=("--threads",))
def features(corpus, tensor, sae_dir, feature_spec, top_features, examples, window, dense_threshold, delphi_splits, out,
             baseline, alpha, md, corpus_opts, model_opts):
    """Per-unit statistics of a tensor's neurons (-t NAME) or an SAE's features (--sae) over CORPUS: density,
    mean, std, max, min, a histogram and the top examples with their context, and the logit effects.

    CORPUS is a text corpus (a .txt file, one document per line; .jsonl; a directory of .txt), run through the
    model, or a directory extracted by `pyinterp extract` (neurons of its tensors, the model not run).
    Writes OUT/features.json, OUT/features.html (a dashboard, one self-contained file) and OUT/delphi/
    (EleutherAI delphi's latent cache).
    """
    from pyinterp.analysis.sae import SAE

    ids, window = parse_ids(feature_spec), parse_window(window)
    if ids is not None and top_features is not None:
        raise click.UsageError("--features and --top-features exclude each other")
    if (tensor is None) == (sae_dir is None):
        raise click.UsageError("give -t NAME (neurons) or --sae SAE_DIR (features), one of them")
    sae = SAE.load(sae_dir) if sae_dir is not None else None
    extracted = corpus.is_dir() and (corpus / "manifest.json").is_file()
    if extracted and sae is not None:
        raise InputError("--sae needs a text corpus (the SAE is encoded in the graph); an extracted corpus gives "
                         "neuron statistics (-t)")
    if baseline is not None:
        base = load_features(baseline)
    result = run(corpus, extracted, tensor, sae, sae_dir, ids, top_features, examples, window, dense_threshold,
                 delphi_splits, out, corpus_opts, model_opts)
    with atomic_write(out / "features.json", "w", encoding="utf-8") as f:
        json.dump(result, f, ensure_ascii=False)
    write_dashboard(result, out / "features.html")
    click.echo(f"{result['n_units']} units over {result['corpus']['n_tokens']} tokens: {len(result['dead'])} dead, "
               f"{len(result['dense'])} dense (> {dense_threshold:g}); wrote {out / 'features.json'}, "
               f"{out / 'features.html'}, {out / 'delphi'}")
    if baseline is not None:
        drift = compare(base, result, alpha=alpha)
        with atomic_write(out / "drift.json", "w", encoding="utf-8") as f:
            json.dump(drift.to_json(), f)
        plot(drift, out / "drift.png")
        click.echo(table(drift, markdown=md), nl=False)
        click.echo(f"wrote {out / 'drift.json'}, {out / 'drift.png'}")


def run(corpus: Path, extracted: bool, tensor, sae, sae_dir, ids, top_features, examples, window, dense_threshold,
        delphi_splits, out: Path, corpus_opts: CorpusOptions, opts: ModelOptions) -> dict:
    """Everything but the files of features.json and the drift: returns the features.json dict."""
    import pyinterp

    stored = pyinterp.corpus.open(corpus) if extracted else None
    if stored is not None and opts.path is None:  # the corpus's own model (for its tokens' text)
        opts = ModelOptions(**{**opts.__dict__, "path": stored.manifest["model"]["path"]})
    with opts.open() as model:
        if stored is not None:
            if tensor not in stored.names:
                raise InputError(f"the corpus has no tensor {tensor!r} (it has {', '.join(stored.names)})")
            stream, described = stored.batches([tensor]), {"path": str(corpus), "context_size": stored.context_size}
            n_units, total = stored.tensor(tensor).shape[1], stored.n_tokens
        else:
            stream, described = corpus_batches(model, corpus, tensor, sae, corpus_opts)
            n_units, total = (sae.d_sae if sae is not None else _width(model, tensor)), corpus_opts.max_tokens
        track = None if ids is None else np.array(sorted(set(ids)), np.int64)
        if ids is not None:
            select_units_check(ids, n_units)
        module = sae.hook_name if sae is not None else tensor
        config = {"model_name": model.path.name, "dataset_repo": str(corpus), "dataset_split": "", "dataset_name": "",
                  "dataset_column": "text"}
        with DelphiCache(out / "delphi", module, n_units, n_splits=min(delphi_splits, n_units), units=track,
                         config=config) as delphi:
            stats = stats_of(metered(stream, Meter("features", total)), n_units, None if sae is not None else tensor, track=track,
                             examples=examples, window=window, delphi=delphi)
            delphi.close()
        units = select_units(stats, ids, top_features)
        logits = unit_logits(model.path, sae, units, n_units, model.token_str)
        source = {"kind": "sae" if sae is not None else "neurons", "tensor": module,
                  "sae": None if sae_dir is None else str(sae_dir)}
        return features_json(stats, units, model.token_str, source=source, model=model.path.name, corpus=described,
                             dense_threshold=dense_threshold, logits=logits)


def select_units_check(ids: list[int], n_units: int) -> None:
    bad = [i for i in ids if not 0 <= i < n_units]
    if bad:
        raise InputError(f"--features: unit {bad[0]} out of range (there are {n_units}: 0..{n_units - 1})")


def _width(model, tensor: str) -> int:
    from pyinterp.corpus.stream import tensor_keys, widths

    return widths(model, tensor_keys(model, [tensor]))[tensor]
