"""Transcoder files of SAELens, circuit-tracer and Gemma Scope, laid out as their producers lay them out, loaded
into pyinterp's TranscoderSet; saving and loading again; one-line errors for bad files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pyinterp.circuit.transcoder import random_transcoders
from pyinterp.circuit.transcoder_io import load_transcoders, save_transcoders
from pyinterp.errors import InputError

D, F = 8, 24  # d_model, features


def rand(rng, *shape, scale=1.0):
    return torch.tensor(rng.normal(0, scale, shape), dtype=torch.float32)


def assert_close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32), rtol=tol, atol=tol)


def config_yaml(path: Path, text: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(text)
    return path


# SAELens: its own objects, saved by SAELens


@pytest.mark.parametrize("arch", ["transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder"])
def test_saelens_transcoders_match_saelens(tmp_path, arch):
    from sae_lens.saes.sae import SAEMetadata, get_sae_class

    cls, cfg_cls = get_sae_class(arch)
    rng = np.random.default_rng(0)
    saes = []
    for layer in range(3):
        meta = SAEMetadata(hook_name=f"blocks.{layer}.mlp.hook_in", hook_name_out=f"blocks.{layer}.hook_mlp_out")
        sae = cls(cfg_cls(d_in=D, d_sae=F, d_out=D, apply_b_dec_to_input=False, metadata=meta))
        with torch.no_grad():
            sae.W_enc.copy_(rand(rng, D, F))
            sae.b_enc.copy_(rand(rng, F))
            sae.W_dec.copy_(rand(rng, F, D))
            sae.b_dec.copy_(rand(rng, D))
            if "jumprelu" in arch:
                sae.threshold.copy_(torch.tensor(rng.uniform(0, 1, F), dtype=torch.float32))
            if "skip" in arch:
                sae.W_skip.copy_(rand(rng, D, D, scale=0.3))
        sae.save_model(tmp_path / f"{2 - layer}_{arch}")  # directory names do not give the layer
        saes.append(sae)
    ts = load_transcoders(tmp_path, n_layer=3, d_model=D)
    assert (ts.reads, ts.writes, ts.cross_layer) == ("ffn_norm", "ffn_term", False)
    x = rng.normal(0, 1, (6, D)).astype(np.float32)
    for layer, sae in enumerate(saes):
        tc = ts.layers[layer]
        assert tc.activation == ("jumprelu" if "jumprelu" in arch else "relu")
        with torch.no_grad():
            f_ref = sae.encode(torch.tensor(x)).numpy()
            y_ref = sae(torch.tensor(x)).numpy()
        f = tc.encode(x)
        assert (f > 0).sum() > 0 and (f == 0).sum() > 0
        assert_close(f, f_ref)
        features = [np.zeros((6, F), np.float32)] * 3
        features[layer] = f
        assert_close(ts.reconstruct(features, [x] * 3)[layer], y_ref)


def test_saelens_half_precision_and_gemma_scope_2_hooks(tmp_path):
    """A bfloat16 SAELens transcoder converted from Gemma Scope 2 (SAELens names its input ``hook_mlp_in``, its
    HF name the pre-FFN norm's output): read as stored, reading the MLP input."""
    from sae_lens import JumpReLUTranscoder, JumpReLUTranscoderConfig
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(hook_name="blocks.0.hook_mlp_in", hook_name_out="blocks.0.hook_mlp_out",
                       hf_hook_name="model.layers.0.pre_feedforward_layernorm.output",
                       hf_hook_name_out="model.layers.0.post_feedforward_layernorm.output")
    sae = JumpReLUTranscoder(JumpReLUTranscoderConfig(d_in=D, d_sae=F, d_out=D, dtype="bfloat16",
                                                      apply_b_dec_to_input=False, metadata=meta))
    rng = np.random.default_rng(1)
    with torch.no_grad():
        for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec):
            p.copy_(rand(rng, *p.shape))
        sae.threshold.copy_(torch.full((F,), 0.25))
    sae.save_model(tmp_path / "tc")
    ts = load_transcoders(tmp_path / "tc", n_layer=1)
    assert (ts.reads, ts.writes) == ("ffn_norm", "ffn_term")
    assert_close(ts.layers[0].W_dec, sae.W_dec.float().detach(), 0)
    x = rng.normal(0, 1, (5, D)).astype(np.float32)
    pre = x @ sae.W_enc.float().detach().numpy() + sae.b_enc.float().detach().numpy()
    assert_close(ts.layers[0].encode(x), np.where(pre > 0.25, pre, 0), 1e-4)
    cfg = json.loads((tmp_path / "tc" / "cfg.json").read_text())
    for key in ("hf_hook_name", "hf_hook_name_out"):
        del cfg["metadata"][key]
    (tmp_path / "tc" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=r"cfg.json: input hook 'blocks.0.hook_mlp_in' \(TransformerLens"):
        load_transcoders(tmp_path / "tc")


