"""`faceveil protect` (identity masks on the faces of photos and mp4 videos) and `faceveil demo` (the same on the
sample photos the install brought): their flags, the settings they resolve to, and the before/after table."""

from __future__ import annotations

import argparse
import sys

from faceveil.cli.common import (
    EXIT_STILL_RECOGNISED,
    Groups,
    HelpFormatter,
    add_output_flags,
    add_report_flag,
    check_report_targets,
    finish_batch,
    in_range,
    print_judge_table,
    smoothing_size,
    table_stream,
)
from faceveil.io.paths import DEFAULT_JPEG_QUALITY, FORMAT_CHOICES
from faceveil.methods import registry
from faceveil.pipeline import presets


def register(groups: Groups) -> None:
    """Adds this module's sub-commands to the parser groups."""
    p = groups["root"].add_parser(
        "protect", help="protect faces in photos and videos (identity masks), then check the saved files",
        description="Add an identity mask to every face in the photos and videos, save them under OUTDIR with the "
                    "same names, then re-read each saved file and check it against several face-recognition "
                    "models. The everyday options come first; the rest tune the method (research).",
        formatter_class=HelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="photos, videos or folders of them")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR",
                   help="folder for the protected files (never the input folder; made if missing)")
    add_protect_flags(p)
    p.set_defaults(func=_cmd_protect)
    p = groups["root"].add_parser("demo", help="protect the sample photos that the install brought",
                                  description="`faceveil protect` on the sample photos that the install brought.",
                                  formatter_class=HelpFormatter)
    p.add_argument("-o", "--output", default=DEMO_FOLDER, metavar="OUTDIR",
                   help="folder for the protected sample photos (a rerun replaces the demo's own outputs there)")
    add_protect_flags(p)
    p.set_defaults(func=_cmd_demo)


def add_protect_flags(p: argparse.ArgumentParser) -> None:
    """The options of protect and demo: everyday ones first, then existing outputs and sound, the method's internals,
    APF's, and last the engine (one machine or a Ray cluster)."""
    _add_everyday_flags(p.add_argument_group("everyday options"))
    add_output_flags(p.add_argument_group("files that exist in OUTDIR, and a video's sound"))
    _add_method_flags(p.add_argument_group("method (research): what the mask is optimised for, and how"))
    _add_apf_flags(p.add_argument_group("APF end-cloud (--method apf)"))
    _add_engine_flags(p.add_argument_group("many processes or machines (--engine ray)"))


def _add_everyday_flags(g) -> None:
    g.add_argument("--strength", default="mid", choices=sorted(presets.STRENGTHS),
                   help="how strong the mask is: low is the least visible, high protects most "
                        "(visibility bound, face-area SSIM / PSNR: " + ", ".join(
                            f"{k} {r.ssim_target:g} / {r.psnr_floor:g} dB, {r.iters} steps"
                            for k, r in presets.STRENGTHS.items()) + ")")
    g.add_argument("--thorough", action="store_true",
                   help="protect better against face-recognition models faceveil never saw, at the same "
                        "visibility, in about 3.5 times the time (a third surrogate family, dlib, input diversity "
                        "0.5, TI smoothing 7, twice the iterations; explicit flags still win)")
    g.add_argument("--faces", type=faces_choice, default="all", metavar="all|largest|N",
                   help="which faces to protect: all, the largest only, or the N largest")
    g.add_argument("--format", default="same", choices=FORMAT_CHOICES,
                   help="file type written: same as the input (GIF becomes PNG, videos H.264 mp4), png, jpg, heic "
                        "or avif")
    g.add_argument("--jpeg-quality", type=in_range("jpeg_quality"), default=DEFAULT_JPEG_QUALITY, metavar="1-100",
                   help="quality of JPEG, HEIC and AVIF files written")
    g.add_argument("--keep-date", action="store_true",
                   help="keep when the photo was taken (EXIF date, a video's creation time); location, camera and "
                        "serial numbers are still removed")
    g.add_argument("--keep-metadata", action="store_true",
                   help="keep all the photo's metadata, location and camera included (removed by default)")
    g.add_argument("--copy-unprotected", action="store_true",
                   help="also copy photos without a face to protect, unchanged, so OUTDIR holds every photo")
    g.add_argument("--recursive", action="store_true", help="also look into sub-folders of the input folders")
    g.add_argument("--json", metavar="REPORT",
                   help="write a per-file report (.json, or .jsonl written as it goes; - for stdout, the table then "
                        "goes to stderr)")
    add_report_flag(g, photos=True)
    g.add_argument("--quiet", action="store_true", help="no progress bar and no table")


