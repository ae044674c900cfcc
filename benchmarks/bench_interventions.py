#!/usr/bin/env python3
"""Cost of in-graph interventions and of the patch series, measured side by side in one run.

1. pyinterp on one prompt (default 128 tokens): plain, 1-head ablation, 1-row patch and capture of
   every layer's attention, interleaved round by round; medians and ratios to plain.
   Targets: ablation <= 1.03, patch <= 1.03, full attention capture <= 1.3. Then generation, plain,
   with one head ablated and with a steering vector added at one layer (the graph is reused from token
   to token; target <= 1.05); the logits of the last token only against every token's; an SAE of
   16 x n_embd features encoding one layer in the graph, top-10 per token (target < 1.05). Then the cost
   of pyinterp's faithful defaults (explicit attention, F32 KV cache) against llama.cpp's own (flash
   attention, F16).
2. The same llama_decode from a small C program (decode_bench.c, stock llama.h API only) linked
   once against pyinterp's patched libllama (hook unset) and once against llama.cpp built from the
   same source without the patches (built into build/stock on first use). Target: <= 1.05.

    python benchmarks/bench_interventions.py [--model smollm2] [--tokens 128] [--runs 15]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from typing import Callable

import numpy as np

import pyinterp
from pyinterp import zoo
from pyinterp.engine._ffi import LIB_DIR, shared_library
from pyinterp.engine.backend import default_threads
from pyinterp.interventions import AblateHeads, AddVector
from pyinterp.analysis.sae import random_sae, sae_features

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
STOCK = REPO / "build" / "stock"


def prompt_ids(model: pyinterp.Model, n: int) -> list[int]:
    text = " ".join(f"The {i}th item on the list is the number {i * 7}." for i in range(n))
    ids = model.tokenize(text)[:n]
    assert len(ids) == n
    return ids


def bench_pyinterp(model: pyinterp.Model, ids: list[int], runs: int) -> dict[str, float]:
    layer = model.n_layer // 2
    row = np.zeros(model.n_embd, dtype=np.float32)
    variants = {
        "plain": {},
        "ablate 1 head": {"ablate": [(layer, 1)]},
        "patch 1 row": {"patch": [("l_out", layer, len(ids) // 2, row)]},
        "capture all attention": {"capture": ["attn_scores"]},
    }
    return interleaved({name: (lambda kw=kw: model.run(ids, **kw)) for name, kw in variants.items()}, runs)


def interleaved(calls: dict[str, Callable[[], object]], runs: int) -> dict[str, float]:
    """Median seconds of each call, the calls interleaved round by round after one warm-up each."""
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(runs):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_generation(model: pyinterp.Model, n: int, rounds: int) -> dict[str, float]:
    """Seconds per generated token: plain, one head ablated, a vector added to one layer's output."""
    layer = model.n_layer // 2
    vector = np.random.default_rng(0).normal(size=model.n_embd).astype(np.float32)
    variants = {"plain": [], "ablate 1 head": [AblateHeads(((layer, 1),))],
                "add a vector at 1 layer": [AddVector("l_out", layer, vector, scale=0.5)]}
    calls = {name: (lambda v=v: model.generate("Once upon a time", n, stop_at_eog=False, interventions=v))
             for name, v in variants.items()}
    return {name: t / n for name, t in interleaved(calls, rounds).items()}


def bench_outputs_and_sae(model: pyinterp.Model, ids: list[int], runs: int) -> dict[str, float]:
    """A prompt pass keeping every token's logits, the last token's only, and the last token's with an SAE
    (16 x n_embd features, random weights: the cost does not depend on them) encoding the middle layer."""
    layer = model.n_layer // 2
    sae = random_sae(model.n_embd, 16 * model.n_embd, hook_name=f"blocks.{layer}.hook_resid_post")
    calls = {"logits of every token": lambda: model.run(ids, logits="all"),
             "logits of the last token": lambda: model.run(ids, logits="last"),
             "last + SAE encode, 1 layer": lambda: sae_features(model, sae, ids, top_k=10)}
    return interleaved(calls, runs)


def bench_defaults(path: Path, ids: list[int], runs: int, threads: int, n_gpu_layers: int | None) -> dict[str, tuple[float, float]]:
    """pyinterp's faithful defaults (the explicit attention path on every layer, F32 KV cache) against llama.cpp's
    (flash attention where it is supported, F16 KV cache): seconds of a prompt pass and per generated token."""
    settings = {"pyinterp default": {}, "llama.cpp default": {"flash_attn": None, "type_k": "f16", "type_v": "f16"}}
    models = {name: pyinterp.Model(path, n_ctx=max(512, len(ids) + 64), n_threads=threads, n_gpu_layers=n_gpu_layers, **kw)
              for name, kw in settings.items()}
    prompt: dict[str, list[float]] = {name: [] for name in models}
    token: dict[str, list[float]] = {name: [] for name in models}
    try:
        for model in models.values():  # warm-up
            model.run(ids)
        for _ in range(runs):
            for name, model in models.items():
                t0 = time.perf_counter()
                model.run(ids)
                prompt[name].append(time.perf_counter() - t0)
        for _ in range(3):
            for name, model in models.items():
                t0 = time.perf_counter()
                model.generate(ids, 64, stop_at_eog=False)
                token[name].append((time.perf_counter() - t0 - statistics.median(prompt[name])) / 64)
    finally:
        for model in models.values():
            model.close()
    return {name: (statistics.median(prompt[name]), statistics.median(token[name])) for name in models}


