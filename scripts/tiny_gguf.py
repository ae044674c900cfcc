"""Tiny random-weight GGUF models, one per architecture, for checking graphs without trained weights,
and one ~1B-parameter llama for benchmarks (speed does not depend on the weights' values).

Each tiny model is a few layers of the real architecture (GQA, the arch's RoPE, biases, QK norms, fused
projections, post-norms, sliding windows where the family has them) with Q8_0 matrices and F32 norms,
and a byte-level BPE vocabulary (gpt2 style) that llama.cpp and transformers both accept. Weights are
scaled so attention is far from uniform and activations stay finite. ``llama-1b`` has Llama 3.2 1B's
layer shapes (16 layers, n_embd 2048, 32 heads, 8 KV heads, n_ff 8192) and the same tiny vocabulary.
``llama-8b-shapes`` has two layers of Llama 3 8B's shapes (n_embd 4096, 32 heads, 8 KV heads, head_dim 128,
n_ff 14336), its vocabulary size (128256: the tiny vocabulary padded with reserved control tokens) and an
untied output.weight: the shapes at which llama.cpp's CPU backend repacks the unembedding.

Matrices of types the ``gguf`` package cannot quantize (the K-quants, IQ4_NL), and every matrix of a spec with
``random_blocks``, are drawn directly as quantized blocks (random quants, scales set for the wanted spread):
fast at real scale, where rounding normal weights takes minutes.

    python scripts/tiny_gguf.py qwen2 /tmp/qwen2.gguf [--seed N] [--type q8_0|q4_0|q4_k|...|f32] [--nan]
    python scripts/tiny_gguf.py llama-1b /tmp/llama-1b-q4_0.gguf --type q4_0     # 30 s, 0.55 GB
    python scripts/tiny_gguf.py llama-8b-shapes /tmp/llama-8b-2l.gguf --type q4_0   # 10 s, 1 GB

From Python: ``write(arch, path, seed=0, f32=False, quant="q8_0")`` (arch: a key or a ``Spec``); ``SPECS``
lists the tiny architectures, ``BENCH_SPECS`` the benchmark and real-shape models.
"""

from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType
F = gguf.LlamaFileType
# every type some CPU repacks for its matrix kernels (ggml-cpu/repack.cpp: x86 AVX2 Q4_0, Q4_K, IQ4_NL, MXFP4,
# AVX-512 Q2_K; ARM Q4_0, Q4_K, Q5_K, Q6_K, IQ4_NL, MXFP4, Q8_0)
QUANTS = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_k": Q.Q4_K, "q5_k": Q.Q5_K, "q6_k": Q.Q6_K, "q2_k": Q.Q2_K,
          "iq4_nl": Q.IQ4_NL, "mxfp4": Q.MXFP4}
FILE_TYPES = {"q8_0": F.MOSTLY_Q8_0, "q4_0": F.MOSTLY_Q4_0, "q4_k": F.MOSTLY_Q4_K_M, "q5_k": F.MOSTLY_Q5_K_M,
              "q6_k": F.MOSTLY_Q6_K, "q2_k": F.MOSTLY_Q2_K, "iq4_nl": F.MOSTLY_IQ4_NL, "mxfp4": F.MOSTLY_MXFP4_MOE}
ROUNDED = {"q8_0", "q4_0"}  # the types whose matrices are normal weights rounded by gguf.quants.quantize


@dataclass(frozen=True)
class Spec:
    """The shape and features of one model. Widths are multiples of 32 (the Q8_0 and Q4_0 block)."""

    arch: str                   # general.architecture (llama.cpp's name)
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 32
    n_ff: int = 256
    tied: bool = True           # no output.weight: the unembedding is the token embedding
    qkv_bias: bool = False      # qwen2: biases on q, k and v
    qk_norm: bool = False       # qwen3: RMS norm of each head's q and k
    fused: bool = False         # phi3: one attn_qkv matrix and one ffn_up holding gate and up
    post_norms: bool = False    # gemma2: norms after attention and FFN, sqrt(n_embd)-scaled embedding
    sliding_window: int = 0     # gemma2: every other layer (from the first) sees this many keys
    n_ctx_train: int = 512      # context length: the tests want a small one, the benchmarks room for batches
    n_vocab: int = 0            # 0: the tiny vocabulary; more: padded with reserved control tokens to this size
    random_blocks: bool = False  # every matrix drawn as quantized blocks (fast), not rounded from normal weights


