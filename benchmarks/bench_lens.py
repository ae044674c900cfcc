#!/usr/bin/env python3
"""Cost of the logit lens over every layer at one of n positions against all n, measured side by side in one run.

On one prompt (default 68 tokens): the plain pass (the last token's logits, and every token's), the norm lens of
``l_out`` at every layer and every position, and the same lens at the last position only, with one target token
(its probability and rank); medians and ratios to the pass. Only the chosen positions go through the final norm
and the unembedding, and a last-position lens keeps only the last token's row on the last layer (as the pass with
the last logits does), so it adds one row of the unembedding per layer to that pass.

    python benchmarks/bench_lens.py [--model smollm2|PATH.gguf] [--tokens 68] [--runs 5] [--threads N]

The 8B-shaped model (Llama-3-8B's widths and 128k vocabulary, 2 layers):
    python scripts/tiny_gguf.py llama-8b-shapes /tmp/llama-8b-2l.gguf --type q4_0
    python benchmarks/bench_lens.py --model /tmp/llama-8b-2l.gguf --runs 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import pyinterp


def prompt_ids(model: pyinterp.Model, n: int) -> list[int]:
    """A prompt of exactly ``n`` tokens (BOS included)."""
    text = " ".join(f"The {i}th item on the list is the number {i * 7}." for i in range(n))
    ids = model.tokenize(text)[:n]
    assert len(ids) == n
    return ids


def blocked(calls: dict[str, Callable[[], object]], runs: int, cycles: int = 2) -> dict[str, float]:
    """Median seconds of each call: ``cycles`` times, each call ``runs`` times in a row after one warm-up (a lens of
    other positions rebuilds the graph and may grow its buffers: each call is timed as it runs when repeated)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(cycles):
        for name, call in calls.items():
            call()
            for _ in range(runs):
                t0 = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=68)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: every core)")
    args = parser.parse_args()
    with pyinterp.Model(args.model, n_ctx=max(512, args.tokens), n_threads=args.threads) as model:
        ids = prompt_ids(model, args.tokens)
        target = [int(ids[-1])]
        calls = {
            "pass, last logits": lambda: model.run(ids, logits="last"),
            "pass, every logits": lambda: model.run(ids),
            f"lens, all {len(ids)} positions": lambda: model.logit_lens(ids, top_k=10, targets=target),
            "lens, last position": lambda: model.logit_lens(ids, top_k=10, targets=target, positions=[-1]),
        }
        times = blocked(calls, args.runs)
        print(f"{model.path.name}: {model.n_layer} layers, vocabulary {model.n_vocab}, {len(ids)} tokens, "
              f"threads {args.threads or 'default'}, median of {2 * args.runs} runs")
        plain = times["pass, last logits"]
        for name, t in times.items():
            print(f"  {name:<22} {t * 1000:9.1f} ms   {t / plain:6.2f}x the pass (last logits)")
        lens_all, lens_last = list(times.values())[2:]
        print(f"  lens at the last position / at all {len(ids)}: {lens_last / lens_all:.3f}")

if __name__ == "__main__":
    main()
