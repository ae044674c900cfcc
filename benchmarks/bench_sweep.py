#!/usr/bin/env python3
"""An activation-patching sweep of l_out (layers x positions, logit difference of two answers) in pyinterp
and in a TransformerLens-style hook loop on transformers, on the same GGUF, each side in its own process.

pyinterp: :func:`pyinterp.analysis.patching.patch_sweep` on the GGUF as it is, batched (variants reuse the plain
run's unchanged positions and layers), and again as one run per cell (``batched=False``; bit-identical).
transformers: the GGUF dequantized to fp32, eager attention; the clean run's decoder-layer outputs cached
by forward hooks, then per cell one forward of the corrupted ids with a hook replacing that row of that
layer's output (``logits_to_keep=1``, the last row only, as pyinterp). Both on the same number of threads,
on the token ids llama.cpp's tokenizer gives. With ``--peer-python PYTHON`` (an interpreter that has nnsight: keep
it out of the test environment, whose torch and transformers versions the suite pins), nnsight too: one trace,
the clean prompt and every cell as invokes, batched in one forward. TransformerLens is not measured: its
``HookedTransformer`` builds a model's config from the Hugging Face hub, which these machines cannot reach.
Each side runs in a child process (the pyinterp side never imports torch); the parent reads each child's peak
RSS from ``wait4`` and prints ms per cell, peak RSS, their ratios and the correlation of the heatmaps.

    python3 -m venv /tmp/peers && /tmp/peers/bin/pip install "torch==2.13.0" nnsight gguf accelerate
    python benchmarks/bench_sweep.py --peer-python /tmp/peers/bin/python

    python benchmarks/bench_sweep.py [--model smollm2|PATH] [--layers 10] [--positions N] [--threads N]

A ~1B-parameter random-weight llama (scripts/tiny_gguf.py) for the memory-bound regime; its byte-level
vocabulary splits the default corrupted prompt into more tokens than the clean one, hence ``--corrupt``:

    python scripts/tiny_gguf.py llama-1b /tmp/llama-1b-q4_0.gguf --type q4_0
    python benchmarks/bench_sweep.py --model /tmp/llama-1b-q4_0.gguf --layers 4 --positions 6 \\
        --corrupt "In Europe, the famous Vatican is located in the city of"
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from child import run_child  # benchmarks/child.py, beside this script

CLEAN = "In Europe, the famous Eiffel Tower is located in the city of"
CORRUPT = "In Europe, the famous Colosseum is located in the city of"


def spread(n: int | None, total: int) -> list[int]:
    """``n`` indices evenly spaced over ``range(total)``, first and last included (all when ``n`` is None)."""
    if n is None or n >= total:
        return list(range(total))
    return np.linspace(0, total - 1, n).round().astype(int).tolist()


def pyinterp_side(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """The plan (ids, answer tokens, cells) and pyinterp's sweep ``[n_layers, n_positions]`` with its time."""
    import pyinterp
    from pyinterp.analysis.patching import logit_diff, patch_sweep

    with pyinterp.Model(args.model, n_ctx=2048, n_threads=args.threads) as model:
        clean, corrupt = model.tokenize(CLEAN), model.tokenize(args.corrupt)
        if len(clean) != len(corrupt):
            raise SystemExit(f"the prompts are {len(clean)} and {len(corrupt)} tokens on {model.path.name}; "
                             f"pick a --corrupt of {len(clean)} tokens")
        layers, positions = spread(args.layers, model.n_layer), spread(args.positions, len(clean))
        good, bad = model.tokenize(" Paris", add_bos=False)[0], model.tokenize(" Rome", add_bos=False)[0]
        metric = logit_diff(good, bad)
        patch_sweep(model, clean, corrupt, metric=metric, layers=layers[:1], positions=positions[:1])  # warm-up
        t0 = time.perf_counter()
        grid = patch_sweep(model, clean, corrupt, metric=metric, layers=layers, positions=positions)
        seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        loop = patch_sweep(model, clean, corrupt, metric=metric, layers=layers, positions=positions, batched=False)
        loop_seconds = time.perf_counter() - t0
    return {"clean": np.array(clean), "corrupt": np.array(corrupt), "layers": np.array(layers),
            "positions": np.array(positions), "answers": np.array([good, bad]), "grid": grid,
            "seconds": np.array(seconds), "loop": loop, "loop_seconds": np.array(loop_seconds)}


