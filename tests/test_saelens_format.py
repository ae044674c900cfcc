"""The SAELens output format (pyinterp/corpus/saelens.py): the dataset is the one SAELens's CacheActivationsRunner
writes (its features, read back by `datasets`), SAELens's own ActivationsStore reads it with its checks, an SAE
trained by SAELens from it (offline: no model, no download) learns, and the trained SAE, loaded with
pyinterp.SAE.load, encodes in the graph what SAELens's own encode gives on the same captured activations."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

import pyinterp
from pyinterp import InputError
from pyinterp.corpus import saelens
from pyinterp.corpus.extract import Request, extract
from pyinterp.corpus.saelens import SaeLensWriter
from pyinterp.corpus.source import Source

sae_lens = pytest.importorskip("sae_lens", reason="sae-lens (the test extra) is not installed")
import datasets  # noqa: E402  (sae-lens's dependencies)
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HOOK = "blocks.1.hook_resid_post"
CTX = 16
N_CTX = 320


def runner_features(hooks: dict[str, int], context_size: int, dtype: str):
    """The features CacheActivationsRunner.__init__ builds (sae_lens/cache_activations_runner.py), written out."""
    features = {name: datasets.Array2D(shape=(context_size, d_in), dtype=dtype) for name, d_in in hooks.items()}
    features["token_ids"] = datasets.Sequence(datasets.Value(dtype="int32"), length=context_size)
    return datasets.Features(features)


def random_batch(rng, hooks: dict[str, int], n: int):
    return ({name: rng.normal(size=(n, CTX, d)).astype(np.float32) for name, d in hooks.items()},
            rng.integers(0, 50_000, size=(n, CTX)))


def cached_store(path, d_in: int, context_size: int = CTX, batch_prompts: int = 8, batch_tokens: int = 256):
    """SAELens's ActivationsStore on a cached-activations directory, as use_cached_activations builds it, with no
    model and no text dataset (every model use in the store is on the non-cached path)."""
    return sae_lens.ActivationsStore(
        model=None, dataset=None, streaming=False, hook_name=HOOK, hook_head_index=None, context_size=context_size,
        d_in=d_in, n_batches_in_buffer=64, total_training_tokens=10**6, store_batch_size_prompts=batch_prompts,
        train_batch_size_tokens=batch_tokens, prepend_bos=False, normalize_activations="none",
        device=torch.device("cpu"), dtype="float32", cached_activations_path=str(path))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_dataset_is_the_cache_runner_format(tmp_path, monkeypatch, dtype):
    """Several add() calls over several data files (a small shard size): datasets loads the directory with the
    runner's features, every value and token id in order; a Dataset.save_to_disk of the same rows made the
    runner's way (Dataset.from_dict with its features) has the same dataset_info.json features and state keys."""
    monkeypatch.setattr(saelens, "SHARD_BYTES", 20_000)
    hooks = {HOOK: 32, "l_out-2": 8}
    rng = np.random.default_rng(0)
    batches = [random_batch(rng, hooks, n) for n in (5, 1, 17, 9)]
    writer = SaeLensWriter(tmp_path / "ds", hooks, CTX, dtype)
    for tensors, ids in batches:
        writer.add(tensors, ids)
        assert not (tmp_path / "ds").exists()  # nothing at out_dir until close
    assert len(list(writer.tmp_dir.glob("*.arrow"))) > 1  # written as they came, in several files
    assert writer.close() == tmp_path / "ds"
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # the temporary directory is gone

    ds = datasets.load_from_disk(str(tmp_path / "ds"))
    assert ds.features == runner_features(hooks, CTX, dtype) and len(ds) == 32
    rows = ds.with_format("numpy")[0:len(ds)]
    for name in hooks:
        want = np.concatenate([t[name] for t, _ in batches]).astype(dtype)
        assert ds.data.schema.field(name).type.storage_type == pa.list_(pa.list_(pa.from_numpy_dtype(np.dtype(dtype))))
        np.testing.assert_array_equal(rows[name], want)
    np.testing.assert_array_equal(rows["token_ids"], np.concatenate([ids for _, ids in batches]))

    tensors, ids = batches[0]
    shard = {**{name: t.astype(dtype) for name, t in tensors.items()}, "token_ids": ids.astype(np.int32)}
    datasets.Dataset.from_dict(shard, features=runner_features(hooks, CTX, dtype)).save_to_disk(str(tmp_path / "ref"))
    info = [json.loads((tmp_path / d / "dataset_info.json").read_text())["features"] for d in ("ds", "ref")]
    assert info[0] == info[1]
    state = [json.loads((tmp_path / d / "state.json").read_text()) for d in ("ds", "ref")]
    assert state[0].keys() == state[1].keys() and state[0]["_split"] is None


