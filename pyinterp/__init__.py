"""pyinterp: mechanistic interpretability for local GGUF models on a patched llama.cpp."""

from .errors import InputError, PyinterpError
from .model import Generation, Model
from .trace import Trace

__all__ = ["Generation", "InputError", "Model", "PyinterpError", "Trace"]
__version__ = "0.1.0"
