"""Shared fixtures: the two real models, loaded once per session, and their transformers references.

The reference (transformers + torch, the `test` extra) is required: a missing reference is an error,
never a skip.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

import pyinterp
from pyinterp import zoo

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import tiny_gguf  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "When Mary and John went to the store, John gave a drink to",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 1 2 3 4 5 6 7",
]


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    """The one way tests get a tiny random model (scripts/tiny_gguf.py): ``tiny_path("llama", f32=True)`` is the path
    of that model, written once per session. Options: ``seed``, ``f32``, ``quant`` (a key of tiny_gguf.QUANTS),
    ``nan`` (NaN final-norm weights)."""
    root = tmp_path_factory.mktemp("tiny-gguf")
    made: dict[tuple, Path] = {}

    def path(arch: str = "llama", *, seed: int = 0, f32: bool = False, quant: str = "q8_0", nan: bool = False) -> Path:
        key = (arch, seed, f32, quant, nan)
        if key not in made:
            name = f"{arch}-s{seed}-{'f32' if f32 else quant}{'-nan' if nan else ''}.gguf"
            made[key] = tiny_gguf.write(arch, root / name, seed=seed, f32=f32, quant=quant, nan=nan)
        return made[key]

    return path


@pytest.fixture(scope="session")
def smollm2():
    with pyinterp.Model("smollm2", n_ctx=512) as model:
        yield model


@pytest.fixture(scope="session")
def gemma3():
    with pyinterp.Model("gemma3", n_ctx=512) as model:
        yield model


@pytest.fixture(scope="session")
def fresh_logits():
    """prompt -> its logits from a SmolLM2 loaded apart from the shared one, on which no intervention was ever set:
    what "nothing was left behind" on the shared model is compared with."""
    with pyinterp.Model("smollm2", n_ctx=512) as model:
        cache: dict[str, np.ndarray] = {}
        yield lambda prompt: cache.setdefault(prompt, model.run(prompt).logits)


@pytest.fixture(scope="session")
def ref_smollm2():
    from reference import Reference

    return Reference(zoo.smollm2_path())


@pytest.fixture(scope="session")
def ref_gemma3():
    from reference import Reference

    return Reference(zoo.gemma3_path())


@pytest.fixture(scope="session", params=["smollm2", "gemma3"])
def pair(request):
    """(model, reference) for each real architecture."""
    return request.getfixturevalue(request.param), request.getfixturevalue(f"ref_{request.param}")


def _f32_twin(path):
    """The model loaded from the F32 twin of the GGUF at ``path`` (every weight dequantized, pyinterp.io.dequant): the
    reference's own weights, so the engine must agree with it to float rounding on any CPU, whatever the quantized
    kernels of its CPU variant round."""
    from pyinterp.io.dequant import F32Copy

    return pyinterp.Model(F32Copy(path).write(), n_ctx=512)


@pytest.fixture(scope="session")
def smollm2_f32():
    with _f32_twin(zoo.smollm2_path()) as model:
        yield model


@pytest.fixture(scope="session")
def gemma3_f32():
    with _f32_twin(zoo.gemma3_path()) as model:
        yield model


@pytest.fixture(scope="session", params=["smollm2", "gemma3"])
def f32_pair(request):
    """(model on the F32 twin, reference) for each real architecture."""
    return request.getfixturevalue(f"{request.param}_f32"), request.getfixturevalue(f"ref_{request.param}")


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two [n, d] arrays."""
    return np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def check_logits_attention_residual(model, ref, ids: list[int]):
    """The plain run against the reference: same top-1 and logits corr >= 0.995 at the last position, attention
    mean |diff| <= 0.004 on every layer (causal, rows summing to 1), l_out cosine >= 0.99 at every position.
    Returns (trace, reference result) for further checks."""
    trace = model.run(ids, capture=["attn_scores", "l_out"])
    want = ref.run(ids)

    assert np.argmax(trace.logits[-1]) == np.argmax(want.logits[-1])
    assert corr(trace.logits[-1], want.logits[-1]) >= 0.995

    diffs = [np.abs(trace.attention(il) - want.attentions[il]).mean() for il in range(model.n_layer)]
    assert max(diffs) <= 0.004, f"attention mean |diff| per layer: {np.round(diffs, 4)}"
    for il in range(model.n_layer):
        att = trace.attention(il)
        assert att.shape == (model.n_head, len(ids), len(ids))
        np.testing.assert_allclose(att.sum(-1), 1.0, atol=1e-4)
        assert np.all(np.triu(att, 1) == 0)  # causal: no weight on future keys

    cos = [cosine(trace.act("l_out", il), want.l_out[il]).min() for il in range(model.n_layer)]
    assert min(cos) >= 0.99, f"l_out cosine per layer: {np.round(cos, 4)}"
    return trace, want


def spread_heads(model) -> list[tuple[int, int]]:
    """A few (layer, head) pairs spread over the model: the first, one in the middle, the last."""
    return [(0, 0), (model.n_layer // 2, 1), (model.n_layer - 1, model.n_head - 1)]


def check_head_interventions(model, ref, ids: list[int], kind: str, change_floor: float) -> None:
    """Ablating (``kind`` "ablate") or isolating ("isolate") each of spread_heads(model), in pyinterp and in the
    reference: the logits agree (corr >= 0.995), the intervention changes them, and the change agrees (its
    correlation >= ``change_floor``: a head moves the logits little against quantization noise)."""
    base, want_base = model.run(ids).logits[-1], ref.run(ids).logits[-1]
    for head in spread_heads(model):
        arg = {"ablate": [head]} if kind == "ablate" else {"isolate": head}
        got, want = model.run(ids, **arg).logits[-1], ref.run(ids, **arg).logits[-1]
        assert corr(got, want) >= 0.995, (kind, head)
        assert np.abs(got - base).max() > 1e-3, f"{kind} {head} changed nothing"
        assert corr(got - base, want - want_base) >= change_floor, (kind, head)


def check_patching(model, ref, clean: list[int], corrupt: list[int], cells: list[tuple[int, int]],
                   change_floor: float) -> None:
    """Each (layer, position) row of the clean run's l_out patched into the corrupt run, in pyinterp and in the
    reference: the logits agree, the patch changes them, and the change agrees (corr >= ``change_floor``)."""
    source = model.run(clean, capture=["l_out"])
    base, want_base = model.run(corrupt).logits[-1], ref.run(corrupt).logits[-1]
    for layer, pos in cells:
        row = source.act("l_out", layer)[pos]
        got = model.run(corrupt, patch=[("l_out", layer, pos, row)]).logits[-1]
        want = ref.run(corrupt, patch=[(layer, pos, row)]).logits[-1]
        assert corr(got, want) >= 0.995, (layer, pos)
        assert np.abs(got - base).max() > 1e-2, (layer, pos)
        assert corr(got - base, want - want_base) >= change_floor, (layer, pos)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (mount's syntax: 64k, 1m) mounted at the new directory ``path`` for the block (root only;
    the test is skipped where mounting is not allowed)."""
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs."""
    with tmpfs(tmp_path / "disk", "64k") as mount:
        yield mount