# transformers reads neither qwen3's head_dim nor gemma2's query_pre_attn_scalar from GGUF: its defaults
# (128 and 256) are what these models must use
SPECS: dict[str, Spec] = {
    "llama": Spec("llama", n_head=4, n_head_kv=2, head_dim=32, tied=True),
    "qwen2": Spec("qwen2", n_head=4, n_head_kv=2, head_dim=32, tied=True, qkv_bias=True),
    "qwen3": Spec("qwen3", n_head=4, n_head_kv=2, head_dim=128, tied=False, qk_norm=True),
    "phi3": Spec("phi3", n_embd=96, n_head=3, n_head_kv=3, head_dim=32, tied=False, fused=True),
    "gemma2": Spec("gemma2", n_head=2, n_head_kv=1, head_dim=256, tied=True, post_norms=True, sliding_window=8),
}

# not in SPECS: the tests write every tiny model; 0.97B parameters (the tiny vocabulary adds 0.6M)
BENCH_SPECS: dict[str, Spec] = {
    "llama-1b": Spec("llama", n_layer=16, n_embd=2048, n_head=32, n_head_kv=8, head_dim=64, n_ff=8192, tied=True,
                     n_ctx_train=4096),
    "llama-8b-shapes": Spec("llama", n_layer=2, n_embd=4096, n_head=32, n_head_kv=8, head_dim=128, n_ff=14336,
                            tied=False, n_vocab=128256, random_blocks=True),
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes map to themselves, the others to code points 256 and up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_CORPUS = ("When Mary and John went to the store, John gave a drink to Mary. The capital of France is Paris. "
           "The Eiffel Tower is located in the city of Paris. 1 2 3 4 5 6 7 8 9 10")


def vocabulary(n_merges: int = 40) -> tuple[list[str], list[str], list[int]]:
    """Tokens, BPE merges and token types: 256 byte tokens, ``n_merges`` merges learnt greedily from a fixed
    sentence (within words, as GPT-2 pre-tokenizes), then ``<|endoftext|>`` (BOS and EOS)."""
    alphabet = _bytes_to_unicode()
    words = [[alphabet[b] for b in (w if i == 0 else " " + w).encode()] for i, w in enumerate(_CORPUS.split(" "))]
    tokens = [alphabet[b] for b in range(256)]
    merges = []
    for _ in range(n_merges):
        counts: dict[tuple[str, str], int] = {}
        for w in words:
            for pair in zip(w, w[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = max(counts, key=lambda p: (counts[p], p))
        merges.append(f"{best[0]} {best[1]}")
        tokens.append(best[0] + best[1])
        for w in words:
            i = 0
            while i < len(w) - 1:
                if (w[i], w[i + 1]) == best:
                    w[i:i + 2] = [best[0] + best[1]]
                i += 1
    tokens.append("<|endoftext|>")
    types = [gguf.TokenType.NORMAL] * (len(tokens) - 1) + [gguf.TokenType.CONTROL]
    return tokens, merges, [int(t) for t in types]


@functools.cache
def _unit_block(quant: gguf.GGMLQuantizationType) -> tuple[float, float]:
    """(std, offset ratio) of random blocks of ``quant`` whose scale is 1: dequantized values have that std
    when each block's minimum scale (K-quants with one) is the ratio times its scale, which centres them."""
    rng = np.random.default_rng(0)
    block, size = gguf.constants.GGML_QUANT_SIZES[quant]
    raw = rng.integers(0, 256, (64, 4, size), dtype=np.uint8)
    d, dmin = _SCALE_FIELDS[quant]
    values = []
    for m in (0.0, 1.0):
        _set_scales(raw, quant, 1.0, m)
        values.append(gguf.quants.dequantize(raw.reshape(64, -1), quant))
    ratio = 0.0 if dmin is None else values[0].mean() / (values[0].mean() - values[1].mean())
    _set_scales(raw, quant, 1.0, ratio)
    return float(gguf.quants.dequantize(raw.reshape(64, -1), quant).std()), float(ratio)


# byte offsets, within a block, of its F16 scale and of its F16 minimum scale (None: none); MXFP4 has an E8M0
# exponent at 0 instead
_SCALE_FIELDS = {Q.Q4_0: (0, None), Q.Q8_0: (0, None), Q.IQ4_NL: (0, None), Q.MXFP4: (0, None), Q.Q4_K: (0, 2),
                 Q.Q5_K: (0, 2), Q.Q2_K: (80, 82), Q.Q6_K: (208, None)}


def _set_scales(raw: np.ndarray, quant: gguf.GGMLQuantizationType, scale: float, min_scale: float) -> None:
    """Set every block's scale fields in ``raw`` [..., block bytes]; MXFP4 rounds the scale to a power of 2."""
    d, dmin = _SCALE_FIELDS[quant]
    if quant == Q.MXFP4:
        raw[..., 0] = 127 + int(round(np.log2(scale)))
        return
    raw[..., d:d + 2] = np.array([scale], np.float16).view(np.uint8)
    if dmin is not None:
        raw[..., dmin:dmin + 2] = np.array([min_scale * scale], np.float16).view(np.uint8)


class _Weights:
    """Random tensors in GGUF layout (numpy [rows, cols] = ggml [cols, rows]), seeded."""

    def __init__(self, writer: gguf.GGUFWriter, seed: int, quant: gguf.GGMLQuantizationType | None,
                 random_blocks: bool = False) -> None:
        self.writer = writer
        self.rng = np.random.default_rng(seed)
        self.quant = quant  # None: F32
        self.random_blocks = random_blocks

    def matrix(self, name: str, rows: int, cols: int, gain: float) -> None:
        """A quantized (or F32) matrix [rows, cols] with entries of std gain / sqrt(cols): a unit input gives
        outputs of std gain."""
        if self.random_blocks:
            block, size = gguf.constants.GGML_QUANT_SIZES[self.quant]
            raw = np.frombuffer(self.rng.bytes(rows * cols // block * size), np.uint8).reshape(rows, -1, size).copy()
            unit_std, ratio = _unit_block(self.quant)
            _set_scales(raw, self.quant, gain / np.sqrt(cols) / unit_std, ratio)
            self.writer.add_tensor(name, raw.reshape(rows, -1), raw_dtype=self.quant)
            return
        w = (self.rng.standard_normal((rows, cols)) * gain / np.sqrt(cols)).astype(np.float32)
        if self.quant is None:
            self.writer.add_tensor(name, w)
        else:
            self.writer.add_tensor(name, gguf.quants.quantize(w, self.quant), raw_dtype=self.quant)

    def vector(self, name: str, n: int, mean: float, std: float) -> None:
        """An F32 vector [n] (norm weights, biases)."""
        self.writer.add_tensor(name, (mean + std * self.rng.standard_normal(n)).astype(np.float32))


def _metadata(w: gguf.GGUFWriter, spec: Spec, n_vocab: int, file_type: gguf.LlamaFileType) -> None:
    w.add_name("tiny")  # not the family: llama.cpp keys vocabulary quirks off it ("phi3" wants <s>, </s>, <unk>)
    w.add_context_length(spec.n_ctx_train)
    w.add_block_count(spec.n_layer)
    w.add_embedding_length(spec.n_embd)
    w.add_feed_forward_length(spec.n_ff)
    w.add_head_count(spec.n_head)
    w.add_head_count_kv(spec.n_head_kv)
    w.add_key_length(spec.head_dim)
    w.add_value_length(spec.head_dim)
    w.add_rope_dimension_count(spec.head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(n_vocab)
    w.add_file_type(file_type)
    if spec.sliding_window:
        w.add_sliding_window(spec.sliding_window)
    if spec.post_norms:  # transformers' Gemma2 defaults; written so llama.cpp reads the same
        w.add_attn_logit_softcapping(50.0)
        w.add_final_logit_softcapping(30.0)


def _tokenizer(w: gguf.GGUFWriter, n_vocab: int) -> int:
    tokens, merges, types = vocabulary()
    eos = len(tokens) - 1
    n_reserved = max(0, n_vocab - len(tokens))
    tokens += [f"<|reserved_special_token_{i}|>" for i in range(n_reserved)]
    types += [int(gguf.TokenType.CONTROL)] * n_reserved
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types(types)
    w.add_bos_token_id(eos)
    w.add_eos_token_id(eos)
    w.add_pad_token_id(eos)  # transformers' Phi3 default (32000) is outside this vocabulary
    w.add_add_bos_token(True)
    return len(tokens)


def _layer(t: _Weights, spec: Spec, i: int) -> None:
    d, q_width, kv_width = spec.n_embd, spec.n_head * spec.head_dim, spec.n_head_kv * spec.head_dim
    # q and k of std ~1.3: attention logits of std ~1.7 (qwen3: its QK norms of weight ~1.3 do that), peaked
    # enough to be far from uniform, not so peaked that Q8_0 activation noise flips them
    qk_gain = 1.0 if spec.qk_norm else 1.3
    t.vector(f"blk.{i}.attn_norm.weight", d, 1.0, 0.1)
    if spec.fused:
        # rows: q, then k, then v; scaled as one matrix, so v gets the q/k gain too
        t.matrix(f"blk.{i}.attn_qkv.weight", q_width + 2 * kv_width, d, qk_gain)
    else:
        t.matrix(f"blk.{i}.attn_q.weight", q_width, d, qk_gain)
        t.matrix(f"blk.{i}.attn_k.weight", kv_width, d, qk_gain)
        t.matrix(f"blk.{i}.attn_v.weight", kv_width, d, 1.0)
    if spec.qkv_bias:
        for name, n in (("attn_q", q_width), ("attn_k", kv_width), ("attn_v", kv_width)):
            t.vector(f"blk.{i}.{name}.bias", n, 0.0, 0.5)
    if spec.qk_norm:
        t.vector(f"blk.{i}.attn_q_norm.weight", spec.head_dim, 1.3, 0.1)
        t.vector(f"blk.{i}.attn_k_norm.weight", spec.head_dim, 1.3, 0.1)
    t.matrix(f"blk.{i}.attn_output.weight", d, q_width, 0.7)
    if spec.post_norms:
        t.vector(f"blk.{i}.post_attention_norm.weight", d, 1.0, 0.1)
    t.vector(f"blk.{i}.ffn_norm.weight", d, 1.0, 0.1)
    if spec.fused:
        t.matrix(f"blk.{i}.ffn_up.weight", 2 * spec.n_ff, d, 1.0)  # gate rows first, then up
    else:
        t.matrix(f"blk.{i}.ffn_gate.weight", spec.n_ff, d, 1.0)
        t.matrix(f"blk.{i}.ffn_up.weight", spec.n_ff, d, 1.0)
    t.matrix(f"blk.{i}.ffn_down.weight", d, spec.n_ff, 0.7)
    if spec.post_norms:
        t.vector(f"blk.{i}.post_ffw_norm.weight", d, 1.0, 0.1)


def write(arch: str | Spec, path: str | Path, seed: int = 0, f32: bool = False, quant: str = "q8_0",
          nan: bool = False) -> Path:
    """Write the model ``arch`` (a key of ``SPECS`` or ``BENCH_SPECS``, or a ``Spec``) to ``path``; the same
    seed gives the same file.

    ``quant``: the matrices' type, a key of ``QUANTS`` (norms and biases are F32); types other than ``ROUNDED``
    are drawn as random blocks.
    ``f32``: F32 matrices instead (the same weights before rounding). llama.cpp multiplies quantized matrices
    by activations it rounds to Q8_0, so only F32 weights let it agree with an fp32 reference to rounding.
    ``nan``: the final norm's weights are NaN (a broken model, for the error it must give); the rest unchanged.
    """
    specs = SPECS | BENCH_SPECS
    if not isinstance(arch, Spec) and arch not in specs:
        raise ValueError(f"no model for architecture {arch!r}; known: {', '.join(specs)}")
    if quant not in QUANTS:
        raise ValueError(f"no matrix type {quant!r}; known: {', '.join(QUANTS)}")
    spec, path = arch if isinstance(arch, Spec) else specs[arch], Path(path)
    if f32 and spec.random_blocks:
        raise ValueError("a spec with random_blocks has quantized matrices only")
    block = gguf.GGML_QUANT_SIZES[QUANTS[quant]][0]
    if not f32 and any(width % block for width in (spec.n_embd, spec.n_head * spec.head_dim, spec.n_ff)):
        raise ValueError(f"{quant} needs widths that are multiples of {block} (its block), "
                         f"got n_embd {spec.n_embd}, n_head * head_dim {spec.n_head * spec.head_dim}, n_ff {spec.n_ff}")
    w = gguf.GGUFWriter(str(path), spec.arch)
    n_vocab = _tokenizer(w, spec.n_vocab)
    _metadata(w, spec, n_vocab, gguf.LlamaFileType.ALL_F32 if f32 else FILE_TYPES[quant])
    t = _Weights(w, seed, None if f32 else QUANTS[quant], not f32 and (spec.random_blocks or quant not in ROUNDED))
    # the embedding's scale sets the logits' when tied (std ~4); Gemma multiplies it by sqrt(n_embd)
    embd_std = 4.0 / np.sqrt(spec.n_embd)
    t.matrix("token_embd.weight", n_vocab, spec.n_embd, embd_std * np.sqrt(spec.n_embd))
    for i in range(spec.n_layer):
        _layer(t, spec, i)
    t.vector("output_norm.weight", spec.n_embd, np.nan if nan else 1.0, 0.1)
    if not spec.tied:
        t.matrix("output.weight", n_vocab, spec.n_embd, 4.0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arch", choices=sorted(SPECS | BENCH_SPECS))
    parser.add_argument("out", type=Path, help="the GGUF file to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--type", choices=[*QUANTS, "f32"], default="q8_0", help="the matrices' type")
    parser.add_argument("--nan", action="store_true", help="NaN final-norm weights (a broken model)")
    args = parser.parse_args(argv)
    f32 = args.type == "f32"
    print(write(args.arch, args.out, args.seed, f32=f32, quant="q8_0" if f32 else args.type, nan=args.nan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
