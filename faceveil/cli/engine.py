"""--engine local|ray for the evaluations whose protection runs can go to Ray (tip-im protocol): the flags, and the
mask map the protocol takes (None: computed in this process)."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from typing import Any

from faceveil.cli.common import positive_int
from faceveil.errors import FaceveilError


def add_engine_flags(p, engine_help: str | None = None, held: str = "the surrogates") -> None:
    """--engine / --address / --workers on a parser or argument group; engine_help says what each engine runs."""
    p.add_argument("--engine", default="local", choices=["local", "ray"], help=engine_help or (
        "tip-im protocol: local computes the probe batches' masks in this process (default); ray spreads them over a "
        "pool of Ray actors, scoring stays here (needs faceveil[ray]; the dataset must be at the same path on every "
        "node)"))
    p.add_argument("--address", metavar="ADDR", default=None,
                   help="ray: join the cluster of `ray start --head` at HOST:PORT (or auto); default: a local Ray "
                        "instance started for the run")
    p.add_argument("--workers", type=positive_int, default=2, metavar="N",
                   help=f"ray: actors in the pool, one CPU and one copy of {held} each (default: %(default)s)")


@contextlib.contextmanager
def mask_map(args: argparse.Namespace) -> Iterator[Any]:
    """The protocol's mask map for --engine (None for local); Ray is joined or started for the `with` block."""
    require_local_unless_tip_im(args)
    if args.engine != "ray":
        yield None
        return
    from faceveil.distributed.ray_eval import RayMasks

    with RayMasks(args.address, args.workers) as masks:
        yield masks


def require_local_unless_tip_im(args: argparse.Namespace) -> None:
    """--engine ray with another protocol: one line, before any work."""
    if args.engine == "ray" and args.protocol != "tip-im":
        raise FaceveilError(f"--engine ray runs the tip-im protocol's protection; the {args.protocol} protocol runs "
                            "locally only")