def test_activations_store_reads_it_with_its_checks(tmp_path):
    """SAELens's ActivationsStore serves exactly the written rows (flattened, in order, with token ids), and its
    own shape checks refuse a wrong d_in or context_size, so they read the dataset's features."""
    rng = np.random.default_rng(1)
    tensors, ids = random_batch(rng, {HOOK: 24}, 6)
    with SaeLensWriter(tmp_path / "ds", {HOOK: 24}, CTX, "float32") as writer:
        writer.add(tensors, ids)
    store = cached_store(tmp_path / "ds", 24, batch_prompts=3)
    acts, tokens = store.get_raw_llm_batch()
    np.testing.assert_array_equal(acts.numpy(), tensors[HOOK][:3].reshape(-1, 24))
    np.testing.assert_array_equal(tokens.numpy(), ids[:3].reshape(-1))
    with pytest.raises(ValueError, match="does not match context_size"):
        cached_store(tmp_path / "ds", 25)
    with pytest.raises(ValueError, match="does not match context_size"):
        cached_store(tmp_path / "ds", 24, context_size=CTX + 1)


def test_writer_errors(tmp_path, monkeypatch):
    hooks = {HOOK: 8}
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("another run")
    with pytest.raises(InputError, match="already exists and is not an empty directory"):
        SaeLensWriter(tmp_path / "full", hooks, CTX)
    with pytest.raises(InputError, match="Arrow has no bfloat16"):
        SaeLensWriter(tmp_path / "ds", hooks, CTX, "bfloat16")
    with pytest.raises(InputError, match="at least one hook"):
        SaeLensWriter(tmp_path / "ds", {}, CTX)
    with pytest.raises(InputError, match="'token_ids' is the SAELens dataset's token column"):
        SaeLensWriter(tmp_path / "ds", {"token_ids": 8}, CTX)
    with pytest.raises(InputError, match="context_size must be a positive integer"):
        SaeLensWriter(tmp_path / "ds", hooks, 0)

    writer = SaeLensWriter(tmp_path / "ds", hooks, CTX)
    rng = np.random.default_rng(2)
    tensors, ids = random_batch(rng, hooks, 2)
    with pytest.raises(InputError, match=r"activations must be \[2, 16, 8\]"):
        writer.add({HOOK: tensors[HOOK][:, :, :7]}, ids)
    with pytest.raises(InputError, match="has hooks"):
        writer.add({"l_out-1": tensors[HOOK]}, ids)
    with pytest.raises(InputError, match=r"token_ids must be \[n_ctx, 16\]"):
        writer.add(tensors, ids[:, :5])
    with pytest.raises(InputError, match="would be empty"):
        writer.close()
    assert list(tmp_path.iterdir()) == [tmp_path / "full"]  # no dataset, no temporary directory

    with pytest.raises(RuntimeError):  # an error inside the with block: nothing is left behind
        with SaeLensWriter(tmp_path / "ds", hooks, CTX) as writer:
            writer.add(tensors, ids)
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == [tmp_path / "full"]

    class FullDisk:
        def __init__(self, **_):
            raise OSError(28, "No space left on device")

    writer = SaeLensWriter(tmp_path / "ds", hooks, CTX)
    monkeypatch.setattr(writer, "_ArrowWriter", FullDisk)
    with pytest.raises(InputError, match="cannot write the SAELens dataset .*: No space left on device"):
        writer.add(tensors, ids)
    assert list(tmp_path.iterdir()) == [tmp_path / "full"]

    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(InputError, match=r'pip install "pyinterp\[saelens\]"'):
        SaeLensWriter(tmp_path / "ds", hooks, CTX)


