"""`faceveil eval robustness`: a protocol run once, then re-scored after each transform (faceveil.evaluate.robustness);
the flags become the protocol's `Request`."""

from __future__ import annotations

import argparse
import time

from faceveil.cli.common import (
    Groups,
    LazyHelp,
    add_report_flag,
    count_or_zero,
    dataset_root,
    dropout_rate,
    non_negative,
    positive,
    positive_int,
    seed_value,
    threads,
    write_outputs,
)
from faceveil.cli.engine import add_engine_flags, mask_map
from faceveil.errors import FaceveilError
from faceveil.evaluate.protocols import ROBUSTNESS, adapter_for, require_protocol


def _dataset(text: str | None):
    from faceveil.datasets.lfw import default_lfw_root

    if text:
        return dataset_root(text)
    root = default_lfw_root()
    if root is None:
        raise FaceveilError("no LFW found: pass --dataset lfw=PATH (or set FACEVEIL_LFW)")
    return root


def _request(args: argparse.Namespace, judges: list[str], surrogates: list[str] | None, masks=None):
    """The protocol's request from the flags (None = the protocol's own default)."""
    from faceveil.cli.evaluate import distractor_count, test_image_cap
    from faceveil.evaluate.robustness import Request

    opom = args.protocol == "opom"  # the N|all flags are the opom protocol's, parsed only for it
    return Request(
        root=_dataset(args.dataset), judges=judges, surrogates=surrogates, method=args.method,
        strength=args.strength, mode=args.mode,
        limit=args.limit, eps=args.eps, alpha=args.alpha, iters=args.iters, momentum=args.momentum,
        jitter=args.jitter, batch=args.batch, seed=args.seed, progress=not args.quiet, extra=args.extra,
        gamma=args.gamma, masks=args.masks, dropout=args.dropout if args.dropout is not None else 0.0,
        distractors=distractor_count(args.distractors, args.limit) if opom else None,
        train_images=args.train_images, test_images=test_image_cap(args.test_images) if opom else None,
        min_images=args.min_images, checkpoint=args.checkpoint, stage=args.stage, mask_map=masks)


def _cmd_eval_robustness(args: argparse.Namespace) -> int:
    from faceveil.evaluate import robustness, transforms
    from faceveil.evaluate.adaptive import DEFAULT_FOLDS
    from faceveil.io.results import markdown_table
    from faceveil.models import zoo

    require_protocol(args.protocol)
    folds = DEFAULT_FOLDS if args.adaptive_folds is None else args.adaptive_folds
    if folds < 2:
        raise FaceveilError("--adaptive-folds must be at least 2 (train and test identities apart)")
    if args.batch < 1:
        raise FaceveilError(f"--batch must be at least 1, got {args.batch}")
    judges = zoo.parse_models(args.judges)
    surrogates = zoo.parse_models(args.surrogates) if args.surrogates else None
    names = transforms.parse_names(args.transforms)
    start = time.perf_counter()
    with mask_map(args) as masks:
        adapter, resolved = adapter_for(args.protocol, _request(args, judges, surrogates, masks))
        options = robustness.Options(names, args.seed, args.adaptive, folds, progress=not args.quiet)
        rows, meta = robustness.evaluate(adapter, options)
    settings = {**resolved, "engine": args.engine, "judges": judges,
                "surrogates": surrogates or "leave-one-family-out", **meta, "limit": args.limit, "threads": threads(),
                "total_seconds": round(time.perf_counter() - start, 2)}
    print(markdown_table(robustness.display_rows(rows)))
    print(f"{adapter.metric} = protection rate; retained = rate / untransformed rate; clean_{adapter.metric} = the "
          "same rate for the unprotected probes after the same transform; gain = rate - clean rate")
    write_outputs({"command": "eval robustness", "settings": settings, "rows": rows}, args.json, args.report)
    return 0


