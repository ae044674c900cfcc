"""Documents as model contexts: tokenized with the model's tokenizer and packed the way SAELens packs its
training contexts.

Packed (the default), as SAELens's ``concat_and_batch_sequences`` with its defaults (``prepend_bos``,
``sequence_separator_token="bos"``): the documents' tokens (each tokenized without a BOS) form one stream,
with a separator token between documents, cut into contexts of exactly ``context_size`` tokens; where the
model adds a BOS, each context starts with one and the separator is the BOS; where it does not, no token is
prepended and the separator is the end-of-text token. Documents therefore cross context boundaries; a
document's tokens stay in order. The stream's last tokens that do not fill a context are dropped (as SAELens
drops them).

Unpacked (``pack=False``): one context per document, the BOS (where the model adds one) and its first
``context_size`` tokens; contexts have different lengths.

Each row carries its document number and its position in the document (``-1`` for an added BOS or
separator, whose document is that of the next token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from pyinterp.errors import InputError


@dataclass(frozen=True)
class Context:
    """One context: ``ids``, ``doc`` and ``pos`` are ``[n]`` (n = its length)."""

    ids: np.ndarray  # int32 token ids
    doc: np.ndarray  # int64 document numbers
    pos: np.ndarray  # int32 positions in the document (-1: an added BOS or separator)


@dataclass(frozen=True)
class Packing:
    """How documents become contexts (what the manifest records)."""

    context_size: int
    pack: bool = True
    bos: int | None = None        # prepended to every context (the model adds a BOS)
    separator: int | None = None  # between documents in a packed stream

    def describe(self) -> dict:
        return {"context_size": self.context_size, "packed": self.pack, "bos": self.bos, "separator": self.separator}

    def contexts(self, documents: Iterable[tuple[int, str]], tokenize: Callable[[str], list[int]]) -> Iterator[Context]:
        """The contexts of ``documents`` ((number, text) pairs), in order."""
        if self.pack:
            return self._packed(documents, tokenize)
        return self._unpacked(documents, tokenize)

    def _unpacked(self, documents: Iterable[tuple[int, str]], tokenize: Callable[[str], list[int]]) -> Iterator[Context]:
        head = [] if self.bos is None else [self.bos]
        for number, text in documents:
            ids = tokenize(text)[:self.context_size - len(head)]
            if not ids:
                continue
            n = len(head) + len(ids)
            pos = np.concatenate([np.full(len(head), -1), np.arange(len(ids))]).astype(np.int32)
            yield Context(np.array(head + ids, np.int32), np.full(n, number, np.int64), pos)

    def _packed(self, documents: Iterable[tuple[int, str]], tokenize: Callable[[str], list[int]]) -> Iterator[Context]:
        head = [] if self.bos is None else [self.bos]
        room = self.context_size - len(head)
        if room < 1:
            raise InputError(f"a context of {self.context_size} tokens has no room after the BOS")
        ids: list[int] = []
        docs: list[int] = []
        pos: list[int] = []
        started = False
        for number, text in documents:
            tokens = tokenize(text)
            if not tokens:
                continue
            if started and self.separator is not None:
                ids.append(self.separator)
                docs.append(number)
                pos.append(-1)
            started = True
            ids.extend(tokens)
            docs.extend([number] * len(tokens))
            pos.extend(range(len(tokens)))
            start = 0
            while len(ids) - start >= room:
                end = start + room
                yield Context(np.array(head + ids[start:end], np.int32),
                              np.array([docs[start]] * len(head) + docs[start:end], np.int64),
                              np.array([-1] * len(head) + pos[start:end], np.int32))
                start = end
            del ids[:start], docs[:start], pos[:start]  # once per document: linear in its length
