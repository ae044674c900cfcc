"""The portable build: one CPU backend per instruction-set level, the best chosen at import, a forced one
(the baseline, as on an older CPU) giving the same answers; and the AMX path (patches 0006 and 0007).

Each run that loads another CPU variant, or AMX, runs in a fresh interpreter: a variant is chosen once per
process, and a crash (SIGILL, SIGSEGV) then fails the test instead of taking pytest down.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

import pyinterp
from pyinterp.engine import _backends, _ffi

PROMPT = "The capital of France is"

# last-position logits of SmolLM2 (Q4_1) in a child process, and what it loaded, as JSON on stdout
CHILD = f"""
import json, pyinterp
with pyinterp.Model("smollm2", n_ctx=64, verbose=True) as model:
    logits = model.run({PROMPT!r}).logits[-1]
info = pyinterp.build_info()
print(json.dumps({{"variant": info["cpu_variant"], "logits": logits.tolist()}}))
"""


def child_logits(*, emulate: str | None = None, **env: str) -> tuple[str, np.ndarray, str]:
    """(variant loaded, last logits [n_vocab], llama.cpp's log) of CHILD run with the extra environment; with
    ``emulate``, on that CPU model under qemu's user-mode emulator."""
    prefix = ["qemu-x86_64", "-cpu", emulate] if emulate else []
    done = subprocess.run([*prefix, sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=900,
                          env={**os.environ, **env})
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stderr[-3000:]}"
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return out["variant"], np.array(out["logits"], dtype=np.float32), done.stderr


def test_the_build_ships_a_variant_per_level_and_loads_one():
    info = pyinterp.build_info()
    assert info["cpu_variant"] in info["cpu_variants"] or info["cpu_variant"] == _backends.NATIVE_VARIANT
    assert "CPU" in info["loaded"] and info["devices"]
    if len(info["cpu_variants"]) > 1 and info["cpu_variants"][0] == "x64":
        # x86-64: from the SSE2 baseline to AVX512 and AMX, so a wheel runs on any x86-64 CPU
        assert {"x64", "haswell", "skylakex", "sapphirerapids"} <= set(info["cpu_variants"])


def test_the_best_variant_is_the_highest_score():
    variants = _backends.cpu_modules(_ffi.LIB_DIR, _ffi.MODULE_PREFIX, _ffi.MODULE_SUFFIX)
    scores = {name: _backends.variant_score(path) for name, path in variants.items()}
    assert scores[pyinterp.build_info()["cpu_variant"]] == max(scores.values()) > 0


@pytest.mark.skipif("x64" not in pyinterp.build_info()["cpu_variants"], reason="no x86-64 baseline variant in this build")
def test_the_baseline_variant_gives_the_same_answer():
    """What a CPU older than the building one runs: SSE2 only. Other kernels, other rounding, the same model."""
    default, ref, _ = child_logits()
    variant, base, _ = child_logits(PYINTERP_CPU_VARIANT="x64")
    assert variant == "x64" and default != "x64"
    assert np.isfinite(base).all()
    assert int(np.argmax(base)) == int(np.argmax(ref))
    assert np.corrcoef(base, ref)[0, 1] > 0.999
    assert np.abs(base - ref).max() < 1.0


@pytest.mark.skipif(shutil.which("qemu-x86_64") is None or "haswell" not in pyinterp.build_info()["cpu_variants"],
                    reason="needs qemu-user (apt-get install qemu-user; .ci/run installs it) and an x86-64 build")
def test_runs_on_an_emulated_older_cpu():
    """The library built here, run on an emulated Haswell (AVX2, no AVX512; qemu's user-mode emulator): it loads
    the haswell variant and gives this CPU's answer. A -march=native build from an AVX512 machine dies there."""
    _, ref, _ = child_logits()
    variant, old, _ = child_logits(emulate="Haswell-v4")
    assert variant == "haswell"
    assert int(np.argmax(old)) == int(np.argmax(ref))
    assert np.corrcoef(old, ref)[0, 1] > 0.999


def test_a_variant_this_build_lacks_is_one_line():
    done = subprocess.run([sys.executable, "-m", "pyinterp", "-p", PROMPT], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYINTERP_CPU_VARIANT": "pentium"})
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "PYINTERP_CPU_VARIANT=pentium: no such CPU variant" in done.stderr and "Traceback" not in done.stderr


def amx_tile_config() -> bytes:
    """The 64-byte tile configuration ggml's AMX kernels need, from Intel's layout (palette 1; colsb as uint16,
    rows as uint8 per tile): B tiles 0-1 are 8 x 64 bytes, A tiles 2-3 16 x 32, C tiles 4-7 16 x 16 int32."""
    colsb = [64, 64, 32, 32, 64, 64, 64, 64] + [0] * 8
    rows = [8, 8, 16, 16, 16, 16, 16, 16] + [0] * 8
    return bytes([1, 0]) + bytes(14) + struct.pack("<16H", *colsb) + bytes(rows)


@pytest.mark.skipif("sapphirerapids" not in pyinterp.build_info()["cpu_variants"], reason="no AMX variant in this build")
def test_the_amx_tile_config_is_in_the_library():
    """Patch 0006: GCC dropped the stores that built the config on the stack, so ldtilecfg loaded an empty one.
    Kept as constant data, the whole configuration is in the library's read-only data."""
    path = _ffi.LIB_DIR / f"{_ffi.MODULE_PREFIX}cpu-sapphirerapids{_ffi.MODULE_SUFFIX}"
    assert amx_tile_config() in path.read_bytes()


@pytest.mark.skipif(not _backends.cpu_has_amx(), reason="no AMX on this CPU")
def test_amx_matches_the_non_amx_path():
    """On a CPU with AMX: the default keeps AMX off (patch 0007); GGML_CPU_AMX=1 runs the repacked weights through
    ggml's AMX kernels, which must agree with the AVX512 kernels of the same variant."""
    _, plain, log = child_logits()
    assert "AMX model buffer" not in log
    _, amx, log = child_logits(GGML_CPU_AMX="1")
    assert "AMX model buffer" in log, "GGML_CPU_AMX=1 did not put the weights in AMX buffers"
    assert np.isfinite(amx).all()
    assert int(np.argmax(amx)) == int(np.argmax(plain))
    assert np.corrcoef(amx, plain)[0, 1] > 0.999
