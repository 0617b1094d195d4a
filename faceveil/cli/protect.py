"""`faceveil protect` (identity masks on the faces of photos and mp4 videos) and `faceveil demo` (the same on the
sample photos the install brought): their flags, the settings they resolve to, and the before/after table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from faceveil.cli.common import (
    EXIT_STILL_RECOGNISED,
    Groups,
    add_output_flags,
    add_report_flag,
    check_report_targets,
    finish_batch,
    in_range,
    positive_int,
    smoothing_size,
    table_stream,
)
from faceveil.methods import registry
from faceveil.pipeline import presets
from faceveil.pipeline.batch import printable


def register(groups: Groups) -> None:
    """Adds this module's sub-commands to the parser groups."""
    p = groups["root"].add_parser("protect", help="protect faces in photos and mp4 videos (identity masks)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="photos, videos or folders")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR")
    add_protect_flags(p)
    p.set_defaults(func=_cmd_protect)
    p = groups["root"].add_parser("demo", help="protect the sample photos that the install brought")
    p.add_argument("-o", "--output", default=DEMO_FOLDER, metavar="OUTDIR",
                   help=f"default {DEMO_FOLDER}/ (a rerun replaces the demo's own outputs there)")
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
    p.add_argument("--surrogates", default=None, help="models the mask is optimised against (default: every "
                   f"family, {presets.EVERY_FAMILY}, a few drawn per iteration; --thorough: "
                   f"{presets.THOROUGH['surrogates']})")
    p.add_argument("--judges", default="all", help="models that check the result")
    p.add_argument("--strength", default="mid", choices=sorted(presets.STRENGTHS),
                   help="preset: low (face-area SSIM >= 0.95, PSNR >= 35 dB, 30 iterations), mid (SSIM >= 0.93, "
                        "PSNR >= 33 dB, 50 iterations) or high (as mid, 100 iterations, more surrogates per "
                        "iteration, calibrated feature dropout); all optimise against every family with a texture-"
                        "shaped budget (--eps: its face-area mean)")
    p.add_argument("--eps", type=in_range("eps"), default=None,
                   help="L-inf budget in 0..255 pixel units, above 0 and at most 32 (overrides strength; with the "
                        "texture budget of the strengths, its face-area mean)")
    p.add_argument("--iters", type=in_range("iters"), default=None, help="iterations, 1..10000 (overrides strength)")
    p.add_argument("--alpha", type=in_range("alpha"), default=None, help="step size in 0..255 units (0, 32]")
    p.add_argument("--momentum", type=in_range("momentum"), default=1.0, help="MI-FGSM momentum (0 = off)")
    p.add_argument("--jitter", type=in_range("jitter"), default=2.0,
                   help="alignment jitter in crop pixels averaged over while optimising (0 = off), so the mask "
                        "survives the re-detection of the saved photo")
    p.add_argument("--diversity", type=in_range("diversity"), default=None,
                   help="input-diversity probability (default 0; "
                   "--thorough: 0.5)")
    p.add_argument("--smoothing", type=smoothing_size, default=None, metavar="K",
                   help="TI gradient smoothing: odd Gaussian kernel size in canonical (256 px face) pixels, 0 = off "
                        "(default 0; --thorough: 7)")
    p.add_argument("--thorough", action="store_true",
                   help="protect further against models not optimised against, at the same visibility, in about "
                        "3.5 times the time: a third surrogate family (dlib), input diversity 0.5, TI smoothing 7 "
                        "and twice the iterations (explicit flags still win)")
    p.add_argument("--gamma", type=in_range("gamma"), default=0.0,
                   help="TIP-IM naturalness weight (MMD term; 0 = off, ~1 gains ~2 dB PSNR, 3 more at a cost in "
                        "protection); tip-im, center-opt, single-target")
    p.add_argument("--gain", default="g", choices=["g", "g1", "g2", "rand"],
                   help="TIP-IM target choice: g nearest (paper), g1 centre, g2 farthest, rand random")
    p.add_argument("--targets", metavar="DIR", default=None,
                   help="target faces for targeted methods: sub-folders = identities, or one identity per image "
                        "(default: the faces in the sample photos; the protected person is always excluded)")
    p.add_argument("--paper-defaults", action="store_true",
                   help="TIP-IM paper settings: L-inf eps 12, alpha 1.5, 50 iterations, momentum 1, 10 targets")
    p.add_argument("--faces", type=faces_choice, default="all", help="all | largest | N")
    p.add_argument("--batch-faces", type=in_range("batch_faces"), default=16, metavar="N",
                   help="optimise the faces of consecutive photos together, up to N faces (a batch costs about half "
                        "as much per face as one face alone; a photo's faces always stay together; 1 = every photo "
                        "alone)")
    p.add_argument("--format", default="same", choices=["same", "png", "jpg"])
    p.add_argument("--jpeg-quality", type=in_range("jpeg_quality"), default=95, help="1..100")
    p.add_argument("--keep-metadata", action="store_true", help="keep EXIF (location, camera); stripped by default")
    p.add_argument("--copy-unprotected", action="store_true", help="copy photos with no face unchanged")
    p.add_argument("--recursive", action="store_true")
    p.add_argument("--seed", type=in_range("seed"), default=0)
    add_output_flags(p)
    p.add_argument("--json", metavar="REPORT", help="per-file report (.json, or .jsonl streamed; - for stdout)")
    add_report_flag(p, photos=True)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="local: this process (default); ray: a pool of Ray actors, one Protector each (needs the "
                        "extra faceveil[ray]; the inputs and OUTDIR must be on a filesystem every node sees)")
    p.add_argument("--address", metavar="ADDR", default=None,
                   help="ray: join the cluster of `ray start --head` at HOST:PORT (or auto); default: a local Ray "
                        "instance started for the run")
    p.add_argument("--workers", type=positive_int, default=2, metavar="N",
                   help="ray: actors in the pool, one CPU and one copy of the models each (default 2)")


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
        copy_unprotected=args.copy_unprotected, existing=args.existing, drop_audio=args.drop_audio,
        gamma=args.gamma, gain=args.gain, targets_dir=args.targets,
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
    """Before/after: per face, each judge's similarity original -> protected ('*' = still recognised) and the
    face's verdict in words; per file, its status ('written' for ok) and, with several faces, the photo's verdict."""
    from faceveil.models import zoo
    from faceveil.pipeline.results import face_rows, photo_verdict

    lines = ["| file | face | status | " + " | ".join(judges) + " | verdict |", "|" + "---|" * (4 + len(judges))]
    for r in results:
        name, status = printable(Path(r.file).name), "written" if r.status == "ok" else r.status
        faces = face_rows(r.details)
        if len(faces) != 1:  # the photo's own line: how many of its faces are protected, or why none was
            said = photo_verdict(faces, detail=False)[1] if faces else r.verdict or r.message
            lines.append(f"| {name} | | {status} |" + " |" * len(judges) + f" {printable(said)} |")
        for face in faces:
            cells = []
            for j in judges:
                v = face.get(j)
                cells.append(f"{v['score']:.3f}{'*' if v['matches'] else ''}" if v else "")
            lines.append(f"| {name} | {face.get('face', '')} | {status} | " + " | ".join(cells)
                         + f" | {face.get('verdict', '')} |")
        for other in (r.details or {}).get("not_faces", []):  # detections the face check refused: left alone
            lines.append(f"| {name} | - | {other['reason']} |" + " |" * (len(judges) + 1))
    out = stream or sys.stdout
    print("\n".join(lines), file=out)
    thresholds = ", ".join(f"{j} {zoo.threshold(j):.3f}" for j in judges)
    print("score = similarity original -> protected (cosine; -L2 for dlib: nearer 0 = more alike); "
          f"* = at or above the model's threshold, the model still recognises the face. Thresholds: {thresholds}",
          file=out)


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
