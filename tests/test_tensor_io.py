"""Tensor files: bit-exact round trips in every format, clear errors for bad files."""

from __future__ import annotations

import numpy as np
import pytest

from pyinterp import InputError, PyinterpError
from pyinterp.io.tensor_io import load_tensor, save_tensor


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


def test_npz_name_is_checked(tmp_path):
    """A .npz stores its tensor's name: reading it for another tensor is an error naming both."""
    a = np.ones((3, 576), dtype=np.float32)
    path = save_tensor(tmp_path / "t.npz", a, "l_out-8")
    with pytest.raises(InputError, match=r"holds l_out-8 \(shape \[3, 576\]\), not l_out-12 \(rows of 576 values\)"):
        load_tensor(path, 576, "l_out-12")
    assert load_tensor(path, 576, "l_out-8").tobytes() == a.tobytes()
    assert load_tensor(path, 576).tobytes() == a.tobytes()  # no target: nothing to check
    np.savez(tmp_path / "unnamed.npz", a)  # numpy's own key, arr_0: no name to check
    assert load_tensor(tmp_path / "unnamed.npz", 576, "l_out-12").tobytes() == a.tobytes()
    save_tensor(tmp_path / "x.npz", a)  # save_tensor's default name
    assert load_tensor(tmp_path / "x.npz", 576, "l_out-12").tobytes() == a.tobytes()
