"""Quantization fidelity: the F32 copy against independent dequantizations (by hand on a small file, and the
transformers reference's own loading of the quantized GGUF), the report's numbers against the same metrics
computed here from captures of both models, an F32 model, and ``pyinterp fidelity``.

The F32 copies go to a temporary cache (PYINTERP_CACHE) written once per session: SmolLM2's is ~540 MB.
"""

from __future__ import annotations

import json
import os

import cv2
import gguf
import numpy as np
import pytest

import pyinterp
from conftest import PROMPTS, corr, cosine
from pyinterp import InputError, PyinterpError, zoo
from pyinterp.cli import main
from pyinterp.io.dequant import F32Copy, scan
from pyinterp.analysis.fidelity import fidelity
from pyinterp.viz.charts import value_axis

PROMPT = PROMPTS[1]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fidelity-cache")


@pytest.fixture
def cache(cache_dir, monkeypatch):
    """The session's F32 copies for one test (set only while it runs: the Gemma fixture uses the real cache)."""
    monkeypatch.setenv("PYINTERP_CACHE", str(cache_dir))
    return cache_dir


@pytest.fixture(scope="session")
def smollm2_report(cache_dir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYINTERP_CACHE", str(cache_dir))
        return fidelity("smollm2", PROMPT, n_ctx=512)


@pytest.fixture(scope="session")
def tiny_paths(tiny_path):
    """Tiny llama and qwen2 models, Q8_0 (seed 0), and the llama one with F32 weights."""
    return {"llama": tiny_path("llama"), "qwen2": tiny_path("qwen2"), "f32": tiny_path("llama", f32=True)}


def tiny_ids(model: pyinterp.Model) -> list[int]:
    """BOS and 15 random ids (seeded)."""
    rng = np.random.default_rng(2)
    return model.tokenize("", add_bos=True) + rng.integers(0, model.n_vocab - 1, size=15).tolist()


# the copy


def by_hand(t: gguf.ReaderTensor) -> np.ndarray:
    """Dequantize a tensor from its bytes, without gguf.quants: F16 and BF16 by their bit layouts, Q8_0 as
    blocks of an F16 scale and 32 int8 values."""
    raw = np.ascontiguousarray(t.data).view(np.uint8).reshape(-1)
    if t.tensor_type == gguf.GGMLQuantizationType.F16:
        return raw.view(np.float16).astype(np.float32)
    if t.tensor_type == gguf.GGMLQuantizationType.BF16:
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
    blocks = raw.reshape(-1, 34)
    scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    return (scale * blocks[:, 2:].view(np.int8)).reshape(-1)


def test_copy_of_every_kind_of_tensor(tmp_path, cache):
    """A file with F16, BF16, Q8_0, F32 and I32 tensors and every kind of metadata: the copy has the same
    metadata (file type aside), the same tensors in the same order and shapes, all F32 but the I32 one, equal
    to a dequantization by hand. Writing reports every byte; a second F32Copy finds the file."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(tmp_path / "mixed.gguf", "llama")
    w.add_name("mixed")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_key_value("test.bytes", b"\xff\xfe not UTF-8", gguf.GGUFValueType.STRING)
    w.add_array("test.strings", ["a", "b\u00e9", ""])
    w.add_array("test.floats", [1.5, -2.0])
    w.add_bool("test.flag", True)
    values = {name: rng.standard_normal(shape).astype(np.float32)
              for name, shape in (("f16", (3, 64)), ("bf16", (64,)), ("q8", (4, 2, 64)), ("f32", (5,)))}
    w.add_tensor("f16", values["f16"].astype(np.float16))
    bf16 = gguf.GGMLQuantizationType.BF16
    w.add_tensor("bf16", gguf.quants.quantize(values["bf16"], bf16), raw_dtype=bf16)
    q8 = gguf.GGMLQuantizationType.Q8_0
    w.add_tensor("q8", gguf.quants.quantize(values["q8"], q8), raw_dtype=q8)
    w.add_tensor("f32", values["f32"])
    w.add_tensor("i32", np.arange(7, dtype=np.int32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    copy = F32Copy(tmp_path / "mixed.gguf")
    assert copy.path.parent == cache / "models" / "f32" and not copy.exists
    written = []
    path = copy.write(written.append)
    assert sum(written) == copy.nbytes == 4 * (3 * 64 + 64 + 4 * 2 * 64 + 5 + 7) and len(written) == 5
    assert F32Copy(tmp_path / "mixed.gguf").exists

    src, out = gguf.GGUFReader(tmp_path / "mixed.gguf"), gguf.GGUFReader(path)
    for reader, file in ((src, tmp_path / "mixed.gguf"), (out, path)):  # the header scan reads what gguf reads:
        # names, types, sizes, dims (ggml order) and where each tensor's data starts
        assert [tuple(e) for e in scan(file)] == [(t.name, t.tensor_type, t.n_elements, tuple(int(d) for d in t.shape),
                                                   int(t.data_offset)) for t in reader.tensors]
    assert list(out.fields) == list(src.fields)
    for name, field in src.fields.items():
        if name == "general.file_type":
            assert out.fields[name].contents() == gguf.LlamaFileType.ALL_F32
        elif not name.startswith("GGUF."):
            assert [bytes(p) for p in out.fields[name].parts] == [bytes(p) for p in field.parts], name
    assert [t.name for t in out.tensors] == [t.name for t in src.tensors]
    for s, o in zip(src.tensors, out.tensors, strict=True):
        assert list(o.shape) == list(s.shape), s.name
        if s.name == "i32":
            assert o.tensor_type == gguf.GGMLQuantizationType.I32 and np.array_equal(o.data, s.data)
            continue
        assert o.tensor_type == gguf.GGMLQuantizationType.F32
        want = values[s.name].reshape(-1) if s.name == "f32" else by_hand(s)
        np.testing.assert_array_equal(np.asarray(o.data).reshape(-1), want, err_msg=s.name)
    # the quantized values are close to what was quantized (so by_hand reads the layout right)
    np.testing.assert_allclose(by_hand(src.tensors[2]), values["q8"].reshape(-1), atol=0.03)


def test_copy_is_rewritten_when_the_source_changes(tmp_path, cache, tiny_paths):
    source = tmp_path / "llama.gguf"
    source.write_bytes(tiny_paths["llama"].read_bytes())
    first = F32Copy(source).write()
    os.utime(source, ns=(0, 10**9))
    second = F32Copy(source)
    assert second.path != first and not second.exists


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_copy_agrees_with_reference_to_rounding(cache, tiny_paths, arch):
    """The transformers reference loads the quantized file, dequantizing it with its own loader; pyinterp on
    the F32 copy computes the same to float rounding, where the quantized file does not."""
    from reference import Reference

    ref = Reference(tiny_paths[arch])
    with pyinterp.Model(F32Copy(tiny_paths[arch]).write(), n_ctx=64, n_threads=1) as model:
        ids = tiny_ids(model)
        trace = model.run(ids, capture=["attn_scores", "l_out"])
    want = ref.run(ids)
    scale = np.abs(want.logits).max()
    np.testing.assert_allclose(trace.logits, want.logits, atol=1e-4 * scale)
    for il in range(len(want.l_out)):
        np.testing.assert_allclose(trace.attention(il), want.attentions[il], atol=1e-4)
        np.testing.assert_allclose(trace.act("l_out", il), want.l_out[il], atol=1e-4 * np.abs(want.l_out[il]).max())
    with pyinterp.Model(tiny_paths[arch], n_ctx=64, n_threads=1) as quantized:
        assert np.abs(quantized.run(ids).logits - want.logits).max() > 10 * np.abs(trace.logits - want.logits).max()


def test_smollm2_copy_agrees_with_reference(smollm2_report, ref_smollm2):
    ids = smollm2_report.tokens
    with pyinterp.Model(smollm2_report.reference, n_ctx=512) as model:
        trace = model.run(ids, capture=["attn_scores", "l_out"])
    want = ref_smollm2.run(ids)
    assert corr(trace.logits, want.logits) >= 0.999999
    assert np.abs(trace.logits - want.logits).max() <= 1e-4 * np.abs(want.logits).max()
    for il in range(model.n_layer):
        assert cosine(trace.act("l_out", il), want.l_out[il]).min() >= 0.99999, il
        assert np.abs(trace.attention(il) - want.attentions[il]).max() <= 1e-4, il


# the report


def metrics_by_numpy(quant, ref, n_layer: int) -> dict[str, np.ndarray]:
    """The report's definitions, written out again from the two traces."""
    out = {k: [] for k in ("cos_mean", "cos_min", "rel_l2", "attn_mean", "attn_max")}
    for il in range(n_layer):
        q, f = quant.act("l_out", il).astype(np.float64), ref.act("l_out", il).astype(np.float64)
        cos = cosine(q, f)
        out["cos_mean"].append(cos.mean())
        out["cos_min"].append(cos.min())
        out["rel_l2"].append(np.mean([np.linalg.norm(a - b) / np.linalg.norm(b) for a, b in zip(q, f)]))
        diffs = [abs(float(quant.attention(il)[h, i, j]) - float(ref.attention(il)[h, i, j]))
                 for h in range(quant.attention(il).shape[0]) for i in range(len(q)) for j in range(i + 1)]
        out["attn_mean"].append(np.mean(diffs))
        out["attn_max"].append(np.max(diffs))
    out = {k: np.array(v) for k, v in out.items()}
    q, f = quant.logits.astype(np.float64), ref.logits.astype(np.float64)
    out["logit_corr"] = np.array([corr(a, b) for a, b in zip(q, f)])
    p_f = np.exp(f - f.max(1, keepdims=True))
    p_f /= p_f.sum(1, keepdims=True)
    p_q = np.exp(q - q.max(1, keepdims=True))
    p_q /= p_q.sum(1, keepdims=True)
    out["kl"] = np.array([np.sum(pf * np.log(pf / pq)) for pf, pq in zip(p_f, p_q)])
    out["top1"] = np.array([np.argmax(a) == np.argmax(b) for a, b in zip(q, f)])
    return out


def check_report(report, quant_path, n_ctx: int, n_threads: int | None) -> None:
    """The report's numbers equal the same metrics computed here from two fresh runs on its token ids."""
    runs = []
    for path in (quant_path, report.reference):
        with pyinterp.Model(path, n_ctx=n_ctx, n_threads=n_threads) as model:
            runs.append(model.run(report.tokens, capture=["l_out", "attn_scores"]))
    n_layer = model.n_layer
    want = metrics_by_numpy(*runs, n_layer)
    for key, values in want.items():
        got = getattr(report, key)
        assert got.shape == values.shape, key
        np.testing.assert_allclose(got, values, rtol=1e-6, atol=1e-9, err_msg=key)
    assert runs[0].token_strs == report.token_strs


def test_tiny_report_matches_numpy(cache, tiny_paths):
    report = fidelity(tiny_paths["qwen2"], "When Mary and John went to the store", n_ctx=64, n_threads=1)
    assert report.types == {"Q8_0": 4 * 7 + 1, "F32": 4 * 5 + 1}  # 7 matrices and 5 vectors a layer, embd, norm
    check_report(report, tiny_paths["qwen2"], 64, 1)
    assert 0 < report.attn_mean.max() and report.cos_min.min() < 1  # Q8_0 changes something


def test_smollm2_report_matches_numpy(smollm2_report, smollm2):
    report = smollm2_report
    assert report.model == zoo.smollm2_path().name and report.types["Q4_1"] == 210
    assert report.tokens == smollm2.tokenize(PROMPT)
    check_report(report, zoo.smollm2_path(), 512, None)
    # what Q4_1 does to SmolLM2 (measured: cosine >= 0.998, top-1 the same everywhere)
    assert report.cos_min.min() > 0.99 and report.top1.all() and report.kl.mean() < 0.05


def test_f32_model_has_nothing_to_compare(cache, tiny_paths):
    with pytest.raises(InputError, match="nothing to compare") as info:
        fidelity(tiny_paths["f32"], "a b", n_ctx=64)
    assert "\n" not in str(info.value)


def test_bad_inputs_before_writing(cache, tiny_paths, tmp_path):
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a model at all")
    with pytest.raises(PyinterpError, match="is not a GGUF file"):
        fidelity(bogus, "a b")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_paths["llama"].read_bytes()[:200])
    with pytest.raises(PyinterpError, match="cannot read"):
        fidelity(truncated, "a b")
    source = tmp_path / "llama.gguf"
    source.write_bytes(tiny_paths["llama"].read_bytes())
    with pytest.raises(InputError, match="context holds 8"):
        fidelity(source, "one two three four five six seven eight nine ten", n_ctx=8)
    assert not F32Copy(source).exists  # nothing was written for a prompt that cannot run


