"""Saving and loading captured tensors in the formats the command line uses.

The format follows the file name:
- ``.npy``: one array (numpy's format);
- ``.npz``: one array stored under the tensor's name (e.g. ``l_out-12``), checked when it is read back
  for a named target;
- anything else: Llama.MIA's raw format, the float32 values of the tensor row by row (one row per
  token) with no header; reading it needs the row width.
Every format round-trips float32 values bit for bit.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pyinterp.errors import InputError, PyinterpError
from pyinterp.io.atomic import atomic_write

# .npz keys that name no tensor: save_tensor's default and numpy's for an unnamed array (np.savez(path, a))
UNNAMED = ("tensor", "arr_0")


def _kind(path: Path) -> str:
    return path.suffix.lower() if path.suffix.lower() in (".npy", ".npz") else "raw"


def save_tensor(path: str | os.PathLike, array: np.ndarray, name: str = "tensor") -> Path:
    """Write ``array`` (converted to float32) to ``path`` in the format its name says (the extension in any
    case; nothing is appended to the name), whole or not at all; returns the path written."""
    path = Path(path)
    array = np.ascontiguousarray(array, dtype=np.float32)
    try:
        kind = _kind(path)
        with atomic_write(path) as f:
            if kind == ".npy":
                np.save(f, array)
            elif kind == ".npz":
                np.savez(f, **{name: array})
            else:
                f.write(array.tobytes())
    except OSError as e:
        raise PyinterpError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def load_tensor(path: str | os.PathLike, width: int, name: str | None = None) -> np.ndarray:
    """Read a tensor written by :func:`save_tensor` (or Llama.MIA) as ``[n_rows, width]`` float32.

    ``name`` is the target (e.g. ``l_out-12``): a ``.npz`` that stores another tensor's name is an error.
    """
    path = Path(path)
    try:
        kind = _kind(path)
        if kind == ".npy":
            array = np.load(path)
        elif kind == ".npz":
            with np.load(path) as archive:
                keys = list(archive.keys())
                key = name if name in keys else (keys[0] if len(keys) == 1 else None)
                if key is None:
                    raise InputError(f"{path} holds {keys}; none is {name!r}")
                array = archive[key]
                if name is not None and key != name and key not in UNNAMED:
                    raise InputError(f"{path} holds {key} (shape {list(array.shape)}), not {name} (rows of {width} "
                                     f"values); .npy and raw files carry no name")
        else:
            array = np.fromfile(path, dtype=np.float32)
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise InputError(f"{path} is not a valid {kind.lstrip('.')} file: {e}") from None
    array = np.asarray(array, dtype=np.float32)
    if array.ndim > 1 and array.shape[-1] != width:
        raise InputError(f"{path} has rows of {array.shape[-1]} values, the tensor's rows have {width}")
    if array.size == 0 or array.size % width != 0:
        raise InputError(f"{path} holds {array.size} values, not whole rows of {width}")
    return array.reshape(-1, width)
