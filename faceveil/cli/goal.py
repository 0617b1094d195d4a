"""`faceveil eval goal`: the headline protection numbers (faceveil.evaluate.goal): each recipe's black-box
Rank-1-UT per judge and mean, face-area SSIM and PSNR, seconds per face, on LFW in photos mode, leave-one-family-out
over every family, the previous default's row beside the new ones. The enroll / apply half of the goal (person masks
on the OPOM protocol) is `faceveil eval identification --protocol opom`."""

from __future__ import annotations

import argparse
import time

from faceveil.cli.common import Groups, comma_list, dataset_root, emit, positive_int, seed_value, threads
from faceveil.pipeline import presets

DEFAULT_RECIPES = "previous,low,mid,high"


def register(groups: Groups) -> None:
    """Adds `eval goal`."""
    p = groups["eval"].add_parser("goal", help="headline numbers: every preset's black-box Rank-1-UT (photos mode, "
                                  "leave-one-family-out), SSIM, PSNR, seconds per face")
    p.add_argument("--dataset", required=True, metavar="lfw=PATH")
    p.add_argument("--presets", default=None, metavar="LIST",
                   help=f"comma list of recipes (default {DEFAULT_RECIPES}); known: {', '.join(presets.RECIPES)}")
    p.add_argument("--probes", type=positive_int, default=50, metavar="N",
                   help="protected identities (the seeded split's first N; default 50)")
    p.add_argument("--extra", type=positive_int, default=50, metavar="N", help="further gallery identities")
    p.add_argument("--judges", default="all", help="comma list or 'all'")
    p.add_argument("--batch", type=positive_int, default=8, help="probes protected at once")
    p.add_argument("--seed", type=seed_value, default=0)
    p.add_argument("--json", metavar="OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_goal)


def _cmd_goal(args: argparse.Namespace) -> int:
    from faceveil.evaluate import goal
    from faceveil.models import zoo

    names = comma_list(args.presets or DEFAULT_RECIPES)
    for name in names:
        goal.recipe(name)  # one clear line for an unknown name, before any work
    options = goal.Options(root=dataset_root(args.dataset), recipes=names, judges=zoo.parse_models(args.judges),
                           probes=args.probes, extra=args.extra, seed=args.seed, batch=args.batch,
                           progress=not args.quiet)
    start = time.perf_counter()
    rows, meta = goal.run(options)
    settings = {"dataset": str(options.root), "mode": "photos", "surrogates": "leave-one-family-out",
                "judges": options.judges, "seed": args.seed, "batch": args.batch, "threads": threads(), **meta,
                "seconds": round(time.perf_counter() - start, 2)}
    emit("eval goal", settings, rows, args.json)
    return 0