@pytest.mark.filterwarnings("ignore:All samples in the training dataset have been exhausted")  # 16 epochs, meant
def test_sae_trained_by_saelens_runs_in_the_graph(tiny_path, tmp_path):
    """Activations of N_CTX contexts of a tiny model (pyinterp extract --format saelens) -> the dataset -> a standard SAE
    trained by SAELens's SAETrainer over its cached-activations ActivationsStore (no model, no download): the
    reconstruction error falls; the SAE saved by SAELens loads with pyinterp.SAE.load, and its features encoded in
    the graph on a new prompt equal SAELens's own encode of the captured activations."""
    rng = np.random.default_rng(3)
    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))))
    with pyinterp.Model(tiny_path("llama", f32=True), n_ctx=256, n_threads=1) as model:
        d_in, n_vocab = model.n_embd, model.n_vocab
        done = extract(model, tmp_path / "acts", Request(Source(corpus), (HOOK,), CTX, max_tokens=N_CTX * CTX,
                                                         format="saelens"))  # pyinterp extract --format saelens
        assert done["n_contexts"] == N_CTX
        prompt = rng.integers(1, n_vocab, size=12).tolist()
        x = model.run(prompt, capture=[HOOK], logits=None)[HOOK]

        from sae_lens import SAE as SaeLensSAE
        from sae_lens import SAETrainer, StandardTrainingSAE, StandardTrainingSAEConfig
        from sae_lens.config import SAETrainerConfig
        from sae_lens.saes.sae import SAEMetadata

        torch.manual_seed(0)
        store = cached_store(tmp_path / "acts", d_in)
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(
            d_in=d_in, d_sae=256, l1_coefficient=0.1, metadata=SAEMetadata(hook_name=HOOK, context_size=CTX)))
        everything = torch.from_numpy(
            datasets.load_from_disk(str(tmp_path / "acts")).with_format("numpy")[0:N_CTX][HOOK].reshape(-1, d_in))

        def mse() -> float:
            with torch.no_grad():
                return float(((sae.decode(sae.encode(everything)) - everything) ** 2).sum(-1).mean())

        before = mse()
        trainer = SAETrainer(cfg=SAETrainerConfig(total_training_samples=300 * 256, train_batch_size_samples=256,
                                                  lr=3e-3, lr_end=3e-3), sae=sae, data_provider=store)
        trained = trainer.fit()
        after = mse()
        assert trainer.n_training_steps == 300
        variance = float(((everything - everything.mean(0)) ** 2).sum(-1).mean())
        assert after < 0.1 * before and after < 0.1 * variance, (before, after, variance)  # 118 -> 4.0, 120
        trained.save_inference_model(tmp_path / "sae")

        loaded = pyinterp.SAE.load(tmp_path / "sae")
        assert (loaded.hook_name, loaded.d_in, loaded.d_sae) == (HOOK, d_in, 256)
        got = pyinterp.sae_features(model, loaded, prompt, top_k=256)

    reference = SaeLensSAE.load_from_disk(str(tmp_path / "sae"))
    with torch.no_grad():
        f = reference.encode(torch.from_numpy(x)).numpy()
    assert 0 < got.l0.min() and got.l0.max() < 256  # some features fire, not all (160..210 of 256)
    np.testing.assert_array_equal(got.l0, (f > 0).sum(1))
    np.testing.assert_allclose(got.values, -np.sort(-f, axis=1), rtol=1e-4, atol=1e-5)
    clear = got.values > 1e-4
    np.testing.assert_array_equal(got.ids[clear], np.argsort(-f, axis=1, kind="stable")[clear])
    np.testing.assert_allclose(loaded.encode(x), f, rtol=1e-4, atol=1e-5)
