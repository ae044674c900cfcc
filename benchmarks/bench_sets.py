#!/usr/bin/env python3
"""The norm-lens P(target) at every layer (last token) over a prompt set: pyinterp's batched set lens
(:func:`pyinterp.analysis.set_lens.lens_over_set`, several prompts per decode, and one per decode) against a
TransformerLens-style loop (transformers, the GGUF dequantized to fp32, a forward hook on every decoder layer, one
forward per prompt, the kept last rows through the final norm and the unembedding, softmax, the target's
probability), on the same token ids; each side in its own process; prints prompts/s, peak RSS, their ratios and
how far the two sides' probabilities are apart, measured in this one run.

    python benchmarks/bench_sets.py [--model smollm2|PATH] [--prompts 64] [--words 12]
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

ROOT = Path(__file__).resolve().parents[1]
TARGET = " the"


def prompt_texts(n: int, words: int) -> list[str]:
    """``n`` prompts of ``words`` words: lines of the repository's docs."""
    lines = [line.split() for page in sorted((ROOT / "docs").glob("*.md"))
             for line in page.read_text().splitlines() if len(line.split()) >= words]
    return [" ".join(line[:words]) for line in lines[:n]]


def pyinterp_side(args: argparse.Namespace) -> dict[str, np.ndarray]:
    import pyinterp
    from pyinterp.analysis.lens import resolve_target
    from pyinterp.analysis.set_lens import lens_over_set

    with pyinterp.Model(args.model, n_ctx=2048, n_threads=args.threads) as model:
        ids = [model.prompt_ids(t) for t in prompt_texts(args.prompts, args.words)]
        targets = [[resolve_target(model, TARGET)]] * len(ids)
        lens_over_set(model, ids[:4], targets[:4])  # warm-up
        t0 = time.perf_counter()
        batched = lens_over_set(model, ids, targets)
        seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        alone = lens_over_set(model, ids, targets, per_decode=1)
        seconds_alone = time.perf_counter() - t0
    return {"flat": np.concatenate(ids), "lengths": np.array([len(x) for x in ids]), "target": np.array(targets[0][0]),
            "p": batched.p[:, :, 0], "p_alone": alone.p[:, :, 0], "seconds": np.array(seconds),
            "seconds_alone": np.array(seconds_alone)}


def transformers_side(args: argparse.Namespace, plan: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    path = Path(args.model)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    kept: list[torch.Tensor] = []

    def hook(module, inputs, output):
        kept.append((output[0] if isinstance(output, tuple) else output)[0, -1])

    for layer in model.model.layers:
        layer.register_forward_hook(hook)
    prompts = np.split(plan["flat"], np.cumsum(plan["lengths"])[:-1])
    target = int(plan["target"])

    def lens(ids: np.ndarray) -> np.ndarray:
        kept.clear()
        with torch.no_grad():
            model.model(torch.from_numpy(ids[None].astype(np.int64)))
            logits = model.lm_head(model.model.norm(torch.stack(kept)))
            return torch.softmax(logits.double(), dim=-1)[:, target].numpy()

    lens(prompts[0])  # warm-up
    t0 = time.perf_counter()
    p = np.stack([lens(ids) for ids in prompts])
    return {"p": p, "seconds": np.array(time.perf_counter() - t0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="a known model name or a GGUF path")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--words", type=int, default=12, help="words per prompt")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--side", choices=["pyinterp", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--plan", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "pyinterp":
        np.savez(args.out, **pyinterp_side(args))
        return
    if args.side == "transformers":
        with np.load(args.plan) as plan:
            np.savez(args.out, **transformers_side(args, dict(plan)))
        return

    from pyinterp import PyinterpError, zoo

    try:
        args.model = zoo.resolve(args.model)
    except PyinterpError as e:
        raise SystemExit(f"bench_sets: error: {e}") from None
    with tempfile.TemporaryDirectory() as tmp:
        common = [sys.executable, __file__, "--model", str(args.model), "--threads", str(args.threads),
                  "--prompts", str(args.prompts), "--words", str(args.words)]
        ours, ours_rss = run_child("pyinterp", [*common, "--side", "pyinterp", "--out", f"{tmp}/p.npz"], Path(tmp) / "p.npz")
        hf, hf_rss = run_child("transformers", [*common, "--side", "transformers", "--out", f"{tmp}/t.npz",
                                                "--plan", f"{tmp}/p.npz"], Path(tmp) / "t.npz")
    n = len(ours["lengths"])
    rate = {k: n / float(v) for k, v in (("batched", ours["seconds"]), ("alone", ours["seconds_alone"]),
                                          ("transformers", hf["seconds"]))}
    print(f"{args.model.name}: norm-lens P({TARGET!r}) at every layer, last token, {n} prompts of "
          f"{ours['lengths'].mean():.1f} tokens on average, {args.threads} threads")
    print(f"pyinterp, batched decodes     {rate['batched']:8.1f} prompts/s   peak RSS {ours_rss:6.0f} MiB")
    print(f"pyinterp, one prompt a decode {rate['alone']:8.1f} prompts/s")
    print(f"transformers + hooks loop     {rate['transformers']:8.1f} prompts/s   peak RSS {hf_rss:6.0f} MiB")
    print(f"batched / transformers: speed {rate['batched'] / rate['transformers']:.2f}, peak RSS {ours_rss / hf_rss:.2f}; "
          f"batched / one a decode: {rate['batched'] / rate['alone']:.2f}")
    print(f"max |P batched - P one a decode| {np.abs(ours['p'] - ours['p_alone']).max():.2e}; "
          f"max |P pyinterp - P transformers| {np.abs(ours['p'] - hf['p']).max():.2e} (quantized weights against fp32)")


if __name__ == "__main__":
    main()
