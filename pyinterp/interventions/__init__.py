"""Interventions as objects, one kind per module; each compiles to records of the native op table
(:class:`Op`). A new kind is one module here (and a native op only if it needs a new ggml recipe)."""

from pyinterp.interventions.ablate import AblateHeads
from pyinterp.interventions.add import AddVector
from pyinterp.interventions.base import Intervention, Op, Target
from pyinterp.interventions.capture import Capture
from pyinterp.interventions.head_patch import PatchHead
from pyinterp.interventions.isolate import IsolateHead
from pyinterp.interventions.mean_ablate import MeanAblate
from pyinterp.interventions.patch import PatchRow
from pyinterp.interventions.reference import Reference
from pyinterp.interventions.resample_ablate import ResampleAblate

__all__ = ["AblateHeads", "AddVector", "Capture", "Intervention", "IsolateHead", "MeanAblate", "Op", "PatchHead",
           "PatchRow", "Reference", "ResampleAblate", "Target"]
