#!/usr/bin/env python3
"""Extracting one tensor of every token of a corpus: ``pyinterp extract`` against pyinterp's own truncated forward
pass (its physical limit), a transformers loop and nnsight, on the same GGUF and the same contexts, each side in
its own process; prints tokens/s, peak RSS and their ratios, measured in this one run.

- pyinterp: :func:`pyinterp.corpus.extract.extract` to a temporary directory (several contexts per decode, the pass
  truncated after the layer, shards written by a background thread); and the same decodes without writing
  (:func:`pyinterp.corpus.stream.batches`: the forward pass truncated after the layer, captures copied out), the
  limit extraction can reach.
- transformers: the GGUF dequantized to fp32, eager attention, batches of ``--batch`` contexts, a forward hook on
  the layer that keeps its output and stops the forward there (an exception), as nnsight's ``tracer.stop()`` does.
- nnsight (``--peer-python PYTHON``, an interpreter with nnsight: keep it out of the test environment): one trace
  per ``--batch`` contexts, one invoke each, the layer's output saved, ``tracer.stop()`` after it.

    python benchmarks/bench_extract.py [--model smollm2|PATH] [--layer 15] [--contexts 64] [--context-size 128]
    python benchmarks/bench_extract.py --peer-python /tmp/peers/bin/python       # nnsight too (see bench_sweep.py)
    python scripts/tiny_gguf.py llama-1b /tmp/llama-1b-q4_0.gguf --type q4_0     # the ~1B random llama
    python benchmarks/bench_extract.py --model /tmp/llama-1b-q4_0.gguf --layer 8 --contexts 32
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


def corpus_text(path: Path) -> Path:
    """The repository's docs, one line per document, repeated: a corpus of some 100k tokens."""
    lines = [line for page in sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
             for line in page.read_text().splitlines() if line.strip()]
    path.write_text("\n".join(lines * 4) + "\n")
    return path


def pyinterp_side(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """Extraction and the truncated forward alone over the same contexts; the contexts' ids for the other sides."""
    import pyinterp
    from pyinterp.corpus.extract import Request, contexts_per_decode, extract, model_contexts, packing_for
    from pyinterp.corpus.source import Source
    from pyinterp.corpus.stream import batches

    size, n = args.context_size, args.contexts
    with tempfile.TemporaryDirectory() as tmp, \
            pyinterp.Model(args.model, n_ctx=max(512, size), n_threads=args.threads) as model:
        source = Source(corpus_text(Path(tmp) / "corpus.txt"))
        name = f"l_out-{args.layer}"
        request = Request(source, (name,), size, max_tokens=n * size)
        packing = packing_for(model, size, True)

        def contexts():
            return model_contexts(model, source, packing, n * size)

        ids = np.stack([c.ids for c in contexts()])
        per_decode = contexts_per_decode(model, size)
        for _ in batches(model, list(contexts())[:per_decode], [name], per_decode=per_decode):
            pass  # warm-up
        t0 = time.perf_counter()
        for _ in batches(model, contexts(), [name], per_decode=per_decode):
            pass
        forward = time.perf_counter() - t0
        t0 = time.perf_counter()
        extract(model, Path(tmp) / "out", request)
        seconds = time.perf_counter() - t0
    return {"ids": ids, "seconds": np.array(seconds), "forward": np.array(forward)}


def torch_model(args: argparse.Namespace):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    path = Path(args.model)
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                attn_implementation="eager").eval()


class Stop(Exception):
    """Raised by the hook: nothing after the layer is computed."""


def transformers_side(args: argparse.Namespace, ids: np.ndarray) -> dict[str, np.ndarray]:
    import torch

    model = torch_model(args)
    kept = []

    def hook(module, inputs, output):
        kept.append((output[0] if isinstance(output, tuple) else output).numpy().copy())
        raise Stop

    model.model.layers[args.layer].register_forward_hook(hook)

    def run(rows: np.ndarray) -> None:
        with torch.no_grad():
            try:
                model(torch.from_numpy(rows.astype(np.int64)))
            except Stop:
                pass

    run(ids[:args.batch])  # warm-up
    t0 = time.perf_counter()
    for start in range(0, len(ids), args.batch):
        run(ids[start:start + args.batch])
    return {"seconds": np.array(time.perf_counter() - t0)}