def _add_method_flags(g) -> None:
    g.add_argument("--method", default="pgd", choices=registry.names("image", "end-cloud"),
                   help="protection method: pgd (untargeted); tip-im, center-opt (TIP-IM with gain g1), and the "
                        "TIP-IM paper's baselines mim, dim, mt-dim, single-target (all steer towards target faces); "
                        "apf (end-cloud: only the face's gradient goes to --server, the photo stays here), apf-local "
                        "(both APF halves in this process, packaged networks)")
    g.add_argument("--surrogates", default=None, help="models the mask is optimised against (default: every "
                   f"family, {presets.EVERY_FAMILY}, a few drawn per iteration; --thorough: "
                   f"{presets.THOROUGH['surrogates']})")
    g.add_argument("--judges", default="all", help="models that check the saved files (comma list, or all)")
    g.add_argument("--eps", type=in_range("eps"), default=None,
                   help="L-inf budget in 0..255 pixel units, above 0 and at most 32 (overrides --strength; with "
                        "the texture budget of the strengths, its face-area mean)")
    g.add_argument("--iters", type=in_range("iters"), default=None,
                   help="optimisation steps, 1..10000 (overrides --strength: low 30, mid 50, high 100)")
    g.add_argument("--alpha", type=in_range("alpha"), default=None,
                   help="step size in 0..255 units, (0, 32] (default: 2.5 eps / iters, at least 1)")
    g.add_argument("--momentum", type=in_range("momentum"), default=1.0, help="MI-FGSM momentum (0 = off)")
    g.add_argument("--jitter", type=in_range("jitter"), default=2.0,
                   help="alignment jitter in crop pixels averaged over while optimising (0 = off), so the mask "
                        "survives the re-detection of the saved photo")
    g.add_argument("--diversity", type=in_range("diversity"), default=None,
                   help="input-diversity probability (default 0; --thorough: 0.5)")
    g.add_argument("--smoothing", type=smoothing_size, default=None, metavar="K",
                   help="TI gradient smoothing: odd Gaussian kernel size in canonical (256 px face) pixels, 0 = off "
                        "(default 0; --thorough: 7)")
    g.add_argument("--gamma", type=in_range("gamma"), default=0.0,
                   help="TIP-IM naturalness weight (MMD term; 0 = off, ~1 gains ~2 dB PSNR, 3 more at a cost in "
                        "protection); tip-im, center-opt, single-target")
    g.add_argument("--gain", default="g", choices=["g", "g1", "g2", "rand"],
                   help="TIP-IM target choice: g nearest (paper), g1 centre, g2 farthest, rand random")
    g.add_argument("--targets", metavar="DIR", default=None,
                   help="target faces for targeted methods: sub-folders = identities, or one identity per image "
                        "(default: the faces in the sample photos; the protected person is always excluded)")
    g.add_argument("--paper-defaults", action="store_true",
                   help="TIP-IM paper settings: L-inf eps 12, alpha 1.5, 50 iterations, momentum 1, 10 targets")
    g.add_argument("--batch-faces", type=in_range("batch_faces"), default=16, metavar="N",
                   help="optimise the faces of consecutive photos together, up to N faces (a batch costs about half "
                        "as much per face as one face alone; a photo's faces always stay together; 1 = every photo "
                        "alone)")
    g.add_argument("--seed", type=in_range("seed"), default=0,
                   help="seed of every random choice: the same inputs, flags and seed give the same files")


