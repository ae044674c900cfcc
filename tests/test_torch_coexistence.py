"""pyinterp and torch in one process, in both import orders: researchers keep the reference, SAEs and probes
beside a model. Each order runs in a fresh interpreter, so a crash (an abort, a segfault) fails the test
instead of taking pytest down. With a CUDA torch and a CUDA build, both sides use the GPU
(PYINTERP_N_GPU_LAYERS=-1 puts the model there)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pyinterp.engine import _ffi

PROMPT = "The capital of France is"

TORCH_WORK = [
    'x = torch.arange(6.0, device="cuda" if torch.cuda.is_available() else "cpu")',
    "assert float((x * 2).sum()) == 30.0",
]
PYINTERP_FIRST = [
    "import numpy as np",
    "import pyinterp",
    'model = pyinterp.Model("smollm2", n_ctx=64)',
    f"before = model.run({PROMPT!r}).logits",
    "import torch",
    *TORCH_WORK,
    f"np.testing.assert_array_equal(model.run({PROMPT!r}).logits, before)",
    "model.close()",
]
TORCH_FIRST = [
    "import torch",
    *TORCH_WORK,
    "import pyinterp",
    'with pyinterp.Model("smollm2", n_ctx=64) as model:',
    f"    logits = torch.from_numpy(model.run({PROMPT!r}).logits[-1])",
    '    assert model.token_str(int(logits.argmax())) == " Paris"',
]


@pytest.mark.parametrize("lines", [PYINTERP_FIRST, TORCH_FIRST], ids=["pyinterp-first", "torch-first"])
def test_torch_in_the_same_process(lines):
    code = "\n".join([*lines, 'print("ok")'])
    done = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", \
        f"exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF and readelf: Linux only")
def test_elf_needed_matches_readelf():
    """The ELF reader that finds ggml-cuda's CUDA runtime libraries, against binutils on pyinterp's own libraries."""
    libs = sorted(Path(_ffi.LIB_DIR).glob("*.so"))
    names = {lib.name for lib in libs}
    assert {"libpyinterp_native.so", "libllama.so", "libggml-base.so"} <= names, names
    assert any(name.startswith("libggml-cpu") for name in names), names
    for lib in libs:
        out = subprocess.run(["readelf", "-d", str(lib)], stdout=subprocess.PIPE, text=True, check=True).stdout
        want = [line.split("[")[1].split("]")[0] for line in out.splitlines() if "(NEEDED)" in line]
        assert _ffi.elf_needed(lib) == want, lib.name
        assert want, lib.name
