"""The ``pyinterp`` command (and ``python -m pyinterp``): the CLI, or one line when the native library cannot load."""

from __future__ import annotations

import sys

from pyinterp.errors import NativeLibraryError


def main() -> int:
    try:
        from pyinterp.cli.main import main as cli_main
    except NativeLibraryError as e:
        print(f"pyinterp: error: {e}", file=sys.stderr)
        return 1
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