def _add_apf_flags(g) -> None:
    g.add_argument("--server", metavar="URL", default=None, help="apf: the `faceveil serve` address, e.g. "
                   "http://127.0.0.1:8765")
    g.add_argument("--apf-algorithm", default=None, help="apf: the probe gradient algorithm, fgsm, i-fgsm, mi-fgsm, "
                   "di2-fgsm or m-di2-fgsm (default: the one the server networks were trained on)")
    g.add_argument("--apf-offset", action="store_true", help="apf: random feature offset of the probe gradient "
                   "(APF Eq. 13; seeded by --seed)")


def _add_engine_flags(g) -> None:
    from faceveil.cli.engine import add_engine_flags

    add_engine_flags(g, "local: this process; ray: a pool of Ray actors, one Protector each (needs the extra "
                        "faceveil[ray]; the inputs and OUTDIR must be on a filesystem every node sees)", "the models")


DEMO_FOLDER = "faceveil-demo"


def faces_choice(text: str) -> str:
    """argparse type of --faces: all, largest or a whole number >= 1."""
    if text in ("all", "largest") or (text.isdigit() and int(text) >= 1):
        return text
    raise argparse.ArgumentTypeError(f"expected all, largest or a whole number >= 1, got {text!r}")


def protect_settings(args: argparse.Namespace):
    """The photo job's settings (pipeline.protect.ProtectSettings) from the protect flags."""
    choices = presets.ProtectChoices(
        method=args.method, strength=args.strength, thorough=args.thorough, paper_defaults=args.paper_defaults,
        eps=args.eps, iters=args.iters, alpha=args.alpha, momentum=args.momentum, jitter=args.jitter,
        diversity=args.diversity, smoothing=args.smoothing, surrogates=args.surrogates, judges=args.judges,
        seed=args.seed)
    return presets.protect_settings(
        choices, faces=args.faces, fmt=args.format, jpeg_quality=args.jpeg_quality, keep_metadata=args.keep_metadata,
        keep_date=args.keep_date, copy_unprotected=args.copy_unprotected, existing=args.existing,
        drop_audio=args.drop_audio, gamma=args.gamma, gain=args.gain, targets_dir=args.targets,
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

    check_report_targets(args)
    settings = protect_settings(args)
    header = batch_header("protect", settings)
    if getattr(args, "engine", "local") == "ray":
        from faceveil.distributed.ray_engine import protect_files_ray

        report = protect_files_ray(settings, inputs, out_dir, recursive=args.recursive, report_path=args.json,
                                   progress=not args.quiet, header=header, address=args.address,
                                   workers=args.workers)
    else:
        report = Protector.from_settings(settings).protect_files(
            inputs, out_dir, recursive=args.recursive, report_path=args.json, progress=not args.quiet,
            header=header)
    _print_table(report.results, settings.judges, table_stream(args))
    return finish_batch(report, "protect", args, table_stream(args))


def _print_table(results, judges: list[str], stream=None) -> None:
    print_judge_table(results, judges, stream=stream)


def _cmd_protect(args: argparse.Namespace) -> int:
    return _run_protect(args.inputs, args.output, args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from faceveil.io import weights

    samples = [str(p) for p in weights.sample_photos()]
    if args.output == DEMO_FOLDER and args.existing == "refuse":  # its own folder: a rerun replaces its own outputs
        args.existing = "overwrite"
    print(f"faceveil demo: protecting {len(samples)} sample photos into {args.output}/", file=sys.stderr)
    code = _run_protect(samples, args.output, args)
    return 0 if code == EXIT_STILL_RECOGNISED else code  # the demo shows the verdicts; it ran, so it succeeds