# circuit-tracer: per-layer files and config.yaml as its loader reads them


def ct_layer(rng, skip=False, jump=True, old=False):
    t = {"W_enc": rand(rng, F, D), "W_dec": rand(rng, F, D), "b_enc": rand(rng, F), "b_dec": rand(rng, D)}
    if jump:
        t["activation_function.threshold"] = torch.tensor(rng.uniform(0, 1, F), dtype=torch.float32)
    if skip:
        t["W_skip"] = rand(rng, D, D, scale=0.3)
    if old:
        t["W_dec"] = t["W_dec"].T.contiguous()  # June 2025: stored [d_model, d_tc]
    return t


def ct_reference(t, x, old=False):
    """circuit-tracer's SingleLayerTranscoder: F.linear encode, pre * (pre > t), decode, x @ W_skip.T."""
    n = {k: v.numpy() for k, v in t.items()}
    pre = x @ n["W_enc"].T + n["b_enc"]
    f = pre * (pre > n["activation_function.threshold"]) if "activation_function.threshold" in n else np.maximum(pre, 0)
    y = f @ (n["W_dec"].T if old else n["W_dec"]) + n["b_dec"]
    return f, y + (x @ n["W_skip"].T if "W_skip" in n else 0)


@pytest.mark.parametrize("skip", [False, True])
def test_circuit_tracer_transcoder_set(tmp_path, skip):
    rng = np.random.default_rng(2)
    files = [ct_layer(rng, skip=skip) for _ in range(3)]
    for i, t in enumerate(files):
        save_file(t, tmp_path / f"layer_{i}.safetensors")
    config_yaml(tmp_path, 'model_name: "google/gemma-2-2b"\nmodel_kind: transcoder_set\n'
                          'feature_input_hook: "mlp.hook_in"\nfeature_output_hook: "hook_mlp_out"\n')
    ts = load_transcoders(tmp_path, n_layer=3, d_model=D)
    x = rng.normal(0, 1, (7, D)).astype(np.float32)
    fs = [tc.encode(x) for tc in ts.layers]
    ys = ts.reconstruct(fs, [x] * 3)
    for i, t in enumerate(files):
        f_ref, y_ref = ct_reference(t, x)
        assert_close(fs[i], f_ref)
        assert_close(ys[i], y_ref)
        assert (ts.layers[i].W_skip is not None) == skip


def test_circuit_tracer_june_2025_config_bf16_and_topk(tmp_path):
    """The June 2025 config (a list of {layer, filepath}), its [d_model, d_tc] W_dec files in bfloat16, and the
    newer config's activation: relu / topk."""
    rng = np.random.default_rng(3)
    files = [ct_layer(rng, jump=False, old=True) for _ in range(2)]
    for i, t in enumerate(files):
        save_file({k: v.to(torch.bfloat16) for k, v in t.items()}, tmp_path / f"tc{i}.safetensors")
    entries = "".join(f'  - id: "x-{i}"\n    layer: {i}\n    filepath: "tc{i}.safetensors"\n' for i in (1, 0))
    config_yaml(tmp_path, f'model_name: "m"\nfeature_input_hook: "mlp.hook_in"\nfeature_output_hook: '
                          f'"mlp.hook_out"\ntranscoders:\n{entries}')
    ts = load_transcoders(tmp_path)
    assert (ts.n_layer, ts.writes) == (2, "ffn_out")
    x = rng.normal(0, 1, (4, D)).astype(np.float32)
    for i, t in enumerate(files):
        t = {k: v.to(torch.bfloat16).float() for k, v in t.items()}
        assert_close(ts.layers[i].encode(x), ct_reference(t, x, old=True)[0], 1e-4)
    text = (tmp_path / "config.yaml").read_text()
    (tmp_path / "config.yaml").write_text(text + "activation: topk\nk: 3\n")
    ts = load_transcoders(tmp_path)
    assert [tc.k for tc in ts.layers] == [3, 3] and ((ts.layers[0].encode(x) > 0).sum(1) <= 3).all()


