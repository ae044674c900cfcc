"""The native API is declared once, in pyinterp/csrc/interp.h; pyinterp/_ffi.py hands that header to cffi. A
declaration the library does not export would fail only when called: every one must resolve."""

from __future__ import annotations

import re

from pyinterp import _ffi


def test_every_declared_function_is_exported():
    names = re.findall(r"\b(pi_\w+)\s*\(", _ffi.pi_declarations(_ffi.HEADER.read_text()))
    assert len(names) >= 20, names
    for name in names:
        assert callable(getattr(_ffi.lib, name)), name

