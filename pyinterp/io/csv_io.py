"""CSV tables pyinterp writes (the lens, the attribution, the sweeps): one writer, complete files only."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from pyinterp.errors import PyinterpError
from pyinterp.io.atomic import atomic_write


def write_csv(path: str | os.PathLike, header: list[str], rows: list[list]) -> Path:
    """Write ``rows`` under ``header`` (written whole or not at all); a one-line error when it cannot be written."""
    try:
        with atomic_write(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
    except OSError as e:
        raise PyinterpError(f"cannot write CSV to {path}: {e.strerror}") from None
    return Path(path)
