"""The ``pyinterp`` command: llama-cli habits plus Llama.MIA's interpretability flags.

A thin layer over the Python API. Exit codes: 0 ok, 1 runtime error, 2 usage error, 130 interrupted
(Ctrl-C); errors are one line on stderr (``--debug`` shows the traceback).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import sys
from pathlib import Path

import click
import numpy as np

from pyinterp.analysis.ablation import head_ablation
from pyinterp.analysis.steering import ControlVector, combine, steered
from pyinterp.cli.ablation import ablation_options
from pyinterp.cli.circuit import circuit
from pyinterp.cli.compare import compare
from pyinterp.cli.corpus import corpus
from pyinterp.cli.cvector import cvector
from pyinterp.cli.extract import extract
from pyinterp.cli.features import features
from pyinterp.cli.fidelity import fidelity
from pyinterp.cli.heads import heads
from pyinterp.cli.lens import attribution_json, next_tokens, parse_positions, parse_target
from pyinterp.cli.outputs import check_attn_out, intervention_records, print_interventions, write_attention
from pyinterp.cli.options import LAYERS_HELP, LayerList, layer_list, model_options, progress
from pyinterp.cli.probe import probe
from pyinterp.cli.prompt import prompt_options, prompt_text, seed_option, stream_generation, temp_option
from pyinterp.cli.report import lens_and_targets, print_report, write_pictures_and_tables
from pyinterp.cli.sae import sae
from pyinterp.cli.sets import md_option, prompts_option
from pyinterp.cli.spans import spans
from pyinterp.cli.transcoders import transcoders
from pyinterp.cli.sweep import sweep
from pyinterp.engine.names import split_name
from pyinterp.errors import InputError, PyinterpError
from pyinterp.io.atomic import together
from pyinterp.io.tensor_io import load_tensor, save_tensor


def parse_heads(spec: str, n_layer: int, n_head: int) -> list[tuple[int, int]]:
    """``-a`` list: MIA's global indices ``layer * n_head + head`` and/or ``L:H`` pairs, comma separated."""
    heads = []
    for item in spec.split(","):
        item = item.strip()
        try:
            if ":" in item:
                layer, head = (int(x) for x in item.split(":"))
            else:
                index = int(item)
                if not 0 <= index < n_layer * n_head:
                    raise InputError(f"-a: head index {index} out of range ({n_layer} layers x {n_head} heads: "
                                     f"0..{n_layer * n_head - 1})")
                layer, head = divmod(index, n_head)
        except ValueError:
            raise click.BadParameter(f"{item!r} is neither a head index nor LAYER:HEAD", param_hint="-a") from None
        heads.append((layer, head))
    return heads


def name_layer(spec: str, option: str) -> tuple[str, int]:
    name, layer = split_name(spec)
    if layer is None:
        raise click.BadParameter(f"expected NAME-LAYER (e.g. l_out-12), got {spec!r}", param_hint=option)
    return name, layer


class PatchAction:
    """``--patch``/``--load`` turned into pyinterp patch tuples once the prompt length is known."""

    def __init__(self, spec: str, file: str, rows: list[tuple[int, int]] | None, avg: str | None) -> None:
        self.name, self.layer = name_layer(spec, "--patch" if rows is not None else "--load")
        self.file, self.rows, self.avg = file, rows, avg

    def patches(self, width: int, n_tokens: int) -> list[tuple[str, int, int, np.ndarray]]:
        data = load_tensor(self.file, width, f"{self.name}-{self.layer}")
        if self.avg is not None:
            other = load_tensor(self.avg, width, f"{self.name}-{self.layer}")
            if other.shape != data.shape:
                raise InputError(f"--patch-avg: {self.avg} has {other.shape[0]} rows, {self.file} has {data.shape[0]}")
            data = (data + other) / 2
        rows = self.rows if self.rows is not None else [(i, i) for i in range(n_tokens)]
        if self.rows is None and data.shape[0] < n_tokens:
            raise InputError(f"--load: {self.file} has {data.shape[0]} rows, the prompt has {n_tokens} tokens")
        out = []
        for src, dst in rows:
            if not 0 <= src < data.shape[0]:
                raise InputError(f"--patch: row {src} out of range ({self.file} has {data.shape[0]} rows)")
            out.append((self.name, self.layer, dst, data[src]))
        return out