def hf_sweep(model, clean: list[int], corrupt: list[int], layers: list[int], positions: list[int],
             good: int, bad: int) -> np.ndarray:
    """The sweep as TransformerLens users write it: cache the clean activations, then one hooked run per cell.
    Returns ``[n_layers, n_positions]``."""
    import torch

    blocks = model.model.layers
    cache: dict[int, torch.Tensor] = {}

    def keep(il):
        def hook(module, args, output):
            cache[il] = (output[0] if isinstance(output, tuple) else output)[0].detach().clone()
        return hook

    def replace(pos, row):
        def hook(module, args, output):
            h = (output[0] if isinstance(output, tuple) else output).clone()
            h[0, pos] = row
            return (h, *output[1:]) if isinstance(output, tuple) else h
        return hook

    def last_logits(ids: list[int]) -> torch.Tensor:
        return model(input_ids=torch.tensor([ids]), use_cache=False, logits_to_keep=1).logits[0, -1]

    with torch.no_grad():
        handles = [blocks[il].register_forward_hook(keep(il)) for il in layers]
        last_logits(clean)
        for h in handles:
            h.remove()
        out = np.empty((len(layers), len(positions)))
        for i, il in enumerate(layers):
            for j, pos in enumerate(positions):
                handle = blocks[il].register_forward_hook(replace(pos, cache[il][pos]))
                try:
                    logits = last_logits(corrupt)
                finally:
                    handle.remove()
                out[i, j] = float(logits[good] - logits[bad])
    return out


def transformers_side(args: argparse.Namespace, plan: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers' sweep of the cells in ``plan`` (pyinterp's result) with its time."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    path = Path(args.model)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    clean, corrupt = plan["clean"].tolist(), plan["corrupt"].tolist()
    layers, positions = plan["layers"].tolist(), plan["positions"].tolist()
    good, bad = plan["answers"].tolist()
    hf_sweep(model, clean, corrupt, layers[:1], positions[:1], good, bad)  # warm-up
    t0 = time.perf_counter()
    grid = hf_sweep(model, clean, corrupt, layers, positions, good, bad)
    return {"grid": grid, "seconds": np.array(time.perf_counter() - t0)}


def nnsight_sweep(lm, clean: list[int], corrupt: list[int], layers: list[int], positions: list[int],
                  good: int, bad: int) -> np.ndarray:
    """The sweep as nnsight users write it: one trace, the clean prompt and every cell as invokes of it (batched
    in one forward), each cell's layer output row set from the clean invoke's (a barrier per layer hands it over).
    Returns ``[n_layers, n_positions]``."""
    import torch

    saved = []
    with torch.no_grad(), lm.trace() as tracer:
        barriers = {il: tracer.barrier(1 + len(positions)) for il in layers}
        with tracer.invoke(torch.tensor([clean])):
            acts = {}
            for il in layers:
                acts[il] = lm.model.layers[il].output
                barriers[il]()
        for il in layers:
            for pos in positions:
                with tracer.invoke(torch.tensor([corrupt])):
                    barriers[il]()
                    lm.model.layers[il].output[0, pos] = acts[il][0, pos]
                    logits = lm.lm_head.output[0, -1]
                    saved.append((logits[good] - logits[bad]).save())
    return np.array([float(v) for v in saved]).reshape(len(layers), len(positions))


def nnsight_side(args: argparse.Namespace, plan: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """nnsight's sweep of the cells in ``plan`` over the same transformers model, with its time."""
    import torch
    from nnsight import LanguageModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    path = Path(args.model)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    lm = LanguageModel(model, tokenizer=AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name))
    clean, corrupt = plan["clean"].tolist(), plan["corrupt"].tolist()
    layers, positions = plan["layers"].tolist(), plan["positions"].tolist()
    good, bad = plan["answers"].tolist()
    nnsight_sweep(lm, clean, corrupt, layers[:1], positions[:1], good, bad)  # warm-up
    t0 = time.perf_counter()
    grid = nnsight_sweep(lm, clean, corrupt, layers, positions, good, bad)
    return {"grid": grid, "seconds": np.array(time.perf_counter() - t0)}


