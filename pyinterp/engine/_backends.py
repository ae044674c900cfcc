"""ggml's backend modules shipped in pyinterp/lib, and which of them this process loads.

Every backend is a module loaded at run time (``GGML_BACKEND_DL``): ``libggml-cpu-<variant>.so``, one per
instruction-set level, and ``libggml-{cuda,metal,blas,rpc}.so`` where they were built. A ``PYINTERP_NATIVE=ON``
build links its backends into libggml instead (ggml cannot load a -march=native CPU backend as a module).
Each CPU variant exports ``ggml_backend_score``: 0 when this CPU lacks an instruction the variant was compiled for, else higher for a richer instruction set.
pyinterp loads the highest-scoring variant, as llama.cpp's ``ggml_backend_load_all`` does, and remembers its
name; ``PYINTERP_CPU_VARIANT=<name>`` forces one (e.g. ``x64``, the baseline, to check a build on an older CPU).
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field
from pathlib import Path

from pyinterp.errors import NativeLibraryError

NATIVE_VARIANT = "native"


@dataclass
class Loaded:
    """What this process loaded: the CPU variant's name and the backends' registry names."""
    cpu_variant: str = ""
    backends: list[str] = field(default_factory=list)


def cpu_modules(lib_dir: Path, prefix: str, suffix: str) -> dict[str, Path]:
    """The CPU backend modules in lib_dir: {variant name: path}."""
    return {path.name[len(prefix) + len("cpu-"):-len(suffix)]: path
            for path in sorted(lib_dir.glob(f"{prefix}cpu-*{suffix}"))}


def other_modules(lib_dir: Path, prefix: str, suffix: str) -> list[Path]:
    """The non-CPU backend modules in lib_dir (cuda, metal, blas, rpc, ...)."""
    return [p for p in sorted(lib_dir.glob(f"{prefix}*{suffix}"))
            if not p.name[len(prefix):].startswith(("cpu", "base"))]


def variant_score(path: Path) -> int:
    """ggml_backend_score() of a CPU module: 0 if this CPU cannot run it. Loading it runs none of its kernels."""
    handle = ctypes.CDLL(str(path), mode=getattr(os, "RTLD_LOCAL", 0))
    score = handle.ggml_backend_score
    score.restype = ctypes.c_int
    return int(score())


def choose_cpu_variant(variants: dict[str, Path], forced: str | None) -> str:
    """The variant to load: the forced one (checked), else the best this CPU runs."""
    if not variants:
        raise NativeLibraryError("pyinterp ships no CPU backend (no libggml-cpu*); reinstall with `pip install .`")
    if forced:
        if forced not in variants:
            raise NativeLibraryError(f"PYINTERP_CPU_VARIANT={forced}: no such CPU variant in this build "
                              f"(it has {', '.join(variants)})")
        if variant_score(variants[forced]) == 0:
            raise NativeLibraryError(f"PYINTERP_CPU_VARIANT={forced}: this CPU lacks instructions that variant uses")
        return forced
    scores = {name: variant_score(path) for name, path in variants.items()}
    best = max(scores, key=scores.get)
    if scores[best] == 0:
        raise NativeLibraryError(f"no CPU variant of this build runs on this CPU (it has {', '.join(variants)})")
    return best


def load(ffi, lib, lib_dir: Path, prefix: str, suffix: str, backend_dl: bool) -> Loaded:
    """Load the backends into ggml's registry: every non-CPU module that loads here, then the chosen CPU variant.
    A native build (``backend_dl`` false) links its backends into libggml: there is nothing to load."""
    loaded = Loaded(cpu_variant=NATIVE_VARIANT)
    if backend_dl:
        for path in other_modules(lib_dir, prefix, suffix):
            lib.ggml_backend_load(str(path).encode())  # NULL where it cannot load here (CUDA without a driver)
        variants = cpu_modules(lib_dir, prefix, suffix)
        loaded.cpu_variant = choose_cpu_variant(variants, os.environ.get("PYINTERP_CPU_VARIANT"))
        if lib.ggml_backend_load(str(variants[loaded.cpu_variant]).encode()) == ffi.NULL:
            raise NativeLibraryError(f"could not load the CPU backend {variants[loaded.cpu_variant]}")
    elif os.environ.get("PYINTERP_CPU_VARIANT"):
        raise NativeLibraryError("PYINTERP_CPU_VARIANT: this is a native build (PYINTERP_NATIVE=ON), with one CPU backend")
    loaded.backends = [ffi.string(lib.ggml_backend_reg_name(lib.ggml_backend_reg_get(i))).decode()
                       for i in range(lib.ggml_backend_reg_count())]
    return loaded


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Linux: the ``amx_tile`` flag of /proc/cpuinfo; False elsewhere)."""
    try:
        return " amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