def test_circuit_tracer_clt(tmp_path):
    """circuit-tracer's CLT directory: W_enc_{l} [d_tc, d_model] and W_dec_{l} [d_tc, n - l, d_model]."""
    rng = np.random.default_rng(4)
    n = 3
    enc, dec = [], []
    for i in range(n):
        enc.append({f"W_enc_{i}": rand(rng, F, D), f"b_enc_{i}": rand(rng, F), f"b_dec_{i}": rand(rng, D),
                    f"threshold_{i}": torch.tensor(rng.uniform(0, 1, F), dtype=torch.float32)})
        dec.append({f"W_dec_{i}": rand(rng, F, n - i, D)})
        save_file(enc[i], tmp_path / f"W_enc_{i}.safetensors")
        save_file(dec[i], tmp_path / f"W_dec_{i}.safetensors")
    config_yaml(tmp_path, "model_name: m\nmodel_kind: cross_layer_transcoder\nfeature_input_hook: mlp.hook_in\n"
                          "feature_output_hook: hook_mlp_out\n")
    ts = load_transcoders(tmp_path, n_layer=n, d_model=D)
    assert ts.cross_layer
    xs = [rng.normal(0, 1, (5, D)).astype(np.float32) for _ in range(n)]
    fs = [tc.encode(x) for tc, x in zip(ts.layers, xs)]
    ref_f = []
    for i in range(n):
        pre = xs[i] @ enc[i][f"W_enc_{i}"].numpy().T + enc[i][f"b_enc_{i}"].numpy()
        ref_f.append(pre * (pre > enc[i][f"threshold_{i}"].numpy()))
        assert_close(fs[i], ref_f[i])
    ys = ts.reconstruct(fs, xs)
    for m in range(n):
        y = enc[m][f"b_dec_{m}"].numpy() + sum(ref_f[s] @ dec[s][f"W_dec_{s}"].numpy()[:, m - s] for s in range(m + 1))
        assert_close(ys[m], y)


# Gemma Scope 1 and 2 as released


def test_gemma_scope_npz_reads_before_the_norm_weight(tmp_path):
    rng = np.random.default_rng(5)
    params = []
    for layer in range(2):
        p = {"W_enc": rng.normal(size=(D, F)), "W_dec": rng.normal(size=(F, D)), "b_enc": rng.normal(size=F),
             "b_dec": rng.normal(size=D), "threshold": rng.uniform(0, 1, F)}
        (tmp_path / f"layer_{layer}" / "width_16k" / "average_l0_7").mkdir(parents=True)
        np.savez(tmp_path / f"layer_{layer}" / "width_16k" / "average_l0_7" / "params.npz", **p)
        params.append(p)
    ts = load_transcoders(tmp_path, n_layer=2, d_model=D)
    assert (ts.reads, ts.writes) == ("ffn_norm_unweighted", "ffn_term")
    x_hat = rng.normal(0, 1, (4, D)).astype(np.float32)  # x / rms
    w = rng.uniform(0.5, 2.0, (2, D)).astype(np.float32)  # the norm weights: ffn_norm = x_hat * w
    folded = ts.fold_norm(list(w))
    assert folded.reads == "ffn_norm"
    for layer, p in enumerate(params):
        pre = x_hat @ p["W_enc"] + p["b_enc"]
        ref = np.where(pre > p["threshold"], pre, 0)
        assert_close(ts.layers[layer].encode(x_hat), ref, 1e-4)
        assert_close(folded.layers[layer].encode(x_hat * w[layer]), ref, 1e-4)


def gemma_scope_2_layer(rng, n_out=None, affine=False):
    p = {"w_enc": rand(rng, D, F), "b_enc": rand(rng, F), "b_dec": rand(rng, D),
         "w_dec": rand(rng, F, D) if n_out is None else rand(rng, F, n_out, D),
         "threshold": torch.tensor(rng.uniform(0, 1, F), dtype=torch.float32)}
    if affine:
        p["affine_skip_connection"] = rand(rng, D, D, scale=0.3)
    return p