def control_vector_files(plain: tuple[str, ...], scaled: tuple[str, ...]) -> list[tuple[str, float]]:
    """``--control-vector FNAME,...`` and ``--control-vector-scaled FNAME:SCALE,...`` as llama-cli reads them
    (comma-separated, CSV quoting): ``(file, scale)`` pairs."""
    files = [(name, 1.0) for value in plain for name in next(csv.reader([value]))]
    for value in scaled:
        for item in next(csv.reader([value])):
            name, sep, scale = item.rpartition(":")
            try:
                files.append((name, float(scale)))
            except ValueError:
                sep = ""
            if not sep or not name:
                raise click.BadParameter(f"expected FNAME:SCALE, got {item!r}", param_hint="--control-vector-scaled")
    return files


def steering_range(spec: tuple[int, int] | None, n_layer: int) -> tuple[int, int]:
    """``--control-vector-layer-range START END`` as llama-cli takes it: 0 or less is the default (1, the last layer)."""
    start, end = spec or (0, 0)
    return (start if start > 0 else 1, end if end > 0 else n_layer - 1)


def show_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from pyinterp import __version__, build_info
    from pyinterp.model import default_gpu_layers

    info = build_info()
    variants = info["cpu_variants"]
    built = f"{len(variants)} CPU variants ({variants[0]} ... {variants[-1]})" if len(variants) > 1 else "native CPU"
    click.echo(f"pyinterp {__version__}\nllama.cpp: {info['llama_cpp_source']}\npatches: {', '.join(info['patches'])}\n"
               f"built: {built}, backends {', '.join(info['backends'])}\n"
               f"loaded: CPU variant {info['cpu_variant']}{amx_note(info)}; backends {', '.join(info['loaded'])}\n"
               f"devices: {'; '.join(info['devices'])}\n"
               f"default -ngl: {default_gpu_layers()} ({'every layer on the GPU' if default_gpu_layers() else 'the CPU'})")
    ctx.exit()


def amx_note(info: dict) -> str:
    """Whether AMX is in use, where the loaded CPU variant has it (patches 0006/0007: off unless GGML_CPU_AMX=1)."""
    if info["cpu_variant"] not in ("sapphirerapids", "native") or not info["cpu_has_amx"]:
        return ""
    return " (AMX on)" if os.environ.get("GGML_CPU_AMX") == "1" else " (AMX off; GGML_CPU_AMX=1 turns it on)"


CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
DRAW_PATH = "attention.png"


@click.command(context_settings=CONTEXT_SETTINGS)
@model_options
@prompt_options
@click.option("-n", "--n-predict", default=0, show_default=True, help="Tokens to generate; 0 = only the prompt pass.")
@click.option("--seed", default=-1, show_default=True, type=int, callback=seed_option,
              help="Sampling seed; -1 = random.")
@click.option("--temp", default=0.0, show_default=True, callback=temp_option,
              help="Sampling temperature; 0 (or less) = greedy.")
@click.option("--ignore-eos", is_flag=True, help="Keep generating after an end-of-generation token.")
@click.option("--ll", "--logit-lens", "lens_name", default=None, metavar="NAME",
              help="Logit lens of tensor NAME (l_out, attn_out, ffn_out, ...) at every layer, or NAME-LAYER at one; "
                   "'embd' = the embedding; 'all' = every residual-stream term (embedding, attention, FFN, l_out).")
