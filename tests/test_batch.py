"""The variant engine: many variants of a prompt, each decoding only the positions and layers its interventions
can change and each bit for bit its own single run (on the F32 test models and on the quantized real ones);
per-head patching and additions at chosen positions (generic native ops), and graph reuse while
interventions stay on. Checked against loops of single runs and the reference."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import pyinterp
from conftest import corr
from pyinterp import InputError
from pyinterp.engine.batch import run_variants
from pyinterp.interventions import AblateHeads, AddVector, PatchHead, PatchRow
from pyinterp.analysis.patching import head_ablation_scan, head_patch_scan, logit_diff, patch_sweep

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import tiny_gguf  # noqa: E402

CLEAN = "The Eiffel Tower is located in the city of"
CORRUPT = "The Colosseum is located in the city of"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tiny_gguf.write("llama", tmp_path_factory.mktemp("tiny-batch") / "llama.gguf", seed=0)
    with pyinterp.Model(path, n_ctx=128, n_threads=1) as model:
        yield model


IDS = [1, 20, 31, 42, 53, 64, 75, 86]


def test_variants_equal_single_runs(tiny):
    """Patches at several positions (prefixes shared), ablations (no prefix) and additions, mixed in one call."""
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(3, tiny.n_embd)).astype(np.float32)
    variants = [[PatchRow("l_out", 1, 2, rows[0])], [PatchRow("l_out", 2, 5, rows[1])], [AblateHeads(((1, 0),))],
                [AddVector("l_out", 0, rows[2], positions=(6,))], [PatchRow("attn_out", 3, 7, rows[1])],
                [PatchRow("l_out", 0, 5, rows[0]), AblateHeads(((2, 1), (3, 0)))], []]
    plain, got = run_variants(tiny, IDS, variants)
    np.testing.assert_array_equal(plain, tiny.run(IDS, logits="last").logits[-1])
    for variant, logits in zip(variants, got):
        want = tiny.run(IDS, interventions=variant, logits="last").logits[-1]
        np.testing.assert_array_equal(logits, want)
        if variant:
            assert np.abs(want - plain).max() > 1e-3  # every variant changes the logits


def test_many_variants(tiny):
    rng = np.random.default_rng(1)
    variants = [[PatchRow("l_out", il % tiny.n_layer, pos, rng.normal(size=tiny.n_embd))]
                for il in range(8) for pos in range(len(IDS))]  # 64, every start and first layer
    _, got = run_variants(tiny, IDS, variants)
    for variant, logits in zip(variants, got):
        np.testing.assert_array_equal(logits, tiny.run(IDS, interventions=variant, logits="last").logits[-1])


def test_layers_before_the_first_intervened_one_are_skipped(tiny):
    """A variant on layer 2 gets the plain run's residual after layer 1 and computes layers 2.. only."""
    vec = np.random.default_rng(7).normal(size=tiny.n_embd).astype(np.float32)
    skipped = {}
    for layer in (0, 2):
        variant = [PatchRow("l_out", layer, 4, vec)]
        _, got = run_variants(tiny, IDS, [variant])
        skipped[layer] = tiny.engine.backend.n_skipped()
        np.testing.assert_array_equal(got[0], tiny.run(IDS, interventions=variant, logits="last").logits[-1])
    assert skipped[0] == 0 and skipped[2] > 0


def test_a_small_context(tmp_path):
    """A context of 12 cells for a prompt of 8: each variant decodes in the cells of a run of its own."""
    path = tiny_gguf.write("llama", tmp_path / "llama.gguf", seed=0)
    with pyinterp.Model(path, n_ctx=12, n_threads=1) as small:
        rng = np.random.default_rng(3)
        variants = [[PatchRow("l_out", 1, pos, rng.normal(size=small.n_embd))] for pos in (0, 4, 7, 7, 7)]
        _, got = run_variants(small, IDS, variants)
        for variant, logits in zip(variants, got):
            np.testing.assert_array_equal(logits, small.run(IDS, interventions=variant, logits="last").logits[-1])