def test_gemma_scope_2_transcoders(tmp_path):
    rng = np.random.default_rng(6)
    params = []
    for layer in range(2):
        folder = tmp_path / "transcoder_all" / f"layer_{layer}_width_16k_l0_big_affine"
        folder.mkdir(parents=True)
        params.append(gemma_scope_2_layer(rng, affine=True))
        save_file(params[-1], folder / "params.safetensors")
        (folder / "config.json").write_text(json.dumps({
            "architecture": "jump_relu", "model_name": "gemma-v3-270m-pt", "affine_connection": True,
            "hf_hook_point_in": f"model.layers.{layer}.pre_feedforward_layernorm.output",
            "hf_hook_point_out": f"model.layers.{layer}.post_feedforward_layernorm.output"}))
    ts = load_transcoders(tmp_path / "transcoder_all", n_layer=2, d_model=D)
    assert (ts.reads, ts.writes) == ("ffn_norm", "ffn_term")
    x = rng.normal(0, 1, (5, D)).astype(np.float32)
    fs = [tc.encode(x) for tc in ts.layers]
    for layer, (p, y) in enumerate(zip(params, ts.reconstruct(fs, [x, x]))):
        p = {k: v.numpy() for k, v in p.items()}
        pre = x @ p["w_enc"] + p["b_enc"]
        f = np.where(pre > p["threshold"], pre, 0)
        assert_close(fs[layer], f)
        assert_close(y, f @ p["w_dec"] + p["b_dec"] + x @ p["affine_skip_connection"])


def test_gemma_scope_2_clt_through_a_config(tmp_path):
    """circuit-tracer's Gemma Scope 2 CLT: per-layer files listed in config.yaml, w_dec [d_tc, n, d_model] of which
    layer l uses the outputs l.. ."""
    rng = np.random.default_rng(7)
    n, params = 3, []
    for layer in range(n):
        params.append(gemma_scope_2_layer(rng, n_out=n))
        save_file(params[-1], tmp_path / f"layer_{layer}.safetensors")
    listed = "".join(f"  - hf://google/gemma-scope-2-270m-pt/clt/w/layer_{i}.safetensors\n" for i in range(n))
    config_yaml(tmp_path, f"model_kind: cross_layer_transcoder\nfeature_input_hook: mlp.hook_in\n"
                          f"feature_output_hook: hook_mlp_out\ntranscoders:\n{listed}")
    ts = load_transcoders(tmp_path, n_layer=n)
    x = rng.normal(0, 1, (4, D)).astype(np.float32)
    fs = [tc.encode(x) for tc in ts.layers]
    ys = ts.reconstruct(fs, [x] * n)
    for m in range(n):
        y = params[m]["b_dec"].numpy() + sum(fs[s] @ params[s]["w_dec"].numpy()[:, m] for s in range(m + 1))
        assert_close(ys[m], y)


# saving and loading again


@pytest.mark.parametrize("kind", [dict(), dict(skip=True), dict(cross_layer=True), dict(cross_layer=True, skip=True),
                                  dict(activation="topk"), dict(activation="relu", cross_layer=True)])
def test_round_trip(tmp_path, kind):
    ts = random_transcoders(3, D, F, seed=8, **kind)
    save_transcoders(ts, tmp_path / "tc")
    back = load_transcoders(tmp_path / "tc", n_layer=3, d_model=D)
    assert (back.cross_layer, back.reads, back.writes) == (ts.cross_layer, ts.reads, ts.writes)
    for a, b in zip(ts.layers, back.layers):
        assert (a.activation, a.k) == (b.activation, b.k)
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "W_skip"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None and y is None) or np.array_equal(x, y), name


def test_saved_files_are_circuit_tracers(tmp_path):
    """What save_transcoders writes, read the way circuit-tracer's loaders read it, gives pyinterp's numbers."""
    from safetensors.torch import load_file

    ts = random_transcoders(2, D, F, seed=11, skip=True)
    save_transcoders(ts, tmp_path / "set")
    x = np.random.default_rng(12).normal(0, 1, (5, D)).astype(np.float32)
    fs = [tc.encode(x) for tc in ts.layers]
    for layer, y in enumerate(ts.reconstruct(fs, [x, x])):
        f_ref, y_ref = ct_reference(load_file(tmp_path / "set" / f"layer_{layer}.safetensors"), x)
        assert_close(fs[layer], f_ref)
        assert_close(y, y_ref)
    clt = random_transcoders(3, D, F, seed=13, cross_layer=True)
    save_transcoders(clt, tmp_path / "clt")
    W_dec = load_file(tmp_path / "clt" / "W_dec_1.safetensors")["W_dec_1"].numpy()
    W_enc = load_file(tmp_path / "clt" / "W_enc_1.safetensors")["W_enc_1"].numpy()
    assert W_dec.shape == (F, 2, D) and W_enc.shape == (F, D)
    assert_close(W_dec[:, 1], clt.layers[1].decoder(2), 0)
    assert_close(W_enc.T, clt.layers[1].W_enc, 0)


