"""The ``pyinterp`` command: the main command (``main``) and its subcommands, one module each, over the shared
model options and layer lists (``options``) and prompt handling (``prompt``)."""

from pyinterp.cli.main import main

__all__ = ["main"]
