"""Prompt sets: the one file format every command's ``--prompts FILE`` reads.

JSONL (``.jsonl``, one JSON object per line) or TSV (``.tsv``, a header row naming the columns). The fields:

- ``prompt``: the text (or ``clean`` where an analysis runs a clean/corrupt pair);
- ``target``: one answer, or (JSONL) a list of them; in TSV several are separated by ``|``;
- ``clean``, ``corrupt``: a patching pair (same number of tokens, checked where it is run);
- ``good``, ``bad``: the right and the wrong answer of a logit-difference metric;
- ``spans``: named character ranges of the prompt, ``{"subject": [4, 16]}`` (``[start, end)``); in TSV one
  column holding that JSON object;
- ``label``: a class (a string or an integer), for probes.

Every row needs the fields its analysis needs (``needs``); a row lacking one, a span outside its prompt, a
malformed line or an empty file is a one-line error naming the file and line.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from pyinterp.errors import InputError

if TYPE_CHECKING:
    from pyinterp.engine.core import ModelLike

FIELDS = ("prompt", "target", "clean", "corrupt", "good", "bad", "spans", "label")


@dataclass(frozen=True)
class Example:
    """One row of a prompt set."""

    line: int                                   # 1-based line of the file
    prompt: str | None = None
    targets: tuple[str, ...] = ()
    clean: str | None = None
    corrupt: str | None = None
    good: str | None = None
    bad: str | None = None
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)
    label: str | int | None = None
    fields: dict = field(default_factory=dict)  # the row as read

    @property
    def text(self) -> str | None:
        """The prompt, or the clean prompt of a pair."""
        return self.prompt if self.prompt is not None else self.clean


def load_prompts(path: str | Path, needs: Iterable[str] = ()) -> list[Example]:
    """The examples of ``path`` (JSONL or TSV), each having every field in ``needs``."""
    path = Path(path)
    needs = list(needs)
    unknown = [n for n in needs if n not in FIELDS]
    if unknown:
        raise ValueError(f"unknown prompt-set fields {unknown}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"prompt set {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read the prompt set {path}: {getattr(e, 'strerror', None) or e}") from None
    rows = _tsv_rows(path, text) if path.suffix.lower() == ".tsv" else _jsonl_rows(path, text)
    examples = [_example(path, line, row, needs) for line, row in rows]
    if not examples:
        raise InputError(f"the prompt set {path} has no rows")
    return examples


def _jsonl_rows(path: Path, text: str) -> list[tuple[int, dict]]:
    rows = []
    for line, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except ValueError as e:
            raise InputError(f"{path}:{line}: not JSON ({e.msg}); a prompt set is JSONL or TSV (.tsv)") from None
        if not isinstance(row, dict):
            raise InputError(f"{path}:{line}: a row must be a JSON object with fields like \"prompt\"")
        rows.append((line, row))
    return rows


def _tsv_rows(path: Path, text: str) -> list[tuple[int, dict]]:
    reader = csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE)
    header = next(reader, None)
    if not header:
        return []
    rows = []
    for row in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise InputError(f"{path}:{line}: {len(row)} columns, the header has {len(header)}")
        values: dict = dict(zip(header, row))
        if "target" in values:
            values["target"] = [t for t in values["target"].split("|") if t]
        if "spans" in values and values["spans"]:
            try:
                values["spans"] = json.loads(values["spans"])
            except ValueError:
                raise InputError(f"{path}:{line}: spans must be a JSON object like {{\"subject\": [4, 16]}}") from None
        rows.append((line, {k: v for k, v in values.items() if v != ""}))
    return rows


def _text(path: Path, line: int, row: dict, name: str) -> str | None:
    value = row.get(name)
    if value is not None and not isinstance(value, str):
        raise InputError(f"{path}:{line}: {name} must be a string, got {json.dumps(value)[:40]}")
    if value == "":
        raise InputError(f"{path}:{line}: {name} is empty")
    return value


def _example(path: Path, line: int, row: dict, needs: list[str]) -> Example:
    missing = [n for n in needs if row.get(n) in (None, "", [], {})]
    if missing:
        raise InputError(f"{path}:{line}: no {missing[0]!r} field (this analysis needs {', '.join(needs)})")
    texts = {name: _text(path, line, row, name) for name in ("prompt", "clean", "corrupt", "good", "bad")}
    targets = row.get("target", [])
    targets = [targets] if isinstance(targets, str) else targets
    if not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets):
        raise InputError(f"{path}:{line}: target must be a string or a list of strings")
    label = row.get("label")
    if label is not None and (isinstance(label, bool) or not isinstance(label, (str, int))):
        raise InputError(f"{path}:{line}: label must be a string or an integer")
    text = texts["prompt"] if texts["prompt"] is not None else texts["clean"]
    spans = _spans(path, line, row.get("spans", {}), text)
    return Example(line, texts["prompt"], tuple(targets), texts["clean"], texts["corrupt"], texts["good"],
                   texts["bad"], spans, label, dict(row))


def _spans(path: Path, line: int, spans: object, text: str | None) -> dict[str, tuple[int, int]]:
    if not isinstance(spans, dict):
        raise InputError(f"{path}:{line}: spans must be an object of name: [start, end]")
    out = {}
    for name, span in spans.items():
        ok = isinstance(span, list) and len(span) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in span)
        if not ok or text is None or not 0 <= span[0] < span[1] <= len(text):
            size = "no prompt" if text is None else f"a prompt of {len(text)} characters"
            raise InputError(f"{path}:{line}: span {name!r} must be [start, end) within the prompt "
                             f"(0 <= start < end <= length; {size}), got {json.dumps(span)}")
        out[name] = (span[0], span[1])
    return out


def token_offsets(model: ModelLike, text: str, ids: list[int]) -> list[tuple[int, int]]:
    """Each token's character range ``[start, end)`` in ``text`` (``ids``: ``text``'s tokens; a BOS the model added
    gets an empty range). Found by detokenizing growing prefixes, so it holds for any tokenizer whose tokens spell
    the text (a SentencePiece space prefix is allowed for)."""
    bos = model.engine.special_tokens()[0]
    first = 1 if ids and ids[0] == bos and not text.startswith(model.engine.detokenize(ids[:1])) else 0
    whole = model.engine.detokenize(ids[first:])
    shift = len(whole) - len(text)
    if not whole.endswith(text) or whole[:shift].strip():
        raise InputError(f"the tokens of {text[:40]!r} do not spell it back, so spans cannot be mapped to tokens")
    offsets, done = [(0, 0)] * first, 0
    for i in range(first, len(ids)):
        end = max(0, len(model.engine.detokenize(ids[first:i + 1])) - shift)
        offsets.append((min(done, end), end))
        done = max(done, end)
    return offsets


def span_tokens(model: ModelLike, text: str, ids: list[int], span: tuple[int, int]) -> list[int]:
    """Positions of the tokens of ``ids`` (``text``'s) whose characters overlap ``span``."""
    start, end = span
    return [i for i, (a, b) in enumerate(token_offsets(model, text, ids)) if a < end and b > start]
