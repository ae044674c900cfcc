#!/usr/bin/env python3
"""The portable build against a native one, side by side in one run.

Each configuration is a child process that loads the model once and times passes on request, so the
configurations take turns round by round (interleaved) and share whatever else the machine is doing:

- ``portable``: this install's libraries, the CPU variant chosen at import (the default build);
- ``portable x64``: the same libraries forced to the SSE2 baseline (``PYINTERP_CPU_VARIANT=x64``), what a CPU
  older than every other variant runs;
- ``native``: a ``PYINTERP_NATIVE=ON`` build (``-march=native``) given with ``--native-lib DIR`` (its
  ``pyinterp/lib``), e.g. built with ``cmake -S . -B build/native -DPYINTERP_NATIVE=ON`` and
  ``cmake --install build/native --component pyinterp --prefix build/native-inst``.

Per round: one prompt pass (default 128 tokens, last-token logits) and 16 generated tokens. Prints the
medians and each configuration's ratio to ``portable``.

    python benchmarks/bench_cpu_variant.py [--native-lib DIR] [--model smollm2] [--rounds 15]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time
import pyinterp
model = pyinterp.Model(sys.argv[1], n_ctx=512, n_threads=int(sys.argv[3]))
text = " ".join(f"The {i}th item on the list is the number {i * 7}." for i in range(200))
ids = model.tokenize(text)[: int(sys.argv[2])]
model.run(ids, logits="last")  # warm: the first pass repacks weights and allocates
print(json.dumps({"variant": pyinterp.build_info()["cpu_variant"]}), flush=True)
for line in sys.stdin:
    t0 = time.perf_counter()
    model.run(ids, logits="last")
    t1 = time.perf_counter()
    model.generate(ids[:16], 16)
    t2 = time.perf_counter()
    print(json.dumps({"pass": t1 - t0, "token": (t2 - t1) / 16}), flush=True)
"""


def start(model: str, tokens: int, threads: int, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    child = subprocess.Popen([sys.executable, "-c", CHILD, model, str(tokens), str(threads)], text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, **env})
    first = child.stdout.readline()
    if not first:
        raise SystemExit(f"a configuration did not start ({env})")
    return child, json.loads(first)["variant"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--native-lib", type=Path, help="pyinterp/lib of a PYINTERP_NATIVE=ON build")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    configs = {"portable": {}, "portable x64": {"PYINTERP_CPU_VARIANT": "x64"}}
    if args.native_lib:
        configs["native"] = {"PYINTERP_LIB_DIR": str(args.native_lib.resolve())}
    children = {}
    for name, env in configs.items():
        children[name] = start(args.model, args.tokens, args.threads, env)
        print(f"{name}: CPU variant {children[name][1]}", file=sys.stderr)
    times = {name: {"pass": [], "token": []} for name in configs}
    for r in range(args.rounds):
        for name, (child, _) in children.items():
            child.stdin.write("go\n")
            child.stdin.flush()
            result = json.loads(child.stdout.readline())
            for key in ("pass", "token"):
                times[name][key].append(result[key])
        print(f"\rround {r + 1}/{args.rounds}", end="", file=sys.stderr)
    print(file=sys.stderr)
    for child, _ in children.values():
        child.stdin.close()
        child.wait()

    base = {key: statistics.median(times["portable"][key]) for key in ("pass", "token")}
    print(f"{args.model}, {args.tokens}-token prompt pass and per generated token, {args.threads} threads, "
          f"medians of {args.rounds} interleaved rounds")
    print(f"{'configuration':<28} {'pass ms':>9} {'ratio':>7} {'token ms':>9} {'ratio':>7}")
    for name, (_, variant) in children.items():
        p, t = (statistics.median(times[name][key]) for key in ("pass", "token"))
        print(f"{name + ' (' + variant + ')':<28} {p * 1e3:9.1f} {p / base['pass']:7.3f} "
              f"{t * 1e3:9.2f} {t / base['token']:7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
