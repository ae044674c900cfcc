"""Circuit tracing on GGUF: transcoders for the MLPs, and attribution graphs of their local replacement model.

    graph = attribution_graph(model, "The capital of France is", load_transcoders("tc/"))
    node_mask, edge_mask, cumulative = prune_graph(graph)
    replacement, completeness = graph_scores(graph)
"""

from pyinterp.circuit.build import attribution_graph
from pyinterp.circuit.check import check_features
from pyinterp.circuit.export import write_graph_files
from pyinterp.circuit.graph import AttributionGraph
from pyinterp.circuit.prune import graph_scores, prune_graph
from pyinterp.circuit.transcoder import Transcoder, TranscoderSet, random_transcoders
from pyinterp.circuit.transcoder_io import load_transcoders, save_transcoders
from pyinterp.circuit.view import write_view

__all__ = ["AttributionGraph", "Transcoder", "TranscoderSet", "attribution_graph", "check_features", "graph_scores",
           "load_transcoders", "prune_graph", "random_transcoders", "save_transcoders", "write_graph_files",
           "write_view"]
