"""pyinterp: mechanistic interpretability for local GGUF models on a patched llama.cpp."""

from . import steering
from ._ffi import build_info
from .attention import draw_attention
from .errors import InputError, PyinterpError
from .fidelity import Fidelity  # the function is pyinterp.fidelity.fidelity (the module keeps its name)
from .heads import HeadScores, head_scores
from .model import Generation, Model
from .sae import SAE, SAEFeatures, sae_features
from .steering import ControlVector
from .trace import Trace

__all__ = ["ControlVector", "Fidelity", "Generation", "HeadScores", "InputError", "Model", "PyinterpError", "SAE", "SAEFeatures", "Trace",
           "build_info", "draw_attention", "head_scores", "sae_features"]
__version__ = "0.1.0"
