"""Feature statistics: the streaming accumulator against the same statistics computed in numpy from all the
activations at once (SmolLM2's captured neurons; a random SAE's numpy encode), the logit effects against the
model's own logits, the delphi cache read back with the safetensors package, and one-line errors."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.numpy import load_file

from pyinterp import InputError
from pyinterp.analysis.delphi import DelphiCache
from pyinterp.analysis.features import FeatureAccumulator, features_json, select_units
from pyinterp.analysis.logit_effects import Unembedding
from pyinterp.analysis.sae import random_sae
from pyinterp.cli.main import main

TENSOR = "blocks.5.hook_resid_post"
TEXTS = ["The capital of France is Paris, and the capital of Italy is Rome.",
         "When Mary and John went to the store, John gave a drink to Mary.",
         "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16",
         "def add(a, b):\n    return a + b\n",
         "The quick brown fox jumps over the lazy dog.",
         "Water boils at one hundred degrees Celsius at sea level.",
         "In 1492 Columbus sailed across the Atlantic Ocean."]
WINDOW = (4, 2)
K = 3


@pytest.fixture(scope="module")
def captured(smollm2):
    """Every context's rows of TENSOR and their token ids, doc, pos and context numbers, all concatenated."""
    contexts = [smollm2.tokenize(t) for t in TEXTS]
    rows = [smollm2.run(ids, capture=[TENSOR], logits=None)[TENSOR] for ids in contexts]
    n = [len(c) for c in contexts]
    return SimpleNamespace(x=np.concatenate(rows).astype(np.float32), tokens=np.concatenate(contexts).astype(np.int32),
                           context=np.repeat(np.arange(len(n)), n).astype(np.int64),
                           pos=np.concatenate([np.arange(m) for m in n]).astype(np.int32), lengths=n)


def batches(c, sae=None, per=3):
    """The rows as Batches of ``per`` contexts (a context never split), as the corpus stream yields them."""
    bounds = np.r_[0, np.cumsum(c.lengths)]
    for a in range(0, len(c.lengths), per):
        s = slice(bounds[a], bounds[min(a + per, len(c.lengths))])
        yield SimpleNamespace(token_ids=c.tokens[s], doc=c.context[s] + 100, pos=c.pos[s], context=c.context[s],
                              tensors={TENSOR: c.x[s]}, sae=None if sae is None else (sae[0][s], sae[1][s]))


def expected_top(c, acts: np.ndarray, unit: int) -> list[tuple[int, int, list[int], list[float], int]]:
    """(context, pos, window tokens, window values, index) of the unit's K largest positive rows (ties: earlier)."""
    col = acts[:, unit]
    order = [r for r in np.argsort(-col, kind="stable") if col[r] > 0][:K]
    out = []
    for r in order:
        w = [q for q in range(r - WINDOW[0], r + WINDOW[1] + 1) if 0 <= q < len(col) and c.context[q] == c.context[r]]
        out.append((int(c.context[r]), int(c.pos[r]), c.tokens[w].tolist(), col[w].tolist(), w.index(r)))
    return out


