"""The prompt of a command, as llama-cli takes it: ``-p TEXT`` or ``-f FILE`` (one trailing newline dropped),
escapes expanded unless ``--no-escape``; llama-cli's sampling options; the generated text, streamed."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import click

from pyinterp.errors import InputError

if TYPE_CHECKING:
    from pyinterp.model import Generation, Model

MAX_SEED = 2**32 - 1

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
    return process_escapes(prompt) if escape else check_utf8(prompt)


def check_utf8(text: str, what: str = "the prompt") -> str:
    """``text`` when it is UTF-8 text; the command line hands undecodable bytes over as surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{what} is not UTF-8 text (byte 0x{ord(e.object[e.start]) & 0xFF:02x} at character "
                         f"{e.start})") from None
    return text


def seed_option(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    """``--seed`` as llama-cli reads it: -1 (its default) is a random seed, else 0..2^32-1."""
    if value is None or value == -1:
        return None
    if not 0 <= value <= MAX_SEED:
        raise click.BadParameter(f"{value} is not -1 (random) nor in 0..{MAX_SEED}", ctx, param)
    return value


def temp_option(ctx: click.Context, param: click.Parameter, value: float) -> float:
    """``--temp`` as llama-cli reads it: 0 or less is greedy; NaN and infinities are errors."""
    if not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number", ctx, param)
    return max(value, 0.0)


def stream_generation(model: Model, ids: list[int], n: int, *, temp: float, seed: int | None, stop_at_eog: bool = True,
                      echo: bool, on_token: Callable[[int], None] | None = None) -> Generation:
    """Generate ``n`` tokens after ``ids`` (as :meth:`Model.generate`); with ``echo``, write the text to stdout
    as it is produced, flushed per token (an incomplete UTF-8 character waits for its last byte), and a
    newline at the end. ``on_token`` is called with each new token too."""
    tokens: list[int] = []
    shown = 0

    def each(token: int) -> None:
        nonlocal shown
        if on_token is not None:
            on_token(token)
        if not echo:
            return
        tokens.append(token)
        text = model.detokenize(tokens).rstrip("\ufffd")
        if len(text) > shown:
            sys.stdout.write(text[shown:])
            sys.stdout.flush()
            shown = len(text)

    gen = model.generate(ids, n, temp=temp, seed=seed, stop_at_eog=stop_at_eog, on_token=each)
    if echo:
        sys.stdout.write(gen.text[shown:] + "\n")
        sys.stdout.flush()
    return gen
