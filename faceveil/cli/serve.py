"""`faceveil` sub-commands of the APF server: `faceveil serve` (the APF cloud) and `faceveil bench serve`
(a short load test against it)."""

from __future__ import annotations

import argparse
import logging
import sys

from faceveil.cli.common import (
    Groups,
    count_or_zero,
    emit,
    load_average,
    number_in,
    port_number,
    positive_int,
    seed_value,
)

DEFAULT_PORT = 8765


def _cmd_serve(args: argparse.Namespace) -> int:
    import torch

    from faceveil.methods.apf import server
    from faceveil.methods.apf.networks import load_server_model

    server.check_host(args.host, args.public)  # before anything slow: a refused host is refused at once
    policy = server.ClientPolicy(**_limits(args, "body_grace_s", "min_body_rate", "per_client", "max_connections"))
    torch.set_num_threads(server.torch_threads_per_worker(args.workers))
    model = load_server_model(args.checkpoint)
    app = server.create_app(model, **_limits(args, "max_batch", "max_pending"), workers=args.workers, policy=policy)
    _log_requests(not args.quiet)
    sock = server.bind(args.host, args.port)
    limits = app.state.limits
    print(f"faceveil serve: listening on {server.url_of(sock)} (grid {limits.grid}, eps {limits.eps * 255:.4g}/255, "
          f"max batch {limits.max_batch}, workers {args.workers}, torch threads {torch.get_num_threads()}, "
          f"bodies at least {policy.min_body_rate:g} bytes/s after {policy.body_grace_s:g} s, "
          f"{policy.per_client} requests per client); "
          "Ctrl-C stops", flush=True)
    server.serve_forever(app, sock)
    return 0


def _limits(args: argparse.Namespace, *names: str) -> dict:
    """The limits given on the command line; the server's defaults for the others (kept out of the parser so that
    building it imports nothing heavy)."""
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def _log_requests(on: bool) -> None:
    """Path-only request lines (faceveil.serve) on stderr; nothing with --quiet."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger = logging.getLogger("faceveil.serve")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if on else logging.WARNING)


def _cmd_bench_serve(args: argparse.Namespace) -> int:
    from faceveil.bench import serve as bench_serve
    from faceveil.errors import FaceveilError

    if args.requests < 1 or args.clients < 1 or args.batch < 1 or args.stalled < 0:
        raise FaceveilError("--requests, --clients and --batch must be at least 1, --stalled at least 0")
    rows, info = bench_serve.run(args.requests, args.clients, batch=args.batch, checkpoint=args.checkpoint,
                                 workers=args.workers, seed=args.seed, progress=not args.quiet, stalled=args.stalled,
                                 **_limits(args, "max_batch"))
    settings = {"requests": args.requests, "clients": args.clients, "batch": args.batch, "workers": args.workers,
                "stalled": args.stalled,
                "seed": args.seed, "load_average_1min": load_average(), **info}
    emit("bench serve", settings, rows, args.json)
    return 0 if rows[0]["all_answered"] else 1


def _add_server_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", metavar="APF.pt", default=None,
                   help="server networks (faceveil train apf -o ...); default: the packaged apf-default.pt")
    p.add_argument("--workers", type=number_in(1, 64, integer=True), default=1,
                   help="model forwards run at once (a thread pool; the CPU's cores are split among them)")
    p.add_argument("--max-batch", type=positive_int, default=None,
                   help="most faces in one request (default: the server's; "
                   "shown at start and on /health)")


def register(groups: Groups) -> None:
    """Adds this module's sub-commands to the parser groups."""
    p = groups["root"].add_parser(
        "serve", help="the APF cloud: turns a client's face gradient g into adversarial noise s (never a photo)",
        description="Serve POST /v1/noise (gradient g in, noise s out; see faceveil/apf/wire.py) and GET /health. "
                    "Photos are refused: only gradients are accepted. Request bodies are never logged or stored.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback unless --public)")
    p.add_argument("--port", type=port_number, default=DEFAULT_PORT, help="port (0 = any free port, printed at start)")
    _add_server_flags(p)
    p.add_argument("--max-pending", type=positive_int, default=None,
                   help="requests admitted at once; beyond that the server answers 503 at once (default: the server's)")
    p.add_argument("--body-grace", dest="body_grace_s", type=float, default=None, metavar="S",
                   help="seconds a request body may take before the minimum rate applies (default 5); slower: 408")
    p.add_argument("--min-body-rate", type=float, default=None, metavar="BYTES_PER_S",
                   help="the average rate a body must keep after the grace period (default 16384)")
    p.add_argument("--per-client", type=int, default=None, metavar="N",
                   help="requests one client address may have in flight; beyond: 429 (default 16)")
    p.add_argument("--max-connections", type=int, default=None, metavar="N",
                   help="open connections, stalled ones included; beyond: 503 (default 512)")
    p.add_argument("--public", action="store_true",
                   help="allow a non-loopback --host (the server has no TLS or authentication: put a TLS reverse "
                        "proxy in front)")
    p.add_argument("--quiet", action="store_true", help="no per-request log lines (they are path-only anyway)")
    p.set_defaults(func=_cmd_serve)

    p = groups["bench"].add_parser("serve", help="load test of `faceveil serve` on 127.0.0.1: latency percentiles, "
                                                 "throughput, server time per request")
    p.add_argument("--requests", type=positive_int, default=200)
    p.add_argument("--clients", type=positive_int, default=8, help="concurrent clients")
    p.add_argument("--batch", type=positive_int, default=1, help="faces per request")
    p.add_argument("--stalled", type=count_or_zero, default=0, metavar="N",
                   help="slow clients holding connections during the load (headers and 1 KB of a body, then nothing)")
    _add_server_flags(p)
    p.add_argument("--seed", type=seed_value, default=0, help="seed of the synthetic gradients")
    p.add_argument("--json", metavar="OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_bench_serve)