def test_context_manager_interventions_apply_to_every_variant(tiny):
    vec = np.full(tiny.n_embd, 0.5, dtype=np.float32)
    variants = [[PatchRow("l_out", 2, 4, vec)]]
    with tiny.ablated([(0, 1)]):
        plain, got = run_variants(tiny, IDS, variants)
        want_plain = tiny.run(IDS, logits="last").logits[-1]
        want = tiny.run(IDS, interventions=variants[0], logits="last").logits[-1]
    np.testing.assert_array_equal(plain, want_plain)
    np.testing.assert_array_equal(got[0], want)
    assert np.abs(want_plain - tiny.run(IDS, logits="last").logits[-1]).max() > 1e-3


def test_patch_on_the_last_layer(tiny):
    """After attention the last layer keeps only the output rows: an op there acts on them, and an op on a
    row that is not an output is dropped, which changes no output either."""
    last = tiny.n_layer - 1
    vec = np.random.default_rng(6).normal(size=tiny.n_embd).astype(np.float32)
    variants = [[PatchRow("l_out", last, len(IDS) - 1, vec)], [PatchRow("ffn_out", last, 3, vec)],
                [AddVector("attn_norm", last, vec, positions=(3,))], [AddVector("l_out", last, vec)]]
    plain, got = run_variants(tiny, IDS, variants)
    for variant, logits in zip(variants, got):
        full = tiny.run(IDS, interventions=variant, logits="all").logits
        np.testing.assert_allclose(logits, full[-1], atol=1e-4)
        np.testing.assert_allclose(tiny.run(IDS, interventions=variant, logits="last").logits[-1], full[-1], atol=1e-4)
    changed = np.abs(got - plain).max(axis=1)
    assert changed[1] == 0 and min(changed[0], changed[2], changed[3]) > 1e-2


def test_patch_head_with_its_own_output_changes_nothing(tiny):
    trace = tiny.run(IDS, capture=["kqv_heads-2"])
    own = PatchHead(2, 1, trace["kqv_heads", 2][:, 1])
    np.testing.assert_allclose(tiny.run(IDS, interventions=[own]).logits, trace.logits, atol=1e-4)
    # the head's output is what was written, the other heads' are untouched
    values = np.random.default_rng(2).normal(size=trace["kqv_heads", 2][:, 1].shape).astype(np.float32)
    got = tiny.run(IDS, interventions=[PatchHead(2, 1, values, positions=(3, 5))], capture=["kqv_heads-2"])["kqv_heads", 2]
    want = trace["kqv_heads", 2].copy()
    want[[3, 5], 1] = values[[3, 5]]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_add_vector_at_positions(tiny):
    vec = np.random.default_rng(3).normal(size=tiny.n_embd).astype(np.float32)
    base = tiny.run(IDS, capture=["l_out-1"])
    got = tiny.run(IDS, interventions=[AddVector("l_out", 1, vec, positions=(2, -1), scale=0.5)], capture=["l_out-1"])
    want = base["l_out", 1].copy()
    want[[2, len(IDS) - 1]] += 0.5 * vec
    np.testing.assert_allclose(got["l_out", 1], want, atol=1e-5)
    # positions before the first added one are unchanged in every layer's output
    later = tiny.run(IDS, interventions=[AddVector("l_out", 1, vec, positions=(2,))], capture=["l_out"])
    plain = tiny.run(IDS, capture=["l_out"])
    for il in range(tiny.n_layer):
        np.testing.assert_array_equal(later["l_out", il][:2], plain["l_out", il][:2])


