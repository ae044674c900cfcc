"""scripts/tiny_gguf.py's matrix types: llama.cpp loads the file with the spec's shapes and the requested
type, and a Q4_0 model (the benchmark's ``llama-1b`` type, written here at the tiny size) runs in llama.cpp
as transformers reads it. Q8_0 models of every architecture are checked against the reference in
test_architectures.py."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import numpy as np
import pytest

import pyinterp
from pyinterp.engine import _ffi
from conftest import check_logits_attention_residual

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import tiny_gguf  # noqa: E402


class _Lines(logging.Handler):
    """Keeps the log lines it is given."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _load_logged(path: Path) -> tuple[pyinterp.Model, str]:
    """The model on one thread and llama.cpp's load log."""
    handler = _Lines()
    llama_log = logging.getLogger("pyinterp.llama")
    llama_log.addHandler(handler)
    try:
        model = pyinterp.Model(path, n_ctx=64, n_threads=1, verbose=True)
    finally:
        llama_log.removeHandler(handler)
    _ffi.set_verbose(False)  # llama.cpp quiet again for the tests that follow
    return model, "\n".join(handler.lines)


@pytest.mark.parametrize("quant", ["q4_0", "q8_0"])
def test_llama_cpp_loads_requested_type_and_shapes(tmp_path, quant):
    spec = tiny_gguf.SPECS["llama"]
    path = tiny_gguf.write("llama", tmp_path / f"llama-{quant}.gguf", quant=quant)
    model, log = _load_logged(path)
    with model:
        assert (model.n_layer, model.n_embd, model.n_head, model.n_head_kv) == (
            spec.n_layer, spec.n_embd, spec.n_head, spec.n_head_kv)
        assert re.search(rf"n_ff\s*=\s*{spec.n_ff}\b", log)
        assert re.search(rf"n_embd_head_k\s*=\s*{spec.head_dim}\b", log)
        # tied: the token embedding plus q, k, v, output, gate, up and down per layer; the norms stay F32
        assert re.search(rf"type\s+{quant}:\s+{1 + 7 * spec.n_layer} tensors", log)
        assert re.search(rf"type\s+f32:\s+{1 + 2 * spec.n_layer} tensors", log)
        assert np.isfinite(model.run(model.tokenize("The capital of France is"), logits="last").logits).all()


def test_q4_0_agrees_with_reference(tmp_path):
    """llama.cpp's Q4_0 kernels against transformers' own Q4_0 dequantization of the same file."""
    from reference import Reference

    path = tiny_gguf.write("llama", tmp_path / "llama-q4_0.gguf", quant="q4_0")
    with pyinterp.Model(path, n_ctx=64, n_threads=1) as model:
        ids = model.tokenize("When Mary and John went to the store, John gave a drink to")
        check_logits_attention_residual(model, Reference(path), ids)


def test_unknown_type_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no matrix type 'q3_k'"):
        tiny_gguf.write("llama", tmp_path / "x.gguf", quant="q3_k")
    # a K-quant block is 256 values: the tiny widths (64, 176) are not rows of whole blocks
    with pytest.raises(ValueError, match="q5_k needs widths that are multiples of 256"):
        tiny_gguf.write("llama", tmp_path / "x.gguf", quant="q5_k")
    assert not (tmp_path / "x.gguf").exists()
