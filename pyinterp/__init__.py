"""pyinterp: mechanistic interpretability for local GGUF models on a patched llama.cpp."""

from ._ffi import build_info
from .attention import draw_attention
from .errors import InputError, PyinterpError
from .model import Generation, Model
from .trace import Trace

__all__ = ["Generation", "InputError", "Model", "PyinterpError", "Trace", "build_info", "draw_attention"]
__version__ = "0.1.0"
