"""pyinterp extract and pyinterp.corpus: the rows equal runs of their contexts alone, the token ids and positions
are the documents', an interrupted run resumes to the same dataset, parts merge, and bad input is one line."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import pyinterp.corpus
from conftest import cosine, tmpfs
from pyinterp import InputError, PyinterpError
from pyinterp.cli import main
from pyinterp.corpus.extract import Request, extract
from pyinterp.corpus.source import Source

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 32


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    """A JSONL corpus: the lines of the README and two docs pages, one document each."""
    lines = [line for page in ("README.md", "docs/cli.md", "docs/sae.md") for line in (ROOT / page).read_text().splitlines()
             if line.strip()]
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": line, "n": i}) + "\n" for i, line in enumerate(lines)))
    return path


def documents(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def run(smollm2, out: Path, path: Path, names: tuple[str, ...], **kwargs) -> pyinterp.corpus.Corpus:
    kwargs.setdefault("max_tokens", 40 * CONTEXT)
    extract(smollm2, out, Request(Source(path), names, kwargs.pop("context_size", CONTEXT), **kwargs))
    return pyinterp.corpus.open(out)


def test_rows_equal_runs_of_each_context(smollm2, corpus_file, tmp_path):
    names = ("blocks.5.hook_resid_post", "attn_out-2", f"l_out-{smollm2.n_layer - 1}")  # the last layer: every row kept
    many = run(smollm2, tmp_path / "many", corpus_file, names)
    one = run(smollm2, tmp_path / "one", corpus_file, names[:1], per_decode=1, max_tokens=6 * CONTEXT)
    ids, context = many.token_ids(), many.context()
    assert many.n_tokens == 40 * CONTEXT and many.n_contexts == 40 and smollm2.n_ctx // CONTEXT > 1
    for k in range(many.n_contexts):
        rows = np.flatnonzero(context == k)
        assert len(rows) == CONTEXT
        ref = smollm2.run(ids[rows].tolist(), capture=["l_out-5", "attn_out-2", names[2]]).captured
        for name, key in zip(names, [("l_out", 5), ("attn_out", 2), ("l_out", smollm2.n_layer - 1)]):
            assert cosine(many.tensor(name)[rows], ref[key]).min() >= 0.9999, (k, name)
        if k < one.n_contexts:  # one context per decode: bit for bit
            assert np.array_equal(one.tensor(names[0])[rows], ref["l_out", 5])
            assert np.array_equal(one.token_ids()[rows], ids[rows])


def test_token_ids_documents_and_positions(smollm2, corpus_file, tmp_path):
    c = run(smollm2, tmp_path / "c", corpus_file, ("l_out-1",))
    docs = documents(corpus_file)
    eos = smollm2.engine.special_tokens()[1]
    assert not smollm2.engine.adds_bos()  # SmolLM2: no BOS; documents separated by the end-of-text token
    stream: list[int] = []
    for i, text in enumerate(docs):
        stream += ([eos] if i else []) + smollm2.tokenize(text, add_bos=False)
    ids, doc, pos = c.token_ids(), c.doc(), c.pos()
    assert ids.tolist() == stream[:c.n_tokens]
    for row in range(c.n_tokens):
        if pos[row] >= 0:
            assert smollm2.tokenize(docs[doc[row]], add_bos=False)[pos[row]] == ids[row]
        else:
            assert ids[row] == eos and pos[row + 1] == 0 and doc[row + 1] == doc[row]
    assert np.array_equal(c.context(), np.repeat(np.arange(c.n_contexts), CONTEXT))


def test_unpacked_contexts_are_documents(smollm2, corpus_file, tmp_path):
    c = run(smollm2, tmp_path / "c", corpus_file, ("l_out-1",), pack=False, max_tokens=400)
    docs = documents(corpus_file)
    context, doc = c.context(), c.doc()
    for k in range(c.n_contexts):
        rows = np.flatnonzero(context == k)
        assert c.token_ids()[rows].tolist() == smollm2.tokenize(docs[doc[rows[0]]], add_bos=False)[:CONTEXT]
        assert c.pos()[rows].tolist() == list(range(len(rows)))


def test_truncation_computes_less_and_the_same(smollm2, corpus_file):
    ids = smollm2.tokenize(" ".join(documents(corpus_file)[:40]), add_bos=False)
    contexts = [ids[i * CONTEXT:(i + 1) * CONTEXT] for i in range(4)]
    engine, skipped = smollm2.engine, {}
    for layer in (2, 20):
        full = engine.run_contexts(contexts, [f"l_out-{layer}"], truncate=False)
        assert engine.backend.n_skipped() == 0 and full.logits.shape == (4, smollm2.n_vocab)
        cut = engine.run_contexts(contexts, [f"l_out-{layer}"])
        skipped[layer] = engine.backend.n_skipped()
        assert np.array_equal(cut.captured["l_out", layer], full.captured["l_out", layer])
    assert skipped[2] > skipped[20] > 0


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pyinterp", "extract", *args]


def arrays(c: pyinterp.corpus.Corpus) -> dict[str, np.ndarray]:
    return {"ids": c.token_ids(), "doc": c.doc(), "pos": c.pos(), "context": c.context(), **{n: c.tensor(n) for n in c.names}}


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_resume_after_an_interruption_gives_the_same_dataset(corpus_file, tmp_path, sig):
    args = [str(corpus_file), "-t", "l_out-3", "--context-size", "16", "--shard-tokens", "64", "--max-tokens", "4000",
            "-c", "256", "--contexts-per-decode", "4"]
    assert main(["extract", *args, "-o", str(tmp_path / "whole")]) == 0
    out = tmp_path / "cut"
    child = subprocess.Popen(cli(*args, "-o", str(out)), stderr=subprocess.PIPE, text=True)
    manifest = out / "manifest.json"
    while child.poll() is None and not (manifest.exists() and json.loads(manifest.read_text())["shards"]):
        time.sleep(0.01)
    time.sleep(random.uniform(0, 0.3))
    child.send_signal(sig)
    stderr = child.communicate()[1]
    state = json.loads(manifest.read_text())
    assert not state["complete"] and 0 < state["n_tokens"] < 4000, "the run ended before the signal"
    if sig == signal.SIGINT:
        assert child.returncode == 130 and "continue with --resume" in stderr and "Traceback" not in stderr
    listed = {s["file"] for s in state["shards"]}
    assert {p.name for p in out.glob("shard-*")} <= listed | {p.name for p in out.glob("shard-*")}  # no half shard listed
    assert main(["extract", *args, "-o", str(out), "--resume"]) == 0
    assert not list(out.glob(".*.part"))
    whole, cut = arrays(pyinterp.corpus.open(tmp_path / "whole")), arrays(pyinterp.corpus.open(out))
    for name in whole:
        assert np.array_equal(whole[name], cut[name]), name


def test_parts_merge_into_the_whole(corpus_file, tmp_path):
    common = [str(corpus_file), "-t", "l_out-2", "--no-pack", "--context-size", "24", "-c", "256"]
    assert main(["extract", *common, "-o", str(tmp_path / "whole")]) == 0
    for i in (1, 2, 3):
        assert main(["extract", *common, "--shard", f"{i}/3", "-o", str(tmp_path / f"part{i}")]) == 0
    assert main(["corpus", "merge", str(tmp_path / "all"), *(str(tmp_path / f"part{i}") for i in (3, 1, 2))]) == 0
    whole, merged = pyinterp.corpus.open(tmp_path / "whole"), pyinterp.corpus.open(tmp_path / "all")
    assert merged.n_tokens == whole.n_tokens and len(np.unique(merged.context())) == merged.n_contexts == whole.n_contexts
    for d in np.unique(whole.doc()):
        a, b = whole.doc() == d, merged.doc() == d
        assert np.array_equal(whole.token_ids()[a], merged.token_ids()[b])
        assert cosine(whole.tensor("l_out-2")[a], merged.tensor("l_out-2")[b]).min() >= 0.9999
    assert main(["corpus", "merge", str(tmp_path / "bad"), str(tmp_path / "part1"), str(tmp_path / "part1")]) == 2


@pytest.mark.parametrize("make, args, message", [
    (lambda d: d.joinpath("empty.txt").write_text(""), ["empty.txt"], "gave no context"),
    (lambda d: d.joinpath("blank.txt").write_text("\n\n  \n"), ["blank.txt"], "gave no context"),
    (lambda d: d.joinpath("c.jsonl").write_text('{"body": "a b c"}\n'), ["c.jsonl"], r"c.jsonl:1: no field 'text'"),
    (lambda d: d.joinpath("c.jsonl").write_text('{"text": "a"}\n{"text": \n'), ["c.jsonl"], r"c.jsonl:2: not JSON"),
    (lambda d: d.joinpath("c.txt").write_text("a b c\n"), ["c.txt", "--context-size", "4096"], "more than the model's context"),
    (lambda d: d.joinpath("c.txt").write_text("a b c\n"), ["c.txt", "-t", "no_such"], "unknown tensor name 'no_such'"),
    (lambda d: d.joinpath("c.txt").write_text("a b c\n"), ["c.txt", "-t", "attn_scores-1"], "attention weights"),
    (lambda d: d.joinpath("c.txt").write_text("a b c\n"), ["c.txt", "--shard", "3/2"], "not I/N"),
    (lambda d: d.joinpath("c.txt").write_text("a b c\n"), ["missing.txt"], "does not exist"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, make, args, message):
    make(tmp_path)
    argv = ["extract", str(tmp_path / args[0]), *args[1:], "-o", str(tmp_path / "out"), "-c", "512"]
    if "-t" not in args:
        argv += ["-t", "l_out-1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pyinterp: error: ") and message in err or message in err, err
    assert not (tmp_path / "out").exists()


def test_a_directory_holding_another_run(corpus_file, tmp_path, capsys):
    args = [str(corpus_file), "-t", "l_out-1", "--max-tokens", "300", "-c", "256", "-o", str(tmp_path / "o")]
    assert main(["extract", *args]) == 0
    before = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert main(["extract", *args]) == 2 and "holds another extraction" in capsys.readouterr().err
    assert main(["extract", *args, "--resume"]) == 2 and "is complete" in capsys.readouterr().err
    assert main(["extract", *args[:-2], "-o", str(tmp_path / "o"), "--resume", "--dtype", "f16"]) == 2
    assert "other settings (dtype)" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main(["extract", *args[:-2], "-o", str(tmp_path / "other")]) == 2 and "not an empty directory" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == before
    with pytest.raises(InputError, match="incomplete|no pyinterp corpus"):
        pyinterp.corpus.open(tmp_path / "other")


def test_full_disk(smollm2, corpus_file, tmp_path, monkeypatch):
    """Checked up front against the estimate; a disk that fills anyway stops the run with the shards written whole."""
    with tmpfs(tmp_path / "disk", "1m") as disk:
        with pytest.raises(InputError, match="needs about .* GiB"):
            extract(smollm2, disk / "a", Request(Source(corpus_file), ("l_out-1",), CONTEXT, max_tokens=10**6))
        assert list(disk.iterdir()) == []
        monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(2**40, 0, 2**40))
        with pytest.raises(PyinterpError, match="No space left"):
            extract(smollm2, disk / "b", Request(Source(corpus_file), ("l_out-1",), CONTEXT, max_tokens=4000,
                                                 per_decode=2, shard_tokens=2 * CONTEXT))  # shards of 147 KB
        state = json.loads((disk / "b" / "manifest.json").read_text())
        assert state["shards"] and not state["complete"]
        assert sorted(p.name for p in (disk / "b").iterdir()) == sorted(["manifest.json", *(s["file"] for s in state["shards"])])


def test_saelens_format_holds_the_same_rows(smollm2, corpus_file, tmp_path):
    datasets = pytest.importorskip("datasets", reason="datasets (the saelens extra, in the test extra) is not installed")
    names = ("blocks.4.hook_resid_post", "attn_out-2")
    ours = run(smollm2, tmp_path / "ours", corpus_file, names, max_tokens=10 * CONTEXT)
    extract(smollm2, tmp_path / "sl", Request(Source(corpus_file), names, CONTEXT, max_tokens=10 * CONTEXT, format="saelens"))
    data = datasets.load_from_disk(str(tmp_path / "sl")).with_format("numpy")[:]
    assert np.array_equal(data["token_ids"].reshape(-1), ours.token_ids())
    for name in names:
        assert np.array_equal(data[name].reshape(ours.n_tokens, -1), ours.tensor(name))
    with pytest.raises(InputError, match="nothing to --resume"):
        extract(smollm2, tmp_path / "x", Request(Source(corpus_file), names, CONTEXT, format="saelens"), resume=True)
    with pytest.raises(InputError, match="drop --no-pack"):
        extract(smollm2, tmp_path / "x", Request(Source(corpus_file), names, CONTEXT, pack=False, format="saelens"))


def test_the_manifest_names_the_model_by_its_header(tiny_path):
    """The header's size equals what gguf's own reader parses (its data offset), on models with and without
    string arrays (a vocabulary) and an explicit alignment; the hash changes with the metadata."""
    import gguf

    from pyinterp import zoo
    from pyinterp.corpus.store import gguf_header_size, header_sha256

    for path in (zoo.resolve("smollm2"), tiny_path("llama"), tiny_path("gemma2", f32=True)):
        assert gguf_header_size(np.memmap(path, dtype=np.uint8, mode="r")) == gguf.GGUFReader(path).data_offset
    assert header_sha256(tiny_path("llama")) != header_sha256(tiny_path("llama", f32=True))
