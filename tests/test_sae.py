"""Sparse autoencoders: the safetensors reader and writer against the safetensors package (transformers'
dependency, used here only), SAELens's cfg layouts, the encode/decode equations against a torch implementation
written here from SAELens's source, the hook-name mapping, and the features of a tiny model's activations."""

from __future__ import annotations

import json
import struct
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import pyinterp
from pyinterp import InputError
from pyinterp.analysis.sae import ARCHITECTURES, SAE, random_sae, sae_features, steer_features
from pyinterp.io.safetensors_io import read_safetensors, write_safetensors

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import tiny_gguf  # noqa: E402

TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


# the reference: SAELens's equations (sae_lens/saes/{standard,jumprelu,topk}_sae.py), in torch float64

def torch_encode(w: dict[str, torch.Tensor], x: torch.Tensor, architecture: str, k: int | None = None,
                 apply_b_dec_to_input: bool = True, rescale: bool = False) -> torch.Tensor:
    sae_in = x - w["b_dec"] * apply_b_dec_to_input
    hidden_pre = sae_in @ w["W_enc"] + w["b_enc"]
    if architecture == "standard":
        return torch.relu(hidden_pre)
    if architecture == "jumprelu":
        return torch.relu(hidden_pre) * (hidden_pre > w["threshold"]).to(hidden_pre)
    if rescale:
        hidden_pre = hidden_pre * w["W_dec"].norm(dim=-1)
    values, indices = torch.topk(hidden_pre, k=k, dim=-1)
    return torch.zeros_like(hidden_pre).scatter_(-1, indices, values.relu())


def torch_decode(w: dict[str, torch.Tensor], f: torch.Tensor, rescale: bool = False) -> torch.Tensor:
    if rescale:
        f = f / w["W_dec"].norm(dim=-1)
    return f @ w["W_dec"] + w["b_dec"]


def weights64(sae: SAE) -> dict[str, torch.Tensor]:
    names = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if sae.threshold is not None else [])
    return {n: torch.from_numpy(getattr(sae, n)).double() for n in names}


def write_sae_dir(path: Path, cfg: dict, tensors: dict[str, np.ndarray]) -> Path:
    """A SAELens directory written with the safetensors package."""
    path.mkdir(parents=True, exist_ok=True)
    save_file({n: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for n, v in tensors.items()},
              str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps(cfg))
    return path


def sae_tensors(rng, d_in: int, d_sae: int, jumprelu: bool = False) -> dict[str, np.ndarray]:
    t = {"W_enc": rng.normal(size=(d_in, d_sae)), "b_enc": rng.normal(size=d_sae),
         "W_dec": rng.normal(size=(d_sae, d_in)), "b_dec": rng.normal(size=d_in)}
    if jumprelu:
        t["threshold"] = rng.uniform(0, 1, d_sae)
    return {n: v.astype(np.float32) for n, v in t.items()}


# safetensors


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_safetensors_read_matches_the_package(tmp_path, dtype):
    rng = np.random.default_rng(0)
    tensors = {"a": torch.from_numpy(rng.normal(size=(3, 5)).astype(np.float32)).to(TORCH[dtype]),
               "b.bias": torch.from_numpy(rng.normal(size=7).astype(np.float32)).to(TORCH[dtype]),
               "c": torch.from_numpy(rng.normal(size=(2, 3, 4)).astype(np.float32)).to(TORCH[dtype])}
    save_file(tensors, str(tmp_path / "t.safetensors"), metadata={"note": "x"})
    got = read_safetensors(tmp_path / "t.safetensors")
    assert sorted(got) == sorted(tensors)
    for name, t in tensors.items():
        assert got[name].dtype == np.float32 and got[name].shape == tuple(t.shape)
        np.testing.assert_array_equal(got[name], t.float().numpy())


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_safetensors_write_is_read_by_the_package(tmp_path, dtype):
    rng = np.random.default_rng(1)
    # BF16 rounding: random values, a tie (0x3F808000 rounds to even 0x3F80), a tie that rounds up, overflow
    special = np.array([1.00390625, 1.01171875, 3.4e38, -0.0], dtype=np.float32)
    tensors = {"w": rng.normal(size=(4, 6)).astype(np.float32), "s": special, "e": np.zeros((0, 3), np.float32)}
    write_safetensors(tmp_path / "t.safetensors", tensors, dtype)
    got = load_file(str(tmp_path / "t.safetensors"))
    for name, v in tensors.items():
        assert got[name].dtype == TORCH[dtype]
        np.testing.assert_array_equal(got[name].float().numpy(), torch.from_numpy(v).to(TORCH[dtype]).float().numpy())
    (n,) = struct.unpack("<Q", (tmp_path / "t.safetensors").read_bytes()[:8])
    assert n % 8 == 0  # the header is padded, as the package pads it


