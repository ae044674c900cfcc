"""pyinterp: mechanistic interpretability for local GGUF models on a patched llama.cpp.

The top-level names are imported on first use, so ``import pyinterp`` stays light and the native library is
loaded by the first name that needs it (an error loading it is a ``NativeLibraryError``, one line).
"""

from __future__ import annotations

import importlib

from pyinterp.errors import InputError, NativeLibraryError, PyinterpError

# public name -> the module that defines it
_LAZY = {
    "build_info": ".engine._ffi",
    "draw_attention": ".viz.attention",
    "Fidelity": ".analysis.fidelity",  # the function is pyinterp.analysis.fidelity.fidelity
    "HeadScores": ".analysis.heads",
    "head_scores": ".analysis.heads",
    "Generation": ".model",
    "Model": ".model",
    "SAE": ".analysis.sae",
    "SAEFeatures": ".analysis.sae",
    "sae_features": ".analysis.sae",
    "ControlVector": ".analysis.steering",
    "Trace": ".engine.trace",
}

__all__ = ["ControlVector", "Fidelity", "Generation", "HeadScores", "InputError", "Model", "NativeLibraryError",
           "PyinterpError", "SAE", "SAEFeatures", "Trace", "build_info", "draw_attention", "head_scores",
           "sae_features", "steering"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    elif name == "steering":
        value = importlib.import_module(".analysis.steering", __name__)
    else:
        raise AttributeError(f"module 'pyinterp' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
