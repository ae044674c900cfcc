"""Tensor files: bit-exact round trips in every format, clear errors for bad files."""

from __future__ import annotations

import numpy as np
import pytest

from pyinterp import InputError, PyinterpError
from pyinterp.tensor_io import load_tensor, save_tensor


@pytest.mark.parametrize("suffix", [".bin", ".npy", ".npz", ""])
def test_round_trip_bit_exact(tmp_path, suffix):
    rng = np.random.default_rng(1)
    a = rng.normal(size=(7, 576)).astype(np.float32)
    a[0, 0], a[1, 1] = np.float32(1e-42), -0.0  # a denormal and a negative zero survive too
    path = save_tensor(tmp_path / f"t{suffix}", a, "l_out-3")
    b = load_tensor(path, 576, "l_out-3")
    assert b.dtype == np.float32 and b.shape == a.shape
    assert a.tobytes() == b.tobytes()


def test_raw_is_mias_format(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    save_tensor(tmp_path / "t.bin", a)
    assert (tmp_path / "t.bin").read_bytes() == a.tobytes()  # float32 rows, no header


def test_bad_files(tmp_path):
    (tmp_path / "odd.bin").write_bytes(np.zeros(10, dtype=np.float32).tobytes())
    with pytest.raises(InputError, match="not whole rows of 576"):
        load_tensor(tmp_path / "odd.bin", 576)
    np.save(tmp_path / "w.npy", np.zeros((2, 100), dtype=np.float32))
    with pytest.raises(InputError, match="rows of 100 values"):
        load_tensor(tmp_path / "w.npy", 576)
    with pytest.raises(InputError, match="cannot read"):
        load_tensor(tmp_path / "missing.bin", 576)
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(InputError, match="not a valid npy file"):
        load_tensor(tmp_path / "junk.npy", 576)
    with pytest.raises(PyinterpError, match="cannot write"):
        save_tensor(tmp_path / "no" / "dir" / "t.bin", np.zeros((1, 4)))