def test_safetensors_errors(tmp_path):
    (tmp_path / "short").write_bytes(b"\x01\x00")
    with pytest.raises(pyinterp.InputError, match="not a safetensors file"):
        read_safetensors(tmp_path / "short")
    header = json.dumps({"x": {"dtype": "F64", "shape": [2], "data_offsets": [0, 16]}}).encode()
    (tmp_path / "f64").write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    with pytest.raises(pyinterp.InputError, match="F64; pyinterp reads F32, F16, BF16, I32, I64"):
        read_safetensors(tmp_path / "f64")
    header = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    (tmp_path / "cut").write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(pyinterp.InputError, match="do not fit"):
        read_safetensors(tmp_path / "cut")
    with pytest.raises(pyinterp.InputError, match="cannot read"):
        read_safetensors(tmp_path / "missing")


# files and cfg layouts


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_save_load_round_trip(tmp_path, architecture, dtype):
    sae = replace(random_sae(24, 40, architecture, seed=3, hook_name="blocks.1.attn.hook_z", k=5, dtype=dtype,
                             apply_b_dec_to_input=False, hook_z=True), model_name="gemma-2-2b")
    back = SAE.load(sae.save(tmp_path / "sae"))
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        a, b = getattr(sae, name), getattr(back, name)
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_array_equal(a, b)
    assert (back.architecture, back.k, back.hook_name, back.dtype, back.apply_b_dec_to_input, back.hook_z,
            back.model_name) == (architecture, sae.k, "blocks.1.attn.hook_z", dtype, False, True, "gemma-2-2b")
    # the weights file is the package's format, in the cfg's dtype
    stored = load_file(str(tmp_path / "sae" / "sae_weights.safetensors"))
    assert stored["W_enc"].dtype == TORCH[{"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[dtype]]
    np.testing.assert_array_equal(stored["W_dec"].float().numpy(), sae.W_dec)


def test_sae_lens_6_layout(tmp_path):
    t = sae_tensors(np.random.default_rng(0), 8, 16, jumprelu=True)
    cfg = {"architecture": "jumprelu", "d_in": 8, "d_sae": 16, "dtype": "torch.float32", "device": "cpu",
           "apply_b_dec_to_input": False, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"sae_lens_version": "6.18.0", "hook_name": "blocks.3.hook_resid_post", "model_name": "m"}}
    sae = SAE.load(write_sae_dir(tmp_path / "a", cfg, t))
    assert (sae.architecture, sae.hook_name, sae.apply_b_dec_to_input, sae.model_name) == \
           ("jumprelu", "blocks.3.hook_resid_post", False, "m")
    np.testing.assert_array_equal(sae.threshold, t["threshold"])


def test_sae_lens_pre_6_layout(tmp_path):
    """Before 6.0: hook_point, activation_fn_str 'topk' with activation_fn_kwargs.k (no architecture key),
    normalize_activations false, hook_z inferred from the hook name; an all-ones scaling_factor is dropped."""
    t = sae_tensors(np.random.default_rng(1), 8, 16) | {"scaling_factor": np.ones(16, np.float32)}
    cfg = {"d_in": 8, "d_sae": 16, "dtype": "float32", "hook_point": "blocks.2.attn.hook_z", "hook_point_layer": 2,
           "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 3}, "normalize_activations": False,
           "finetuning_scaling_factor": False, "sae_lens_training_version": "3.5.0"}
    sae = SAE.load(write_sae_dir(tmp_path / "a", cfg, t))
    assert (sae.architecture, sae.k, sae.hook_name, sae.hook_z, sae.apply_b_dec_to_input) == \
           ("topk", 3, "blocks.2.attn.hook_z", True, True)
    # no activation_fn: a standard (ReLU) SAE
    del cfg["activation_fn_str"], cfg["activation_fn_kwargs"]
    assert SAE.load(write_sae_dir(tmp_path / "b", cfg, t)).architecture == "standard"


def test_topk_rescale_by_decoder_norm(tmp_path):
    """rescale_acts_by_decoder_norm (folded at load) gives SAELens's rescaled equations."""
    rng = np.random.default_rng(2)
    t = sae_tensors(rng, 8, 32)
    t["W_dec"][5] = 0  # a dead feature: SAELens's pre * 0 never makes it fire
    cfg = {"architecture": "topk", "d_in": 8, "d_sae": 32, "dtype": "float32", "k": 4,
           "rescale_acts_by_decoder_norm": True, "metadata": {"sae_lens_version": "6.0.0", "hook_name": "l_out-1"}}
    sae = SAE.load(write_sae_dir(tmp_path / "a", cfg, t))
    x = rng.normal(size=(6, 8)).astype(np.float32) * 3
    w = {n: torch.from_numpy(v).double() for n, v in t.items()}
    f = torch_encode(w, torch.from_numpy(x).double(), "topk", k=4, rescale=True)
    np.testing.assert_allclose(sae.encode(x), f.numpy(), rtol=1e-4, atol=1e-4)
    assert np.all(sae.encode(x)[:, 5] == 0)
    # SAELens divides the dead feature's 0 by its decoder norm 0, and the NaN spreads to every output; pyinterp
    # (folded) adds nothing for it, as the reference does with that feature left out
    assert torch.isnan(torch_decode(w, f, rescale=True)).all()
    live = [i for i in range(32) if i != 5]
    want = torch_decode({"W_dec": w["W_dec"][live], "b_dec": w["b_dec"]}, f[:, live], rescale=True)
    np.testing.assert_allclose(sae.decode(sae.encode(x)), want.numpy(), rtol=1e-4, atol=1e-4)


def _cfg6(**changes):
    cfg = {"architecture": "standard", "d_in": 8, "d_sae": 16, "dtype": "float32", "normalize_activations": "none",
           "metadata": {"sae_lens_version": "6.1.0", "hook_name": "blocks.0.hook_resid_post"}}
    return cfg | changes


@pytest.mark.parametrize("cfg, tensors, message", [
    (_cfg6(normalize_activations="constant_norm_rescale"), {}, "normalize_activations 'constant_norm_rescale' is not supported"),
    (_cfg6(normalize_activations="expected_average_only_in"), {}, "normalize_activations 'expected_average_only_in'"),
    ({"d_in": 8, "d_sae": 16, "hook_name": "x", "normalize_activations": True}, {}, "'expected_average_only_in' is not supported"),
    (_cfg6(architecture="gated"), {}, "architecture 'gated' is not supported"),
    (_cfg6(architecture="jumprelu_transcoder"), {}, "architecture 'jumprelu_transcoder' is not supported"),
    (_cfg6(metadata={"sae_lens_version": "6.1.0", "hook_name": "h", "hook_head_index": 3}), {}, "hook_head_index 3"),
    ({"d_in": 8, "d_sae": 16, "hook_name": "x", "activation_fn_str": "tanh-relu"}, {}, "'tanh-relu' is not supported"),
    ({"d_in": 8, "d_sae": 16, "hook_name": "x", "activation_fn_str": "topk"}, {}, "'topk' is not supported.*k\\)"),
    (_cfg6(metadata={"sae_lens_version": "6.1.0"}), {}, "no hook_name"),
    (_cfg6(dtype="float64"), {}, "dtype 'float64' is not supported"),
    (_cfg6(architecture="topk"), {}, "topk SAE without k"),
    (_cfg6(architecture="topk", k=17), {}, "k in 1..d_sae"),
    (_cfg6(d_in=9), {}, "the cfg says d_in 9"),
    (_cfg6(architecture="jumprelu"), {}, r"has tensors \['W_dec', 'W_enc', 'b_dec', 'b_enc', 'threshold'\]"),
    (_cfg6(), {"b_gate": np.zeros(16, np.float32)}, "this file .*b_gate"),
    (_cfg6(), {"scaling_factor": np.full(16, 2, np.float32)}, "scaling_factor other than ones"),
    (_cfg6(), {"b_enc": np.zeros(15, np.float32)}, r"b_enc must be \[16\]"),
])
def test_unsupported_sae_files(tmp_path, cfg, tensors, message):
    t = sae_tensors(np.random.default_rng(0), 8, 16) | tensors
    with pytest.raises(pyinterp.InputError, match=message):
        SAE.load(write_sae_dir(tmp_path / "a", cfg, t))


def test_missing_sae_directory(tmp_path):
    with pytest.raises(pyinterp.InputError, match="an SAE is a SAELens directory"):
        SAE.load(tmp_path / "nothing")


# the equations


@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_encode_decode_match_torch(architecture, apply_b_dec):
    sae = random_sae(32, 96, architecture, seed=4, k=7, apply_b_dec_to_input=apply_b_dec)
    rng = np.random.default_rng(5)
    x = (rng.normal(size=(20, 32)) * 2).astype(np.float32)
    w = weights64(sae)
    want = torch_encode(w, torch.from_numpy(x).double(), architecture, k=7, apply_b_dec_to_input=apply_b_dec)
    f = sae.encode(x)
    assert f.shape == (20, 96) and f.dtype == np.float32
    np.testing.assert_allclose(f, want.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(f > 0, want.numpy() > 0)
    if architecture == "topk":
        assert np.all(np.count_nonzero(f, axis=1) <= 7)
    if architecture == "jumprelu":  # the threshold, not only the ReLU, decides: some positive pre-activations cut
        pre = (x - sae.b_dec * apply_b_dec) @ sae.W_enc + sae.b_enc
        assert np.sum((pre > 0) & (f == 0)) > 0 and np.sum(f > 0) > 0
    x_hat = sae.decode(f)
    assert x_hat.shape == (20, 32)
    np.testing.assert_allclose(x_hat, torch_decode(w, want).numpy(), rtol=1e-4, atol=1e-4)


def test_topk_keeps_negative_pre_activations_out():
    """TopK takes the k largest pre-activations and ReLUs them: with fewer than k positive, the rest are 0."""
    sae = replace(random_sae(4, 8, "topk", k=6), b_enc=np.array([1, 2, -1, -2, -3, -4, -5, -6], np.float32))
    x = sae.b_dec[None]  # the encoder's input is 0, so the pre-activations are b_enc
    want = torch_encode(weights64(sae), torch.from_numpy(x).double(), "topk", k=6)
    np.testing.assert_array_equal(sae.encode(x), want.numpy())
    np.testing.assert_array_equal(sae.encode(x), [[1, 2, 0, 0, 0, 0, 0, 0]])


def test_encode_decode_shape_errors():
    sae = random_sae(8, 16)
    with pytest.raises(pyinterp.InputError, match=r"SAE input must be \[n_tokens, 8\]"):
        sae.encode(np.zeros((3, 9)))
    with pytest.raises(pyinterp.InputError, match=r"SAE features must be \[n_tokens, 16\]"):
        sae.decode(np.zeros(16))


# on a model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tiny_gguf.write("llama", tmp_path_factory.mktemp("sae") / "llama.gguf", seed=0)
    with pyinterp.Model(path, n_ctx=64, n_threads=1) as model:
        yield model


@pytest.fixture(scope="module")
def tiny_gemma2(tmp_path_factory):
    path = tiny_gguf.write("gemma2", tmp_path_factory.mktemp("sae") / "gemma2.gguf", seed=0)
    with pyinterp.Model(path, n_ctx=64, n_threads=1) as model:
        yield model


# TransformerLens hook -> the llama.cpp tensor it is, per family, written out here
HOOKS = {
    "llama": [("blocks.2.hook_resid_post", ("l_out", 2)), ("blocks.2.hook_resid_pre", ("l_out", 1)),
              ("blocks.0.hook_resid_pre", ("embd", -1)), ("hook_embed", ("embd", -1)),
              ("blocks.1.hook_mlp_out", ("ffn_out", 1)), ("blocks.3.hook_attn_out", ("attn_out", 3)),
              ("blocks.1.hook_resid_mid", ("ffn_inp", 1)), ("l_out-3", ("l_out", 3))],
    "gemma2": [("blocks.0.hook_resid_pre", ("inp_scaled", -1)), ("blocks.1.hook_mlp_out", ("ffn_post_norm", 1)),
               ("blocks.2.hook_attn_out", ("attn_post_norm", 2)), ("blocks.3.hook_resid_pre", ("l_out", 2))],
}


@pytest.mark.parametrize("family", sorted(HOOKS))
def test_hook_names_map_to_tensors(request, family):
    model = request.getfixturevalue("tiny" if family == "llama" else "tiny_gemma2")
    for hook, want in HOOKS[family]:
        assert random_sae(model.n_embd, 16, hook_name=hook).hook_tensor(model) == want, hook


def test_hook_z_reads_the_heads_flattened(tiny):
    """attn.hook_z is the per-head attention output, [n_tokens, n_head, head_dim] flattened head-major."""
    spec = tiny_gguf.SPECS["llama"]
    sae = random_sae(spec.n_head * spec.head_dim, 64, "standard", seed=1, hook_name="blocks.1.attn.hook_z", hook_z=True)
    assert sae.hook_tensor(tiny) == ("kqv_heads", 1)
    got = sae_features(tiny, sae, "a b c", top_k=4)
    z = tiny.run("a b c", capture=["kqv_heads-1"]).act("kqv_heads", 1)
    assert z.shape == (len(got.tokens), spec.n_head, spec.head_dim)
    f = torch_encode(weights64(sae), torch.from_numpy(z).double().flatten(1), "standard")
    np.testing.assert_allclose(got.values[:, 0], f.max(dim=1).values.numpy(), rtol=1e-4)
    # without the hook_z flag, a [n_tokens, n_head, head_dim] tensor is refused
    with pytest.raises(pyinterp.InputError, match="only hook_z SAEs flatten"):
        random_sae(spec.n_head * spec.head_dim, 64, hook_name="blocks.1.attn.hook_z").hook_tensor(tiny)


def test_last_layer_encodes_every_token(tiny):
    """On the last layer llama.cpp keeps only the rows whose logits are wanted; an SAE there still encodes every
    token, as a numpy encode of the captured rows says."""
    last = tiny.n_layer - 1
    sae = random_sae(tiny.n_embd, 32, "standard", seed=2, hook_name=f"blocks.{last}.hook_resid_post")
    got = sae_features(tiny, sae, "a b c d", top_k=3)
    x = tiny.run("a b c d", capture=[f"l_out-{last}"]).act("l_out", last)
    assert got.values.shape[0] == len(got.tokens) == x.shape[0]
    f = torch_encode(weights64(sae), torch.from_numpy(x).double(), "standard")
    np.testing.assert_allclose(got.values[:, 0], f.max(dim=1).values.numpy(), rtol=1e-4)


def test_hook_errors(tiny):
    with pytest.raises(pyinterp.InputError, match=r"SAE hook 'blocks.2.hook_resid_post': the SAE reads 64 values per "
                                                  r"token but l_out-2's rows have 128"):
        random_sae(64, 16, hook_name="blocks.2.hook_resid_post").hook_tensor(tiny)
    with pytest.raises(pyinterp.InputError, match="SAE hook 'blocks.2.hook_nothing': unknown tensor name"):
        random_sae(128, 16, hook_name="blocks.2.hook_nothing").hook_tensor(tiny)
    with pytest.raises(pyinterp.InputError, match="layer 9 out of range"):
        random_sae(128, 16, hook_name="blocks.9.hook_resid_post").hook_tensor(tiny)
    with pytest.raises(pyinterp.InputError, match="names 4 tensors; give one layer"):
        random_sae(128, 16, hook_name="l_out").hook_tensor(tiny)
    with pytest.raises(pyinterp.InputError, match="top_k must be an integer in 1..16"):
        sae_features(tiny, random_sae(128, 16, hook_name="l_out-1"), "a", top_k=17)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_sae_features_match_torch_on_the_captured_activation(tiny, tmp_path, architecture):
    prompt = "The tiny model reads this"
    x = tiny.run(prompt, capture=["l_out-2"]).act("l_out", 2)
    # thresholds in the range of this activation's pre-activations, so JumpReLU cuts some and keeps some
    sae = random_sae(tiny.n_embd, 200, architecture, seed=6, hook_name="blocks.2.hook_resid_post", k=12)
    if architecture == "jumprelu":
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        sae = replace(sae, threshold=np.random.default_rng(7).uniform(0, np.percentile(pre, 95), 200).astype(np.float32))
    sae = SAE.load(sae.save(tmp_path / "sae"))

    got = sae_features(tiny, sae, prompt, top_k=20)
    w = weights64(sae)
    f = torch_encode(w, torch.from_numpy(x).double(), architecture, k=12)
    x_hat = torch_decode(w, f)
    xt = torch.from_numpy(x).double()
    n = len(got.tokens)
    assert got.tensor == "l_out-2" and got.ids.shape == got.values.shape == (n, 20)
    assert got.token_strs == [tiny.token_str(t) for t in got.tokens]
    values, ids = torch.topk(f, 20, dim=1)
    np.testing.assert_allclose(got.values, values.numpy(), rtol=1e-4, atol=1e-5)
    active = values.numpy() > 1e-4  # ids of clearly active features (ties among zeros have no order)
    np.testing.assert_array_equal(got.ids[active], ids.numpy()[active])
    assert np.all(got.ids[got.values == 0] == -1)
    np.testing.assert_array_equal(got.l0, (f > 0).sum(1).numpy())
    np.testing.assert_allclose(got.rel_error, ((xt - x_hat).norm(dim=1) / xt.norm(dim=1)).numpy(), rtol=1e-4)
    np.testing.assert_allclose(got.cosine, torch.cosine_similarity(xt, x_hat, dim=1).numpy(), rtol=1e-4)
    if architecture == "topk":
        assert np.all(got.l0 <= 12) and np.all(got.ids[:, 12:] == -1)
    else:
        assert got.l0.min() > 0 and np.any(got.l0 < 200)


@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "topk"])
def test_feature_edits_in_the_graph(tiny, architecture):
    """Editing features inside the graph equals patching every row with x + (f' - f) W_dec computed in numpy from
    the captured activation; multiplying features by 1, or clamping a silent feature to 0 (their own values),
    leaves the logits unchanged."""
    prompt = "The tiny model reads this"
    sae = random_sae(tiny.n_embd, 200, architecture, seed=8, hook_name="blocks.1.hook_resid_post", k=12)
    silent = 7
    sae.b_enc[silent] = -1e4  # never active: clamping it to 0 clamps it to every token's own value
    plain = tiny.run(prompt, capture=["l_out-1"])
    x = plain["l_out", 1]
    f = sae.encode(x)
    assert not f[:, silent].any()
    active = int(np.argmax((f > 0).sum(0)))
    own = steer_features(tiny, sae, prompt, {active: 1.0, 3: 1.0}, scale=True)
    np.testing.assert_allclose(own, plain.logits, atol=1e-4)
    np.testing.assert_allclose(steer_features(tiny, sae, prompt, {silent: 0.0}), plain.logits, atol=1e-4)

    edits = {active: 4.0, int(np.argmin((f > 0).sum(0))): 2.5}
    got = steer_features(tiny, sae, prompt, edits)
    edited = f.copy()
    for j, v in edits.items():
        edited[:, j] = v
    want_x = x + (edited - f) @ sae.W_dec
    patches = [("l_out", 1, pos, want_x[pos]) for pos in range(len(plain.tokens))]
    want = tiny.run(prompt, patch=patches).logits
    np.testing.assert_allclose(got, want, atol=2e-3)
    assert np.abs(got - plain.logits).max() > 1e-2


def test_feature_edit_errors(tiny):
    sae = random_sae(tiny.n_embd, 50, "standard", seed=9, hook_name="blocks.1.hook_resid_post")
    for edits, message in [({}, "non-empty"), ({50: 1.0}, "feature 50 out of range"), ({1: float("inf")}, "finite")]:
        with pytest.raises(InputError, match=message):
            steer_features(tiny, sae, "a b", edits)
