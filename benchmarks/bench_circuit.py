#!/usr/bin/env python3
"""The cost of one attribution graph: pyinterp (frozen forward passes in llama.cpp's graph, the quantized GGUF)
against the same local replacement model in PyTorch with autograd (tests/circuit_reference.py: the transformers
model in fp32, eager, patterns and norm scales detached, one backward pass per batch of targets: the algorithm
circuit-tracer runs), on the same prompt and the same random transcoders, each side in its own process; prints
seconds, peak RSS and their ratios, measured in this one run.

    python benchmarks/bench_circuit.py [--model gemma3] [--tokens 20] [--d-tc 16384] [--density 0.0009]
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
TEXT = ("The capital of France is Paris, the capital of Italy is Rome, the capital of Spain is Madrid, and the "
        "capital of Germany is")


def prompt_ids(model, n: int) -> list[int]:
    ids = model.prompt_ids(TEXT)
    return ids[:n] if len(ids) >= n else ids


def transcoders(model, ids: list[int], args: argparse.Namespace):
    from pyinterp.circuit import random_transcoders

    t = model.run(ids, capture=["ffn_norm"])
    rms = [float(np.sqrt((t["ffn_norm", l] ** 2).mean())) for l in range(model.n_layer)]  # each layer's MLP input
    return random_transcoders(model.n_layer, model.n_embd, args.d_tc, density=args.density, input_scale=rms, seed=7)


def pyinterp_side(args: argparse.Namespace) -> dict[str, np.ndarray]:
    import pyinterp
    from pyinterp.circuit import attribution_graph

    with pyinterp.Model(args.model, n_ctx=1024, n_threads=args.threads) as model:
        ids = prompt_ids(model, args.tokens)
        tcs = transcoders(model, ids, args)
        t0 = time.perf_counter()
        g = attribution_graph(model, ids, tcs, max_features=None)
        seconds = time.perf_counter() - t0
    return {"ids": np.array(ids), "seconds": np.array(seconds), "n_feat": np.array(g.n_feat),
            "logits": g.logit_tokens, "decodes": np.array(g.info["frozen_decodes"]),
            "frozen_s": np.array(g.info["frozen_s"]), "sum_error": np.array(g.info["sum_error"])}


def torch_side(args: argparse.Namespace) -> dict[str, np.ndarray]:
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    import pyinterp
    from circuit_reference import reference_graph
    from reference import Reference

    torch.set_num_threads(args.threads)
    with pyinterp.Model(args.model, n_ctx=1024, n_threads=args.threads) as model:  # the same ids and transcoders
        ids = prompt_ids(model, args.tokens)
        tcs = transcoders(model, ids, args)
        path = model.path
    logits = [int(t) for t in np.load(args.pyinterp_out)["logits"]]
    ref = Reference(path)
    t0 = time.perf_counter()
    g = reference_graph(ref, tcs, ids, logit_tokens=logits)
    seconds = time.perf_counter() - t0
    return {"seconds": np.array(seconds), "n_feat": np.array(len(g["features"]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3")
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--d-tc", type=int, default=16384)
    parser.add_argument("--density", type=float, default=0.0009)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--side", choices=["pyinterp", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--pyinterp-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side is not None:
        result = pyinterp_side(args) if args.side == "pyinterp" else torch_side(args)
        np.savez(args.out, **result)
        return
    common = ["--model", args.model, "--tokens", str(args.tokens), "--d-tc", str(args.d_tc), "--density",
              str(args.density), "--threads", str(args.threads)]
    with tempfile.TemporaryDirectory() as tmp:
        ours_out, torch_out = Path(tmp) / "pyinterp.npz", Path(tmp) / "torch.npz"
        me = [sys.executable, __file__, *common]
        ours, ours_rss = run_child("pyinterp", [*me, "--side", "pyinterp", "--out", str(ours_out)], ours_out)
        theirs, theirs_rss = run_child("torch", [*me, "--side", "torch", "--out", str(torch_out),
                                                 "--pyinterp-out", str(ours_out)], torch_out)
    n_pos = len(ours["ids"])
    print(f"{args.model}, a {n_pos}-token prompt, random transcoders of {args.d_tc} features per layer, "
          f"{args.threads} threads")
    print(f"features: pyinterp {int(ours['n_feat'])}, torch {int(theirs['n_feat'])}; "
          f"{int(ours['decodes'])} frozen decodes; edge sums off their inputs by {float(ours['sum_error']):.1e}")
    print(f"{'':<30}{'seconds':>10}{'peak RSS MiB':>14}")
    print(f"{'pyinterp (GGUF, frozen passes)':<30}{float(ours['seconds']):>10.1f}{ours_rss:>14.0f}")
    print(f"{'torch fp32 autograd':<30}{float(theirs['seconds']):>10.1f}{theirs_rss:>14.0f}")
    print(f"pyinterp / torch: time {float(ours['seconds']) / float(theirs['seconds']):.2f}, "
          f"memory {ours_rss / theirs_rss:.2f}")


if __name__ == "__main__":
    main()