def run_side(side: str, args: argparse.Namespace, out: Path, plan: Path | None = None) -> tuple[dict, float]:
    """Run one side in a child process; its result and its peak RSS in MiB (``ru_maxrss`` of that child)."""
    python = args.peer_python if side == "nnsight" else sys.executable
    argv = [python, __file__, "--side", side, "--out", str(out), "--model", str(args.model),
            "--threads", str(args.threads), "--corrupt", args.corrupt]
    if args.layers is not None:
        argv += ["--layers", str(args.layers)]
    if args.positions is not None:
        argv += ["--positions", str(args.positions)]
    if plan is not None:
        argv += ["--plan", str(plan)]
    return run_child(side, argv, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="a known model name or a GGUF path")
    parser.add_argument("--layers", type=int, default=10, help="layers swept, evenly spaced")
    parser.add_argument("--positions", type=int, default=None, help="positions swept, evenly spaced (default all)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--corrupt", default=CORRUPT, help="the corrupted prompt (as many tokens as the clean one)")
    parser.add_argument("--peer-python", default=None, metavar="PYTHON",
                        help="an interpreter with nnsight installed: adds nnsight's sweep (one trace, one invoke per cell)")
    parser.add_argument("--side", choices=["pyinterp", "transformers", "nnsight"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--plan", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.side == "pyinterp":
        np.savez(args.out, **pyinterp_side(args))
        return
    if args.side in ("transformers", "nnsight"):
        with np.load(args.plan) as plan:
            side = transformers_side if args.side == "transformers" else nnsight_side
            np.savez(args.out, **side(args, dict(plan)))
        return

    from pyinterp import PyinterpError, zoo

    try:
        args.model = zoo.resolve(args.model)  # the sides get a path
    except PyinterpError as e:
        raise SystemExit(f"bench_sweep: error: {e}") from None
    with tempfile.TemporaryDirectory() as tmp:
        ours, ours_rss = run_side("pyinterp", args, Path(tmp) / "pyinterp.npz")
        theirs, hf_rss = run_side("transformers", args, Path(tmp) / "transformers.npz", plan=Path(tmp) / "pyinterp.npz")
        peer = run_side("nnsight", args, Path(tmp) / "nnsight.npz", plan=Path(tmp) / "pyinterp.npz") \
            if args.peer_python else None
    cells = ours["grid"].size
    ours_s, hf_s = float(ours["seconds"]), float(theirs["seconds"])
    a, b = ours["grid"], theirs["grid"]
    print(f"{args.model.name}: {len(ours['layers'])} layers x {len(ours['positions'])} positions "
          f"= {cells} cells ({len(ours['clean'])}-token prompt), {args.threads} threads")
    loop_s = float(ours["loop_seconds"])
    print(f"pyinterp      {1000 * ours_s / cells:8.1f} ms/cell   peak RSS {ours_rss:7.0f} MiB   (batched, shared prefixes)")
    same = "bit-identical" if np.array_equal(ours["loop"], ours["grid"]) else \
        f"NOT bit-identical: max |difference| {np.abs(ours['loop'] - ours['grid']).max():.2e}"
    print(f"pyinterp loop {1000 * loop_s / cells:8.1f} ms/cell   (one run per cell; {same})")
    print(f"transformers  {1000 * hf_s / cells:8.1f} ms/cell   peak RSS {hf_rss:7.0f} MiB")
    if peer is not None:
        (nn, nn_rss), nn_s = peer, float(peer[0]["seconds"])
        print(f"nnsight       {1000 * nn_s / cells:8.1f} ms/cell   peak RSS {nn_rss:7.0f} MiB   (one trace, {cells} invokes; "
              f"heatmap corr. with transformers {np.corrcoef(nn['grid'].ravel(), b.ravel())[0, 1]:.4f})")
        print(f"pyinterp / nnsight: time {ours_s / nn_s:.2f} ({nn_s / ours_s:.1f}x faster), peak RSS {ours_rss / nn_rss:.2f}")
    print(f"pyinterp / transformers: time {ours_s / hf_s:.2f} ({hf_s / ours_s:.1f}x faster), peak RSS {ours_rss / hf_rss:.2f}")
    print(f"pyinterp batched / loop: time {ours_s / loop_s:.2f} ({loop_s / ours_s:.1f}x faster)")
    print(f"heatmap correlation {np.corrcoef(a.ravel(), b.ravel())[0, 1]:.4f}, max |difference| "
          f"{np.abs(a - b).max():.3f} (logit difference range {b.min():.2f}..{b.max():.2f})")


if __name__ == "__main__":
    main()
