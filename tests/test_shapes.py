"""Real-scale shapes in every type some CPU repacks: one layer of Llama 3 8B's shapes (n_embd 4096, 32 heads, 8 KV
heads, head_dim 128), its vocabulary size (128256) and an untied output.weight, run through every analysis.

At these shapes llama.cpp's CPU backend keeps the matrices (the unembedding too) in its CPU_REPACK buffer, which
only its matrix product reads; an op pyinterp adds that reads such a weight otherwise (get_rows on output.weight
did, in the logit attribution) has no backend, and ggml's scheduler aborts the process. The tiny models never
showed it: their 297-token vocabulary is not a multiple of 8, so their unembedding was never repacked. Each model
runs in a child process, so an abort fails the test instead of ending pytest."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import tiny_gguf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# n_ff cut to 1024 (a multiple of 256 for the K-quants, and of 8 rows: still repacked) to keep the files small
SPEC = replace(tiny_gguf.BENCH_SPECS["llama-8b-shapes"], n_layer=1, n_ff=1024)

CHILD = r"""
import json, sys
import numpy as np
import pyinterp
from pyinterp.analysis.patching import head_ablation_scan, logit_diff, patch_sweep
from pyinterp.analysis.sae import random_sae, sae_features

out = {}
with pyinterp.Model(sys.argv[1], n_ctx=32, n_threads=2) as m:
    prompt = "The city"
    ids = m.tokenize(prompt)
    corrupt = ids[:1] + ids[2:] + ids[1:2]  # as many tokens, one moved
    t = m.run(prompt, capture=["l_out", "attn_out-0", "attn_scores-0"])
    out["logits"] = list(t.logits.shape)
    out["finite"] = bool(np.isfinite(t.logits).all())
    out["l_out"] = list(t.act("l_out", 0).shape)
    lens = m.logit_lens(prompt, top_k=3)
    out["lens"] = len(lens.layers) if hasattr(lens, "layers") else 1
    for heads in (False, True):
        a = m.logit_attribution(prompt, heads=heads)
        out[f"attr_{heads}"] = [float(a.values.sum()), a.logit, float(a.values[1]),
                                float(a.heads.sum()) if heads else None]
    good, bad = int(np.argmax(t.logits[-1])), int(np.argsort(t.logits[-1])[-2])
    out["sweep"] = list(patch_sweep(m, prompt, corrupt, metric=logit_diff(good, bad), positions=[-1]).shape)
    out["scan"] = list(head_ablation_scan(m, prompt, logit_diff(good, bad)).shape)
    out["generate"] = len(m.generate(prompt, 3).tokens)
    f = sae_features(m, random_sae(m.n_embd, 32, "topk", k=4, hook_name="blocks.0.hook_resid_post"), prompt, top_k=4)
    out["sae"] = True
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def shape_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("shapes")


# repacked by ggml's CPU backend on ARM only (ggml-cpu/repack.cpp): on x86 they take the plain path, already covered
ARM_ONLY = {"q8_0", "q5_k", "q6_k"}


@pytest.mark.parametrize("quant", list(tiny_gguf.QUANTS))
def test_every_analysis_at_real_shapes(shape_dir, quant):
    if quant in ARM_ONLY and platform.machine().lower() in ("x86_64", "amd64"):
        pytest.skip(f"{quant} is repacked on ARM CPUs only")
    path = tiny_gguf.write(SPEC, shape_dir / f"llama-8b-shapes-1l-{quant}.gguf", quant=quant)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    try:
        done = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, env=env,
                              timeout=300, cwd=ROOT)
    finally:
        path.unlink()
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, f"exit {done.returncode}: {done.stderr[-3000:]}"
    out = json.loads(lines[0][len("RESULT "):])
    n_tokens = out["logits"][0]
    assert out["logits"] == [n_tokens, 128256] and out["finite"] and out["l_out"] == [n_tokens, 4096]
    for heads in (False, True):
        total, logit, attn0, head_sum = out[f"attr_{heads}"]
        # the terms add up to the logit (activations are rounded to the matrices' input type term by term)
        assert abs(total - logit) <= 0.05 * abs(logit) + 0.1
        if heads:
            # the heads of layer 0 add up to its attention term (less its biases: llama has none)
            assert abs(head_sum - attn0) <= 0.02 * abs(attn0) + 0.02
    assert out["sweep"] == [1, 1] and out["scan"] == [1, 32] and out["generate"] == 3 and out["sae"]
