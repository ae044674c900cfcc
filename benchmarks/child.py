"""Running one side of a benchmark in a child process: its result (an .npz it writes) and its peak RSS."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np


def run_child(side: str, argv: list[str], out: Path) -> tuple[dict[str, np.ndarray], float]:
    """Run ``argv`` (``argv[0]``: the interpreter) to completion; the arrays it wrote to ``out`` and its peak RSS in
    MiB (``ru_maxrss`` of that child from ``wait4``: KiB on Linux, bytes on macOS)."""
    pid = os.spawnv(os.P_NOWAIT, argv[0], argv)
    _, status, usage = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"the {side} side failed (exit status {os.waitstatus_to_exitcode(status)})")
    with np.load(out) as result:
        return dict(result), usage.ru_maxrss / (1 << 20 if sys.platform == "darwin" else 1 << 10)
