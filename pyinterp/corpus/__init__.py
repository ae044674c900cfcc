"""Corpus scale: the documents of a corpus as model contexts (:mod:`~pyinterp.corpus.source`,
:mod:`~pyinterp.corpus.packing`), the model run over them a decode of many contexts at a time
(:mod:`~pyinterp.corpus.stream`), and the activations extracted to disk (:mod:`~pyinterp.corpus.extract`,
:mod:`~pyinterp.corpus.store`). ``pyinterp.corpus.open(DIR)`` reads an extracted corpus."""

from __future__ import annotations

from pathlib import Path

from pyinterp.corpus.store import Corpus, open_corpus


def open(directory: str | Path) -> Corpus:  # noqa: A001  (the issue's name: pyinterp.corpus.open)
    """The corpus extracted to ``directory`` (``pyinterp extract``)."""
    return open_corpus(directory)


__all__ = ["Corpus", "open"]
