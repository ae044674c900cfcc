"""Checks of the public API's arguments: one function per kind of value, each returning the value in its plain
Python form or raising :class:`InputError` with a one-line message. numpy scalars count as numbers; bools do
not count as integers or numbers; floats must be finite."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Callable

import numpy as np

from pyinterp.errors import InputError

C_INT_MAX = 2**31 - 1  # the largest value the native layer's int arguments take


def show(value: object, width: int = 60) -> str:
    """``repr(value)`` on one line, cut to ``width`` characters."""
    text = " ".join(repr(value).split())
    return text if len(text) <= width else text[:width - 3] + "..."


def is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_int(value: object, what: str, lo: int | None = None, hi: int | None = C_INT_MAX) -> int:
    """An integer in ``lo..hi`` (either bound None: none)."""
    if not is_int(value):
        raise InputError(f"{what} must be an integer, got {show(value)}")
    value = int(value)
    if lo is not None and value < lo:
        raise InputError(f"{what} must be at least {lo}, got {value}")
    if hi is not None and value > hi:
        raise InputError(f"{what} must be at most {hi}, got {value}")
    return value


def check_float(value: object, what: str, lo: float | None = None) -> float:
    """A finite number (int, float or numpy scalar), at least ``lo`` when given."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InputError(f"{what} must be a number, got {show(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise InputError(f"{what} must be a finite number, got {value}")
    if lo is not None and value < lo:
        raise InputError(f"{what} must be >= {lo}, got {value}")
    return value


def check_bool(value: object, what: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise InputError(f"{what} must be True or False, got {show(value)}")
    return bool(value)


def check_str(value: object, what: str, choices: Sequence[str] | None = None) -> str:
    """A string, one of ``choices`` when given."""
    if not isinstance(value, str) or (choices is not None and value not in choices):
        form = "a string" if choices is None else f"one of {', '.join(map(str, choices))}"
        raise InputError(f"{what} must be {form}, got {show(value)}")
    return value


def check_callable(value: object, what: str) -> Callable | None:
    """A function or None."""
    if value is not None and not callable(value):
        raise InputError(f"{what} must be a function or None, got {show(value)}")
    return value


def check_finite(values: object, what: str) -> np.ndarray:
    """``values`` (an array or nested sequence of numbers) as a float32 array with no NaN or infinity."""
    try:
        array = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be numbers, got {show(values)}") from None
    if not np.all(np.isfinite(array)):
        raise InputError(f"{what} has NaN or infinite values")
    return array


def check_prompt(value: object) -> str | list[int]:
    """A prompt: a text, or a sequence (or 1-D array) of integer token ids."""
    if isinstance(value, str):
        return value
    if isinstance(value, np.ndarray) and value.ndim != 1:
        raise InputError(f"a prompt of token ids must be 1-D, got an array of shape {list(value.shape)}")
    if isinstance(value, (bytes, bytearray)) or not isinstance(value, (Sequence, np.ndarray)):
        raise InputError(f"a prompt is a text or a list of token ids, got {show(value)}")
    if len(value) and all(isinstance(i, str) for i in value):
        raise InputError(f"a pass takes one prompt (a text or a list of token ids), got a list of {len(value)} texts: "
                         f"run them one by one")
    bad = [i for i in value if not is_int(i)]
    if bad:
        raise InputError(f"token ids must be integers, got {show(bad[0])}")
    return [int(i) for i in value]


def check_intervention(value: object) -> object:
    """An intervention: an object with an ``ops(target)`` method (see :mod:`pyinterp.interventions`)."""
    if not callable(getattr(value, "ops", None)):
        raise InputError(f"interventions must be pyinterp.interventions objects (AddVector, PatchRow, ...), "
                         f"got {show(value)}")
    return value
