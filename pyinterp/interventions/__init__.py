"""Interventions as objects, one kind per module; each compiles to records of the native op table
(:class:`Op`). A new kind is one module here (and a native op only if it needs a new ggml recipe)."""

from .ablate import AblateHeads
from .add import AddVector
from .base import Intervention, Op, Target
from .capture import Capture
from .head_patch import PatchHead
from .isolate import IsolateHead
from .patch import PatchRow

__all__ = ["AblateHeads", "AddVector", "Capture", "Intervention", "IsolateHead", "Op", "PatchHead", "PatchRow", "Target"]
