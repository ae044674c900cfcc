#!/usr/bin/env python3
"""pyinterp's attribution graph against circuit-tracer's own, offline, on a tiny random llama (F32 weights) with
random JumpReLU transcoders: the same GGUF (for circuit-tracer converted to a Hugging Face directory), the same
transcoder files (circuit-tracer's layout, read by each side's own loader), the same token ids and logit targets.
circuit-tracer runs in its own interpreter (``--ct-python``, a separate venv: it is no dependency of pyinterp) as a
child process that writes its graph to an .npz; pyinterp runs in this one. Prints the figures.

    python benchmarks/compare_circuit_tracer.py --ct-python /tmp/ct/bin/python [--ct-pythonpath DIR]

circuit-tracer 0.5.0 imports ``nnsight.intervention.tracing``, which nnsight 0.8 no longer has: where its venv holds
nnsight 0.8, install nnsight 0.7.0 into a directory of its own (``pip install --no-deps --target DIR nnsight==0.7.0
python-socketio python-engineio bidict simple-websocket wsproto astor toml 'cloudpickle>=3'``) and pass it as
``--ct-pythonpath DIR``: the child's PYTHONPATH, nothing else changes.

Two conventions differ, and the comparison accounts for each explicitly:

- BOS: circuit-tracer zeroes every feature and error vector at position 0 (``zero_positions``); pyinterp keeps
  them. Features are matched on positions >= 1, and influence and scores are compared against pyinterp's graph
  with its position-0 features removed and its position-0 error columns zeroed ("as circuit-tracer").
- b_dec: circuit-tracer's error node is ``MLP out - (sum a_f W_dec[f] + b_dec)``, so b_dec is in no node and the
  edges into a node do not add up to its input; pyinterp's error node holds b_dec. The script compares twice: with
  b_dec zeroed in the files (the two error nodes are then the same vector) and with the random b_dec kept (the
  error columns then differ by b_dec's own edges, and so do influence and scores).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from child import run_child  # benchmarks/child.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "the cat sat on the mat and then"


# ---- circuit-tracer's side (runs in --ct-python; imports nothing of pyinterp) ----

def ct_side(hf_dir: Path, tc_dir: Path, ids: list[int], batch_size: int) -> dict[str, np.ndarray]:
    """circuit-tracer's unpruned graph of ``ids`` (all active features kept) and its own influence and scores."""
    import torch
    import yaml

    try:
        import nnsight.intervention.tracing  # noqa: F401  (what circuit-tracer 0.5's nnsight backend imports)
    except ModuleNotFoundError:
        import nnsight
        raise SystemExit(f"circuit-tracer's nnsight backend needs nnsight 0.6 or 0.7, {sys.executable} has "
                         f"{nnsight.__version__}; see --ct-pythonpath") from None
    from circuit_tracer import ReplacementModel, attribute
    from circuit_tracer.graph import compute_graph_scores, compute_node_influence
    from circuit_tracer.utils.hf_utils import load_transcoders

    torch.set_num_threads(1)
    config = yaml.safe_load((tc_dir / "config.yaml").read_text())
    n_layer = len(list(tc_dir.glob("layer_*.safetensors")))
    config.update(transcoders=[str(tc_dir / f"layer_{l}.safetensors") for l in range(n_layer)], scan="pyinterp-random",
                  repo_id="")  # local files: circuit-tracer's loader downloads only hf:// paths
    tcs = load_transcoders(config, device=torch.device("cpu"), dtype=torch.float32, lazy_encoder=False,
                           lazy_decoder=False)
    model = ReplacementModel.from_pretrained_and_transcoders(str(hf_dir), tcs, backend="nnsight",
                                                            device=torch.device("cpu"), dtype=torch.float32)
    started = time.perf_counter()
    graph = attribute(torch.tensor(ids), model, max_n_logits=10, desired_logit_prob=0.95, batch_size=batch_size)
    seconds = time.perf_counter() - started
    weights = torch.zeros(graph.adjacency_matrix.shape[0])
    weights[-len(graph.logit_targets):] = graph.logit_probabilities
    influence = compute_node_influence(graph.adjacency_matrix, weights)
    replacement, completeness = compute_graph_scores(graph)
    return {"adjacency": graph.adjacency_matrix.numpy(), "input_tokens": graph.input_tokens.cpu().numpy(),
            "features": graph.active_features[graph.selected_features].cpu().numpy(),
            "activations": graph.activation_values[graph.selected_features].cpu().numpy(),
            "logit_tokens": graph.logit_token_ids.cpu().numpy(),
            "logit_probabilities": graph.logit_probabilities.cpu().numpy(), "influence": influence.numpy(),
            "scores": np.array([replacement, completeness]), "seconds": np.array(seconds)}


