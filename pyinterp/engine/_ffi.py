"""cffi declarations of exactly the C API pyinterp uses, and the packaged libraries that provide it.

The libraries (patched llama.cpp, ggml and pyinterp's own ``libpyinterp_native``) are built by
``pip install .`` into ``pyinterp/lib`` and loaded from there by path, never from the system.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import json
import logging
import os
import struct
import sys
from pathlib import Path

import cffi

from pyinterp.engine import _backends
from pyinterp.errors import NativeLibraryError

# the part of llama.cpp's C API pyinterp calls; pyinterp's own is read from its header (pi_declarations)
CDEF = """
    typedef int32_t llama_token;
    struct llama_model;
    struct llama_context;
    struct llama_vocab;
    struct llama_memory_i;
    typedef struct llama_memory_i * llama_memory_t;
    typedef void (*ggml_log_callback)(int level, const char * text, void * user_data);

    void llama_backend_init(void);
    void llama_log_set(ggml_log_callback log_callback, void * user_data);

    void llama_model_free(struct llama_model * model);
    void llama_free(struct llama_context * ctx);

    const struct llama_vocab * llama_model_get_vocab(const struct llama_model * model);
    int32_t llama_model_n_ctx_train(const struct llama_model * model);
    int32_t llama_model_n_embd   (const struct llama_model * model);
    int32_t llama_model_n_layer  (const struct llama_model * model);
    int32_t llama_model_n_head   (const struct llama_model * model);
    int32_t llama_model_n_head_kv(const struct llama_model * model);
    int32_t llama_model_n_swa    (const struct llama_model * model);
    int32_t llama_model_meta_val_str(const struct llama_model * model, const char * key, char * buf, size_t buf_size);
    uint32_t llama_n_ctx(const struct llama_context * ctx);

    int32_t     llama_vocab_n_tokens   (const struct llama_vocab * vocab);
    bool        llama_vocab_get_add_bos(const struct llama_vocab * vocab);
    llama_token llama_vocab_bos        (const struct llama_vocab * vocab);
    llama_token llama_vocab_eos        (const struct llama_vocab * vocab);
    bool        llama_vocab_is_eog     (const struct llama_vocab * vocab, llama_token token);
    int32_t     llama_vocab_get_attr   (const struct llama_vocab * vocab, llama_token token);  /* enum llama_token_attr */
    int32_t llama_tokenize(const struct llama_vocab * vocab, const char * text, int32_t text_len,
                           llama_token * tokens, int32_t n_tokens_max, bool add_special, bool parse_special);
    int32_t llama_token_to_piece(const struct llama_vocab * vocab, llama_token token, char * buf, int32_t length,
                                 int32_t lstrip, bool special);
    int32_t llama_detokenize(const struct llama_vocab * vocab, const llama_token * tokens, int32_t n_tokens,
                             char * text, int32_t text_len_max, bool remove_special, bool unparse_special);

    typedef struct ggml_backend_device * ggml_backend_dev_t;
    typedef struct ggml_backend_reg * ggml_backend_reg_t;
    ggml_backend_dev_t llama_model_layer_dev(const struct llama_model * model, int32_t il);
    const char * ggml_backend_dev_name(ggml_backend_dev_t device);
    const char * ggml_backend_dev_description(ggml_backend_dev_t device);
    size_t ggml_backend_dev_count(void);
    ggml_backend_dev_t ggml_backend_dev_get(size_t index);
    ggml_backend_reg_t ggml_backend_load(const char * path);
    size_t ggml_backend_reg_count(void);
    ggml_backend_reg_t ggml_backend_reg_get(size_t index);
    const char * ggml_backend_reg_name(ggml_backend_reg_t reg);

    llama_memory_t llama_get_memory(const struct llama_context * ctx);
    void llama_memory_clear(llama_memory_t mem, bool data);
    bool llama_memory_seq_rm(llama_memory_t mem, int32_t seq_id, int32_t p0, int32_t p1);
    void llama_memory_seq_cp(llama_memory_t mem, int32_t seq_id_src, int32_t seq_id_dst, int32_t p0, int32_t p1);
    float * llama_get_logits(struct llama_context * ctx);
    void llama_set_attn_explicit(struct llama_context * ctx, int32_t il, bool value);
    int32_t llama_set_adapter_cvec(struct llama_context * ctx, const float * data, size_t len, int32_t n_embd,
                                   int32_t il_start, int32_t il_end);

    """
PACKAGE = Path(__file__).resolve().parents[1]  # pyinterp/
HEADER = PACKAGE / "csrc" / "interp.h"


def pi_declarations(header: str) -> str:
    """pyinterp's C API for cffi: interp.h without its preprocessor lines and visibility macro."""
    lines = [line for line in header.splitlines() if not line.lstrip().startswith("#")]
    return "\n".join(lines).replace("PI_API ", "")


