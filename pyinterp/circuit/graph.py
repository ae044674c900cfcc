"""An attribution graph: the nodes of a prompt's local replacement model and the direct effects between them.

Nodes, in this order (circuit-tracer's):
  features  ``n_feat``             active transcoder features, sorted by (layer, position, feature)
  errors    ``n_layer * n_pos``    each MLP output's error term; node ``n_feat + layer * n_pos + pos``
  tokens    ``n_pos``              the prompt's token embeddings; node ``n_feat + n_layer * n_pos + pos``
  logits    ``n_logit``            the chosen output logits of the last position, demeaned
``adjacency[target, source]`` is the direct effect of the source on the target's input in the local replacement
model (attention patterns and norm scales frozen at their values for this prompt, MLPs replaced by the
transcoder's features plus the error terms): a feature's pre-activation less its encoder bias, a logit less the
mean logit over the vocabulary. Features and logits are targets; errors and tokens only sources.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(eq=False)
class AttributionGraph:
    """One prompt's attribution graph (see the module docstring for the node order)."""

    input_tokens: np.ndarray              # [n_pos] int64 token ids of the prompt
    input_strings: list[str]              # [n_pos] the tokens as text
    features: np.ndarray                  # [n_feat, 3] int64 (layer, position, feature id)
    activations: np.ndarray               # [n_feat] float32 each feature's activation
    logit_tokens: np.ndarray              # [n_logit] int64 the target tokens
    logit_strings: list[str]              # [n_logit]
    logit_probabilities: np.ndarray       # [n_logit] float32 their probabilities in the model's output
    adjacency: np.ndarray                 # [n_node, n_node] float32 adjacency[target, source]
    n_layer: int
    cross_layer: bool = False
    model: str = ""                       # the model file's name
    transcoders: str = ""                 # where the transcoders came from
    prompt: str = ""
    info: dict = field(default_factory=dict)  # how it was computed: timings, passes, counts

    @property
    def n_pos(self) -> int:
        return len(self.input_tokens)

    @property
    def n_feat(self) -> int:
        return len(self.features)

    @property
    def n_logit(self) -> int:
        return len(self.logit_tokens)

    @property
    def n_node(self) -> int:
        return self.n_feat + (self.n_layer + 1) * self.n_pos + self.n_logit

    def error_node(self, layer: int, pos: int) -> int:
        return self.n_feat + layer * self.n_pos + pos

    def token_node(self, pos: int) -> int:
        return self.n_feat + self.n_layer * self.n_pos + pos

    def logit_node(self, i: int) -> int:
        return self.n_node - self.n_logit + i