def run(cmd: list[str], **kwargs) -> str:
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)
    if done.returncode != 0:
        sys.exit(f"bench: {' '.join(cmd[:3])} ... failed:\n{done.stdout[-2000:]}")
    return done.stdout


def build_stock() -> tuple[Path, Path]:
    """Unpatched llama.cpp from the same source; returns (include dirs root, lib dir)."""
    src, lib = STOCK / "src", STOCK / "build" / "bin"
    if not (lib / shared_library("llama")).exists():
        print("bench: building unpatched llama.cpp into build/stock (once, a few minutes)", flush=True)
        with tempfile.TemporaryDirectory() as no_patches:
            run([sys.executable, str(REPO / "scripts" / "llama_source.py"), "prepare",
                 "--patches", no_patches, "--dest", str(src)])
        run(["cmake", "-S", str(src), "-B", str(STOCK / "build"), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
             "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_BUILD_COMMON=OFF", "-DLLAMA_BUILD_TESTS=OFF",
             "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
             "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF",
             # the same CPU backends as pyinterp's default build: modules, one per instruction-set level
             "-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON", "-DGGML_NATIVE=OFF"])
        run(["ninja", "-C", str(STOCK / "build"), "llama", "ggml"])
    return src, lib


def compile_bench(src: Path, lib_dir: Path, out: Path) -> None:
    cc = os.environ.get("CC", "cc")
    run([cc, "-O2", "-o", str(out), str(HERE / "decode_bench.c"), f"-I{src / 'include'}",
         f"-I{src / 'ggml' / 'include'}", f"-L{lib_dir}", "-lllama", f"-Wl,-rpath,{lib_dir}"])


def bench_stock(model_path: Path, n_tokens: int, runs: int, threads: int) -> dict[str, float]:
    src, stock_lib = build_stock()
    patched_lib = LIB_DIR
    with tempfile.TemporaryDirectory() as tmp:
        binaries = {"stock llama.cpp": Path(tmp) / "stock", "pyinterp, hook unset": Path(tmp) / "patched"}
        compile_bench(src, stock_lib, binaries["stock llama.cpp"])
        compile_bench(src, patched_lib, binaries["pyinterp, hook unset"])
        times: dict[str, list[float]] = {name: [] for name in binaries}
        for _ in range(3):  # alternate the two, several runs each, to share any drift
            for name, binary in binaries.items():
                lib_dir = stock_lib if binary == binaries["stock llama.cpp"] else patched_lib
                out = run([str(binary), str(model_path), str(n_tokens), str(runs), str(threads), str(lib_dir)])
                times[name].extend(float(x) / 1000 for x in out.split()[1:])  # first run is warm-up
    return {name: statistics.median(t) for name, t in times.items()}


def report(title: str, medians: dict[str, float], base: str, n_tokens: int) -> None:
    print(f"\n{title}")
    for name, t in medians.items():
        print(f"  {name:<28} {t * 1000:8.1f} ms  {n_tokens / t:7.1f} tok/s  ratio {t / medians[base]:.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--n-gpu-layers", type=int, default=None, help="default: $PYINTERP_N_GPU_LAYERS, else 0")
    parser.add_argument("--no-stock", action="store_true", help="skip the comparison with unpatched llama.cpp")
    args = parser.parse_args()

    path = zoo.resolve(args.model)
    with pyinterp.Model(path, n_ctx=max(512, args.tokens), n_threads=args.threads,
                        n_gpu_layers=args.n_gpu_layers) as model:
        ids = prompt_ids(model, args.tokens)
        print(f"{model}\n{args.tokens}-token prompt, {args.threads} threads, median of {args.runs} interleaved runs")
        report("pyinterp Model.run (targets: ablate <= 1.03, patch <= 1.03, capture <= 1.3)",
               bench_pyinterp(model, ids, args.runs), "plain", args.tokens)
        report("pyinterp Model.generate, 64 tokens (time per token; target <= 1.05)",
               bench_generation(model, 64, 5), "plain", 1)
        report("pyinterp prompt pass, what leaves the graph (SAE target < 1.05)",
               bench_outputs_and_sae(model, ids, args.runs), "logits of the last token", args.tokens)
    defaults = bench_defaults(path, ids, args.runs, args.threads, args.n_gpu_layers)
    report(f"faithful defaults vs llama.cpp's: {args.tokens}-token prompt pass",
           {name: t[0] for name, t in defaults.items()}, "llama.cpp default", args.tokens)
    report("faithful defaults vs llama.cpp's: generation after that prompt (time per token)",
           {name: t[1] for name, t in defaults.items()}, "llama.cpp default", 1)
    if not args.no_stock:
        if shutil.which("ninja") is None or shutil.which("cmake") is None:
            sys.exit("bench: the stock comparison needs cmake and ninja (pip install cmake ninja)")
        report("llama_decode, same program, patched vs unpatched library (target <= 1.05)",
               bench_stock(path, args.tokens, args.runs, args.threads), "stock llama.cpp", args.tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