ffi = cffi.FFI()
ffi.cdef(CDEF + pi_declarations(HEADER.read_text()))

# file names of the shared libraries and of ggml's backend modules (CMake names modules *.so on macOS too)
if sys.platform == "win32":
    SHARED_PREFIX, SHARED_SUFFIX, MODULE_PREFIX, MODULE_SUFFIX = "", ".dll", "ggml-", ".dll"
elif sys.platform == "darwin":
    SHARED_PREFIX, SHARED_SUFFIX, MODULE_PREFIX, MODULE_SUFFIX = "lib", ".dylib", "libggml-", ".so"
else:
    SHARED_PREFIX, SHARED_SUFFIX, MODULE_PREFIX, MODULE_SUFFIX = "lib", ".so", "libggml-", ".so"


def shared_library(name: str) -> str:
    """The file name of one of pyinterp's shared libraries on this platform: "llama" -> libllama.so."""
    return f"{SHARED_PREFIX}{name}{SHARED_SUFFIX}"


NATIVE = shared_library("pyinterp_native")


def _lib_dir() -> Path:
    """pyinterp/lib next to this file; from a source checkout (no lib/), the installed package's."""
    if os.environ.get("PYINTERP_LIB_DIR"):
        return Path(os.environ["PYINTERP_LIB_DIR"])
    here = PACKAGE / "lib"
    if (here / NATIVE).is_file():
        return here
    try:
        installed = Path(importlib.metadata.distribution("pyinterp").locate_file("pyinterp/lib"))
    except importlib.metadata.PackageNotFoundError:
        return here
    return installed if (installed / NATIVE).is_file() else here


LIB_DIR = _lib_dir()

log = logging.getLogger("pyinterp.llama")
log.addHandler(logging.NullHandler())
log.propagate = False

# ggml_log_level: NONE, DEBUG, INFO, WARN, ERROR, CONT
_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}