@pytest.mark.parametrize("make, message", [
    (lambda m: AddVector("l_out", 1, np.ones(3)), "vector has 3 values"),
    (lambda m: AddVector("l_out", 1, np.ones(m.n_embd), positions=(99,)), "position 99 out of range"),
    (lambda m: AddVector("attn_scores", 1, np.ones(m.n_embd)), "not a \\[.., n_tokens\\] tensor"),
    (lambda m: AddVector("l_out", 1, np.ones(m.n_embd), scale=float("nan")), "scale must be a finite number"),
    (lambda m: PatchHead(1, 0, np.ones((2, 3))), "values must be"),
    (lambda m: PatchHead(1, m.n_head, np.ones((8, 32))), "head 4 out of range"),
])
def test_errors(tiny, make, message):
    with pytest.raises(InputError, match=message):
        tiny.run(IDS, interventions=[make(tiny)])


def test_generation_reuses_the_graph_and_matches_full_runs(tiny):
    """With interventions on, each generated token decodes without building a new graph, and the tokens are
    the greedy choices of full runs of the same prompt under the same interventions."""
    vec = np.random.default_rng(4).normal(size=tiny.n_embd).astype(np.float32)
    interventions = [AblateHeads(((1, 0),)), AddVector("l_out", 2, vec, scale=0.3)]
    before = tiny.engine.backend.n_builds()
    gen = tiny.generate(IDS, 8, interventions=interventions, stop_at_eog=False)
    assert tiny.engine.backend.n_builds() - before <= 3  # the prompt, the first token (and a reserve); not one per token
    ids = list(IDS)
    for token in gen.tokens:
        assert int(np.argmax(tiny.run(ids, interventions=interventions, logits="last").logits[-1])) == token
        ids.append(token)
    assert gen.tokens != tiny.generate(IDS, 8, stop_at_eog=False).tokens


def test_head_patch_scan_against_the_reference(smollm2, ref_smollm2):
    """Per-head patching, clean into corrupt, against transformers replacing that head's slice of o_proj's input."""
    clean, corrupt = smollm2.tokenize(CLEAN), smollm2.tokenize(CORRUPT)
    good, bad = smollm2.tokenize(" Paris", add_bos=False)[0], smollm2.tokenize(" Rome", add_bos=False)[0]
    layers = [3, 20]
    batched = head_patch_scan(smollm2, CLEAN, CORRUPT, logit_diff(" Paris", " Rome"), layers=layers)
    heads = ref_smollm2.head_outputs(clean)
    want = np.empty_like(batched)
    for i, il in enumerate(layers):
        for h in range(smollm2.n_head):
            logits = ref_smollm2.run(corrupt, patch_heads=[(il, h, range(len(clean)), heads[il][:, h])]).logits[-1]
            want[i, h] = logits[good] - logits[bad]
    assert corr(batched, want) >= 0.9
    assert np.abs(batched - want).max() <= 1.0
    assert np.abs(want - want.mean()).max() >= 2.0  # some head matters: the scan is not flat


def test_add_at_positions_against_the_reference(smollm2, ref_smollm2):
    ids = smollm2.tokenize(CLEAN)
    vec = np.random.default_rng(5).normal(size=smollm2.n_embd).astype(np.float32) * 2
    base, want_base = smollm2.run(ids).logits, ref_smollm2.run(ids).logits
    got = smollm2.run(ids, interventions=[AddVector("l_out", 6, vec, positions=(3, 4))]).logits
    want = ref_smollm2.run(ids, add=[(6, (3, 4), vec)]).logits
    np.testing.assert_allclose(got[:3], base[:3], atol=1e-4)  # earlier positions see nothing
    assert corr(got[3:], want[3:]) >= 0.99
    assert corr(got[3:] - base[3:], want[3:] - want_base[3:]) >= 0.9