@click.option("--ll-topk", default=10, show_default=True, help="Tokens shown per layer and position.")
@click.option("--norm-lens/--raw-lens", default=True, show_default=True,
              help="Apply the model's final norm before unembedding (norm lens) or not (raw lens).")
@click.option("--ll-png", type=click.Path(dir_okay=False), default=None, metavar="PATH",
              help="Write the logit lens as a layers x tokens heatmap of the top-1 probability.")
@click.option("--target", "target_specs", multiple=True, metavar="TOKEN",
              help="Probability and rank of TOKEN (text, tokenized as given, or an integer id) at every layer, "
                   "under the --ll tensor's lens (default l_out); repeatable.")
@click.option("--ll-layers", default=None, metavar="LIST", callback=layer_list,
              help=f"Layers for --ll/--target: {LAYERS_HELP}.")
@click.option("--ll-pos", default=None, metavar="LIST",
              help="Token positions (negative from the end) for --ll (default all), --target and --attribute "
                   "(default the last).")
@click.option("--target-png", type=click.Path(dir_okay=False), default=None, metavar="PATH",
              help="Write P(target) as layers x targets heatmaps, one per position.")
@click.option("--attribute", is_flag=False, flag_value="", default=None, metavar="[TOKEN]",
              help="Direct logit attribution of TOKEN (default the top prediction) at --ll-pos: each layer's "
                   "attention and FFN, and each head.")
@click.option("--attr-png", type=click.Path(dir_okay=False), default=None, metavar="PATH",
              help="Write the per-head attribution as a layers x heads heatmap.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), default=None, metavar="PATH",
              help="Write the --target and --attribute tables as CSV (PATH-lens.csv and PATH-attribution.csv with both).")
@click.option("--decimals", default=3, show_default=True, type=click.IntRange(0, 12),
              help="Decimals of the probabilities and logits printed.")
@click.option("--draw", is_flag=False, flag_value="", default=None, metavar="[PATH]",
              help=f"Draw the attention of every layer (a grid of heads per PNG) to PATH-L<layer>.png "
                   f"(PATH default {DRAW_PATH}).")
@click.option("--draw-path", default=None, metavar="PATH", help="Same as --draw PATH.")
@click.option("--draw-layers", default=None, metavar="LIST", callback=layer_list,
              help="Layers to draw (and to write with --attn-out), as --ll-layers (default all).")
@click.option("--attn-out", default=None, type=click.Path(dir_okay=False), metavar="FILE.npz|FILE.csv",
              help="Write the attention weights as numbers: .npz (layer_<L> [n_head, n_query, n_key] per layer, "
                   "tokens) or .csv (layer, head, query, key, query_token, key_token, weight).")
@click.option("-a", "--ablate", "ablate_spec", default=None, metavar="LIST",
              help="Ablate heads: global indices layer*n_head+head and/or LAYER:HEAD pairs, comma separated.")
@ablation_options
@click.option("-s", "--select", "isolate", type=(int, int), default=None, metavar="LAYER INDEX",
              help="Isolate one head: ablate every other head of LAYER.")
@click.option("--save", "saves", type=(str, str), multiple=True, metavar="NAME-LAYER FILE",
              help="Save a tensor of the prompt pass: raw float32 rows (MIA), or .npy/.npz by file name.")
@click.option("--load", "loads", type=(str, str), multiple=True, metavar="NAME-LAYER FILE",
              help="Replace every row of a tensor with the rows of a saved one.")
@click.option("--patch", "patch_specs", type=(str, str, int, int), multiple=True, metavar="NAME-LAYER FILE FROM TO",
              help="Write row FROM of a saved tensor into row TO of the live one.")
@click.option("--patch-avg", default=None, metavar="FILE2", help="Average the --patch rows with this second file first.")
@click.option("--control-vector", "cvec_files", multiple=True, metavar="FNAME",
              help="Add a control vector (llama.cpp's GGUF); comma-separated for several. Repeatable.")