def elf_needed(path: Path) -> list[str]:
    """The DT_NEEDED entries (sonames of the libraries it links) of a 64-bit little-endian ELF shared library."""
    data = path.read_bytes()
    if data[:6] != b"\x7fELF\x02\x01":
        raise ImportError(f"{path} is not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    needed = []
    for _, sh_type, _, _, offset, size, link, _, _, _ in sections:
        if sh_type != 6:  # SHT_DYNAMIC; its sh_link is the section of the names
            continue
        strtab = sections[link][4]
        for tag, value in struct.iter_unpack("<qQ", data[offset:offset + size]):
            if tag == 1:  # DT_NEEDED
                needed.append(data[strtab + value:data.index(b"\0", strtab + value)].decode())
    return needed


def _share_cuda_runtime() -> None:
    """Make the CUDA runtime libraries of a CUDA build global, before pyinterp's own libraries load.

    torch's CUDA wheels bring their own copies of libcudart/libcublas (same sonames as the toolkit's that
    ggml-cuda links) and preload some of them by path. With pyinterp's dependencies loaded RTLD_LOCAL, a
    process that imports both ended up with two copies of the CUDA runtime and torch bound some symbols to
    each: "free(): invalid pointer" or a segfault, whichever was imported first. Opened here by soname with
    RTLD_GLOBAL, a copy already loaded (by torch) is reused, or the one ggml-cuda would load becomes the one
    every later library binds to. Only these libraries are made global: pyinterp's own (ggml, llama) stay
    local, so another llama.cpp in the same process does not bind to them.
    """
    cuda = LIB_DIR / "libggml-cuda.so"
    if not sys.platform.startswith("linux") or not cuda.is_file():
        return
    ours = {p.name for p in LIB_DIR.iterdir()}
    for soname in elf_needed(cuda):
        if soname in ours:
            continue
        try:
            ctypes.CDLL(soname, mode=os.RTLD_NOW | os.RTLD_GLOBAL)
        except OSError:
            pass  # loading pyinterp below then fails with the dynamic linker's own message


def _cuda_sums_in_f32() -> None:
    """Have cuBLAS sum in F32 in a CUDA build, unless the user chose otherwise.

    ggml-cuda multiplies F16 matrices (F16 weights; with an F16 KV cache, K·Q and the weighted sum of V on
    the explicit attention path) with cuBLAS in F16 compute mode on GPUs with fast F16: attention drifted from
    the CPU and from an fp32 reference (attention |diff| up to 0.013, 3x the CPU's, measured with F16 caches). ggml reads
    GGML_CUDA_CUBLAS_COMPUTE_TYPE at every such product; "f32" makes cuBLAS accumulate in F32.
    """
    if (LIB_DIR / f"{MODULE_PREFIX}cuda{MODULE_SUFFIX}").is_file():
        os.environ.setdefault("GGML_CUDA_CUBLAS_COMPUTE_TYPE", "f32")


def _load():
    path = LIB_DIR / NATIVE
    if not path.is_file():
        raise NativeLibraryError(f"pyinterp's native library is missing ({path}); install pyinterp with `pip install .`")
    _share_cuda_runtime()
    _cuda_sums_in_f32()
    try:
        return ffi.dlopen(str(path))
    except OSError as e:  # a partial or mismatched install: the dynamic linker's own message, on one line
        raise NativeLibraryError(f"cannot load {path}: {str(e).split('.  Additionally')[0]}") from None


lib = _load()

# error lines llama.cpp logged since clear_errors(), to explain a failure in one line
_errors: list[str] = []
_level = [logging.INFO]


def clear_errors() -> None:
    _errors.clear()


def first_error() -> str:
    """The first error llama.cpp logged since clear_errors(): the cause, before the consequences."""
    return _errors[0] if _errors else ""


@ffi.callback("void(int, const char *, void *)")
def _on_log(level: int, text, user_data) -> None:
    message = ffi.string(text).decode("utf-8", "replace").rstrip("\n")
    if level == 5:  # continuation of the previous line
        level = _level[0]
    else:
        _level[0] = _LEVELS.get(level, logging.INFO)
    if _level[0] >= logging.ERROR and message:
        _errors.append(message)
    if message:
        log.log(_level[0], message)


lib.llama_log_set(_on_log, ffi.NULL)
lib.llama_backend_init()
BUILD_INFO = json.loads((LIB_DIR / "build_info.json").read_text())
LOADED = _backends.load(ffi, lib, LIB_DIR, MODULE_PREFIX, MODULE_SUFFIX, BUILD_INFO["backend_dl"])


def build_info() -> dict:
    """Where the packaged llama.cpp came from, the patches applied to it, the ggml backends and CPU variants
    built, and what this process loaded: ``cpu_variant``, ``loaded`` (backend names), ``devices``; and whether this
    CPU has AMX (``cpu_has_amx``)."""
    info = dict(BUILD_INFO)
    info["cpu_variant"] = LOADED.cpu_variant
    info["loaded"] = list(LOADED.backends)
    info["cpu_has_amx"] = _backends.cpu_has_amx()
    info["devices"] = [f"{ffi.string(lib.ggml_backend_dev_name(d)).decode()} "
                       f"({ffi.string(lib.ggml_backend_dev_description(d)).decode()})"
                       for d in (lib.ggml_backend_dev_get(i) for i in range(lib.ggml_backend_dev_count()))]
    return info


def set_verbose(verbose: bool) -> None:
    """Show llama.cpp's own log on stderr (or hide it again)."""
    for handler in [h for h in log.handlers if h.get_name() == "pyinterp"]:
        log.removeHandler(handler)
    if verbose:
        handler = logging.StreamHandler()
        handler.set_name("pyinterp")
        log.addHandler(handler)
        log.setLevel(logging.DEBUG)
    else:
        log.setLevel(logging.WARNING)
