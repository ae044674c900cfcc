"""The engine layer: the native library (``_ffi``, ``_backends``: which ggml backends and CPU variant load), the
backend that calls it (``backend``), the tensor table (``names``, ``arch``), the pass engine (``core``: :class:`Engine`,
``batch``: its multi-sequence form), the readouts computed in the graph (``readouts``), what a pass returns
(``trace``) and the backend served over ggml RPC (``rpc``). Only this layer touches the native library."""

from pyinterp.engine.core import Engine, ModelLike, PassResult, Readout

__all__ = ["Engine", "ModelLike", "PassResult", "Readout"]