def check_stats(stats, c, acts: np.ndarray) -> None:
    """Every statistic equals numpy's over all rows at once."""
    assert stats.n_tokens == len(acts) and stats.n_contexts == len(c.lengths)
    np.testing.assert_array_equal(stats.count, (acts > 0).sum(0))
    np.testing.assert_allclose(stats.mean, acts.mean(0, dtype=np.float64), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(stats.std, acts.std(0, dtype=np.float64), rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(stats.max, acts.max(0))
    np.testing.assert_array_equal(stats.min, acts.min(0))
    for u in range(acts.shape[1]):
        hist = stats.hist.of(u)
        live = acts[:, u][acts[:, u] != 0]
        assert sum(hist["counts"]) == live.size
        if live.size:
            assert len(hist["counts"]) <= 64
            np.testing.assert_array_equal(np.histogram(live, bins=np.array(hist["edges"]))[0], hist["counts"])
        got = [(e["context"], e["pos"], e["tokens"], e["values"], e["index"]) for e in stats.examples(u, int)]
        want = expected_top(c, acts, u)
        assert [g[:3] + (g[4],) for g in got] == [w[:3] + (w[4],) for w in want], u
        for g, w in zip(got, want):
            np.testing.assert_allclose(g[3], w[3], rtol=1e-6)


def test_neuron_statistics_equal_numpy(captured):
    acc = FeatureAccumulator(captured.x.shape[1], tensor=TENSOR, top_k=K, window=WINDOW)
    for batch in batches(captured):
        acc.add(batch)
    check_stats(acc.result(), captured, captured.x)


def sparse_slots(f: np.ndarray, slots: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Dense features ``[n, d_sae]`` as the readout gives them: ``slots`` unordered (id, value) per row holding
    every active feature, the other slots value 0."""
    rng = np.random.default_rng(seed)
    ids = rng.permuted(np.argsort(-f, axis=1, kind="stable")[:, :slots], axis=1).astype(np.int32)
    assert np.all(np.count_nonzero(f, axis=1) <= slots)
    return ids, np.take_along_axis(f, ids, 1).astype(np.float32)


@pytest.fixture(scope="module")
def sae_acts(captured):
    sae = random_sae(captured.x.shape[1], 96, "jumprelu", seed=3, hook_name=TENSOR)
    f = sae.encode(captured.x)
    assert 0 < np.count_nonzero(f) < f.size / 2  # sparse, not empty
    return sae, f


def test_sae_statistics_equal_numpy(captured, sae_acts):
    sae, f = sae_acts
    acc = FeatureAccumulator(sae.d_sae, top_k=K, window=WINDOW)
    for batch in batches(captured, sparse_slots(f, 64)):
        acc.add(batch)
    check_stats(acc.result(), captured, f)


def test_tracked_subset_and_selection(captured, sae_acts):
    sae, f = sae_acts
    acc = FeatureAccumulator(sae.d_sae, top_k=K, window=WINDOW, track=np.array([5, 40]))
    for batch in batches(captured, sparse_slots(f, 64), per=2):
        acc.add(batch)
    stats = acc.result()
    assert [e["pos"] for e in stats.examples(40, int)] == [w[1] for w in expected_top(captured, f, 40)]
    assert stats.examples(6, int) == []
    top = select_units(stats, None, 5)
    assert set(top) == set(np.argsort(-(f > 0).sum(0), kind="stable")[:5])
    with pytest.raises(InputError, match="feature 96 out of range"):
        select_units(stats, [3, 96], None)


def test_unembedding_reproduces_the_models_logits(smollm2):
    """The final residual row, RMS-normalised, through norm weight and W_U from the GGUF: the model's logits."""
    trace = smollm2.run("The capital of France is", capture=["l_out-29"])
    x = trace["l_out-29"][-1].astype(np.float64)
    unembed = Unembedding.from_gguf(smollm2.path)
    up_ids, up, down_ids, _ = unembed.effects((x / np.sqrt(np.mean(x * x) + 1e-5))[None].astype(np.float32), 5)
    logits = trace.logits[-1]
    np.testing.assert_array_equal(up_ids[0], np.argsort(-logits)[:5])
    np.testing.assert_allclose(up[0], np.sort(logits)[::-1][:5], rtol=0.02)
    np.testing.assert_array_equal(np.sort(down_ids[0]), np.sort(np.argsort(logits)[:5]))


def test_features_json_and_logits(captured, sae_acts, smollm2):
    sae, f = sae_acts
    acc = FeatureAccumulator(sae.d_sae, top_k=K, window=WINDOW)
    for batch in batches(captured, sparse_slots(f, 64)):
        acc.add(batch)
    stats = acc.result()
    unembed = Unembedding.from_gguf(smollm2.path)
    up_ids, up, _, _ = unembed.effects(sae.W_dec[[7]], 3)
    want = (sae.W_dec[7].astype(np.float64) * unembed.norm) @ unembed.W_U.T.astype(np.float64)
    np.testing.assert_array_equal(up_ids[0], np.argsort(-want)[:3])
    data = features_json(stats, np.array([7, 9]), smollm2.token_str, source={"kind": "sae", "tensor": TENSOR, "sae": "x"},
                         model="m", corpus={"path": "c"}, dense_threshold=0.3)
    data = json.loads(json.dumps(data))
    assert data["dead"] == np.flatnonzero((f > 0).sum(0) == 0).tolist()
    assert data["dense"] == np.flatnonzero((f > 0).mean(0) > 0.3).tolist()
    entry = data["features"][0]
    assert entry["id"] == 7 and entry["count"] == int((f[:, 7] > 0).sum())
    assert entry["top"][0]["tokens"][entry["top"][0]["index"]] == smollm2.token_str(
        int(captured.tokens[np.argmax(f[:, 7])]))


def test_delphi_cache_reads_back(tmp_path, captured, sae_acts):
    sae, f = sae_acts
    acc = FeatureAccumulator(sae.d_sae, top_k=K, window=WINDOW)
    with DelphiCache(tmp_path, TENSOR, sae.d_sae, n_splits=2, pad_id=-7, config={"model_name": "m"}) as cache:
        for batch in batches(captured, sparse_slots(f, 64)):
            cache.add(batch.token_ids, batch.context, *acc.add(batch).entries())
        files = cache.close()
    assert [p.name for p in files] == ["0_47.safetensors", "48_95.safetensors", "config.json"]
    assert not list((tmp_path / TENSOR).glob(".spool-*"))
    ctx_len = max(captured.lengths)
    rows, units = np.nonzero(f > 0)
    for path, start in ((files[0], 0), (files[1], 48)):
        data = load_file(path)
        assert data["locations"].dtype == np.uint32 and data["activations"].dtype == np.float16
        loc = data["locations"].astype(np.int64)
        mine = (units >= start) & (units < start + 48)
        first = np.r_[0, np.cumsum(captured.lengths)][loc[:, 0]]
        np.testing.assert_array_equal(first + loc[:, 1], rows[mine])  # corpus order: row, then feature
        np.testing.assert_array_equal(loc[:, 2] + start, units[mine])
        np.testing.assert_array_equal(data["activations"], f[rows[mine], units[mine]].astype(np.float16))
        tokens = data["tokens"]
        assert tokens.shape == (len(captured.lengths), ctx_len)
        for i, n in enumerate(captured.lengths):
            np.testing.assert_array_equal(tokens[i, :n], captured.tokens[captured.context == i])
            assert np.all(tokens[i, n:] == -7)
    config = json.loads(files[2].read_text())
    assert config["model_name"] == "m" and config["ctx_len"] == ctx_len and config["n_tokens"] == len(captured.x)


def test_empty_corpus_and_bad_batches(tmp_path):
    acc = FeatureAccumulator(4, tensor="t")
    with pytest.raises(InputError, match="the corpus is empty"):
        acc.result()
    bad = SimpleNamespace(token_ids=np.zeros(2, np.int32), doc=np.zeros(2), pos=np.zeros(2), context=np.zeros(2),
                          tensors={"t": np.zeros((2, 5), np.float32)}, sae=None)
    with pytest.raises(InputError, match=r"expected \[n_rows, 4\]"):
        acc.add(bad)
    with pytest.raises(InputError, match="outside 0..3"):
        FeatureAccumulator(4).add(SimpleNamespace(**{**vars(bad), "sae": (np.array([[9]]), np.array([[1.0]]))}))
    cache = DelphiCache(tmp_path, "m", 4)
    with pytest.raises(InputError, match="the corpus is empty"):
        cache.close()


@pytest.mark.parametrize("args, message", [
    (["-o", "OUT"], "give -t NAME"),
    (["-t", TENSOR, "--features", "1,x", "-o", "OUT"], "expected feature ids"),
    (["-t", TENSOR, "--features", "1", "--top-features", "3", "-o", "OUT"], "exclude each other"),
    (["-t", TENSOR, "--window", "3", "-o", "OUT"], "BEFORE,AFTER"),
])
def test_cli_usage_errors(tmp_path, capsys, args, message):
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world\n")
    args = [str(tmp_path / "o") if a == "OUT" else a for a in args]
    assert main(["features", str(corpus), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("pyinterp: error:")


def test_cli_end_to_end(tmp_path, capsys, captured):
    """A text corpus through `pyinterp features` (neurons, then an SAE), and a drift against a saved run."""
    from pyinterp.analysis.sae import random_sae

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(t.replace("\n", " ") for t in TEXTS * 3) + "\n")
    common = [str(corpus), "--context-size", "24", "--examples", "2", "--window", "2,1"]
    assert main(["features", *common, "-t", TENSOR, "--top-features", "4", "-o", str(tmp_path / "a")]) == 0
    data = json.loads((tmp_path / "a" / "features.json").read_text())
    assert data["source"] == {"kind": "neurons", "tensor": TENSOR, "sae": None} and len(data["features"]) == 4
    assert all(len(f["top"]) == 2 and len(f["logits"]["promoted"]) == 10 for f in data["features"])
    assert (tmp_path / "a" / "delphi" / TENSOR / "0_575.safetensors").is_file()
    assert main(["features", *common, "-t", TENSOR, "--top-features", "4", "-o", str(tmp_path / "b"),
                 "--baseline", str(tmp_path / "a" / "features.json"), "--md"]) == 0
    out = capsys.readouterr().out
    assert "no feature shifted" in out and (tmp_path / "b" / "drift.png").is_file()
    sae_dir = random_sae(576, 64, "topk", seed=1, hook_name=TENSOR, k=8).save(tmp_path / "sae")
    assert main(["features", *common, "--sae", str(sae_dir), "--features", "1,5", "-o", str(tmp_path / "s")]) == 0
    data = json.loads((tmp_path / "s" / "features.json").read_text())
    assert [f["id"] for f in data["features"]] == [1, 5] and data["n_units"] == 64
    assert main(["features", *common, "--sae", str(sae_dir), "--features", "64", "-o", str(tmp_path / "x")]) == 2
    assert main(["features", *common, "-t", "nonsense-3", "-o", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "unit 64 out of range" in err[0] and all(e.startswith("pyinterp: error:") for e in err)
    assert main(["features", *common, "-t", "l_out-6", "--top-features", "4", "-o", str(tmp_path / "z"),
                 "--baseline", str(tmp_path / "a" / "features.json")]) == 2
    assert "another tensor" in capsys.readouterr().err
