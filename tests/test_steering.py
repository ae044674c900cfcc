"""Steering with llama.cpp control vectors: the GGUF format, where llama.cpp adds a direction, the layer
range, generation, the combination with pyinterp's own interventions, contrastive activation addition
and the command line.

The reference adds the same directions with torch forward hooks on the decoder layers whose output
llama.cpp adds them to; for each steering the test compares the logits and the *change* the steering
causes, as test_faithfulness.py does for patching. The file format is checked against ``gguf``'s own
reader and writer and against ggml's C GGUF parser (the one llama-cli loads control vectors with).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cffi
import gguf
import numpy as np
import pytest

import pyinterp
from conftest import corr, cosine
from pyinterp import ControlVector, InputError
from pyinterp.engine._ffi import LIB_DIR, shared_library
from pyinterp.cli import main
from pyinterp.analysis.steering import contrastive, for_model, steered

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import tiny_gguf  # noqa: E402

POSITIVE = ["I love this, it is wonderful and makes me so happy.", "What a great day, everything is perfect!",
            "She smiled warmly, full of joy."]
NEGATIVE = ["I hate this, it is awful and makes me so sad.", "What a terrible day, everything is ruined!",
            "She frowned coldly, full of sorrow."]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-steering")


@pytest.fixture(scope="session", params=sorted(tiny_gguf.SPECS))
def tiny(request, tiny_dir):
    """(model, reference) of each tiny architecture (scripts/tiny_gguf.py), on one thread."""
    import torch
    from reference import Reference

    path = tiny_gguf.write(request.param, tiny_dir / f"{request.param}.gguf", seed=0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with pyinterp.Model(path, n_ctx=64, n_threads=1) as model:
        yield model, Reference(path)
    torch.set_num_threads(before)


def _ids(model, length: int = 12, seed: int = 1) -> list[int]:
    rng = np.random.default_rng(seed)
    return model.tokenize("", add_bos=True) + rng.integers(0, model.n_vocab - 1, size=length - 1).tolist()


def _random_cv(model, seed: int = 0, size: float = 0.5) -> ControlVector:
    """A random direction for every layer 1.., each ``size`` times the mean residual norm after that layer."""
    rng = np.random.default_rng(seed)
    resid = model.run(_ids(model), capture=["l_out"]).stack("l_out")  # [n_layer, n_tokens, n_embd]
    norms = np.linalg.norm(resid, axis=-1).mean(-1)
    vectors = {}
    for il in range(1, model.n_layer):
        v = rng.standard_normal(model.n_embd)
        vectors[il] = (v / np.linalg.norm(v) * norms[il] * size).astype(np.float32)
    return ControlVector.from_layers(vectors, model.arch)


# the file


def test_round_trip_is_bit_exact(tmp_path):
    rng = np.random.default_rng(0)
    directions = np.zeros((9, 64), dtype=np.float32)
    for il in (1, 3, 8):
        directions[il] = rng.standard_normal(64).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 64)
    directions[3, :4] = [-0.0, np.float32(1e-45), np.finfo(np.float32).max, np.float32(np.pi)]
    cv = ControlVector(directions, (1, 3, 8), "llama")
    path = cv.save(tmp_path / "cv.gguf")

    back = ControlVector.load(path)
    assert back.layers == (1, 3, 8) and back.model_hint == "llama"
    assert back.directions.view(np.uint32)[[1, 3, 8]].tobytes() == directions.view(np.uint32)[[1, 3, 8]].tobytes()

    # what gguf's own reader finds: llama-cvector-generator's keys and tensors
    reader = gguf.GGUFReader(path)
    assert reader.get_field("general.architecture").contents() == "controlvector"
    assert reader.get_field("controlvector.model_hint").contents() == "llama"
    assert reader.get_field("controlvector.layer_count").contents() == 3
    assert [t.name for t in reader.tensors] == ["direction.1", "direction.3", "direction.8"]
    for t in reader.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and t.shape.tolist() == [64]
        assert np.array_equal(np.asarray(t.data).view(np.uint32), directions[int(t.name[10:])].view(np.uint32))


GGML_API = """
    struct ggml_context; struct gguf_context; struct ggml_tensor;
    struct gguf_init_params { bool no_alloc; struct ggml_context ** ctx; };
    struct gguf_context * gguf_init_from_file(const char * fname, struct gguf_init_params params);
    void gguf_free(struct gguf_context * ctx);
    void ggml_free(struct ggml_context * ctx);
    int64_t gguf_find_key(const struct gguf_context * ctx, const char * key);
    const char * gguf_get_val_str(const struct gguf_context * ctx, int64_t key_id);
    int64_t gguf_get_n_tensors(const struct gguf_context * ctx);
    const char * gguf_get_tensor_name(const struct gguf_context * ctx, int64_t tensor_id);
    struct ggml_tensor * ggml_get_tensor(struct ggml_context * ctx, const char * name);
    int ggml_n_dims(const struct ggml_tensor * tensor);
    int64_t ggml_nelements(const struct ggml_tensor * tensor);
    float * ggml_get_data_f32(const struct ggml_tensor * tensor);