@click.option("--control-vector-scaled", "cvec_scaled", multiple=True, metavar="FNAME:SCALE,...",
              help="Add a control vector times SCALE; comma-separated for several. Repeatable.")
@click.option("--control-vector-layer-range", "cvec_range", type=(int, int), default=None, metavar="START END",
              help="Layers the control vectors apply to, inclusive (0 or less: the default, 1 and the last layer).")
@click.option("--print-cgraph", is_flag=True, help="Print every node of the graph: name, op, type, shape, sources.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output of everything asked for.")
@prompts_option
@md_option
@click.option("--per-decode", default=None, type=click.IntRange(1, 64), metavar="N",
              help="With --prompts: prompts per decode of the lens (default as many as fit; 1: one prompt per pass).")
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=show_version,
              help="Show the version, the llama.cpp source, patches and backends, and exit.")
@click.pass_context
def cli(ctx, model_opts, prompt, prompt_file, escape, n_predict, seed, temp, ignore_eos, lens_name, ll_topk, norm_lens, ll_png, target_specs, ll_layers,
        ll_pos, target_png, attribute, attr_png, csv_path, decimals, draw, draw_path, draw_layers, attn_out, ablate_spec,
        ablation, isolate, saves, loads, patch_specs, patch_avg, cvec_files, cvec_scaled, cvec_range, print_cgraph, as_json,
        prompts_path, as_md, per_decode):
    """Run a GGUF model and look inside: logit lens, attention pictures, head ablation, activation patching.

    With --prompts FILE: the lens (--ll, --target) and --attribute of every example of a prompt set, averaged."""
    from pyinterp.viz.attention import draw_attention

    if prompts_path is not None:
        from pyinterp.cli.lens_sets import run_set

        if ablation.mode != "zero":
            raise click.UsageError("--ablate-mode mean or resample does not go with --prompts yet")

        return run_set(ctx, model_opts)
    if per_decode is not None:
        raise click.UsageError("--per-decode goes with --prompts")
    prompt = prompt_text(prompt, prompt_file, escape)
    check_option_pairs(ctx)
    ablation.check(ablate_spec is not None, "-a")
    reference = ablation.prompts()
    attributing = attribute is not None
    check_attn_out(attn_out)
    draw = drawing_path(draw, draw_path, draw_layers, attn_out)
    actions = [PatchAction(s, f, None, None) for s, f in loads]
    by_target: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for spec, file, src, dst in patch_specs:
        by_target.setdefault((spec, file), []).append((src, dst))
    actions += [PatchAction(spec, file, rows, patch_avg) for (spec, file), rows in by_target.items()]
    saves = [(name_layer(spec, "--save"), Path(file)) for spec, file in saves]
    cvec_files = control_vector_files(cvec_files, cvec_scaled)
    if cvec_range is not None and not cvec_files:
        raise click.UsageError("--control-vector-layer-range goes with --control-vector or --control-vector-scaled")
    cvec: ControlVector | None = combine(cvec_files) if cvec_files else None

    result: dict = {}
    with contextlib.ExitStack() as stack:
        model = stack.enter_context(model_opts.open())
        ids = model.prompt_ids(prompt)
        ablate = parse_heads(ablate_spec, model.n_layer, model.n_head) if ablate_spec else []
        patches = []
        for action in actions:
            width = model.tensor_info().shapes.get(action.name, (model.n_embd,))[0]
            patches += action.patches(width, len(ids))
        layers = draw_layers.resolve(model.n_layer) if draw_layers is not None else list(range(model.n_layer))
        capture = [f"{n}-{il}" for (n, il), _ in saves]
        if draw is not None or attn_out is not None:
            capture += [f"attn_scores-{il}" for il in layers]

        result["model"] = {"path": str(model.path), "arch": model.arch, "n_layer": model.n_layer,
                           "n_head": model.n_head, "n_embd": model.n_embd}
        result["prompt_tokens"] = [{"id": t, "str": model.token_str(t)} for t in ids]
        # the interventions: on for every pass and the generation below
        if ablation.mode == "zero":
            stack.enter_context(model.ablated(ablate))
        else:  # the reference runs first, with none of the interventions below
            stack.enter_context(model.intervened(head_ablation(model, ablate, ablation.mode, reference, ids,
                                                               ablation.per_position, ablation.seed or 0)))
        if ablate:
            result["ablation"] = {**ablation.describe(), "heads": [list(h) for h in ablate]}
        stack.enter_context(model.patched(patches))
        if isolate is not None:
            stack.enter_context(model.isolated(*isolate))
        start_end = None
        if cvec is not None:
            start_end = start, end = steering_range(cvec_range, model.n_layer)
            stack.enter_context(steered(model, cvec, layers=(start, end)))
            result["control_vector"] = {"files": [{"file": f, "scale": k} for f, k in cvec_files],
                                        "layers": list(cvec.layers), "layer_range": [start, end]}
        interventions = intervention_records(ablate_spec, ablate, actions, isolate, model.n_head, cvec_files, start_end)
        result["interventions"] = interventions
        trace = model.run(ids, capture=capture)
        if print_cgraph:
            result["cgraph"] = model.graph(ids, capture=capture)
        positions = parse_positions(ll_pos) if ll_pos is not None else None
        lenses, targets, target_lenses = lens_and_targets(model, ids, result, lens_name, ll_topk, norm_lens, ll_layers,
                                                          target_specs, positions)
        attributed = []
        if attributing:
            target = parse_target(model, attribute)[0] if attribute else None
            attributed = [model.logit_attribution(ids, target, position) for position in positions or [-1]]
            result["attribution"] = [attribution_json(a, model.token_str(ids[a.position])) for a in attributed]
        files = [str(save_tensor(path, trace[name, il], f"{name}-{il}")) for (name, il), path in saves]
        files += write_pictures_and_tables(model.arch, lenses, ll_png, target_lenses, target_png, attributed, attr_png,
                                           csv_path)
        if attn_out is not None:
            files.append(str(write_attention(trace, attn_out, layers)))
        if draw is not None:
            with progress(len(layers), "drawing attention") as bar:
                files += [str(p) for p in draw_attention(trace, draw, layers, on_layer=bar and (lambda _: bar.update(1)))]
        result["files"] = files
        result["next_token"] = next_tokens(model, trace.logits[-1], 5)
        if not as_json:
            print_interventions(interventions)
            print_report(result, lenses, targets, target_lenses, attributed, ll_topk, decimals, as_md)
        if n_predict > 0:
            if not as_json:
                click.echo(prompt, nl=False)
            with progress(n_predict if as_json else 0, "generating") as bar:  # the text streams, or a bar
                gen = stream_generation(model, ids, n_predict, temp=temp, seed=seed, stop_at_eog=not ignore_eos,
                                        echo=not as_json, on_token=bar and (lambda _: bar.update(1)))
            result["generated"] = {"tokens": gen.tokens, "text": gen.text}

    if as_json:
        click.echo(json.dumps(result, ensure_ascii=False, indent=1))
        return
    if "generated" not in result:
        tops = ", ".join(f"{t['str']!r} {t['p']:.{decimals}f}" for t in result["next_token"])
        click.echo(f"next token: {tops}")
    for path in files:
        click.echo(f"wrote {path}")


