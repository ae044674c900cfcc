#!/usr/bin/env python3
"""An activation-patching sweep of l_out (layers x positions, logit difference of two answers) in pyinterp
and in a TransformerLens-style hook loop on transformers, on the same GGUF, in one process.

pyinterp: :func:`pyinterp.patching.patch_sweep` (one ``model.run(..., logits="last")`` per cell).
transformers: the GGUF dequantized to fp32, eager attention; the clean run's decoder-layer outputs cached
by forward hooks, then per cell one forward of the corrupted ids with a hook replacing that row of that
layer's output (``logits_to_keep=1``, the last row only, as pyinterp). Both on the same number of threads.
Prints ms per cell, the ratio and the correlation of the two heatmaps.

    python benchmarks/bench_sweep.py [--model smollm2] [--layers 10] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from transformers import AutoModelForCausalLM

import pyinterp
from pyinterp import zoo
from pyinterp.patching import logit_diff, patch_sweep

CLEAN = "In Europe, the famous Eiffel Tower is located in the city of"
CORRUPT = "In Europe, the famous Colosseum is located in the city of"


def hf_sweep(model, clean: list[int], corrupt: list[int], layers: list[int], good: int, bad: int) -> np.ndarray:
    """The sweep as TransformerLens users write it: cache the clean activations, then one hooked run per cell."""
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
        out = np.empty((len(layers), len(clean)))
        for i, il in enumerate(layers):
            for pos in range(len(clean)):
                handle = blocks[il].register_forward_hook(replace(pos, cache[il][pos]))
                try:
                    logits = last_logits(corrupt)
                finally:
                    handle.remove()
                out[i, pos] = float(logits[good] - logits[bad])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--layers", type=int, default=10, help="layers swept, evenly spaced")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    path = zoo.resolve(args.model)
    with pyinterp.Model(path, n_ctx=256, n_threads=args.threads) as model:
        clean, corrupt = model.tokenize(CLEAN), model.tokenize(CORRUPT)
        if len(clean) != len(corrupt):
            raise SystemExit(f"the prompts are {len(clean)} and {len(corrupt)} tokens on {path.name}")
        layers = np.linspace(0, model.n_layer - 1, args.layers).round().astype(int).tolist()
        good, bad = model.tokenize(" Paris", add_bos=False)[0], model.tokenize(" Rome", add_bos=False)[0]
        cells = len(layers) * len(clean)
        print(f"{path.name}: {len(layers)} layers x {len(clean)} positions = {cells} cells, {args.threads} threads")
        patch_sweep(model, clean, corrupt, metric=logit_diff(good, bad), layers=layers[:1], positions=[0])  # warm-up
        t0 = time.perf_counter()
        ours = patch_sweep(model, clean, corrupt, metric=logit_diff(good, bad), layers=layers)
        ours_s = time.perf_counter() - t0

    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                              attn_implementation="eager").eval()
    hf_sweep(hf, clean, corrupt, layers[:1], good, bad)  # warm-up
    t0 = time.perf_counter()
    theirs = hf_sweep(hf, clean, corrupt, layers, good, bad)
    hf_s = time.perf_counter() - t0

    print(f"pyinterp      {1000 * ours_s / cells:8.1f} ms/cell")
    print(f"transformers  {1000 * hf_s / cells:8.1f} ms/cell   (pyinterp / transformers = {ours_s / hf_s:.2f})")
    print(f"heatmap correlation {np.corrcoef(ours.ravel(), theirs.ravel())[0, 1]:.4f}, "
          f"max |difference| {np.abs(ours - theirs).max():.3f} (logit difference range {theirs.min():.2f}..{theirs.max():.2f})")


if __name__ == "__main__":
    main()
