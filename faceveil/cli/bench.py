"""`faceveil bench models | protect | video | detect | roundtrip`: speed benchmarks that print a table and write
JSON (the other modules add theirs: bench apply, serve, advcloak)."""

from __future__ import annotations

import argparse

from faceveil.cli.common import (
    Groups,
    comma_list,
    count_or_zero,
    dataset_root,
    emit,
    load_average,
    positive,
    positive_int,
    threads,
)
from faceveil.errors import FaceveilError


def register(groups: Groups) -> None:
    """Adds this module's sub-commands to the parser groups."""
    bench = groups["bench"]
    p = bench.add_parser("models", help="forward and forward+backward ms per face")
    p.add_argument("--models", default="all")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--json", metavar="OUT")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_models)
    p = bench.add_parser("protect", help="seconds per face of protect (default and paper presets) vs the "
                         "forward+backward floor")
    p.add_argument("--presets", default="default,paper",
                   help="comma list of default (= --strength mid), low, high, paper (TIP-IM, the paper's settings)")
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--json", metavar="OUT")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_protect)
    p = bench.add_parser("video", help="720p detection + tracking + paste-back frames per second")
    p.add_argument("--seconds", type=positive, default=10.0)
    p.add_argument("--detect-every", type=positive_int, default=10)
    p.add_argument("--json", metavar="OUT")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_video)
    p = bench.add_parser("detect", help="face detection seconds on 12-megapixel photos")
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--json", metavar="OUT")
    p.set_defaults(func=_cmd_detect)
    p = bench.add_parser("roundtrip", help="embedding drift: optimiser crop vs re-detected saved file (PNG, JPEG)")
    p.add_argument("--surrogates", default="mobileface,mfn512")
    p.add_argument("--judges", default="all")
    p.add_argument("--iters", type=positive_int, default=20)
    p.add_argument("--json", metavar="OUT")
    p.set_defaults(func=_cmd_roundtrip)
    p = bench.add_parser("scale", help="photos/s and s/face: the local engine vs Ray with 1, 2, ... workers "
                         "(needs faceveil[ray])")
    p.add_argument("--workers", default="1,2", help="comma list of Ray actor counts")
    p.add_argument("--photos", type=positive_int, default=6, help="how many of the sample photos")
    p.add_argument("--copies", type=positive_int, default=2, help="each photo this many times (a longer run)")
    p.add_argument("--iters", type=positive_int, default=5,
                   help="iterations per face (protect's other flags at defaults)")
    p.add_argument("--judges", default="mobileface", help="models that check each saved photo")
    p.add_argument("--eval-probes", type=count_or_zero, default=8, metavar="N",
                   help="also time an evaluation's protection runs: the tip-im protocol's first N probes of LFW, "
                        "pgd against mobileface, --iters iterations (0 = skip; skipped with a note without LFW)")
    p.add_argument("--eval-batch", type=positive_int, default=2, metavar="B", help="probes per protection job")
    p.add_argument("--dataset", default=None, metavar="lfw=PATH", help="LFW (default: $FACEVEIL_LFW or beside repo)")
    p.add_argument("--json", metavar="OUT")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_scale)


def _cmd_models(args: argparse.Namespace) -> int:
    from faceveil.bench import models as bench_models
    from faceveil.models import zoo

    models = zoo.parse_models(args.models)
    batches = [int(b) for b in args.batches.split(",")]
    rows = bench_models.run(models, batches, args.repeats, progress=not args.quiet)
    settings = {"batches": batches, "repeats": args.repeats, "threads": threads(), "load_average_1min": load_average()}
    emit("bench models", settings, rows, args.json)
    return 0


def _cmd_protect(args: argparse.Namespace) -> int:
    from faceveil.bench import protect as bench_protect
    from faceveil.cli.protect import settings_from_flags

    # what `protect` runs with these flags; default = --strength mid
    presets = {"default": [], "low": ["--strength", "low"], "high": ["--strength", "high"],
               "paper": ["--method", "tip-im", "--paper-defaults"]}
    names = comma_list(args.presets)
    unknown = [n for n in names if n not in presets]
    if unknown or not names:
        raise FaceveilError(f"--presets takes a comma list of {', '.join(presets)}, got {args.presets!r}")
    chosen = {k: settings_from_flags(presets[k]) for k in names}
    rows, info = bench_protect.run(chosen, args.repeats, progress=not args.quiet)
    emit("bench protect", {"repeats": args.repeats, **info}, rows, args.json)
    return 0