def test_progress_and_cache(cache, tiny_paths, tmp_path):
    source = tmp_path / "llama.gguf"
    source.write_bytes(tiny_paths["llama"].read_bytes())
    calls = []
    first = fidelity(source, [1, 2, 3], n_ctx=64, n_threads=1, on_write=lambda n, total: calls.append((n, total)))
    total = F32Copy(source).nbytes
    assert calls and sum(n for n, _ in calls) == total and {t for _, t in calls} == {total}
    calls.clear()
    again = fidelity(source, [1, 2, 3], n_ctx=64, n_threads=1, on_write=lambda n, total: calls.append(n))
    assert not calls and again.reference == first.reference  # cached
    np.testing.assert_array_equal(again.cos_mean, first.cos_mean)
    with pyinterp.Model(source, n_ctx=64, n_threads=1) as model, model.ablated([(0, 0)]):
        given = fidelity(model, [1, 2, 3], n_threads=1)  # its path and context; its ablation does not apply
    np.testing.assert_array_equal(given.kl, first.kl)


def test_value_axis():
    assert value_axis(0.0034) == (0.005, 5)
    assert value_axis(0.02) == (0.02, 4)
    assert value_axis(0.011) == pytest.approx((0.02, 4))
    assert value_axis(1.0) == (1.0, 5)
    assert value_axis(7.0) == (10.0, 5)
    assert value_axis(0.0) == (1.0, 5)


