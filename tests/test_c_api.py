"""The native API is declared once, in pyinterp/csrc/interp.h; pyinterp/engine/_ffi.py hands that header to cffi. A
declaration the library does not export would fail only when called: every one must resolve."""

from __future__ import annotations

import re

from pyinterp.engine import _ffi
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


def test_every_native_source_is_built_and_every_recipe_listed():
    """CMakeLists.txt builds every pyinterp/csrc/*.c, and recipes.c's table lists every recipe a file defines."""
    csrc = _ffi.HEADER.parent
    cmake = (csrc.parents[1] / "CMakeLists.txt").read_text()
    built = re.search(r"add_library\(pyinterp_native SHARED(.*?)\)", cmake, re.S).group(1).split()
    assert sorted(built) == sorted(f"pyinterp/csrc/{p.name}" for p in csrc.glob("*.c"))
    defined = {m for p in csrc.glob("*.c") for m in re.findall(r"^const struct pi_recipe (pi_recipe_\w+) =",
                                                               p.read_text(), re.M)}
    table = re.search(r"pi_recipes\[\] = \{(.*?)\};", (csrc / "recipes.c").read_text(), re.S).group(1)
    assert len(defined) >= 5 and defined == set(re.findall(r"&(pi_recipe_\w+)", table))