IOI_CLEAN = "When Mary and John went to the store, John gave a drink to"
IOI_CORRUPT = "When Mary and John went to the store, Mary gave a drink to"


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_sweep_cells_are_their_own_runs_bit_for_bit(request, name):
    """On the quantized models (Q4_1, Q4_K with repacked weights): a patch of a row by an identical row leaves
    the metric bit-identical to the corrupted run's, and every cell of the sweep is bit for bit the metric of
    one Model.run with that patch, whatever start and first layer it shares a call with."""
    model = request.getfixturevalue(name)
    clean, corrupt = model.tokenize(IOI_CLEAN), model.tokenize(IOI_CORRUPT)
    same = next(i for i, (a, b) in enumerate(zip(clean, corrupt)) if a != b)  # rows before it are equal
    metric = logit_diff(" Mary", " John").bind(model)
    layers = [1, model.n_layer // 2, model.n_layer - 2]
    grid = patch_sweep(model, clean, corrupt, metric=metric, layers=layers)
    base = metric(model.run(corrupt, logits="last").logits[-1])
    assert same >= 8
    np.testing.assert_array_equal(grid[:, :same], np.full((len(layers), same), base))
    rows = model.run(clean, capture=[f"l_out-{il}" for il in layers])
    want = np.array([[metric(model.run(corrupt, interventions=[PatchRow("l_out", il, pos, rows["l_out", il][pos])],
                                       logits="last").logits[-1]) for pos in range(len(clean))] for il in layers])
    np.testing.assert_array_equal(grid, want)
    assert np.abs(grid[0, same] - base) > 0.5  # the changed token's row matters


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_head_scans_are_their_own_runs_bit_for_bit(request, name):
    model = request.getfixturevalue(name)
    metric = logit_diff(" Mary", " John").bind(model)
    layers = [2, model.n_layer - 3]
    patched = head_patch_scan(model, IOI_CLEAN, IOI_CORRUPT, metric, layers=layers, positions=range(8, 14))
    ablated = head_ablation_scan(model, IOI_CLEAN, metric, layers=layers)
    heads = model.run(IOI_CLEAN, capture=[f"kqv_heads-{il}" for il in layers])
    base = metric(model.run(IOI_CLEAN, logits="last").logits[-1])
    for i, il in enumerate(layers):
        for h in range(model.n_head):
            patch = PatchHead(il, h, heads["kqv_heads", il][:, h], tuple(range(8, 14)))
            assert patched[i, h] == metric(model.run(IOI_CORRUPT, interventions=[patch], logits="last").logits[-1])
            one = metric(model.run(IOI_CLEAN, interventions=[AblateHeads(((il, h),))], logits="last").logits[-1])
            assert ablated[i, h] == one - base


def test_contexts_of_one_decode_equal_their_single_runs(smollm2_f32, smollm2):
    """Engine.run_contexts: each context of a multi-sequence decode gets what a run of it alone gets. On F32 weights
    to float rounding whatever the lengths (the contexts' KV cells sit at other offsets, so sums over the cache group
    their terms differently); packed contexts of 32 tokens, as pyinterp extract makes them, bit for bit even on the
    quantized model. A context seeing another's cells would be off by far more."""
    texts = ["The capital of France is", "When Mary and John went to the store, John gave a drink to",
             "1 2 3 4 5 6 7", "Tea is hot and coffee is", "A B C D E F G H I J K"]
    model = smollm2_f32
    ids = [model.tokenize(t) for t in texts]
    last = model.n_layer - 1
    rows = model.engine.run_contexts(ids, [f"l_out-{last}", "attn_out-3"]).captured
    start = 0
    for x in ids:
        alone = model.run(x, capture=[f"l_out-{last}", "attn_out-3"]).captured
        for key in [("l_out", last), ("attn_out", 3)]:
            got = rows[key][start:start + len(x)]
            assert np.abs(got - alone[key]).max() <= 1e-5 * np.abs(alone[key]).max(), key
        start += len(x)
    stream = smollm2.tokenize(" ".join(texts * 4), add_bos=False)
    packed = [stream[i * 32:(i + 1) * 32] for i in range(4)]
    rows = smollm2.engine.run_contexts(packed, ["l_out-20"]).captured["l_out", 20]
    for i, x in enumerate(packed):
        assert np.array_equal(rows[i * 32:(i + 1) * 32], smollm2.run(x, capture=["l_out-20"]).captured["l_out", 20])