# ---- the inputs both sides read ----

def hf_directory(gguf: Path, out: Path) -> Path:
    """The GGUF as a Hugging Face directory that circuit-tracer's transformers (4.57) loads: the weights through this
    interpreter's transformers (as tests/reference.py loads them), config.json and tokenizer_config.json written
    without transformers 5's new names (``rope_parameters``, the ``TokenizersBackend`` class)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)  # a GGUF-loaded model won't save
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config.pop("quantization_config", None)
    config.update(rope_theta=config["rope_parameters"]["rope_theta"], torch_dtype="float32")
    (out / "config.json").write_text(json.dumps(config, indent=1))
    tokenizer = json.loads((out / "tokenizer_config.json").read_text())
    tokenizer.pop("backend", None)
    tokenizer["tokenizer_class"] = "PreTrainedTokenizerFast"
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer, indent=1))
    return out


def transcoder_dirs(model, ids: list[int], work: Path, args: argparse.Namespace) -> dict[str, Path]:
    """Random JumpReLU transcoders saved twice in circuit-tracer's layout: with their random b_dec and with b_dec
    zeroed."""
    from pyinterp.circuit import TranscoderSet, random_transcoders, save_transcoders

    t = model.run(ids, capture=["ffn_norm"])
    rms = float(np.sqrt(np.mean([(t["ffn_norm", l] ** 2).mean() for l in range(model.n_layer)])))
    tcs = random_transcoders(model.n_layer, model.n_embd, args.d_tc, density=args.density, input_scale=rms,
                             seed=args.seed)
    zeroed = TranscoderSet(tuple(dataclasses.replace(tc, b_dec=np.zeros_like(tc.b_dec)) for tc in tcs.layers),
                           tcs.reads, tcs.writes)
    return {"b_dec zeroed": save_transcoders(zeroed, work / "tc-zero"),
            "b_dec kept": save_transcoders(tcs, work / "tc-kept")}


# ---- the comparison ----

def as_circuit_tracer(graph):
    """pyinterp's graph with circuit-tracer's BOS convention: the position-0 features removed and the position-0
    error columns zeroed (the edges between the other nodes do not change: they are direct effects)."""
    keep = np.r_[np.flatnonzero(graph.features[:, 1] != 0), graph.n_feat:graph.n_node]
    adjacency = graph.adjacency[np.ix_(keep, keep)].copy()
    n_feat = len(keep) - (graph.n_node - graph.n_feat)
    adjacency[:, n_feat + np.arange(graph.n_layer) * graph.n_pos] = 0.0
    return dataclasses.replace(graph, features=graph.features[keep[:n_feat]],
                               activations=graph.activations[keep[:n_feat]], adjacency=adjacency)


def node_pairs(ct: dict[str, np.ndarray], graph) -> dict[str, np.ndarray]:
    """(circuit-tracer node, pyinterp node) index pairs of the nodes both graphs hold, by kind: features (matched by
    (layer, position, feature)), errors at positions >= 1, tokens, logits."""
    n_ct, n_pos, n_layer = len(ct["features"]), graph.n_pos, graph.n_layer
    ours = {tuple(f): i for i, f in enumerate(graph.features.tolist())}
    feats = [(j, ours[tuple(f)]) for j, f in enumerate(ct["features"].tolist()) if tuple(f) in ours]
    errors = [(n_ct + l * n_pos + p, graph.error_node(l, p)) for l in range(n_layer) for p in range(1, n_pos)]
    tokens = [(n_ct + n_layer * n_pos + p, graph.token_node(p)) for p in range(n_pos)]
    logits = [(n_ct + (n_layer + 1) * n_pos + i, graph.logit_node(i)) for i in range(graph.n_logit)]
    return {k: np.array(v, dtype=np.int64).reshape(-1, 2)
            for k, v in {"features": feats, "errors": errors, "tokens": tokens, "logits": logits}.items()}


def edge_errors(ct: dict[str, np.ndarray], graph, pairs: dict[str, np.ndarray]) -> dict[str, float]:
    """The worst |edge difference| relative to its row's largest |edge| (pyinterp's, over the common sources), on the
    rows both compute (features and logits), per kind of source."""
    rows = np.concatenate([pairs["features"], pairs["logits"]])
    sources = np.concatenate([pairs["features"], pairs["errors"], pairs["tokens"]])
    theirs = ct["adjacency"][np.ix_(rows[:, 0], sources[:, 0])].astype(np.float64)
    ours = graph.adjacency[np.ix_(rows[:, 1], sources[:, 1])].astype(np.float64)
    scale = np.maximum(np.abs(ours).max(axis=1, keepdims=True), 1e-30)
    rel = np.abs(ours - theirs) / scale
    bounds = np.cumsum([0, len(pairs["features"]), len(pairs["errors"]), len(pairs["tokens"])])
    kinds = {kind: float(rel[:, a:b].max()) for kind, a, b in zip(["features", "errors", "tokens"], bounds, bounds[1:])}
    return {"all": float(rel.max()), **kinds}


def compare(ct: dict[str, np.ndarray], graph) -> dict[str, float]:
    """The figures of one comparison (see the module docstring)."""
    from pyinterp.circuit import graph_scores
    from pyinterp.circuit.prune import logit_weights, node_influence

    pairs = node_pairs(ct, graph)
    later = graph.features[:, 1] != 0
    matched = len(pairs["features"])
    act = np.abs(graph.activations[pairs["features"][:, 1]] - ct["activations"][pairs["features"][:, 0]]).max(
        initial=0.0) / np.abs(graph.activations).max()
    n_ct = len(ct["features"])
    bos_errors = n_ct + np.arange(graph.n_layer) * graph.n_pos
    adjusted = as_circuit_tracer(graph)
    adj_pairs = node_pairs(ct, adjusted)
    every = np.concatenate(list(adj_pairs.values()))
    infl_ct = ct["influence"].astype(np.float64)[every[:, 0]]
    scale = np.abs(infl_ct).max()
    infl_adj = node_influence(adjusted.adjacency.astype(np.float64), logit_weights(adjusted))[every[:, 1]]
    raw_pairs = np.concatenate(list(pairs.values()))
    infl_raw = node_influence(graph.adjacency.astype(np.float64), logit_weights(graph))[raw_pairs[:, 1]]
    return {"ct_features": n_ct, "py_features": graph.n_feat, "py_bos_features": int((~later).sum()),
            "matched": matched, "only_ct": n_ct - matched, "only_py": int(later.sum()) - matched,
            "activation": float(act), "edges": edge_errors(ct, graph, pairs),
            "ct_bos_error_columns": float(np.abs(ct["adjacency"][:, bos_errors]).max()),
            "influence": float(np.abs(infl_adj - infl_ct).max() / scale),
            "influence_raw": float(np.abs(infl_raw - ct["influence"][raw_pairs[:, 0]]).max() / scale),
            "ct_scores": tuple(float(s) for s in ct["scores"]), "py_scores_adjusted": graph_scores(adjusted),
            "py_scores": graph_scores(graph), "sum_error": float(graph.info["sum_error"])}


def report(name: str, f: dict) -> None:
    """Print one comparison's figures."""
    e = f["edges"]
    print(f"-- transcoders with {name}")
    print(f"features: circuit-tracer {f['ct_features']}, pyinterp {f['py_features']} ({f['py_bos_features']} at "
          f"position 0, which circuit-tracer zeroes); matched {f['matched']}, only circuit-tracer {f['only_ct']}, "
          f"only pyinterp (positions >= 1) {f['only_py']}; activations differ by {f['activation']:.1e} of the largest")
    print(f"edges (worst |difference| / the row's largest |edge|): {e['all']:.2e}; from features {e['features']:.2e}, "
          f"errors {e['errors']:.2e}, tokens {e['tokens']:.2e}; circuit-tracer's position-0 error columns: "
          f"max |edge| {f['ct_bos_error_columns']:.1e}")
    print(f"node influence (relative to the largest): {f['influence']:.2e} against pyinterp's graph as "
          f"circuit-tracer (position 0 dropped), {f['influence_raw']:.2e} against pyinterp's own")
    ct, adj, raw = f["ct_scores"], f["py_scores_adjusted"], f["py_scores"]
    print(f"replacement score: circuit-tracer {ct[0]:.6f}, pyinterp as circuit-tracer {adj[0]:.6f}, "
          f"pyinterp {raw[0]:.6f}")
    print(f"completeness score: circuit-tracer {ct[1]:.6f}, pyinterp as circuit-tracer {adj[1]:.6f}, "
          f"pyinterp {raw[1]:.6f}")
    print(f"pyinterp's edges add up to their inputs within {f['sum_error']:.1e}")


