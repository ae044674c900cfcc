"""A ggml RPC server on this machine's CPU, for ``Model(..., rpc="host:port")`` (builds with -DGGML_RPC=ON).

    python -m pyinterp.engine.rpc 127.0.0.1:50052

The model's layers, the KV cache and pyinterp's intervention tensors then live in the server's
memory and every op, interventions included, runs there. Serve on loopback or a trusted network
only: the protocol has no authentication.
"""

from __future__ import annotations

import sys

import click

from pyinterp.engine._ffi import set_verbose
from pyinterp.engine.backend import default_threads, has_rpc, rpc_serve


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("endpoint", default="127.0.0.1:50052")
@click.option("-t", "--threads", default=None, type=int, help="Threads (default: all cores).")
def main(endpoint: str, threads: int | None) -> None:
    """Serve this CPU to ggml RPC clients at ENDPOINT (host:port) until stopped."""
    if not has_rpc():
        click.echo("pyinterp: error: this pyinterp was built without RPC; reinstall with "
                   "CMAKE_ARGS=-DGGML_RPC=ON pip install .", err=True)
        sys.exit(1)
    set_verbose(True)  # a server's log is for its operator
    rpc_serve(endpoint, threads or default_threads())
    click.echo(f"pyinterp: error: the RPC server at {endpoint} stopped", err=True)
    sys.exit(1)


if __name__ == "__main__":
    main()