def check_option_pairs(ctx: click.Context) -> None:
    """Options that only mean something with another one: a one-line usage error when given without it."""
    p = ctx.params
    if p["n_predict"] < 0:
        raise click.BadParameter("must be >= 0", param_hint="-n")
    if p["patch_avg"] is not None and not p["patch_specs"]:
        raise click.UsageError("--patch-avg goes with --patch")
    given = {name for name in p if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
    for option, name in (("--ll-png", "ll_png"), ("--ll-topk", "ll_topk")):
        if name in given and p["lens_name"] is None:
            raise click.UsageError(f"{option} needs --ll NAME")
    lensing, attributing = p["lens_name"] is not None or bool(p["target_specs"]), p["attribute"] is not None
    for option, name, wanted, needs in (
            ("--norm-lens/--raw-lens", "norm_lens", lensing, "--ll NAME or --target"),
            ("--ll-layers", "ll_layers", lensing, "--ll NAME or --target"),
            ("--ll-pos", "ll_pos", lensing or attributing, "--ll, --target or --attribute"),
            ("--target-png", "target_png", bool(p["target_specs"]), "--target"),
            ("--attr-png", "attr_png", attributing, "--attribute"),
            ("--csv", "csv_path", bool(p["target_specs"]) or attributing, "--target or --attribute")):
        if name in given and not wanted:
            raise click.UsageError(f"{option} needs {needs}")


def drawing_path(draw: str | None, draw_path: str | None, draw_layers: LayerList | None,
                 attn_out: str | None) -> str | None:
    """Where ``--draw`` (alone: the default path) or ``--draw-path`` writes the attention pictures; None: none.
    ``--draw-layers`` needs one of them or ``--attn-out``."""
    if draw and draw_path is not None and draw != draw_path:
        raise click.UsageError(f"two drawing paths: --draw {draw} and --draw-path {draw_path}")
    if draw is not None or draw_path is not None:  # --draw alone ("") draws to the default path
        draw = draw or draw_path or DRAW_PATH
    if draw_layers is not None and draw is None and attn_out is None:
        raise click.UsageError("--draw-layers goes with --draw or --attn-out")
    return draw


def subcommands() -> dict[str, click.Command]:
    """Analyses with a command of their own: ``pyinterp NAME ...``; everything else is the main command."""
    return {"circuit": circuit, "compare": compare, "corpus": corpus, "cvector": cvector, "extract": extract,
            "features": features, "fidelity": fidelity, "heads": heads, "probe": probe, "sae": sae, "spans": spans,
            "sweep": sweep, "transcoders": transcoders}


cli.epilog = ("More commands, each with its own --help: "
              + ", ".join(f"pyinterp {name}" for name in sorted(subcommands())) + ".")


def interrupted() -> int:
    """Ctrl-C: flush what was printed, say so on stderr, and exit as a shell does after SIGINT (130)."""
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
    click.echo("pyinterp: interrupted", err=True)
    return 130


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the command, turning every error into one line on stderr and an exit code."""
    args = list(argv if argv is not None else sys.argv[1:])
    debug = "--debug" in args
    command, prog = cli, "pyinterp"
    if args and args[0] in subcommands():
        command, prog = subcommands()[args[0]], f"pyinterp {args[0]}"
        args = args[1:]
    try:
        with together():  # a command that fails writes no file
            command.main(args=args, prog_name=prog, standalone_mode=False)
    except click.UsageError as e:
        click.echo(f"pyinterp: error: {e.format_message()}", err=True)
        return 2
    except InputError as e:
        if debug:
            raise
        click.echo(f"pyinterp: error: {e}", err=True)
        return 2
    except (PyinterpError, OSError) as e:
        if debug:
            raise
        click.echo(f"pyinterp: error: {e}", err=True)
        return 1
    except click.exceptions.Abort as e:
        if isinstance(e.__cause__, KeyboardInterrupt):  # Ctrl-C: what was printed stays, no traceback
            return interrupted()
        click.echo("pyinterp: aborted", err=True)
        return 1
    except KeyboardInterrupt:  # outside click's own handler (argument parsing)
        return interrupted()
    except Exception as e:  # a bug: still one line, unless --debug
        if debug:
            raise
        click.echo(f"pyinterp: internal error: {type(e).__name__}: {e} (run with --debug for the traceback)", err=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