def nnsight_side(args: argparse.Namespace, ids: np.ndarray) -> dict[str, np.ndarray]:
    import torch
    from nnsight import LanguageModel
    from transformers import AutoTokenizer

    path = Path(args.model)
    lm = LanguageModel(torch_model(args), tokenizer=AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name))

    def run(rows: np.ndarray) -> None:
        saved = []
        with torch.no_grad(), lm.trace() as tracer:
            for i, row in enumerate(rows):
                with tracer.invoke(torch.from_numpy(row[None].astype(np.int64))):
                    saved.append(lm.model.layers[args.layer].output.save())
                    if i == len(rows) - 1:
                        tracer.stop()

    run(ids[:args.batch])  # warm-up
    t0 = time.perf_counter()
    for start in range(0, len(ids), args.batch):
        run(ids[start:start + args.batch])
    return {"seconds": np.array(time.perf_counter() - t0)}


def run_side(side: str, args: argparse.Namespace, out: Path, ids: Path | None = None) -> tuple[dict, float]:
    """Run one side in a child process; its result and its peak RSS in MiB (``ru_maxrss`` of that child)."""
    python = args.peer_python if side == "nnsight" else sys.executable
    argv = [python, __file__, "--side", side, "--out", str(out), "--model", str(args.model), "--threads",
            str(args.threads), "--layer", str(args.layer), "--contexts", str(args.contexts), "--context-size",
            str(args.context_size), "--batch", str(args.batch)]
    if ids is not None:
        argv += ["--ids", str(ids)]
    return run_child(side, argv, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="a known model name or a GGUF path")
    parser.add_argument("--layer", type=int, default=15, help="the residual stream after this layer (l_out)")
    parser.add_argument("--contexts", type=int, default=64)
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16, help="contexts per forward on the torch sides")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--peer-python", default=None, metavar="PYTHON", help="an interpreter with nnsight installed")
    parser.add_argument("--side", choices=["pyinterp", "transformers", "nnsight"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--ids", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.side == "pyinterp":
        np.savez(args.out, **pyinterp_side(args))
        return
    if args.side is not None:
        with np.load(args.ids) as plan:
            np.savez(args.out, **(transformers_side if args.side == "transformers" else nnsight_side)(args, plan["ids"]))
        return

    from pyinterp import PyinterpError, zoo

    try:
        args.model = zoo.resolve(args.model)
    except PyinterpError as e:
        raise SystemExit(f"bench_extract: error: {e}") from None
    with tempfile.TemporaryDirectory() as tmp:
        ours, ours_rss = run_side("pyinterp", args, Path(tmp) / "pyinterp.npz")
        hf, hf_rss = run_side("transformers", args, Path(tmp) / "hf.npz", ids=Path(tmp) / "pyinterp.npz")
        peer = run_side("nnsight", args, Path(tmp) / "nn.npz", ids=Path(tmp) / "pyinterp.npz") if args.peer_python else None
    tokens = ours["ids"].size
    rate = {"extract": tokens / float(ours["seconds"]), "forward": tokens / float(ours["forward"]),
            "transformers": tokens / float(hf["seconds"])}
    print(f"{args.model.name}: l_out-{args.layer}, {len(ours['ids'])} contexts x {args.context_size} tokens = {tokens} "
          f"tokens, {args.threads} threads")
    print(f"pyinterp extract          {rate['extract']:8.0f} tok/s   peak RSS {ours_rss:6.0f} MiB")
    print(f"pyinterp truncated pass   {rate['forward']:8.0f} tok/s   (the same decodes, nothing written)")
    print(f"transformers, stop hook   {rate['transformers']:8.0f} tok/s   peak RSS {hf_rss:6.0f} MiB   (batch {args.batch})")
    if peer is not None:
        (nn, nn_rss) = peer
        rate["nnsight"] = tokens / float(nn["seconds"])
        print(f"nnsight, tracer.stop()    {rate['nnsight']:8.0f} tok/s   peak RSS {nn_rss:6.0f} MiB   "
              f"({args.batch} invokes per trace)")
    print(f"extract / truncated pass: {rate['extract'] / rate['forward']:.2f}")
    for other, rss in (("transformers", hf_rss), ("nnsight", peer[1] if peer else None)):
        if other in rate:
            print(f"extract / {other}: speed {rate['extract'] / rate[other]:.2f}, peak RSS {ours_rss / rss:.2f}")


if __name__ == "__main__":
    main()