def test_round_trip_f16_and_hooks(tmp_path):
    ts = random_transcoders(2, D, F, seed=9, cross_layer=True, skip=True)
    ts = type(ts)(ts.layers, reads="ffn_norm_unweighted", writes="ffn_out")
    save_transcoders(ts, tmp_path, dtype="F16")
    back = load_transcoders(tmp_path)
    assert (back.reads, back.writes) == ("ffn_norm_unweighted", "ffn_out")
    assert_close(back.layers[0].W_dec, ts.layers[0].W_dec.astype(np.float16), 0)
    assert_close(back.layers[1].W_skip, ts.layers[1].W_skip.astype(np.float16), 0)
    with pytest.raises(InputError, match="holds other files"):
        save_transcoders(random_transcoders(2, D, F), tmp_path)  # a CLT's files are there


@pytest.mark.parametrize("hook, output, meaning, layer", [
    ("blocks.3.mlp.hook_in", False, "ffn_norm", 3), ("mlp.hook_in", False, "ffn_norm", None),
    ("blocks.2.ln2.hook_normalized", False, "ffn_norm_unweighted", 2), ("ffn_norm-7", False, "ffn_norm", 7),
    ("model.layers.4.pre_feedforward_layernorm.output", False, "ffn_norm", 4),
    ("blocks.3.hook_mlp_out", True, "ffn_term", 3), ("mlp.hook_out", True, "ffn_out", None),
    ("ffn_post_norm-1", True, "ffn_term", 1), ("ffn_out-0", True, "ffn_out", 0),
    ("model.layers.5.post_feedforward_layernorm.output", True, "ffn_term", 5),
    ("hook_resid_mid", False, None, None), ("blocks.1.hook_mlp_in", False, None, None),
    ("model.layers.1.post_attention_layernorm.output", False, None, None), ("hook_mlp_out", False, None, None),
    ("blocks.1.hook_resid_post", True, None, None), ("mlp.hook_in", True, None, None),
])
def test_hook_names(hook, output, meaning, layer):
    from pyinterp.circuit.transcoder_formats import hook_meaning

    if meaning is None:
        with pytest.raises(InputError) as e:
            hook_meaning(hook, output, "f.yaml")
        one_line(e, "f.yaml", repr(hook))
    else:
        assert hook_meaning(hook, output, "f.yaml") == (meaning, layer)


# bad files: one line each, naming the file


def one_line(excinfo, *words):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, message


def saved(tmp_path, **kind) -> Path:
    return save_transcoders(random_transcoders(3, D, F, seed=10, **kind), tmp_path / "tc")


def test_missing_layers_and_sizes(tmp_path):
    path = saved(tmp_path)
    with pytest.raises(InputError) as e:
        load_transcoders(path, n_layer=5)
    one_line(e, "no transcoder for layers 3, 4")
    with pytest.raises(InputError) as e:
        load_transcoders(path, n_layer=2)
    one_line(e, "layers [2]", "layer_2.safetensors")
    with pytest.raises(InputError) as e:
        load_transcoders(path, d_model=D + 1)
    one_line(e, "layer_0.safetensors", f"reads {D} values", f"d_model {D + 1}")
    (path / "layer_1.safetensors").unlink()
    with pytest.raises(InputError) as e:
        load_transcoders(path)
    one_line(e, "no layer_1.safetensors")