def _cmd_video(args: argparse.Namespace) -> int:
    from faceveil.bench import video as bench_video

    stats = bench_video.bench_video(args.seconds, args.detect_every, progress=not args.quiet)
    settings = {"seconds": args.seconds, "detect_every": args.detect_every, "resolution": "1280x720",
                "load_average_1min": load_average()}
    emit("bench video", settings, bench_video.rows(stats), args.json)
    return 0


def _cmd_detect(args: argparse.Namespace) -> int:
    from faceveil.bench import pipeline

    rows = pipeline.bench_detect_12mp(args.repeats)
    emit("bench detect", {"repeats": args.repeats, "load_average_1min": load_average()}, rows, args.json)
    return 0


def _cmd_roundtrip(args: argparse.Namespace) -> int:
    from faceveil.bench import pipeline
    from faceveil.models import zoo

    surrogates, judges = zoo.parse_models(args.surrogates), zoo.parse_models(args.judges)
    rows = pipeline.roundtrip_drift(surrogates, judges, args.iters)
    emit("bench roundtrip", {"surrogates": surrogates, "iters": args.iters, "jpeg_quality": 95}, rows, args.json)
    return 0


def _cmd_scale(args: argparse.Namespace) -> int:
    from faceveil.cli.protect import settings_from_flags
    from faceveil.distributed import scale
    from faceveil.io import weights

    flags = ["--iters", str(args.iters), "--judges", args.judges]
    photos = weights.sample_photos()[: args.photos]
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    if not photos or not workers or min(workers) < 1 or args.copies < 1:
        raise FaceveilError("--photos, --copies and --workers take positive numbers")
    if args.eval_probes < 0 or args.eval_batch < 1:
        raise FaceveilError("--eval-probes takes 0 or more, --eval-batch 1 or more")
    evaluation, eval_info = _scale_evaluation(args)
    rows, info = scale.run(settings_from_flags(flags), photos, workers, args.copies, progress=not args.quiet,
                           evaluation=evaluation)
    info["copies"] = args.copies
    emit("bench scale", {"protect_flags": flags, **info, "evaluation": eval_info}, rows, args.json)
    return 0


EVAL_SURROGATES = ["mobileface"]
EVAL_EXTRA = 5  # further gallery identities: the split's preparation is not what is timed


def _scale_evaluation(args: argparse.Namespace):
    """bench scale's evaluation case (the split prepared here, untimed), or None with the reason."""
    from faceveil.attacks.core import AttackConfig
    from faceveil.datasets.lfw import default_lfw_root
    from faceveil.distributed import scale
    from faceveil.evaluate.protocols import tip_im
    from faceveil.pipeline import presets

    if args.eval_probes == 0:
        return None, "skipped (--eval-probes 0)"
    root = dataset_root(args.dataset) if args.dataset else default_lfw_root()
    if root is None:
        return None, "skipped: no LFW found (--dataset lfw=PATH or FACEVEIL_LFW)"
    paper = presets.PAPER_DEFAULTS
    attack = AttackConfig(eps=paper["eps"] / 255, alpha=paper["alpha"] / 255, steps=args.iters, norm="linf",
                          momentum=paper["momentum"], seed=0)
    settings = tip_im.Settings(method="pgd", mode="crops", attack=attack, batch=args.eval_batch, progress=False)
    prepared = tip_im.prepare(root, EVAL_SURROGATES, settings, seed=0, limit=args.eval_probes, extra=EVAL_EXTRA)
    info = {"protocol": "tip-im", "dataset": str(root), "probes": len(prepared.split.probes), "method": "pgd",
            "surrogates": EVAL_SURROGATES, "iters": args.iters, "batch": args.eval_batch, "mode": "crops"}
    return scale.EvalCase(prepared, EVAL_SURROGATES, settings), info