def run(args: argparse.Namespace, ct_python: Path, work: Path) -> None:
    """Both graphs for each transcoder directory, compared."""
    sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]  # this tree's pyinterp and tiny_gguf
    import pyinterp
    import torch
    from pyinterp.circuit import attribution_graph, load_transcoders

    import tiny_gguf

    torch.set_num_threads(1)
    gguf = tiny_gguf.write("llama", work / "tiny-llama-f32.gguf", f32=True)
    hf = hf_directory(gguf, work / "hf")
    with pyinterp.Model(gguf, n_ctx=512, n_threads=1) as model:
        ids = model.prompt_ids(args.prompt)
        print(f"tiny random llama (F32, {model.n_layer} layers, d_model {model.n_embd}), {len(ids)} tokens, random "
              f"JumpReLU transcoders of {args.d_tc} features per layer")
        for name, tc_dir in transcoder_dirs(model, ids, work, args).items():
            out = work / f"ct-{tc_dir.name}.npz"
            argv = [str(ct_python), __file__, "--ct-python", str(ct_python), "--side", "ct", "--hf", str(hf),
                    "--tc", str(tc_dir), "--ids", ",".join(map(str, ids)), "--batch-size", str(args.batch_size),
                    "--out", str(out)]
            ct, _ = run_child("circuit-tracer", argv, out)
            if ct["input_tokens"].tolist() != ids:
                raise SystemExit(f"circuit-tracer attributed other tokens: {ct['input_tokens'].tolist()} for {ids}")
            started = time.perf_counter()
            graph = attribution_graph(model, ids, load_transcoders(tc_dir, model.n_layer, model.n_embd),
                                      targets=ct["logit_tokens"].tolist(), max_features=None)
            seconds = time.perf_counter() - started
            report(name, compare(ct, graph))
            print(f"{graph.n_logit} targets (circuit-tracer's salient logits, probability "
                  f"{graph.logit_probabilities.sum():.3f}); seconds: circuit-tracer {float(ct['seconds']):.2f} "
                  f"(attribute), pyinterp {seconds:.2f} (attribution_graph and its transcoders' loading), 1 thread")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct-python", required=True, help="the Python interpreter of a venv with circuit-tracer")
    parser.add_argument("--ct-pythonpath", help="the circuit-tracer interpreter's PYTHONPATH (an nnsight it can use)")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--d-tc", type=int, default=64)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="circuit-tracer's batch of backward passes")
    parser.add_argument("--keep", help="a new directory to keep the model, transcoders and circuit-tracer's .npz in")
    for hidden in ["--side", "--hf", "--tc", "--ids", "--out"]:
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "ct":
        ids = [int(t) for t in args.ids.split(",")]
        np.savez(args.out, **ct_side(Path(args.hf), Path(args.tc), ids, args.batch_size))
        return
    ct_python = Path(args.ct_python)
    if not (ct_python.is_file() and os.access(ct_python, os.X_OK)):
        raise SystemExit(f"compare_circuit_tracer: error: no circuit-tracer interpreter at {ct_python}")
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")  # for the child too
    if args.ct_pythonpath:  # read by the child only: this interpreter has imported what it needs by then
        os.environ["PYTHONPATH"] = args.ct_pythonpath
    if args.keep:
        Path(args.keep).mkdir(parents=True)
        run(args, ct_python, Path(args.keep))
        return
    with tempfile.TemporaryDirectory() as tmp:
        run(args, ct_python, Path(tmp))


if __name__ == "__main__":
    main()