def test_bad_tensors(tmp_path):
    path = saved(tmp_path, skip=True)
    from pyinterp.io.safetensors_io import read_safetensors, write_safetensors
    t = read_safetensors(path / "layer_1.safetensors")
    write_safetensors(path / "layer_1.safetensors", {**t, "b_dec": t["b_dec"][:-1]})
    with pytest.raises(InputError) as e:
        load_transcoders(path)
    one_line(e, "layer_1.safetensors", "b_dec must be")
    bad = t["W_enc"].copy()
    bad[2, 3] = np.nan
    write_safetensors(path / "layer_1.safetensors", {**t, "W_enc": bad})
    with pytest.raises(InputError) as e:
        load_transcoders(path)
    one_line(e, "layer_1.safetensors", "NaN")
    write_safetensors(path / "layer_1.safetensors", {k: v for k, v in t.items() if k != "b_enc"})
    with pytest.raises(InputError) as e:
        load_transcoders(path)
    one_line(e, "layer_1.safetensors", "no tensor b_enc")
    write_safetensors(path / "layer_1.safetensors", {**t, "activation_function.threshold": -np.ones(F)})
    with pytest.raises(InputError) as e:
        load_transcoders(path)
    one_line(e, "layer_1.safetensors", "negative JumpReLU thresholds")
    (path / "layer_1.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError) as e:
        load_transcoders(path)
    one_line(e, "layer_1.safetensors")


@pytest.mark.parametrize("edit, words", [
    (lambda c: c.replace("mlp.hook_in", "hook_resid_mid"),
     ["config.yaml", "hook_resid_mid", "before the pre-MLP norm"]),
    (lambda c: c.replace("hook_mlp_out", "hook_attn_out"), ["config.yaml", "hook_attn_out", "MLP output"]),
    (lambda c: c.replace("transcoder_set", "sparse_autoencoder"), ["config.yaml", "model_kind 'sparse_autoencoder'"]),
    (lambda c: c + "activation: gelu\n", ["config.yaml", "activation 'gelu'"]),
    (lambda c: c + "transcoders: [layer_0.safetensors, missing.safetensors]\n", ["missing.safetensors"]),
    (lambda c: c + "transcoders: [hf://org/repo/x/layer_9.safetensors]\n", ["hf://org/repo", "does not download"]),
    (lambda c: "a: [unclosed\n" + c, ["config.yaml is not YAML"]),
    (lambda c: c.replace("feature_input_hook", "input"), ["config.yaml", "no feature_input_hook"]),
])
def test_bad_configs(tmp_path, edit, words):
    path = saved(tmp_path)
    config = path / "config.yaml"
    config.write_text(edit(config.read_text()))
    with pytest.raises(InputError) as e:
        load_transcoders(path)
    one_line(e, *words)


def test_bad_directories(tmp_path):
    with pytest.raises(InputError) as e:
        load_transcoders(tmp_path / "nowhere")
    one_line(e, "nowhere", "no such file")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "weights.bin").write_bytes(b"x")
    with pytest.raises(InputError) as e:
        load_transcoders(tmp_path / "empty")
    one_line(e, "empty", "no transcoders in a known layout")
    path = saved(tmp_path, cross_layer=True)
    (path / "config.yaml").unlink()
    with pytest.raises(InputError) as e:
        load_transcoders(path)
    one_line(e, "without its config.yaml")


def test_bad_saelens(tmp_path):
    from sae_lens import Transcoder, TranscoderConfig
    from sae_lens.saes.sae import SAEMetadata

    for layer, name in ((0, "a"), (0, "b")):
        meta = SAEMetadata(hook_name=f"blocks.{layer}.mlp.hook_in", hook_name_out=f"blocks.{layer}.hook_mlp_out")
        Transcoder(TranscoderConfig(d_in=D, d_sae=F, d_out=D, apply_b_dec_to_input=False,
                                    metadata=meta)).save_model(tmp_path / name)
    with pytest.raises(InputError) as e:
        load_transcoders(tmp_path)
    one_line(e, "two transcoders for layer 0", str(tmp_path / "a"), str(tmp_path / "b"))
    cfg = json.loads((tmp_path / "b" / "cfg.json").read_text())
    cfg["metadata"]["hook_name_out"] = "blocks.1.hook_mlp_out"
    (tmp_path / "b" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError) as e:
        load_transcoders(tmp_path / "b")
    one_line(e, "cfg.json", "layers [0, 1]")
    cfg["architecture"] = "gated"
    (tmp_path / "b" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError) as e:
        load_transcoders(tmp_path / "b")
    one_line(e, "cfg.json", "'gated' is not a SAELens transcoder")
    cfg = json.loads((tmp_path / "a" / "cfg.json").read_text())
    cfg["d_out"] = D + 2
    (tmp_path / "a" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError) as e:
        load_transcoders(tmp_path / "a")
    one_line(e, "sae_weights.safetensors", "d_out is 10")
