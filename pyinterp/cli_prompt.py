"""The prompt of a command, as llama-cli takes it: ``-p TEXT`` or ``-f FILE`` (one trailing newline dropped),
escapes expanded unless ``--no-escape``."""

from __future__ import annotations

import re
from pathlib import Path

import click

from .errors import InputError

# llama-cli's escapes (common.cpp, string_process_escapes): a backslash and one byte, or \x and two hex digits
_ESCAPE = re.compile(rb"\\(x[0-9a-fA-F]{2}|.)", re.DOTALL)
_ESCAPES = {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"'": b"'", b'"': b'"', b"\\": b"\\"}


def process_escapes(text: str) -> str:
    """Expand escapes as llama-cli does by default (``--escape``): ``\\n \\r \\t \\' \\" \\\\`` and
    ``\\xHH`` (one byte); a backslash before anything else, or at the end, stays as it is."""

    def expand(m: re.Match) -> bytes:
        code = m.group(1)
        if len(code) == 3:  # xHH
            return bytes([int(code[1:], 16)])
        return _ESCAPES.get(code, m.group(0))

    data = _ESCAPE.sub(expand, text.encode("utf-8", "surrogateescape"))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"the prompt is not UTF-8 text once its escapes are expanded ({e.reason} at byte {e.start}); "
                         f"--no-escape keeps them as they are") from None


def read_prompt_file(path: str) -> str:
    """The prompt in a ``-f`` file, as llama-cli reads it: the bytes as they are (no newline translation)
    less one trailing newline."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as e:
        raise InputError(f"cannot read prompt file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise InputError(f"prompt file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    return text[:-1] if text.endswith("\n") else text


def prompt_options(command):
    """``-p/--prompt``, ``-f/--file`` and ``-e/--escape/--no-escape`` on a click command."""
    command = click.option("--escape/--no-escape", "-e", default=True, show_default=True,
                           help="Expand \\n \\r \\t \\' \\\" \\\\ and \\xHH in the prompt (-p or -f), as llama-cli does.")(command)
    command = click.option("-f", "--file", "prompt_file", type=click.Path(dir_okay=False), default=None,
                           help="Read the prompt from a file (one trailing newline is dropped, as llama-cli does).")(command)
    return click.option("-p", "--prompt", default=None, help="Prompt text.")(command)


def prompt_text(prompt: str | None, prompt_file: str | None, escape: bool) -> str:
    """The prompt from exactly one of ``-p`` and ``-f``, escapes expanded when ``escape``."""
    if (prompt is None) == (prompt_file is None):
        raise click.UsageError("give the prompt with exactly one of -p/--prompt and -f/--file")
    if prompt_file is not None:
        prompt = read_prompt_file(prompt_file)
    return process_escapes(prompt) if escape else prompt
