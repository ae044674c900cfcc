"""The native API is written twice, in pyinterp/csrc/interp.h (for the C compiler) and in the cffi cdef of
pyinterp/_ffi.py (for Python); a signature that differs between them is a crash, not an error. They must match."""

from __future__ import annotations

import re
from pathlib import Path

from pyinterp import _ffi

HEADER = Path(__file__).resolve().parent.parent / "pyinterp" / "csrc" / "interp.h"


def declarations(text: str) -> dict[str, str]:
    """pi_* function declarations, whitespace-normalised, by name."""
    text = re.sub(r"//[^\n]*|/\*.*?\*/|^[ \t]*#[^\n]*", "", text, flags=re.S | re.M).replace("PI_API", "")
    out = {}
    for decl in text.split(";"):
        m = re.search(r"\b(pi_\w+)\s*\(", decl)
        if m:
            out[m.group(1)] = re.sub(r"\s*([(),*])\s*", r"\1", " ".join(decl.split()))
    return out


def test_cdef_matches_the_header():
    header = declarations(HEADER.read_text())
    cdef = declarations(_ffi.CDEF)
    assert header, "no pi_ declarations found in interp.h"
    assert sorted(header) == sorted(cdef)
    for name, decl in header.items():
        assert cdef[name] == decl, name