"""


def test_ggml_reads_our_file(tmp_path):
    """ggml's C GGUF parser, driven the way llama.cpp's common_control_vector_load_one drives it."""
    ffi = cffi.FFI()
    ffi.cdef(GGML_API)
    ggml = ffi.dlopen(str(LIB_DIR / shared_library("ggml-base")))
    rng = np.random.default_rng(1)
    cv = ControlVector.from_layers({il: rng.standard_normal(32).astype(np.float32) for il in (2, 5)}, "qwen2")
    path = cv.save(tmp_path / "cv.gguf")

    ctx = ffi.new("struct ggml_context **")
    params = ffi.new("struct gguf_init_params *", {"no_alloc": False, "ctx": ctx})
    g = ggml.gguf_init_from_file(str(path).encode(), params[0])
    assert g != ffi.NULL
    try:
        for key, value in (("general.architecture", "controlvector"), ("controlvector.model_hint", "qwen2")):
            assert ffi.string(ggml.gguf_get_val_str(g, ggml.gguf_find_key(g, key.encode()))).decode() == value
        seen = {}
        for i in range(ggml.gguf_get_n_tensors(g)):
            name = ffi.string(ggml.gguf_get_tensor_name(g, i))
            t = ggml.ggml_get_tensor(ctx[0], name)
            assert ggml.ggml_n_dims(t) == 1 and ggml.ggml_nelements(t) == 32
            seen[name.decode()] = np.frombuffer(ffi.buffer(ggml.ggml_get_data_f32(t), 32 * 4), dtype=np.float32).copy()
    finally:
        ggml.gguf_free(g)
        ggml.ggml_free(ctx[0])
    assert sorted(seen) == ["direction.2", "direction.5"]
    for il in (2, 5):
        assert np.array_equal(seen[f"direction.{il}"], cv.directions[il])


def _write(path: Path, tensors: dict[str, np.ndarray], arch: str = "controlvector", hint: str | None = "llama") -> Path:
    """A file written with gguf directly (not through pyinterp), tensors in the order given."""
    writer = gguf.GGUFWriter(path, arch)
    if hint is not None:
        writer.add_string(f"{arch}.model_hint", hint)
    writer.add_int32(f"{arch}.layer_count", len(tensors))
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_reads_a_file_written_with_gguf(tmp_path):
    rng = np.random.default_rng(2)
    a, b, c = (rng.standard_normal(16).astype(np.float32) for _ in range(3))
    # out of order, and two tensors for layer 3 ("03" is layer 3 to llama.cpp's stoi too): summed
    path = _write(tmp_path / "x.gguf", {"direction.4": a, "direction.3": b, "direction.03": c})
    cv = ControlVector.load(path, scale=0.5)
    assert cv.layers == (3, 4) and cv.model_hint == "llama" and cv.directions.shape == (5, 16)
    np.testing.assert_allclose(cv.directions[4], a * 0.5, rtol=1e-7)
    np.testing.assert_allclose(cv.directions[3], (b + c) * np.float32(0.5), rtol=1e-6)
    assert not cv.directions[:3].any()
    assert ControlVector.load(_write(tmp_path / "y.gguf", {"direction.1": a}, hint=None)).model_hint == ""


def test_combine_sums_scaled_files(tmp_path):
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((2, 16)).astype(np.float32)
    fa = _write(tmp_path / "a.gguf", {"direction.1": a, "direction.2": a})
    fb = _write(tmp_path / "b.gguf", {"direction.2": b, "direction.5": b})
    cv = pyinterp.analysis.steering.combine([(fa, 2.0), fb])
    assert cv.layers == (1, 2, 5)
    np.testing.assert_allclose(cv.directions[[1, 2, 5]], [2 * a, 2 * a + b, b], rtol=1e-6)
    np.testing.assert_allclose((cv * -1.0 + cv).directions, 0.0)


@pytest.mark.parametrize("tensors, arch, message", [
    ({"direction.0": np.ones(8, np.float32)}, "controlvector", "'direction.0' is not a direction.L with L >= 1"),
    ({"dir.1": np.ones(8, np.float32)}, "controlvector", "'dir.1' is not a direction.L"),
    ({"direction.1": np.ones(8, np.float16)}, "controlvector", "direction.1 must be a 1-D F32 tensor, got F16"),
    ({"direction.1": np.ones((2, 8), np.float32)}, "controlvector", "must be a 1-D F32 tensor, got F32 of shape [2, 8]"),
    ({"direction.1": np.ones(8, np.float32), "direction.2": np.ones(4, np.float32)}, "controlvector",
     "direction tensors of different widths [4, 8]"),
    ({}, "controlvector", "holds no direction tensors"),
    ({"direction.1": np.ones(8, np.float32)}, "llama", "is not a control vector (general.architecture is 'llama'"),
])
def test_bad_files(tmp_path, tensors, arch, message):
    path = _write(tmp_path / "bad.gguf", tensors, arch)
    with pytest.raises(InputError) as e:
        ControlVector.load(path)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_missing_and_non_gguf_files(tmp_path):
    with pytest.raises(InputError, match="cannot read control vector .*nope.gguf: No such file"):
        ControlVector.load(tmp_path / "nope.gguf")
    (tmp_path / "text.gguf").write_text("direction.1 = [1, 2, 3]\n")
    with pytest.raises(InputError, match="text.gguf is not a GGUF file"):
        ControlVector.load(tmp_path / "text.gguf")


# in the graph


def test_direction_l_is_added_to_l_out_of_layer_l(tiny):
    """Steering one layer L: every row of l_out-L moves by exactly the direction, earlier layers not at all."""
    model, _ = tiny
    ids = _ids(model)
    base = model.run(ids, capture=["l_out"]).stack("l_out")
    cv = _random_cv(model)
    for layer in range(1, model.n_layer):
        with steered(model, cv, layers=(layer, layer)):
            got = model.run(ids, capture=["l_out"]).stack("l_out")
        np.testing.assert_array_equal(got[:layer], base[:layer])
        np.testing.assert_allclose(got[layer] - base[layer], np.broadcast_to(cv.directions[layer], base[layer].shape),
                                   atol=1e-5 * np.abs(base[layer]).max())
    with steered(model, cv, layers=(0, 0)):  # llama.cpp never steers layer 0
        np.testing.assert_array_equal(model.run(ids, capture=["l_out"]).stack("l_out"), base)


def test_scale_zero_and_leaving_the_block_change_nothing(tiny):
    model, _ = tiny
    ids = _ids(model)
    base = model.run(ids).logits
    cv = _random_cv(model)
    with steered(model, cv, scale=0.0):
        np.testing.assert_array_equal(model.run(ids).logits, base)
    with steered(model, cv):
        assert np.abs(model.run(ids).logits - base).max() > 1e-2
    np.testing.assert_array_equal(model.run(ids).logits, base)


def test_layer_range_is_respected(tiny):
    """Directions outside the range change nothing: the same logits as a vector holding only the range's layers."""
    model, _ = tiny
    ids = _ids(model)
    base = model.run(ids, capture=["l_out"]).stack("l_out")
    cv = _random_cv(model)
    start, end = 2, model.n_layer - 1
    with steered(model, cv, layers=(start, end)):
        ranged = model.run(ids, capture=["l_out"])
    only = ControlVector.from_layers({il: cv.directions[il] for il in range(start, end + 1)}, model.arch)
    with steered(model, only):
        np.testing.assert_array_equal(model.run(ids).logits, ranged.logits)
    np.testing.assert_array_equal(ranged.stack("l_out")[:start], base[:start])
    assert np.abs(ranged.logits - model.run(ids).logits).max() > 1e-2


