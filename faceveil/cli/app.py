"""`faceveil app`: the local web application (faceveil/app), started from the command line."""

from __future__ import annotations

import argparse

from faceveil.cli.common import Groups, port_number

DEFAULT_PORT = 8766


def _cmd_app(args: argparse.Namespace) -> int:
    from faceveil.app import AppSettings, run
    from faceveil.errors import FaceveilError

    def ready(url: str) -> None:
        print(f"faceveil app: open {url} in your browser (photos stay on this computer); Ctrl-C stops and deletes "
              "this session's uploads", flush=True)

    try:
        run(args.host, args.port, public=args.public, open_browser=not args.no_browser,
            settings=AppSettings(judges=args.judges), on_ready=ready)
    except OSError as exc:  # the port is taken, or the address is not this machine's
        raise FaceveilError(f"port: cannot listen on {args.host}:{args.port} ({exc.strerror or exc}); try another "
                            "`port`") from None
    return 0


def register(groups: Groups) -> None:
    """Adds this module's sub-commands to the parser groups."""
    p = groups["root"].add_parser(
        "app", help="a local web app: protect photos, make a person mask, check a photo, in your browser",
        description="Serve the faceveil web app on this computer and open it in the browser. Uploads stay in a "
                    "temporary folder under your cache, deleted when the page closes or the app stops.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback unless --public)")
    p.add_argument("--port", type=port_number, default=DEFAULT_PORT, help="port (0 = any free port, printed at start)")
    p.add_argument("--public", action="store_true",
                   help="allow a non-loopback --host (anyone who reaches it sees the photos: no TLS, no login)")
    p.add_argument("--no-browser", action="store_true", help="do not open a browser window")
    p.add_argument("--judges", default="all", help="models that check every result (default: the whole zoo)")
    p.set_defaults(func=_cmd_app)