# the command


def test_cli_table_json_png(cache, capsys, smollm2_report, tmp_path):
    png = tmp_path / "fidelity.png"
    code = main(["fidelity", "-c", "512", "-p", PROMPT, "--png", str(png)])
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("quantization fidelity of SmolLM2-135M-Instruct.Q4_1.gguf (Q4_1 x210")
    assert lines[1].split() == ["layer", "l_out", "cos", "mean", "cos", "min", "rel", "L2", "attn", "mean|diff|",
                                "attn", "max|diff|"]
    rows = [line.split() for line in lines[2:32]]
    assert [int(r[0]) for r in rows] == list(range(30))
    np.testing.assert_allclose([float(r[1]) for r in rows], smollm2_report.cos_mean, atol=1e-5)
    np.testing.assert_allclose([float(r[5]) for r in rows], smollm2_report.attn_max, atol=1e-4)
    assert lines[32].startswith("logits: corr ") and f"top-1 agreement {len(smollm2_report.tokens)}/" in lines[32]
    assert lines[33] == f"wrote {png}"
    image = cv2.imread(str(png))
    assert image is not None and image.shape[0] > 400 and image.shape[1] > 700

    assert main(["fidelity", "-c", "512", "-p", PROMPT, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tokens"] == smollm2_report.tokens and data["files"] == []
    assert [row["layer"] for row in data["layers"]] == list(range(30))
    np.testing.assert_allclose([row["l_out_rel_l2"] for row in data["layers"]], smollm2_report.rel_l2, rtol=1e-9)
    assert data["logits"]["kl_last"] == pytest.approx(smollm2_report.kl[-1])
    assert data["logits"]["top1_agreement"] == 1.0


@pytest.mark.parametrize("args, code, message", [
    (["-p", "a b"], 2, "nothing to compare"),
    ([], 2, "exactly one of -p/--prompt and -f/--file"),
    (["-p", "a b", "-f", "x.txt"], 2, "exactly one of"),
    (["-p", "a b " * 20, "-c", "8"], 2, "context holds 8"),
])
def test_cli_bad_inputs(cache, capsys, tiny_paths, args, code, message):
    model = tiny_paths["f32"] if message == "nothing to compare" else tiny_paths["llama"]
    assert main(["fidelity", "-m", str(model), "-t", "1", *args]) == code
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("pyinterp: error: ") and message in err and err.count("\n") == 1


def test_cli_not_a_gguf(cache, capsys, tmp_path):
    bogus = tmp_path / "bogus.gguf"
    bogus.write_text("hello")
    assert main(["fidelity", "-m", str(bogus), "-p", "a"]) == 1
    err = capsys.readouterr().err
    assert "is not a GGUF file" in err and err.count("\n") == 1
    assert main(["fidelity", "-m", str(tmp_path / "missing.gguf"), "-p", "a"]) == 1
    assert "model file not found" in capsys.readouterr().err
