"""Shared fixtures: the two real models, loaded once per session, and their transformers references.

The reference (transformers + torch, the `test` extra) is required: a missing reference is an error,
never a skip.
"""

from __future__ import annotations

import numpy as np
import pytest

import pyinterp
from pyinterp import zoo

PROMPTS = [
    "The capital of France is",
    "When Mary and John went to the store, John gave a drink to",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 1 2 3 4 5 6 7",
]


@pytest.fixture(scope="session")
def smollm2():
    with pyinterp.Model("smollm2", n_ctx=512) as model:
        yield model


@pytest.fixture(scope="session")
def gemma3():
    with pyinterp.Model("gemma3", n_ctx=512) as model:
        yield model


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


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two [n, d] arrays."""
    return np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