def _add_protocol_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eps", type=positive, default=None,
                   help="L-inf budget, 0..255 units (default: the protocol's paper, tip-im 12, opom 8)")
    p.add_argument("--alpha", type=positive, default=None, help="step, 0..255 units (default: tip-im 1.5, opom 1)")
    p.add_argument("--iters", type=positive_int, default=None, help="iterations (default: tip-im 50, opom 16, apf 30)")
    p.add_argument("--momentum", type=non_negative, default=None, help="MI-FGSM momentum (default: tip-im 1)")
    p.add_argument("--jitter", type=non_negative, default=None, help="alignment jitter (default: 0 crops, 2 photos)")
    p.add_argument("--batch", type=positive_int, default=8, help="faces protected at once")
    p.add_argument("--extra", type=count_or_zero, default=None, metavar="N",
                   help="tip-im: further gallery identities (default 500, or 50 with --limit)")
    p.add_argument("--gamma", type=non_negative, default=0.0, help="tip-im: TIP-IM MMD naturalness weight")
    p.add_argument("--masks", type=positive_int, default=1, metavar="N_M", help="opom: diverse masks per person")
    p.add_argument("--dropout", type=dropout_rate, default=0.0, help="opom: feature-dropout rate while learning masks")
    p.add_argument("--distractors", default=None, metavar="N|all",
                   help="opom: distractor images (default all, or 2000 with --limit)")
    p.add_argument("--train-images", type=positive_int, default=10, help="opom: images per person that learn the mask")
    p.add_argument("--test-images", default=None, metavar="N|all",
                   help="opom: test images per person (default 5; 'all' = no cap)")
    p.add_argument("--min-images", type=positive_int, default=12, help="opom: protect identities with this many images")
    p.add_argument("--checkpoint", default=None, help="apf: server model (default: the packaged one)")
    p.add_argument("--stage", default="s", help="apf: APF stage g, g_hat or s (default s, the full APF)")


def _transforms_help() -> str:
    from faceveil.evaluate.transforms import TRANSFORMS  # numpy and PIL: imported when this help is shown

    return f"'all' or a comma list of registry transforms ({','.join(TRANSFORMS)})"


def register(groups: Groups) -> None:
    """Adds this module's sub-commands to the parser groups."""
    p = groups["eval"].add_parser(
        "robustness", help="protection after JPEG, resizing, blur, re-alignment...; and against an adaptive attacker")
    p.add_argument("--protocol", default="tip-im", choices=list(ROBUSTNESS),
                   help="protocol run once, then re-scored after each transform (tip-im: Rank-1-UT, opom: Top-1 PSR, "
                        "apf: ASR)")
    p.add_argument("--dataset", default=None, metavar="lfw=PATH", help="LFW (default: $FACEVEIL_LFW or beside repo)")
    p.add_argument("--method", default=None, help="protection method: tip-im protocol (default pgd), opom protocol "
                   "(default opom-convex), apf protocol: the gradient algorithm (default m-di2-fgsm)")
    p.add_argument("--strength", default=None, choices=["low", "mid", "high"],
                   help="tip-im: measure `protect --strength` (mid = protect's default) instead of the method's "
                        "budget flags; photos are saved as protect writes a JPEG")
    p.add_argument("--transforms", default="all",
                   help=LazyHelp(_transforms_help))
    p.add_argument("--judges", default="all", help="comma list or 'all'")
    p.add_argument("--surrogates", default=None, help="comma list (default: leave-one-family-out per judge)")
    p.add_argument("--limit", type=positive_int, default=None, metavar="N", help="only N protected identities")
    p.add_argument("--mode", default="crops", choices=["crops", "photos"],
                   help="crops: transform the aligned face; photos: transform the saved photo, re-detect, re-align")
    p.add_argument("--adaptive", action="store_true",
                   help="add the adaptive attacker: a linear probe trained on other identities' protected/clean "
                        "embedding pairs (cross-fitted over identity folds)")
    p.add_argument("--adaptive-folds", type=positive_int, default=None,
                   help="identity folds of the adaptive probe (default 5)")
    _add_protocol_flags(p)
    add_engine_flags(p)
    p.add_argument("--seed", type=seed_value, default=0, help="split, protection and random transforms")
    p.add_argument("--json", metavar="OUT")
    add_report_flag(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_eval_robustness)
