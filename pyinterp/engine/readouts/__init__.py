"""Readouts: what a pass computes inside the ggml graph and reads back (the :class:`pyinterp.engine.Readout`
protocol), one file each: the logit lens, the logit attribution, an SAE's encoding and edits, the frozen norms and
attention of a local replacement model, transcoders replacing the MLPs. Each is the Python half of a native recipe (``pyinterp/csrc``: one C file each). A new readout is one file here (+ one C file)."""

from pyinterp.engine.readouts.attribution import AttributionReadout
from pyinterp.engine.readouts.freeze import Frozen, NormScales
from pyinterp.engine.readouts.lens import LensReadout
from pyinterp.engine.readouts.sae import SAEReadout, upload_sae
from pyinterp.engine.readouts.transcoder import TranscoderReadout, upload_transcoder

__all__ = ["AttributionReadout", "Frozen", "LensReadout", "NormScales", "SAEReadout", "TranscoderReadout", "upload_sae",
           "upload_transcoder"]
