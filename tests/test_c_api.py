"""The native API is declared once, in pyinterp/csrc/interp.h; pyinterp/_ffi.py hands that header to cffi. A
declaration the library does not export would fail only when called: every one must resolve."""

from __future__ import annotations

import re

from pyinterp import _ffi
from pyinterp.interventions.base import OP_KINDS


def test_every_declared_function_is_exported():
    names = re.findall(r"\b(pi_\w+)\s*\(", _ffi.pi_declarations(_ffi.HEADER.read_text()))
    assert len(names) >= 20, names
    for name in names:
        assert callable(getattr(_ffi.lib, name)), name



def test_op_kinds_are_the_c_enum():
    """The op kinds are declared once, in interp.h's enum pi_op_kind; the Python names come from it."""
    enum = _ffi.ffi.typeof("enum pi_op_kind").relements
    assert OP_KINDS == {name.removeprefix("PI_OP_").lower(): value for name, value in enum.items()}
    assert set(OP_KINDS) == {"capture", "mul", "set", "add", "inject"}
