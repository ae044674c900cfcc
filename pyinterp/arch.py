"""What pyinterp knows about each model architecture, in one table.

llama.cpp's tensor names are the vocabulary. For every architecture the table says which named tensors
make up the residual stream: the embedding (outside the layers), each layer's attention and FFN
contributions, and the residual after each layer. The logit lens (``--ll all``), direct logit attribution
and the reference tests read it; nothing else names architectures.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError


@dataclass(frozen=True)
class Arch:
    """The residual stream of one architecture family, in llama.cpp tensor names.

    l_out-L = l_out-(L-1) + attn_term-L + ffn_term-L, with l_out-(-1) = embedding. A term is None where
    llama.cpp's graph of the family adds it to the residual without naming it per layer.
    """

    family: str
    embedding: str              # [n_tokens, n_embd], outside the layers: the first term of the residual stream
    attn_term: str | None       # [n_tokens, n_embd], what a layer's attention adds to the residual stream
    ffn_term: str | None        # [n_tokens, n_embd], what a layer's FFN adds
    residual: str = "l_out"     # [n_tokens, n_embd], the residual stream after a layer

    @property
    def residual_terms(self) -> tuple[str, ...]:
        """Every named tensor in residual space, in the order the stream adds them."""
        return tuple(t for t in (self.embedding, self.attn_term, self.ffn_term, self.residual) if t is not None)

    @property
    def unnamed(self) -> tuple[str, ...]:
        """The per-layer terms llama.cpp does not name (``"attention"``, ``"FFN"``): none for a full decomposition."""
        return tuple(what for what, t in (("attention", self.attn_term), ("FFN", self.ffn_term)) if t is None)


# pre-norm blocks: the attention and FFN outputs are added to the residual as they are
_PRE_NORM = Arch("pre-norm", embedding="embd", attn_term="attn_out", ffn_term="ffn_out")
# Gemma: the embedding is scaled by sqrt(n_embd), and each output goes through a norm before it is added
_GEMMA = Arch("gemma", embedding="inp_scaled", attn_term="attn_post_norm", ffn_term="ffn_post_norm")

# pre-norm blocks whose graphs (qwen2.cpp, qwen3.cpp, phi3.cpp) add the attention output (after wo) to the
# residual unnamed: ffn_inp-L = l_out-(L-1) + attention-L
_PRE_NORM_ATTN_UNNAMED = Arch("pre-norm", embedding="embd", attn_term=None, ffn_term="ffn_out")
# Gemma 2: Gemma's post-norms, but gemma2.cpp names the FFN post-norm outside the layers (ffn_post_norm, no -L)
_GEMMA2 = Arch("gemma", embedding="inp_scaled", attn_term="attn_post_norm", ffn_term=None)

ARCHS: dict[str, Arch] = {
    "llama": _PRE_NORM,
    "qwen2": _PRE_NORM_ATTN_UNNAMED,
    "qwen3": _PRE_NORM_ATTN_UNNAMED,
    "phi3": _PRE_NORM_ATTN_UNNAMED,
    "gemma2": _GEMMA2,
    "gemma3": _GEMMA,
}


def arch_of(name: str) -> Arch:
    """The table entry of a ``general.architecture`` value; a one-line error for one not in the table."""
    try:
        return ARCHS[name]
    except KeyError:
        raise InputError(f"architecture {name!r} is not in pyinterp's architecture table (pyinterp/arch.py): "
                         f"its residual-stream terms are unknown; known: {', '.join(sorted(ARCHS))}") from None
