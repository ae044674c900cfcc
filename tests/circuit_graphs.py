"""Synthetic attribution graphs for the pruning, export and view tests: random sparse adjacencies with the
structure of a real graph (a feature at (layer, pos) receives edges only from features and errors of earlier
layers and from tokens, all at positions <= pos; a logit from every feature, error and token)."""

from __future__ import annotations

import numpy as np

from pyinterp.circuit.graph import AttributionGraph

WORDS = ["<bos>", "The", " cat", " sat", " on", " the", " mat", ".", " Paris", " café", " 東京", " <b>", " a&b",
         "\n", " \"q\"", " it's", " 🙂", " x<y", "</script>", " is"]


def weights(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random edge weights of either sign with heavy-tailed magnitudes (log-normal, sigma 1.5), as in real graphs
    where few edges carry most of the influence."""
    return rng.choice([-1.0, 1.0], size=shape) * rng.lognormal(0.0, 1.5, size=shape)


def random_graph(n_pos: int = 5, n_layer: int = 3, features_per_site: float = 2.0, density: float = 0.5,
                 n_logit: int = 3, seed: int = 0, top_logits: bool = False) -> AttributionGraph:
    """An AttributionGraph of ``n_pos`` tokens, ``n_layer`` layers, about ``features_per_site`` active features
    per (layer, position), each allowed edge present with probability ``density``; with ``top_logits``,
    ``info["feature_top_logits"]`` holds three (token, value) pairs per feature."""
    rng = np.random.default_rng(seed)
    sites = [(layer, pos) for layer in range(n_layer) for pos in range(n_pos)]
    features = []
    for layer, pos in sites:
        ids = sorted(rng.choice(1000, size=rng.poisson(features_per_site), replace=False).tolist())
        features += [(layer, pos, int(f)) for f in ids]
    features = np.array(features, dtype=np.int64).reshape(-1, 3)
    n_feat = len(features)
    n_node = n_feat + (n_layer + 1) * n_pos + n_logit
    layer_of = np.concatenate([features[:, 0], np.repeat(np.arange(n_layer), n_pos), np.full(n_pos, -1)])
    pos_of = np.concatenate([features[:, 1], np.tile(np.arange(n_pos), n_layer), np.arange(n_pos)])
    n_source = len(layer_of)
    adjacency = np.zeros((n_node, n_node), dtype=np.float32)
    allowed = (layer_of[None, :] < features[:, :1]) & (pos_of[None, :] <= features[:, 1:2])
    present = allowed & (rng.random(allowed.shape) < density)
    adjacency[:n_feat, :n_source] = np.where(present, weights(rng, allowed.shape), 0.0)
    logit_rows = np.where(rng.random((n_logit, n_source)) < density, weights(rng, (n_logit, n_source)), 0.0)
    adjacency[n_node - n_logit:, :n_source] = logit_rows
    probabilities = np.sort(rng.dirichlet(np.ones(n_logit + 1))[:n_logit])[::-1].astype(np.float32)
    tokens = rng.choice(len(WORDS), size=n_pos).astype(np.int64)
    logit_tokens = rng.choice(len(WORDS), size=n_logit, replace=False).astype(np.int64)
    info = {}
    if top_logits:
        info["feature_top_logits"] = [[(WORDS[int(t)], float(v)) for t, v in
                                       zip(rng.choice(len(WORDS), 3), rng.normal(size=3))] for _ in range(n_feat)]
    return AttributionGraph(
        input_tokens=tokens, input_strings=[WORDS[t] for t in tokens], features=features,
        activations=rng.exponential(size=n_feat).astype(np.float32), logit_tokens=logit_tokens,
        logit_strings=[WORDS[t] for t in logit_tokens], logit_probabilities=probabilities, adjacency=adjacency,
        n_layer=n_layer, model="random.gguf", transcoders="random", prompt="".join(WORDS[t] for t in tokens),
        info=info)
