"""The documents of a corpus, streamed from disk (never read whole).

A corpus is one of:

- a text file: one document per line (empty lines skipped), or with ``blank_lines`` one document per
  paragraph (lines up to a blank line, joined with newlines);
- a JSONL file (``.jsonl``, or any file when ``field`` is given): one JSON object per line, the document its
  ``field`` (default ``"text"``) string;
- a directory: every ``.txt`` file under it, in sorted path order, one document each.

Documents are numbered from 0 in that order. ``shard=(i, n)`` keeps documents ``i-1, i-1+n, i-1+2n, ...``
(round robin, ``i`` in ``1..n``): the n parts of a corpus are disjoint, together the whole, and each keeps the
global numbers of its documents, so their extractions merge into one corpus (``pyinterp corpus merge``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pyinterp.errors import InputError


@dataclass(frozen=True)
class Source:
    """Where the documents are and how to read them (what the manifest records)."""

    path: Path
    field: str | None = None        # JSONL: the object's key holding the document
    blank_lines: bool = False       # text: documents are paragraphs, not lines
    shard: tuple[int, int] = (1, 1)  # (i, n): the i-th of n round-robin parts

    def __post_init__(self) -> None:
        i, n = self.shard
        if not 1 <= i <= n:
            raise InputError(f"--shard {i}/{n}: I must be in 1..N")
        if not self.path.exists():
            raise InputError(f"corpus {self.path} does not exist")
        if self.path.is_dir() and self.field is not None:
            raise InputError("--field reads JSONL files; the corpus is a directory of .txt files")

    @property
    def kind(self) -> str:
        if self.path.is_dir():
            return "txt-dir"
        return "jsonl" if self.field is not None or self.path.suffix == ".jsonl" else "text"

    def describe(self) -> dict:
        return {"path": str(self.path), "kind": self.kind, "field": self.field, "split_on_blank_lines": self.blank_lines,
                "shard": list(self.shard)}

    def size(self) -> int:
        """Bytes of the corpus (all of it: every shard reads the whole file)."""
        if self.path.is_dir():
            return sum(p.stat().st_size for p in self.path.rglob("*.txt") if p.is_file())
        return self.path.stat().st_size

    def documents(self) -> Iterator[tuple[int, str]]:
        """(global document number, text) of this shard's documents, in order."""
        i, n = self.shard
        for number, text in enumerate(self._all()):
            if number % n == i - 1:
                yield number, text

    def _all(self) -> Iterator[str]:
        if self.kind == "txt-dir":
            yield from self._directory()
        elif self.kind == "jsonl":
            yield from self._jsonl()
        elif self.blank_lines:
            yield from self._paragraphs()
        else:
            for line in self._lines(self.path):
                if line.strip():
                    yield line

    @staticmethod
    def _lines(path: Path) -> Iterator[str]:
        try:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    yield line.rstrip("\r\n")
        except UnicodeDecodeError as e:
            raise InputError(f"{path} is not UTF-8 text (byte {e.start} of a line)") from None
        except OSError as e:
            raise InputError(f"cannot read {path}: {e.strerror or e}") from None

    def _paragraphs(self) -> Iterator[str]:
        lines: list[str] = []
        for line in self._lines(self.path):
            if line.strip():
                lines.append(line)
            elif lines:
                yield "\n".join(lines)
                lines = []
        if lines:
            yield "\n".join(lines)

    def _jsonl(self) -> Iterator[str]:
        field = self.field or "text"
        for number, line in enumerate(self._lines(self.path), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise InputError(f"{self.path}:{number}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or field not in row:
                raise InputError(f"{self.path}:{number}: no field {field!r} (use --field NAME)")
            if not isinstance(row[field], str):
                raise InputError(f"{self.path}:{number}: field {field!r} is not a string")
            yield row[field]

    def _directory(self) -> Iterator[str]:
        for path in sorted(p for p in self.path.rglob("*.txt") if p.is_file()):
            yield "\n".join(self._lines(path))
