"""What pyinterp knows about each model architecture, in one table.

llama.cpp's tensor names are the vocabulary. For every architecture the table says which named tensors
make up the residual stream: the embedding (outside the layers), each layer's attention and FFN
contributions, and the residual after each layer. The logit lens (``--ll all``), direct logit attribution
and the reference tests read it; nothing else names architectures.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyinterp.errors import InputError


@dataclass(frozen=True)
class Arch:
    """The residual stream of one architecture family, in llama.cpp tensor names.

    l_out-L = l_out-(L-1) + attn_term-L + ffn_term-L, with l_out-(-1) = embedding. (Patch 0005 names the
    attention output of qwen2, qwen3 and phi3 and Gemma 2's FFN post-norm on every layer, which llama.cpp's
    graphs of them left unnamed or named once.)
    """

    embedding: str          # [n_tokens, n_embd], outside the layers: the first term of the residual stream
    attn_term: str          # [n_tokens, n_embd], what a layer's attention adds to the residual stream
    ffn_term: str           # [n_tokens, n_embd], what a layer's FFN adds
    residual: str = "l_out" # [n_tokens, n_embd], the residual stream after a layer
    resid_mid: str = "ffn_inp"  # [n_tokens, n_embd], the residual stream between attention and FFN

    @property
    def residual_terms(self) -> tuple[str, ...]:
        """Every tensor in residual space, in the order the stream adds them."""
        return (self.embedding, self.attn_term, self.ffn_term, self.residual)

    @property
    def tl_aliases(self) -> dict[str, str]:
        """TransformerLens hook names (within a block, or whole for ``hook_embed``) -> llama.cpp tensor names."""
        return {
            "hook_embed": self.embedding, "hook_resid_mid": self.resid_mid, "hook_resid_post": self.residual,
            "hook_attn_out": self.attn_term, "hook_mlp_out": self.ffn_term,
            "attn.hook_q": "Qcur", "attn.hook_k": "Kcur", "attn.hook_v": "Vcur", "attn.hook_z": "kqv_heads",
            "attn.hook_attn_scores": "attn_logits", "attn.hook_pattern": "attn_scores",
            "ln_final.hook_normalized": "result_norm",
        }


# pre-norm blocks: the attention and FFN outputs are added to the residual as they are
_PRE_NORM = Arch(embedding="embd", attn_term="attn_out", ffn_term="ffn_out")
# Gemma: the embedding is scaled by sqrt(n_embd), and each output goes through a norm before it is added
_GEMMA = Arch(embedding="inp_scaled", attn_term="attn_post_norm", ffn_term="ffn_post_norm", resid_mid="sa_out")

ARCHS: dict[str, Arch] = {
    "llama": _PRE_NORM,
    "qwen2": _PRE_NORM,
    "qwen3": _PRE_NORM,
    "phi3": _PRE_NORM,
    "gemma2": _GEMMA,
    "gemma3": _GEMMA,
}


def arch_of(name: str) -> Arch:
    """The table entry of a ``general.architecture`` value; a one-line error for one not in the table."""
    try:
        return ARCHS[name]
    except KeyError:
        raise InputError(f"architecture {name!r} is not in pyinterp's architecture table (pyinterp/engine/arch.py): "
                         f"its residual-stream terms are unknown; known: {', '.join(sorted(ARCHS))}") from None
