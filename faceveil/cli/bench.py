"""`faceveil bench models | protect | video | detect | roundtrip`: speed benchmarks that print a table and write
JSON (the other modules add theirs: bench apply, serve, advcloak)."""

from __future__ import annotations

import argparse

from faceveil.cli.common import Groups, emit, load_average, positive, positive_int, threads
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
    p.add_argument("--presets", default="default,paper", help="comma list: default, paper")
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
    p.add_argument("--photos", type=int, default=6, help="how many of the sample photos")
    p.add_argument("--copies", type=int, default=2, help="each photo this many times (a longer run)")
    p.add_argument("--iters", type=int, default=5, help="iterations per face (protect's other flags at defaults)")
    p.add_argument("--judges", default="mobileface", help="models that check each saved photo")
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

    presets = {"default": [], "paper": ["--method", "tip-im", "--paper-defaults"]}  # what `protect` runs with these
    chosen = {k: settings_from_flags(flags) for k, flags in presets.items() if k in args.presets.split(",")}
    if not chosen:
        raise FaceveilError("--presets takes default and/or paper")
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
    rows, info = scale.run(settings_from_flags(flags), photos, workers, args.copies, progress=not args.quiet)
    info["copies"] = args.copies
    emit("bench scale", {"protect_flags": flags, **info}, rows, args.json)
    return 0
