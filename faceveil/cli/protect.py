"""`faceveil protect` (identity masks on the faces of photos and mp4 videos) and `faceveil demo` (the same on the
sample photos the install brought): their flags, the settings they resolve to, and the before/after table."""

from __future__ import annotations

import argparse
import sys

from faceveil.cli.common import (
    Groups,
    add_report_flag,
    finish_batch,
    positive_int,
    print_judge_table,
    smoothing_size,
)
from faceveil.methods import registry
from faceveil.pipeline import presets


def register(groups: Groups) -> None:
    """Adds this module's sub-commands to the parser groups."""
    p = groups["root"].add_parser("protect", help="protect faces in photos and mp4 videos (identity masks)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="photos, videos or folders")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR")
    add_protect_flags(p)
    p.set_defaults(func=_cmd_protect)
    p = groups["root"].add_parser("demo", help="protect the sample photos that the install brought")
    p.add_argument("-o", "--output", default="faceveil-demo", metavar="OUTDIR")
    add_protect_flags(p)
    p.set_defaults(func=_cmd_demo)


def add_protect_flags(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--smoothing", type=smoothing_size, default=None, metavar="K",
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
    p.add_argument("--batch-faces", type=positive_int, default=16, metavar="N",
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


def protect_settings(args: argparse.Namespace):
    """The photo job's settings (pipeline.protect.ProtectSettings) from the protect flags."""
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


def settings_from_flags(flags: list[str]):
    """The settings that `faceveil protect` would run with these flags (what `bench protect` measures)."""
    parser = argparse.ArgumentParser(prog="faceveil protect")
    add_protect_flags(parser)
    return protect_settings(parser.parse_args(flags))


def _run_protect(inputs: list[str], out_dir: str, args: argparse.Namespace) -> int:
    from faceveil.api import Protector
    from faceveil.report import batch_header

    settings = protect_settings(args)
    report = Protector.from_settings(settings).protect_files(
        inputs, out_dir, recursive=args.recursive, report_path=args.json, progress=not args.quiet,
        header=batch_header("protect", settings))
    print_judge_table(report.results, settings.judges)
    return finish_batch(report, "protect", args)


def _cmd_protect(args: argparse.Namespace) -> int:
    return _run_protect(args.inputs, args.output, args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from faceveil.io import weights

    samples = [str(p) for p in weights.sample_photos()]
    print(f"faceveil demo: protecting {len(samples)} sample photos into {args.output}/", file=sys.stderr)
    return _run_protect(samples, args.output, args)