def test_generation_is_steered_at_every_token(tiny):
    """Greedy generation under a control vector equals greedy decoding by full steered runs, token by token."""
    model, _ = tiny
    ids = _ids(model, 6)
    cv = _random_cv(model, seed=0, size=1.0)
    with steered(model, cv):
        gen = model.generate(ids, 5, stop_at_eog=False)
        want = []
        for _ in range(5):
            want.append(int(np.argmax(model.run(ids + want).logits[-1])))
    assert gen.tokens == want
    assert model.generate(ids, 5, stop_at_eog=False).tokens != want


def test_against_the_reference_tiny(tiny):
    model, ref = tiny
    ids = _ids(model)
    base, want_base = model.run(ids).logits[-1], ref.run(ids).logits[-1]
    cv = _random_cv(model, seed=5)
    for layers in [(1, 1), (model.n_layer // 2, model.n_layer - 1), (1, model.n_layer - 1)]:
        with steered(model, cv, layers=layers):
            got = model.run(ids).logits[-1]
        want = ref.run(ids, steer={il: cv.directions[il] for il in range(layers[0], layers[1] + 1)}).logits[-1]
        assert corr(got, want) >= 0.995, layers
        assert np.abs(got - base).max() > 1e-2, layers
        assert corr(got - base, want - want_base) >= 0.75, layers


@pytest.fixture(scope="module")
def caa(smollm2):
    """A contrastive (happy - sad) vector of SmolLM2."""
    return contrastive(smollm2, POSITIVE, NEGATIVE)


@pytest.mark.parametrize("layers, scale", [((10, 10), 1.0), ((5, 15), 0.3), ((1, 29), 0.2), ((20, 20), 2.0)])
def test_against_the_reference_smollm2(smollm2, ref_smollm2, caa, layers, scale):
    ids = smollm2.tokenize("The weather today is")
    base, want_base = smollm2.run(ids).logits[-1], ref_smollm2.run(ids).logits[-1]
    with steered(smollm2, caa, scale=scale, layers=layers) as applied:
        got = smollm2.run(ids).logits[-1]
    d = for_model(applied, smollm2)
    want = ref_smollm2.run(ids, steer={il: d[il] for il in range(layers[0], layers[1] + 1)}).logits[-1]
    # quantized weights: near ties at the top move with the CPU variant's rounding (3468 against 216 on a zen4
    # variant at layers 1-29, scale 0.2), so the reference's top token is among ours, not necessarily first
    assert np.argmax(want) in np.argsort(-got)[:3]
    assert corr(got, want) >= 0.995
    assert np.abs(got - base).max() > 1.0
    assert corr(got - base, want - want_base) >= 0.75


@pytest.mark.parametrize("layers, scale", [((10, 10), 1.0), ((1, 29), 0.2)])
def test_against_the_reference_on_f32_weights(smollm2_f32, ref_smollm2, caa, layers, scale):
    """The same steering on SmolLM2's F32 twin: the reference's numbers to float rounding."""
    ids = smollm2_f32.tokenize("The weather today is")
    base, want_base = smollm2_f32.run(ids).logits[-1], ref_smollm2.run(ids).logits[-1]
    with steered(smollm2_f32, caa, scale=scale, layers=layers) as applied:
        got = smollm2_f32.run(ids).logits[-1]
    d = for_model(applied, smollm2_f32)
    want = ref_smollm2.run(ids, steer={il: d[il] for il in range(layers[0], layers[1] + 1)}).logits[-1]
    assert np.argmax(got) == np.argmax(want)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-3 * np.abs(want).max())
    assert corr(got - base, want - want_base) >= 0.999


def test_with_ablation_patching_and_captures(smollm2, ref_smollm2, caa):
    """A control vector and pyinterp's hook in one run: the patch of a steered l_out row wins (it replaces the
    named tensor, which already holds the direction), and the whole agrees with the reference."""
    clean = smollm2.tokenize("The Eiffel Tower is located in the city of")
    ids = smollm2.tokenize("The Colosseum is located in the city of")
    row = smollm2.run(clean, capture=["l_out-8"]).act("l_out", 8)[3]
    base, want_base = smollm2.run(ids).logits[-1], ref_smollm2.run(ids).logits[-1]
    layers, ablate, patch = (5, 15), [(3, 4), (12, 1)], [("l_out", 8, 3, row)]
    with steered(smollm2, caa, scale=0.3, layers=layers) as applied:
        trace = smollm2.run(ids, capture=["l_out", "attn_scores-12"], ablate=ablate, patch=patch)
    d = for_model(applied, smollm2)
    want = ref_smollm2.run(ids, ablate=ablate, patch=[(8, 3, row)],
                           steer={il: d[il] for il in range(layers[0], layers[1] + 1)})
    np.testing.assert_array_equal(trace.act("l_out", 8)[3], row)
    assert np.all(trace.attention(12)[1] == 0)
    assert corr(trace.logits[-1], want.logits[-1]) >= 0.995
    assert corr(trace.logits[-1] - base, want.logits[-1] - want_base) >= 0.75
    cos = [cosine(trace.act("l_out", il), want.l_out[il]).min() for il in range(smollm2.n_layer)]
    assert min(cos) >= 0.99, np.round(cos, 4)


def test_steering_errors(tiny, tmp_path):
    model, _ = tiny
    cv = _random_cv(model)
    wide = ControlVector.from_layers({1: np.ones(model.n_embd + 32, np.float32)}, model.arch)
    other = ControlVector(cv.directions, cv.layers, "mamba")
    deep = ControlVector.from_layers({model.n_layer: np.ones(model.n_embd, np.float32)}, model.arch)
    for bad, message in [((wide, None), f"has n_embd {model.n_embd + 32}, the model {model.n_embd}"),
                         ((other, None), f"was made for mamba, the model is {model.arch}"),
                         ((deep, None), f"direction for layer {model.n_layer}, the model has {model.n_layer} layers"),
                         ((cv, (2, 1)), "bad layer range 2..1"),
                         ((cv, (1, model.n_layer)), f"bad layer range 1..{model.n_layer}"),
                         (([], None), "no control vector given")]:
        with pytest.raises(InputError) as e:
            with steered(model, bad[0], layers=bad[1]):
                pass
        assert message in str(e.value) and "\n" not in str(e.value)
    with steered(model, cv):
        with pytest.raises(InputError, match="logit attribution under a control vector"):
            model.logit_attribution(_ids(model))
        with pytest.raises(InputError, match="steered blocks do not nest"):
            with steered(model, cv):
                pass
        steered_logits = model.run(_ids(model)).logits
    with steered(model, cv):  # the failed inner block left the outer one as it was
        np.testing.assert_array_equal(model.run(_ids(model)).logits, steered_logits)


# contrastive activation addition


def _residuals(model, prompts, layers):
    """[n_prompts, n_layers, n_tokens_i, n_embd] per prompt, from plain captures."""
    return [model.run(p, capture=["l_out"]).stack("l_out")[layers] for p in prompts]


def test_contrastive_equals_numpy(smollm2):
    layers = list(range(1, smollm2.n_layer))
    pos, neg = _residuals(smollm2, POSITIVE, layers), _residuals(smollm2, NEGATIVE, layers)

    last = np.stack([p[:, -1].astype(np.float64) - n[:, -1] for p, n in zip(pos, neg)])  # [pair, layer, n_embd]
    cv = contrastive(smollm2, POSITIVE, NEGATIVE)
    assert cv.layers == tuple(layers) and cv.model_hint == "llama" and not cv.directions[0].any()
    np.testing.assert_allclose(cv.directions[1:], last.mean(0), rtol=1e-5, atol=1e-5)

    n_bos = len(smollm2.tokenize(""))
    means = np.stack([p[:, n_bos:].mean(1, dtype=np.float64) - n[:, n_bos:].mean(1) for p, n in zip(pos, neg)])
    cv = contrastive(smollm2, POSITIVE, NEGATIVE, tokens="mean", layers=[4, 20])
    assert cv.layers == (4, 20)
    np.testing.assert_allclose(cv.directions[[4, 20]], means.mean(0)[[3, 19]], rtol=1e-5, atol=1e-5)

    # pca: the leading eigenvector of the uncentered second moment, times the mean projection on it
    cv = contrastive(smollm2, POSITIVE, NEGATIVE, method="pca")
    for il in (1, 15, 29):
        d = last[:, il - 1]
        u = np.linalg.eigh(d.T @ d)[1][:, -1]
        np.testing.assert_allclose(cv.directions[il], (d @ u).mean() * u, rtol=1e-4, atol=1e-4)


def test_contrastive_errors(tiny):
    model, _ = tiny
    for kwargs, message in [(dict(positives=["a"], negatives=["b", "c"]), "1 positive and 2 negative prompts"),
                            (dict(positives=[], negatives=[]), "no prompt pairs"),
                            (dict(positives=["a"], negatives=["b"], layers=[0]), "layers must be in 1.."),
                            (dict(positives=["a"], negatives=["b"], method="svd"), "method must be one of mean, pca"),
                            (dict(positives=["a"], negatives=["b"], tokens="first"), "tokens must be one of last, mean")]:
        with pytest.raises(InputError, match=message):
            contrastive(model, **kwargs)


# the command line


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _next_token(logits: np.ndarray) -> tuple[int, float]:
    x = logits.astype(np.float64)
    p = np.exp(x - x.max())
    return int(np.argmax(x)), float(p.max() / p.sum())


def test_cli_control_vectors(capsys, tmp_path, tiny):
    model, _ = tiny
    ids = _ids(model, 6)
    prompt = model.detokenize(ids[1:])
    ids = model.tokenize(prompt)
    cv = _random_cv(model)
    a = cv.save(tmp_path / "a.gguf")
    b = (cv * -0.25).save(tmp_path / "b.gguf")
    common = ["-m", str(model.path), "-c", "64", "--no-escape", "-p", prompt, "--json"]

    code, out, err = run_cli(capsys, *common, "--control-vector", f"{a},{b}")
    assert code == 0, err
    data = json.loads(out)
    with steered(model, [a, b]):
        want_id, want_p = _next_token(model.run(ids).logits[-1])
    assert data["next_token"][0]["id"] == want_id and data["next_token"][0]["p"] == pytest.approx(want_p, rel=1e-5)
    assert data["control_vector"]["layer_range"] == [1, model.n_layer - 1]
    assert data["interventions"] == [{"kind": "control_vector", "files": [{"file": str(a), "scale": 1.0},
                                                                          {"file": str(b), "scale": 1.0}],
                                      "layer_range": [1, model.n_layer - 1],
                                      "text": f"add control vectors {a} x 1, {b} x 1 at layers 1..{model.n_layer - 1}"}]

    code, out, err = run_cli(capsys, *common, "-n", "3", "--control-vector-scaled", f"{a}:2.0",
                             "--control-vector-scaled", f"{b}:-1", "--control-vector-layer-range", "2", "0")
    assert code == 0, err
    with steered(model, [(a, 2.0), (b, -1.0)], layers=(2, model.n_layer - 1)):
        gen = model.generate(ids, 3)
    assert json.loads(out)["generated"]["tokens"] == gen.tokens


def test_cli_errors(capsys, tmp_path, tiny):
    model, _ = tiny
    good = _random_cv(model).save(tmp_path / "good.gguf")
    wide = ControlVector.from_layers({1: np.ones(model.n_embd + 32, np.float32)}).save(tmp_path / "wide.gguf")
    base = ["-m", str(model.path), "-c", "64", "-p", "hello"]
    for args, code, message in [
        (["--control-vector", str(tmp_path / "nope.gguf")], 2, "cannot read control vector"),
        (["--control-vector", str(model.path)], 2, "is not a control vector"),
        (["--control-vector", str(wide)], 2, f"has n_embd {model.n_embd + 32}, the model {model.n_embd}"),
        (["--control-vector-scaled", f"{good}:x"], 2, "expected FNAME:SCALE"),
        (["--control-vector-scaled", str(good)], 2, "expected FNAME:SCALE"),
        (["--control-vector", str(good), "--control-vector-layer-range", "3", "2"], 2, "bad layer range 3..2"),
        (["--control-vector-layer-range", "1", "2"], 2, "--control-vector-layer-range goes with --control-vector"),
    ]:
        got, out, err = run_cli(capsys, *base, *args)
        assert got == code and err.startswith("pyinterp: error: ") and err.count("\n") == 1, (args, err)
        assert message in err, (args, err)


def test_cli_cvector(capsys, tmp_path, tiny):
    model, _ = tiny
    pos, neg = tmp_path / "pos.txt", tmp_path / "neg.txt"
    pos.write_text("I love it\\nso much\n\nGreat and happy\n")  # escapes expanded, empty lines skipped
    neg.write_text("I hate it\nAwful and sad\n")
    out_file = tmp_path / "out.gguf"
    code, out, err = run_cli(capsys, "cvector", "-m", str(model.path), "-c", "64", "--positive-file", str(pos),
                             "--negative-file", str(neg), "-o", str(out_file), "--method", "pca", "--json")
    assert code == 0, err
    assert json.loads(out)["layers"] == list(range(1, model.n_layer))
    want = contrastive(model, ["I love it\nso much", "Great and happy"], ["I hate it", "Awful and sad"], method="pca")
    got = ControlVector.load(out_file)
    assert got.layers == want.layers and got.model_hint == model.arch
    np.testing.assert_allclose(got.directions, want.directions, rtol=1e-5, atol=1e-6)

    neg.write_text("I hate it\n")
    code, out, err = run_cli(capsys, "cvector", "-m", str(model.path), "-c", "64", "--positive-file", str(pos),
                             "--negative-file", str(neg))
    assert code == 2 and "has 2 prompts" in err and err.count("\n") == 1
