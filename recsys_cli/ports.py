"""Is a port free to listen on? Asked before starting a server, so that a busy port is reported at once.

`recsys serve` and `recsys ui` check their `--port`; the Makefile runs this module before `make run`
generates and processes anything, and before `make ui`:

    python -m recsys_cli.ports --command "make run" --host 127.0.0.1 PORT=8000

prints why a port cannot be used, naming the Make variable that set it, and exits with code 2.
"""

from __future__ import annotations

import argparse
import errno
import socket
import sys
from collections.abc import Sequence


def port_problem(host: str, port: int) -> str | None:
    """Why nothing could listen on `host`:`port` now, or None if a server could.

    Binds a socket the way uvicorn does (SO_REUSEADDR), so a port held by a listening server is busy while
    one left in TIME_WAIT by a server that just stopped is not.
    """
    if not 0 < port < 65536:
        return f"port {port} is not a port number (1-65535)"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        return f"cannot listen on {host}:{port}: unknown address ({exc.strerror})"
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is already in use"
            return f"cannot listen on {host}:{port}: {exc.strerror}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m recsys_cli.ports", description="Exit with code 2 if a port cannot be listened on."
    )
    parser.add_argument("--command", default="make", help="what is about to start, for the message")
    parser.add_argument("--host", default="127.0.0.1", help="address to check (default 127.0.0.1)")
    parser.add_argument("ports", nargs="+", metavar="NAME=PORT", help="a Make variable and its value")
    args = parser.parse_args(argv)
    for assignment in args.ports:
        name, _, value = assignment.partition("=")
        if not value.strip().isdigit():
            print(f"{args.command}: {name} must be a port number (1-65535), got {value!r}", file=sys.stderr)
            return 2
        port = int(value)
        problem = port_problem(args.host, port)
        if problem is not None:
            print(
                f"{args.command}: {problem} ({name}={port}); stop what uses it, or choose another port: "
                f"{args.command} {name}={port + 1 if port < 65535 else 8080}",
                file=sys.stderr,
            )
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
